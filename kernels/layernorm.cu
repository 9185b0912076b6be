// LayerNorm over the last dimension, forward and backward (eps 1e-5).
//
// Rows that fit in registers (the common case; src/backend/cuda/layernorm.rs decides):
// - forward: a group of threads per row (a warp, blocks of 8 rows, or one small block per row)
//   loads the row once into registers, takes the mean, then the variance from the deviations it
//   holds (not E[x^2] - E[x]^2, which cancels badly when |mean| >> spread), then writes the output.
// - backward: one block per chunk of rows walks its rows one at a time, accumulating dinp (it sits
//   on the residual stream) and keeping each column's dweight/dbias partial sum in the registers
//   of the thread that owns that column; the block writes one partial row per chunk to scratch, and
//   a second kernel adds the chunks in a fixed order into dweight/dbias. No float atomics and no
//   dependence on the number of SMs: results are bit-identical from run to run.
// Thread t's slot s covers columns [(s * threads + t) * N, +N), N = 16 bytes of T, so a warp's
// accesses are contiguous. Slots use 128-bit accesses when every row and parameter vector is
// 16-byte aligned and cols % N == 0, scalar accesses otherwise (views may start anywhere).
//
// Rows too wide for that (the `_wide` kernels): one block per row streaming the row from memory
// for each pass, and a column-parallel pass for dweight/dbias.
#include "common.cuh"
#include "vector_io.cuh"

#define LN_EPS 1e-5f

// Elements per thread held in registers: the forward keeps one row, the backward two of them (the
// normalised input and dnorm) plus the parameter-gradient partials. Must match layernorm.rs.
#define LN_FORWARD_ELEMS 32
#define LN_BACKWARD_ELEMS 16
// Most threads on one row (LAYERNORM_ROW_MAX_THREADS in src/backend/cuda/launch.rs).
#define LN_ROW_MAX_THREADS 512

// Loads slot columns [c, c + N) of `p` as f32, zeros past `cols`.
template <typename T, int N>
__device__ __forceinline__ void load_slot(const T* p, int c, int cols, bool vec, float* v) {
    if (vec && c < cols) {
        load_vec(p + c, v);
        return;
    }
#pragma unroll
    for (int j = 0; j < N; j++) v[j] = c + j < cols ? to_f32(p[c + j]) : 0.0f;
}

// Stores the in-range columns of slot [c, c + N).
template <typename T, int N>
__device__ __forceinline__ void store_slot(T* p, int c, int cols, bool vec, const float* v) {
    if (vec && c < cols) {
        store_vec(p + c, v);
        return;
    }
#pragma unroll
    for (int j = 0; j < N; j++)
        if (c + j < cols) p[c + j] = from_f32<T>(v[j]);
}

// Sum over the threads of one row: a warp (blockDim.x == 32, rows in blockDim.y) or the whole
// block (blockDim.y == 1). Every thread of the row gets the result.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
    return blockDim.x == 32 ? warp_sum(v) : block_sum(v, scratch);
}

// Two sums over one block at the cost of one (two barriers); `scratch` holds 64 floats.
__device__ __forceinline__ float2 block_sum2(float a, float b, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    a = warp_sum(a);
    b = warp_sum(b);
    __syncthreads();  // the previous row's readers are done with scratch
    if (lane == 0) scratch[warp] = a, scratch[32 + warp] = b;
    __syncthreads();
    a = lane < warps ? scratch[lane] : 0.0f;
    b = lane < warps ? scratch[32 + lane] : 0.0f;
    return make_float2(warp_sum(a), warp_sum(b));
}

// Grid: rows / blockDim.y blocks (rounded up). Block (threads per row, rows per block).
template <typename T>
__device__ void layernorm_forward(T* out, float* mean, float* rstd, const T* inp, const T* weight,
                                  const T* bias, int rows, int cols) {
    constexpr int N = VecWidth<T>::N, SLOTS = LN_FORWARD_ELEMS / N;
    __shared__ float scratch[32];
    const int row = blockIdx.x * blockDim.y + threadIdx.y;
    // A whole warp (blockDim.x == 32) or the whole block (blockDim.y == 1) leaves together.
    if (row >= rows) return;
    const bool vec = cols % N == 0 && aligned16(inp) && aligned16(out) && aligned16(weight) && aligned16(bias);
    const T* x = inp + (int64_t)row * cols;
    float v[SLOTS][N];
    float sum = 0.0f;
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
        load_slot<T, N>(x, (s * blockDim.x + threadIdx.x) * N, cols, vec, v[s]);
#pragma unroll
        for (int j = 0; j < N; j++) sum += v[s][j];
    }
    const float m = row_sum(sum, scratch) / cols;
    float sq = 0.0f;
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
        const int c = (s * blockDim.x + threadIdx.x) * N;
