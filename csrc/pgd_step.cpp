// advcal::pgd_step_ and advcal::random_start_: schema, argument checks, CPU kernels, and the
// Python module stub. The CUDA implementation registers in pgd_step_cuda.cpp (CUDA builds).
//
// CPU memory traffic, fp32 (bf16/fp16 halve it):
//   L-inf step: one pass, read x, g, x0, write x = 16 B/element, no temporaries (the eager
//               chain of ~8 ops moves ~68 B/element and allocates 6 tensors of the input's size).
//   L2 step:    ||g|| per sample (read g, 4 B) -> pass writing d = x + g alpha/||g|| - x0 into x
//               (16 B) -> ||d|| per sample (read x, 4 B) -> pass x = clamp(x0 + d min(1,
//               eps/||d||)) (12 B) = 36 B/element; the only temporaries are (B,) norms. The norms
//               are ATen's linalg_vector_norm, the very call the Python reference makes, so fp32
//               results are bit-identical to it.
// Element arithmetic is in fp32, with one rounding to the storage type per stored value, in the
// reference's order of operations; the extension is compiled with -ffp-contract=off so no
// multiply-add is fused behind our back.
// Threads: at::parallel_for splits the passes over torch's intra-op threads only when this
// file is compiled with -fopenmp (ATen's OpenMP backend is inline in its headers); without it
// (setup.py passes no -fopenmp today) it runs them on the calling thread. Measured on the
// 2-core CI machine with -fopenmp: L-inf 1e5/1e6 fp32 ~1.8x faster (0.046 -> 0.025 ms, 0.43
// -> 0.22 ms best-of-41), 1e7 near the memory bandwidth either way.

#include "pgd_step.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>

namespace advcal {

// ------------------------------------------------------------------------------------ checks

PgdNorm parse_norm(std::string_view norm) {
  if (norm == "linf") return PgdNorm::kLinf;
  if (norm == "l2") return PgdNorm::kL2;
  TORCH_CHECK(false, "advcal::pgd_step_: norm must be 'linf' or 'l2', got '", std::string(norm),
              "'");
}

namespace {

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_list_len(size_t got, size_t want, const char* name) {
  TORCH_CHECK(got == want, "advcal::pgd_step_: ", name, " has ", got, " entries but x_adv has ",
              want, " tensors (one entry per tensor)");
}

void check_tensor(const at::Tensor& t, const at::Tensor& x, const char* name, size_t i,
                  c10::DeviceType device) {
  TORCH_CHECK(t.defined(), "advcal::pgd_step_: ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device().type() == device, "advcal::pgd_step_: ", name, "[", i, "] is on ",
              t.device(), " but this kernel runs on ", c10::DeviceTypeName(device, true),
              "; move all tensors of the call to one device");
  TORCH_CHECK(t.device() == x.device(), "advcal::pgd_step_: ", name, "[", i, "] is on ", t.device(),
              " but x_adv[", i, "] is on ", x.device());
  TORCH_CHECK(supported_dtype(t.scalar_type()), "advcal::pgd_step_: ", name, "[", i, "] has dtype ",
              t.scalar_type(), "; expected float32, bfloat16 or float16");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "advcal::pgd_step_: ", name, "[", i,
              "] has dtype ", t.scalar_type(), " but x_adv[", i, "] has ", x.scalar_type());
  TORCH_CHECK(t.sizes() == x.sizes(), "advcal::pgd_step_: ", name, "[", i, "] has shape ",
              t.sizes(), " but x_adv[", i, "] has shape ", x.sizes());
  TORCH_CHECK(t.is_contiguous(), "advcal::pgd_step_: ", name, "[", i,
              "] is not contiguous; pass .contiguous() tensors");
}

}  // namespace

