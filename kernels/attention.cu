// Causal multi-head attention, flash-style: the (seq x seq) probabilities never exist in memory.
// Forward: one block per (query tile, batch*head), one thread per query row, keys streamed through
// shared memory tile by tile with an online softmax; writes the output and each row's log-sum-exp.
// Backward (three kernels, no atomics, deterministic): D_i = dO_i . O_i; then dK and dV with one
// thread per key row streaming the queries that attend to it; then dQ with one thread per query
// row streaming its keys. Probabilities are recomputed from the saved log-sum-exp.
//
// Layout (as the CPU reference): qkv is [B, T, 3 * NH * HS] with all query heads, then all key
// heads, then all value heads per token; out and dout are [B, T, NH * HS]; lse and D are
// [B, NH, T] (f32). A first, CUDA-core version: correctness first, tensor cores later.
//
// Tiles: 64 rows for head sizes up to 64; 32 rows at head size 128, so that a block's two f32
// tiles fit the 48 KiB of static shared memory (2 x 32 x 128 x 4 bytes = 32 KiB). At 128 a
// thread's rows of q, o (and k, v, dk, dv in the backward) exceed the register file and spill:
// correct, slow, within the spill budget src/backend/cuda/launch.rs states; the tensor-core
// kernels replace these.
#include "common.cuh"

// Rows per tile (and threads per block) for head size HS; the Rust launcher's attention_tile().
__host__ __device__ constexpr int attention_tile(int hs) { return hs <= 64 ? 64 : 32; }

template <typename T, int HS>
__device__ __forceinline__ void load_row(float* dst, const T* src, float scale) {
#pragma unroll
    for (int d = 0; d < HS; d++) dst[d] = scale * to_f32(src[d]);
}

template <int HS> __device__ __forceinline__ float dot(const float* a, const float* b) {
    float s = 0.0f;
#pragma unroll
    for (int d = 0; d < HS; d++) s += a[d] * b[d];
    return s;
}

// Offset of token t's head h, part (0 query, 1 key, 2 value) in qkv.
__device__ __forceinline__ int64_t qkv_at(int b, int t, int part, int h, int seq, int heads, int hs) {
    const int64_t c = (int64_t)heads * hs;
    return ((int64_t)b * seq + t) * 3 * c + part * c + (int64_t)h * hs;
}

__device__ __forceinline__ int64_t out_at(int b, int t, int h, int seq, int heads, int hs) {
    return ((int64_t)b * seq + t) * heads * hs + (int64_t)h * hs;
}

// The block's threads load keys and values k0 .. k0+TILE-1 (one row each), then synchronise.
template <typename T, int HS>
__device__ __forceinline__ void load_kv_tile(float (*Ks)[HS], float (*Vs)[HS], const T* qkv, int b, int h,
                                             int k0, int seq, int heads) {
    const int j = k0 + threadIdx.x;
    if (j < seq) {
        load_row<T, HS>(Ks[threadIdx.x], qkv + qkv_at(b, j, 1, h, seq, heads, HS), 1.0f);
        load_row<T, HS>(Vs[threadIdx.x], qkv + qkv_at(b, j, 2, h, seq, heads, HS), 1.0f);
    }
    __syncthreads();
}

