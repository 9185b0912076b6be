// The simulated GPU's devices, streams, events and copies (sim_api.h). A stream is a worker thread
// draining a FIFO; events are the only synchronisation between streams (a mutex and condition
// variable per event), so a missing event wait is a real data race that TSan reports.
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include <algorithm>
#include <chrono>

#include "internal.h"

#if defined(SIM_TSAN)
#include <sanitizer/tsan_interface.h>
#endif

#if defined(SIM_TSAN)
extern "C" {
void AnnotateIgnoreSyncBegin(const char* file, int line);
void AnnotateIgnoreSyncEnd(const char* file, int line);
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif

namespace sim {
namespace {
thread_local std::string t_last_error;

uint64_t now_ns() {
    return (uint64_t)std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

void worker_main(sim_stream* s) {
    for (;;) {
        op o;
        {
            std::unique_lock<std::mutex> lk(s->mu);
            s->cv_work.wait(lk, [s] { return !s->queue.empty() || s->stop; });
            if (s->queue.empty()) break;
            o = std::move(s->queue.front());
            s->queue.pop_front();
        }
        // Relaxed: seeing another stream's fault must not order this stream after it.
        if (o.kind == OP_ALWAYS || !s->dev->faulted.load(std::memory_order_relaxed)) o.run();
        o.run = nullptr;  // free what the work captured before it counts as done
        {
            std::lock_guard<std::mutex> lk(s->mu);
            s->done++;
        }
        s->cv_done.notify_all();
    }
    exec_thread_exit();
}

void drain(sim_stream* s) {
    std::unique_lock<std::mutex> lk(s->mu);
    const uint64_t target = s->queued;
    s->cv_done.wait(lk, [s, target] { return s->done >= target; });
}

void stop_stream(sim_stream* s) {
    drain(s);
    {
        std::lock_guard<std::mutex> lk(s->mu);
        s->stop = true;
    }
    s->cv_work.notify_all();
    if (s->worker.joinable()) s->worker.join();
}

}  // namespace

int fail(int code, const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    const int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof buf) {
        std::string big((size_t)n + 1, '\0');
        va_start(ap, fmt);
        vsnprintf(&big[0], big.size(), fmt, ap);
        va_end(ap);
        big.resize((size_t)n);
        t_last_error = big;
    } else {
        t_last_error = buf;
    }
    return code;
}

#if defined(SIM_TSAN)
handle_sync::handle_sync(const void* handle) : h(handle) {
    if (h) __tsan_acquire(const_cast<void*>(h));
}
handle_sync::~handle_sync() {
    if (h) __tsan_release(const_cast<void*>(h));
}
#else
handle_sync::handle_sync(const void* handle) : h(handle) {}
handle_sync::~handle_sync() {}
#endif

#if defined(SIM_TSAN)
quiet::quiet() {
    AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
}
quiet::~quiet() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
    AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
}
#else
quiet::quiet() {}
quiet::~quiet() {}
#endif

int sticky_check(sim_device* d) {
    if (!d->faulted.load(std::memory_order_relaxed)) return SIM_OK;
    std::string m;
    {
        quiet q;
        std::lock_guard<std::mutex> lk(d->reg_mu);
        m = d->fault;
    }
    return fail(SIM_ERROR_STICKY, "%s", m.c_str());
}

void record_fault(sim_device* d, const std::string& message) {
    quiet q;
    std::lock_guard<std::mutex> lk(d->reg_mu);
    if (d->faulted.load(std::memory_order_relaxed)) return;
    d->fault = message;
    d->faulted.store(1, std::memory_order_relaxed);
}

int enqueue(sim_stream* s, int kind, std::function<void()> run) {
    {
        std::lock_guard<std::mutex> lk(s->mu);
        if (s->stop) return fail(SIM_ERROR_INVALID, "the stream is being destroyed");
        s->queue.push_back(op{kind, std::move(run)});
        s->queued++;
    }
    s->cv_work.notify_one();
    return SIM_OK;
}

}  // namespace sim

