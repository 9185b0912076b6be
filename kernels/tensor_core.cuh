// Tensor-core building blocks for the GEMM and flash-attention kernels: bf16 mma.m16n8k16 (f32
// accumulator), ldmatrix x1/x2/x4 (plain, .trans), cp.async with commit groups, bf16x2 packing. Inline
// PTX on the GPU; on the sim, warp-collective emulations that follow the PTX fragment layouts exactly.
//
// A kernel whose fragments are wrong thus computes wrong numbers on the sim, as it would on hardware.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major, 4 x b32): a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1],
//                                  a[2] = A[g][2t+8, 2t+9], a[3] = A[g+8][2t+8, 2t+9]
//   B (16x8, "col": k x n, 2 x b32): b[0] = B[2t, 2t+1][g], b[1] = B[2t+8, 2t+9][g]
//   C, D (16x8 f32, 4 x f32): c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1]
// Each b32 holds two bf16, the lower index in the low 16 bits.
//
// This header is the only place a kernel may see SHARDTRAIN_SIM: the emulations live in these small
// device functions, never in kernel bodies.
#pragma once
#ifdef SHARDTRAIN_SIM
// Standard headers before the sim's CUDA keyword macros (which common.cuh brings in).
#include <vector>
#endif
#include "common.cuh"

// ---- bf16x2 packing ------------------------------------------------------------------------------
// The register format every fragment uses: `lo` in bits 0-15 (the lower row or column index).
__device__ __forceinline__ uint32_t pack_bf16x2(bf16 lo, bf16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}
// Rounds each float to bf16 (nearest even), as every kernel rounds once when it stores.
__device__ __forceinline__ uint32_t pack_floats_bf16x2(float lo, float hi) {
    return pack_bf16x2(__float2bfloat16_rn(lo), __float2bfloat16_rn(hi));
}
// Widens both halves (exact): .x is the low half.
__device__ __forceinline__ float2 unpack_bf16x2(uint32_t v) {
    return make_float2(__bfloat162float(__ushort_as_bfloat16((unsigned short)(v & 0xffffu))),
                       __bfloat162float(__ushort_as_bfloat16((unsigned short)(v >> 16))));
}

