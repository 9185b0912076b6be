// The CUDA device environment for kernels compiled for the host (SHARDTRAIN_SIM), so that every
// kernels/*.cu builds unchanged and runs on the simulator: keywords, thread indices, the block
// barrier, warp collectives and the kernel-entry table macro. Each simulated thread is a fiber on
// the stream's worker thread; the runtime behind these declarations is kernels/sim/exec.cpp.
// Threads switch only at __syncthreads and warp collectives, so a thread spinning on a value that
// another thread of its block is to write (without a barrier between) never lets it run: a hang.
#pragma once
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>
#include <utility>

#include "cuda_sim_types.h"
#include "sim_api.h"

// ---- keywords ------------------------------------------------------------------------------------
// build.rs preprocesses each .cu with SHARDTRAIN_SIM_SCAN and takes the identifier after
// "SHARDTRAIN_SIM_ENTRY_MARKER void " as an entry point (so __launch_bounds__ must expand to
// nothing there too).
#ifdef SHARDTRAIN_SIM_SCAN
#define __global__ SHARDTRAIN_SIM_ENTRY_MARKER
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Block-scope statics per OS thread: a block's threads are fibers of one worker thread and share
// the copy; blocks of kernels on other streams run on other workers and get their own.
#define __shared__ thread_local
#define __constant__
// __restrict__ is a GCC keyword already.

static constexpr int warpSize = 32;

// ---- runtime interface ---------------------------------------------------------------------------
#pragma GCC visibility push(hidden)
namespace sim {
// The first fields of the executor's per-thread record.
struct thread_ctx {
    uint3 tid;
    unsigned int linear;  // x + y * blockDim.x + z * blockDim.x * blockDim.y
};
enum collective_kind { COLL_SHFL = 1, COLL_VOTE = 2, COLL_SYNC = 3 };

// The block barrier (bar.sync 0): every live thread of the block arrives, at any call site; a
// thread that has exited no longer counts.
void syncthreads();
// The same barrier, also counting the arriving threads whose `pred` is nonzero (and, when
// `participants` is given, how many threads arrived).
int syncthreads_count(int pred, int* participants = nullptr);
// A full-warp rendezvous: stores this lane's `value`, waits for all 32 lanes and returns the 32
// values, valid until this lane's next collective. A partial mask, a lane that has exited or does
// not exist, or lanes at different kinds of collective are sticky faults.
const uint64_t* warp_exchange(unsigned mask, uint64_t value, int kind);
// Lanes of the calling warp that exist and have not exited (no synchronisation).
unsigned active_mask();
// Records a fault for the launch and abandons the block; never returns.
[[noreturn]] void kernel_fault(const char* message);
// Runs fn(arg) when the calling worker thread (the stream running this kernel) ends: for state an
// emulation keeps per worker (in a __shared__ pointer, say), which LeakSanitizer would otherwise
// report once the worker's thread-local storage is gone.
void at_worker_exit(void (*fn)(void*), void* arg);
}  // namespace sim
// Global-dynamic TLS (a __tls_get_addr call per first use in a function): initial-exec would be
// one load, but it makes the library's whole TLS block static, shared-memory arrays included, and
// glibc refuses to dlopen a library with half a megabyte of static TLS.
extern __thread sim::thread_ctx* sim_tls_thread;
extern __thread uint3 sim_tls_block_idx;
extern __thread uint3 sim_tls_block_dim;
extern __thread uint3 sim_tls_grid_dim;
extern __thread void* sim_tls_dyn_smem;
#pragma GCC visibility pop

#define threadIdx (static_cast<const uint3&>(sim_tls_thread->tid))
#define blockIdx (static_cast<const uint3&>(sim_tls_block_idx))
#define blockDim (static_cast<const uint3&>(sim_tls_block_dim))
#define gridDim (static_cast<const uint3&>(sim_tls_grid_dim))

namespace sim {
// Primitives for warp-level emulation (tensor-core fragments and the like):
//   lane_id(), warp_id(): the calling thread's lane and warp within the block (linear thread id
//     split by 32, as hardware numbers warps).
//   warp_barrier(): all 32 lanes of the warp arrive before any leaves; memory written before it is
//     visible to every lane after it (and TSan knows). The whole warp must exist and be live.
//   warp_scratch(): kWarpScratchBytes (16-byte aligned) that every lane of the calling warp sees
//     and no other warp does. Use it between two warp_barrier() calls: write, barrier, read,
//     barrier (the second barrier keeps a fast lane from overwriting what a slow one still reads).
constexpr size_t kWarpScratchBytes = 4096;
inline unsigned lane_id() { return sim_tls_thread->linear & 31u; }
inline unsigned warp_id() { return sim_tls_thread->linear >> 5; }
inline void warp_barrier() { warp_exchange(0xffffffffu, 0, COLL_SYNC); }
#pragma GCC visibility push(hidden)
unsigned char* warp_scratch();
#pragma GCC visibility pop
// The block's dynamic shared memory (the launch's dynamic_smem_bytes, 16-byte aligned).
inline void* dynamic_smem() { return sim_tls_dyn_smem; }

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "warp shuffles move at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}
// The source lane of shfl.sync in each mode, as PTX defines it for CUDA's width argument; an
// out-of-segment source reads the lane's own value.
enum shfl_mode { SHFL_IDX, SHFL_UP, SHFL_DOWN, SHFL_XOR };
inline unsigned shfl_source(shfl_mode mode, unsigned b, int width) {
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) kernel_fault("shuffle width is not a power of 2 in [1, 32]");
    const int lane = (int)lane_id();
    const int seg_lo = lane & ~(width - 1), seg_hi = seg_lo + width - 1;
    const int bv = (int)(b & 31u);
    int j = lane;
    switch (mode) {
        case SHFL_IDX: j = seg_lo | (bv & (width - 1)); break;
        case SHFL_UP: j = lane - bv; if (j < seg_lo) j = lane; break;
        case SHFL_DOWN: j = lane + bv; if (j > seg_hi) j = lane; break;
        case SHFL_XOR: j = lane ^ bv; if (j > seg_hi) j = lane; break;
    }
    return (unsigned)j;
}
template <typename T> inline T shfl(unsigned mask, T var, shfl_mode mode, unsigned b, int width) {
    const uint64_t* v = warp_exchange(mask, to_bits(var), COLL_SHFL);
    return from_bits<T>(v[shfl_source(mode, b, width)]);
}
}  // namespace sim

