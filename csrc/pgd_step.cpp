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
// Threads and vectors: see the CPU section below (one fork-join for the whole list on torch's
// OpenMP pool, multiversioned loops); measured figures in docs/performance.md.

#include "pgd_step.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/core/DistributionsHelper.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

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
//
// Element loops are plain C++ loops over the storage type, compiled three times (function
// multiversioning, one ifunc resolved at load): x86-64-v4 (AVX-512 F/BW/DQ/VL), x86-64-v3 (AVX2,
// F16C) and the baseline. gcc 12 -O3 vectorises every one of them (objdump: zmm registers in the
// v4 clones, bf16/fp16 widened and rounded in-register with c10's bit-exact conversions).
// Not at::vec::Vectorized: an extension built without ATen's per-capability flags only gets its
// portable fallback (measured ~10x slower, and the old L2 passes that used it ran at 17.7 GB/s
// vs 64 GB/s for torch.compile at 1e6); compiling this file per capability as ATen does would
// emit c10's inline functions with AVX-512 into the shared library's COMDATs (an illegal
// instruction on an older CPU if the linker keeps that copy). Multiversioning clones only these
// loops.
// Threads: one at::parallel_for over the concatenated elements of the whole list (all
// modalities in one fork-join, chunks may straddle tensors), on torch's OpenMP pool (setup.py
// compiles with -fopenmp; without it ATen's parallel_for runs the calling thread only, which is
// what made the old kernel 0.56-0.65x torch.compile: one core against compile's two).
#if defined(__x86_64__) && defined(__linux__) && defined(__has_attribute)
#if __has_attribute(target_clones)
#define ADVCAL_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
#endif
#ifndef ADVCAL_SIMD_CLONES
#define ADVCAL_SIMD_CLONES
#endif
#define ADVCAL_INLINE inline __attribute__((always_inline))

// Minimum elements per thread. Measured on the 2-core machine (fp32 L-inf, best of 400, one vs
// two threads): 7e4 elements 18.3 vs 20.0 us, 1e5 24.9 vs 25.8 us, 2e5 45 vs 31 us, 4e5 95 vs
// 59 us, 1e6 227 vs 116 us: a second thread pays from ~1e5 elements each (~20 us of work), so
// 128K per thread; 1e6 then runs on 8 threads of a 16-core machine, 1e7 on all.
constexpr int64_t kGrain = 1 << 17;

// Storage <-> fp32 exactly as c10 converts (bf16/fp16: round to nearest even, once), on the raw
// bits, so the loops vectorise.
ADVCAL_INLINE float to_f32(float v) { return v; }
ADVCAL_INLINE float to_f32(c10::BFloat16 v) { return c10::detail::f32_from_bits(v.x); }
ADVCAL_INLINE float to_f32(c10::Half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }
template <typename T>
ADVCAL_INLINE T from_f32(float v);
template <>
ADVCAL_INLINE float from_f32<float>(float v) {
  return v;
}
template <>
ADVCAL_INLINE c10::BFloat16 from_f32<c10::BFloat16>(float v) {
  return c10::BFloat16(c10::detail::round_to_nearest_even(v), c10::BFloat16::from_bits());
}
template <>
ADVCAL_INLINE c10::Half from_f32<c10::Half>(float v) {
  return c10::Half(c10::detail::fp16_ieee_from_fp32_value(v), c10::Half::from_bits());
}

// clamp(v, lo, hi) keeping a NaN v (lo, hi are never NaN: checked).
ADVCAL_INLINE float clamp_keep_nan(float v, float lo, float hi) {
  v = v < lo ? lo : v;
  return v > hi ? hi : v;
}

