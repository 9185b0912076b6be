// AdamW on f32 master weights with f32 moments, decoupled weight decay and bias correction; the
// compute copy (f32 or bf16) is written in the same pass when given. One tensor per launch, or
// every tensor of a unit's shard in one launch (the multi-tensor form). Also the sum of squares
// that global-norm clipping needs.
#include "common.cuh"

// One element's update. Both forms call it, so a tensor gets the same bits either way.
template <typename G, typename C>
__device__ __forceinline__ void adamw_element(int64_t i, float* param, const G* grad, float* m, float* v,
                                              C* copy, float lr, float beta1, float beta2, float eps,
                                              float weight_decay, float bias_correction1,
                                              float bias_correction2, float grad_scale) {
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

template <typename G, typename C>
__device__ void adamw(float* param, const G* grad, float* m, float* v, C* copy, int64_t n, float lr,
                      float beta1, float beta2, float eps, float weight_decay, float bias_correction1,
                      float bias_correction2, float grad_scale) {
    FOR_EACH(i, n) {
        adamw_element(i, param, grad, m, v, copy, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                      bias_correction2, grad_scale);
    }
}

// The multi-tensor form: `segments` holds `count` (start, end, decays) triples in increasing,
// non-overlapping order (the tensors of a unit's shard). The grid strides over [first start, last
// end); elements between segments (padding) are left alone. Each thread's indices only grow, so
// its segment cursor only moves forward: no search per element.
template <typename G, typename C>
__device__ void adamw_segments(float* param, const G* grad, float* m, float* v, C* copy,
                               const int64_t* segments, int count, float lr, float beta1, float beta2,
                               float eps, float weight_decay, float bias_correction1,
                               float bias_correction2, float grad_scale) {
    if (count <= 0) return;
    const int64_t first = segments[0];
    const int64_t last = segments[3 * (count - 1) + 1];
    int s = 0;
    for (int64_t i = first + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < last;
         i += (int64_t)gridDim.x * blockDim.x) {
        while (s < count && i >= segments[3 * s + 1]) ++s;
        if (s == count) break;
        if (i < segments[3 * s]) continue;
        const float wd = segments[3 * s + 2] != 0 ? weight_decay : 0.0f;
        adamw_element(i, param, grad, m, v, copy, lr, beta1, beta2, eps, wd, bias_correction1,
                      bias_correction2, grad_scale);
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

#define ADAMW_SEGMENTS(G, GN, C, CN)                                                                \
    extern "C" __global__ void adamw_segments_##GN##_##CN(                                          \
        float* param, const G* grad, float* m, float* v, C* copy, const int64_t* segments,         \
        int count, float lr, float beta1, float beta2, float eps, float weight_decay,               \
        float bias_correction1, float bias_correction2, float grad_scale) {                         \
        adamw_segments(param, grad, m, v, copy, segments, count, lr, beta1, beta2, eps,             \
                       weight_decay, bias_correction1, bias_correction2, grad_scale);               \
    }
ADAMW_SEGMENTS(float, f32, float, f32)
ADAMW_SEGMENTS(float, f32, bf16, bf16)
ADAMW_SEGMENTS(bf16, bf16, float, f32)
ADAMW_SEGMENTS(bf16, bf16, bf16, bf16)

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
