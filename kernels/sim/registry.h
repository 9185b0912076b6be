// The kernel tables the runtime serves sim_kernel_* and sim_launch from. build.rs generates the
// one translation unit that defines them: the modules (one per kernels/NAME.cu, each listing its
// entries through SIM_KERNEL_ENTRY) and ptxas's resource usage when nvcc was there at build time.
#pragma once
#include "sim_api.h"

struct sim_module {
    const char* name;
    const sim_kernel_entry* (*entries)(int* count);
};

extern const sim_module SIM_MODULES[];
extern const int SIM_MODULE_COUNT;
// Rows with a null name are padding (an empty table still needs one element).
extern const sim_kernel_resources SIM_RESOURCES[];
extern const int SIM_RESOURCE_COUNT;
