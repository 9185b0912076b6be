// Causal attention backward on tensor cores (bf16, head sizes 64 and 128), FlashAttention-2 style:
// the probabilities are recomputed tile by tile from the forward's log-sum-exp and never stored.
// Two kernels, no atomics, deterministic (every output element is summed by one thread in a fixed
// order):
//   dkdv: a block owns 64 keys of one (batch, head) and streams the query tiles from the diagonal to
//         the end: S^T = K Q^T, P^T = exp(scale S^T - lse), dP^T = V dO^T, dS^T = P^T (dP^T - D),
//         dV += P^T dO, dK += dS^T Q;
//   dq:   a block owns 64 queries and streams the key tiles from the start to the diagonal:
//         S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
// D = rowsum(dO * O) comes first, from attention.cu's preprocess kernel. Layouts as attention.cu:
// qkv and dqkv [B, T, 3 * NH * HS] (all query heads, all key heads, all value heads), out and dout
// [B, T, NH * HS], lse and D [B, NH, T] f32.
//
// Each block has 4 warps; warp w owns rows 16w .. 16w + 15 of the block's 64 (keys or queries) and
// keeps their accumulators (dK and dV, or dQ) in mma fragments for the whole loop. The streamed
// tiles arrive through cp.async in two stages (the next tile is in flight while this one is used)
// in dynamic shared memory; rows past the sequence are zero-filled instead of read. Tile rows are
// padded by 8 elements (16 bytes) so the 8 rows one ldmatrix reads fall in different banks.
// P and dS are rounded to bf16 only as mma operands; every sum is f32.
#include "tensor_core.cuh"

namespace {

// Raw bf16 bits in shared memory (see tensor_core_check.cu for why not bf16 itself).
typedef uint16_t b16;

constexpr int TC_TILE = 64;     // rows per block and per streamed tile
constexpr int TC_THREADS = 128;  // 4 warps of 16 rows
constexpr float TC_LOG2E = 1.4426950408889634f;

// Row stride of a shared tile, in elements.
template <int HS> __host__ __device__ constexpr int tc_ld() { return HS + 8; }
template <int HS> __host__ __device__ constexpr int tc_tile_elems() { return TC_TILE * tc_ld<HS>(); }

// Columns of the streamed tile one inner step works on (the S and dP fragments it holds): all 64 at
// head size 64; 32 at 128, where dK and dV already take 128 registers.
template <int HS> __host__ __device__ constexpr int tc_sub() { return HS <= 64 ? 64 : 32; }

// Copies rows r0 .. r0 + 63 (columns 0 .. HS - 1) of a bf16 matrix with row stride `stride` into a
// shared tile, 16 bytes per cp.async; rows at or past `rows` are zero-filled with plain stores (they
// must contribute nothing, and reading them would be out of bounds). The caller commits the group.
template <int HS>
__device__ __forceinline__ void tc_load_tile(b16* tile, const bf16* src, int64_t stride, int r0, int rows) {
    constexpr int CHUNKS = HS / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < TC_TILE * CHUNKS; c += TC_THREADS) {
        const int r = c / CHUNKS, col = (c % CHUNKS) * 8;
        b16* dst = tile + r * tc_ld<HS>() + col;
        if (r0 + r < rows) {
            cp_async_16(dst, src + (int64_t)(r0 + r) * stride + col);
        } else {
            uint32_t* words = reinterpret_cast<uint32_t*>(dst);
#pragma unroll
            for (int w = 0; w < 4; w++) words[w] = 0u;
        }
    }
}

// acc[n] (16 x 8 each, NT of them) += X[xr0 .. xr0 + 15][:] * Y[yr0 + 8n .. + 7][:]^T over all HS
// columns: the warp's rows of X against NT * 8 rows of Y (both row-major shared tiles). Y's rows are
// the B operand's columns (k-major per row), so plain ldmatrix gives the B fragment; one x4 load
// covers two 8-row groups of Y for one k step of 16.
template <int HS, int NT>
__device__ __forceinline__ void tc_mma_abt(float acc[NT][4], const b16* X, int xr0, const b16* Y, int yr0) {
    constexpr int LD = tc_ld<HS>();
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < HS / 16; ks++) {
        uint32_t a[4];
        ldmatrix_x4(a, X + (xr0 + lane % 16) * LD + ks * 16 + (lane / 16) * 8);
#pragma unroll
        for (int np = 0; np < NT / 2; np++) {
            uint32_t b[4];
            ldmatrix_x4(b, Y + (yr0 + np * 16 + (lane / 16) * 8 + lane % 8) * LD + ks * 16 + ((lane / 8) % 2) * 8);
            mma_m16n8k16_bf16(acc[2 * np], a, b, acc[2 * np]);
            mma_m16n8k16_bf16(acc[2 * np + 1], a, b + 2, acc[2 * np + 1]);
        }
    }
}

