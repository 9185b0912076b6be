// Causal attention forward on tensor cores (bf16, head sizes 64 and 128), FlashAttention-2's design:
// a block of 4 warps owns 64 query rows of one (batch, head), 16 rows per warp, and streams the keys
// and values in tiles of 64 through double-buffered dynamic shared memory (cp.async prefetches tile
// j + 1 while tile j is computed). S = Q K^T, the online softmax and O = P V stay in registers; the
// probabilities go from the S accumulators straight into the A fragments of P V.
//
// Same contract as attention_forward in attention.cu (which keeps f32 and head size 32): qkv is
// [B, T, 3 * NH * HS] (all query heads, then keys, then values per token), out is [B, T, NH * HS]
// (bf16, normalised) and lse is [B, NH, T] (f32, natural-log log-sum-exp of the scaled scores, what
// both backward kernels consume). Differences from the CUDA-core kernel are rounding only: P is
// rounded to bf16 before P V (as in FlashAttention), the sums run in the tensor cores' order.
//
// Launch (src/backend/cuda/attention_tc.rs mirrors these): grid (ceil(T / 64), B * NH), 128 threads,
// attention_tc_smem_bytes(HS) of dynamic shared memory (the opt-in above 48 KiB at head size 128).
// qkv must be 16-byte aligned (cp.async) and out 4-byte aligned; the launcher checks both.
#include "tensor_core.cuh"

namespace {

constexpr int TC_ROWS = 64;     // query rows per block
constexpr int TC_KEYS = 64;     // keys per streamed tile
constexpr int TC_THREADS = 128;  // 4 warps of 16 query rows

// Shared tiles hold raw bf16 bits, as in tensor_core_check.cu (a class-type static on the sim would
// carry an initialisation guard every simulated thread touches).
typedef uint16_t b16;

// Row stride of a shared tile in elements: 8 elements (16 bytes) of padding make consecutive rows
// start 4 banks apart, so the 8 row addresses of one ldmatrix matrix hit 8 disjoint groups of 4
// banks (144 or 272 bytes per row: 36 or 68 words, both 4 mod 32).
template <int HS> __host__ __device__ constexpr int tc_stride() { return HS + 8; }
template <int HS> __host__ __device__ constexpr int tc_tile_elems() { return TC_ROWS * tc_stride<HS>(); }

}  // namespace

// Q, then K in two stages, then V in two stages: 5 tiles of 64 padded rows. 46080 bytes at head size
// 64, 87040 at 128 (attention_tc_smem_bytes in attention_tc.rs).
template <int HS> __host__ __device__ constexpr int attention_tc_smem_bytes() { return 5 * tc_tile_elems<HS>() * 2; }
static_assert(attention_tc_smem_bytes<64>() == 46080, "attention_tc.rs: smem_bytes(64)");
static_assert(attention_tc_smem_bytes<128>() == 87040, "attention_tc.rs: smem_bytes(128)");

namespace {

// The block copies rows r0 .. r0 + 63 of one head's Q, K or V (columns col0 .. col0 + HS - 1 of
// qkv's rows) into `dst`, one 16-byte cp.async per chunk, consecutive threads on consecutive chunks.
// Rows at or past `seq` are zero-filled with plain stores instead: never read out of bounds, and
// finite (a masked probability of 0 times a stale NaN would still be NaN in P V).
template <int HS>
__device__ __forceinline__ void load_tile(b16* dst, const bf16* qkv, int64_t row_stride, int64_t col0, int b,
                                          int r0, int seq) {
    constexpr int CHUNKS_PER_ROW = HS / 8;
    constexpr int CHUNKS = TC_ROWS * CHUNKS_PER_ROW;
    static_assert(CHUNKS % TC_THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int c = threadIdx.x; c < CHUNKS; c += TC_THREADS) {
        const int r = c / CHUNKS_PER_ROW, k = (c % CHUNKS_PER_ROW) * 8;
        b16* d = dst + r * tc_stride<HS>() + k;
        const int token = r0 + r;
        if (token < seq) {
            cp_async_16(d, qkv + ((int64_t)b * seq + token) * row_stride + col0 + k);
        } else {
            const uint4 zero = {0u, 0u, 0u, 0u};
            *reinterpret_cast<uint4*>(d) = zero;
        }
    }
}

// Max and sum across the 4 lanes of a quad (the lanes holding one row of an accumulator fragment).
__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffff, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffff, v, 1);
    return v + __shfl_xor_sync(0xffffffff, v, 2);
}

}  // namespace