using namespace sim;

extern "C" {

const char* sim_last_error(void) { return t_last_error.c_str(); }

// ---- devices -------------------------------------------------------------------------------------

int sim_device_create(sim_device** out, uint64_t memory_bytes) {
    if (!out) return fail(SIM_ERROR_INVALID, "sim_device_create: null output");
    sim_device* d = new sim_device();
    d->capacity = memory_bytes ? memory_bytes : (16ull << 30);
    devices_add(d);
    SIM_HANDLE(d);  // released on return: the first use on another thread acquires it
    *out = d;
    return SIM_OK;
}

int sim_device_destroy(sim_device* dev) {
    SIM_HANDLE(dev);
    if (!dev) return fail(SIM_ERROR_INVALID, "sim_device_destroy: null device");
    devices_remove(dev);
    std::vector<sim_stream*> streams;
    std::vector<sim_event*> events;
    {
        std::lock_guard<std::mutex> lk(dev->mu);
        streams.swap(dev->streams);
        events.swap(dev->events);
    }
    for (sim_stream* s : streams) {
        stop_stream(s);
        delete s;
    }
    for (sim_event* e : events) delete e;
    mem_release_all(dev);
    delete dev;
    return SIM_OK;
}

int sim_device_memory(sim_device* dev, uint64_t* free_bytes, uint64_t* total_bytes) {
    SIM_HANDLE(dev);
    if (!dev || !free_bytes || !total_bytes) return fail(SIM_ERROR_INVALID, "sim_device_memory: null argument");
    if (int rc = sticky_check(dev)) return rc;
    const uint64_t used = dev->used.load(std::memory_order_relaxed);
    *total_bytes = dev->capacity;
    *free_bytes = used < dev->capacity ? dev->capacity - used : 0;
    return SIM_OK;
}

int sim_device_error(sim_device* dev) {
    SIM_HANDLE(dev);
    if (!dev) return fail(SIM_ERROR_INVALID, "sim_device_error: null device");
    return sticky_check(dev);
}

// ---- streams -------------------------------------------------------------------------------------

int sim_stream_create(sim_device* dev, sim_stream** out) {
    SIM_HANDLE(dev);
    if (!dev || !out) return fail(SIM_ERROR_INVALID, "sim_stream_create: null argument");
    if (int rc = sticky_check(dev)) return rc;
    sim_stream* s = new sim_stream();
    s->dev = dev;
    s->worker = std::thread(worker_main, s);
    {
        std::lock_guard<std::mutex> lk(dev->mu);
        dev->streams.push_back(s);
    }
    SIM_HANDLE(s);  // released on return: the first use on another thread acquires it
    *out = s;
    return SIM_OK;
}

int sim_stream_destroy(sim_stream* s) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_stream_destroy: null stream");
    {
        std::lock_guard<std::mutex> lk(s->dev->mu);
        auto& v = s->dev->streams;
        v.erase(std::remove(v.begin(), v.end(), s), v.end());
    }
    stop_stream(s);
    delete s;
    return SIM_OK;
}

int sim_stream_synchronize(sim_stream* s) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_stream_synchronize: null stream");
    drain(s);
    return sticky_check(s->dev);
}

int sim_stream_wait_event(sim_stream* s, sim_event* e) {
    SIM_HANDLE(s);
    SIM_HANDLE(e);
    if (!s || !e) return fail(SIM_ERROR_INVALID, "sim_stream_wait_event: null argument");
    if (int rc = sticky_check(s->dev)) return rc;
    std::shared_ptr<event_state> st = e->st;
    uint64_t gen;
    {
        std::lock_guard<std::mutex> lk(st->mu);
        gen = st->latest;
    }
    if (gen == 0) return SIM_OK;  // never recorded: complete
    return enqueue(s, OP_ALWAYS, [st, gen] {
        std::unique_lock<std::mutex> lk(st->mu);
        st->cv.wait(lk, [&] { return st->done(gen); });
    });
}

