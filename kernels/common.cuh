// Shared by every kernel file: dtype helpers and the block reductions.
// Kernels are templates over storage types; each .cu file instantiates the extern "C" entry points
// the Rust CUDA backend loads by name (`op_dtype`, for example `gelu_forward_bf16`).
#pragma once
#ifdef SHARDTRAIN_SIM
#include "sim/cuda_sim.h"  // the simulated GPU (kernels run as host fibers in CI)
#else
#include <cuda_bf16.h>
#endif
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// The block's dynamic shared memory (the launch's dynamic_smem_bytes), 16-byte aligned.
#ifdef SHARDTRAIN_SIM
template <typename T> __device__ __forceinline__ T* dynamic_smem() { return reinterpret_cast<T*>(sim::dynamic_smem()); }
#else
template <typename T> __device__ __forceinline__ T* dynamic_smem() {
    extern __shared__ __align__(16) unsigned char shardtrain_dynamic_smem[];
    return reinterpret_cast<T*>(shardtrain_dynamic_smem);
}
#endif

// Every value is computed in f32 and rounded once when stored (round-to-nearest-even for bf16),
// the contract the CPU reference backend follows.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Sum over a warp, result in every lane.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024), result in every thread.
// `scratch` holds 32 floats of shared memory; the function synchronises before returning.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// Grid-stride loop over n elements.
#define FOR_EACH(i, n) for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)
