// CPU kernels of the fused head and InfoNCE ops, in C++: advcal::head_fwd_cpu / head_bwd_cpu /
// infonce_fwd_cpu / infonce_bwd_cpu, the same schemas and math as the Python CPU bodies of
// advcal::head_fwd / head_bwd / infonce_fwd / infonce_bwd (advcal/ops/head_ce.py, infonce.py),
// which call these when the extension is built and keep their Python twins as the fallback.
//
// Why C++: the math is a dozen ATen calls per direction, each ~3 us from Python and ~1 us from
// here; at the demo's (B, D, K) = (128, 256, 10) on 2 cores the GEMMs take ~200 us of a ~450
// us step, so ~60 us of Python per forward+backward decided whether the fused path beat eager.
// The GEMMs: fp32 on oneDNN (mkldnn::_linear_pointwise, called through the dispatcher) from
// kOneDnnMinMacs multiply-adds up, where it runs AVX-512 and MKL (ATen's fp32 default) AVX2 on
// the AMD EPYC CI machine: 2.3x at 256 x 1024 x 1024; below, oneDNN's ~20 us setup loses.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace advcal {
namespace {

constexpr double kEps = 1e-12;          // F.normalize's eps
constexpr int64_t kModeCe = 0, kModeLogits = 1, kModeCos = 2;
constexpr int64_t kOneDnnMinMacs = int64_t{1} << 21;  // = ONEDNN_MIN_MACS in head_ce.py

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Three = std::tuple<Tensor, Tensor, Tensor>;

// mkldnn::_linear_pointwise when this torch has it (looked up once), else nullopt.
const std::optional<c10::OperatorHandle>& onednn_linear_op() {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}

// x @ w^T (+ b): (M, K) x (N, K) -> (M, N), any strides; oneDNN for fp32 from kOneDnnMinMacs
// multiply-adds when torch.backends.mkldnn is enabled, at::linear (MKL) otherwise.
Tensor linear_cpu(const Tensor& x, const Tensor& w, const OptTensor& b = std::nullopt) {
  const auto& op = onednn_linear_op();
  if (op && x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat &&
      at::globalContext().userEnabledMkldnn() &&
      x.size(0) * w.size(0) * x.size(1) >= kOneDnnMinMacs) {
    std::vector<c10::IValue> stack{x, w, b, c10::IValue(std::string("none")),
                                   c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                   c10::IValue()};
    op->callBoxed(&stack);
    return stack[0].toTensor();
  }
  return at::linear(x, w, b);
}

// The head's output z (B, D), fp32, a fresh tensor (see _project_cpu).
Tensor project(const Tensor& e, const OptTensor& weight, const OptTensor& bias, bool residual) {
  if (!weight) {
    Tensor z = e.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    return bias ? z.add_(*bias) : z;
  }
  Tensor z;
  if (e.scalar_type() != at::kFloat && weight->scalar_type() == e.scalar_type()) {
    OptTensor b = bias ? OptTensor(bias->to(e.scalar_type())) : std::nullopt;
    z = at::linear(e, *weight, b).to(at::kFloat);  // bf16 GEMM, as the reference
  } else {
    OptTensor b = bias ? OptTensor(bias->to(at::kFloat)) : std::nullopt;
    z = linear_cpu(e.to(at::kFloat), weight->to(at::kFloat), b);
  }
  return residual ? z.add_(e) : z;
}

// 1 / max(|z_b|, eps) per row, and |z_b|.
std::tuple<Tensor, Tensor> inv_norms(const Tensor& z) {
  Tensor nrm = at::linalg_vector_norm(z, 2, at::IntArrayRef{1});
  return {nrm.clamp_min(kEps).reciprocal_(), nrm};
}

// Gradient through u = z / max(|z|, eps) of du = v * s[:, None] (see _row_normalize_bwd).
Tensor row_normalize_bwd(const Tensor& z, const Tensor& v, const Tensor& s) {
  auto [rn, nrm] = inv_norms(z);
  Tensor a = s * rn;
  Tensor b = at::linalg_vecdot(z, v).mul_(a * rn * rn).masked_fill_(nrm < kEps, 0.0);
  return (v * a.unsqueeze(1)).addcmul_(z, b.unsqueeze(1), -1.0);
}

Three weight_grads(const Tensor& dz, const Tensor& e, const OptTensor& weight,
                   const OptTensor& bias, bool residual, bool need_e, bool need_w, bool need_b) {
  Tensor de = at::empty({0}, dz.options()), dw = at::empty({0}, dz.options()),
         db = at::empty({0}, dz.options());
  if (need_e) {
    if (!weight) {
      de = dz;
    } else {
      de = linear_cpu(dz, weight->to(dz.scalar_type()).t());
      if (residual) de.add_(dz);
    }
    de = de.to(e.scalar_type());
  }
  if (need_w && weight) {
    dw = linear_cpu(dz.t(), e.to(dz.scalar_type()).t()).to(weight->scalar_type());
  }
  if (need_b && bias) db = dz.sum(0, false, bias->scalar_type());
  return {de, dw, db};
}

Three head_fwd_cpu(const Tensor& e, const OptTensor& weight, const OptTensor& bias,
                   const Tensor& centers, const OptTensor& labels, double tau, bool residual,
                   int64_t mode, bool with_pc) {
  Tensor z = project(e, weight, bias, residual);
  Tensor c = centers.to(at::kFloat);
  Tensor rn = std::get<0>(inv_norms(z));
  Tensor empty = at::empty({0}, z.options());
  if (mode == kModeCos) {
    Tensor y = labels->to(at::kLong);
    return {at::linalg_vecdot(z, c.index_select(0, y)).mul_(rn), z, empty};
  }
  Tensor logits = linear_cpu(z, c).mul_(rn.div(tau).unsqueeze(1));
  if (mode == kModeLogits) return {logits, z, empty};
  Tensor y = labels->to(at::kLong);
  Tensor loss = at::cross_entropy_loss(logits, y, std::nullopt, at::Reduction::None);
  if (!with_pc) return {loss, z, empty};
  Tensor p = at::softmax(logits, 1).scatter_(1, y.unsqueeze(1), -1.0, "add");  // P - onehot
  return {loss, z, linear_cpu(p, c.t())};
}

Three head_bwd_cpu(const Tensor& grad, const Tensor& z, const Tensor& pc, const Tensor& centers,
                   const OptTensor& labels, const Tensor& e, const OptTensor& weight,
                   const OptTensor& bias, double tau, bool residual, int64_t mode, bool need_e,
                   bool need_w, bool need_b) {
  Tensor c = centers.to(at::kFloat);
  Tensor g = grad.to(at::kFloat);
  Tensor dz;
  if (mode == kModeLogits) {
    dz = row_normalize_bwd(z, linear_cpu(g, c.t()), at::full({z.size(0)}, 1.0 / tau, z.options()));
  } else if (mode == kModeCe) {
    dz = row_normalize_bwd(z, pc, g.div(tau));
  } else {
    dz = row_normalize_bwd(z, c.index_select(0, labels->to(at::kLong)), g);
  }
  return weight_grads(dz.to(e.scalar_type()), e, weight, bias, residual, need_e, need_w, need_b);
}

// S = normalize(a) normalize(c)^T / tau as (a c^T) * (rn_a / tau) rn_c^T.
Tensor similarity(const Tensor& a, const Tensor& c, const Tensor& rn_a, const Tensor& rn_c,
                  double tau) {
  return linear_cpu(a, c).mul_(rn_a.div(tau).unsqueeze(1)).mul_(rn_c.unsqueeze(0));
}

// Also returns S (B, B): the eager CPU autograd.Function saves it for the backward, which would
// otherwise recompute it (one more B x B x D GEMM: 0.95x eager at (128, 256), measured).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> infonce_fwd_cpu(const Tensor& z_adv,
                                                                           const Tensor& z_clean,
                                                                           double tau,
                                                                           bool symmetric) {
  Tensor a = z_adv.to(at::kFloat), c = z_clean.to(at::kFloat);
  Tensor rn_a = std::get<0>(inv_norms(a)), rn_c = std::get<0>(inv_norms(c));
  Tensor s = similarity(a, c, rn_a, rn_c, tau);
  Tensor cos_tau = s.diagonal();  // cos / tau
  Tensor lse_r = at::logsumexp(s, {1});
  Tensor loss = (lse_r - cos_tau).mean();
  Tensor lse_c = at::empty({0}, a.options());
  if (symmetric) {
    lse_c = at::logsumexp(s, {0});
    loss = (loss + (lse_c - cos_tau).mean()).mul_(0.5);
  }
  return {loss, rn_a, rn_c, lse_r, lse_c, s};
}