// ---- events --------------------------------------------------------------------------------------

int sim_event_create(sim_device* dev, sim_event** out, int timing) {
    SIM_HANDLE(dev);
    if (!dev || !out) return fail(SIM_ERROR_INVALID, "sim_event_create: null argument");
    if (int rc = sticky_check(dev)) return rc;
    sim_event* e = new sim_event();
    e->dev = dev;
    e->timing = timing;
    e->st = std::make_shared<event_state>();
    {
        std::lock_guard<std::mutex> lk(dev->mu);
        dev->events.push_back(e);
    }
    SIM_HANDLE(e);  // released on return: the first use on another thread acquires it
    *out = e;
    return SIM_OK;
}

int sim_event_destroy(sim_event* e) {
    SIM_HANDLE(e);
    if (!e) return fail(SIM_ERROR_INVALID, "sim_event_destroy: null event");
    {
        std::lock_guard<std::mutex> lk(e->dev->mu);
        auto& v = e->dev->events;
        v.erase(std::remove(v.begin(), v.end(), e), v.end());
    }
    delete e;  // queued records and waits keep the state alive
    return SIM_OK;
}

int sim_event_record(sim_event* e, sim_stream* s) {
    SIM_HANDLE(e);
    SIM_HANDLE(s);
    if (!e || !s) return fail(SIM_ERROR_INVALID, "sim_event_record: null argument");
    if (e->dev != s->dev) return fail(SIM_ERROR_INVALID, "sim_event_record: the event and the stream belong to different devices");
    if (int rc = sticky_check(s->dev)) return rc;
    std::shared_ptr<event_state> st = e->st;
    uint64_t gen;
    {
        std::lock_guard<std::mutex> lk(st->mu);
        gen = ++st->latest;
        st->pending.push_back(gen);
        st->timed = false;
    }
    return enqueue(s, OP_ALWAYS, [st, gen] {
        const uint64_t t = now_ns();
        {
            std::lock_guard<std::mutex> lk(st->mu);
            st->pending.erase(std::remove(st->pending.begin(), st->pending.end(), gen), st->pending.end());
            if (gen == st->latest) {
                st->time_ns = t;
                st->timed = true;
            }
        }
        st->cv.notify_all();
    });
}

int sim_event_query(sim_event* e) {
    SIM_HANDLE(e);
    if (!e) return fail(SIM_ERROR_INVALID, "sim_event_query: null event");
    if (int rc = sticky_check(e->dev)) return rc;
    std::lock_guard<std::mutex> lk(e->st->mu);
    if (e->st->latest == 0 || e->st->done(e->st->latest)) return SIM_OK;
    t_last_error = "sim_event_query: not ready";
    return SIM_NOT_READY;
}

int sim_event_synchronize(sim_event* e) {
    SIM_HANDLE(e);
    if (!e) return fail(SIM_ERROR_INVALID, "sim_event_synchronize: null event");
    {
        std::unique_lock<std::mutex> lk(e->st->mu);
        const uint64_t gen = e->st->latest;
        if (gen) e->st->cv.wait(lk, [&] { return e->st->done(gen); });
    }
    return sticky_check(e->dev);
}

int sim_event_elapsed_ms(float* ms, sim_event* start, sim_event* end) {
    SIM_HANDLE(start);
    SIM_HANDLE(end);
    if (!ms || !start || !end) return fail(SIM_ERROR_INVALID, "sim_event_elapsed_ms: null argument");
    if (int rc = sticky_check(start->dev)) return rc;
    if (int rc = sticky_check(end->dev)) return rc;
    if (!start->timing || !end->timing)
        return fail(SIM_ERROR_INVALID, "sim_event_elapsed_ms: an event was created without timing");
    uint64_t t[2];
    sim_event* ev[2] = {start, end};
    for (int i = 0; i < 2; i++) {
        std::lock_guard<std::mutex> lk(ev[i]->st->mu);
        const event_state& st = *ev[i]->st;
        if (st.latest == 0)
            return fail(SIM_ERROR_INVALID, "sim_event_elapsed_ms: the %s event was never recorded", i ? "end" : "start");
        if (!st.done(st.latest) || !st.timed) {
            t_last_error = "sim_event_elapsed_ms: an event has not completed";
            return SIM_NOT_READY;
        }
        t[i] = st.time_ns;
    }
    *ms = (float)(((double)t[1] - (double)t[0]) / 1e6);
    return SIM_OK;
}

