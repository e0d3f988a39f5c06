// CUDA registration of advcal::pgd_step_ / advcal::random_start_: checks, stream, workspace and
// generator state in torch terms; the kernels themselves live in pgd_step_kernels.cu behind a
// raw-pointer interface. Compiled only in CUDA builds (setup.py defines ADVCAL_WITH_CUDA).
#ifdef ADVCAL_WITH_CUDA

#include "pgd_step.h"
#include "pgd_step_kernels.cuh"

#include <ATen/Utils.h>
#include <ATen/core/DistributionsHelper.h>
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

namespace advcal {
namespace {

cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kHalf:
      return cuda::DType::kFloat16;
    default:
      TORCH_CHECK(false, "advcal::pgd_step_: unsupported dtype ", t);
  }
}

void check_same_device(at::TensorList x_adv) {
  for (size_t i = 1; i < x_adv.size(); ++i) {
    TORCH_CHECK(x_adv[i].device() == x_adv[0].device(), "advcal::pgd_step_: x_adv[", i, "] is on ",
                x_adv[i].device(), " but x_adv[0] is on ", x_adv[0].device(),
                "; one call updates tensors of one GPU");
  }
}

void pgd_step_cuda(at::TensorList x_adv, at::TensorList grad, at::TensorList x_orig,
                   at::ArrayRef<double> alpha, at::ArrayRef<double> eps, at::ArrayRef<double> lo,
                   at::ArrayRef<double> hi, c10::string_view norm_name) {
  const PgdNorm norm = parse_norm(std::string_view(norm_name.data(), norm_name.size()));
  check_pgd_args(x_adv, grad, x_orig, alpha, eps, lo, hi, norm, c10::DeviceType::CUDA, true);
  if (x_adv.empty()) return;
  check_same_device(x_adv);
  const c10::cuda::CUDAGuard guard(x_adv[0].device());
  std::vector<cuda::PgdTensor> ts;
  ts.reserve(x_adv.size());
  for (size_t i = 0; i < x_adv.size(); ++i) {
    const at::Tensor& x = x_adv[i];
    if (x.numel() == 0) continue;
    cuda::PgdTensor p{};
    p.x = x.data_ptr();
    p.g = grad[i].const_data_ptr();
    p.x0 = x_orig[i].const_data_ptr();
    p.samples = norm == PgdNorm::kL2 ? x.size(0) : 1;
    p.per_sample = x.numel() / p.samples;
    p.alpha = static_cast<float>(alpha[i]);
    p.eps = static_cast<float>(eps[i]);
    p.lo = static_cast<float>(lo[i]);
    p.hi = static_cast<float>(hi[i]);
    p.dtype = to_dtype(x.scalar_type());
    ts.push_back(p);
  }
  if (ts.empty()) return;
  const auto cnorm = norm == PgdNorm::kL2 ? cuda::Norm::kL2 : cuda::Norm::kLinf;
  const int64_t ws = cuda::pgd_workspace_floats(ts.data(), static_cast<int>(ts.size()), cnorm);
  // From torch's caching allocator: stream-ordered, and from the graph's pool while capturing.
  at::Tensor workspace;
  if (ws > 0) workspace = at::empty({ws}, x_adv[0].options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_pgd_step(ts.data(), static_cast<int>(ts.size()), cnorm,
                                                ws > 0 ? workspace.data_ptr<float>() : nullptr,
                                                c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess,
              "advcal::pgd_step_: CUDA launch failed: ", cudaGetErrorString(err));
}

void random_start_cuda(at::TensorList x_adv, at::TensorList x_orig, at::ArrayRef<double> eps,
                       at::ArrayRef<double> lo, at::ArrayRef<double> hi, c10::string_view norm_name,
                       std::optional<at::Generator> generator) {
  const PgdNorm norm = parse_norm(std::string_view(norm_name.data(), norm_name.size()));
  check_pgd_args(x_adv, {}, x_orig, {}, eps, lo, hi, norm, c10::DeviceType::CUDA, false);
  if (x_adv.empty()) return;
  check_same_device(x_adv);
  const c10::cuda::CUDAGuard guard(x_adv[0].device());
  std::vector<cuda::StartTensor> ts;
  ts.reserve(x_adv.size());
  for (size_t i = 0; i < x_adv.size(); ++i) {
    const at::Tensor& x = x_adv[i];
    if (x.numel() == 0) continue;
    cuda::StartTensor p{};
    p.x = x.data_ptr();
    p.x0 = x_orig[i].const_data_ptr();
    p.samples = norm == PgdNorm::kL2 ? x.size(0) : 1;
    p.per_sample = x.numel() / p.samples;
    p.eps = static_cast<float>(eps[i]);
    p.lo = static_cast<float>(lo[i]);
    p.hi = static_cast<float>(hi[i]);
    p.dtype = to_dtype(x.scalar_type());
    ts.push_back(p);
  }
  if (ts.empty()) return;
  const auto cnorm = norm == PgdNorm::kL2 ? cuda::Norm::kL2 : cuda::Norm::kLinf;
  const int n = static_cast<int>(ts.size());
  auto* gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      generator, at::cuda::detail::getDefaultCUDAGenerator(x_adv[0].device().index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    state = gen->philox_cuda_state(cuda::random_start_offset_increment(cnorm));
  }
  cuda::PhiloxArgs rng{};
  if (state.captured_) {  // seed/offset read on the device at every replay
    rng.seed_ptr = state.seed_.ptr;
    rng.offset_ptr = state.offset_.ptr;
    rng.offset_intragraph = state.offset_intragraph_;
  } else {
    rng.seed = state.seed_.val;
    rng.offset = state.offset_.val;
  }
  // L2: per-tile partial sums of the direction's squares, from the caching allocator (the
  // graph's pool while capturing).
  const int64_t ws = cuda::random_start_workspace_floats(ts.data(), n, cnorm);
  at::Tensor workspace;
  if (ws > 0) workspace = at::empty({ws}, x_adv[0].options().dtype(at::kFloat));
  const cudaError_t err = cuda::launch_random_start(ts.data(), n, cnorm, rng,
                                                    ws > 0 ? workspace.data_ptr<float>() : nullptr,
                                                    c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess,
              "advcal::random_start_: CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(advcal, CUDA, m) {
  m.impl("pgd_step_", &pgd_step_cuda);
  m.impl("random_start_", &random_start_cuda);
}

}  // namespace advcal

#endif  // ADVCAL_WITH_CUDA