// s_saved: S from the forward, or empty (then recomputed); never modified (a retained graph may
// run this backward again).
std::tuple<Tensor, Tensor> infonce_bwd_cpu(const Tensor& grad, const Tensor& z_adv,
                                           const Tensor& z_clean, const Tensor& rn_a,
                                           const Tensor& rn_c, const Tensor& lse_r,
                                           const Tensor& lse_c, const Tensor& s_saved,
                                           double tau, bool symmetric, bool need_adv,
                                           bool need_clean) {
  Tensor a = z_adv.to(at::kFloat), c = z_clean.to(at::kFloat);
  const bool saved = s_saved.numel() > 0;
  Tensor s = saved ? s_saved : similarity(a, c, rn_a, rn_c, tau);
  const double bsz = static_cast<double>(a.size(0));
  const double w_r = symmetric ? 0.5 / bsz : 1.0 / bsz, w_c = symmetric ? 0.5 / bsz : 0.0;
  Tensor g = grad.to(at::kFloat);
  Tensor ds;
  ds = (s - lse_r.unsqueeze(1)).exp_().mul_(g * w_r);
  if (symmetric) {
    ds.add_((saved ? s - lse_c.unsqueeze(0) : s.sub_(lse_c.unsqueeze(0))).exp_().mul_(g * w_c));
  }
  ds.diagonal().sub_(g * (w_r + w_c));
  Tensor inv_tau = at::full({a.size(0)}, 1.0 / tau, a.options());
  Tensor da = at::empty({0}, a.options()), dc = at::empty({0}, a.options());
  if (need_adv) {
    da = row_normalize_bwd(a, linear_cpu(ds * rn_c.unsqueeze(0), c.t()), inv_tau)
             .to(z_adv.scalar_type());
  }
  if (need_clean) {
    dc = row_normalize_bwd(c, linear_cpu(ds.t() * rn_a.unsqueeze(0), a.t()), inv_tau)
             .to(z_clean.scalar_type());
  }
  return {da, dc};
}

}  // namespace

