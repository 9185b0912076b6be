// Kernel lookup and launches: the tables build.rs generates (registry.h) indexed by name, the
// checks a GPU makes before it accepts a launch (block and grid shape, shared memory, registers)
// plus the parameter list against the kernel's signature, and the queued launch itself.
#include <stdio.h>
#include <string.h>

#include <string>

#include "internal.h"
#include "registry.h"

namespace sim {
namespace {

constexpr uint32_t kStaticSmemLimit = 48 * 1024;
constexpr uint32_t kOptInSmemLimit = 227 * 1024;
constexpr uint64_t kRegistersPerBlock = 65536;

struct kernel_table {
    std::vector<const sim_kernel_entry*> list;
    std::unordered_map<std::string, const sim_kernel_entry*> by_name;
    std::unordered_map<std::string, sim_kernel_resources> resources;
};

const kernel_table& table() {
    static const kernel_table t = [] {
        kernel_table k;
        for (int m = 0; m < SIM_MODULE_COUNT; m++) {
            int n = 0;
            const sim_kernel_entry* entries = SIM_MODULES[m].entries(&n);
            for (int i = 0; i < n; i++) {
                if (k.by_name.emplace(entries[i].name, &entries[i]).second) k.list.push_back(&entries[i]);
                else fprintf(stderr, "shardtrain sim: kernel %s is defined twice (module %s)\n", entries[i].name, SIM_MODULES[m].name);
            }
        }
        for (int i = 0; i < SIM_RESOURCE_COUNT; i++)
            if (SIM_RESOURCES[i].name) k.resources[SIM_RESOURCES[i].name] = SIM_RESOURCES[i];
        return k;
    }();
    return t;
}

const sim_kernel_entry* find_kernel(const char* name) {
    if (!name) return nullptr;
    const kernel_table& t = table();
    auto it = t.by_name.find(name);
    return it == t.by_name.end() ? nullptr : it->second;
}

sim_kernel_resources resources(const char* name) {
    const kernel_table& t = table();
    auto it = t.resources.find(name);
    if (it != t.resources.end()) return it->second;
    return sim_kernel_resources{name, 0, 0, 0};
}

std::string dims(const uint32_t v[3]) {
    char b[64];
    snprintf(b, sizeof b, "(%u,%u,%u)", v[0], v[1], v[2]);
    return b;
}

}  // namespace
}  // namespace sim

using namespace sim;

