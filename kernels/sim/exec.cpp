// The block executor: runs a launch's blocks one after another on the calling worker thread, the
// threads of a block as fibers that switch only at __syncthreads and warp collectives (a thread
// that never waits runs straight to its end). It detects deadlocks and faulty collectives, and
// under TSan the barriers and collectives are the only happens-before edges between simulated
// threads, so a missing __syncthreads is reported as a race.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"
// After the standard headers: it defines CUDA's keyword macros.
#include "cuda_sim.h"

__thread sim::thread_ctx* sim_tls_thread;
__thread uint3 sim_tls_block_idx;
__thread uint3 sim_tls_block_dim;
__thread uint3 sim_tls_grid_dim;
__thread void* sim_tls_dyn_smem;

namespace sim {
namespace {

constexpr uint32_t kMaxThreads = 1024, kMaxWarps = 32, kFull = 0xffffffffu;
constexpr size_t kDynGuard = 64;
// TSan contexts per worker: simulated thread i runs as context i mod this. TSan (v3) has 256 thread
// slots for the whole process; a context per simulated thread (1024 per worker) thrashes them and
// runs ~20x slower. The cost: a race between threads i and i + k * n (same context) goes unseen.
// SHARDTRAIN_SIM_TSAN_FIBERS overrides it (1..1024).
constexpr uint32_t kDefaultTsanContexts = 64;

enum : uint32_t { T_READY, T_RUN, T_BAR, T_WARP, T_DONE };

struct sthread : thread_ctx {
    uint32_t state;
    fiber* f;  // null until the thread first runs
};

struct warp_state {
    uint32_t arrived;  // lanes waiting at the current collective
    uint32_t seq;      // collectives completed; its parity picks the value buffer
    uint32_t exists;   // lanes the block has
    uint32_t exited;
    // Double-buffered: the last lane to arrive runs on into the next collective while the others
    // still read this one's values; it cannot get two ahead, that needs their arrival.
    uint64_t vals[2][32];
    uint8_t kind[2][32];
    char tsan_sync[2];
    alignas(64) unsigned char scratch[kWarpScratchBytes];
};

struct exec {
    fiber main;
    fiber* cur = nullptr;
    fiber* fibers[kMaxThreads] = {};  // every fiber made
    uint32_t nfibers = 0;
    void* tsan_ctx[kMaxThreads] = {};  // TSan contexts, made by the scheduler (see run_blocks)
    uint32_t ntsan = 0, tsan_limit = 0;
    fiber* idle[kMaxThreads];
    uint32_t nidle = 0;
    bool dirty = false;  // a fault abandoned fibers mid-kernel
    sthread threads[kMaxThreads];
    warp_state warps[kMaxWarps];
    sthread* rq[kMaxThreads];  // runnable threads, FIFO; each thread is in it at most once
    uint32_t rq_head = 0, rq_tail = 0;
    sthread* bar_wait[kMaxThreads];
    uint32_t bar_arrived = 0, bar_gen = 0;
    uint32_t bar_count[2] = {0, 0}, bar_total[2] = {0, 0};  // __syncthreads_count, by generation parity
    uint32_t nthreads = 0, nwarps = 0, live = 0;
    const sim_kernel_entry* entry = nullptr;
    void* const* params = nullptr;
    bool faulted = false;
    char msg[4096];
    unsigned char* dyn = nullptr;
    size_t dyn_cap = 0;
    char tsan_block_start = 0, tsan_block_end = 0, tsan_bar[2] = {0, 0};
    std::vector<std::pair<void (*)(void*), void*>> at_exit;
};

__thread exec* tls_exec;

SIM_NO_TSAN inline void hb_release(void* p) {
#if defined(SIM_TSAN)
    __tsan_release(p);
#else
    (void)p;
#endif
}
SIM_NO_TSAN inline void hb_acquire(void* p) {
#if defined(SIM_TSAN)
    __tsan_acquire(p);
#else
    (void)p;
#endif
}

SIM_NO_TSAN inline sthread* current() { return static_cast<sthread*>(sim_tls_thread); }
SIM_NO_TSAN inline sthread* rq_pop(exec* e) {
    if (e->rq_head == e->rq_tail) return nullptr;
    return e->rq[e->rq_head++ & (kMaxThreads - 1)];
}
SIM_NO_TSAN inline void rq_push(exec* e, sthread* t) {
    t->state = T_READY;
    e->rq[e->rq_tail++ & (kMaxThreads - 1)] = t;
}

void fiber_main(fiber* f);

SIM_NO_TSAN inline void* tsan_ctx_of(exec* e, const sthread* t) {
#if defined(SIM_TSAN)
    return e->tsan_ctx[t->linear % e->tsan_limit];
#else
    (void)e;
    (void)t;
    return nullptr;
#endif
}

SIM_NO_TSAN fiber* bind_fiber(exec* e, sthread* t) {
    fiber* f;
#if defined(SIM_TSAN)
    // Under TSan thread i always runs on stack i: a stack handed from one TSan context to another
    // would show its frames' memory as raced on. (Made by run_blocks, on the scheduler.)
    f = e->fibers[t->linear];
#else
    if (e->nidle) {
        f = e->idle[--e->nidle];
    } else {
        f = fiber_create(fiber_main, e);
        e->fibers[e->nfibers++] = f;
    }
#endif
    f->th = t;
    f->tsan = tsan_ctx_of(e, t);
    t->f = f;
    return f;
}

SIM_NO_TSAN inline void resume(exec* e, fiber* from, sthread* next) {
    fiber* to = next->f ? next->f : bind_fiber(e, next);
    // For the scheduler only (it alone acquires this): a fault may abandon the thread switching
    // away, and what it did so far (read its parameters, made a fiber) must still be ordered
    // before the launch's cleanup.
    hb_release(&e->tsan_block_end);
    next->state = T_RUN;
    sim_tls_thread = next;
    e->cur = to;
    fiber_switch(from, to);
}

// Records the fault and leaves the block for good: the scheduler sees `faulted`.
[[noreturn]] SIM_NO_TSAN __attribute__((format(printf, 2, 3))) void fault(exec* e, const char* fmt, ...) {
    const sthread* t = current();
    int n = snprintf(e->msg, sizeof e->msg, "block (%u,%u,%u), thread (%u,%u,%u): ", sim_tls_block_idx.x,
                     sim_tls_block_idx.y, sim_tls_block_idx.z, t->tid.x, t->tid.y, t->tid.z);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg + n, sizeof e->msg - n, fmt, ap);
    va_end(ap);
    e->faulted = true;
    e->dirty = true;
    hb_release(&e->tsan_block_end);  // the message reaches the scheduler
    fiber* from = e->cur;
    e->cur = &e->main;
    fiber_switch(from, &e->main);
    abort();  // never resumed
}

const char* kind_name(int kind) {
    switch (kind) {
        case COLL_SHFL: return "a shuffle";
        case COLL_VOTE: return "a vote";
        default: return "__syncwarp";
    }
}

[[noreturn]] SIM_NO_TSAN void deadlock(exec* e) {
    char detail[1536];
    int n = 0;
    int listed = 0;
    for (uint32_t w = 0; w < e->nwarps && listed < 4; w++) {
        const warp_state& ws = e->warps[w];
        if (!ws.arrived) continue;
        listed++;
        uint32_t missing = 0, waiting = 0;
        for (uint32_t l = 32; l-- > 0;) {
            if (e->threads[w * 32 + l].state == T_WARP) waiting = l;
            else missing = l;
        }
        const sthread& m = e->threads[w * 32 + missing];
        n += snprintf(detail + n, sizeof detail - n,
                      "; warp %u: %u of 32 lanes wait at %s, lane %u (thread (%u,%u,%u)) %s", w, ws.arrived,
                      kind_name(ws.kind[ws.seq & 1][waiting]), missing, m.tid.x, m.tid.y, m.tid.z,
                      m.state == T_BAR ? "waits at __syncthreads" : "cannot arrive");
        if (n >= (int)sizeof detail) break;
    }
    if (listed == 0) detail[0] = 0;
    fault(e, "deadlock: all %u live threads wait and none can proceed: %u at __syncthreads%s", e->live,
          e->bar_arrived, detail);
}

SIM_NO_TSAN inline void block_current(exec* e, sthread* t) {
    sthread* next = rq_pop(e);
    if (!next) deadlock(e);
    resume(e, t->f, next);
}

SIM_NO_TSAN inline void release_barrier(exec* e) {
    for (uint32_t i = 0; i < e->bar_arrived; i++) rq_push(e, e->bar_wait[i]);
    // Threads that arrived count: the barrier's participants, for __syncthreads_and.
    e->bar_total[e->bar_gen & 1] = e->bar_arrived + (e->bar_arrived < e->live ? 1 : 0);
    e->bar_arrived = 0;
    e->bar_gen++;
    // The slot the next generation uses held the one before this: everyone has left that one.
    e->bar_count[e->bar_gen & 1] = 0;
}

SIM_NO_TSAN void thread_exit(exec* e, sthread* t) {
    t->state = T_DONE;
    e->live--;
    warp_state& w = e->warps[t->linear >> 5];
    w.exited |= 1u << (t->linear & 31);
    if (w.arrived)
        fault(e, "lane %u of warp %u exited while %u lanes of its warp wait at a full-mask collective",
              t->linear & 31, t->linear >> 5, w.arrived);
    // An exited thread no longer counts for the barrier: the others may be complete now.
    if (e->bar_arrived && e->bar_arrived == e->live) release_barrier(e);
}

SIM_NO_TSAN inline void park(exec* e, fiber* f) {
#if defined(SIM_TSAN)
    (void)e;
    (void)f;
#else
    e->idle[e->nidle++] = f;
#endif
}

// Every fiber runs this loop for its whole life: run the bound thread, retire it, hand the OS
// thread to the next runnable one. A parked fiber resumes at the loop's top with a new thread.
SIM_NO_TSAN void fiber_main(fiber* f) {
    exec* e = static_cast<exec*>(f->owner);
    for (;;) {
        sthread* t = static_cast<sthread*>(f->th);
        hb_acquire(&e->tsan_block_start);
        e->entry->invoke(e->params);
        hb_release(&e->tsan_block_end);
        thread_exit(e, t);
        sthread* next = rq_pop(e);
        if (!next && e->live) deadlock(e);
        t->f = nullptr;
        f->th = nullptr;
        if (!next) {  // the block is done
            park(e, f);
            e->cur = &e->main;
            fiber_switch(f, &e->main);
            continue;
        }
#if !defined(SIM_TSAN)
        // A thread that has not started yet runs on this very stack: no switch at all. (Not under
        // TSan, where each simulated thread keeps its own stack: see bind_fiber.)
        if (!next->f) {
            next->f = f;
            f->th = next;
            next->state = T_RUN;
            sim_tls_thread = next;
            continue;
        }
#endif
        park(e, f);
        resume(e, f, next);
    }
}

SIM_NO_TSAN bool run_block(exec* e) {
    e->rq_head = 0;
    e->rq_tail = 0;
    for (uint32_t i = 0; i < e->nthreads; i++) {
        e->threads[i].f = nullptr;
        rq_push(e, &e->threads[i]);
    }
    for (uint32_t w = 0; w < e->nwarps; w++) {
        e->warps[w].arrived = 0;
        e->warps[w].seq = 0;
        e->warps[w].exited = 0;
    }
    e->bar_arrived = 0;
    e->bar_gen = 0;
    e->bar_count[0] = e->bar_count[1] = 0;
    e->live = e->nthreads;
    hb_release(&e->tsan_block_start);
    resume(e, &e->main, rq_pop(e));
    hb_acquire(&e->tsan_block_end);
    return !e->faulted;
}

SIM_NO_TSAN void drop_fibers(exec* e) {
    for (uint32_t i = 0; i < e->nfibers; i++) {
        fiber_destroy(e->fibers[i]);
        e->fibers[i] = nullptr;
    }
    e->nfibers = 0;
    e->nidle = 0;
#if defined(SIM_TSAN)
    // Their shadow call stacks hold the abandoned threads' frames.
    for (uint32_t i = 0; i < e->ntsan; i++) __tsan_destroy_fiber(e->tsan_ctx[i]);
#endif
    e->ntsan = 0;
    e->dirty = false;
}

SIM_NO_TSAN exec* get_exec() {
    if (!tls_exec) {
        tls_exec = new exec();
        fiber_init_main(&tls_exec->main);
        uint32_t k = kDefaultTsanContexts;
        if (const char* v = getenv("SHARDTRAIN_SIM_TSAN_FIBERS")) k = (uint32_t)atoi(v);
        tls_exec->tsan_limit = k < 1 ? 1 : k > kMaxThreads ? kMaxThreads : k;
    }
    return tls_exec;
}

SIM_NO_TSAN void prepare_dyn_smem(exec* e, uint32_t bytes) {
#if defined(SIM_ASAN)
    // Exactly the launch's size, so ASan's redzone starts at its end.
    free(e->dyn);
    e->dyn = static_cast<unsigned char*>(aligned_alloc(16, ((size_t)bytes + 16) & ~(size_t)15));
    e->dyn_cap = bytes;
    memset(e->dyn, 0xff, bytes);
    __asan_poison_memory_region(e->dyn + bytes, (((size_t)bytes + 16) & ~(size_t)15) - bytes);
#else
    const size_t need = (size_t)bytes + kDynGuard;
    if (need > e->dyn_cap) {
        free(e->dyn);
        void* p = nullptr;
        if (posix_memalign(&p, 64, need) != 0) abort();
        e->dyn = static_cast<unsigned char*>(p);
        e->dyn_cap = need;
    }
    memset(e->dyn, 0xff, bytes);  // uninitialised shared memory reads as NaN
    for (size_t i = 0; i < kDynGuard; i++) e->dyn[bytes + i] = (unsigned char)(0x5a ^ i);
#endif
}

SIM_NO_TSAN const char* run_blocks(exec* e, const launch& l) {
    if (e->dirty) drop_fibers(e);
    const uint32_t bx = l.block[0], by = l.block[1], bz = l.block[2];
    e->nthreads = bx * by * bz;
    e->nwarps = (e->nthreads + 31) / 32;
    for (uint32_t i = 0; i < e->nthreads; i++) {
        sthread& t = e->threads[i];
        t.tid = {i % bx, (i / bx) % by, i / (bx * by)};
        t.linear = i;
        t.state = T_READY;
    }
    for (uint32_t w = 0; w < e->nwarps; w++) {
        const uint32_t lanes = e->nthreads - w * 32 < 32 ? e->nthreads - w * 32 : 32;
        e->warps[w].exists = lanes == 32 ? kFull : (1u << lanes) - 1;
    }
#if defined(SIM_TSAN)
    // Made here, not lazily by a simulated thread: TSan orders a new context after its creator's
    // past, which would hide races between the creating thread and the new one.
    const uint32_t want = e->nthreads < e->tsan_limit ? e->nthreads : e->tsan_limit;
    for (; e->ntsan < want; e->ntsan++) {
        char name[64];
        snprintf(name, sizeof name, "sim threads %u mod %u", e->ntsan, e->tsan_limit);
        e->tsan_ctx[e->ntsan] = __tsan_create_fiber(0);
        __tsan_set_fiber_name(e->tsan_ctx[e->ntsan], name);
    }
    for (; e->nfibers < e->nthreads; e->nfibers++) e->fibers[e->nfibers] = fiber_create(fiber_main, e);
#endif
    e->entry = l.entry;
    e->params = l.params;
    e->faulted = false;
    prepare_dyn_smem(e, l.dyn_smem);
    sim_tls_dyn_smem = e->dyn;
    sim_tls_block_dim = {bx, by, bz};
    sim_tls_grid_dim = {l.grid[0], l.grid[1], l.grid[2]};
    for (uint32_t z = 0; z < l.grid[2]; z++)
        for (uint32_t y = 0; y < l.grid[1]; y++)
            for (uint32_t x = 0; x < l.grid[0]; x++) {
                sim_tls_block_idx = {x, y, z};
                if (!run_block(e)) return e->msg;
            }
#if !defined(SIM_ASAN)
    for (size_t i = 0; i < kDynGuard; i++)
        if (e->dyn[l.dyn_smem + i] != (unsigned char)(0x5a ^ i)) {
            snprintf(e->msg, sizeof e->msg, "wrote past the end of its %u bytes of dynamic shared memory (offset %zu)",
                     l.dyn_smem, l.dyn_smem + i);
            return e->msg;
        }
#endif
    return nullptr;
}

}  // namespace