// The L-inf update, the reference's operations in its order, in fp32:
// t = x + sign(g) * alpha; t = min(max(t, x0 - eps), x0 + eps); t = min(max(t, lo), hi).
// NaN as in torch: sign(NaN) = 0 there ((0 < g) - (g < 0), pytorch/pytorch#41245), so a NaN
// gradient element takes no step; a compare with NaN is false, so the selects keep a NaN t
// (from x), and the last select makes the result NaN when x0 is (torch.maximum(t, NaN) = NaN).
// Branch-free (random signs would mispredict ~50%: 10 ns/element measured).
template <typename T>
ADVCAL_INLINE void linf_body(T* __restrict__ x, const T* __restrict__ g,
                             const T* __restrict__ x0, int64_t n, float alpha, float eps,
                             float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = to_f32(g[i]), oi = to_f32(x0[i]);
    const float s = static_cast<float>(gi > 0.f) - static_cast<float>(gi < 0.f);
    float t = to_f32(x[i]) + s * alpha;
    const float lb = oi - eps, ub = oi + eps;
    t = t < lb ? lb : t;
    t = t > ub ? ub : t;
    x[i] = from_f32<T>(oi != oi ? oi : clamp_keep_nan(t, lo, hi));
  }
}

// L2, pass 1: d = (x + g * s) - x0 with s = alpha / ||g_b||, stored in x (rounded to T, as the
// reference's d.to(x.dtype)).
template <typename T>
ADVCAL_INLINE void l2_dir_body(T* __restrict__ x, const T* __restrict__ g,
                               const T* __restrict__ x0, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = from_f32<T>((to_f32(x[i]) + to_f32(g[i]) * s) - to_f32(x0[i]));
  }
}

// L2, pass 2: x = clamp(x0 + d * f, lo, hi) with f = min(eps / ||d_b||, 1) (NaN stays NaN).
template <typename T>
ADVCAL_INLINE void l2_proj_body(T* __restrict__ x, const T* __restrict__ x0, int64_t n, float f,
                                float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = from_f32<T>(clamp_keep_nan(to_f32(x0[i]) + to_f32(x[i]) * f, lo, hi));
  }
}

// L-inf random start from uniforms u in [0, 1): x = clamp(x0 + (2u - 1) eps, lo, hi).
template <typename T>
ADVCAL_INLINE void start_body(T* __restrict__ x, const T* __restrict__ x0,
                              const float* __restrict__ u, int64_t n, float eps, float lo,
                              float hi) {
  for (int64_t i = 0; i < n; ++i) {
    x[i] = from_f32<T>(clamp_keep_nan(to_f32(x0[i]) + (2.0f * u[i] - 1.0f) * eps, lo, hi));
  }
}

// One multiversioned entry per loop and storage type (target_clones takes plain functions).
#define ADVCAL_DEFINE_LOOPS(T)                                                                   \
  ADVCAL_SIMD_CLONES void linf_loop(T* x, const T* g, const T* x0, int64_t n, float alpha,     \
                                    float eps, float lo, float hi) {                           \
    linf_body<T>(x, g, x0, n, alpha, eps, lo, hi);                                             \
  }                                                                                            \
  ADVCAL_SIMD_CLONES void l2_dir_loop(T* x, const T* g, const T* x0, int64_t n, float s) {     \
    l2_dir_body<T>(x, g, x0, n, s);                                                            \
  }                                                                                            \
  ADVCAL_SIMD_CLONES void l2_proj_loop(T* x, const T* x0, int64_t n, float f, float lo,        \
                                       float hi) {                                             \
    l2_proj_body<T>(x, x0, n, f, lo, hi);                                                      \
  }                                                                                            \
  ADVCAL_SIMD_CLONES void start_loop(T* x, const T* x0, const float* u, int64_t n, float eps,  \
                                     float lo, float hi) {                                     \
    start_body<T>(x, x0, u, n, eps, lo, hi);                                                   \
  }
ADVCAL_DEFINE_LOOPS(float)
ADVCAL_DEFINE_LOOPS(c10::BFloat16)
ADVCAL_DEFINE_LOOPS(c10::Half)
#undef ADVCAL_DEFINE_LOOPS

// fn(T{}) for the three dtypes the op takes (checked before).
template <typename Fn>
void dispatch_float_types(at::ScalarType t, const Fn& fn) {
  switch (t) {
    case at::kFloat:
      return fn(float{});
    case at::kBFloat16:
      return fn(c10::BFloat16{});
    case at::kHalf:
      return fn(c10::Half{});
    default:
      TORCH_CHECK(false, "advcal: unsupported dtype ", t);
  }
}

