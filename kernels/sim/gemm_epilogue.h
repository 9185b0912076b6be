// cuBLASLt's matmul epilogues on the sim (internal to gemm.cpp and gemm_epilogue.cpp): which
// operands each epilogue has, the checks made when a matmul is queued, and the tanh GELU exactly as
// kernels/gelu.cu and the CPU reference compute it.
#pragma once
#include <math.h>
#include <stdint.h>

#include "internal.h"

namespace sim {

// 0 is the descriptor attribute left unset: cuBLASLt's default, CUBLASLT_EPILOGUE_DEFAULT.
inline int epilogue_of(const sim_gemm_desc& g) { return g.epilogue == 0 ? SIM_EPILOGUE_DEFAULT : g.epilogue; }

inline bool epilogue_has_aux(int e) {
    return e == SIM_EPILOGUE_GELU_AUX || e == SIM_EPILOGUE_GELU_AUX_BIAS || e == SIM_EPILOGUE_DGELU ||
           e == SIM_EPILOGUE_DGELU_BGRAD;
}
// The epilogue reads a bias vector (BIAS, GELU_AUX_BIAS) or writes a bias gradient (the others).
inline bool epilogue_has_bias(int e) {
    return e == SIM_EPILOGUE_BIAS || e == SIM_EPILOGUE_GELU_AUX_BIAS || e == SIM_EPILOGUE_DGELU_BGRAD ||
           e == SIM_EPILOGUE_BGRADB;
}
inline bool epilogue_writes_bias(int e) { return e == SIM_EPILOGUE_DGELU_BGRAD || e == SIM_EPILOGUE_BGRADB; }

// Validates the epilogue's attributes and pointers of a matmul with D of m x n, as cuBLASLt does
// when the matmul is set up: SIM_OK or the refusal (with sim_last_error set).
int check_epilogue(sim_device* dev, const sim_gemm_desc& g, uint64_t c, uint64_t d, uint64_t bias, uint64_t aux);

// tanh-form GELU and its derivative, from e = exp(-2|u|) without cancellation (kernels/gelu.cu).
inline void gelu_tanh_parts(float u, float* one_plus_tanh, float* sech2) {
    const float e = expf(-2.0f * fabsf(u));
    const float den = 1.0f + e;
    *one_plus_tanh = u >= 0.0f ? 2.0f / den : 2.0f * e / den;
    *sech2 = 4.0f * e / (den * den);
}
constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;
inline float gelu(float x) {
    float opt, sech2;
    gelu_tanh_parts(kGeluScale * (x + kGeluCubic * x * x * x), &opt, &sech2);
    return 0.5f * x * opt;
}
inline float gelu_slope(float x) {
    float opt, sech2;
    gelu_tanh_parts(kGeluScale * (x + kGeluCubic * x * x * x), &opt, &sech2);
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x * x);
    return 0.5f * opt + 0.5f * x * sech2 * du;
}

}  // namespace sim