// ---- synchronisation and warp collectives ---------------------------------------------------------
inline void __syncthreads() { sim::syncthreads(); }
inline int __syncthreads_count(int pred) { return sim::syncthreads_count(pred); }
inline int __syncthreads_or(int pred) { return sim::syncthreads_count(pred) != 0; }
inline int __syncthreads_and(int pred) {
    int participants = 0;
    return sim::syncthreads_count(pred, &participants) == participants;
}
inline void __syncwarp(unsigned mask = 0xffffffffu) { sim::warp_exchange(mask, 0, sim::COLL_SYNC); }
// Blocks run one after another and a block's threads switch only at barriers, so fences have
// nothing to order beyond what the compiler might move.
inline void __threadfence() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_signal_fence(__ATOMIC_SEQ_CST); }

template <typename T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
    return sim::shfl(mask, var, sim::SHFL_IDX, (unsigned)src_lane, width);
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return sim::shfl(mask, var, sim::SHFL_UP, delta, width);
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
    return sim::shfl(mask, var, sim::SHFL_DOWN, delta, width);
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
    return sim::shfl(mask, var, sim::SHFL_XOR, (unsigned)lane_mask, width);
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    const uint64_t* v = sim::warp_exchange(mask, pred != 0, sim::COLL_VOTE);
    unsigned r = 0;
    for (unsigned i = 0; i < 32; i++) r |= (unsigned)(v[i] & 1u) << i;
    return r;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == 0xffffffffu; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0u; }
inline unsigned __activemask() { return sim::active_mask(); }
// sm_80 warp reductions.
inline unsigned __reduce_add_sync(unsigned mask, unsigned value) {
    const uint64_t* v = sim::warp_exchange(mask, value, sim::COLL_VOTE);
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r += (unsigned)v[i];
    return r;
}
inline int __reduce_add_sync(unsigned mask, int value) { return (int)__reduce_add_sync(mask, (unsigned)value); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned value) {
    const uint64_t* v = sim::warp_exchange(mask, value, sim::COLL_VOTE);
    unsigned r = 0;
    for (int i = 0; i < 32; i++) r = (unsigned)v[i] > r ? (unsigned)v[i] : r;
    return r;
}
inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
    const uint64_t* v = sim::warp_exchange(mask, value, sim::COLL_VOTE);
    unsigned r = 0xffffffffu;
    for (int i = 0; i < 32; i++) r = (unsigned)v[i] < r ? (unsigned)v[i] : r;
    return r;
}

// ---- kernel entry table --------------------------------------------------------------------------
// SIM_KERNEL_ENTRY(fn) is a constant sim_kernel_entry for the extern "C" kernel fn: its name, an
// invoker that copies each parameter out of cuLaunchKernel-style `void* const* params` into the
// kernel's own parameter type, and the parameter sizes the runtime checks launches against.
namespace sim {
template <typename F> struct kernel_signature;
template <typename... A> struct kernel_signature<void (*)(A...)> {
    static constexpr int count = (int)sizeof...(A);
    static_assert(((sizeof(A) < 65536) && ...), "kernel parameter too large");
    static constexpr uint16_t sizes[sizeof...(A) + 1] = {(uint16_t)sizeof(A)..., 0};
};
template <typename T> inline T load_param(const void* p) {
    static_assert(std::is_trivially_copyable<T>::value, "kernel parameters are copied bytewise");
    T v;
    memcpy(&v, p, sizeof(T));
    return v;
}
template <typename... A, size_t... I>
__attribute__((always_inline)) inline void call_kernel(void (*f)(A...), void* const* params, std::index_sequence<I...>) {
    (void)params;
    f(load_param<A>(params[I])...);
}
template <auto F> void invoke_kernel(void* const* params) {
    call_kernel(F, params, std::make_index_sequence<kernel_signature<decltype(F)>::count>{});
}
}  // namespace sim

#define SIM_KERNEL_ENTRY(fn)                                                                        \
    {                                                                                               \
        #fn, &::sim::invoke_kernel<&fn>, ::sim::kernel_signature<decltype(&fn)>::count,             \
            ::sim::kernel_signature<decltype(&fn)>::sizes                                           \
    }