extern "C" {

int sim_kernel_count(void) { return (int)table().list.size(); }

const char* sim_kernel_name(int i) {
    const kernel_table& t = table();
    if (i < 0 || (size_t)i >= t.list.size()) return nullptr;
    return t.list[(size_t)i]->name;
}

int sim_kernel_resources_of(const char* name, sim_kernel_resources* out) {
    const sim_kernel_entry* k = find_kernel(name);
    if (!k) return fail(SIM_ERROR_INVALID, "unknown kernel %s", name ? name : "(null)");
    if (out) {
        *out = resources(name);
        out->name = k->name;
    }
    return SIM_OK;
}

int sim_kernel_set_max_dynamic_smem(sim_device* dev, const char* name, uint32_t bytes) {
    SIM_HANDLE(dev);
    if (!dev) return fail(SIM_ERROR_INVALID, "sim_kernel_set_max_dynamic_smem: null device");
    if (int rc = sticky_check(dev)) return rc;
    const sim_kernel_entry* k = find_kernel(name);
    if (!k) return fail(SIM_ERROR_INVALID, "sim_kernel_set_max_dynamic_smem: unknown kernel %s", name ? name : "(null)");
    const uint32_t static_smem = (uint32_t)resources(name).static_smem_bytes;
    if ((uint64_t)bytes + static_smem > kOptInSmemLimit)
        return fail(SIM_ERROR_INVALID,
                    "sim_kernel_set_max_dynamic_smem(%s, %u): with %u bytes of static shared memory that exceeds "
                    "the %u bytes a block can have",
                    name, bytes, static_smem, kOptInSmemLimit);
    std::lock_guard<std::mutex> lk(dev->mu);
    dev->max_dyn_smem[name] = bytes;
    return SIM_OK;
}

int sim_launch(sim_stream* s, const char* name, const uint32_t grid[3], const uint32_t block[3],
               uint32_t dynamic_smem_bytes, void* const* params, const uint16_t* param_sizes, int param_count) {
    SIM_HANDLE(s);
    if (!s || !grid || !block) return fail(SIM_ERROR_INVALID, "sim_launch(%s): null argument", name ? name : "(null)");
    sim_device* dev = s->dev;
    if (int rc = sticky_check(dev)) return rc;
    const sim_kernel_entry* k = find_kernel(name);
    if (!k) return fail(SIM_ERROR_INVALID, "sim_launch: unknown kernel %s", name ? name : "(null)");

    // The shape, as the GPU checks it.
    const uint64_t threads = (uint64_t)block[0] * block[1] * block[2];
    if (!block[0] || !block[1] || !block[2] || !grid[0] || !grid[1] || !grid[2])
        return fail(SIM_ERROR_LAUNCH, "sim_launch(%s): zero dimension in grid %s or block %s", name, dims(grid).c_str(),
                    dims(block).c_str());
    if (block[0] > 1024 || block[1] > 1024 || block[2] > 64 || threads > 1024)
        return fail(SIM_ERROR_LAUNCH,
                    "sim_launch(%s): block %s exceeds the limits (x, y <= 1024, z <= 64, at most 1024 threads)", name,
                    dims(block).c_str());
    if (grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535)
        return fail(SIM_ERROR_LAUNCH, "sim_launch(%s): grid %s exceeds (2^31-1, 65535, 65535)", name, dims(grid).c_str());

    // Shared memory and registers, from ptxas's numbers when the build had them.
    const sim_kernel_resources res = resources(name);
    const uint32_t static_smem = (uint32_t)res.static_smem_bytes;
    if (static_smem > kStaticSmemLimit)
        return fail(SIM_ERROR_LAUNCH, "sim_launch(%s): %u bytes of static shared memory exceed %u", name, static_smem,
                    kStaticSmemLimit);
    bool opted = false;
    uint32_t opt_in = 0;
    {
        std::lock_guard<std::mutex> lk(dev->mu);
        auto it = dev->max_dyn_smem.find(name);
        if (it != dev->max_dyn_smem.end()) {
            opted = true;
            opt_in = it->second;
        }
    }
    if (!opted && (uint64_t)static_smem + dynamic_smem_bytes > kStaticSmemLimit)
        return fail(SIM_ERROR_LAUNCH,
                    "sim_launch(%s): %u bytes of static + %u of dynamic shared memory exceed %u without the opt-in "
                    "(sim_kernel_set_max_dynamic_smem)",
                    name, static_smem, dynamic_smem_bytes, kStaticSmemLimit);
    if (opted && (dynamic_smem_bytes > opt_in || (uint64_t)static_smem + dynamic_smem_bytes > kOptInSmemLimit))
        return fail(SIM_ERROR_LAUNCH,
                    "sim_launch(%s): %u bytes of dynamic shared memory exceed the opt-in of %u (static %u, block "
                    "limit %u)",
                    name, dynamic_smem_bytes, opt_in, static_smem, kOptInSmemLimit);
    // A GPU allocates registers per thread in steps of 8, and for whole warps.
    const uint64_t allocated = ((uint64_t)res.registers + 7) / 8 * 8 * ((threads + 31) / 32 * 32);
    if (res.registers > 0 && allocated > kRegistersPerBlock)
        return fail(SIM_ERROR_LAUNCH,
                    "sim_launch(%s): %d registers x %llu threads take %llu registers as a GPU allocates them, more "
                    "than the %llu of a block",
                    name, res.registers, (unsigned long long)threads, (unsigned long long)allocated,
                    (unsigned long long)kRegistersPerBlock);

    // The parameter list against the signature.
    if (param_count != k->param_count)
        return fail(SIM_ERROR_INVALID, "sim_launch(%s): %d parameters given, the kernel takes %d", name, param_count,
                    k->param_count);
    if (param_count > 0 && (!params || !param_sizes))
        return fail(SIM_ERROR_INVALID, "sim_launch(%s): null parameter list", name);
    size_t total = 0;
    for (int i = 0; i < param_count; i++) {
        if (param_sizes[i] != k->param_sizes[i])
            return fail(SIM_ERROR_INVALID, "sim_launch(%s): parameter %d is %u bytes, the kernel's is %u bytes", name, i,
                        param_sizes[i], k->param_sizes[i]);
        if (!params[i]) return fail(SIM_ERROR_INVALID, "sim_launch(%s): parameter %d is a null pointer", name, i);
        total += (param_sizes[i] + 15) & ~(size_t)15;
    }

    // Copied now, as cuLaunchKernel copies them: the caller's values may change after this call.
    std::vector<unsigned char> copy(total ? total : 1);
    std::vector<size_t> offsets((size_t)param_count);
    size_t at = 0;
    for (int i = 0; i < param_count; i++) {
        offsets[(size_t)i] = at;
        memcpy(copy.data() + at, params[i], param_sizes[i]);
        at += (param_sizes[i] + 15) & ~(size_t)15;
    }
    launch l{};
    l.entry = k;
    memcpy(l.grid, grid, sizeof l.grid);
    memcpy(l.block, block, sizeof l.block);
    l.dyn_smem = dynamic_smem_bytes;
    return enqueue(s, OP_WORK, [dev, l, copy = std::move(copy), offsets = std::move(offsets)]() mutable {
        std::vector<void*> ptrs(offsets.size() + 1);
        for (size_t i = 0; i < offsets.size(); i++) ptrs[i] = copy.data() + offsets[i];
        launch run = l;
        run.params = ptrs.data();
        dev->kernels_running.fetch_add(1, std::memory_order_relaxed);
        std::string f = run_kernel(run);
        if (f.empty() && !mem_check_guards(dev, &f)) {
            if (dev->kernels_running.load(std::memory_order_relaxed) > 1)
                f += " (kernels on other streams of the device were running: the write may be theirs)";
        }
        dev->kernels_running.fetch_sub(1, std::memory_order_relaxed);
        if (!f.empty())
            record_fault(dev, "kernel " + std::string(run.entry->name) + " (grid " + dims(run.grid) + ", block " +
                                  dims(run.block) + "): " + f);
    });
}

}  // extern "C"
