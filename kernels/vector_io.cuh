// 128-bit global loads and stores of a storage dtype, widened to (or rounded from) f32 registers:
// 4 f32 or 8 bf16 per access. Callers decide when a vector access is allowed (the address and the
// row width); on the simulated GPU a misaligned vector access is a fault, as it is on a GPU, so a
// launcher that picks the vector path for an unaligned view fails the op check instead of passing.
#pragma once
#include "common.cuh"

// Elements of T in one 16-byte access.
template <typename T> struct VecWidth { static constexpr int N = 16 / sizeof(T); };

__device__ __forceinline__ bool aligned16(const void* p) { return ((uintptr_t)p & 15u) == 0; }

__device__ __forceinline__ void check_vector_address(const void* p) {
#ifdef SHARDTRAIN_SIM
    if (!aligned16(p)) sim::kernel_fault("a 16-byte vector access at an address that is not 16-byte aligned");
#else
    (void)p;
#endif
}

// v[0..N) = p[0..N) as f32; p must be 16-byte aligned.
__device__ __forceinline__ void load_vec(const float* p, float* v) {
    check_vector_address(p);
    const float4 q = *reinterpret_cast<const float4*>(p);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
}
__device__ __forceinline__ void load_vec(const bf16* p, float* v) {
    check_vector_address(p);
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const unsigned w[4] = {q.x, q.y, q.z, q.w};
    // Element 2k is the low half of word k (little-endian); a bf16 is the top half of its f32.
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = __uint_as_float(w[k] << 16);
        v[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}

// p[0..N) = v[0..N) rounded to the storage dtype (round-to-nearest-even for bf16).
__device__ __forceinline__ void store_vec(float* p, const float* v) {
    check_vector_address(p);
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
__device__ __forceinline__ void store_vec(bf16* p, const float* v) {
    check_vector_address(p);
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const unsigned lo = __bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k]));
        const unsigned hi = __bfloat16_as_ushort(__float2bfloat16_rn(v[2 * k + 1]));
        w[k] = lo | (hi << 16);
    }
    uint4 q;
    q.x = w[0], q.y = w[1], q.z = w[2], q.w = w[3];
    *reinterpret_cast<uint4*>(p) = q;
}
