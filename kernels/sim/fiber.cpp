// Fiber stacks and the context switch behind fiber.h. The x86-64 switch saves only the callee-saved
// registers (the kernels never change the FP environment), which keeps a switch to a few
// nanoseconds; other architectures fall back to ucontext (correct, much slower).
#include "fiber.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(SIM_ASM_SWITCH)
// sim_ctx_switch(save_sp, new_sp): push the callee-saved registers, store rsp, load the other
// stack's rsp, pop its registers and return into it. A new fiber's stack is laid out so that this
// return lands in sim_fiber_trampoline with the fiber pointer in r12.
asm(R"(
    .text
    .globl sim_ctx_switch
    .hidden sim_ctx_switch
    .type sim_ctx_switch, @function
    .p2align 4
sim_ctx_switch:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size sim_ctx_switch, .-sim_ctx_switch

    .globl sim_fiber_trampoline
    .hidden sim_fiber_trampoline
    .type sim_fiber_trampoline, @function
    .p2align 4
sim_fiber_trampoline:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    call sim_fiber_start
    ud2
    .cfi_endproc
    .size sim_fiber_trampoline, .-sim_fiber_trampoline
)");
extern "C" void sim_fiber_trampoline() __attribute__((visibility("hidden")));
#endif

extern "C" __attribute__((visibility("hidden"), used)) SIM_NO_TSAN void sim_fiber_start(sim::fiber* f) {
#if defined(SIM_ASAN)
    __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
    f->entry(f);
    fprintf(stderr, "shardtrain sim: a fiber entry returned\n");
    abort();
}

#if !defined(SIM_ASM_SWITCH)
static void ucontext_entry(unsigned hi, unsigned lo) {
    sim_fiber_start(reinterpret_cast<sim::fiber*>(((uintptr_t)hi << 32) | lo));
}
#endif

namespace sim {

SIM_NO_TSAN fiber* fiber_create(void (*entry)(fiber*), void* owner) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    fiber* f = new fiber();
    f->map_size = kFiberStack + page;
    void* m = mmap(nullptr, f->map_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) {
        fprintf(stderr, "shardtrain sim: cannot map a %zu-byte fiber stack\n", f->map_size);
        abort();
    }
    f->map = static_cast<char*>(m);
    mprotect(f->map, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    f->stack_lo = f->map + page;
    f->stack_size = kFiberStack;
    f->entry = entry;
    f->owner = owner;
#if defined(SIM_ASM_SWITCH)
    // Slots popped by sim_ctx_switch: r15 r14 r13 r12 rbx rbp, then the return address. The return
    // leaves rsp 16-byte aligned at the trampoline's call, as the ABI wants.
    uintptr_t top = ((uintptr_t)(f->stack_lo + f->stack_size)) & ~(uintptr_t)15;
    void** sp = reinterpret_cast<void**>(top - 72);
    for (int i = 0; i < 9; i++) sp[i] = nullptr;
    sp[3] = f;                                             // r12
    sp[5] = nullptr;                                       // rbp: ends frame-pointer walks
    sp[6] = reinterpret_cast<void*>(&sim_fiber_trampoline);
    f->sp = sp;
#else
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack_lo;
    f->uc.uc_stack.ss_size = f->stack_size;
    f->uc.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->uc, (void (*)())ucontext_entry, 2, (unsigned)(p >> 32), (unsigned)p);
#endif
    return f;
}

SIM_NO_TSAN void fiber_destroy(fiber* f) {
    if (!f) return;
#if defined(SIM_ASAN)
    // A fiber abandoned mid-kernel leaves its frames' redzones poisoned.
    __asan_unpoison_memory_region(f->stack_lo, f->stack_size);
#endif
    munmap(f->map, f->map_size);
    delete f;
}

SIM_NO_TSAN void fiber_init_main(fiber* main) {
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
        void* lo = nullptr;
        size_t size = 0;
        pthread_attr_getstack(&attr, &lo, &size);
        main->stack_lo = static_cast<char*>(lo);
        main->stack_size = size;
        pthread_attr_destroy(&attr);
    }
#if defined(SIM_TSAN)
    main->tsan = __tsan_get_current_fiber();
#endif
}

}  // namespace sim