#pragma unroll
        for (int j = 0; j < N; j++) {
            const float d = c + j < cols ? v[s][j] - m : 0.0f;
            sq += d * d;
        }
    }
    const float r = rsqrtf(row_sum(sq, scratch) / cols + LN_EPS);
    T* o = out + (int64_t)row * cols;
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
        const int c = (s * blockDim.x + threadIdx.x) * N;
        if (c >= cols) break;
        float w[N], b[N];
        load_slot<T, N>(weight, c, cols, vec, w);
        load_slot<T, N>(bias, c, cols, vec, b);
#pragma unroll
        for (int j = 0; j < N; j++) v[s][j] = (v[s][j] - m) * r * w[j] + b[j];
        store_slot<T, N>(o, c, cols, vec, v[s]);
    }
    if (threadIdx.x == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// Grid: chunks (row chunk b is rows [b * rows_per_chunk, +rows_per_chunk)). Block (threads, 1).
// partial: f32 [2, chunks, cols], dweight's partial rows then dbias's.
template <typename T>
__device__ void layernorm_backward(T* dinp, float* partial, const T* dout, const T* inp, const T* weight,
                                   const float* mean, const float* rstd, int rows, int cols,
                                   int rows_per_chunk) {
    constexpr int N = VecWidth<T>::N, SLOTS = LN_BACKWARD_ELEMS / N;
    __shared__ float scratch[64];
    const bool vec = cols % N == 0 && aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(weight);
    float acc_w[SLOTS][N], acc_b[SLOTS][N];
#pragma unroll
    for (int s = 0; s < SLOTS; s++)
#pragma unroll
        for (int j = 0; j < N; j++) acc_w[s][j] = acc_b[s][j] = 0.0f;
    const int row_begin = blockIdx.x * rows_per_chunk;
    const int row_end = min(rows, row_begin + rows_per_chunk);
    for (int row = row_begin; row < row_end; row++) {
        const int64_t base = (int64_t)row * cols;
        const float m = mean[row], r = rstd[row];
        // norm and dnorm of this thread's columns; past `cols` dout loads as 0, so those
        // columns add nothing to the sums below.
        float norm[SLOTS][N], dnorm[SLOTS][N];
        float dnorm_sum = 0.0f, dnorm_norm_sum = 0.0f;
#pragma unroll
        for (int s = 0; s < SLOTS; s++) {
            const int c = (s * blockDim.x + threadIdx.x) * N;
            // The weight is re-read per row (from L1) rather than held: f32 would spill.
            float w[N];
            load_slot<T, N>(inp + base, c, cols, vec, norm[s]);
            load_slot<T, N>(dout + base, c, cols, vec, dnorm[s]);
            load_slot<T, N>(weight, c, cols, vec, w);
#pragma unroll
            for (int j = 0; j < N; j++) {
                const float n = (norm[s][j] - m) * r, dy = dnorm[s][j];
                acc_w[s][j] += dy * n;
                acc_b[s][j] += dy;
                const float d = dy * w[j];
                dnorm_sum += d;
                dnorm_norm_sum += d * n;
                norm[s][j] = n;
                dnorm[s][j] = d;
            }
        }
        const float2 sums = blockDim.x == 32 ? make_float2(warp_sum(dnorm_sum), warp_sum(dnorm_norm_sum))
                                             : block_sum2(dnorm_sum, dnorm_norm_sum, scratch);
        const float dnorm_mean = sums.x / cols, dnorm_norm_mean = sums.y / cols;
#pragma unroll
        for (int s = 0; s < SLOTS; s++) {
            const int c = (s * blockDim.x + threadIdx.x) * N;
            if (c >= cols) break;
            float dx[N];
            load_slot<T, N>(dinp + base, c, cols, vec, dx);
#pragma unroll
            for (int j = 0; j < N; j++) dx[j] += (dnorm[s][j] - dnorm_mean - norm[s][j] * dnorm_norm_mean) * r;
            store_slot<T, N>(dinp + base, c, cols, vec, dx);
        }
    }
    const int chunks = gridDim.x;
    float* pw = partial + (int64_t)blockIdx.x * cols;
    float* pb = partial + ((int64_t)chunks + blockIdx.x) * cols;
#pragma unroll
    for (int s = 0; s < SLOTS; s++) {
        const int c = (s * blockDim.x + threadIdx.x) * N;
#pragma unroll
        for (int j = 0; j < N; j++)
            if (c + j < cols) pw[c + j] = acc_w[s][j], pb[c + j] = acc_b[s][j];
    }
}

// Grid (ceil(cols / 32), 2): y = 0 adds dweight's chunks, y = 1 dbias's. Block (32, 8): 32
// columns by 8 lanes; lane l sums chunks l, l + 8, ... and lanes are combined in order, so the
// order of every addition is fixed by (chunks, cols) alone.
template <typename G>
__device__ void layernorm_backward_params_total(G* dweight, G* dbias, const float* partial, int chunks, int cols) {
    __shared__ float lanes[8][32];
    const int col = blockIdx.x * 32 + threadIdx.x;
    const float* p = partial + (int64_t)blockIdx.y * chunks * cols;
    float s = 0.0f;
    if (col < cols)
        for (int k = threadIdx.y; k < chunks; k += 8) s += p[(int64_t)k * cols + col];
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        for (int lane = 1; lane < 8; lane++) s += lanes[lane][threadIdx.x];
        G* dst = blockIdx.y == 0 ? dweight : dbias;
        dst[col] = from_f32<G>(to_f32(dst[col]) + s);
    }
}

