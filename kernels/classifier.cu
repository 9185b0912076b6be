// Fused softmax + cross-entropy, one block per row: per-token loss, and with a gradient scale the
// logits are overwritten in place by scale * (softmax - onehot(target)).
#include "common.cuh"

template <typename T>
__device__ void cross_entropy(float* losses, T* logits, const uint32_t* targets, int rows, int vocab,
                              float grad_scale, int write_grad) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    T* x = logits + (int64_t)row * vocab;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_f32(x[i]));
    m = block_max(m, scratch);
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_f32(x[i]) - m);
    const float lse = m + logf(block_sum(s, scratch));
    const uint32_t target = targets[row];
    // Every thread has read what it needs of the row before any thread overwrites it.
    const float target_logit = to_f32(x[target]);
    __syncthreads();
    if (threadIdx.x == 0) losses[row] = lse - target_logit;
    if (write_grad) {
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float p = expf(to_f32(x[i]) - lse);
            x[i] = from_f32<T>(grad_scale * (p - (i == (int)target ? 1.0f : 0.0f)));
        }
    }
}

#define CROSS_ENTROPY(T, TN)                                                                        \
    extern "C" __global__ void cross_entropy_##TN(float* losses, T* logits, const uint32_t* targets, \
                                                  int rows, int vocab, float grad_scale, int write_grad) { \
        cross_entropy(losses, logits, targets, rows, vocab, grad_scale, write_grad);                \
    }
CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(bf16, bf16)
