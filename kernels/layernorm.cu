// LayerNorm over the last dimension, forward and backward (eps 1e-5).
// Forward: one block per row. Backward: one block per row for the input gradient (accumulated:
// it sits on the residual stream), then a column-parallel pass for the weight and bias gradients
// that sums rows in a fixed order, so results are deterministic.
#include "common.cuh"

#define LN_EPS 1e-5f

template <typename T>
__device__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                  const T* bias, int rows, int cols) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* x = inp + (int64_t)row * cols;
    float sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) sum += to_f32(x[i]);
    const float m = block_sum(sum, scratch) / cols;
    float sq = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float d = to_f32(x[i]) - m;
        sq += d * d;
    }
    const float r = rsqrtf(block_sum(sq, scratch) / cols + LN_EPS);
    T* o = out + (int64_t)row * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x)
        o[i] = from_f32<T>((to_f32(x[i]) - m) * r * to_f32(weight[i]) + to_f32(bias[i]));
    if (threadIdx.x == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

template <typename T>
__device__ void layernorm_backward_input(T* dinp, const T* dout, const T* inp, const T* weight,
                                         const float* mean, const float* rstd, int rows, int cols) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const int64_t base = (int64_t)row * cols;
    const float m = mean[row], r = rstd[row];
    float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float norm = (to_f32(inp[base + i]) - m) * r;
        const float dnorm = to_f32(dout[base + i]) * to_f32(weight[i]);
        dnorm_sum += dnorm;
        dnorm_norm_sum += dnorm * norm;
    }
    const float dnorm_mean = block_sum(dnorm_sum, scratch) / cols;
    const float dnorm_norm_mean = block_sum(dnorm_norm_sum, scratch) / cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float norm = (to_f32(inp[base + i]) - m) * r;
        const float dnorm = to_f32(dout[base + i]) * to_f32(weight[i]);
        const float dx = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
        dinp[base + i] = from_f32<T>(to_f32(dinp[base + i]) + dx);
    }
}

// Block (32, 8): 32 columns, 8 lanes striding over rows; lanes are combined in a fixed order.
template <typename T, typename G>
__device__ void layernorm_backward_params(G* dweight, G* dbias, const T* dout, const T* inp,
                                          const float* mean, const float* rstd, int rows, int cols) {
    __shared__ float partial_w[8][32];
    __shared__ float partial_b[8][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float w = 0.0f, b = 0.0f;
    if (col < cols) {
        for (int row = threadIdx.y; row < rows; row += 8) {
            const int64_t i = (int64_t)row * cols + col;
            const float dy = to_f32(dout[i]);
            w += dy * (to_f32(inp[i]) - mean[row]) * rstd[row];
            b += dy;
        }
    }
    partial_w[threadIdx.y][threadIdx.x] = w;
    partial_b[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        for (int lane = 1; lane < 8; lane++) {
            w += partial_w[lane][threadIdx.x];
            b += partial_b[lane][threadIdx.x];
        }
        dweight[col] = from_f32<G>(to_f32(dweight[col]) + w);
        dbias[col] = from_f32<G>(to_f32(dbias[col]) + b);
    }
}

#define LAYERNORM(T, TN)                                                                            \
    extern "C" __global__ void layernorm_forward_##TN(T* out, float* mean, float* rstd, const T* inp, \
                                                      const T* weight, const T* bias, int rows, int cols) { \
        layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols);                          \
    }                                                                                               \
    extern "C" __global__ void layernorm_backward_input_##TN(T* dinp, const T* dout, const T* inp, \
                                                             const T* weight, const float* mean,    \
                                                             const float* rstd, int rows, int cols) { \
        layernorm_backward_input(dinp, dout, inp, weight, mean, rstd, rows, cols);                  \
    }
LAYERNORM(float, f32)
LAYERNORM(bf16, bf16)

#define LAYERNORM_PARAMS(T, TN, G, GN)                                                              \
    extern "C" __global__ void layernorm_backward_params_##TN##_##GN(                               \
        G* dweight, G* dbias, const T* dout, const T* inp, const float* mean, const float* rstd,    \
        int rows, int cols) {                                                                       \
        layernorm_backward_params(dweight, dbias, dout, inp, mean, rstd, rows, cols);               \
    }
LAYERNORM_PARAMS(float, f32, float, f32)
LAYERNORM_PARAMS(bf16, bf16, float, f32)
LAYERNORM_PARAMS(bf16, bf16, bf16, bf16)
LAYERNORM_PARAMS(float, f32, bf16, bf16)
