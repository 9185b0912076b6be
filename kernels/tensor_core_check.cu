// Test kernels for tensor_core.cuh: each multiplies small bf16 matrices through the mma fragments,
// loading them the way a GEMM or flash-attention kernel would, and writes D = A * B + C (f32) to global
// memory; src/check/tensor_core.rs compares D with an f64 reference on the GPU and on the sim.
//
// Every kernel takes (d, a, b, c): A is M x K, B is K x N (stored as each variant says), C and D are
// M x N row-major f32. One warp per kernel and M = 16, N = 8, K = 16, except `pipeline` (two warps,
// N = 16, K = 64). The layouts and shapes are mirrored by VARIANTS in src/check/tensor_core.rs.
#include "tensor_core.cuh"

namespace {

constexpr int M = 16, N = 8, K = 16;

__device__ __forceinline__ int lane_of_thread() { return threadIdx.x % 32; }

// The A fragment read straight from a row-major A in global memory (row stride lda), per the layout
// in tensor_core.cuh: registers 0..3 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
// (rows 8-15, k 8-15) of the 16x16 tile.
__device__ __forceinline__ void load_a_direct(uint32_t a[4], const bf16* A, int lda) {
    const int g = lane_of_thread() / 4, t = lane_of_thread() % 4;
    const bf16* top = A + g * lda + 2 * t;
    const bf16* bottom = A + (g + 8) * lda + 2 * t;
    a[0] = pack_bf16x2(top[0], top[1]);
    a[1] = pack_bf16x2(bottom[0], bottom[1]);
    a[2] = pack_bf16x2(top[8], top[9]);
    a[3] = pack_bf16x2(bottom[8], bottom[9]);
}

// The B fragment from a k-major B (B[k][n], row stride ldb): lane (g, t) holds column n = g, rows
// 2t, 2t+1 (register 0) and 2t+8, 2t+9 (register 1).
__device__ __forceinline__ void load_b_direct(uint32_t b[2], const bf16* B, int ldb) {
    const int g = lane_of_thread() / 4, t = lane_of_thread() % 4;
    b[0] = pack_bf16x2(B[(2 * t) * ldb + g], B[(2 * t + 1) * ldb + g]);
    b[1] = pack_bf16x2(B[(2 * t + 8) * ldb + g], B[(2 * t + 9) * ldb + g]);
}

// The accumulator fragment of a row-major C (row stride ldc): rows g and g + 8, columns 2t, 2t+1.
__device__ __forceinline__ void load_c(float c[4], const float* C, int ldc) {
    const int g = lane_of_thread() / 4, t = lane_of_thread() % 4;
    for (int i = 0; i < 4; i++) c[i] = C[(g + (i >= 2 ? 8 : 0)) * ldc + 2 * t + (i & 1)];
}

__device__ __forceinline__ void store_d(float* D, int ldd, const float d[4]) {
    const int g = lane_of_thread() / 4, t = lane_of_thread() % 4;
    for (int i = 0; i < 4; i++) D[(g + (i >= 2 ? 8 : 0)) * ldd + 2 * t + (i & 1)] = d[i];
}

// Shared tiles hold raw bf16 bits (b16, what ldmatrix and cp.async move). Not bf16 itself: on the
// sim, where __shared__ is a block-scope thread_local, the host compiler guards a static of that class
// type with an initialisation flag every simulated thread touches, a race under ThreadSanitizer.
typedef uint16_t b16;

// Plain element copies into shared memory by the whole block, then a barrier.
__device__ __forceinline__ void copy_to_shared(b16* dst, const bf16* src, int count) {
    for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = __bfloat16_as_ushort(src[i]);
    __syncthreads();
}

__device__ __forceinline__ void finish(float* d, const uint32_t a[4], const uint32_t b[2], const float* c) {
    float acc[4];
    load_c(acc, c, N);
    mma_m16n8k16_bf16(acc, a, b, acc);
    store_d(d, N, acc);
}

}  // namespace

// A row-major [16][16], B k-major [16][8]: both fragments loaded lane by lane from global memory.
extern "C" __global__ void tensor_core_check_direct(float* d, const bf16* a, const bf16* b, const float* c) {
    uint32_t ra[4], rb[2];
    load_a_direct(ra, a, K);
    load_b_direct(rb, b, N);
    finish(d, ra, rb, c);
}

// A row-major [16][16] through cp.async into shared memory (one 16-byte chunk per lane: row i / 2,
// columns 8 (i % 2) ..), then ldmatrix.x4: lanes 0-15 address rows 0-15 at column 0 (matrices 0 and
// 1: k 0-7), lanes 16-31 the same rows at column 8 (matrices 2 and 3: k 8-15).
extern "C" __global__ void tensor_core_check_a_cp_async_x4(float* d, const bf16* a, const bf16* b, const float* c) {
    __shared__ __align__(16) b16 As[M][K];
    const int lane = lane_of_thread();
    cp_async_16(&As[lane / 2][(lane % 2) * 8], a + (lane / 2) * K + (lane % 2) * 8);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();  // the copies are complete for their issuing lanes only until the barrier
    uint32_t ra[4], rb[2];
    ldmatrix_x4(ra, &As[lane % 16][(lane / 16) * 8]);
    load_b_direct(rb, b, N);
    finish(d, ra, rb, c);
}

