// GELU, tanh approximation, forward and backward. `1 + tanh(u)` and `sech²(u)` come from
// e = exp(-2|u|) without cancellation, exactly as the CPU reference computes them.
#include "common.cuh"

#define GELU_SCALE 0.7978845608028654f  // sqrt(2/pi)
#define GELU_CUBIC 0.044715f

__device__ __forceinline__ void tanh_parts(float u, float* one_plus_tanh, float* sech2) {
    const float e = expf(-2.0f * fabsf(u));
    const float d = 1.0f + e;
    *one_plus_tanh = u >= 0.0f ? 2.0f / d : 2.0f * e / d;
    *sech2 = 4.0f * e / (d * d);
}

template <typename T> __device__ void gelu_forward(T* out, const T* inp, int64_t n) {
    FOR_EACH(i, n) {
        const float x = to_f32(inp[i]);
        float opt, sech2;
        tanh_parts(GELU_SCALE * (x + GELU_CUBIC * x * x * x), &opt, &sech2);
        out[i] = from_f32<T>(0.5f * x * opt);
    }
}

template <typename T> __device__ void gelu_backward(T* dinp, const T* inp, const T* dout, int64_t n) {
    FOR_EACH(i, n) {
        const float x = to_f32(inp[i]);
        float opt, sech2;
        tanh_parts(GELU_SCALE * (x + GELU_CUBIC * x * x * x), &opt, &sech2);
        const float du = GELU_SCALE * (1.0f + 3.0f * GELU_CUBIC * x * x);
        dinp[i] = from_f32<T>((0.5f * opt + 0.5f * x * sech2 * du) * to_f32(dout[i]));
    }
}

#define GELU(T, NAME)                                                                               \
    extern "C" __global__ void gelu_forward_##NAME(T* out, const T* inp, int64_t n) { gelu_forward(out, inp, n); } \
    extern "C" __global__ void gelu_backward_##NAME(T* dinp, const T* inp, const T* dout, int64_t n) { gelu_backward(dinp, inp, dout, n); }
GELU(float, f32)
GELU(bf16, bf16)
