// Self-tests of sim_gemm_async against a naive column-major reference (double accumulation): every
// transpose combination, bias, beta 0 over a NaN C, beta 1 in place, f32 and bf16, and the layout
// checks cuBLASLt makes when a matmul is set up.
#include <math.h>

#include <random>

#include "harness.h"

namespace {

uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float from_bf16(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// A column-major matrix with padding rows (ld > rows), as values and as the bytes of its type.
struct matrix {
    int type;
    uint64_t rows, cols, ld;
    std::vector<float> v;  // ld * cols, the values the device holds (already rounded for bf16)
    sim_matrix_layout layout() const { return {type, rows, cols, ld}; }
    float at(uint64_t i, uint64_t j) const { return v[i + j * ld]; }
    std::vector<uint8_t> bytes() const {
        std::vector<uint8_t> b(v.size() * (type == SIM_F32 ? 4 : 2));
        for (size_t i = 0; i < v.size(); i++) {
            if (type == SIM_F32) memcpy(&b[i * 4], &v[i], 4);
            else {
                const uint16_t h = to_bf16(v[i]);
                memcpy(&b[i * 2], &h, 2);
            }
        }
        return b;
    }
};

matrix random_matrix(std::mt19937& rng, int type, uint64_t rows, uint64_t cols, uint64_t pad) {
    matrix m{type, rows, cols, rows + pad, {}};
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    m.v.resize(m.ld * cols);
    for (float& x : m.v) x = type == SIM_F32 ? d(rng) : from_bf16(to_bf16(d(rng)));
    return m;
}

uint64_t upload(gpu& g, const matrix& m) {
    const std::vector<uint8_t> b = m.bytes();
    const uint64_t p = g.alloc(b.size());
    OK(sim_memcpy_htod_async(g.s, p, b.data(), b.size()));
    OK(sim_stream_synchronize(g.s));
    return p;
}

std::vector<float> download(gpu& g, uint64_t p, int type, size_t n) {
    std::vector<float> out(n);
    if (type == SIM_F32) return g.download<float>(p, n);
    const std::vector<uint16_t> h = g.download<uint16_t>(p, n);
    for (size_t i = 0; i < n; i++) out[i] = from_bf16(h[i]);
    return out;
}

struct gemm_case {
    int trans_a, trans_b;
    int in_type, out_type;
    float alpha, beta;
    bool bias, in_place;
};

void run_case(gpu& g, std::mt19937& rng, const gemm_case& c) {
    const uint64_t m = 37, n = 29, k = 53;
    const matrix a = c.trans_a ? random_matrix(rng, c.in_type, k, m, 3) : random_matrix(rng, c.in_type, m, k, 3);
    const matrix b = c.trans_b ? random_matrix(rng, c.in_type, n, k, 1) : random_matrix(rng, c.in_type, k, n, 1);
    matrix cm = random_matrix(rng, c.out_type, m, n, 2);
    matrix bias = random_matrix(rng, c.out_type, m, 1, 0);
    const uint64_t da = upload(g, a), db = upload(g, b), dbias = c.bias ? upload(g, bias) : 0;
    uint64_t dc = 0, dd = 0;
    if (c.beta == 0.0f) {
        dc = g.alloc(cm.ld * n * 4);  // never written: all NaN, and must not be read
        dd = g.alloc(cm.ld * n * (c.out_type == SIM_F32 ? 4 : 2));
    } else {
        dc = upload(g, cm);
        dd = c.in_place ? dc : g.alloc(cm.ld * n * (c.out_type == SIM_F32 ? 4 : 2));
    }
    sim_gemm_desc d{};
    d.trans_a = c.trans_a;
    d.trans_b = c.trans_b;
    d.a = a.layout();
    d.b = b.layout();
    d.c = cm.layout();
    d.d = cm.layout();
    d.alpha = c.alpha;
    d.beta = c.beta;
    d.epilogue = c.bias ? SIM_EPILOGUE_BIAS : SIM_EPILOGUE_DEFAULT;
    d.bias_type = c.out_type;
    OK(sim_gemm_async(g.s, &d, da, db, dc, dd, dbias, 0));
    const std::vector<float> got = download(g, dd, c.out_type, cm.ld * n);
    int wrong = 0;
    double worst = 0;
    for (uint64_t j = 0; j < n; j++)
        for (uint64_t i = 0; i < m; i++) {
            double s = 0, mag = 0;
            for (uint64_t p = 0; p < k; p++) {
                const double x = c.trans_a ? a.at(p, i) : a.at(i, p), y = c.trans_b ? b.at(j, p) : b.at(p, j);
                s += x * y;
                mag += fabs(x * y);
            }
            double want = c.alpha * s;
            if (c.beta != 0.0f) want += c.beta * cm.at(i, j);
            if (c.bias) want += bias.at(i, 0);
            // f32 accumulation error, plus one bf16 rounding of the result.
            double tol = 1e-6 * (mag * fabs(c.alpha) + 1) * 4;
            if (c.out_type == SIM_BF16) tol += fabs(want) / 128;
            const double err = fabs(got[i + j * cm.ld] - want);
            worst = err > worst ? err : worst;
            if (!(err <= tol)) wrong++;
        }
    CHECK_MSG(wrong == 0, "trans (%d,%d) %s->%s alpha %g beta %g bias %d in-place %d: %d wrong (worst error %g)",
              c.trans_a, c.trans_b, c.in_type == SIM_F32 ? "f32" : "bf16", c.out_type == SIM_F32 ? "f32" : "bf16",
              c.alpha, c.beta, c.bias, c.in_place, wrong, worst);
}

SIM_TEST(gemm_against_reference) {
    gpu g;
    std::mt19937 rng(7);
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            run_case(g, rng, {ta, tb, SIM_F32, SIM_F32, 1.0f, 0.0f, false, false});
            run_case(g, rng, {ta, tb, SIM_F32, SIM_F32, 1.5f, 0.5f, true, false});
            run_case(g, rng, {ta, tb, SIM_BF16, SIM_BF16, 1.0f, 0.0f, true, false});
            run_case(g, rng, {ta, tb, SIM_BF16, SIM_F32, 0.75f, 1.0f, false, true});
        }
    run_case(g, rng, {0, 1, SIM_F32, SIM_F32, 1.0f, 1.0f, true, true});
    run_case(g, rng, {1, 0, SIM_BF16, SIM_BF16, 2.0f, 1.0f, false, true});
}

// The row-major product the CUDA backend asks for (src/backend/cuda/blas.rs): out[m,n] = a[m,k] b[k,n]
// as D(n x m) = A(n x k, our b) B(k x m, our a), exact for small integers.
SIM_TEST(gemm_row_major_mapping) {
    gpu g;
    const uint64_t m = 3, n = 5, k = 7;
    std::vector<float> a(m * k), b(k * n);
    for (size_t i = 0; i < a.size(); i++) a[i] = (float)(i % 5) - 2;
    for (size_t i = 0; i < b.size(); i++) b[i] = (float)(i % 3) - 1;
    const uint64_t da = g.upload(a), db = g.upload(b), dout = g.alloc(m * n * 4);
    sim_gemm_desc d{};
    d.a = {SIM_F32, n, k, n};
    d.b = {SIM_F32, k, m, k};
    d.c = d.d = {SIM_F32, n, m, n};
    d.alpha = 1.0f;
    OK(sim_gemm_async(g.s, &d, db, da, 0, dout, 0, 0));
    const std::vector<float> out = g.download<float>(dout, m * n);
    for (uint64_t i = 0; i < m; i++)
        for (uint64_t j = 0; j < n; j++) {
            float s = 0;
            for (uint64_t p = 0; p < k; p++) s += a[i * k + p] * b[p * n + j];
            CHECK_MSG(out[i * n + j] == s, "out[%llu][%llu] %g, want %g", (unsigned long long)i, (unsigned long long)j,
                      out[i * n + j], s);
        }
}

SIM_TEST(gemm_refusals) {
    gpu g;
    const uint64_t buf = g.alloc(1 << 16), small = g.alloc(64);
    sim_gemm_desc ok{};
    ok.a = {SIM_F32, 8, 4, 8};
    ok.b = {SIM_F32, 4, 6, 4};
    ok.c = ok.d = {SIM_F32, 8, 6, 8};
    ok.alpha = 1.0f;
    OK(sim_gemm_async(g.s, &ok, buf, buf, 0, buf, 0, 0));
    auto refuse = [&](sim_gemm_desc d, int want, const char* text, uint64_t a, uint64_t bias = 0) {
        CHECK_RC(sim_gemm_async(g.s, &d, a, buf, buf, buf, bias, 0), want);
        CHECK_ERROR_HAS(text);
    };
    sim_gemm_desc d = ok;
    d.a.ld = 7;
    refuse(d, SIM_ERROR_INVALID, "leading dimension 7 < rows", buf);
    d = ok;
    d.trans_a = 1;  // op(A) becomes 4 x 8: disagrees with D's 8 rows
    refuse(d, SIM_ERROR_INVALID, "layouts disagree", buf);
    d = ok;
    d.c.cols = 5;
    refuse(d, SIM_ERROR_INVALID, "layouts disagree", buf);
    d = ok;
    d.epilogue = SIM_EPILOGUE_BIAS;
    d.bias_type = SIM_F32;
    refuse(d, SIM_ERROR_INVALID, "needs a bias pointer", buf);
    refuse(ok, SIM_ERROR_INVALID, "which has no bias", buf, buf);
    d.bias_type = SIM_BF16;
    refuse(d, SIM_ERROR_INVALID, "bias is bf16 but D is f32", buf, buf);
    d = ok;
    d.c.type = d.d.type = SIM_BF16;
    refuse(d, SIM_ERROR_INVALID, "unsupported types", buf);
    d = ok;
    d.a.type = 9;
    refuse(d, SIM_ERROR_INVALID, "unknown type", buf);
    refuse(ok, SIM_ERROR_MEMORY, "matrix A", small);
    d = ok;
    d.beta = 1.0f;
    d.c.ld = 9;
    d.c.rows = 8;
    CHECK_RC(sim_gemm_async(g.s, &d, buf, buf, buf, buf, 0, 0), SIM_ERROR_INVALID);
    CHECK_ERROR_HAS("in place");
    OK(sim_stream_synchronize(g.s));
}

}  // namespace