// A stored k-major (At[k][m], [16][16]: a transposed operand such as dS^T in attention's backward)
// through ldmatrix.x4.trans: matrix j needs At rows k = 8 (j / 2) .. + 7 at columns m = 8 (j % 2).
extern "C" __global__ void tensor_core_check_a_x4_trans(float* d, const bf16* a, const bf16* b, const float* c) {
    __shared__ __align__(16) b16 At[K][M];
    copy_to_shared(&At[0][0], a, K * M);
    const int lane = lane_of_thread(), j = lane / 8;
    uint32_t ra[4], rb[2];
    ldmatrix_x4_trans(ra, &At[(j / 2) * 8 + lane % 8][(j % 2) * 8]);
    load_b_direct(rb, b, N);
    finish(d, ra, rb, c);
}

// B row-major [16][8] (k x n: V in P * V) through ldmatrix.x2.trans: lanes 0-7 address k rows 0-7
// (register 0), lanes 8-15 k rows 8-15 (register 1); lanes 16-31 repeat them, unused.
extern "C" __global__ void tensor_core_check_b_x2_trans(float* d, const bf16* a, const bf16* b, const float* c) {
    __shared__ __align__(16) b16 Bs[K][N];
    copy_to_shared(&Bs[0][0], b, K * N);
    const int lane = lane_of_thread();
    uint32_t ra[4], rb[2];
    load_a_direct(ra, a, K);
    ldmatrix_x2_trans(rb, &Bs[lane % 16][0]);
    finish(d, ra, rb, c);
}

// B n-major [8][16] (Bt[n][k]: K in Q * K^T) through ldmatrix.x2: matrix 0 is columns k 0-7 of the
// eight n rows, matrix 1 columns k 8-15.
extern "C" __global__ void tensor_core_check_b_x2(float* d, const bf16* a, const bf16* b, const float* c) {
    __shared__ __align__(16) b16 Bt[N][K];
    copy_to_shared(&Bt[0][0], b, N * K);
    const int lane = lane_of_thread();
    uint32_t ra[4], rb[2];
    load_a_direct(ra, a, K);
    ldmatrix_x2(rb, &Bt[lane % 8][((lane / 8) % 2) * 8]);
    finish(d, ra, rb, c);
}

// One matrix at a time: A row-major [16][16] as four ldmatrix.x1 (register j from rows 8 (j % 2) ..,
// columns 8 (j / 2) ..), B row-major [16][8] as two ldmatrix.x1.trans (register j from k rows 8 j ..).
// Only lanes 0-7 supply addresses; the others pass their own row, which the instruction ignores.
extern "C" __global__ void tensor_core_check_x1(float* d, const bf16* a, const bf16* b, const float* c) {
    __shared__ __align__(16) b16 As[M][K];
    __shared__ __align__(16) b16 Bs[K][N];
    copy_to_shared(&As[0][0], a, M * K);
    copy_to_shared(&Bs[0][0], b, K * N);
    const int lane = lane_of_thread();
    uint32_t ra[4], rb[2];
    for (int j = 0; j < 4; j++) ldmatrix_x1(&ra[j], &As[(j % 2) * 8 + lane % 8][(j / 2) * 8]);
    for (int j = 0; j < 2; j++) ldmatrix_x1_trans(&rb[j], &Bs[j * 8 + lane % 8][0]);
    finish(d, ra, rb, c);
}

// A two-stage cp.async pipeline as a flash-attention kernel streams K: two warps compute D [16][16] =
// A [16][64] (row-major) * B, with B n-major [16][64] (Bt[n][k]), four k steps of 16. While step s is
// multiplied, step s + 1's tiles are in flight; cp_async_wait<1> leaves only the newest group pending.
// Each of the 64 threads copies one 16-byte chunk per stage: threads 0-31 a row-half of A, 32-63 of
// B. Warp w computes columns 8w .. 8w + 7, accumulating in registers across the steps.
extern "C" __global__ void tensor_core_check_pipeline(float* d, const bf16* a, const bf16* b, const float* c) {
    constexpr int PK = 64, PN = 16, STEPS = PK / 16;
    __shared__ __align__(16) b16 As[2][16][16];
    __shared__ __align__(16) b16 Bs[2][PN][16];
    const int tid = threadIdx.x, lane = lane_of_thread(), warp = tid / 32;
    const int row = (tid % 32) / 2, half = (tid % 2) * 8;
    auto issue = [&](int step) {
        const int stage = step % 2, k0 = step * 16;
        if (tid < 32) {
            cp_async_16(&As[stage][row][half], a + row * PK + k0 + half);
        } else {
            cp_async_16(&Bs[stage][row][half], b + row * PK + k0 + half);
        }
    };
    float acc[4];
    load_c(acc, c + warp * 8, PN);
    issue(0);
    cp_async_commit();
    for (int step = 0; step < STEPS; step++) {
        if (step + 1 < STEPS) issue(step + 1);
        cp_async_commit();  // empty at the last step, so the wait below always means "this step"
        cp_async_wait<1>();
        __syncthreads();
        const int stage = step % 2;
        uint32_t ra[4], rb[2];
        ldmatrix_x4(ra, &As[stage][lane % 16][(lane / 16) * 8]);
        ldmatrix_x2(rb, &Bs[stage][warp * 8 + lane % 8][((lane / 8) % 2) * 8]);
        mma_m16n8k16_bf16(acc, ra, rb, acc);
        __syncthreads();  // the next issue overwrites this stage
    }
    store_d(d + warp * 8, PN, acc);
}
