// Fused softmax + cross-entropy, one block per row: per-token loss, and with a gradient scale the
// logits are overwritten in place by scale * (softmax - onehot(target)).
//
// The row is read once for its statistics: each thread keeps a running maximum and the sum of
// exp(x - max) over its elements, rescaling the sum whenever the maximum grows, and the threads'
// statistics are combined by the same rule (a second sum leaves the target out, for an accurate
// loss and target gradient when p_target is near 1). A second read writes the gradient. Both
// reads use 128-bit accesses on the aligned middle of the row: the few elements before the first
// 16-byte boundary and after the last whole vector are read one by one, so any vocabulary and
// any row offset work.
#include "common.cuh"
#include "vector_io.cuh"

// The running statistics of a row: the maximum m, the sum s of exp(x - m), and the same sum
// without the target's term (sx). sx gives the loss and the target's gradient without the
// cancellation of 1 - p and log(1 + tiny) in f32 when the target's probability is close to 1.
struct MaxSum {
    float m, s, sx;
};

// Merges b into a: both sums are brought to the larger maximum. A side with no elements yet
// (m = -inf, sums 0) adds 0 instead of 0 * exp(NaN). Symmetric, so both lanes of a butterfly
// step get the same bits.
__device__ __forceinline__ void merge_max_sum(MaxSum& a, const MaxSum& b) {
    const float mx = fmaxf(a.m, b.m);
    const float fa = a.m == mx ? 1.0f : expf(a.m - mx), fb = b.m == mx ? 1.0f : expf(b.m - mx);
    a.s = a.s * fa + b.s * fb;
    a.sx = a.sx * fa + b.sx * fb;
    a.m = mx;
}

// Adds the n values at row indices first.. to the running statistics, rescaling once for them.
template <int N>
__device__ __forceinline__ void add_to_max_sum(MaxSum& a, const float* v, int first, int target) {
    float mx = a.m;
#pragma unroll
    for (int j = 0; j < N; j++) mx = fmaxf(mx, v[j]);
    const float rescale = a.m == mx ? 1.0f : expf(a.m - mx);
    a.s *= rescale;
    a.sx *= rescale;
#pragma unroll
    for (int j = 0; j < N; j++) {
        const float e = expf(v[j] - mx);
        a.s += e;
        if (first + j != target) a.sx += e;
    }
    a.m = mx;
}

__device__ __forceinline__ MaxSum shfl_xor(const MaxSum& a, int offset) {
    return {__shfl_xor_sync(0xffffffff, a.m, offset), __shfl_xor_sync(0xffffffff, a.s, offset),
            __shfl_xor_sync(0xffffffff, a.sx, offset)};
}

// Combines every thread's statistics over the block; every thread gets the result. Synchronises
// the block.
__device__ __forceinline__ void block_max_sum(MaxSum& a) {
    __shared__ MaxSum scratch[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    for (int offset = 16; offset > 0; offset >>= 1) merge_max_sum(a, shfl_xor(a, offset));
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    a = lane < warps ? scratch[lane] : MaxSum{-INFINITY, 0.0f, 0.0f};
    for (int offset = 16; offset > 0; offset >>= 1) merge_max_sum(a, shfl_xor(a, offset));
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

    const int t = (int)target;
    MaxSum stats = {-INFINITY, 0.0f, 0.0f};
    // The head and the tail: fewer than N elements each, so one per thread.
    for (int i = threadIdx.x; i < split.head; i += blockDim.x) {
        const float v = to_f32(x[i]);
        add_to_max_sum<1>(stats, &v, i, t);
    }
    for (int i = split.tail + threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_f32(x[i]);
        add_to_max_sum<1>(stats, &v, i, t);
    }
    for (int k = threadIdx.x; k < split.vectors; k += blockDim.x) {
        const int first = split.head + k * N;
        float v[N];
        load_vec(x + first, v);
        add_to_max_sum<N>(stats, v, first, t);
    }
    block_max_sum(stats);
    const float lse = stats.m + logf(stats.s);
    if (threadIdx.x == 0) {
        // -log p_t = log((e_t + sx) / e_t) with e_t = exp(x_t - m); once the target is far below
        // the maximum, e_t underflows but the loss is large and lse - x_t is exact enough.
        const float gap = stats.m - target_logit;
        losses[row] = gap < 30.0f ? log1pf(stats.sx * expf(gap)) : lse - target_logit;
    }
    if (!write_grad) return;
    // The target's p - 1 = -(1 - p) = -sx / s.
    const float target_grad = -grad_scale * (stats.sx / stats.s);

    for (int i = threadIdx.x; i < split.head; i += blockDim.x)
        x[i] = from_f32<T>(i == t ? target_grad : grad_scale * expf(to_f32(x[i]) - lse));
    for (int i = split.tail + threadIdx.x; i < vocab; i += blockDim.x)
        x[i] = from_f32<T>(i == t ? target_grad : grad_scale * expf(to_f32(x[i]) - lse));
    for (int k = threadIdx.x; k < split.vectors; k += blockDim.x) {
        const int first = split.head + k * N;
        float v[N];
        load_vec(x + first, v);
#pragma unroll
        for (int j = 0; j < N; j++) v[j] = first + j == t ? target_grad : grad_scale * expf(v[j] - lse);
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
