// Column sums of a [rows, cols] matrix, accumulated into a [cols] vector: the bias gradient of a
// linear layer. Two passes so that tall matrices (16k rows) still fill the GPU and the result does
// not depend on scheduling: (1) blocks of 32 columns x 8 row lanes each sum one chunk of rows into
// a partial row of an f32 scratch [chunks, cols]; (2) one thread per column adds the chunks in order
// and accumulates into the destination. No atomics: deterministic.
#include "common.cuh"

#define COLS_PER_BLOCK 32
#define ROW_LANES 8

// Grid (ceil(cols / 32), chunks), block (32, 8).
template <typename T>
__device__ void column_partial_sums(float* partial, const T* x, int rows, int cols, int rows_per_chunk) {
    __shared__ float lanes[ROW_LANES][COLS_PER_BLOCK];
    const int col = blockIdx.x * COLS_PER_BLOCK + threadIdx.x;
    const int row_begin = blockIdx.y * rows_per_chunk;
    const int row_end = min(rows, row_begin + rows_per_chunk);
    float s = 0.0f;
    if (col < cols)
        for (int row = row_begin + threadIdx.y; row < row_end; row += ROW_LANES) s += to_f32(x[(int64_t)row * cols + col]);
    lanes[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < cols) {
        for (int lane = 1; lane < ROW_LANES; lane++) s += lanes[lane][threadIdx.x];
        partial[(int64_t)blockIdx.y * cols + col] = s;
    }
}

// Grid-stride over columns: dst[c] += sum over chunks of partial[chunk, c], chunks in order.
template <typename G>
__device__ void accumulate_column_sums(G* dst, const float* partial, int chunks, int cols) {
    FOR_EACH(c, cols) {
        float s = 0.0f;
        for (int k = 0; k < chunks; k++) s += partial[(int64_t)k * cols + c];
        dst[c] = from_f32<G>(to_f32(dst[c]) + s);
    }
}

extern "C" __global__ void column_partial_sums_f32(float* partial, const float* x, int rows, int cols, int rows_per_chunk) {
    column_partial_sums(partial, x, rows, cols, rows_per_chunk);
}
extern "C" __global__ void column_partial_sums_bf16(float* partial, const bf16* x, int rows, int cols, int rows_per_chunk) {
    column_partial_sums(partial, x, rows, cols, rows_per_chunk);
}
extern "C" __global__ void accumulate_column_sums_f32(float* dst, const float* partial, int chunks, int cols) {
    accumulate_column_sums(dst, partial, chunks, cols);
}
extern "C" __global__ void accumulate_column_sums_bf16(bf16* dst, const float* partial, int chunks, int cols) {
    accumulate_column_sums(dst, partial, chunks, cols);
}
