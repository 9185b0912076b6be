// Runtime internals shared by kernels/sim/*.cpp: the device, stream and event records, the memory
// registry, the block executor's entry point and the error helpers. Not seen by kernels.
#pragma once
#include <stdint.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "fiber.h"
#include "sim_api.h"

namespace sim {

// ---- errors --------------------------------------------------------------------------------------
// Sets the calling host thread's sim_last_error() and returns `code`.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
// SIM_OK, or SIM_ERROR_STICKY with the device's first fault as the message.
int sticky_check(sim_device* d);
// Records the device's first fault (later ones are dropped, as a GPU keeps the first).
void record_fault(sim_device* d, const std::string& message);

// Under TSan: the enclosed code's synchronisation and memory accesses are invisible. Worker
// threads of different streams share the device's allocation table and fault record; if TSan saw
// that locking, every guard check would order two streams and hide a missing event wait.
struct quiet {
    quiet();
    ~quiet();
    quiet(const quiet&) = delete;
    quiet& operator=(const quiet&) = delete;
};

// Handles travel between host threads through the caller's own synchronisation (in the Rust process
// that is futex-based locking TSan cannot see, since only this library is instrumented). Every API
// call on a handle acquires it on entry and releases it on return, as a handle with an internal lock
// would, so TSan sees that hand-off. This orders host calls only: work on the streams' workers is
// still ordered by events alone, so a missing event wait stays a race.
struct handle_sync {
    const void* h;
    explicit handle_sync(const void* handle);
    ~handle_sync();
    handle_sync(const handle_sync&) = delete;
    handle_sync& operator=(const handle_sync&) = delete;
};
#define SIM_HANDLE_CAT2(a, b) a##b
#define SIM_HANDLE_CAT(a, b) SIM_HANDLE_CAT2(a, b)
#define SIM_HANDLE(p) ::sim::handle_sync SIM_HANDLE_CAT(sim_handle_sync_, __LINE__)(p)

// ---- stream work ---------------------------------------------------------------------------------
enum op_kind {
    OP_WORK,    // skipped once the device has faulted (kernels, copies, GEMMs)
    OP_ALWAYS,  // runs regardless, so nothing waits forever (event records and waits, frees)
};
struct op {
    int kind;
    std::function<void()> run;
};
int enqueue(sim_stream* s, int kind, std::function<void()> run);

// ---- memory (memory.cpp) -------------------------------------------------------------------------
struct alloc_rec {
    unsigned char* block;  // the heap block (guards included)
    uint64_t size;         // bytes the caller asked for
    bool free_queued;      // sim_free_async was called: no longer usable for new work
};
int mem_alloc(sim_device* d, uint64_t bytes, uint64_t* out);
// Validates `ptr` as the start of a live allocation of `d` and marks it as being freed.
int mem_mark_free(sim_device* d, uint64_t ptr);
// On the worker, when the stream reaches the free: poison, release, account.
void mem_release(sim_device* d, uint64_t ptr);
// SIM_OK when [ptr, ptr + bytes) lies inside one live allocation (of `d` or of any device);
// otherwise SIM_ERROR_MEMORY with a message naming `what`.
int mem_check_range(sim_device* d, uint64_t ptr, uint64_t bytes, const char* what);
// After a kernel: true when every guard of every live allocation of `d` is intact; otherwise the
// fault text (allocation size and offset of the first damaged byte).
bool mem_check_guards(sim_device* d, std::string* fault);
void mem_release_all(sim_device* d);
void devices_add(sim_device* d);
void devices_remove(sim_device* d);

// ---- kernels (exec.cpp) --------------------------------------------------------------------------
struct launch {
    const sim_kernel_entry* entry;
    uint32_t grid[3], block[3];
    uint32_t dyn_smem;
    void* const* params;
};
// Runs every block of the launch on the calling worker thread: "" or the fault (which block and
// thread, and what happened).
std::string run_kernel(const launch& l);
// Frees the calling worker thread's executor (fibers, stacks).
void exec_thread_exit();

}  // namespace sim

// Hidden: sim_api.h declares these tags with default visibility, which would export their members.
struct __attribute__((visibility("hidden"))) sim_device {
    uint64_t capacity = 0;
    std::atomic<uint64_t> used{0};  // relaxed only: it must order nothing between streams
    std::mutex mu;                  // host side: streams, events, opt-ins
    std::vector<sim_stream*> streams;
    std::vector<sim_event*> events;
    std::unordered_map<std::string, uint32_t> max_dyn_smem;
    std::mutex reg_mu;  // taken only inside sim::quiet
    std::map<uint64_t, sim::alloc_rec> live;
    std::atomic<int> faulted{0};
    std::atomic<int> kernels_running{0};
    std::string fault;  // under reg_mu
};

struct __attribute__((visibility("hidden"))) sim_stream {
    sim_device* dev = nullptr;
    std::mutex mu;
    std::condition_variable cv_work, cv_done;
    std::deque<sim::op> queue;
    uint64_t queued = 0, done = 0;
    bool stop = false;
    std::thread worker;
};

namespace sim {
struct event_state {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t latest = 0;            // generation of the latest record (0: never recorded)
    std::vector<uint64_t> pending;  // generations queued and not reached yet
    uint64_t time_ns = 0;           // host clock when `latest` was reached
    bool timed = false;             // time_ns belongs to `latest`
    bool done(uint64_t gen) const {
        for (uint64_t p : pending)
            if (p == gen) return false;
        return true;
    }
};
}  // namespace sim

struct __attribute__((visibility("hidden"))) sim_event {
    sim_device* dev = nullptr;
    int timing = 0;
    std::shared_ptr<sim::event_state> st;  // shared with queued records and waits
};