void check_pgd_args(at::TensorList x_adv, at::TensorList grad, at::TensorList x_orig,
                    c10::ArrayRef<double> alpha, c10::ArrayRef<double> eps,
                    c10::ArrayRef<double> lo, c10::ArrayRef<double> hi, PgdNorm norm,
                    c10::DeviceType device, bool has_grad) {
  const size_t n = x_adv.size();
  if (has_grad) check_list_len(grad.size(), n, "grad");
  check_list_len(x_orig.size(), n, "x_orig");
  if (has_grad) check_list_len(alpha.size(), n, "alpha");
  check_list_len(eps.size(), n, "eps");
  check_list_len(lo.size(), n, "lo");
  check_list_len(hi.size(), n, "hi");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& x = x_adv[i];
    check_tensor(x, x, "x_adv", i, device);
    if (has_grad) check_tensor(grad[i], x, "grad", i, device);
    check_tensor(x_orig[i], x, "x_orig", i, device);
    TORCH_CHECK(eps[i] >= 0, "advcal::pgd_step_: eps[", i, "] = ", eps[i], " must be >= 0");
    if (has_grad) {
      TORCH_CHECK(std::isfinite(alpha[i]), "advcal::pgd_step_: alpha[", i, "] = ", alpha[i],
                  " must be finite");
    }
    TORCH_CHECK(!std::isnan(lo[i]) && !std::isnan(hi[i]), "advcal::pgd_step_: lo[", i,
                "] = ", lo[i], ", hi[", i, "] = ", hi[i],
                ": bounds must not be NaN (use -inf/+inf for none)");
    TORCH_CHECK(!(lo[i] > hi[i]), "advcal::pgd_step_: lo[", i, "] = ", lo[i], " > hi[", i,
                "] = ", hi[i]);
    TORCH_CHECK(norm != PgdNorm::kL2 || x.dim() >= 1, "advcal::pgd_step_: x_adv[", i,
                "] is 0-dimensional; norm='l2' needs a leading sample dimension");
  }
}

at::Tensor per_sample_norm(const at::Tensor& t) {
  auto n =
      at::linalg_vector_norm(t.view({t.size(0), -1}), 2, at::IntArrayRef{1}, false, at::kFloat);
  return at::clamp_min(n, kNormEps).contiguous();
}

namespace {

// L2 random start on CPU: random_start_ref_ op for op, so the draws (torch.randn, torch.rand
// on the same generator) and the result are bit-identical to it. Runs once per attack; the
// (B,)-sized and direction temporaries are fine there. (CUDA has a fused kernel instead.)
void random_start_l2_cpu(at::TensorList x_adv, at::TensorList x_orig, c10::ArrayRef<double> eps,
                         c10::ArrayRef<double> lo, c10::ArrayRef<double> hi,
                         std::optional<at::Generator> generator) {
  for (size_t i = 0; i < x_adv.size(); ++i) {
    const at::Tensor& x = x_adv[i];
    if (x.numel() == 0) continue;
    const auto fopts = x.options().dtype(at::kFloat);
    at::Tensor d = at::randn(x.sizes(), generator, fopts);
    at::Tensor r = at::rand({x.size(0)}, generator, fopts);
    std::vector<int64_t> shape(x.dim(), 1);
    shape[0] = x.size(0);
    at::Tensor scale = at::full_like(r, eps[i]).div_(per_sample_norm(d)).mul_(r).view(shape);
    at::Tensor v = at::add(x_orig[i].to(at::kFloat), at::mul(d, scale));
    v.clamp_(lo[i], hi[i]);
    x.copy_(v);
  }
}

// ----------------------------------------------------------------------------------- CPU

using fVec = at::vec::Vectorized<float>;

// fn(T{}) for the three dtypes the op takes (checked before).
template <typename Fn>
void dispatch_float_types(at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(at::BFloat16{});
    case at::kHalf:
      return fn(at::Half{});
    default:
      TORCH_CHECK(false, "advcal: unsupported dtype ", t);
  }
}