// One non-empty tensor of the list, placed at [begin, begin + n) of the list-wide element range.
struct Segment {
  void* x;
  const void* g;
  const void* x0;
  int64_t begin, n;
  int64_t m;  // elements per sample (L2)
  at::ScalarType dtype;
  float alpha, eps, lo, hi;
  float* per_sample;  // L2: the current pass's per-sample factor, (n / m,) floats
};

std::vector<Segment> segments(at::TensorList x_adv, at::TensorList grad, at::TensorList x_orig,
                              at::ArrayRef<double> alpha, at::ArrayRef<double> eps,
                              at::ArrayRef<double> lo, at::ArrayRef<double> hi, int64_t* total) {
  std::vector<Segment> segs;
  segs.reserve(x_adv.size());
  int64_t begin = 0;
  for (size_t i = 0; i < x_adv.size(); ++i) {
    const at::Tensor& x = x_adv[i];
    const int64_t n = x.numel();
    if (n == 0) continue;
    Segment s{};
    s.x = x.data_ptr();
    s.g = grad.empty() ? nullptr : grad[i].const_data_ptr();
    s.x0 = x_orig[i].const_data_ptr();
    s.begin = begin;
    s.n = n;
    s.m = x.dim() == 0 ? 1 : n / x.size(0);
    s.dtype = x.scalar_type();
    s.alpha = alpha.empty() ? 0.f : static_cast<float>(alpha[i]);
    s.eps = static_cast<float>(eps[i]);
    s.lo = static_cast<float>(lo[i]);
    s.hi = static_cast<float>(hi[i]);
    segs.push_back(s);
    begin += n;
  }
  *total = begin;
  return segs;
}

// fn(segment, T-typed pointers offset to `first`, first, count) for every piece of every
// segment, split over threads as one range: the whole list is one fork-join.
template <typename Fn>
void parallel_over_list(const std::vector<Segment>& segs, int64_t total, const Fn& fn) {
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    auto it = std::upper_bound(segs.begin(), segs.end(), begin,
                               [](int64_t v, const Segment& s) { return v < s.begin; });
    for (--it; it != segs.end() && it->begin < end; ++it) {
      const int64_t first = std::max(begin, it->begin) - it->begin;
      const int64_t last = std::min(end, it->begin + it->n) - it->begin;
      fn(*it, first, last);
    }
  });
}

// fn(sample, first, last) for the parts of [first, last) that lie in each sample of m elements.
template <typename Fn>
void for_each_sample(int64_t first, int64_t last, int64_t m, const Fn& fn) {
  while (first < last) {
    const int64_t b = first / m;
    const int64_t stop = std::min(last, (b + 1) * m);
    fn(b, first, stop);
    first = stop;
  }
}

void linf_step_cpu(const std::vector<Segment>& segs, int64_t total) {
  parallel_over_list(segs, total, [](const Segment& s, int64_t first, int64_t last) {
    dispatch_float_types(s.dtype, [&](auto tag) {
      using T = decltype(tag);
      linf_loop(static_cast<T*>(s.x) + first, static_cast<const T*>(s.g) + first,
                static_cast<const T*>(s.x0) + first, last - first, s.alpha, s.eps, s.lo, s.hi);
    });
  });
}