// acc[n] (16 x HS as HS / 8 fragments) += C * Z[zr0 .. zr0 + 16 KT - 1][:], where C (16 x 16 KT) is
// held as 2 KT accumulator fragments (P^T, dS^T or dS): two neighbouring 16x8 accumulator fragments
// are, rounded to bf16 and packed, exactly the A fragment of one k step. Z is row-major k x n, so
// ldmatrix .trans gives the B fragment.
template <int HS, int KT>
__device__ __forceinline__ void tc_mma_cz(float acc[HS / 8][4], const float c[2 * KT][4], const b16* Z, int zr0) {
    constexpr int LD = tc_ld<HS>();
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int j = 0; j < KT; j++) {
        const uint32_t a[4] = {pack_floats_bf16x2(c[2 * j][0], c[2 * j][1]),
                               pack_floats_bf16x2(c[2 * j][2], c[2 * j][3]),
                               pack_floats_bf16x2(c[2 * j + 1][0], c[2 * j + 1][1]),
                               pack_floats_bf16x2(c[2 * j + 1][2], c[2 * j + 1][3])};
#pragma unroll
        for (int np = 0; np < HS / 16; np++) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, Z + (zr0 + 16 * j + ((lane / 8) % 2) * 8 + lane % 8) * LD + np * 16 + (lane / 16) * 8);
            mma_m16n8k16_bf16(acc[2 * np], a, b, acc[2 * np]);
            mma_m16n8k16_bf16(acc[2 * np + 1], a, b + 2, acc[2 * np + 1]);
        }
    }
}

template <int N> __device__ __forceinline__ void tc_zero(float f[N][4]) {
#pragma unroll
    for (int n = 0; n < N; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) f[n][e] = 0.0f;
}

// Stores the warp's 16 rows (row0 + g, row0 + g + 8) of a 16 x HS accumulator, times `scale`, as bf16
// into a row-major matrix with row stride `stride`; rows at or past `rows` are skipped.
template <int HS>
__device__ __forceinline__ void tc_store_rows(bf16* dst, int64_t stride, int row0, int rows, const float acc[HS / 8][4],
                                              float scale) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int r = row0 + g + 8 * half;
        if (r >= rows) continue;
        bf16* row = dst + (int64_t)r * stride + 2 * t;
#pragma unroll
        for (int n = 0; n < HS / 8; n++)
            *reinterpret_cast<uint32_t*>(row + 8 * n) =
                pack_floats_bf16x2(scale * acc[n][2 * half], scale * acc[n][2 * half + 1]);
    }
}

// Offset of token t's part (0 query, 1 key, 2 value), head h in qkv; of token t, head h in out.
__device__ __forceinline__ int64_t tc_qkv_at(int b, int t, int part, int h, int seq, int heads, int hs) {
    const int64_t c = (int64_t)heads * hs;
    return ((int64_t)b * seq + t) * 3 * c + part * c + (int64_t)h * hs;
}
__device__ __forceinline__ int64_t tc_out_at(int b, int t, int h, int seq, int heads, int hs) {
    return ((int64_t)b * seq + t) * heads * hs + (int64_t)h * hs;
}

// ---- dK, dV --------------------------------------------------------------------------------------
// Dynamic shared memory: K, V tiles, then Q and dO tiles in two stages, then per stage the 64
// queries' lse * log2(e) and D (f32). The Rust launcher's size must match tc_dkdv_smem_bytes.
template <int HS> __host__ __device__ constexpr int tc_dkdv_smem_bytes() {
    return 6 * tc_tile_elems<HS>() * 2 + 2 * 2 * TC_TILE * 4;
}

