// Self-tests of the runtime around the kernels: launch refusals and parameter checks, events across
// streams, stream-ordered memory and its validation, guard bytes, sticky errors, independent
// devices, and the planted bugs a sanitizer must report (a write past an allocation under ASan, a
// missing event wait between streams under TSan), run in child processes.
#include <math.h>

#include "harness.h"

namespace {

SIM_TEST(kernel_table) {
    CHECK(sim_kernel_count() == 33);
    CHECK(sim_kernel_name(0) && strcmp(sim_kernel_name(0), "barrier_order") == 0);
    CHECK(sim_kernel_name(33) == nullptr && sim_kernel_name(-1) == nullptr);
    sim_kernel_resources r{};
    OK(sim_kernel_resources_of("res_mid_static", &r));
    CHECK(r.registers == 16 && r.static_smem_bytes == 40000 && strcmp(r.name, "res_mid_static") == 0);
    OK(sim_kernel_resources_of("fill_value", &r));
    CHECK(r.registers == 0 && r.static_smem_bytes == 0 && r.spill_bytes == 0);
    CHECK_RC(sim_kernel_resources_of("no_such_kernel", &r), SIM_ERROR_INVALID);
    CHECK_ERROR_HAS("no_such_kernel");
}

SIM_TEST(launch_refusals) {
    gpu g;
    const uint64_t p = g.alloc(16);
    auto fill = [&](std::array<uint32_t, 3> grid, std::array<uint32_t, 3> block, uint32_t dyn = 0) {
        return launch(g.s, "fill_value", grid, block, args(p, 0, 1.0f), dyn);
    };
    CHECK_RC(fill({1, 1, 1}, {1025, 1, 1}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({1, 1, 1}, {1, 1025, 1}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({1, 1, 1}, {1, 1, 65}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({1, 1, 1}, {32, 32, 2}), SIM_ERROR_LAUNCH);
    CHECK_ERROR_HAS("fill_value");
    CHECK_RC(fill({1, 1, 1}, {0, 1, 1}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({1, 0, 1}, {1, 1, 1}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({0x80000000u, 1, 1}, {1, 1, 1}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({1, 65536, 1}, {1, 1, 1}), SIM_ERROR_LAUNCH);
    CHECK_RC(fill({1, 1, 65536}, {1, 1, 1}), SIM_ERROR_LAUNCH);
    OK(fill({1, 1, 1}, {1024, 1, 1}));
    OK(fill({1, 1, 1}, {16, 16, 4}));
    OK(fill({1, 3000, 1}, {1, 1, 1}));
    // Dynamic shared memory: 48 KiB without the opt-in, up to the opt-in after it, never past 227 KiB.
    OK(fill({1, 1, 1}, {32, 1, 1}, 48 * 1024));
    CHECK_RC(fill({1, 1, 1}, {32, 1, 1}, 48 * 1024 + 1), SIM_ERROR_LAUNCH);
    CHECK_RC(sim_kernel_set_max_dynamic_smem(g.dev, "fill_value", 227 * 1024 + 1), SIM_ERROR_INVALID);
    OK(sim_kernel_set_max_dynamic_smem(g.dev, "fill_value", 200 * 1024));
    OK(fill({1, 1, 1}, {32, 1, 1}, 200 * 1024));
    CHECK_RC(fill({1, 1, 1}, {32, 1, 1}, 200 * 1024 + 1), SIM_ERROR_LAUNCH);
    CHECK_RC(sim_kernel_set_max_dynamic_smem(g.dev, "no_such_kernel", 1024), SIM_ERROR_INVALID);
    // Static shared memory and registers from the resource table.
    CHECK_RC(launch(g.s, "res_big_static", {1, 1, 1}, {32, 1, 1}, args()), SIM_ERROR_LAUNCH);
    CHECK_ERROR_HAS("50000 bytes of static shared memory");
    OK(launch(g.s, "res_mid_static", {1, 1, 1}, {32, 1, 1}, args(), 48 * 1024 - 40000));
    CHECK_RC(launch(g.s, "res_mid_static", {1, 1, 1}, {32, 1, 1}, args(), 48 * 1024 - 40000 + 1), SIM_ERROR_LAUNCH);
    CHECK_RC(sim_kernel_set_max_dynamic_smem(g.dev, "res_mid_static", 227 * 1024 - 40000 + 1), SIM_ERROR_INVALID);
    OK(sim_kernel_set_max_dynamic_smem(g.dev, "res_mid_static", 227 * 1024 - 40000));
    OK(launch(g.s, "res_mid_static", {1, 1, 1}, {32, 1, 1}, args(), 227 * 1024 - 40000));
    OK(launch(g.s, "res_many_registers", {1, 1, 1}, {512, 1, 1}, args()));
    CHECK_RC(launch(g.s, "res_many_registers", {1, 1, 1}, {513, 1, 1}, args()), SIM_ERROR_LAUNCH);
    CHECK_ERROR_HAS("128 registers x 513 threads");
    // Opt-ins are per device.
    gpu other;
    CHECK_RC(launch(other.s, "res_mid_static", {1, 1, 1}, {32, 1, 1}, args(), 10000), SIM_ERROR_LAUNCH);
    CHECK_RC(launch(g.s, "no_such_kernel", {1, 1, 1}, {1, 1, 1}, args()), SIM_ERROR_INVALID);
    CHECK_ERROR_HAS("unknown kernel no_such_kernel");
    OK(sim_stream_synchronize(g.s));
}

SIM_TEST(parameters_checked_and_copied) {
    gpu g;
    const uint64_t out = g.alloc(5 * 8);
    const uint64_t p = g.upload(std::vector<float>{2.5f});
    OK(launch(g.s, "params_mixed", {1, 1, 1}, {32, 1, 1}, args(out, 7, 1.5, p, (int64_t)1 << 40, (uint16_t)65535)));
    std::vector<double> v = g.download<double>(out, 5);
    CHECK(v[0] == 7 && v[1] == 1.5 && v[2] == 2.5 && v[3] == (double)(1LL << 40) && v[4] == 65535);
    CHECK_RC(launch(g.s, "params_mixed", {1, 1, 1}, {32, 1, 1}, args(out, 7, 1.5, p, (int64_t)1)), SIM_ERROR_INVALID);
    CHECK_ERROR_HAS("5 parameters given, the kernel takes 6");
    CHECK_RC(launch(g.s, "params_mixed", {1, 1, 1}, {32, 1, 1}, args(out, 7, 1.5f, p, (int64_t)1, (uint16_t)1)),
             SIM_ERROR_INVALID);
    CHECK_ERROR_HAS("params_mixed");
    CHECK_ERROR_HAS("parameter 2 is 4 bytes, the kernel's is 8 bytes");
    // The values are copied when the launch is queued: changing them afterwards changes nothing.
    OK(launch(g.s, "sleep_ms", {1, 1, 1}, {1, 1, 1}, args(50)));
    int a = 11;
    void* ptrs[6];
    double b = 3.0;
    int64_t c = 5;
    uint16_t e = 9;
    ptrs[0] = (void*)&out;
    ptrs[1] = &a;
    ptrs[2] = &b;
    ptrs[3] = (void*)&p;
    ptrs[4] = &c;
    ptrs[5] = &e;
    const uint16_t sizes[6] = {8, 4, 8, 8, 8, 2};
    const uint32_t one[3] = {1, 1, 1};
    OK(sim_launch(g.s, "params_mixed", one, one, 0, ptrs, sizes, 6));
    a = 99;
    b = 99.0;
    v = g.download<double>(out, 5);
    CHECK(v[0] == 11 && v[1] == 3.0);
}

SIM_TEST(fresh_memory_reads_as_nan) {
    gpu g;
    const uint64_t p = g.alloc(1000);
    const std::vector<uint8_t> v = g.download<uint8_t>(p, 1000);
    bool all = true;
    for (uint8_t x : v) all &= x == 0xff;
    CHECK(all);
    CHECK(p % 256 == 0);
    uint64_t z = 1;
    OK(sim_malloc_async(g.s, 0, &z));
    CHECK(z == 0);
    OK(sim_free_async(g.s, 0));
}

// ---- events --------------------------------------------------------------------------------------

SIM_TEST(events_order_two_streams) {
    gpu g;
    sim_stream* b = nullptr;
    OK(sim_stream_create(g.dev, &b));
    const int n = 4096;
    const uint64_t x = g.alloc(n * 4), y = g.alloc(n * 4);
    sim_event* e = nullptr;
    OK(sim_event_create(g.dev, &e, 0));
    // Stream a is slow to write x; stream b copies x only after the event.
    OK(launch(g.s, "sleep_ms", {1, 1, 1}, {1, 1, 1}, args(100)));
    OK(launch(g.s, "fill_value", {16, 1, 1}, {256, 1, 1}, args(x, n, 7.0f)));
    OK(sim_event_record(e, g.s));
    CHECK_RC(sim_event_query(e), SIM_NOT_READY);
    OK(sim_stream_wait_event(b, e));
    OK(launch(b, "copy_values", {16, 1, 1}, {256, 1, 1}, args(y, x, n)));
    std::vector<float> v(n);
    OK(sim_memcpy_dtoh_async(b, v.data(), y, n * 4));
    OK(sim_stream_synchronize(b));
    int wrong = 0;
    for (float f : v) wrong += f != 7.0f;
    CHECK_MSG(wrong == 0, "%d values copied before they were written", wrong);
    OK(sim_event_query(e));
    OK(sim_event_synchronize(e));
    OK(sim_event_destroy(e));
    OK(sim_stream_destroy(b));
}

SIM_TEST(event_timing_and_states) {
    gpu g;
    sim_event *start = nullptr, *end = nullptr, *plain = nullptr, *never = nullptr;
    OK(sim_event_create(g.dev, &start, 1));
    OK(sim_event_create(g.dev, &end, 1));
    OK(sim_event_create(g.dev, &plain, 0));
    OK(sim_event_create(g.dev, &never, 1));
    // Never recorded: complete for query, synchronize and waits; no time.
    OK(sim_event_query(never));
    OK(sim_event_synchronize(never));
    OK(sim_stream_wait_event(g.s, never));
    float ms = -1;
    OK(sim_event_record(start, g.s));
    OK(launch(g.s, "sleep_ms", {1, 1, 1}, {1, 1, 1}, args(60)));
    OK(sim_event_record(end, g.s));
    OK(sim_event_record(plain, g.s));
    CHECK_RC(sim_event_query(end), SIM_NOT_READY);
    CHECK_RC(sim_event_elapsed_ms(&ms, start, end), SIM_NOT_READY);
    OK(sim_event_synchronize(end));
    OK(sim_event_elapsed_ms(&ms, start, end));
    CHECK_MSG(ms >= 55.0f && ms < 5000.0f, "elapsed %g ms", ms);
    CHECK_RC(sim_event_elapsed_ms(&ms, start, plain), SIM_ERROR_INVALID);
    CHECK_RC(sim_event_elapsed_ms(&ms, start, never), SIM_ERROR_INVALID);
    // A later record replaces the capture: re-recorded on an idle stream, the event completes
    // although the first stream is still busy.
    sim_stream* idle = nullptr;
    OK(sim_stream_create(g.dev, &idle));
    OK(launch(g.s, "sleep_ms", {1, 1, 1}, {1, 1, 1}, args(300)));
    OK(sim_event_record(plain, g.s));
    OK(sim_event_record(plain, idle));
    OK(sim_stream_synchronize(idle));
    OK(sim_event_query(plain));
    CHECK_RC(sim_event_query(end), SIM_OK);
    OK(sim_stream_destroy(idle));
    for (sim_event* e : {start, end, plain, never}) OK(sim_event_destroy(e));
}

// ---- memory --------------------------------------------------------------------------------------

SIM_TEST(stream_ordered_memory) {
    gpu g(1 << 20);
    uint64_t free_b = 0, total = 0;
    OK(sim_device_memory(g.dev, &free_b, &total));
    CHECK(total == 1 << 20 && free_b == total);
    const uint64_t a = g.alloc(600 << 10);
    uint64_t b = 0;
    CHECK_RC(sim_malloc_async(g.s, 600 << 10, &b), SIM_ERROR_MEMORY);
    CHECK_ERROR_HAS("out of device memory");
    // Validation when queued.
    std::vector<uint8_t> host(64);
    CHECK_RC(sim_memcpy_htod_async(g.s, a + (600 << 10) - 32, host.data(), 64), SIM_ERROR_MEMORY);
    CHECK_ERROR_HAS("runs past the end of the allocation of 614400 bytes");
    CHECK_RC(sim_memcpy_dtoh_async(g.s, host.data(), 0x1000, 64), SIM_ERROR_MEMORY);
    CHECK_ERROR_HAS("not inside a live allocation");
    CHECK_RC(sim_memset_d8_async(g.s, a - 8, 0, 16), SIM_ERROR_MEMORY);
    OK(sim_memcpy_dtod_async(g.s, a + 64, a, 64));
    OK(sim_memset_d8_async(g.s, a, 3, 600 << 10));
    // Freed when the stream reaches the free, not before.
    OK(launch(g.s, "sleep_ms", {1, 1, 1}, {1, 1, 1}, args(80)));
    OK(sim_free_async(g.s, a));
    OK(sim_device_memory(g.dev, &free_b, &total));
    CHECK(free_b == (1 << 20) - (600 << 10));
    CHECK_RC(sim_free_async(g.s, a), SIM_ERROR_MEMORY);
    CHECK_ERROR_HAS("already being freed");
    CHECK_RC(sim_memcpy_htod_async(g.s, a, host.data(), 64), SIM_ERROR_MEMORY);
    CHECK_ERROR_HAS("free is already queued");
    OK(sim_stream_synchronize(g.s));
    OK(sim_device_memory(g.dev, &free_b, &total));
    CHECK(free_b == 1 << 20);
    const uint64_t c = g.alloc(600 << 10);
    CHECK_RC(sim_free_async(g.s, c + 8), SIM_ERROR_MEMORY);
    CHECK_ERROR_HAS("not the start of a live allocation");
    OK(sim_free_async(g.s, c));
    OK(sim_stream_synchronize(g.s));
}

// Copies between devices (the local transport's peer copies) validate against either device.
SIM_TEST(copies_between_devices) {
    gpu a, b;
    const uint64_t x = a.upload(std::vector<float>{1, 2, 3, 4});
    const uint64_t y = b.alloc(16);
    OK(sim_stream_synchronize(a.s));
    OK(sim_memcpy_dtod_async(b.s, y, x, 16));
    const std::vector<float> v = b.download<float>(y, 4);
    CHECK(v[0] == 1 && v[3] == 4);
}

// ---- faults and sticky errors --------------------------------------------------------------------

#if !defined(FLAVOR_ASAN)
SIM_TEST(guard_bytes_catch_a_write_past_the_end) {
    gpu g;
    const int n = 1000;
    const uint64_t p = g.alloc(n * 4), other = g.alloc(64);
    OK(launch(g.s, "write_past_end", {4, 1, 1}, {256, 1, 1}, args(p, n)));
    // Queued after the fault: skipped, so the host buffer keeps its bytes.
    OK(sim_memset_d8_async(g.s, other, 0x22, 64));
    std::vector<uint8_t> host(64, 0x11);
    OK(sim_memcpy_dtoh_async(g.s, host.data(), other, 64));
    CHECK_RC(sim_stream_synchronize(g.s), SIM_ERROR_STICKY);
    CHECK_ERROR_HAS("kernel write_past_end (grid (4,1,1), block (256,1,1))");
    CHECK_ERROR_HAS("allocation of 4000 bytes");
    CHECK_ERROR_HAS("offset 4000 (past its end)");
    CHECK(host[0] == 0x11 && host[63] == 0x11);
}
#endif

SIM_TEST(sticky_errors) {
    gpu g, healthy;
    const uint64_t out = g.alloc(32 * 4);
    OK(launch(g.s, "partial_mask", {1, 1, 1}, {32, 1, 1}, args(out)));
    CHECK_RC(sim_stream_synchronize(g.s), SIM_ERROR_STICKY);
    const std::string first = sim_last_error();
    CHECK(first.find("kernel partial_mask") != std::string::npos);
    uint64_t p = 0, f = 0, t = 0;
    sim_stream* s2 = nullptr;
    sim_event* e = nullptr;
    CHECK_RC(sim_malloc_async(g.s, 16, &p), SIM_ERROR_STICKY);
    CHECK(first == sim_last_error());
    CHECK_RC(launch(g.s, "fill_value", {1, 1, 1}, {1, 1, 1}, args(out, 1, 1.0f)), SIM_ERROR_STICKY);
    CHECK_RC(sim_memset_d8_async(g.s, out, 0, 4), SIM_ERROR_STICKY);
    CHECK_RC(sim_stream_create(g.dev, &s2), SIM_ERROR_STICKY);
    CHECK_RC(sim_event_create(g.dev, &e, 0), SIM_ERROR_STICKY);
    CHECK_RC(sim_device_memory(g.dev, &f, &t), SIM_ERROR_STICKY);
    CHECK_RC(sim_device_error(g.dev), SIM_ERROR_STICKY);
    CHECK_RC(sim_stream_synchronize(g.s), SIM_ERROR_STICKY);
    CHECK(first == sim_last_error());
    // Another device is untouched.
    OK(sim_device_error(healthy.dev));
    const uint64_t q = healthy.alloc(4);
    OK(launch(healthy.s, "fill_value", {1, 1, 1}, {32, 1, 1}, args(q, 1, 5.0f)));
    CHECK(healthy.download<float>(q, 1)[0] == 5.0f);
}

// ---- planted bugs for the sanitizers (child processes) -------------------------------------------

SIM_CHILD(child_write_past_end) {
    gpu g;
    const uint64_t p = g.alloc(1000 * 4);
    OK(launch(g.s, "write_past_end", {4, 1, 1}, {256, 1, 1}, args(p, 1000)));
    sim_stream_synchronize(g.s);
}

// Stream a writes x, stream b reads it: with `wait` 0 nothing orders them.
void two_streams(bool wait) {
    gpu g;
    sim_stream* b = nullptr;
    OK(sim_stream_create(g.dev, &b));
    const int n = 1024;
    const uint64_t x = g.alloc(n * 4), y = g.alloc(n * 4);
    OK(sim_stream_synchronize(g.s));
    sim_event* e = nullptr;
    OK(sim_event_create(g.dev, &e, 0));
    OK(launch(g.s, "fill_value", {4, 1, 1}, {256, 1, 1}, args(x, n, 3.0f)));
    OK(sim_event_record(e, g.s));
    if (wait) OK(sim_stream_wait_event(b, e));
    OK(launch(b, "copy_values", {4, 1, 1}, {256, 1, 1}, args(y, x, n)));
    OK(sim_stream_synchronize(b));
    OK(sim_stream_synchronize(g.s));
    OK(sim_event_destroy(e));
}
SIM_CHILD(child_streams_without_wait) { two_streams(false); }
SIM_CHILD(child_streams_with_wait) { two_streams(true); }

#if defined(FLAVOR_ASAN)
SIM_TEST(asan_reports_a_write_past_the_end) {
    std::string out;
    const int rc = harness::run_child("child_write_past_end", &out);
    CHECK_MSG(rc != 0 && out.find("AddressSanitizer: heap-buffer-overflow") != std::string::npos &&
                  out.find("write_past_end") != std::string::npos,
              "exit %d, output:\n%s", rc, out.c_str());
}
#endif

#if defined(FLAVOR_TSAN)
SIM_TEST(tsan_reports_a_missing_event_wait) {
    std::string out;
    int rc = harness::run_child("child_streams_without_wait", &out);
    CHECK_MSG(rc != 0 && out.find("ThreadSanitizer: data race") != std::string::npos &&
                  out.find("fill_value") != std::string::npos && out.find("copy_values") != std::string::npos,
              "exit %d, output:\n%s", rc, out.c_str());
    rc = harness::run_child("child_streams_with_wait", &out);
    CHECK_MSG(rc == 0 && out.find("ThreadSanitizer") == std::string::npos, "exit %d, output:\n%s", rc, out.c_str());
}
#endif

}  // namespace

int main(int argc, char** argv) { return harness_main(argc, argv); }
