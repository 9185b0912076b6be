// Kernels for the simulator's self-tests (sim only: some call host functions such as usleep).
// Each exercises one part of the simulated device: barriers, collectives, atomics, shared memory,
// launch limits, and the planted bugs the simulator must catch (a missing __syncthreads, a write
// past an allocation, a deadlock, a partial-warp collective).
#include <unistd.h>

#include "common.cuh"

// ---- barriers ------------------------------------------------------------------------------------

// Rounds of write-own / barrier / read-neighbour / barrier: any thread running past a barrier
// early reads a stale round. out[thread] = number of wrong reads.
extern "C" __global__ void barrier_order(int* out, int rounds) {
    __shared__ int s[1024];
    const int n = blockDim.x * blockDim.y * blockDim.z;
    const int t = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    int wrong = 0;
    for (int r = 0; r < rounds; r++) {
        s[t] = r * 4096 + t;
        __syncthreads();
        const int u = (t + 1 + r) % n;
        if (s[u] != r * 4096 + u) wrong++;
        __syncthreads();
    }
    const int block = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
    out[block * n + t] = wrong;
}

// Threads at or beyond `stay` exit at once; the rest meet at two barriers (different call sites
// for odd and even threads), which must still complete: exited threads no longer count.
extern "C" __global__ void barrier_with_exits(int* out, int stay) {
    __shared__ int s[1024];
    const int t = threadIdx.x;
    if (t >= stay) return;
    s[t] = t * 2;
    if (t % 2) __syncthreads();
    else __syncthreads();
    out[t] = s[(t + 1) % stay];
    __syncthreads();
    out[t] += 1;
}

// __syncthreads_count / _and / _or over rounds, with threads beyond `stay` gone.
extern "C" __global__ void barrier_reductions(int* out, int stay) {
    const int t = threadIdx.x;
    if (t >= stay) return;
    for (int r = 0; r < 3; r++) {
        out[r * 3 * stay + t] = __syncthreads_count(t % (r + 2) == 0);
        out[r * 3 * stay + stay + t] = __syncthreads_and(t < stay - r);
        out[r * 3 * stay + 2 * stay + t] = __syncthreads_or(t == r);
    }
}

// Every thread writes where it is: blockIdx, threadIdx, blockDim and gridDim over a 3D launch.
extern "C" __global__ void index_map(int* out) {
    const int bx = blockDim.x, by = blockDim.y, bz = blockDim.z;
    const int block = blockIdx.x + blockIdx.y * gridDim.x + blockIdx.z * gridDim.x * gridDim.y;
    const int t = threadIdx.x + threadIdx.y * bx + threadIdx.z * bx * by;
    const int i = block * bx * by * bz + t;
    out[i * 4 + 0] = (int)(threadIdx.x | threadIdx.y << 10 | threadIdx.z << 20);
    out[i * 4 + 1] = (int)(blockIdx.x | blockIdx.y << 10 | blockIdx.z << 20);
    out[i * 4 + 2] = (int)(gridDim.x | gridDim.y << 10 | gridDim.z << 20);
    out[i * 4 + 3] = (int)(bx | by << 10 | bz << 20);
}

// ---- warp collectives ----------------------------------------------------------------------------

// For each width in {32, 16, 8, 4, 2, 1} and each mode, one shuffle per type; results are laid out
// out[((width_index * 4 + mode) * threads) + thread] per type.
template <typename T> __device__ T shfl_value(int lane, int warp);
template <> __device__ int shfl_value<int>(int lane, int warp) { return lane * 3 + 1 + warp * 1000; }
template <> __device__ unsigned shfl_value<unsigned>(int lane, int warp) { return 0x80000000u + lane * 7u + warp; }
template <> __device__ float shfl_value<float>(int lane, int warp) { return lane * 0.5f - 3.0f + warp; }
template <> __device__ double shfl_value<double>(int lane, int warp) { return lane * 1e10 + 0.25 + warp; }
template <> __device__ long long shfl_value<long long>(int lane, int warp) { return (1LL << 40) * (lane + 1) - lane - warp; }
template <> __device__ unsigned long long shfl_value<unsigned long long>(int lane, int warp) {
    return 0xf000000000000000ull | ((unsigned long long)lane << 33) | (unsigned)warp;
}