// Internal ops (no autograd, no fake kernels: called from the Python ops' CPU bodies and from
// the eager CPU autograd.Functions only; torch.compile sees advcal::head_fwd etc.).
TORCH_LIBRARY_FRAGMENT(advcal, m) {
  m.def(
      "head_fwd_cpu(Tensor e, Tensor? weight, Tensor? bias, Tensor centers, Tensor? labels, "
      "float tau, bool residual, int mode, bool with_pc) -> (Tensor, Tensor, Tensor)");
  m.def(
      "head_bwd_cpu(Tensor grad, Tensor z, Tensor pc, Tensor centers, Tensor? labels, Tensor e, "
      "Tensor? weight, Tensor? bias, float tau, bool residual, int mode, bool need_e, "
      "bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)");
  m.def(
      "infonce_fwd_cpu(Tensor z_adv, Tensor z_clean, float tau, bool symmetric) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "infonce_bwd_cpu(Tensor grad, Tensor z_adv, Tensor z_clean, Tensor rn_a, Tensor rn_c, "
      "Tensor lse_r, Tensor lse_c, Tensor s, float tau, bool symmetric, bool need_adv, "
      "bool need_clean) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(advcal, CPU, m) {
  m.impl("head_fwd_cpu", &head_fwd_cpu);
  m.impl("head_bwd_cpu", &head_bwd_cpu);
  m.impl("infonce_fwd_cpu", &infonce_fwd_cpu);
  m.impl("infonce_bwd_cpu", &infonce_bwd_cpu);
}

}  // namespace advcal