namespace {

SIM_TEST(bench_gemm) {
    gpu g;
#if defined(FLAVOR_ASAN) || defined(FLAVOR_TSAN)
    const uint64_t n = 192;  // instrumented loads: the number means little, the time would
#else
    const uint64_t n = 512;
#endif
    for (int type : {SIM_F32, SIM_BF16}) {
        const uint64_t bytes = n * n * (type == SIM_F32 ? 4 : 2);
        const uint64_t a = g.alloc(bytes), b = g.alloc(bytes), d = g.alloc(bytes);
        OK(sim_memset_d8_async(g.s, a, 0x3c, bytes));
        OK(sim_memset_d8_async(g.s, b, 0x3c, bytes));
        sim_gemm_desc desc{};
        desc.a = desc.b = desc.c = desc.d = {type, n, n, n};
        desc.trans_a = 1;
        desc.alpha = 1.0f;
        OK(sim_stream_synchronize(g.s));
        const double t = now_ms();
        OK(sim_gemm_async(g.s, &desc, a, b, 0, d, 0, 0));
        OK(sim_stream_synchronize(g.s));
        const double ms = now_ms() - t;
        fprintf(stderr, "     gemm %llu^3 %s: %.2f GFLOP/s (%.1f ms)\n", (unsigned long long)n,
                type == SIM_F32 ? "f32" : "bf16", 2.0 * n * n * n / ms / 1e6, ms);
    }
}

}  // namespace