template <typename T, int HS>
__device__ void attention_forward(T* out, float* lse, const T* qkv, int seq, int heads) {
    constexpr int TILE = attention_tile(HS);
    __shared__ float Ks[TILE][HS];
    __shared__ float Vs[TILE][HS];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int q0 = blockIdx.x * TILE, i = q0 + threadIdx.x;
    const bool active = i < seq;
    const float scale = rsqrtf((float)HS);
    float q[HS], o[HS];
    if (active) load_row<T, HS>(q, qkv + qkv_at(b, i, 0, h, seq, heads, HS), scale);
#pragma unroll
    for (int d = 0; d < HS; d++) o[d] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    const int keys_end = min(seq, q0 + TILE);
    for (int k0 = 0; k0 < keys_end; k0 += TILE) {
        load_kv_tile<T, HS>(Ks, Vs, qkv, b, h, k0, seq, heads);
        if (active) {
            const int n = min(TILE, i - k0 + 1);  // causal: keys k0 .. i
            for (int jj = 0; jj < n; jj++) {
                const float s = dot<HS>(q, Ks[jj]);
                const float m_new = fmaxf(m, s);
                const float correction = expf(m - m_new);
                const float p = expf(s - m_new);
                l = l * correction + p;
#pragma unroll
                for (int d = 0; d < HS; d++) o[d] = o[d] * correction + p * Vs[jj][d];
                m = m_new;
            }
        }
        __syncthreads();
    }
    if (active) {
        T* dst = out + out_at(b, i, h, seq, heads, HS);
#pragma unroll
        for (int d = 0; d < HS; d++) dst[d] = from_f32<T>(o[d] / l);
        lse[(int64_t)bh * seq + i] = m + logf(l);
    }
}

// D[b, h, i] = dout_i . out_i, the term every dP row subtracts.
template <typename T, int HS>
__device__ void attention_backward_preprocess(float* D, const T* dout, const T* out, int batch, int seq,
                                              int heads) {
    const int64_t n = (int64_t)batch * heads * seq;
    FOR_EACH(idx, n) {
        const int i = idx % seq, bh = idx / seq, b = bh / heads, h = bh % heads;
        const int64_t at = out_at(b, i, h, seq, heads, HS);
        float s = 0.0f;
        for (int d = 0; d < HS; d++) s += to_f32(dout[at + d]) * to_f32(out[at + d]);
        D[idx] = s;
    }
}

// One thread per key row j: dV_j = sum_i P_ij dO_i, dK_j = scale * sum_i dS_ij q_i over i >= j.
template <typename T, int HS>
__device__ void attention_backward_dkdv(T* dqkv, const T* dout, const T* qkv, const float* lse,
                                        const float* D, int seq, int heads) {
    constexpr int TILE = attention_tile(HS);
    __shared__ float Qs[TILE][HS];
    __shared__ float dOs[TILE][HS];
    __shared__ float lse_s[TILE];
    __shared__ float D_s[TILE];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int k0 = blockIdx.x * TILE, j = k0 + threadIdx.x;
    const bool active = j < seq;
    const float scale = rsqrtf((float)HS);
    float k[HS], v[HS], dk[HS], dv[HS];
    if (active) {
        load_row<T, HS>(k, qkv + qkv_at(b, j, 1, h, seq, heads, HS), 1.0f);
        load_row<T, HS>(v, qkv + qkv_at(b, j, 2, h, seq, heads, HS), 1.0f);
    }
#pragma unroll
    for (int d = 0; d < HS; d++) dk[d] = dv[d] = 0.0f;
    for (int q0 = k0; q0 < seq; q0 += TILE) {
        const int i = q0 + threadIdx.x;
        if (i < seq) {
            load_row<T, HS>(Qs[threadIdx.x], qkv + qkv_at(b, i, 0, h, seq, heads, HS), 1.0f);
            load_row<T, HS>(dOs[threadIdx.x], dout + out_at(b, i, h, seq, heads, HS), 1.0f);
            lse_s[threadIdx.x] = lse[(int64_t)bh * seq + i];
            D_s[threadIdx.x] = D[(int64_t)bh * seq + i];
        }
        __syncthreads();
        if (active) {
            const int n = min(TILE, seq - q0);
            for (int ii = max(0, j - q0); ii < n; ii++) {  // causal: queries i >= j
                const float p = expf(scale * dot<HS>(Qs[ii], k) - lse_s[ii]);
                const float ds = p * (dot<HS>(dOs[ii], v) - D_s[ii]) * scale;
#pragma unroll
                for (int d = 0; d < HS; d++) {
                    dv[d] += p * dOs[ii][d];
                    dk[d] += ds * Qs[ii][d];
                }
            }
        }
        __syncthreads();
    }
    if (active) {
        T* dk_dst = dqkv + qkv_at(b, j, 1, h, seq, heads, HS);
        T* dv_dst = dqkv + qkv_at(b, j, 2, h, seq, heads, HS);
#pragma unroll
        for (int d = 0; d < HS; d++) {
            dk_dst[d] = from_f32<T>(dk[d]);
            dv_dst[d] = from_f32<T>(dv[d]);
        }
    }
}

