// Shared between the CPU implementation (pgd_step.cpp) and the CUDA glue (pgd_step_cuda.cpp):
// argument checks with messages that name the offending argument, and the parsed arguments.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <vector>

namespace advcal {

enum class PgdNorm { kLinf, kL2 };

PgdNorm parse_norm(std::string_view norm);

// Checks lengths of the lists, dtypes (fp32/bf16/fp16, equal within a triple), shapes,
// devices (all on `device`), contiguity, eps >= 0, alpha finite, lo <= hi and neither NaN, and
// for L2 a leading sample dim.
// `grad` may be empty (random start). Throws c10::Error naming e.g. "grad[1]".
void check_pgd_args(at::TensorList x_adv, at::TensorList grad, at::TensorList x_orig,
                    c10::ArrayRef<double> alpha, c10::ArrayRef<double> eps,
                    c10::ArrayRef<double> lo, c10::ArrayRef<double> hi, PgdNorm norm,
                    c10::DeviceType device, bool has_grad);

// Per-sample 2-norms over all dims but the first, in fp32, clamped at 1e-12 (a NaN norm stays
// NaN): the same ATen calls the Python reference makes (torch.linalg.vector_norm(t.flatten(1),
// dim=1, dtype=float32).clamp_min(1e-12)), so fp32 results are bit-identical. Returns a
// contiguous (B,) fp32 tensor.
at::Tensor per_sample_norm(const at::Tensor& t);

constexpr float kNormEps = 1e-12f;

}  // namespace advcal