#ifdef SHARDTRAIN_SIM
// ---- emulation of the warp-collective instructions (simulated GPU only) ---------------------------
namespace tc_sim {

// Layout of sim::warp_scratch() during one emulated mma: every lane's operand registers.
struct mma_exchange {
    uint32_t a[32][4];
    uint32_t b[32][2];
    float c[32][4];
};
static_assert(sizeof(mma_exchange) <= sim::kWarpScratchBytes, "mma operands fit the warp scratch");

// A[row][col] of the 16x16 operand, from the registers lane by lane (the layout above, inverted).
inline float a_element(const mma_exchange& x, int row, int col) {
    const int lane = (row % 8) * 4 + (col % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (col >= 8 ? 2 : 0);
    const uint32_t v = x.a[lane][reg];
    return (col & 1) ? unpack_bf16x2(v).y : unpack_bf16x2(v).x;
}

// B[k][n] of the 16x8 operand.
inline float b_element(const mma_exchange& x, int k, int n) {
    const int lane = n * 4 + (k % 8) / 2;
    const uint32_t v = x.b[lane][k >= 8 ? 1 : 0];
    return (k & 1) ? unpack_bf16x2(v).y : unpack_bf16x2(v).x;
}

// Every lane publishes its registers, then computes its own four outputs. The products of two bf16
// are exact in f32; they are added to c one at a time in k order (0..15), each sum rounded to f32
// (nearest even). Tensor cores add the 16 products in a different order with their own internal
// precision and rounding, so hardware results can differ from these in the last bits of f32.
inline void mma(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    mma_exchange& x = *reinterpret_cast<mma_exchange*>(sim::warp_scratch());
    const int lane = (int)sim::lane_id();
    for (int i = 0; i < 4; i++) x.a[lane][i] = a[i];
    for (int i = 0; i < 2; i++) x.b[lane][i] = b[i];
    for (int i = 0; i < 4; i++) x.c[lane][i] = c[i];
    sim::warp_barrier();
    const int g = lane / 4, t = lane % 4;
    float out[4];
    for (int i = 0; i < 4; i++) {
        const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
        float acc = x.c[lane][i];
        for (int k = 0; k < 16; k++) acc += a_element(x, row, k) * b_element(x, k, col);
        out[i] = acc;
    }
    sim::warp_barrier();  // nobody overwrites the scratch while a slower lane still reads it
    // d may be c (the usual accumulate-in-place): written only after every read.
    for (int i = 0; i < 4; i++) d[i] = out[i];
}

// ldmatrix.m8n8.b16 for NUM matrices: lane 8j + r supplies the address of row r of matrix j (lanes
// beyond 8 * NUM are ignored). Without .trans, lane l receives row l / 4, columns 2(l % 4) and
// 2(l % 4) + 1 of each matrix; with .trans it receives column l / 4, rows 2(l % 4) and 2(l % 4) + 1
// (the matrix transposed). The lower column (row) goes to the low half.
template <int NUM, bool TRANS> inline void ldmatrix(uint32_t* r, const void* row_address) {
    static_assert(NUM == 1 || NUM == 2 || NUM == 4, "ldmatrix loads 1, 2 or 4 matrices");
    const unsigned char** rows = reinterpret_cast<const unsigned char**>(sim::warp_scratch());
    const int lane = (int)sim::lane_id();
    rows[lane] = static_cast<const unsigned char*>(row_address);
    sim::warp_barrier();
    for (int j = 0; j < NUM; j++)
        if (reinterpret_cast<uintptr_t>(rows[8 * j + lane % 8]) % 16 != 0)
            sim::kernel_fault("ldmatrix: a row address is not 16-byte aligned");
    const int q = lane / 4, p = lane % 4;
    for (int j = 0; j < NUM; j++) {
        const unsigned char* const* m = rows + 8 * j;  // the 8 row addresses of matrix j
        unsigned short lo, hi;
        if (TRANS) {
            memcpy(&lo, m[2 * p] + 2 * q, 2);
            memcpy(&hi, m[2 * p + 1] + 2 * q, 2);
        } else {
            memcpy(&lo, m[q] + 4 * p, 2);
            memcpy(&hi, m[q] + 4 * p + 2, 2);
        }
        r[j] = (uint32_t)lo | ((uint32_t)hi << 16);
    }
    sim::warp_barrier();
}

// cp.async: each thread's copies wait in its own queue and happen only when a wait covers their
// group, so shared memory read before the wait is stale on the sim (as it may be on a GPU).
struct cp_async_copy {
    void* dst;
    const void* src;
    uint32_t group;  // the thread's commit-group number this copy belongs to (1, 2, ...)
};

// Which block a queue belongs to: a block that exits with copies never waited for leaves them
// behind, and the next block on this worker must not perform them (hardware drops them with the
// block's shared memory). A later block of an identical launch (same kernel shape, same block
// index, same scratch) cannot be told apart: kernels must wait for every group they commit.
struct block_tag {
    uint3 block, grid, dim;
    const void* dyn_smem;
    const void* scratch;
    bool operator==(const block_tag& o) const {
        return block.x == o.block.x && block.y == o.block.y && block.z == o.block.z && grid.x == o.grid.x &&
               grid.y == o.grid.y && grid.z == o.grid.z && dim.x == o.dim.x && dim.y == o.dim.y &&
               dim.z == o.dim.z && dyn_smem == o.dyn_smem && scratch == o.scratch;
    }
};

struct cp_async_lane {
    block_tag tag;
    uint32_t committed;  // groups this thread has committed so far in its block
    std::vector<cp_async_copy> queued;
};

struct cp_async_block {
    cp_async_lane lanes[1024];  // by linear thread id: each slot is touched by its own thread only
};

// The calling thread's queue. The table is block-wide (__shared__ is per worker thread on the sim,
// where blocks run one at a time), made once per worker and kept for its life; the pointer is
// published with atomics so ThreadSanitizer, which sees the fibers as threads, sees no race.
inline cp_async_lane& cp_async_self() {
    static __shared__ cp_async_block* table;
    cp_async_block* t = __atomic_load_n(&table, __ATOMIC_ACQUIRE);
    if (t == nullptr) {
        cp_async_block* fresh = new cp_async_block();
        if (__atomic_compare_exchange_n(&table, &t, fresh, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            t = fresh;
        } else {
            delete fresh;
        }
    }
    const unsigned linear = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    cp_async_lane& self = t->lanes[linear];
    const block_tag now{blockIdx, gridDim, blockDim, sim::dynamic_smem(), sim::warp_scratch()};
    if (!(self.tag == now)) {
        self.tag = now;
        self.committed = 0;
        self.queued.clear();
    }
    return self;
}

inline void cp_async_16(void* smem, const void* gmem) {
    if (reinterpret_cast<uintptr_t>(smem) % 16 != 0 || reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
        sim::kernel_fault("cp.async: a 16-byte copy needs 16-byte aligned addresses");
    cp_async_lane& self = cp_async_self();
    self.queued.push_back({smem, gmem, self.committed + 1});
}

inline void cp_async_commit() { cp_async_self().committed++; }

// Performs the queued copies of groups up to `last` (in issue order), keeps the rest.
inline void cp_async_complete(cp_async_lane& self, uint32_t last) {
    size_t kept = 0;
    for (const cp_async_copy& c : self.queued) {
        if (c.group <= last) {
            memcpy(c.dst, c.src, 16);
        } else {
            self.queued[kept++] = c;
        }
    }
    self.queued.resize(kept);
}

// cp.async.wait_group n: every group but the n most recently committed is complete.
inline void cp_async_wait(uint32_t n) {
    cp_async_lane& self = cp_async_self();
    if (self.committed > n) cp_async_complete(self, self.committed - n);
}

// cp.async.wait_all: commits the open group and waits for all of them.
inline void cp_async_wait_all() {
    cp_async_lane& self = cp_async_self();
    self.committed++;
    cp_async_complete(self, self.committed);
}

}  // namespace tc_sim
#endif  // SHARDTRAIN_SIM

// ---- mma -----------------------------------------------------------------------------------------
// d = a * b + c for the warp's 16x16 (A, row-major) by 16x8 (B, column-major) bf16 tile with f32
// accumulation: mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32. Every lane of the warp must call
// it together (it is a warp-collective instruction); d may be c.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const uint32_t a[4], const uint32_t b[2],
                                                  const float c[4]) {
#ifdef SHARDTRAIN_SIM
    tc_sim::mma(d, a, b, c);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#endif
}

// ---- ldmatrix ------------------------------------------------------------------------------------
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16: the warp loads 1, 2 or 4 8x8 matrices of
// 16-bit elements from shared memory, register j of each lane holding its part of matrix j. Each lane
// passes the address of one 16-byte aligned row: lanes 0-7 the rows of matrix 0, lanes 8-15 those of
// matrix 1, and so on (x1 uses lanes 0-7 only, x2 lanes 0-15; the other lanes' addresses are ignored
// but every lane must call). The "memory" clobbers keep the compiler from moving shared-memory stores
// across the load.
#ifndef SHARDTRAIN_SIM
__device__ __forceinline__ uint32_t shared_address(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
#endif

__device__ __forceinline__ void ldmatrix_x1(uint32_t r[1], const void* row) {
#ifdef SHARDTRAIN_SIM
    tc_sim::ldmatrix<1, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(shared_address(row)) : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t r[2], const void* row) {
#ifdef SHARDTRAIN_SIM
    tc_sim::ldmatrix<2, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row) {
#ifdef SHARDTRAIN_SIM
    tc_sim::ldmatrix<4, false>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}

// .trans: each matrix arrives transposed (lane l holds column l / 4, rows 2(l % 4) and 2(l % 4) + 1),
// which turns a row-major k x n tile into the B fragment and a k-major tile into the A fragment.
__device__ __forceinline__ void ldmatrix_x1_trans(uint32_t r[1], const void* row) {
#ifdef SHARDTRAIN_SIM
    tc_sim::ldmatrix<1, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t r[2], const void* row) {
#ifdef SHARDTRAIN_SIM
    tc_sim::ldmatrix<2, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row) {
#ifdef SHARDTRAIN_SIM
    tc_sim::ldmatrix<4, true>(r, row);
#else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(shared_address(row))
                 : "memory");
#endif
}

// ---- cp.async ------------------------------------------------------------------------------------
// cp.async.cg.shared.global: 16 bytes from global to shared memory, asynchronously (through L2 only,
// bypassing L1). Both addresses must be 16-byte aligned. A copy is complete only after a wait that
// covers its group, and then only for the issuing thread: other threads need a __syncthreads after
// the wait before they read it.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
#ifdef SHARDTRAIN_SIM
    tc_sim::cp_async_16(smem, gmem);
#else
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n"
                 :
                 : "r"(shared_address(smem)), "l"(__cvta_generic_to_global(gmem))
                 : "memory");
#endif
}

// cp.async.commit_group: the copies this thread issued since its last commit form one group (possibly
// empty; an empty group still counts in cp_async_wait<N>'s N).
__device__ __forceinline__ void cp_async_commit() {
#ifdef SHARDTRAIN_SIM
    tc_sim::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// cp.async.wait_group N: waits until every group this thread committed, except the N most recent, is
// complete (N = 1 in a two-stage pipeline: the stage just issued may still be in flight). Copies not
// yet committed are not waited for.
template <int N> __device__ __forceinline__ void cp_async_wait() {
    static_assert(N >= 0, "cp.async.wait_group counts groups");
#ifdef SHARDTRAIN_SIM
    tc_sim::cp_async_wait((uint32_t)N);
#else
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// cp.async.wait_all: commits the open copies as a group and waits for every group.
__device__ __forceinline__ void cp_async_wait_all() {
#ifdef SHARDTRAIN_SIM
    tc_sim::cp_async_wait_all();
#else
    asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}