// L2: ||g|| per sample (ATen's linalg_vector_norm, the very call of the reference: bit-identical
// norms) -> one pass writing d = x + g alpha/||g|| - x0 into x -> ||d|| per sample -> one pass
// x = clamp(x0 + d min(1, eps/||d||)). 36 B/element fp32, (B,) temporaries only.
void l2_step_cpu(at::TensorList x_adv, at::TensorList grad, std::vector<Segment>& segs,
                 int64_t total) {
  std::vector<at::Tensor> factors;  // keeps the per-sample buffers alive
  factors.reserve(segs.size());
  size_t k = 0;
  for (size_t i = 0; i < x_adv.size(); ++i) {
    if (x_adv[i].numel() == 0) continue;
    Segment& s = segs[k++];
    at::Tensor f = per_sample_norm(grad[i]);  // s_b = alpha / ||g_b||, one IEEE division each
    float* fp = f.data_ptr<float>();
    for (int64_t b = 0; b < f.numel(); ++b) fp[b] = s.alpha / fp[b];
    s.per_sample = fp;
    factors.push_back(std::move(f));
  }
  parallel_over_list(segs, total, [](const Segment& s, int64_t first, int64_t last) {
    dispatch_float_types(s.dtype, [&](auto tag) {
      using T = decltype(tag);
      auto* x = static_cast<T*>(s.x);
      const auto* g = static_cast<const T*>(s.g);
      const auto* x0 = static_cast<const T*>(s.x0);
      for_each_sample(first, last, s.m, [&](int64_t b, int64_t lo, int64_t hi) {
        l2_dir_loop(x + lo, g + lo, x0 + lo, hi - lo, s.per_sample[b]);
      });
    });
  });
  // f_b = min(eps / ||d_b||, 1), NaN when the norm is (clamp_(max=1) keeps a NaN; so does this)
  k = 0;
  for (size_t i = 0; i < x_adv.size(); ++i) {
    if (x_adv[i].numel() == 0) continue;
    Segment& s = segs[k];
    at::Tensor f = per_sample_norm(x_adv[i]);
    float* fp = f.data_ptr<float>();
    for (int64_t b = 0; b < f.numel(); ++b) {
      const float q = s.eps / fp[b];
      fp[b] = q > 1.0f ? 1.0f : q;
    }
    s.per_sample = fp;
    factors[k++] = std::move(f);
  }
  parallel_over_list(segs, total, [](const Segment& s, int64_t first, int64_t last) {
    dispatch_float_types(s.dtype, [&](auto tag) {
      using T = decltype(tag);
      auto* x = static_cast<T*>(s.x);
      const auto* x0 = static_cast<const T*>(s.x0);
      for_each_sample(first, last, s.m, [&](int64_t b, int64_t lo, int64_t hi) {
        l2_proj_loop(x + lo, x0 + lo, hi - lo, s.per_sample[b], s.lo, s.hi);
      });
    });
  });
}

template <typename T>
void random_start_linf_cpu(const at::Tensor& x, const at::Tensor& x0, float eps, float lo, float hi,
                           at::CPUGeneratorImpl* gen) {
  // The draws are serial, as in torch.rand on CPU, in the same order (one 24-bit uniform per
  // element), so the result equals random_start_ref_ bit for bit; the arithmetic runs on
  // cache-sized chunks of them with the vectorised loop. No tensor-sized temporary.
  T* xp = x.data_ptr<T>();
  const T* op = x0.const_data_ptr<T>();
  at::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  constexpr int64_t kChunk = 2048;
  float u[kChunk];
  for (int64_t c = 0, n = x.numel(); c < n; c += kChunk) {
    const int64_t len = std::min(kChunk, n - c);
    for (int64_t i = 0; i < len; ++i) {
      const float v = uniform(gen);
      u[i] = v == 1.0f ? 0.0f : v;  // as torch's uniform_ kernel
    }
    start_loop(xp + c, op + c, u, len, eps, lo, hi);
  }
}

void pgd_step_cpu(at::TensorList x_adv, at::TensorList grad, at::TensorList x_orig,
                  at::ArrayRef<double> alpha, at::ArrayRef<double> eps, at::ArrayRef<double> lo,
                  at::ArrayRef<double> hi, c10::string_view norm_name) {
  const PgdNorm norm = parse_norm(std::string_view(norm_name.data(), norm_name.size()));
  check_pgd_args(x_adv, grad, x_orig, alpha, eps, lo, hi, norm, c10::DeviceType::CPU, true);
  int64_t total = 0;
  std::vector<Segment> segs = segments(x_adv, grad, x_orig, alpha, eps, lo, hi, &total);
  if (segs.empty()) return;
  if (norm == PgdNorm::kLinf) {
    linf_step_cpu(segs, total);
  } else {
    l2_step_cpu(x_adv, grad, segs, total);
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