// x[i] <- op(x[i], a[i], b[i]) in fp32 vectors over [begin, end); a full Vectorized<T> at a
// time, then one partial vector (no scalar copy of the maths, so the tail rounds the same way).
template <typename T, typename Op>
void map_inplace(T* x, const T* a, const T* b, int64_t begin, int64_t end, const Op& op) {
  using V = at::vec::Vectorized<T>;
  auto apply = [&](const V& xv, const V& av, const V& bv) -> V {
    if constexpr (std::is_same_v<T, float>) {
      return op(xv, av, bv);
    } else {
      auto [x0, x1] = at::vec::convert_to_float<T>(xv);
      auto [a0, a1] = at::vec::convert_to_float<T>(av);
      auto [b0, b1] = at::vec::convert_to_float<T>(bv);
      return at::vec::convert_from_float<T>(op(x0, a0, b0), op(x1, a1, b1));
    }
  };
  int64_t i = begin;
  for (; i + V::size() <= end; i += V::size()) {
    apply(V::loadu(x + i), V::loadu(a + i), V::loadu(b + i)).store(x + i);
  }
  if (i < end) {
    const int64_t c = end - i;
    apply(V::loadu(x + i, c), V::loadu(a + i, c), V::loadu(b + i, c)).store(x + i, c);
  }
}

fVec clamp_nan(const fVec& v, const fVec& lo, const fVec& hi) {
  return at::vec::minimum(at::vec::maximum(v, lo), hi);
}

// The L-inf update on fp32 arrays. A plain loop of compares and selects, which the compiler
// vectorises (gcc 12 -O3 -fopt-info-vec: "loop vectorized using 16 byte vectors"), but only to
// the baseline ISA of an extension build, SSE, where it is compute-bound in cache. So it is
// compiled three times (function multiversioning, resolved once at load through an ifunc):
// AVX-512, AVX2 and the SSE default. Measured on the 2-core CI machine (AVX-512), one thread,
// best of 41: N = 1e5 0.059 -> 0.021 ms, 1e6 0.595 -> 0.148 ms; 1e7 stays memory-bound.
// (at::vec would not help in this build: without a CPU_CAPABILITY flag its Vectorized<float>
// is the portable fallback, whose maximum/minimum are per-element loops with NaN branches,
// ~10x slower, measured.) -ffp-contract=off holds for every clone: no FMA, bit-exact with the
// reference on any of them. Same operations as the reference:
// t = x + sign(g) * alpha; t = min(max(t, x0 - eps), x0 + eps); t = min(max(t, lo), hi).
// NaN as in torch: sign(NaN) = 0 there ((0 < g) - (g < 0), pytorch/pytorch#41245), so a NaN
// gradient element takes no step; a compare with NaN is false, so the selects keep a NaN t
// (from x), and the last select makes the result NaN when x0 is (torch.maximum(t, NaN) = NaN).
// lo and hi are never NaN (checked).
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define ADVCAL_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#endif
#endif
#ifndef ADVCAL_SIMD_CLONES
#define ADVCAL_SIMD_CLONES
#endif
ADVCAL_SIMD_CLONES
void linf_update_f32(float* __restrict__ x, const float* __restrict__ g,
                     const float* __restrict__ x0, int64_t n, float alpha, float eps, float lo,
                     float hi) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i], oi = x0[i];
    // torch.sign, branch-free (random signs would mispredict ~50%: 10 ns/element measured)
    const float s = static_cast<float>(gi > 0.f) - static_cast<float>(gi < 0.f);
    float t = x[i] + s * alpha;
    const float lb = oi - eps, ub = oi + eps;
    t = t < lb ? lb : t;
    t = t > ub ? ub : t;
    t = t < lo ? lo : t;
    t = t > hi ? hi : t;
    x[i] = oi != oi ? oi : t;
  }
}

