// Token + position embedding, forward and backward. The position gradient sums the batch in a
// fixed order (deterministic); the token gradient adds rows with atomics (order-dependent in the
// last bits when one token repeats: noted for a deterministic version).
#include "common.cuh"

template <typename T>
__device__ void embedding_forward(T* out, const uint32_t* ids, const T* wte, const T* wpe, int batch,
                                  int seq, int channels) {
    const int64_t n = (int64_t)batch * seq * channels;
    FOR_EACH(i, n) {
        const int64_t token = i / channels;
        const int c = i % channels;
        const int t = token % seq;
        out[i] = from_f32<T>(to_f32(wte[(int64_t)ids[token] * channels + c]) + to_f32(wpe[(int64_t)t * channels + c]));
    }
}

// One thread per (position, channel): dwpe[t, c] += Σ_b dout[b, t, c].
template <typename G, typename T>
__device__ void embedding_backward_positions(G* dwpe, const T* dout, int batch, int seq, int channels) {
    const int64_t n = (int64_t)seq * channels;
    FOR_EACH(i, n) {
        float acc = 0.0f;
        for (int b = 0; b < batch; b++) acc += to_f32(dout[(int64_t)b * n + i]);
        dwpe[i] = from_f32<G>(to_f32(dwpe[i]) + acc);
    }
}

__device__ __forceinline__ void atomic_add(float* dst, float v) { atomicAdd(dst, v); }
__device__ __forceinline__ void atomic_add(bf16* dst, float v) { atomicAdd(dst, from_f32<bf16>(v)); }

template <typename G, typename T>
__device__ void embedding_backward_tokens(G* dwte, const uint32_t* ids, const T* dout, int tokens,
                                          int channels) {
    const int64_t n = (int64_t)tokens * channels;
    FOR_EACH(i, n) {
        const int64_t token = i / channels;
        atomic_add(&dwte[(int64_t)ids[token] * channels + i % channels], to_f32(dout[i]));
    }
}

#define EMBEDDING(T, TN)                                                                            \
    extern "C" __global__ void embedding_forward_##TN(T* out, const uint32_t* ids, const T* wte,   \
                                                      const T* wpe, int batch, int seq, int channels) { \
        embedding_forward(out, ids, wte, wpe, batch, seq, channels);                                \
    }
EMBEDDING(float, f32)
EMBEDDING(bf16, bf16)

#define EMBEDDING_BACKWARD(G, GN, T, TN)                                                            \
    extern "C" __global__ void embedding_backward_positions_##GN##_##TN(G* dwpe, const T* dout,    \
                                                                        int batch, int seq, int channels) { \
        embedding_backward_positions(dwpe, dout, batch, seq, channels);                             \
    }                                                                                               \
    extern "C" __global__ void embedding_backward_tokens_##GN##_##TN(G* dwte, const uint32_t* ids, \
                                                                     const T* dout, int tokens, int channels) { \
        embedding_backward_tokens(dwte, ids, dout, tokens, channels);                               \
    }
EMBEDDING_BACKWARD(float, f32, float, f32)
EMBEDDING_BACKWARD(float, f32, bf16, bf16)
EMBEDDING_BACKWARD(bf16, bf16, bf16, bf16)
EMBEDDING_BACKWARD(bf16, bf16, float, f32)