template <typename T> __device__ void shuffle_all(T* out, int arg) {
    const int n = blockDim.x, t = threadIdx.x, lane = t % 32, warp = t / 32;
    const T v = shfl_value<T>(lane, warp);
    const int widths[6] = {32, 16, 8, 4, 2, 1};
    for (int w = 0; w < 6; w++) {
        out[((w * 4 + 0) * n) + t] = __shfl_sync(0xffffffff, v, arg + lane * 5, widths[w]);
        out[((w * 4 + 1) * n) + t] = __shfl_up_sync(0xffffffff, v, (unsigned)arg, widths[w]);
        out[((w * 4 + 2) * n) + t] = __shfl_down_sync(0xffffffff, v, (unsigned)arg, widths[w]);
        out[((w * 4 + 3) * n) + t] = __shfl_xor_sync(0xffffffff, v, arg, widths[w]);
    }
}
extern "C" __global__ void shuffle_int(int* out, int arg) { shuffle_all(out, arg); }
extern "C" __global__ void shuffle_unsigned(unsigned* out, int arg) { shuffle_all(out, arg); }
extern "C" __global__ void shuffle_float(float* out, int arg) { shuffle_all(out, arg); }
extern "C" __global__ void shuffle_double(double* out, int arg) { shuffle_all(out, arg); }
extern "C" __global__ void shuffle_int64(long long* out, int arg) { shuffle_all(out, arg); }
extern "C" __global__ void shuffle_uint64(unsigned long long* out, int arg) { shuffle_all(out, arg); }

// out[t * 8 + k]: ballot(lane % 3 == 0), all(true), all(lane != 7), any(lane == 5 + warp), any(false),
// activemask, reduce_add(lane), __syncwarp then warp_sum(lane) from common.cuh.
extern "C" __global__ void votes(unsigned* out) {
    const int t = threadIdx.x, lane = t % 32, warp = t / 32;
    out[t * 8 + 0] = __ballot_sync(0xffffffff, lane % 3 == 0);
    out[t * 8 + 1] = (unsigned)__all_sync(0xffffffff, 1);
    out[t * 8 + 2] = (unsigned)__all_sync(0xffffffff, lane != 7);
    out[t * 8 + 3] = (unsigned)__any_sync(0xffffffff, lane == 5 + warp);
    out[t * 8 + 4] = (unsigned)__any_sync(0xffffffff, 0);
    out[t * 8 + 5] = __activemask();
    out[t * 8 + 6] = __reduce_add_sync(0xffffffff, (unsigned)lane);
    __syncwarp();
    out[t * 8 + 7] = (unsigned)warp_sum((float)lane);
}

// block_sum and block_max of common.cuh over a whole block.
extern "C" __global__ void block_reduce(float* out, const float* in) {
    __shared__ float scratch[32];
    const float v = in[blockIdx.x * blockDim.x + threadIdx.x];
    const float s = block_sum(v, scratch);
    const float m = block_max(v, scratch);
    if (threadIdx.x == 0) {
        out[blockIdx.x * 2] = s;
        out[blockIdx.x * 2 + 1] = m;
    }
}

// ---- atomics -------------------------------------------------------------------------------------

struct atomic_slots {
    float f;
    int i;
    double d;
    unsigned u;
    int mx, mn;
    unsigned long long ull;
    unsigned cas;
    int exch;
    bf16 h;
};

extern "C" __global__ void atomics(atomic_slots* s) {
    const int g = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(&s->f, 1.0f);
    atomicAdd(&s->i, g);
    atomicAdd(&s->d, 0.5);
    atomicAdd(&s->u, 2u);
    atomicMax(&s->mx, g * 7 - 50);
    atomicMin(&s->mn, 100 - g);
    atomicAdd(&s->ull, 1ull << 33);
    unsigned old = atomicAdd(&s->cas, 0u), seen;  // the classic CAS increment loop
    while ((seen = atomicCAS(&s->cas, old, old + 1)) != old) old = seen;
    atomicExch(&s->exch, g);
    atomicAdd(&s->h, __float2bfloat16_rn(1.0f));
}

// ---- shared memory -------------------------------------------------------------------------------

// Dynamic shared memory of n floats: write, barrier, read reversed.
extern "C" __global__ void dynamic_reverse(float* out, const float* in, int n) {
    float* s = dynamic_smem<float>();
    for (int i = threadIdx.x; i < n; i += blockDim.x) s[i] = in[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) out[i] = s[n - 1 - i];
}

// Writes one float past the end of n floats of dynamic shared memory (planted bug).
extern "C" __global__ void dynamic_overflow(int n) {
    float* s = dynamic_smem<float>();
    if (threadIdx.x == 0) s[n] = 1.0f;
}

// Kernels whose resource rows (selftest_registry.cpp) are at the launch limits.
extern "C" __global__ void res_big_static() {}
extern "C" __global__ void res_mid_static() {}
extern "C" __global__ void res_many_registers() {}

// ---- parameters ----------------------------------------------------------------------------------