// clamp(v, lo, hi) keeping a NaN v (lo, hi are not NaN).
inline float clamp_keep_nan(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

template <typename T>
void linf_step_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& x0, float alpha,
                   float eps, float lo, float hi) {
  T* xp = x.data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  const T* op = x0.const_data_ptr<T>();
  at::parallel_for(0, x.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      linf_update_f32(xp + begin, gp + begin, op + begin, end - begin, alpha, eps, lo, hi);
    } else {
      // bf16/fp16: widen a cache-sized chunk to fp32 on the stack, update, round once back.
      constexpr int64_t kChunk = 1024;
      float xb[kChunk], gb[kChunk], ob[kChunk];
      for (int64_t c = begin; c < end; c += kChunk) {
        const int64_t n = std::min(kChunk, end - c);
        for (int64_t i = 0; i < n; ++i) {
          xb[i] = static_cast<float>(xp[c + i]);
          gb[i] = static_cast<float>(gp[c + i]);
          ob[i] = static_cast<float>(op[c + i]);
        }
        linf_update_f32(xb, gb, ob, n, alpha, eps, lo, hi);
        for (int64_t i = 0; i < n; ++i) xp[c + i] = static_cast<T>(xb[i]);
      }
    }
  });
}

// Calls fn(sample, begin, end) for the parts of [begin, end) that lie in each sample of m.
template <typename Fn>
void for_each_sample(int64_t begin, int64_t end, int64_t m, const Fn& fn) {
  while (begin < end) {
    const int64_t b = begin / m;
    const int64_t stop = std::min(end, (b + 1) * m);
    fn(b, begin, stop);
    begin = stop;
  }
}

template <typename T>
void l2_step_cpu(const at::Tensor& x, const at::Tensor& g, const at::Tensor& x0, float alpha,
                 float eps, float lo, float hi) {
  const int64_t n = x.numel(), m = n / x.size(0);
  T* xp = x.data_ptr<T>();
  const T* gp = g.const_data_ptr<T>();
  const T* op = x0.const_data_ptr<T>();
  // s_b = alpha / ||g_b||, one IEEE division per sample (the reference's full_like().div_()).
  at::Tensor s = per_sample_norm(g);
  float* sp = s.data_ptr<float>();
  for (int64_t b = 0; b < s.numel(); ++b) sp[b] = alpha / sp[b];
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for_each_sample(begin, end, m, [&](int64_t b, int64_t lo_i, int64_t hi_i) {
      const fVec vs(sp[b]);
      map_inplace<T>(xp, gp, op, lo_i, hi_i,
                     [&](fVec xv, fVec gv, fVec ov) { return (xv + gv * vs) - ov; });
    });
  });
  // x now holds d (rounded to T, as the reference's d.to(x.dtype)); f_b = min(eps/||d_b||, 1),
  // NaN when the norm is (clamp_(max=1) keeps a NaN; so does this select).
  at::Tensor f = per_sample_norm(x);
  float* fp = f.data_ptr<float>();
  for (int64_t b = 0; b < f.numel(); ++b) {
    const float q = eps / fp[b];
    fp[b] = q > 1.0f ? 1.0f : q;
  }
  const fVec vlo(lo), vhi(hi);
  at::parallel_for(0, n, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for_each_sample(begin, end, m, [&](int64_t b, int64_t lo_i, int64_t hi_i) {
      const fVec vf(fp[b]);
      // (the middle operand is unused: x0 read once, the load hits the same cache line)
      map_inplace<T>(xp, op, op, lo_i, hi_i,
                     [&](fVec dv, fVec ov, fVec) { return clamp_nan(ov + dv * vf, vlo, vhi); });
    });
  });
}

template <typename T>
void random_start_linf_cpu(const at::Tensor& x, const at::Tensor& x0, float eps, float lo, float hi,
                           at::CPUGeneratorImpl* gen) {
  // Serial like torch.rand on CPU and drawing the same numbers in the same order (one 24-bit
  // uniform per element), so the result equals random_start_ref_ bit for bit; no temporary.
  T* xp = x.data_ptr<T>();
  const T* op = x0.const_data_ptr<T>();
  at::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  for (int64_t i = 0, n = x.numel(); i < n; ++i) {
    float u = uniform(gen);
    if (u == 1.0f) u = 0.0f;  // as torch's uniform_ kernel
    const float d = (2.0f * u - 1.0f) * eps;
    const float v = static_cast<float>(op[i]) + d;
    xp[i] = static_cast<T>(clamp_keep_nan(v, lo, hi));
  }
}