template <int HS>
__device__ void attention_tc_forward(bf16* out, float* lse, const bf16* qkv, int seq, int heads) {
    static_assert(HS % 16 == 0, "head size in k steps of 16");
    constexpr int STRIDE = tc_stride<HS>(), TILE = tc_tile_elems<HS>();
    constexpr int KD = HS / 16;       // k steps of S = Q K^T (over the head dimension)
    constexpr int ND = HS / 8;        // n blocks of O (head dimension, 8 wide)
    constexpr int NB = TC_KEYS / 8;   // n blocks of S (keys, 8 wide)
    constexpr int KK = TC_KEYS / 16;  // k steps of O += P V (over the keys)
    b16* const Qs = dynamic_smem<b16>();
    b16* const Ks = Qs + TILE;      // stage s at Ks + s * TILE
    b16* const Vs = Qs + 3 * TILE;  // stage s at Vs + s * TILE

    // Later query tiles see more keys: they are started first (blockIdx.x 0 is the last tile).
    const int qt = gridDim.x - 1 - blockIdx.x, q0 = qt * TC_ROWS;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int channels = heads * HS;
    const int64_t row_stride = 3 * (int64_t)channels;
    const int64_t q_col = (int64_t)h * HS, k_col = channels + q_col, v_col = 2 * (int64_t)channels + q_col;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    // This lane's two rows of every accumulator fragment: g and g + 8 of the warp's 16.
    const int row0 = q0 + warp * 16 + g;
    // Causal: tiles 0 .. qt, the last one (the diagonal) the only one with keys past a row or seq.
    const int n_tiles = qt + 1;
    // Scores are kept in base 2: x = s * scale * log2(e), so p = exp2(x - m).
    const float scale_log2 = rsqrtf((float)HS) * 1.4426950408889634f;

    load_tile<HS>(Qs, qkv, row_stride, q_col, b, q0, seq);
    load_tile<HS>(Ks, qkv, row_stride, k_col, b, 0, seq);
    load_tile<HS>(Vs, qkv, row_stride, v_col, b, 0, seq);
    cp_async_commit();

    uint32_t qf[KD][4];  // the warp's 16 query rows as A fragments, loaded once
    float o[ND][4];      // unnormalised output, rows g and g + 8
#pragma unroll
    for (int nd = 0; nd < ND; nd++)
#pragma unroll
        for (int i = 0; i < 4; i++) o[nd][i] = 0.0f;
    // Per row (g, g + 8): running max (base 2) and this lane's part of the running sum.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};

    for (int j = 0; j < n_tiles; j++) {
        const int stage = j & 1;
        if (j + 1 < n_tiles) {
            load_tile<HS>(Ks + (stage ^ 1) * TILE, qkv, row_stride, k_col, b, (j + 1) * TC_KEYS, seq);
            load_tile<HS>(Vs + (stage ^ 1) * TILE, qkv, row_stride, v_col, b, (j + 1) * TC_KEYS, seq);
        }
        cp_async_commit();  // empty on the last tile, so wait<1> below always means "tile j"
        cp_async_wait<1>();
        __syncthreads();  // every thread's copies of tile j (and of Q) are visible

        if (j == 0) {
            // ldmatrix.x4: lanes 0-15 address the warp's rows at column 16 kd, lanes 16-31 the same
            // rows at 16 kd + 8: registers (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15).
#pragma unroll
            for (int kd = 0; kd < KD; kd++)
                ldmatrix_x4(qf[kd], Qs + (warp * 16 + lane % 16) * STRIDE + kd * 16 + (lane / 16) * 8);
        }
        const b16* const Kt = Ks + stage * TILE;
        const b16* const Vt = Vs + stage * TILE;

        // S = Q K^T: K's rows are keys (n) with the head dimension (k) contiguous, the n-major B
        // operand: plain ldmatrix. One x4 covers 8 keys for two k steps: matrices (k 0-7, 8-15) of
        // step 2 kd2 and of step 2 kd2 + 1.
        float s[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; nb++) {
#pragma unroll
            for (int i = 0; i < 4; i++) s[nb][i] = 0.0f;
#pragma unroll
            for (int kd2 = 0; kd2 < KD / 2; kd2++) {
                uint32_t kb[4];
                ldmatrix_x4(kb, Kt + (nb * 8 + lane % 8) * STRIDE + kd2 * 32 + (lane / 8) * 8);
                mma_m16n8k16_bf16(s[nb], qf[2 * kd2], kb, s[nb]);
                mma_m16n8k16_bf16(s[nb], qf[2 * kd2 + 1], kb + 2, s[nb]);
            }
        }

        // Scale into base 2; on the diagonal tile only, mask keys after the row (and past seq, which
        // for rows before seq the causal test already covers; rows past seq are never written).
        const bool diagonal = j == n_tiles - 1;
#pragma unroll
        for (int nb = 0; nb < NB; nb++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                float x = s[nb][i] * scale_log2;
                if (diagonal) {
                    const int key = j * TC_KEYS + nb * 8 + 2 * t + (i & 1);
                    const int row = row0 + (i >= 2 ? 8 : 0);
                    if (key > row || key >= seq) x = -INFINITY;
                }
                s[nb][i] = x;
            }

        // Online softmax, row by row: rescale what was accumulated to the new max, then turn the
        // scores into probabilities in place.
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float mx = -INFINITY;
#pragma unroll
            for (int nb = 0; nb < NB; nb++) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
            const float m_new = fmaxf(m[r], quad_max(mx));
            // A row with every key so far masked keeps max -inf: subtract 0 then (every p is 0).
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;
            const float correction = exp2f(m[r] - m_use);
            m[r] = m_new;
            float sum = 0.0f;
#pragma unroll
            for (int nb = 0; nb < NB; nb++) {
                s[nb][2 * r] = exp2f(s[nb][2 * r] - m_use);
                s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] - m_use);
                sum += s[nb][2 * r] + s[nb][2 * r + 1];
            }
            l[r] = l[r] * correction + sum;