// ---- called from kernel code (cuda_sim.h) ---------------------------------------------------------

SIM_NO_TSAN void syncthreads() { syncthreads_count(0); }

SIM_NO_TSAN int syncthreads_count(int pred, int* participants) {
    exec* e = tls_exec;
    sthread* t = current();
    const uint32_t slot = e->bar_gen & 1;
    e->bar_count[slot] += pred != 0;
    // Parity of the generation: a thread that runs ahead into the next barrier releases into the
    // other slot, so a late leaver of this one does not acquire what was written after it.
    char* sync = &e->tsan_bar[slot];
    hb_release(sync);
    if (e->bar_arrived + 1 >= e->live) {
        release_barrier(e);
    } else {
        e->bar_wait[e->bar_arrived++] = t;
        t->state = T_BAR;
        block_current(e, t);
    }
    hb_acquire(sync);
    if (participants) *participants = (int)e->bar_total[slot];
    return (int)e->bar_count[slot];
}

SIM_NO_TSAN const uint64_t* warp_exchange(unsigned mask, uint64_t value, int kind) {
    exec* e = tls_exec;
    sthread* t = current();
    const uint32_t lane = t->linear & 31, wi = t->linear >> 5;
    warp_state& w = e->warps[wi];
    if (mask != kFull)
        fault(e, "%s in warp %u, lane %u, with mask 0x%08x: partial masks are not simulated", kind_name(kind), wi,
              lane, mask);
    if (w.exists != kFull) {
        const uint32_t missing = (uint32_t)__builtin_ctz(~w.exists);
        fault(e,
              "%s with a full mask in warp %u, lane %u, but lane %u of that warp does not exist (the block has %u "
              "threads, not a multiple of 32)",
              kind_name(kind), wi, lane, missing, e->nthreads);
    }
    if (w.exited) {
        const uint32_t gone = (uint32_t)__builtin_ctz(w.exited);
        fault(e, "%s with a full mask in warp %u, lane %u, but lane %u of that warp has exited", kind_name(kind), wi,
              lane, gone);
    }
    const uint32_t p = w.seq & 1;
    w.vals[p][lane] = value;
    w.kind[p][lane] = (uint8_t)kind;
    hb_release(&w.tsan_sync[p]);
    if (++w.arrived == 32) {
        w.arrived = 0;
        w.seq++;
        for (uint32_t l = 0; l < 32; l++)
            if (w.kind[p][l] != kind)
                fault(e, "lanes of warp %u are at different collectives: lane %u at %s, lane %u at %s", wi, l,
                      kind_name(w.kind[p][l]), lane, kind_name(kind));
        sthread* base = &e->threads[wi * 32];
        for (uint32_t l = 0; l < 32; l++)
            if (l != lane) rq_push(e, base + l);
    } else {
        t->state = T_WARP;
        block_current(e, t);
    }
    hb_acquire(&w.tsan_sync[p]);
    return w.vals[p];
}

SIM_NO_TSAN unsigned active_mask() {
    const warp_state& w = tls_exec->warps[current()->linear >> 5];
    return w.exists & ~w.exited;
}

SIM_NO_TSAN unsigned char* warp_scratch() { return tls_exec->warps[current()->linear >> 5].scratch; }

SIM_NO_TSAN void kernel_fault(const char* message) { fault(tls_exec, "%s", message); }

// Instrumented: the registering simulated thread is ordered before the worker's exit by the block
// end it releases.
void at_worker_exit(void (*fn)(void*), void* arg) { tls_exec->at_exit.emplace_back(fn, arg); }

// ---- called from the stream worker ---------------------------------------------------------------

std::string run_kernel(const launch& l) {
    const char* m = run_blocks(get_exec(), l);
    return m ? std::string(m) : std::string();
}

void exec_thread_exit() {
    exec* e = tls_exec;
    if (!e) return;
    for (auto it = e->at_exit.rbegin(); it != e->at_exit.rend(); ++it) it->first(it->second);
    drop_fibers(e);
    free(e->dyn);
    delete e;
    tls_exec = nullptr;
}

}  // namespace sim