template <int HS>
__device__ void attention_tc_backward_dkdv(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                           const float* D, int seq, int heads) {
    constexpr int TE = tc_tile_elems<HS>(), SUB = tc_sub<HS>(), NT = SUB / 8, NH = HS / 8;
    b16* Ks = dynamic_smem<b16>();
    b16* Vs = Ks + TE;
    b16* Qs = Vs + TE;         // [2][TE]
    b16* dOs = Qs + 2 * TE;    // [2][TE]
    float* lse_s = reinterpret_cast<float*>(dOs + 2 * TE);  // [2][64], already times log2(e)
    float* D_s = lse_s + 2 * TC_TILE;                         // [2][64]

    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int k0 = blockIdx.x * TC_TILE, tiles = (seq + TC_TILE - 1) / TC_TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t qkv_stride = 3 * (int64_t)heads * HS, out_stride = (int64_t)heads * HS;
    const bf16* q_base = qkv + tc_qkv_at(b, 0, 0, h, seq, heads, HS);
    const float scale = rsqrtf((float)HS), scale_log2 = scale * TC_LOG2E;

    // Stage s of query tile q0: Q and dO by cp.async, lse and D by plain loads (their rows are not
    // 16-byte aligned when seq is not a multiple of 4). A row past the end gets lse = +inf, so its
    // P is exp2(-inf) = 0 and it adds nothing.
    auto issue = [&](int q0, int s) {
        tc_load_tile<HS>(Qs + s * TE, q_base, qkv_stride, q0, seq);
        tc_load_tile<HS>(dOs + s * TE, dout + tc_out_at(b, 0, h, seq, heads, HS), out_stride, q0, seq);
        if (threadIdx.x < TC_TILE) {
            const int i = q0 + threadIdx.x;
            lse_s[s * TC_TILE + threadIdx.x] = i < seq ? lse[(int64_t)bh * seq + i] * TC_LOG2E : INFINITY;
            D_s[s * TC_TILE + threadIdx.x] = i < seq ? D[(int64_t)bh * seq + i] : 0.0f;
        }
    };
    tc_load_tile<HS>(Ks, q_base + 1 * out_stride, qkv_stride, k0, seq);
    tc_load_tile<HS>(Vs, q_base + 2 * out_stride, qkv_stride, k0, seq);
    issue(k0, 0);  // causal: the first query tile that sees these keys is the diagonal one
    cp_async_commit();

    float dk[NH][4], dv[NH][4];
    tc_zero<NH>(dk);
    tc_zero<NH>(dv);
    const int kr = warp * 16;  // the warp's key rows within the tile
    for (int qt = blockIdx.x; qt < tiles; qt++) {
        const int s = (qt - blockIdx.x) & 1;
        if (qt + 1 < tiles) issue((qt + 1) * TC_TILE, s ^ 1);
        cp_async_commit();  // possibly empty: the wait below then still means "stage s is here"
        cp_async_wait<1>();
        __syncthreads();
        const b16* Qt = Qs + s * TE;
        const b16* dOt = dOs + s * TE;
        const float* lse_t = lse_s + s * TC_TILE;
        const float* D_t = D_s + s * TC_TILE;
        const bool diagonal = qt == (int)blockIdx.x;
#pragma unroll 1
        for (int qs = 0; qs < TC_TILE; qs += SUB) {
            // Above the diagonal every query of this sub-tile precedes every key of this warp.
            if (diagonal && qs + SUB <= kr) continue;
            float p[NT][4], dp[NT][4];
            tc_zero<NT>(p);
            tc_zero<NT>(dp);
            tc_mma_abt<HS, NT>(p, Ks, kr, Qt, qs);    // S^T: keys x queries
            tc_mma_abt<HS, NT>(dp, Vs, kr, dOt, qs);  // dP^T
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int key = kr + g + (e >= 2 ? 8 : 0), query = qs + 8 * n + 2 * t + (e & 1);
                    float pe = exp2f(p[n][e] * scale_log2 - lse_t[query]);
                    if (diagonal && query < key) pe = 0.0f;  // causal: query i sees keys j <= i
                    p[n][e] = pe;
                    dp[n][e] = pe * (dp[n][e] - D_t[query]);  // dS^T
                }
            tc_mma_cz<HS, NT / 2>(dv, p, dOt, qs);  // dV += P^T dO
            tc_mma_cz<HS, NT / 2>(dk, dp, Qt, qs);  // dK += dS^T Q (times scale when stored)
        }
        __syncthreads();  // the next iteration's issue overwrites the other stage
    }
    bf16* dk_base = dqkv + tc_qkv_at(b, 0, 1, h, seq, heads, HS);
    tc_store_rows<HS>(dk_base, qkv_stride, k0 + kr, seq, dk, scale);
    tc_store_rows<HS>(dk_base + out_stride, qkv_stride, k0 + kr, seq, dv, 1.0f);
}

// ---- dQ ------------------------------------------------------------------------------------------
// Dynamic shared memory: Q and dO tiles, then K and V tiles in two stages.
template <int HS> __host__ __device__ constexpr int tc_dq_smem_bytes() { return 6 * tc_tile_elems<HS>() * 2; }

