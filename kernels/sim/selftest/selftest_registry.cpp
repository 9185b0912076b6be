// The self-tests' kernel module and registry, written by hand to the contract build.rs follows for
// kernels/*.cu (a wrapper listing each entry through SIM_KERNEL_ENTRY, then the module and resource
// tables). The resource rows stand in for ptxas's numbers to test the launch limits.
#include "test_kernels.cu"

#include "sim/registry.h"

static const sim_kernel_entry ENTRIES[] = {
    SIM_KERNEL_ENTRY(barrier_order),    SIM_KERNEL_ENTRY(barrier_with_exits), SIM_KERNEL_ENTRY(index_map),
    SIM_KERNEL_ENTRY(shuffle_int),      SIM_KERNEL_ENTRY(shuffle_unsigned),   SIM_KERNEL_ENTRY(shuffle_float),
    SIM_KERNEL_ENTRY(shuffle_double),   SIM_KERNEL_ENTRY(shuffle_int64),      SIM_KERNEL_ENTRY(shuffle_uint64),
    SIM_KERNEL_ENTRY(votes),            SIM_KERNEL_ENTRY(block_reduce),       SIM_KERNEL_ENTRY(atomics),
    SIM_KERNEL_ENTRY(dynamic_reverse),  SIM_KERNEL_ENTRY(dynamic_overflow),   SIM_KERNEL_ENTRY(res_big_static),
    SIM_KERNEL_ENTRY(res_mid_static),   SIM_KERNEL_ENTRY(res_many_registers), SIM_KERNEL_ENTRY(params_mixed),
    SIM_KERNEL_ENTRY(bf16_round),       SIM_KERNEL_ENTRY(sleep_ms),           SIM_KERNEL_ENTRY(fill_value),
    SIM_KERNEL_ENTRY(copy_values),      SIM_KERNEL_ENTRY(shared_exchange),    SIM_KERNEL_ENTRY(write_past_end),
    SIM_KERNEL_ENTRY(deadlock_mixed),   SIM_KERNEL_ENTRY(partial_mask),       SIM_KERNEL_ENTRY(full_shuffle),
    SIM_KERNEL_ENTRY(bench_barrier),    SIM_KERNEL_ENTRY(bench_shuffle),      SIM_KERNEL_ENTRY(bench_elementwise),
    SIM_KERNEL_ENTRY(minmax_mixed),     SIM_KERNEL_ENTRY(barrier_reductions), SIM_KERNEL_ENTRY(lanes_exchange),
};

extern "C" const sim_kernel_entry* shardtrain_sim_module_selftest(int* count) {
    *count = (int)(sizeof ENTRIES / sizeof ENTRIES[0]);
    return ENTRIES;
}

const sim_module SIM_MODULES[] = {{"selftest", shardtrain_sim_module_selftest}};
const int SIM_MODULE_COUNT = 1;
const sim_kernel_resources SIM_RESOURCES[] = {
    {"res_big_static", 16, 50000, 0},      // static shared memory beyond 48 KiB
    {"res_mid_static", 16, 40000, 0},      // 40000 static: dynamic beyond 9152 bytes needs the opt-in
    {"res_many_registers", 128, 0, 0},     // 128 x 512 threads = 65536 registers: the most a block has
    {"barrier_order", 24, 4096, 0},
};
const int SIM_RESOURCE_COUNT = 4;