#pragma unroll
            for (int nd = 0; nd < ND; nd++) {
                o[nd][2 * r] *= correction;
                o[nd][2 * r + 1] *= correction;
            }
        }

        // O += P V. The accumulator of keys 8 nb .. 8 nb + 7 holds (row g, keys 2t, 2t+1) and (row
        // g + 8, the same keys): exactly the A fragment's registers for k step kk, with n blocks 2 kk
        // (k 0-7) and 2 kk + 1 (k 8-15). V's rows are keys (k) with the head dimension (n)
        // contiguous, the k-major B operand: ldmatrix.trans, one x4 for two n blocks (matrices: keys
        // 0-7 and 8-15 at column 16 nd2, then the same at 16 nd2 + 8).
#pragma unroll
        for (int kk = 0; kk < KK; kk++) {
            uint32_t pa[4];
            pa[0] = pack_floats_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            pa[1] = pack_floats_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            pa[2] = pack_floats_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pa[3] = pack_floats_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int nd2 = 0; nd2 < ND / 2; nd2++) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, Vt + (kk * 16 + lane % 16) * STRIDE + nd2 * 16 + (lane / 16) * 8);
                mma_m16n8k16_bf16(o[2 * nd2], pa, vb, o[2 * nd2]);
                mma_m16n8k16_bf16(o[2 * nd2 + 1], pa, vb + 2, o[2 * nd2 + 1]);
            }
        }
        __syncthreads();  // the next iteration's prefetch overwrites this stage
    }

    // Normalise and store: lane (g, t) holds columns 8 nd + 2t, 2t + 1 of rows g and g + 8.
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = row0 + 8 * r;
        const float total = quad_sum(l[r]);
        if (row >= seq) continue;
        const float inv = 1.0f / total;
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + ((int64_t)b * seq + row) * channels + q_col + 2 * t);
#pragma unroll
        for (int nd = 0; nd < ND; nd++) dst[nd * 4] = pack_floats_bf16x2(o[nd][2 * r] * inv, o[nd][2 * r + 1] * inv);
        // lse = ln(sum_j e^(s_j)) = ln(2^m * l) = m ln 2 + ln l.
        if (t == 0) lse[(int64_t)bh * seq + row] = m[r] * 0.6931471805599453f + logf(total);
    }
}

#define ATTENTION_TC_FORWARD(HS)                                                                           \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attention_tc_forward_bf16_hs##HS(             \
        bf16* out, float* lse, const bf16* qkv, int seq, int heads) {                                      \
        attention_tc_forward<HS>(out, lse, qkv, seq, heads);                                               \
    }
ATTENTION_TC_FORWARD(64)
ATTENTION_TC_FORWARD(128)
