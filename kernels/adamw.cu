// AdamW on f32 master weights with f32 moments, decoupled weight decay and bias correction; the
// compute copy (f32 or bf16) is written in the same pass when given. Also the sum of squares that
// global-norm clipping needs.
#include "common.cuh"

template <typename G, typename C>
__device__ void adamw(float* param, const G* grad, float* m, float* v, C* copy, int64_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                      float bias_correction2, float grad_scale) {
    FOR_EACH(i, n) {
        const float g = to_f32(grad[i]) * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float m_hat = mi / bias_correction1;
        const float v_hat = vi / bias_correction2;
        const float p = param[i] - lr * (m_hat / (sqrtf(v_hat) + eps) + weight_decay * param[i]);
        param[i] = p;
        if (copy != nullptr) copy[i] = from_f32<C>(p);
    }
}

#define ADAMW(G, GN, C, CN)                                                                         \
    extern "C" __global__ void adamw_##GN##_##CN(float* param, const G* grad, float* m, float* v,  \
                                                 C* copy, int64_t n, float lr, float beta1,         \
                                                 float beta2, float eps, float weight_decay,        \
                                                 float bias_correction1, float bias_correction2,    \
                                                 float grad_scale) {                                \
        adamw(param, grad, m, v, copy, n, lr, beta1, beta2, eps, weight_decay, bias_correction1,    \
              bias_correction2, grad_scale);                                                        \
    }
ADAMW(float, f32, float, f32)
ADAMW(float, f32, bf16, bf16)
ADAMW(bf16, bf16, float, f32)
ADAMW(bf16, bf16, bf16, bf16)

// acc[0] += Σ x²: a block sum per block, then one atomic add per block.
template <typename T> __device__ void sum_squares(float* acc, const T* x, int64_t n) {
    __shared__ float scratch[32];
    float s = 0.0f;
    FOR_EACH(i, n) {
        const float v = to_f32(x[i]);
        s += v * v;
    }
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) atomicAdd(acc, s);
}

extern "C" __global__ void sum_squares_f32(float* acc, const float* x, int64_t n) { sum_squares(acc, x, n); }
extern "C" __global__ void sum_squares_bf16(float* acc, const bf16* x, int64_t n) { sum_squares(acc, x, n); }