extern "C" __global__ void params_mixed(double* out, int a, double b, const float* p, int64_t c, uint16_t e) {
    if (threadIdx.x == 0) {
        out[0] = a;
        out[1] = b;
        out[2] = p ? p[0] : -1.0;
        out[3] = (double)c;
        out[4] = e;
    }
}

// ---- bf16 ----------------------------------------------------------------------------------------

extern "C" __global__ void bf16_round(bf16* out, float* back, const float* in, int n) {
    FOR_EACH(i, n) {
        out[i] = __float2bfloat16_rn(in[i]);
        back[i] = __bfloat162float(out[i]);
    }
}

// CUDA's min/max over mixed argument types (as the kernels call them with int and int64_t).
extern "C" __global__ void minmax_mixed(int64_t* out, int a, int64_t b, unsigned c) {
    if (threadIdx.x != 0) return;
    out[0] = min(a, b);
    out[1] = max(a, b);
    out[2] = (int64_t)min(c, a);  // unsigned, as CUDA's min(unsigned, int)
    out[3] = (int64_t)max(2.5f, a);
    out[4] = min((size_t)b, (size_t)7);
    out[5] = max((long long)a, 3);
}

// ---- streams and events --------------------------------------------------------------------------

extern "C" __global__ void sleep_ms(int ms) {
    if (blockIdx.x == 0 && threadIdx.x == 0) usleep((useconds_t)ms * 1000);
}
extern "C" __global__ void fill_value(float* p, int n, float v) { FOR_EACH(i, n) p[i] = v; }
extern "C" __global__ void copy_values(float* out, const float* in, int n) { FOR_EACH(i, n) out[i] = in[i]; }

// ---- planted bugs --------------------------------------------------------------------------------

// Each thread reads another's shared slot; `synced` 0 drops the __syncthreads (TSan must see it).
extern "C" __global__ void shared_exchange(float* out, int synced) {
    __shared__ float s[256];
    const int t = threadIdx.x, n = blockDim.x;
    s[t] = (float)t;
    if (synced) __syncthreads();
    out[blockIdx.x * n + t] = s[n - 1 - t];
}

// Block (32, 8): row lanes store partial values, lane 0 of each column adds them (reduce.cu's
// pattern); `synced` 0 drops the barrier between, as the Rust suite's planted bug does.
extern "C" __global__ void lanes_exchange(float* out, int synced) {
    __shared__ float lanes[8][32];
    lanes[threadIdx.y][threadIdx.x] = (float)(threadIdx.y + 1);
    if (synced) __syncthreads();
    if (threadIdx.y == 0) {
        float s = 0.0f;
        for (int l = 1; l < 8; l++) s += lanes[l][threadIdx.x];
        out[threadIdx.x] = s;
    }
}

// Thread 0 of the last block writes one element past n.
extern "C" __global__ void write_past_end(float* p, int n) {
    FOR_EACH(i, n) p[i] = 1.0f;
    if (blockIdx.x == gridDim.x - 1 && threadIdx.x == 0) p[n] = 2.0f;
}

// Lanes 0-15 wait at the block barrier, lanes 16-31 at a shuffle: neither can complete.
extern "C" __global__ void deadlock_mixed(float* out) {
    float v = (float)threadIdx.x;
    if (threadIdx.x % 32 < 16) __syncthreads();
    else v = __shfl_xor_sync(0xffffffff, v, 1);
    out[threadIdx.x] = v;
}

extern "C" __global__ void partial_mask(float* out) {
    out[threadIdx.x] = __shfl_down_sync(0x0000ffff, (float)threadIdx.x, 1);
}

// A full-mask shuffle: faulty when the block is not a multiple of 32, or when `exit_lane` >= 0
// leaves early.
extern "C" __global__ void full_shuffle(float* out, int exit_lane) {
    if ((int)(threadIdx.x % 32) == exit_lane) return;
    out[threadIdx.x] = warp_sum((float)threadIdx.x);
}

// ---- speed ---------------------------------------------------------------------------------------

extern "C" __global__ void bench_barrier(int* out, int iters) {
    int x = 0;
    for (int i = 0; i < iters; i++) {
        x += i;
        __syncthreads();
    }
    if (x == -1) out[0] = x;
}

extern "C" __global__ void bench_shuffle(float* out, int iters) {
    float v = (float)threadIdx.x;
    for (int i = 0; i < iters; i++) v = __shfl_xor_sync(0xffffffff, v, i & 31) * 0.5f;
    if (v == -1.0f) out[0] = v;
}

extern "C" __global__ void bench_elementwise(float* out, const float* in, int64_t n) {
    FOR_EACH(i, n) out[i] = in[i] * 2.0f + 1.0f;
}
