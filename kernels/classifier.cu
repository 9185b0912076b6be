// Fused softmax + cross-entropy, one block per row: per-token loss, and with a gradient scale the
// logits are overwritten in place by scale * (softmax - onehot(target)).
//
// The row is read once for its statistics: each thread keeps a running maximum and the sum of
// exp(x - max) over its elements, rescaling the sum whenever the maximum grows, and the threads'
// pairs are combined by the same rule. A second read writes the gradient. Both reads use 128-bit
// accesses on the aligned middle of the row: the few elements before the first 16-byte boundary
// and after the last whole vector are read one by one, so any vocabulary and any row offset work.
#include "common.cuh"
#include "vector_io.cuh"

// Merges (m2, s2) into (m, s), where s is a sum of exp(x - m): both sums are brought to the larger
// maximum. A side with no elements yet (m = -inf, s = 0) adds 0 instead of 0 * exp(NaN).
__device__ __forceinline__ void merge_max_sum(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    s = (m == mx ? s : s * expf(m - mx)) + (m2 == mx ? s2 : s2 * expf(m2 - mx));
    m = mx;
}

// Adds n values to the running (m, s), rescaling once for the n of them.
template <int N>
__device__ __forceinline__ void add_to_max_sum(float& m, float& s, const float* v) {
    float mx = m;
#pragma unroll
    for (int j = 0; j < N; j++) mx = fmaxf(mx, v[j]);
    s = m == mx ? s : s * expf(m - mx);
#pragma unroll
    for (int j = 0; j < N; j++) s += expf(v[j] - mx);
    m = mx;
}

// Combines every thread's (m, s) over the block; every thread gets the result. The merge is
// symmetric, so both lanes of each butterfly step get the same bits. Synchronises the block.
__device__ __forceinline__ void block_max_sum(float& m, float& s) {
    __shared__ float scratch_m[32], scratch_s[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset >>= 1)
        merge_max_sum(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
    if (lane == 0) scratch_m[warp] = m, scratch_s[warp] = s;
    __syncthreads();
    m = lane < warps ? scratch_m[lane] : -INFINITY;
    s = lane < warps ? scratch_s[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1)
        merge_max_sum(m, s, __shfl_xor_sync(0xffffffff, m, offset), __shfl_xor_sync(0xffffffff, s, offset));
}

// The split of a row into a scalar head (up to the first 16-byte boundary), whole vectors, and a
// scalar tail.
struct RowSplit {
    int head, vectors, tail;  // tail: the first index after the vectors
};
template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* x, int n) {
    constexpr int N = VecWidth<T>::N;
    // Elements are sizeof(T)-aligned, so the distance to the boundary is whole elements.
    const int misaligned = (int)(((uintptr_t)x & 15u) / sizeof(T));
    const int head = min(n, (N - misaligned) % N);
    const int vectors = (n - head) / N;
    return {head, vectors, head + vectors * N};
}

template <typename T>
__device__ void cross_entropy(float* losses, T* logits, const uint32_t* targets, int rows, int vocab,
                              float grad_scale, int write_grad) {
    constexpr int N = VecWidth<T>::N;
    const int row = blockIdx.x;
    if (row >= rows) return;
    T* x = logits + (int64_t)row * vocab;
    const RowSplit split = split_row(x, vocab);
    const uint32_t target = targets[row];
    // Read before the reduction's barrier, so before any thread overwrites the row.
    const float target_logit = threadIdx.x == 0 ? to_f32(x[target]) : 0.0f;

    float m = -INFINITY, s = 0.0f;
    // The head and the tail: fewer than N elements each, so one per thread.
    for (int i = threadIdx.x; i < split.head; i += blockDim.x) {
        const float v = to_f32(x[i]);
        add_to_max_sum<1>(m, s, &v);
    }
    for (int i = split.tail + threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_f32(x[i]);
        add_to_max_sum<1>(m, s, &v);
    }
    for (int k = threadIdx.x; k < split.vectors; k += blockDim.x) {
        float v[N];
        load_vec(x + split.head + k * N, v);
        add_to_max_sum<N>(m, s, v);
    }
    block_max_sum(m, s);
    const float lse = m + logf(s);
    if (threadIdx.x == 0) losses[row] = lse - target_logit;
    if (!write_grad) return;

    const int t = (int)target;
    for (int i = threadIdx.x; i < split.head; i += blockDim.x)
        x[i] = from_f32<T>(grad_scale * (expf(to_f32(x[i]) - lse) - (i == t ? 1.0f : 0.0f)));
    for (int i = split.tail + threadIdx.x; i < vocab; i += blockDim.x)
        x[i] = from_f32<T>(grad_scale * (expf(to_f32(x[i]) - lse) - (i == t ? 1.0f : 0.0f)));
    for (int k = threadIdx.x; k < split.vectors; k += blockDim.x) {
        const int first = split.head + k * N;
        float v[N];
        load_vec(x + first, v);
#pragma unroll
        for (int j = 0; j < N; j++) v[j] = grad_scale * (expf(v[j] - lse) - (first + j == t ? 1.0f : 0.0f));
        store_vec(x + first, v);
    }
}

#define CROSS_ENTROPY(T, TN)                                                                        \
    extern "C" __global__ void cross_entropy_##TN(float* losses, T* logits, const uint32_t* targets, \
                                                  int rows, int vocab, float grad_scale, int write_grad) { \
        cross_entropy(losses, logits, targets, rows, vocab, grad_scale, write_grad);                \
    }
CROSS_ENTROPY(float, f32)
CROSS_ENTROPY(bf16, bf16)
