// Elementwise ops: fill, scale, residual add, accumulate (dst += src) and casts (copy between
// dtypes). Grid-stride loops; every output element is written exactly once.
#include "common.cuh"

template <typename T> __device__ void fill(T* dst, float value, int64_t n) {
    FOR_EACH(i, n) dst[i] = from_f32<T>(value);
}

template <typename T> __device__ void scale(T* dst, float alpha, int64_t n) {
    FOR_EACH(i, n) dst[i] = from_f32<T>(alpha * to_f32(dst[i]));
}

template <typename T> __device__ void add(T* out, const T* a, const T* b, int64_t n) {
    FOR_EACH(i, n) out[i] = from_f32<T>(to_f32(a[i]) + to_f32(b[i]));
}

template <typename D, typename S> __device__ void accumulate(D* dst, const S* src, int64_t n) {
    FOR_EACH(i, n) dst[i] = from_f32<D>(to_f32(dst[i]) + to_f32(src[i]));
}

template <typename D, typename S> __device__ void copy(D* dst, const S* src, int64_t n) {
    FOR_EACH(i, n) dst[i] = from_f32<D>(to_f32(src[i]));
}

#define UNARY(T, NAME)                                                                              \
    extern "C" __global__ void fill_##NAME(T* dst, float value, int64_t n) { fill(dst, value, n); } \
    extern "C" __global__ void scale_##NAME(T* dst, float alpha, int64_t n) { scale(dst, alpha, n); } \
    extern "C" __global__ void add_##NAME(T* out, const T* a, const T* b, int64_t n) { add(out, a, b, n); }
UNARY(float, f32)
UNARY(bf16, bf16)

#define BINARY(D, DN, S, SN)                                                                        \
    extern "C" __global__ void accumulate_##DN##_##SN(D* dst, const S* src, int64_t n) { accumulate(dst, src, n); } \
    extern "C" __global__ void copy_##DN##_##SN(D* dst, const S* src, int64_t n) { copy(dst, src, n); }
BINARY(float, f32, float, f32)
BINARY(float, f32, bf16, bf16)
BINARY(bf16, bf16, float, f32)
BINARY(bf16, bf16, bf16, bf16)
