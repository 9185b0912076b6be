// The simulated GPU's C interface: what the Rust `sim` driver (src/backend/cuda/driver/sim.rs) calls.
// Mirrors the slice of the CUDA driver API and cuBLASLt the CUDA backend uses: devices (contexts),
// stream-ordered memory, streams run by host worker threads, events, kernel launches and one GEMM.
//
// Conventions: every call returns SIM_OK (0) or an error code; the message of the last failed call
// on the calling host thread is sim_last_error(). Errors of queued work (a kernel fault, a failed
// GEMM) are sticky, as on a GPU: the device records the first one, skips all work queued after it,
// and every later synchronize, query or call on that device returns SIM_ERROR_STICKY with the
// message naming the kernel and the fault. Device addresses are host addresses (uint64_t).
#pragma once
#include <stddef.h>
#include <stdint.h>

// The library is built with -fvisibility=hidden: only this interface is exported.
#pragma GCC visibility push(default)
#ifdef __cplusplus
extern "C" {
#endif

enum sim_status {
    SIM_OK = 0,
    SIM_NOT_READY = 1,       // event query: the work before the event has not finished
    SIM_ERROR_INVALID = 2,   // a bad argument (unknown kernel, wrong parameter list, bad layout)
    SIM_ERROR_LAUNCH = 3,    // a launch the GPU would refuse (block, grid, shared memory, registers)
    SIM_ERROR_MEMORY = 4,    // allocation failed, or an address that is not a live allocation
    SIM_ERROR_STICKY = 5,    // queued work failed earlier on this device (message names it)
};

typedef struct sim_device sim_device;
typedef struct sim_stream sim_stream;
typedef struct sim_event sim_event;

// The message of the last call on this host thread that did not return SIM_OK.
const char* sim_last_error(void);

// ---- devices -------------------------------------------------------------------------------------
// A device is independent of every other (its own allocations, streams, sticky error), so tests can
// make one per case. `memory_bytes` is the capacity it reports and enforces (0: 16 GiB).
int sim_device_create(sim_device** out, uint64_t memory_bytes);
// Waits for every stream of the device, then frees everything it holds (streams and events not yet
// destroyed included: their handles are invalid afterwards).
int sim_device_destroy(sim_device* dev);
// Bytes free and total, as cuMemGetInfo.
int sim_device_memory(sim_device* dev, uint64_t* free_bytes, uint64_t* total_bytes);
// SIM_OK, or SIM_ERROR_STICKY with the first fault of queued work.
int sim_device_error(sim_device* dev);

// ---- streams -------------------------------------------------------------------------------------
// Each stream is one host worker thread running its queue in order.
int sim_stream_create(sim_device* dev, sim_stream** out);
// Waits for the queue to drain, then ends the worker.
int sim_stream_destroy(sim_stream* s);
// Blocks the caller until everything queued so far has run.
int sim_stream_synchronize(sim_stream* s);
// Work queued on `s` after this call starts only after the work `e`'s latest record captured has
// finished (cuStreamWaitEvent). An event never recorded is complete.
int sim_stream_wait_event(sim_stream* s, sim_event* e);

// ---- events --------------------------------------------------------------------------------------
// `timing` 0 is CU_EVENT_DISABLE_TIMING: such an event cannot be used with sim_event_elapsed_ms.
int sim_event_create(sim_device* dev, sim_event** out, int timing);
int sim_event_destroy(sim_event* e);
// Captures the work queued on `s` so far (a later record replaces the capture, as on a GPU).
int sim_event_record(sim_event* e, sim_stream* s);
// SIM_OK when the captured work has finished, SIM_NOT_READY when not yet, an error on a fault.
int sim_event_query(sim_event* e);
int sim_event_synchronize(sim_event* e);
// Milliseconds between two completed timing events (the host clock when each record was reached).
// SIM_NOT_READY while either has not completed (as CUDA); SIM_ERROR_INVALID for an event created
// without timing or never recorded.
int sim_event_elapsed_ms(float* ms, sim_event* start, sim_event* end);

// ---- memory (stream-ordered, as cuMemAllocAsync / cuMemFreeAsync) --------------------------------
// Each allocation is its own host heap block, filled with 0xFF bytes (NaN in f32 and bf16) so that a
// read of memory nobody wrote shows. Outside AddressSanitizer builds each block has guard bytes
// before and after it, checked after every kernel: a write out of bounds is a sticky fault naming
// the kernel and the allocation. Zero bytes allocate nothing and give address 0.
int sim_malloc_async(sim_stream* s, uint64_t bytes, uint64_t* out_ptr);
// Freed (poisoned with 0xFF, then released) when `s` reaches it: a later use is a real
// use-after-free. An address that is not the start of a live allocation of the stream's device
// (or one already being freed) is SIM_ERROR_MEMORY; 0 is accepted and does nothing.
int sim_free_async(sim_stream* s, uint64_t ptr);
// Copies run when the stream reaches them; the host buffer must stay valid until then (callers
// synchronize). Device ranges must lie inside one live allocation, of any device (so dtod also
// serves copies between devices), and not one whose free is queued (SIM_ERROR_MEMORY otherwise,
// checked when queued). Zero bytes do nothing.
int sim_memcpy_htod_async(sim_stream* s, uint64_t dst, const void* src, uint64_t bytes);
int sim_memcpy_dtoh_async(sim_stream* s, void* dst, uint64_t src, uint64_t bytes);
int sim_memcpy_dtod_async(sim_stream* s, uint64_t dst, uint64_t src, uint64_t bytes);
int sim_memset_d8_async(sim_stream* s, uint64_t dst, uint8_t value, uint64_t bytes);

// ---- kernels -------------------------------------------------------------------------------------
// Every `extern "C" __global__` entry point of kernels/*.cu, compiled for the host. The registry
// (generated by build.rs) lists them with their parameter sizes and, when nvcc was there at build
// time, ptxas's resource usage for sm_90 (registers per thread, static shared memory, spill bytes).
typedef void (*sim_invoker)(void* const* params);
typedef struct {
    const char* name;
    sim_invoker invoke;        // runs the kernel body for the calling simulated thread
    int param_count;
    const uint16_t* param_sizes;  // bytes of each parameter, in order
} sim_kernel_entry;
typedef struct {
    const char* name;
    int registers;             // per thread; 0 when unknown (built without nvcc)
    int static_smem_bytes;
    int spill_bytes;           // spill stores + loads reported by ptxas
} sim_kernel_resources;

// Number of kernels and the i-th one's name (for listing and tests).
int sim_kernel_count(void);
const char* sim_kernel_name(int i);
// Resource usage of `name` as recorded at build time; SIM_ERROR_INVALID for an unknown kernel.
int sim_kernel_resources_of(const char* name, sim_kernel_resources* out);
// As cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) on this device: the opt-in
// above 48 KiB of dynamic shared memory, refused (SIM_ERROR_INVALID) when it and the kernel's static
// shared memory exceed 227 KiB.
int sim_kernel_set_max_dynamic_smem(sim_device* dev, const char* name, uint32_t bytes);

// Queues kernel `name` on `s`. `params[i]` points at the i-th argument's value and `param_sizes[i]`
// is its size (as cuLaunchKernel's kernelParams, plus the sizes, which the sim checks against the
// kernel's signature). Refused at once, as a GPU refuses it (SIM_ERROR_LAUNCH): a block of more than
// 1024 threads or beyond (1024, 1024, 64), a zero dimension, a grid beyond (2^31-1, 65535, 65535),
// static shared memory above 48 KiB, static + dynamic shared memory above 48 KiB without the opt-in
// or above the opt-in (at most 227 KiB), registers x threads per block above 65536.
// Execution: blocks one after another (x fastest, then y, z); the threads of a block run
// concurrently as fibers, switching at __syncthreads and at warp collectives.
int sim_launch(sim_stream* s, const char* name, const uint32_t grid[3], const uint32_t block[3],
               uint32_t dynamic_smem_bytes, void* const* params, const uint16_t* param_sizes,
               int param_count);

// ---- one cuBLASLt matmul (cublasLtMatmul with CUBLAS_COMPUTE_32F, scale type f32) -----------------
// Column-major, as cuBLASLt documents it: D = alpha * op(A) * op(B) + beta * C, then the epilogue,
// with op(A) m x k, op(B) k x n, C and D m x n, where m and n are D's rows and columns and k comes
// from A. Each layout is what cublasLtMatrixLayoutCreate was given (type, rows, cols, leading
// dimension >= rows); layouts that do not agree with each other under the transposes are refused
// as cuBLASLt refuses them (SIM_ERROR_INVALID, at once). Products accumulate in f32; every output
// is rounded once to its type. C may be D (in place) or a distinct matrix that does not overlap D.
// Epilogues (cublasLtEpilogue_t values; v = alpha op(A) op(B) + beta C, in f32):
//   DEFAULT (1): D = v.                BIAS (4): D = v + bias[i] (m values, bias_type).
//   GELU_AUX (160), GELU_AUX_BIAS (164): aux = v (+ bias[i]), D = gelu(v (+ bias[i])), tanh form.
//   DGELU (192), DGELU_BGRAD (208): D = v * gelu'(aux); BGRAD also overwrites bias[i] = sum_j D[i, j]
//     (of the unrounded values).
//   BGRADB (512): D = v, and bias[j] = sum_p op(B)[p, j] (n values, overwritten; the reduction over k).
// aux is m x n of D's type with leading dimension aux_ld (a multiple of 8, >= m, 16-byte aligned),
// the bias vector has D's type. The sim accepts an epilogue only in the configurations this project
// issues and cuBLASLt documents (kernels/sim/gemm_epilogue.cpp says which) and refuses the rest.
enum sim_dtype { SIM_F32 = 0, SIM_BF16 = 1 };
enum sim_epilogue {
    SIM_EPILOGUE_DEFAULT = 1,
    SIM_EPILOGUE_BIAS = 4,
    SIM_EPILOGUE_GELU_AUX = 160,
    SIM_EPILOGUE_GELU_AUX_BIAS = 164,
    SIM_EPILOGUE_DGELU = 192,
    SIM_EPILOGUE_DGELU_BGRAD = 208,
    SIM_EPILOGUE_BGRADB = 512,
};
typedef struct { int type; uint64_t rows, cols, ld; } sim_matrix_layout;
typedef struct {
    int trans_a, trans_b;      // CUBLASLT_MATMUL_DESC_TRANSA / TRANSB: 0 N, 1 T
    sim_matrix_layout a, b, c, d;
    float alpha, beta;
    int epilogue;              // CUBLASLT_MATMUL_DESC_EPILOGUE (sim_epilogue)
    int bias_type;             // CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE (sim_dtype)
    uint64_t aux_ld;           // CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD
} sim_gemm_desc;
int sim_gemm_async(sim_stream* s, const sim_gemm_desc* desc, uint64_t a, uint64_t b, uint64_t c,
                   uint64_t d, uint64_t bias, uint64_t aux);

#ifdef __cplusplus
}
#endif
#pragma GCC visibility pop