// ---- memory --------------------------------------------------------------------------------------

int sim_malloc_async(sim_stream* s, uint64_t bytes, uint64_t* out_ptr) {
    SIM_HANDLE(s);
    if (!s || !out_ptr) return fail(SIM_ERROR_INVALID, "sim_malloc_async: null argument");
    if (int rc = sticky_check(s->dev)) return rc;
    return mem_alloc(s->dev, bytes, out_ptr);
}

int sim_free_async(sim_stream* s, uint64_t ptr) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_free_async: null stream");
    if (int rc = sticky_check(s->dev)) return rc;
    if (ptr == 0) return SIM_OK;
    if (int rc = mem_mark_free(s->dev, ptr)) return rc;
    sim_device* d = s->dev;
    return enqueue(s, OP_ALWAYS, [d, ptr] { mem_release(d, ptr); });
}

int sim_memcpy_htod_async(sim_stream* s, uint64_t dst, const void* src, uint64_t bytes) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_memcpy_htod_async: null stream");
    if (int rc = sticky_check(s->dev)) return rc;
    if (bytes == 0) return SIM_OK;
    if (!src) return fail(SIM_ERROR_INVALID, "sim_memcpy_htod_async: null host pointer");
    if (int rc = mem_check_range(s->dev, dst, bytes, "sim_memcpy_htod_async destination")) return rc;
    return enqueue(s, OP_WORK, [dst, src, bytes] { memcpy(reinterpret_cast<void*>(dst), src, bytes); });
}

int sim_memcpy_dtoh_async(sim_stream* s, void* dst, uint64_t src, uint64_t bytes) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_memcpy_dtoh_async: null stream");
    if (int rc = sticky_check(s->dev)) return rc;
    if (bytes == 0) return SIM_OK;
    if (!dst) return fail(SIM_ERROR_INVALID, "sim_memcpy_dtoh_async: null host pointer");
    if (int rc = mem_check_range(s->dev, src, bytes, "sim_memcpy_dtoh_async source")) return rc;
    return enqueue(s, OP_WORK, [dst, src, bytes] { memcpy(dst, reinterpret_cast<const void*>(src), bytes); });
}

int sim_memcpy_dtod_async(sim_stream* s, uint64_t dst, uint64_t src, uint64_t bytes) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_memcpy_dtod_async: null stream");
    if (int rc = sticky_check(s->dev)) return rc;
    if (bytes == 0) return SIM_OK;
    if (int rc = mem_check_range(s->dev, dst, bytes, "sim_memcpy_dtod_async destination")) return rc;
    if (int rc = mem_check_range(s->dev, src, bytes, "sim_memcpy_dtod_async source")) return rc;
    // memmove: an overlapping device-to-device copy is the caller's bug, but not a crash here.
    return enqueue(s, OP_WORK, [dst, src, bytes] {
        memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    });
}

int sim_memset_d8_async(sim_stream* s, uint64_t dst, uint8_t value, uint64_t bytes) {
    SIM_HANDLE(s);
    if (!s) return fail(SIM_ERROR_INVALID, "sim_memset_d8_async: null stream");
    if (int rc = sticky_check(s->dev)) return rc;
    if (bytes == 0) return SIM_OK;
    if (int rc = mem_check_range(s->dev, dst, bytes, "sim_memset_d8_async destination")) return rc;
    return enqueue(s, OP_WORK, [dst, value, bytes] { memset(reinterpret_cast<void*>(dst), value, bytes); });
}

}  // extern "C"