void pgd_step_cpu(at::TensorList x_adv, at::TensorList grad, at::TensorList x_orig,
                  at::ArrayRef<double> alpha, at::ArrayRef<double> eps, at::ArrayRef<double> lo,
                  at::ArrayRef<double> hi, c10::string_view norm_name) {
  const PgdNorm norm = parse_norm(std::string_view(norm_name.data(), norm_name.size()));
  check_pgd_args(x_adv, grad, x_orig, alpha, eps, lo, hi, norm, c10::DeviceType::CPU, true);
  for (size_t i = 0; i < x_adv.size(); ++i) {
    if (x_adv[i].numel() == 0) continue;
    const auto a = static_cast<float>(alpha[i]), e = static_cast<float>(eps[i]);
    const auto l = static_cast<float>(lo[i]), h = static_cast<float>(hi[i]);
    dispatch_float_types(x_adv[i].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      if (norm == PgdNorm::kLinf) {
        linf_step_cpu<T>(x_adv[i], grad[i], x_orig[i], a, e, l, h);
      } else {
        l2_step_cpu<T>(x_adv[i], grad[i], x_orig[i], a, e, l, h);
      }
    });
  }
}

void random_start_cpu(at::TensorList x_adv, at::TensorList x_orig, at::ArrayRef<double> eps,
                      at::ArrayRef<double> lo, at::ArrayRef<double> hi, c10::string_view norm_name,
                      std::optional<at::Generator> generator) {
  const PgdNorm norm = parse_norm(std::string_view(norm_name.data(), norm_name.size()));
  check_pgd_args(x_adv, {}, x_orig, {}, eps, lo, hi, norm, c10::DeviceType::CPU, false);
  if (norm == PgdNorm::kL2) {
    random_start_l2_cpu(x_adv, x_orig, eps, lo, hi, generator);
    return;
  }
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(
      generator, at::detail::getDefaultCPUGenerator());
  std::lock_guard<std::mutex> lock(gen->mutex_);
  for (size_t i = 0; i < x_adv.size(); ++i) {
    const auto e = static_cast<float>(eps[i]);
    const auto l = static_cast<float>(lo[i]), h = static_cast<float>(hi[i]);
    dispatch_float_types(x_adv[i].scalar_type(), [&](auto tag) {
      random_start_linf_cpu<decltype(tag)>(x_adv[i], x_orig[i], e, l, h, gen);
    });
  }
}

}  // namespace

// One schema block. lo/hi are -inf/+inf for an unbounded side (the Python wrapper maps None).
TORCH_LIBRARY(advcal, m) {
  m.def(
      "pgd_step_(Tensor(a!)[] x_adv, Tensor[] grad, Tensor[] x_orig, float[] alpha, float[] eps, "
      "float[] lo, float[] hi, str norm) -> ()");
  m.def(
      "random_start_(Tensor(a!)[] x_adv, Tensor[] x_orig, float[] eps, float[] lo, float[] hi, "
      "str norm, Generator? generator) -> ()");
}

TORCH_LIBRARY_IMPL(advcal, CPU, m) {
  m.impl("pgd_step_", &pgd_step_cpu);
  m.impl("random_start_", &random_start_cpu);
}

}  // namespace advcal

// `import advcal._C` loads this library, which runs the registrations above; the module itself
// is empty (ops are called through torch.ops.advcal.*).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT,
                            "_C",
                            "advcal's C++/CUDA ops; use torch.ops.advcal.*",
                            -1,
                            nullptr,
                            nullptr,
                            nullptr,
                            nullptr,
                            nullptr};
  return PyModule_Create(&def);
}
