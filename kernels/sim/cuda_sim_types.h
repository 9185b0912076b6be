// Value types and device functions of the CUDA environment that need no runtime: vector types,
// bf16 (bit-exact with cuda_bf16.h's conversions), math, integer intrinsics, min/max and atomics.
// Included by cuda_sim.h; kernels never include it directly.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>

// ---- vector types (CUDA's alignment, so vector loads keep their layout) --------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned int x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned int x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }

// ---- bf16 ----------------------------------------------------------------------------------------
// Storage is the raw bits; the implicit float conversions match cuda_bf16.h's (round to nearest
// even; every NaN becomes the canonical 0x7FFF).
struct __nv_bfloat16;
inline unsigned short sim_bf16_bits_rn(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
inline float sim_bf16_to_float(unsigned short bits) {
    const uint32_t u = (uint32_t)bits << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
struct __attribute__((aligned(2))) __nv_bfloat16 {
    // Initialised so that the defaulted constructor is constexpr: a `__shared__` (thread_local)
    // array of bf16 is then constant-initialised, without the init guard every simulated thread
    // would touch (a false race under TSan).
    unsigned short __x = 0;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(sim_bf16_bits_rn(f)) {}
    operator float() const { return sim_bf16_to_float(__x); }
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
static_assert(sizeof(__nv_bfloat16) == 2 && std::is_trivially_copyable<__nv_bfloat16>::value, "bf16 layout");
static_assert(sizeof(__nv_bfloat162) == 4, "bf162 layout");

inline __nv_bfloat16 sim_bf16_from_bits(unsigned short bits) {
    __nv_bfloat16 r;
    r.__x = bits;
    return r;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return sim_bf16_from_bits(sim_bf16_bits_rn(f)); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return sim_bf16_to_float(h.__x); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(a)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return {__bfloat162float(v.x), __bfloat162float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return __bfloat162float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return __bfloat162float(v.y); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return sim_bf16_from_bits(u); }

// ---- math ----------------------------------------------------------------------------------------
// The fast intrinsics are the accurate host functions: results then match the CPU reference more
// closely than the GPU does, never less.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __log2f(float x) { return log2f(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanhf(float x) { return tanhf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x != x ? 0.0f : x)); }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }

// ---- integer intrinsics --------------------------------------------------------------------------
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
    x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
    x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
    return __builtin_bswap32(x);
}
template <typename T> inline T __ldg(const T* p) { return *p; }

// ---- min / max -----------------------------------------------------------------------------------
// CUDA overloads them for every integer width and for float; mixed calls (int with int64_t) take
// the usual arithmetic conversions instead of being ambiguous.
#define SIM_MINMAX(T)                                                                               \
    inline T min(T a, T b) { return a < b ? a : b; }                                                \
    inline T max(T a, T b) { return a > b ? a : b; }
SIM_MINMAX(int)
SIM_MINMAX(unsigned int)
SIM_MINMAX(long)
SIM_MINMAX(unsigned long)
SIM_MINMAX(long long)
SIM_MINMAX(unsigned long long)
#undef SIM_MINMAX
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
template <typename A, typename B,
          typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value &&
                                      !std::is_same<A, B>::value, int>::type = 0>
inline typename std::common_type<A, B>::type min(A a, B b) {
    typedef typename std::common_type<A, B>::type R;
    return min((R)a, (R)b);
}
template <typename A, typename B,
          typename std::enable_if<std::is_arithmetic<A>::value && std::is_arithmetic<B>::value &&
                                      !std::is_same<A, B>::value, int>::type = 0>
inline typename std::common_type<A, B>::type max(A a, B b) {
    typedef typename std::common_type<A, B>::type R;
    return max((R)a, (R)b);
}

// ---- atomics -------------------------------------------------------------------------------------
// Relaxed, as CUDA's: they order nothing else, so ThreadSanitizer still reports plain accesses that
// a kernel wrongly believes an atomic protects.
#define SIM_RLX __ATOMIC_RELAXED
// Read-modify-write through a CAS loop on the value's bits: GCC instruments only the integer forms
// of the __atomic builtins for TSan (the generic form on a float reads as a plain write).
typedef uint16_t __attribute__((may_alias)) sim_bits16;
typedef uint32_t __attribute__((may_alias)) sim_bits32;
typedef uint64_t __attribute__((may_alias)) sim_bits64;
template <size_t N> struct sim_bits;
template <> struct sim_bits<2> { typedef sim_bits16 type; };
template <> struct sim_bits<4> { typedef sim_bits32 type; };
template <> struct sim_bits<8> { typedef sim_bits64 type; };
template <typename T, typename F> inline T sim_atomic_update(T* addr, F f) {
    typedef typename sim_bits<sizeof(T)>::type U;
    U* p = reinterpret_cast<U*>(addr);
    U seen = __atomic_load_n(p, SIM_RLX);
    for (;;) {
        T old, desired;
        memcpy(&old, &seen, sizeof(T));
        desired = f(old);
        U want;
        memcpy(&want, &desired, sizeof(T));
        if (__atomic_compare_exchange_n(p, &seen, want, true, SIM_RLX, SIM_RLX)) return old;
    }
}
inline float atomicAdd(float* a, float v) { return sim_atomic_update(a, [v](float o) { return o + v; }); }
inline double atomicAdd(double* a, double v) { return sim_atomic_update(a, [v](double o) { return o + v; }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* a, __nv_bfloat16 v) {
    return sim_atomic_update(a, [v](__nv_bfloat16 o) { return __float2bfloat16_rn(__bfloat162float(o) + __bfloat162float(v)); });
}
inline int atomicAdd(int* a, int v) { return __atomic_fetch_add(a, v, SIM_RLX); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, SIM_RLX); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return __atomic_fetch_add(a, v, SIM_RLX); }
inline int atomicSub(int* a, int v) { return __atomic_fetch_sub(a, v, SIM_RLX); }
inline unsigned atomicSub(unsigned* a, unsigned v) { return __atomic_fetch_sub(a, v, SIM_RLX); }
inline int atomicAnd(int* a, int v) { return __atomic_fetch_and(a, v, SIM_RLX); }
inline unsigned atomicAnd(unsigned* a, unsigned v) { return __atomic_fetch_and(a, v, SIM_RLX); }
inline int atomicOr(int* a, int v) { return __atomic_fetch_or(a, v, SIM_RLX); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, SIM_RLX); }
inline int atomicXor(int* a, int v) { return __atomic_fetch_xor(a, v, SIM_RLX); }
inline unsigned atomicXor(unsigned* a, unsigned v) { return __atomic_fetch_xor(a, v, SIM_RLX); }
inline int atomicMax(int* a, int v) { return sim_atomic_update(a, [v](int o) { return o > v ? o : v; }); }
inline unsigned atomicMax(unsigned* a, unsigned v) { return sim_atomic_update(a, [v](unsigned o) { return o > v ? o : v; }); }
inline int atomicMin(int* a, int v) { return sim_atomic_update(a, [v](int o) { return o < v ? o : v; }); }
inline unsigned atomicMin(unsigned* a, unsigned v) { return sim_atomic_update(a, [v](unsigned o) { return o < v ? o : v; }); }
inline long long atomicMax(long long* a, long long v) { return sim_atomic_update(a, [v](long long o) { return o > v ? o : v; }); }
inline long long atomicMin(long long* a, long long v) { return sim_atomic_update(a, [v](long long o) { return o < v ? o : v; }); }
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
    return sim_atomic_update(a, [v](unsigned long long o) { return o > v ? o : v; });
}
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) {
    return sim_atomic_update(a, [v](unsigned long long o) { return o < v ? o : v; });
}
template <typename T> inline T sim_atomic_cas(T* a, T compare, T val) {
    __atomic_compare_exchange_n(a, &compare, val, false, SIM_RLX, SIM_RLX);
    return compare;  // the value found: equal to `compare` exactly when the swap happened
}
inline int atomicCAS(int* a, int c, int v) { return sim_atomic_cas(a, c, v); }
inline unsigned atomicCAS(unsigned* a, unsigned c, unsigned v) { return sim_atomic_cas(a, c, v); }
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long c, unsigned long long v) { return sim_atomic_cas(a, c, v); }
inline unsigned short atomicCAS(unsigned short* a, unsigned short c, unsigned short v) { return sim_atomic_cas(a, c, v); }
inline int atomicExch(int* a, int v) { return __atomic_exchange_n(a, v, SIM_RLX); }
inline unsigned atomicExch(unsigned* a, unsigned v) { return __atomic_exchange_n(a, v, SIM_RLX); }
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) { return __atomic_exchange_n(a, v, SIM_RLX); }
inline float atomicExch(float* a, float v) {
    const uint32_t old = __atomic_exchange_n(reinterpret_cast<sim_bits32*>(a), __float_as_uint(v), SIM_RLX);
    return __uint_as_float(old);
}
#undef SIM_RLX
