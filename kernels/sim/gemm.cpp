// sim_gemm_async: cublasLtMatmul's documented column-major contract (D = alpha op(A) op(B) +
// beta C, then the epilogue: bias, GELU with its input kept, GELU backward, bias gradients),
// validated when queued as cuBLASLt validates its layouts (the epilogue's checks are in
// gemm_epilogue.cpp), computed on the worker with f32 accumulation in a fixed order and rounded
// once per output.
#include <stdio.h>
#include <string.h>

#include <vector>

#include "gemm_epilogue.h"
#include "internal.h"

namespace sim {
namespace {

const char* type_name(int t) { return t == SIM_F32 ? "f32" : t == SIM_BF16 ? "bf16" : "unknown"; }
size_t type_size(int t) { return t == SIM_F32 ? 4 : 2; }

inline float load(const void* p, int type, uint64_t i) {
    if (type == SIM_F32) return static_cast<const float*>(p)[i];
    uint16_t h = static_cast<const uint16_t*>(p)[i];
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

inline void store(void* p, int type, uint64_t i, float v) {
    if (type == SIM_F32) {
        static_cast<float*>(p)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fff : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    static_cast<uint16_t*>(p)[i] = h;
}

// Elements a column-major layout spans: (cols - 1) * ld + rows.
uint64_t extent(const sim_matrix_layout& l) { return l.rows && l.cols ? (l.cols - 1) * l.ld + l.rows : 0; }

int check_layout(const char* which, const sim_matrix_layout& l) {
    if (l.type != SIM_F32 && l.type != SIM_BF16)
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: layout %s has unknown type %d", which, l.type);
    if (l.ld < (l.rows ? l.rows : 1))
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: layout %s (%llu x %llu) has leading dimension %llu < rows", which,
                    (unsigned long long)l.rows, (unsigned long long)l.cols, (unsigned long long)l.ld);
    return SIM_OK;
}

int check_operand(sim_device* dev, const char* which, const sim_matrix_layout& l, uint64_t ptr) {
    const uint64_t n = extent(l);
    if (n == 0) return SIM_OK;
    if (!ptr) return fail(SIM_ERROR_INVALID, "sim_gemm_async: matrix %s is a null pointer", which);
    char what[64];
    snprintf(what, sizeof what, "sim_gemm_async matrix %s", which);
    return mem_check_range(dev, ptr, n * type_size(l.type), what);
}

constexpr uint64_t kRowBlock = 256;  // rows of op(A) converted at once: 256 x k floats stay in cache
constexpr uint64_t kColBlock = 4;    // columns of D computed together, sharing each op(A) load

constexpr uint64_t kStrip = 8;  // rows of a register tile: 4 x 8 accumulators fit the SSE registers

// One 8-row by 4-column tile of D, its accumulators in registers for the whole k loop (the edge
// loop in run() keeps them in memory, which costs three memory operations per product).
inline void strip(const float* __restrict a, uint64_t lda, const float* __restrict b, uint64_t k,
                  float (*acc)[kRowBlock], uint64_t row) {
    float r[kColBlock][kStrip] = {};
    for (uint64_t p = 0; p < k; p++) {
        const float* __restrict ap = a + p * lda;
        for (uint64_t jj = 0; jj < kColBlock; jj++) {
            const float bv = b[jj * k + p];
            for (uint64_t ii = 0; ii < kStrip; ii++) r[jj][ii] += ap[ii] * bv;
        }
    }
    for (uint64_t jj = 0; jj < kColBlock; jj++)
        for (uint64_t ii = 0; ii < kStrip; ii++) acc[jj][row + ii] = r[jj][ii];
}

// BGRADB's bias gradient: bias[j] = sum over p of op(B)[p, j], in order p = 0, 1, ... in f32.
void bias_grad_of_b(const sim_gemm_desc& g, const void* b, void* bias) {
    const uint64_t n = g.d.cols, k = g.trans_a ? g.a.rows : g.a.cols;
    for (uint64_t j = 0; j < n; j++) {
        float sum = 0.0f;
        for (uint64_t p = 0; p < k; p++) sum += load(b, g.b.type, g.trans_b ? j + p * g.b.ld : p + j * g.b.ld);
        store(bias, g.bias_type, j, sum);
    }
}

void run(const sim_gemm_desc& g, const void* a, const void* b, const void* c, void* d, void* bias, void* aux) {
    const uint64_t m = g.d.rows, n = g.d.cols, k = g.trans_a ? g.a.rows : g.a.cols;
    const int epilogue = epilogue_of(g);
    const bool add_bias = epilogue == SIM_EPILOGUE_BIAS || epilogue == SIM_EPILOGUE_GELU_AUX_BIAS;
    const bool gelu_aux = epilogue == SIM_EPILOGUE_GELU_AUX || epilogue == SIM_EPILOGUE_GELU_AUX_BIAS;
    const bool dgelu = epilogue == SIM_EPILOGUE_DGELU || epilogue == SIM_EPILOGUE_DGELU_BGRAD;
    // DGELU_BGRAD's row sums of D, each over j = 0, 1, ... (the loops below visit a row's columns in order).
    std::vector<float> row_sums(epilogue == SIM_EPILOGUE_DGELU_BGRAD ? m : 0, 0.0f);
    std::vector<float> ablk(kRowBlock * (k ? k : 1));
    std::vector<float> bblk(kColBlock * (k ? k : 1));
    float acc[kColBlock][kRowBlock];
    for (uint64_t i0 = 0; i0 < m; i0 += kRowBlock) {
        const uint64_t ib = m - i0 < kRowBlock ? m - i0 : kRowBlock;
        // op(A) rows i0 .. i0+ib, as contiguous columns of length ib.
        for (uint64_t p = 0; p < k; p++)
            for (uint64_t ii = 0; ii < ib; ii++) {
                const uint64_t i = i0 + ii;
                ablk[p * ib + ii] = load(a, g.a.type, g.trans_a ? p + i * g.a.ld : i + p * g.a.ld);
            }
        for (uint64_t j0 = 0; j0 < n; j0 += kColBlock) {
            const uint64_t jb = n - j0 < kColBlock ? n - j0 : kColBlock;
            for (uint64_t jj = 0; jj < jb; jj++)
                for (uint64_t p = 0; p < k; p++) {
                    const uint64_t j = j0 + jj;
                    bblk[jj * k + p] = load(b, g.b.type, g.trans_b ? j + p * g.b.ld : p + j * g.b.ld);
                }
            // Each D element sums its k products in order p = 0, 1, ...: deterministic, and the same
            // order in the register-tiled strips as in the edge loop.
            for (uint64_t ii0 = 0; ii0 < ib; ii0 += kStrip) {
                if (jb == kColBlock && ib - ii0 >= kStrip) {
                    strip(&ablk[ii0], ib, bblk.data(), k, acc, ii0);
                    continue;
                }
                const uint64_t iend = ib - ii0 < kStrip ? ib : ii0 + kStrip;
                for (uint64_t jj = 0; jj < jb; jj++)
                    for (uint64_t ii = ii0; ii < iend; ii++) acc[jj][ii] = 0.0f;
                for (uint64_t p = 0; p < k; p++) {
                    const float* ap = &ablk[p * ib];
                    for (uint64_t jj = 0; jj < jb; jj++) {
                        const float bv = bblk[jj * k + p];
                        for (uint64_t ii = ii0; ii < iend; ii++) acc[jj][ii] += ap[ii] * bv;
                    }
                }
            }
            for (uint64_t jj = 0; jj < jb; jj++) {
                const uint64_t j = j0 + jj;
                for (uint64_t ii = 0; ii < ib; ii++) {
                    const uint64_t i = i0 + ii;
                    float v = g.alpha * acc[jj][ii];
                    if (g.beta != 0.0f) v += g.beta * load(c, g.c.type, i + j * g.c.ld);  // beta 0: C unread
                    if (add_bias) v += load(bias, g.bias_type, i);
                    if (gelu_aux) {
                        store(aux, g.d.type, i + j * g.aux_ld, v);  // GELU's input, rounded once
                        v = gelu(v);                                // of the unrounded value
                    } else if (dgelu) {
                        v *= gelu_slope(load(aux, g.d.type, i + j * g.aux_ld));
                        if (!row_sums.empty()) row_sums[i] += v;
                    }
                    store(d, g.d.type, i + j * g.d.ld, v);
                }
            }
        }
    }
    for (uint64_t i = 0; i < row_sums.size(); i++) store(bias, g.bias_type, i, row_sums[i]);
    if (epilogue == SIM_EPILOGUE_BGRADB) bias_grad_of_b(g, b, bias);
}

}  // namespace
}  // namespace sim

using namespace sim;

extern "C" int sim_gemm_async(sim_stream* s, const sim_gemm_desc* desc, uint64_t a, uint64_t b, uint64_t c,
                              uint64_t d, uint64_t bias, uint64_t aux) {
    SIM_HANDLE(s);
    if (!s || !desc) return fail(SIM_ERROR_INVALID, "sim_gemm_async: null argument");
    sim_device* dev = s->dev;
    if (int rc = sticky_check(dev)) return rc;
    const sim_gemm_desc g = *desc;
    if (int rc = check_layout("A", g.a)) return rc;
    if (int rc = check_layout("B", g.b)) return rc;
    if (int rc = check_layout("C", g.c)) return rc;
    if (int rc = check_layout("D", g.d)) return rc;
    const uint64_t m = g.d.rows, n = g.d.cols;
    const uint64_t a_rows = g.trans_a ? g.a.cols : g.a.rows, k = g.trans_a ? g.a.rows : g.a.cols;
    const uint64_t b_rows = g.trans_b ? g.b.cols : g.b.rows, b_cols = g.trans_b ? g.b.rows : g.b.cols;
    if (a_rows != m || b_rows != k || b_cols != n || g.c.rows != m || g.c.cols != n)
        return fail(SIM_ERROR_INVALID,
                    "sim_gemm_async: layouts disagree: op(A) is %llu x %llu (trans %d), op(B) %llu x %llu (trans %d), C "
                    "%llu x %llu, D %llu x %llu",
                    (unsigned long long)a_rows, (unsigned long long)k, g.trans_a, (unsigned long long)b_rows,
                    (unsigned long long)b_cols, g.trans_b, (unsigned long long)g.c.rows, (unsigned long long)g.c.cols,
                    (unsigned long long)m, (unsigned long long)n);
    // The type combinations cuBLASLt runs with CUBLAS_COMPUTE_32F: f32 x f32 -> f32, bf16 x bf16 -> bf16 or f32.
    if (g.a.type != g.b.type || g.c.type != g.d.type || (g.a.type == SIM_F32 && g.d.type != SIM_F32))
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: unsupported types A %s, B %s, C %s, D %s", type_name(g.a.type),
                    type_name(g.b.type), type_name(g.c.type), type_name(g.d.type));
    if (c == d && c && (g.c.ld != g.d.ld || g.c.type != g.d.type))
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: in place (C == D) needs identical C and D layouts");
    if (int rc = check_operand(dev, "A", g.a, a)) return rc;
    if (int rc = check_operand(dev, "B", g.b, b)) return rc;
    if (int rc = check_operand(dev, "D", g.d, d)) return rc;
    if (g.beta != 0.0f)
        if (int rc = check_operand(dev, "C", g.c, c)) return rc;
    if (int rc = check_epilogue(dev, g, c, d, bias, aux)) return rc;
    const void* pa = reinterpret_cast<const void*>(a);
    const void* pb = reinterpret_cast<const void*>(b);
    const void* pc = reinterpret_cast<const void*>(c);
    void* pd = reinterpret_cast<void*>(d);
    void* pbias = reinterpret_cast<void*>(bias);
    void* paux = reinterpret_cast<void*>(aux);
    return enqueue(s, OP_WORK, [g, pa, pb, pc, pd, pbias, paux] { run(g, pa, pb, pc, pd, pbias, paux); });
}
