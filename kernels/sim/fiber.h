// Fibers for simulated GPU threads: a stack (mmap'ed, PROT_NONE guard page below it) and a saved
// context, switched by a hand-written x86-64 routine (ucontext elsewhere). Every switch carries the
// sanitizer annotations: ASan learns the new stack bounds, TSan switches to the context of the
// simulated thread the fiber runs without creating a happens-before edge, so only the executor's
// explicit acquire/release order the simulated threads.
#pragma once
#include <stddef.h>
#include <stdint.h>

#if defined(__SANITIZE_ADDRESS__)
#define SIM_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define SIM_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif
// SHARDTRAIN_SIM_UCONTEXT forces the portable switch (to test it on x86-64).
#if defined(__x86_64__) && !defined(SHARDTRAIN_SIM_UCONTEXT)
#define SIM_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

// The executor's bookkeeping is shared by fibers that TSan must see as unordered (otherwise a
// missing __syncthreads would be hidden); it is single-OS-thread data, so it is not instrumented.
#if defined(SIM_TSAN)
#define SIM_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define SIM_NO_TSAN
#endif

extern "C" void sim_ctx_switch(void** save_sp, void* new_sp) __attribute__((visibility("hidden")));

namespace sim {

struct fiber {
    void* sp = nullptr;            // saved stack pointer while switched out
    char* stack_lo = nullptr;      // lowest usable stack byte (above the guard page)
    size_t stack_size = 0;
    char* map = nullptr;           // the whole mapping, guard page included
    size_t map_size = 0;
    void (*entry)(fiber*) = nullptr;
    void* owner = nullptr;         // the executor that runs this fiber
    void* th = nullptr;            // the simulated thread bound to it
    void* asan_fake = nullptr;     // ASan fake stack saved across a switch
    void* tsan = nullptr;          // TSan fiber context of the simulated thread it runs
#if !defined(SIM_ASM_SWITCH)
    ucontext_t uc;
#endif
};

// Stack bytes per fiber: kernels keep per-thread arrays on it (attention: 4 x 64 floats); the
// sanitizers add redzones and bigger frames.
#if defined(SIM_ASAN) || defined(SIM_TSAN)
constexpr size_t kFiberStack = 256 * 1024;
#else
constexpr size_t kFiberStack = 64 * 1024;
#endif

// A new fiber that starts in entry(f) on first switch; entry must never return. Its TSan context
// (`tsan`) is the caller's to set before switching to it.
fiber* fiber_create(void (*entry)(fiber*), void* owner);
void fiber_destroy(fiber* f);
// Describes the calling OS thread's own stack as a fiber (the worker's scheduler context).
void fiber_init_main(fiber* main);

SIM_NO_TSAN inline void fiber_switch(fiber* from, fiber* to) {
#if defined(SIM_ASAN)
    __sanitizer_start_switch_fiber(&from->asan_fake, to->stack_lo, to->stack_size);
#endif
#if defined(SIM_TSAN)
    if (to->tsan != from->tsan) __tsan_switch_to_fiber(to->tsan, __tsan_switch_to_fiber_no_sync);
#endif
#if defined(SIM_ASM_SWITCH)
    sim_ctx_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
#if defined(SIM_ASAN)
    __sanitizer_finish_switch_fiber(from->asan_fake, nullptr, nullptr);
#endif
}

}  // namespace sim