template <int HS>
__device__ void attention_tc_backward_dq(bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse,
                                         const float* D, int seq, int heads) {
    constexpr int TE = tc_tile_elems<HS>(), SUB = tc_sub<HS>(), NT = SUB / 8, NH = HS / 8;
    b16* Qs = dynamic_smem<b16>();
    b16* dOs = Qs + TE;
    b16* Ks = dOs + TE;      // [2][TE]
    b16* Vs = Ks + 2 * TE;   // [2][TE]

    // Blocks start in index order: the last query tile, which has the most key tiles, goes first
    // so the short ones fill in at the end.
    const int qt = gridDim.x - 1 - blockIdx.x;
    const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int q0 = qt * TC_TILE;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int64_t qkv_stride = 3 * (int64_t)heads * HS, out_stride = (int64_t)heads * HS;
    const bf16* q_base = qkv + tc_qkv_at(b, 0, 0, h, seq, heads, HS);
    const float scale = rsqrtf((float)HS), scale_log2 = scale * TC_LOG2E;

    auto issue = [&](int k0, int s) {
        tc_load_tile<HS>(Ks + s * TE, q_base + 1 * out_stride, qkv_stride, k0, seq);
        tc_load_tile<HS>(Vs + s * TE, q_base + 2 * out_stride, qkv_stride, k0, seq);
    };
    tc_load_tile<HS>(Qs, q_base, qkv_stride, q0, seq);
    tc_load_tile<HS>(dOs, dout + tc_out_at(b, 0, h, seq, heads, HS), out_stride, q0, seq);
    issue(0, 0);
    cp_async_commit();

    // This thread's two query rows (g and g + 8 of the warp's 16): lse * log2(e) and D in registers.
    // A row past the end gets lse = +inf (P = 0); it is not stored either.
    const int qr = warp * 16;
    float row_lse[2], row_D[2];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int i = q0 + qr + g + 8 * half;
        row_lse[half] = i < seq ? lse[(int64_t)bh * seq + i] * TC_LOG2E : INFINITY;
        row_D[half] = i < seq ? D[(int64_t)bh * seq + i] : 0.0f;
    }

    float dq[NH][4];
    tc_zero<NH>(dq);
    const int last = qt;  // causal: key tiles 0 .. the diagonal
    for (int kt = 0; kt <= last; kt++) {
        const int s = kt & 1;
        if (kt + 1 <= last) issue((kt + 1) * TC_TILE, s ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const b16* Kt = Ks + s * TE;
        const b16* Vt = Vs + s * TE;
        const bool diagonal = kt == last;
#pragma unroll 1
        for (int ks = 0; ks < TC_TILE; ks += SUB) {
            // Past the diagonal every key of this sub-tile follows every query of this warp.
            if (diagonal && ks >= qr + 16) continue;
            float p[NT][4], dp[NT][4];
            tc_zero<NT>(p);
            tc_zero<NT>(dp);
            tc_mma_abt<HS, NT>(p, Qs, qr, Kt, ks);    // S: queries x keys
            tc_mma_abt<HS, NT>(dp, dOs, qr, Vt, ks);  // dP
#pragma unroll
            for (int n = 0; n < NT; n++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int half = e >= 2 ? 1 : 0;
                    const int query = qr + g + 8 * half, key = ks + 8 * n + 2 * t + (e & 1);
                    float pe = exp2f(p[n][e] * scale_log2 - row_lse[half]);
                    if (diagonal && key > query) pe = 0.0f;
                    dp[n][e] = pe * (dp[n][e] - row_D[half]);  // dS
                }
            tc_mma_cz<HS, NT / 2>(dq, dp, Kt, ks);  // dQ += dS K (times scale when stored)
        }
        __syncthreads();
    }
    tc_store_rows<HS>(dqkv + tc_qkv_at(b, 0, 0, h, seq, heads, HS), qkv_stride, q0 + qr, seq, dq, scale);
}

}  // namespace

// Launch (both): grid (ceil(seq / 64), batch * heads), 128 threads, the dynamic shared memory
// tc_*_smem_bytes<HS>() (the Rust launcher's attention_tc_smem_bytes) with the opt-in above 48 KiB.
#define ATTENTION_TC_BACKWARD(HS)                                                                       \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attention_tc_backward_dkdv_bf16_hs##HS(     \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* D, int seq,       \
        int heads) {                                                                                    \
        attention_tc_backward_dkdv<HS>(dqkv, dout, qkv, lse, D, seq, heads);                            \
    }                                                                                                   \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) attention_tc_backward_dq_bf16_hs##HS(       \
        bf16* dqkv, const bf16* dout, const bf16* qkv, const float* lse, const float* D, int seq,       \
        int heads) {                                                                                    \
        attention_tc_backward_dq<HS>(dqkv, dout, qkv, lse, D, seq, heads);                              \
    }
ATTENTION_TC_BACKWARD(64)
ATTENTION_TC_BACKWARD(128)