// ---- rows wider than the register-resident kernels hold ------------------------------------------

template <typename T>
__device__ void layernorm_forward_wide(T* out, float* mean, float* rstd, const T* inp, const T* weight,
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
__device__ void layernorm_backward_input_wide(T* dinp, const T* dout, const T* inp, const T* weight,
                                              const float* mean, const float* rstd, int rows, int cols) {
    __shared__ float scratch[64];
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
    const float2 sums = block_sum2(dnorm_sum, dnorm_norm_sum, scratch);
    const float dnorm_mean = sums.x / cols, dnorm_norm_mean = sums.y / cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        const float norm = (to_f32(inp[base + i]) - m) * r;
        const float dnorm = to_f32(dout[base + i]) * to_f32(weight[i]);
        const float dx = (dnorm - dnorm_mean - norm * dnorm_norm_mean) * r;
        dinp[base + i] = from_f32<T>(to_f32(dinp[base + i]) + dx);
    }
}

// Block (32, 8): 32 columns, 8 lanes striding over rows; lanes are combined in a fixed order.
// Only for the wide rows: it leaves most SMs idle on narrow ones.
template <typename T, typename G>
__device__ void layernorm_backward_params_wide(G* dweight, G* dbias, const T* dout, const T* inp,
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
    extern "C" __global__ void __launch_bounds__(LN_ROW_MAX_THREADS) layernorm_forward_##TN(T* out, float* mean, float* rstd, const T* inp, \
                                                      const T* weight, const T* bias, int rows, int cols) { \
        layernorm_forward(out, mean, rstd, inp, weight, bias, rows, cols);                          \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(LN_ROW_MAX_THREADS) layernorm_backward_##TN(T* dinp, float* partial, const T* dout,      \
                                                       const T* inp, const T* weight, const float* mean, \
                                                       const float* rstd, int rows, int cols,       \
                                                       int rows_per_chunk) {                        \
        layernorm_backward(dinp, partial, dout, inp, weight, mean, rstd, rows, cols, rows_per_chunk); \
    }                                                                                               \
    extern "C" __global__ void layernorm_forward_wide_##TN(T* out, float* mean, float* rstd,       \
                                                           const T* inp, const T* weight,          \
                                                           const T* bias, int rows, int cols) {     \
        layernorm_forward_wide(out, mean, rstd, inp, weight, bias, rows, cols);                     \
    }                                                                                               \
    extern "C" __global__ void layernorm_backward_input_wide_##TN(T* dinp, const T* dout, const T* inp, \
                                                                  const T* weight, const float* mean, \
                                                                  const float* rstd, int rows, int cols) { \
        layernorm_backward_input_wide(dinp, dout, inp, weight, mean, rstd, rows, cols);             \
    }                                                                                               \
    extern "C" __global__ void layernorm_backward_params_total_##TN(T* dweight, T* dbias,          \
                                                                    const float* partial, int chunks, \
                                                                    int cols) {                     \
        layernorm_backward_params_total(dweight, dbias, partial, chunks, cols);                     \
    }
LAYERNORM(float, f32)
LAYERNORM(bf16, bf16)

#define LAYERNORM_PARAMS_WIDE(T, TN, G, GN)                                                         \
    extern "C" __global__ void layernorm_backward_params_wide_##TN##_##GN(                          \
        G* dweight, G* dbias, const T* dout, const T* inp, const float* mean, const float* rstd,    \
        int rows, int cols) {                                                                       \
        layernorm_backward_params_wide(dweight, dbias, dout, inp, mean, rstd, rows, cols);          \
    }
LAYERNORM_PARAMS_WIDE(float, f32, float, f32)
LAYERNORM_PARAMS_WIDE(bf16, bf16, float, f32)
LAYERNORM_PARAMS_WIDE(bf16, bf16, bf16, bf16)
LAYERNORM_PARAMS_WIDE(float, f32, bf16, bf16)
