// Raw-pointer interface of the CUDA kernels for advcal::pgd_step_ and advcal::random_start_.
//
// This header includes only CUDA's own headers, so the .cu that implements it compiles with a
// bare nvcc (no torch headers; see scripts/check_cuda_compile.sh). The torch glue
// (pgd_step_cuda.cpp) fills these plain structs from tensors, checks arguments, picks the
// stream and allocates the workspace with torch's caching allocator (graph-capturable).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace advcal {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum class Norm : int32_t { kLinf = 0, kL2 = 1 };

// One tensor of the list. For L-inf the whole tensor is one "sample" (samples = 1).
struct PgdTensor {
  void* x;                   // x_adv, updated in place
  const void* g;             // grad
  const void* x0;            // x_orig
  int64_t samples;           // B (size of dim 0 for L2; 1 for L-inf)
  int64_t per_sample;        // M = numel / B
  float alpha, eps, lo, hi;  // lo/hi: -inf/+inf when unbounded
  DType dtype;
};

// Floats of device workspace launch_pgd_step needs (0 for L-inf). Holds per-tile partial sums
// of squares for the two per-sample norms of L2.
int64_t pgd_workspace_floats(const PgdTensor* tensors, int n, Norm norm);

// One launch over the whole list for L-inf (16 B/element fp32); three for L2 (32 B/element).
// Lists longer than kMaxTensorsPerLaunch are split into several launches.
cudaError_t launch_pgd_step(const PgdTensor* tensors, int n, Norm norm, float* workspace,
                            cudaStream_t stream);

// Philox seed/offset as torch's CUDA generator hands them out: plain values in eager mode, or
// device pointers (read at replay) plus an intra-graph offset while a CUDA graph is captured.
struct PhiloxArgs {
  uint64_t seed;
  uint64_t offset;
  const int64_t* seed_ptr;    // non-null while capturing
  const int64_t* offset_ptr;  // non-null while capturing
  uint64_t offset_intragraph;
};

// For L-inf the whole tensor is one sample (samples = 1, per_sample = numel).
struct StartTensor {
  void* x;
  const void* x0;
  int64_t samples;
  int64_t per_sample;
  float eps, lo, hi;
  DType dtype;
};

// Per-call Philox offset increment the generator must be advanced by (4 for L-inf: one counter
// per element group; 8 for L2: the direction's counters plus the per-sample radius').
uint64_t random_start_offset_increment(Norm norm);

// Floats of device workspace launch_random_start needs (0 for L-inf; per-tile partial sums of
// the direction's squares for L2).
int64_t random_start_workspace_floats(const StartTensor* tensors, int n, Norm norm);

// L-inf: x <- clamp(x0 + U(-eps, eps), lo, hi), one launch for the whole list.
// L2:    x <- clamp(x0 + d eps r / ||d||, lo, hi), d ~ N(0, I), r ~ U(0, 1) per sample; two
//        launches (||d|| partials, then the update regenerating d from the same counters).
// RNG on the device (Philox), no host sync: capturable in a CUDA graph.
cudaError_t launch_random_start(const StartTensor* tensors, int n, Norm norm, PhiloxArgs rng,
                                float* workspace, cudaStream_t stream);

constexpr int kMaxTensorsPerLaunch = 24;

}  // namespace cuda
}  // namespace advcal
