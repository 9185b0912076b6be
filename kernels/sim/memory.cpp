// Device memory: every allocation is its own heap block, filled with 0xFF (NaN in f32 and bf16),
// 256-byte aligned as cuMemAlloc's, with guard bytes around it outside ASan builds that are checked
// after every kernel. The per-device registry answers queue-time range checks. Worker threads use
// it only inside sim::quiet, so under TSan it never orders two streams.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

namespace sim {
namespace {

constexpr size_t kAlign = 256;
constexpr size_t kGuard = 64;

struct guard_pattern {
    unsigned char b[kGuard];
    constexpr guard_pattern() : b() {
        for (size_t i = 0; i < kGuard; i++) b[i] = (unsigned char)(0xc3 ^ (i * 37));
    }
};
constexpr guard_pattern kPattern{};

std::mutex g_devices_mu;  // host side only
std::vector<sim_device*>* g_devices = nullptr;

bool inside(const std::map<uint64_t, alloc_rec>& live, uint64_t ptr, uint64_t* base_out, const alloc_rec** rec_out) {
    auto it = live.upper_bound(ptr);
    if (it == live.begin()) return false;
    --it;
    *base_out = it->first;
    *rec_out = &it->second;
    return ptr - it->first < it->second.size;
}

#if !defined(SIM_ASAN)
// Offset (relative to the allocation's start) of the first damaged guard byte, or false.
bool damaged(uint64_t user, uint64_t size, int64_t* offset) {
    const unsigned char* front = reinterpret_cast<const unsigned char*>(user) - kGuard;
    const unsigned char* back = reinterpret_cast<const unsigned char*>(user) + size;
    if (memcmp(front, kPattern.b, kGuard) != 0) {
        for (size_t i = 0; i < kGuard; i++)
            if (front[i] != kPattern.b[i]) {
                *offset = (int64_t)i - (int64_t)kGuard;
                return true;
            }
    }
    if (memcmp(back, kPattern.b, kGuard) != 0) {
        for (size_t i = 0; i < kGuard; i++)
            if (back[i] != kPattern.b[i]) {
                *offset = (int64_t)(size + i);
                return true;
            }
    }
    return false;
}
#endif

}  // namespace

void devices_add(sim_device* d) {
    std::lock_guard<std::mutex> lk(g_devices_mu);
    if (!g_devices) g_devices = new std::vector<sim_device*>();
    g_devices->push_back(d);
}

void devices_remove(sim_device* d) {
    std::lock_guard<std::mutex> lk(g_devices_mu);
    if (!g_devices) return;
    for (size_t i = 0; i < g_devices->size(); i++)
        if ((*g_devices)[i] == d) {
            g_devices->erase(g_devices->begin() + (long)i);
            break;
        }
}

int mem_alloc(sim_device* d, uint64_t bytes, uint64_t* out) {
    *out = 0;
    if (bytes == 0) return SIM_OK;
    uint64_t used = d->used.load(std::memory_order_relaxed);
    do {
        if (bytes > d->capacity - used)
            return fail(SIM_ERROR_MEMORY, "out of device memory: %llu bytes requested, %llu of %llu free",
                        (unsigned long long)bytes, (unsigned long long)(d->capacity - used),
                        (unsigned long long)d->capacity);
    } while (!d->used.compare_exchange_weak(used, used + bytes, std::memory_order_relaxed));
    void* block = nullptr;
#if defined(SIM_ASAN)
    const int rc = posix_memalign(&block, kAlign, bytes);  // ASan's redzones guard it
    unsigned char* user = static_cast<unsigned char*>(block);
#else
    const int rc = bytes > SIZE_MAX - kAlign - kGuard ? 1 : posix_memalign(&block, kAlign, kAlign + bytes + kGuard);
    unsigned char* user = static_cast<unsigned char*>(block) + kAlign;
#endif
    if (rc != 0 || !block) {
        d->used.fetch_sub(bytes, std::memory_order_relaxed);
        return fail(SIM_ERROR_MEMORY, "host allocation of %llu bytes for the simulated device failed",
                    (unsigned long long)bytes);
    }
#if !defined(SIM_ASAN)
    memcpy(user - kGuard, kPattern.b, kGuard);
    memcpy(user + bytes, kPattern.b, kGuard);
#endif
    memset(user, 0xff, bytes);
    {
        quiet q;
        std::lock_guard<std::mutex> lk(d->reg_mu);
        d->live[reinterpret_cast<uint64_t>(user)] = alloc_rec{static_cast<unsigned char*>(block), bytes, false};
    }
    *out = reinterpret_cast<uint64_t>(user);
    return SIM_OK;
}

int mem_mark_free(sim_device* d, uint64_t ptr) {
    bool ok = false, queued = false;
    {
        quiet q;
        std::lock_guard<std::mutex> lk(d->reg_mu);
        auto it = d->live.find(ptr);
        if (it != d->live.end()) {
            queued = it->second.free_queued;
            ok = !queued;
            it->second.free_queued = true;
        }
    }
    if (ok) return SIM_OK;
    if (queued) return fail(SIM_ERROR_MEMORY, "sim_free_async: 0x%llx is already being freed", (unsigned long long)ptr);
    return fail(SIM_ERROR_MEMORY, "sim_free_async: 0x%llx is not the start of a live allocation of this device",
                (unsigned long long)ptr);
}

void mem_release(sim_device* d, uint64_t ptr) {
    alloc_rec r{nullptr, 0, false};
    {
        quiet q;
        std::lock_guard<std::mutex> lk(d->reg_mu);
        auto it = d->live.find(ptr);
        if (it == d->live.end()) return;
        r = it->second;
        d->live.erase(it);
    }
    // Outside the quiet section: TSan sees this write, so a stream still using the memory without
    // an event wait is reported at the free.
    memset(reinterpret_cast<void*>(ptr), 0xff, r.size);
    free(r.block);
    d->used.fetch_sub(r.size, std::memory_order_relaxed);
}

int mem_check_range(sim_device* d, uint64_t ptr, uint64_t bytes, const char* what) {
    if (bytes == 0) return SIM_OK;
    uint64_t base = 0, size = 0;
    bool found = false, fits = false, queued = false;
    auto look = [&](sim_device* dev) {
        quiet q;
        std::lock_guard<std::mutex> lk(dev->reg_mu);
        const alloc_rec* rec = nullptr;
        if (!inside(dev->live, ptr, &base, &rec)) return false;
        found = true;
        size = rec->size;
        queued = rec->free_queued;
        fits = bytes <= rec->size - (ptr - base) && !queued;
        return true;
    };
    if (!look(d)) {
        std::lock_guard<std::mutex> lk(g_devices_mu);
        if (g_devices)
            for (sim_device* other : *g_devices)
                if (other != d && look(other)) break;
    }
    if (fits) return SIM_OK;
    if (!found)
        return fail(SIM_ERROR_MEMORY, "%s: 0x%llx (%llu bytes) is not inside a live allocation", what,
                    (unsigned long long)ptr, (unsigned long long)bytes);
    if (queued)
        return fail(SIM_ERROR_MEMORY, "%s: 0x%llx lies in an allocation whose free is already queued", what,
                    (unsigned long long)ptr);
    return fail(SIM_ERROR_MEMORY,
                "%s: [0x%llx, +%llu bytes) runs past the end of the allocation of %llu bytes at 0x%llx (offset %llu)",
                what, (unsigned long long)ptr, (unsigned long long)bytes, (unsigned long long)size,
                (unsigned long long)base, (unsigned long long)(ptr - base));
}

bool mem_check_guards(sim_device* d, std::string* fault) {
#if defined(SIM_ASAN)
    (void)d;
    (void)fault;
    return true;
#else
    quiet q;
    std::lock_guard<std::mutex> lk(d->reg_mu);
    for (const auto& kv : d->live) {
        int64_t offset = 0;
        if (damaged(kv.first, kv.second.size, &offset)) {
            char buf[256];
            snprintf(buf, sizeof buf,
                     "wrote out of bounds of an allocation of %llu bytes at 0x%llx: guard byte at offset %lld (%s) "
                     "was overwritten",
                     (unsigned long long)kv.second.size, (unsigned long long)kv.first, (long long)offset,
                     offset < 0 ? "before its start" : "past its end");
            *fault = buf;
            return false;
        }
    }
    return true;
#endif
}

void mem_release_all(sim_device* d) {
    quiet q;
    std::lock_guard<std::mutex> lk(d->reg_mu);
    for (auto& kv : d->live) free(kv.second.block);
    d->live.clear();
    d->used.store(0, std::memory_order_relaxed);
}

}  // namespace sim