// One thread per query row i: dQ_i = scale * sum_j dS_ij k_j over j <= i.
template <typename T, int HS>
__device__ void attention_backward_dq(T* dqkv, const T* dout, const T* qkv, const float* lse,
                                      const float* D, int seq, int heads) {
    constexpr int TILE = attention_tile(HS);
    __shared__ float Ks[TILE][HS];
    __shared__ float Vs[TILE][HS];
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int q0 = blockIdx.x * TILE, i = q0 + threadIdx.x;
    const bool active = i < seq;
    const float scale = rsqrtf((float)HS);
    float q[HS], dO[HS], dq[HS];
    float lse_i = 0.0f, D_i = 0.0f;
    if (active) {
        load_row<T, HS>(q, qkv + qkv_at(b, i, 0, h, seq, heads, HS), 1.0f);
        load_row<T, HS>(dO, dout + out_at(b, i, h, seq, heads, HS), 1.0f);
        lse_i = lse[(int64_t)bh * seq + i];
        D_i = D[(int64_t)bh * seq + i];
    }
#pragma unroll
    for (int d = 0; d < HS; d++) dq[d] = 0.0f;
    const int keys_end = min(seq, q0 + TILE);
    for (int k0 = 0; k0 < keys_end; k0 += TILE) {
        load_kv_tile<T, HS>(Ks, Vs, qkv, b, h, k0, seq, heads);
        if (active) {
            const int n = min(TILE, i - k0 + 1);
            for (int jj = 0; jj < n; jj++) {
                const float p = expf(scale * dot<HS>(q, Ks[jj]) - lse_i);
                const float ds = p * (dot<HS>(dO, Vs[jj]) - D_i) * scale;
#pragma unroll
                for (int d = 0; d < HS; d++) dq[d] += ds * Ks[jj][d];
            }
        }
        __syncthreads();
    }
    if (active) {
        T* dst = dqkv + qkv_at(b, i, 0, h, seq, heads, HS);
#pragma unroll
        for (int d = 0; d < HS; d++) dst[d] = from_f32<T>(dq[d]);
    }
}

// Launch: forward, dkdv and dq with grid (ceil(seq / tile), batch * heads) and tile threads per block;
// preprocess with a grid-stride launch over batch * heads * seq.
#define ATTENTION(T, TN, HS)                                                                        \
    extern "C" __global__ void __launch_bounds__(attention_tile(HS)) attention_forward_##TN##_hs##HS(            \
        T* out, float* lse, const T* qkv, int seq, int heads) {                                     \
        attention_forward<T, HS>(out, lse, qkv, seq, heads);                                        \
    }                                                                                               \
    extern "C" __global__ void attention_backward_preprocess_##TN##_hs##HS(                         \
        float* D, const T* dout, const T* out, int batch, int seq, int heads) {                     \
        attention_backward_preprocess<T, HS>(D, dout, out, batch, seq, heads);                      \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(attention_tile(HS)) attention_backward_dkdv_##TN##_hs##HS(      \
        T* dqkv, const T* dout, const T* qkv, const float* lse, const float* D, int seq, int heads) { \
        attention_backward_dkdv<T, HS>(dqkv, dout, qkv, lse, D, seq, heads);                        \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(attention_tile(HS)) attention_backward_dq_##TN##_hs##HS(        \
        T* dqkv, const T* dout, const T* qkv, const float* lse, const float* D, int seq, int heads) { \
        attention_backward_dq<T, HS>(dqkv, dout, qkv, lse, D, seq, heads);                          \
    }
ATTENTION(float, f32, 32)
ATTENTION(float, f32, 64)
ATTENTION(bf16, bf16, 32)
ATTENTION(bf16, bf16, 64)
ATTENTION(float, f32, 128)
ATTENTION(bf16, bf16, 128)
