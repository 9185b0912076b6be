// A minimal test harness for the simulator's self-tests: registered cases, CHECK macros that
// report and count failures, helpers around the sim_api.h calls, and running a case in a child
// process (planted bugs that a sanitizer must report, which ends or taints the process).
#pragma once
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <chrono>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "sim/sim_api.h"

#if defined(__SANITIZE_ADDRESS__)
#define FLAVOR_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define FLAVOR_TSAN 1
#endif

namespace harness {

struct test_case {
    const char* name;
    void (*fn)();
    bool child;  // run only as `--child name`
};
inline std::vector<test_case>& cases() {
    static std::vector<test_case> v;
    return v;
}
struct registrar {
    registrar(const char* name, void (*fn)(), bool child) { cases().push_back({name, fn, child}); }
};
inline int& failures() {
    static int n = 0;
    return n;
}
inline const char*& argv0() {
    static const char* p = nullptr;
    return p;
}

inline void report(const char* file, int line, const std::string& what) {
    fprintf(stderr, "  FAILED %s:%d: %s\n", file, line, what.c_str());
    failures()++;
}

// Runs `selftest --child name` with stderr captured: its exit status and output.
inline int run_child(const char* name, std::string* output) {
    char path[] = "/tmp/sim_child_XXXXXX";
    const int fd = mkstemp(path);
    if (fd < 0) return -1;
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, fd, 2);
    posix_spawn_file_actions_adddup2(&fa, fd, 1);
    char* args[] = {const_cast<char*>(argv0()), const_cast<char*>("--child"), const_cast<char*>(name), nullptr};
    pid_t pid = 0;
    int rc = posix_spawn(&pid, argv0(), &fa, nullptr, args, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(fd);
    int status = 0;
    if (rc == 0) waitpid(pid, &status, 0);
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    *output = ss.str();
    unlink(path);
    if (rc != 0) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

}  // namespace harness

#define SIM_TEST(name)                                                                              \
    static void name();                                                                             \
    static harness::registrar reg_##name(#name, name, false);                                       \
    static void name()
#define SIM_CHILD(name)                                                                             \
    static void name();                                                                             \
    static harness::registrar reg_##name(#name, name, true);                                        \
    static void name()

#define CHECK(cond)                                                                                 \
    do {                                                                                            \
        if (!(cond)) harness::report(__FILE__, __LINE__, #cond);                                    \
    } while (0)
#define CHECK_MSG(cond, ...)                                                                        \
    do {                                                                                            \
        if (!(cond)) {                                                                              \
            char buf_[512];                                                                         \
            snprintf(buf_, sizeof buf_, __VA_ARGS__);                                               \
            harness::report(__FILE__, __LINE__, std::string(#cond) + ": " + buf_);                  \
        }                                                                                           \
    } while (0)
// A sim call that must return `want`; on a mismatch prints sim_last_error().
#define CHECK_RC(call, want)                                                                        \
    do {                                                                                            \
        const int rc_ = (call);                                                                     \
        if (rc_ != (want))                                                                          \
            harness::report(__FILE__, __LINE__,                                                     \
                            std::string(#call) + " returned " + std::to_string(rc_) + ", wanted " + \
                                std::to_string(want) + " (" + sim_last_error() + ")");              \
    } while (0)
#define OK(call) CHECK_RC(call, SIM_OK)
// The last error must mention `text`.
#define CHECK_ERROR_HAS(text)                                                                       \
    CHECK_MSG(strstr(sim_last_error(), text) != nullptr, "last error is \"%s\"", sim_last_error())

// ---- sim helpers ---------------------------------------------------------------------------------

// A device with one stream, destroyed at scope exit.
struct gpu {
    sim_device* dev = nullptr;
    sim_stream* s = nullptr;
    explicit gpu(uint64_t bytes = 0) {
        OK(sim_device_create(&dev, bytes));
        OK(sim_stream_create(dev, &s));
    }
    ~gpu() { sim_device_destroy(dev); }
    gpu(const gpu&) = delete;
    gpu& operator=(const gpu&) = delete;

    uint64_t alloc(uint64_t bytes) {
        uint64_t p = 0;
        OK(sim_malloc_async(s, bytes, &p));
        return p;
    }
    template <typename T> uint64_t upload(const std::vector<T>& v) {
        const uint64_t p = alloc(v.size() * sizeof(T));
        OK(sim_memcpy_htod_async(s, p, v.data(), v.size() * sizeof(T)));
        OK(sim_stream_synchronize(s));  // the copy reads `v` when the stream reaches it
        return p;
    }
    template <typename T> std::vector<T> download(uint64_t p, size_t n) {
        std::vector<T> v(n);
        OK(sim_memcpy_dtoh_async(s, v.data(), p, n * sizeof(T)));
        OK(sim_stream_synchronize(s));
        return v;
    }
};

// Packs arguments the way cuLaunchKernel gets them, with their sizes.
struct args {
    std::vector<std::vector<unsigned char>> store;
    std::vector<void*> ptrs;
    std::vector<uint16_t> sizes;
    template <typename... A> explicit args(A... a) { (add(a), ...); }
    template <typename T> void add(T v) {
        store.emplace_back(sizeof(T));
        memcpy(store.back().data(), &v, sizeof(T));
        sizes.push_back((uint16_t)sizeof(T));
    }
    void* const* p() {
        ptrs.clear();
        for (auto& s : store) ptrs.push_back(s.data());
        return ptrs.data();
    }
    int n() const { return (int)sizes.size(); }
};

inline int launch(sim_stream* s, const char* name, std::array<uint32_t, 3> grid, std::array<uint32_t, 3> block,
                  args a, uint32_t dyn = 0) {
    return sim_launch(s, name, grid.data(), block.data(), dyn, a.p(), a.sizes.data(), a.n());
}

inline double now_ms() {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The harness's main: runs every case (or those named on the command line), or one child case.
inline int harness_main(int argc, char** argv) {
    harness::argv0() = argv[0];
    if (argc == 3 && strcmp(argv[1], "--child") == 0) {
        for (auto& c : harness::cases())
            if (strcmp(c.name, argv[2]) == 0) {
                c.fn();
                return harness::failures() ? 1 : 0;
            }
        fprintf(stderr, "no child case %s\n", argv[2]);
        return 2;
    }
    const double t0 = now_ms();
    int run = 0;
    for (auto& c : harness::cases()) {
        if (c.child) continue;
        bool wanted = argc == 1;
        for (int i = 1; i < argc; i++) wanted |= strstr(c.name, argv[i]) != nullptr;
        if (!wanted) continue;
        const int before = harness::failures();
        const double t = now_ms();
        c.fn();
        fprintf(stderr, "%s %-36s %8.1f ms\n", harness::failures() == before ? "ok  " : "FAIL", c.name, now_ms() - t);
        run++;
    }
    fprintf(stderr, "%d cases, %d failed checks, %.1f s\n", run, harness::failures(), (now_ms() - t0) / 1000);
    return harness::failures() ? 1 : 0;
}
