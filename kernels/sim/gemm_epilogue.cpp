// The checks sim_gemm_async makes of a matmul's epilogue when it is queued (the arithmetic is in
// gemm.cpp). cuBLASLt's documented requirements: the auxiliary matrix has D's type, a leading
// dimension that is a multiple of 8 and at least D's rows, and a 16-byte aligned address; the
// bias (or bias gradient) vector has D's type and one value per row of D (per column for BGRADB).
// Beyond those, the sim accepts each epilogue only in the configuration this project issues and
// cuBLASLt's users (llm.c, Transformer Engine) run it in, and refuses the rest rather than guess:
// no epilogue with an auxiliary matrix also reads C (beta 0), and BGRADB needs op(B) transposed
// (TRANSB = T: the gradient of the layer's output, the reduction running along B's leading dimension).
#include <stdio.h>

#include "gemm_epilogue.h"

namespace sim {
namespace {

const char* epilogue_name(int e) {
    switch (e) {
        case SIM_EPILOGUE_DEFAULT: return "DEFAULT";
        case SIM_EPILOGUE_BIAS: return "BIAS";
        case SIM_EPILOGUE_GELU_AUX: return "GELU_AUX";
        case SIM_EPILOGUE_GELU_AUX_BIAS: return "GELU_AUX_BIAS";
        case SIM_EPILOGUE_DGELU: return "DGELU";
        case SIM_EPILOGUE_DGELU_BGRAD: return "DGELU_BGRAD";
        case SIM_EPILOGUE_BGRADB: return "BGRADB";
        default: return nullptr;
    }
}

uint64_t elem_size(int type) { return type == SIM_F32 ? 4 : 2; }

// [p, p + bytes) and [q, q + bytes2) share a byte.
bool overlap(uint64_t p, uint64_t bytes, uint64_t q, uint64_t bytes2) {
    return bytes && bytes2 && p < q + bytes2 && q < p + bytes;
}

uint64_t span_bytes(uint64_t rows, uint64_t cols, uint64_t ld, int type) {
    return rows && cols ? ((cols - 1) * ld + rows) * elem_size(type) : 0;
}

}  // namespace

int check_epilogue(sim_device* dev, const sim_gemm_desc& g, uint64_t c, uint64_t d, uint64_t bias, uint64_t aux) {
    const int e = epilogue_of(g);
    const char* name = epilogue_name(e);
    if (!name) return fail(SIM_ERROR_INVALID, "sim_gemm_async: unknown epilogue %d", g.epilogue);
    const uint64_t m = g.d.rows, n = g.d.cols;
    const uint64_t d_bytes = span_bytes(m, n, g.d.ld, g.d.type);
    // C distinct from D: allowed with the same layout (ours always), but never partly the same memory.
    if (g.beta != 0.0f && c != d && overlap(c, span_bytes(m, n, g.c.ld, g.c.type), d, d_bytes))
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: C and D are distinct but overlap");
    if (epilogue_has_bias(e)) {
        if (!bias) return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s needs a bias pointer", name);
        if (g.bias_type != g.d.type)
            return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s: bias is %s but D is %s", name,
                        g.bias_type == SIM_F32 ? "f32" : "bf16", g.d.type == SIM_F32 ? "f32" : "bf16");
        const uint64_t len = e == SIM_EPILOGUE_BGRADB ? n : m;
        if (len) {
            if (int rc = mem_check_range(dev, bias, len * elem_size(g.bias_type), "sim_gemm_async bias")) return rc;
        }
        if (epilogue_writes_bias(e) && overlap(bias, len * elem_size(g.bias_type), d, d_bytes))
            return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s: the bias gradient overlaps D", name);
    } else if (bias) {
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: a bias pointer with epilogue %s, which has no bias", name);
    }
    if (epilogue_has_aux(e)) {
        if (!aux) return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s needs an aux pointer", name);
        if (g.aux_ld % 8 != 0 || g.aux_ld < (m ? m : 1))
            return fail(SIM_ERROR_INVALID,
                        "sim_gemm_async: epilogue %s: aux leading dimension %llu must be a multiple of 8 and >= %llu "
                        "rows",
                        name, (unsigned long long)g.aux_ld, (unsigned long long)m);
        if (aux % 16 != 0)
            return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s: aux pointer 0x%llx is not 16-byte aligned",
                        name, (unsigned long long)aux);
        if (g.beta != 0.0f)
            return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s with beta != 0 is not supported", name);
        const uint64_t aux_bytes = span_bytes(m, n, g.aux_ld, g.d.type);
        if (aux_bytes) {
            if (int rc = mem_check_range(dev, aux, aux_bytes, "sim_gemm_async aux")) return rc;
        }
        if (overlap(aux, aux_bytes, d, d_bytes))
            return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s: aux overlaps D", name);
        if (e == SIM_EPILOGUE_DGELU_BGRAD && overlap(aux, aux_bytes, bias, m * elem_size(g.bias_type)))
            return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue %s: aux overlaps the bias gradient", name);
    }
    if (e == SIM_EPILOGUE_BGRADB && !g.trans_b)
        return fail(SIM_ERROR_INVALID, "sim_gemm_async: epilogue BGRADB needs TRANSB = T");
    return SIM_OK;
}

}  // namespace sim
