// CUDA kernels for advcal::pgd_step_ and advcal::random_start_ (raw pointers + cudaStream_t;
// includes only CUDA headers so a bare nvcc compile-checks it on CPU machines).
//
// Memory traffic, fp32 (bf16/fp16 halve every number):
//   L-inf step  one launch: read x, g, x0, write x             = 16 B/element.
//               The chain of separate ops (sign, mul, add, sub, add, max, min, clamp, copy)
//               is ~7 launches and ~68 B/element with its temporaries.
//   L2 step     three launches: (A) read g -> per-tile partial sums of g^2;
//               (B) read x, g, x0, write d = x + alpha g/||g|| - x0 into x, partial sums of d^2;
//               (C) read d (in x), x0, write x = clamp(x0 + d min(1, eps/||d||))
//               = 4 + 16 + 12 = 32 B/element (+ 8 B per 4096-element tile of partials).
//   random start, L-inf: one launch, read x0, write x = 8 B/element.
//                 L2:    (A) generate d ~ N(0, I) -> per-tile partial sums of d^2 (no loads);
//                        (B) regenerate d from the same Philox counters, read x0, write x
//                        = 8 B/element; Philox on the device in both.
// All launches of a list go to one stream with no host synchronisation and no allocation,
// so a call can be captured in a CUDA graph. Reductions are deterministic: per-tile partial
// sums (fixed shuffle tree) summed per sample in a fixed order, never float atomics, so two
// runs (eager or replayed) give bit-identical results.
//
// Work decomposition.
//   L-inf (step and random start): no per-sample structure, so the whole list is one flat
//   space of 16-byte vectors (4 fp32 or 8 bf16/fp16 elements). Every thread of the grid
//   (grid = SMs x resident blocks, fewer when the list is small) walks that space with a
//   grid stride, tensor after tensor: thread k takes vectors k, k + stride, ... so the load is
//   balanced to within one vector per thread and per tensor, whatever the sizes, in one launch.
//   When x, g and x0 sit at the same offset modulo 16 bytes (any fresh tensor, or views with
//   equal storage offsets) the few elements before the first aligned vector (the head) and
//   after the last (the tail) form one extra scalar unit; otherwise every unit is W scalar
//   elements. The step's units follow addresses; random start's follow element indices (so
//   its draws do not depend on alignment), vectorised when x and x0 are 16-byte aligned.
//   L2: tiles of kTile elements that never straddle a sample -- tile t of a tensor is sample
//   t / tiles_per_sample -- one block per tile in a grid-stride loop over the tiles of the
//   list; 16-byte vectors when all pointers are aligned and sample boundaries fall on a
//   vector, scalar otherwise.
//
// Element arithmetic uses __fadd_rn/__fmul_rn/__fdiv_rn/__fsqrt_rn: no FMA contraction and no
// fast-math approximations, so the L-inf step is bit-identical to the reference's separate
// ops. NaN is handled as the reference's torch ops handle it (pgd_step_ref_'s docstring):
// sign(NaN) = 0, maximum/minimum/clamp keep a NaN, a NaN norm makes its whole sample NaN; never
// a finite value outside the eps-ball.
//
// The L-inf functions are __host__ __device__: csrc/selftest/ runs them on the host, a thread
// at a time, against a scalar reference (scripts/check_cuda_compile.sh), since CI has no GPU.

#include "pgd_step_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#define ADVCAL_HD __host__ __device__ __forceinline__

namespace advcal {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = 4096;  // L2 elements per tile: 16 per thread
constexpr float kNormEps = 1e-12f;

// ------------------------------------------------------------------------- element helpers

// IEEE round-to-nearest arithmetic without contraction: the device's _rn intrinsics, and on
// the host (self-test only, compiled with -ffp-contract=off) the plain operators.
ADVCAL_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
ADVCAL_HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
ADVCAL_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
ADVCAL_HD float to_f(T v);
template <>
ADVCAL_HD float to_f<float>(float v) {
  return v;
}
template <>
ADVCAL_HD float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
ADVCAL_HD float to_f<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
ADVCAL_HD T from_f(float v);
template <>
ADVCAL_HD float from_f<float>(float v) {
  return v;
}
template <>
ADVCAL_HD __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
ADVCAL_HD __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
ADVCAL_HD Pack<T, W> load(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}
template <typename T, int W>
ADVCAL_HD void store(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
}

// torch.maximum / torch.minimum / torch.clamp: a NaN in either operand propagates (fmaxf and
// fminf alone would drop it).
ADVCAL_HD float max_nan(float a, float b) { return (a != a) ? a : ((b != b) ? b : fmaxf(a, b)); }
ADVCAL_HD float min_nan(float a, float b) { return (a != a) ? a : ((b != b) ? b : fminf(a, b)); }
// torch.sign: (0 < g) - (g < 0), so -1, 0, +1, and 0 for NaN (ATen's definition,
// pytorch/pytorch#41245): a NaN gradient element takes no step.
ADVCAL_HD float sign_torch(float g) {
  return static_cast<float>(g > 0.f) - static_cast<float>(g < 0.f);
}

// Elements per 16-byte vector.
template <typename T>
constexpr int kVec = 16 / static_cast<int>(sizeof(T));

// Runs body(T{}) with the tensor's storage type.
template <typename Body>
ADVCAL_HD void dispatch_type(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32:
      body(float{});
      break;
    case DType::kBFloat16:
      body(__nv_bfloat16{});
      break;
    case DType::kFloat16:
      body(__half{});
      break;
  }
}

// This thread's first index >= begin in the sequence tid, tid + stride, ... .
ADVCAL_HD int64_t first_at_or_after(int64_t tid, int64_t stride, int64_t begin) {
  return tid >= begin ? tid : tid + (begin - tid + stride - 1) / stride * stride;
}

// --------------------------------------------------------------- flat units (L-inf paths)

// One tensor of the flat space: `vecs` aligned vectors of W elements starting at element
// `head`, plus one scalar unit (head and tail) when any element is left; in scalar mode
// (vec == 0) ceil(n / W) units of W scalar elements.
struct FlatTensor {
  void* x;
  const void* g;   // step: grad; random start: unused
  const void* x0;  //
  int64_t n;
  int64_t head;
  int64_t vecs;
  int64_t group_base;  // random start: Philox subsequence of element 0 (4 elements per group)
  float alpha, eps, lo, hi;
  DType dtype;
  int32_t vec;
};

struct FlatBatch {
  FlatTensor t[kMaxTensorsPerLaunch];
  int64_t unit_begin[kMaxTensorsPerLaunch + 1];  // prefix sums of units over the batch
  int n;
};

ADVCAL_HD int64_t flat_units(const FlatTensor& p, int w) {
  if (!p.vec) return (p.n + w - 1) / w;
  return p.vecs + (p.n - p.vecs * w > 0 ? 1 : 0);
}

// Calls scalar(i) for every element of scalar unit u, vector(i) for a vector unit at i.
template <int W, typename Scalar, typename Vector>
ADVCAL_HD void flat_unit(const FlatTensor& p, int64_t u, Scalar&& scalar, Vector&& vector) {
  if (p.vec && u < p.vecs) {
    vector(p.head + u * W);
  } else if (p.vec) {
    for (int64_t i = 0; i < p.head; ++i) scalar(i);
    for (int64_t i = p.head + p.vecs * W; i < p.n; ++i) scalar(i);
  } else {
    const int64_t stop = (u + 1) * W < p.n ? (u + 1) * W : p.n;
    for (int64_t i = u * W; i < stop; ++i) scalar(i);
  }
}

// Walks the units of the batch owned by thread `tid` of `stride` threads, tensor by tensor.
template <typename Fn>
ADVCAL_HD void flat_walk(const FlatBatch& b, int64_t tid, int64_t stride, Fn&& fn) {
  for (int t = 0; t < b.n; ++t) {
    const int64_t begin = b.unit_begin[t], end = b.unit_begin[t + 1];
    const int64_t first = first_at_or_after(tid, stride, begin);
    if (first >= end) continue;
    fn(b.t[t], first - begin, end - begin);
  }
}

// L-inf: x <- clamp(clamp(x + alpha sign(g), x0 - eps, x0 + eps), lo, hi)
ADVCAL_HD float linf_update(float x, float g, float x0, const FlatTensor& p) {
  float t = add_rn(x, mul_rn(sign_torch(g), p.alpha));
  t = min_nan(max_nan(t, sub_rn(x0, p.eps)), add_rn(x0, p.eps));
  return min_nan(max_nan(t, p.lo), p.hi);
}

ADVCAL_HD void linf_step_thread(const FlatBatch& b, int64_t tid, int64_t stride) {
  flat_walk(b, tid, stride, [&](const FlatTensor& p, int64_t first, int64_t end) {
    dispatch_type(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      constexpr int W = kVec<T>;
      T* __restrict__ x = static_cast<T*>(p.x);
      const T* __restrict__ g = static_cast<const T*>(p.g);
      const T* __restrict__ x0 = static_cast<const T*>(p.x0);
      for (int64_t u = first; u < end; u += stride) {
        flat_unit<W>(
            p, u,
            [&](int64_t i) {
              x[i] = from_f<T>(linf_update(to_f(x[i]), to_f(g[i]), to_f(x0[i]), p));
            },
            [&](int64_t i) {
              Pack<T, W> xv = load<T, W>(x + i);
              const Pack<T, W> gv = load<T, W>(g + i), ov = load<T, W>(x0 + i);
#pragma unroll
              for (int j = 0; j < W; ++j) {
                xv.v[j] = from_f<T>(linf_update(to_f(xv.v[j]), to_f(gv.v[j]), to_f(ov.v[j]), p));
              }
              store<T, W>(x + i, xv);
            });
      }
    });
  });
}

__global__ void __launch_bounds__(kThreads) pgd_linf_kernel(FlatBatch b) {
  linf_step_thread(b, int64_t(blockIdx.x) * kThreads + threadIdx.x, int64_t(gridDim.x) * kThreads);
}

// ------------------------------------------------------------------------------ Philox RNG
// Philox4x32-10 (Salmon et al., SC'11), counter = (offset/4 + k, subsequence), key = seed: the
// layout torch's CUDA generators use (offset in the low half, subsequence in the high half).
// A call reserves [offset, offset + increment) of the generator, so its counters never
// overlap other ops' draws.

ADVCAL_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

ADVCAL_HD uint4 philox4x32_10(uint64_t off4, uint64_t sub, uint64_t seed) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  uint4 c = make_uint4(static_cast<uint32_t>(off4), static_cast<uint32_t>(off4 >> 32),
                       static_cast<uint32_t>(sub), static_cast<uint32_t>(sub >> 32));
  uint2 k = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = mulhi32(kM1, c.z), lo1 = kM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += kW0;
    k.y += kW1;
  }
  return c;
}

// 24 random bits -> [0, 1), like torch's uniform for float.
ADVCAL_HD float uniform01(uint32_t r) { return static_cast<float>(r >> 8) * (1.0f / 16777216.0f); }

struct Rng {
  uint64_t seed, off4;
};

__device__ __forceinline__ Rng read_rng(const PhiloxArgs& a) {
  const uint64_t seed = a.seed_ptr ? static_cast<uint64_t>(*a.seed_ptr) : a.seed;
  const uint64_t offset =
      a.offset_ptr ? static_cast<uint64_t>(*a.offset_ptr) + a.offset_intragraph : a.offset;
  return Rng{seed, offset / 4};
}

// L-inf random start of element e: x0 + (2u - 1) eps, clamped; u is lane e % 4 of group e / 4.
ADVCAL_HD float start_linf_value(float x0, uint32_t r, const FlatTensor& p) {
  const float d = mul_rn(sub_rn(mul_rn(2.f, uniform01(r)), 1.f), p.eps);
  return min_nan(max_nan(add_rn(x0, d), p.lo), p.hi);
}

ADVCAL_HD uint32_t lane(const uint4& r, int64_t j) {
  return j == 0 ? r.x : (j == 1 ? r.y : (j == 2 ? r.z : r.w));
}

// Random start units follow element indices: every unit starts at a multiple of 4 (W is 4 or
// 8 and head is 0), so its Philox groups are whole.
ADVCAL_HD void start_linf_thread(const FlatBatch& b, Rng rng, int64_t tid, int64_t stride) {
  flat_walk(b, tid, stride, [&](const FlatTensor& p, int64_t first, int64_t end) {
    dispatch_type(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      constexpr int W = kVec<T>;
      T* __restrict__ x = static_cast<T*>(p.x);
      const T* __restrict__ x0 = static_cast<const T*>(p.x0);
      for (int64_t u = first; u < end; u += stride) {
        uint4 r{};
        int64_t group = -1;
        flat_unit<W>(
            p, u,
            [&](int64_t i) {
              if (i / 4 != group) {
                group = i / 4;
                r = philox4x32_10(rng.off4, static_cast<uint64_t>(p.group_base + group), rng.seed);
              }
              x[i] = from_f<T>(start_linf_value(to_f(x0[i]), lane(r, i % 4), p));
            },
            [&](int64_t i) {
              const Pack<T, W> ov = load<T, W>(x0 + i);
              Pack<T, W> xv;
#pragma unroll
              for (int q = 0; q < W / 4; ++q) {
                const uint4 rq = philox4x32_10(
                    rng.off4, static_cast<uint64_t>(p.group_base + i / 4 + q), rng.seed);
                const uint32_t rs[4] = {rq.x, rq.y, rq.z, rq.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                  xv.v[4 * q + j] = from_f<T>(start_linf_value(to_f(ov.v[4 * q + j]), rs[j], p));
                }
              }
              store<T, W>(x + i, xv);
            });
      }
    });
  });
}

__global__ void __launch_bounds__(kThreads) random_start_linf_kernel(FlatBatch b, PhiloxArgs a) {
  start_linf_thread(b, read_rng(a), int64_t(blockIdx.x) * kThreads + threadIdx.x,
                    int64_t(gridDim.x) * kThreads);
}

// ---------------------------------------------------------------------- tiles (L2 paths)

struct Batch {
  PgdTensor t[kMaxTensorsPerLaunch];
  int64_t tile_begin[kMaxTensorsPerLaunch + 1];  // prefix sums of tiles over the list
  int64_t tiles_per_sample[kMaxTensorsPerLaunch];
  int64_t group_base[kMaxTensorsPerLaunch];   // random start: Philox subsequence of element 0
  int64_t sample_base[kMaxTensorsPerLaunch];  // random start: subsequence of sample 0's radius
  int32_t vec[kMaxTensorsPerLaunch];          // 16-byte vector path allowed
  int n;
};

// Calls f(i, W) for vectors of W elements covering [0, len - len % W), then f(i, 1) for the
// tail, spread over the block's threads (coalesced: consecutive threads, consecutive vectors).
template <int W, typename F>
__device__ __forceinline__ void tile_loop(int64_t len, F&& f) {
  const int64_t full = len - len % W;
#pragma unroll 4
  for (int64_t i = int64_t(threadIdx.x) * W; i < full; i += int64_t(kThreads) * W) {
    f(i, std::integral_constant<int, W>{});
  }
  if (W > 1) {
    const int64_t i = full + threadIdx.x;
    if (i < len) f(i, std::integral_constant<int, 1>{});
  }
}

// Deterministic block sum (fixed xor-shuffle tree); the result is valid in every thread.
__device__ __forceinline__ float block_sum(float v, float* smem) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, ln = threadIdx.x % 32;
  if (ln == 0) smem[warp] = v;
  __syncthreads();
  v = ln < kWarps ? smem[ln] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();  // smem is reused by the next tile
  return v;
}

// Sum of `count` per-tile partials of one sample, in a fixed order; valid in every thread.
__device__ __forceinline__ float sample_sum(const float* partials, int64_t count, float* bcast) {
  if (threadIdx.x < 32) {
    float v = 0.f;
    for (int64_t i = threadIdx.x; i < count; i += 32) v += partials[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) *bcast = v;
  }
  __syncthreads();
  const float r = *bcast;
  __syncthreads();  // everyone has read bcast before the next tile overwrites it
  return r;
}

// The reference's per-sample norm: sqrt of the sum of squares, clamp_min(1e-12); NaN stays NaN.
__device__ __forceinline__ float sample_norm(const float* partials, int64_t count, float* bcast) {
  return max_nan(__fsqrt_rn(sample_sum(partials, count, bcast)), kNormEps);
}

struct TileRef {
  int t;           // tensor in the batch
  int64_t local;   // tile within the tensor
  int64_t base;    // first element of the tile in the tensor
  int64_t len;     // elements in the tile
  int64_t sample;  // sample the tile belongs to
  int64_t first;   // the sample's first tile in the batch (index into the partials)
};

__device__ __forceinline__ TileRef locate(const Batch& b, int64_t tile) {
  int t = 0;
  while (tile >= b.tile_begin[t + 1]) ++t;  // <= kMaxTensorsPerLaunch steps, once per tile
  TileRef r;
  r.t = t;
  r.local = tile - b.tile_begin[t];
  const int64_t tps = b.tiles_per_sample[t];
  r.sample = r.local / tps;
  const int64_t off = (r.local % tps) * kTile;
  const int64_t m = b.t[t].per_sample;
  r.base = r.sample * m + off;
  r.len = m - off < kTile ? m - off : kTile;
  r.first = b.tile_begin[t] + r.sample * tps;
  return r;
}

// Runs body(T{}, W) with the tensor's type and vector width (1 without the vector path).
template <typename Body>
__device__ __forceinline__ void dispatch(DType dtype, bool vec, Body&& body) {
  dispatch_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    vec ? body(tag, std::integral_constant<int, kVec<T>>{})
        : body(tag, std::integral_constant<int, 1>{});
  });
}

// L2 step, pass A: partial sums of g^2 per tile.
__global__ void __launch_bounds__(kThreads) l2_grad_sumsq_kernel(Batch b, float* partial_g) {
  __shared__ float smem[kWarps];
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
    float acc = 0.f;
    dispatch(p.dtype, b.vec[r.t], [&](auto tag, auto width) {
      using T = decltype(tag);
      constexpr int W = decltype(width)::value;
      const T* __restrict__ g = static_cast<const T*>(p.g) + r.base;
      tile_loop<W>(r.len, [&](int64_t i, auto w) {
        constexpr int V = decltype(w)::value;
        const Pack<T, V> gv = load<T, V>(g + i);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float v = to_f(gv.v[j]);
          acc = __fadd_rn(acc, __fmul_rn(v, v));
        }
      });
    });
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) partial_g[tile] = acc;
  }
}

// L2 step, pass B: d = (x + g * alpha/||g||) - x0 stored into x; partial sums of d^2 per tile
// (of d as stored, so ||d|| is the norm of what pass C reads).
__global__ void __launch_bounds__(kThreads)
    l2_step_kernel(Batch b, const float* partial_g, float* partial_d) {
  __shared__ float smem[kWarps];
  __shared__ float bcast;
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
    const float gn = sample_norm(partial_g + r.first, b.tiles_per_sample[r.t], &bcast);
    const float s = __fdiv_rn(p.alpha, gn);  // NaN when g holds a NaN (or an inf)
    float acc = 0.f;
    dispatch(p.dtype, b.vec[r.t], [&](auto tag, auto width) {
      using T = decltype(tag);
      constexpr int W = decltype(width)::value;
      T* __restrict__ x = static_cast<T*>(p.x) + r.base;
      const T* __restrict__ g = static_cast<const T*>(p.g) + r.base;
      const T* __restrict__ x0 = static_cast<const T*>(p.x0) + r.base;
      tile_loop<W>(r.len, [&](int64_t i, auto w) {
        constexpr int V = decltype(w)::value;
        Pack<T, V> xv = load<T, V>(x + i);
        const Pack<T, V> gv = load<T, V>(g + i), ov = load<T, V>(x0 + i);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float t = __fadd_rn(to_f(xv.v[j]), __fmul_rn(to_f(gv.v[j]), s));
          xv.v[j] = from_f<T>(__fsub_rn(t, to_f(ov.v[j])));
          const float d = to_f(xv.v[j]);
          acc = __fadd_rn(acc, __fmul_rn(d, d));
        }
        store<T, V>(x + i, xv);
      });
    });
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) partial_d[tile] = acc;
  }
}

// L2 step, pass C: x = clamp(x0 + d * min(eps/||d||, 1), lo, hi).
__global__ void __launch_bounds__(kThreads) l2_project_kernel(Batch b, const float* partial_d) {
  __shared__ float bcast;
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
    const float dn = sample_norm(partial_d + r.first, b.tiles_per_sample[r.t], &bcast);
    const float f = min_nan(__fdiv_rn(p.eps, dn), 1.f);  // NaN norm -> NaN sample, as the ref
    dispatch(p.dtype, b.vec[r.t], [&](auto tag, auto width) {
      using T = decltype(tag);
      constexpr int W = decltype(width)::value;
      T* __restrict__ x = static_cast<T*>(p.x) + r.base;
      const T* __restrict__ x0 = static_cast<const T*>(p.x0) + r.base;
      tile_loop<W>(r.len, [&](int64_t i, auto w) {
        constexpr int V = decltype(w)::value;
        Pack<T, V> xv = load<T, V>(x + i);
        const Pack<T, V> ov = load<T, V>(x0 + i);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float v = __fadd_rn(to_f(ov.v[j]), __fmul_rn(to_f(xv.v[j]), f));
          xv.v[j] = from_f<T>(min_nan(max_nan(v, p.lo), p.hi));
        }
        store<T, V>(x + i, xv);
      });
    });
  }
}

// L2 random start. Element e of a tensor takes normal lane e % 4 of Philox group e / 4
// (counter offset/4), by Box-Muller; sample s takes its radius r from counter offset/4 + 1.
// Both passes visit the Philox groups overlapping their tile (consecutive threads,
// consecutive groups) and compute the same normals bit for bit (explicit _rn arithmetic,
// libdevice logf/sincospif, no fast math). Scalar loads and stores: the pass runs once per
// attack and is bound by Philox + Box-Muller, not by its 8 B/element.
__device__ __forceinline__ float4 normal4(Rng rng, uint64_t sub) {
  const uint4 r = philox4x32_10(rng.off4, sub, rng.seed);
  constexpr float k24 = 1.0f / 16777216.0f;
  float4 n;
  const float u1 = static_cast<float>((r.x >> 8) + 1u) * k24;  // (0, 1]: log is finite
  const float u3 = static_cast<float>((r.z >> 8) + 1u) * k24;
  const float rad1 = __fsqrt_rn(__fmul_rn(-2.0f, logf(u1)));
  const float rad3 = __fsqrt_rn(__fmul_rn(-2.0f, logf(u3)));
  float s, c;
  sincospif(__fmul_rn(2.0f, uniform01(r.y)), &s, &c);
  n.x = __fmul_rn(rad1, c);
  n.y = __fmul_rn(rad1, s);
  sincospif(__fmul_rn(2.0f, uniform01(r.w)), &s, &c);
  n.z = __fmul_rn(rad3, c);
  n.w = __fmul_rn(rad3, s);
  return n;
}

__device__ __forceinline__ float lane4(const float4& v, int64_t j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

// Calls f(e, d_e) for the elements e of [base, base + len), one Philox group per thread step.
template <typename F>
__device__ __forceinline__ void tile_normals(Rng rng, int64_t group_base, int64_t base, int64_t len,
                                             F&& f) {
  const int64_t g0 = base / 4, g1 = (base + len - 1) / 4;
  for (int64_t q = g0 + threadIdx.x; q <= g1; q += kThreads) {
    const float4 n = normal4(rng, static_cast<uint64_t>(group_base + q));
#pragma unroll
    for (int64_t j = 0; j < 4; ++j) {
      const int64_t e = 4 * q + j;
      if (e >= base && e < base + len) f(e, lane4(n, j));
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    random_start_l2_norm_kernel(Batch b, PhiloxArgs a, float* partial_d) {
  __shared__ float smem[kWarps];
  const Rng rng = read_rng(a);
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    float acc = 0.f;
    tile_normals(rng, b.group_base[r.t], r.base, r.len,
                 [&](int64_t, float d) { acc = __fadd_rn(acc, __fmul_rn(d, d)); });
    acc = block_sum(acc, smem);
    if (threadIdx.x == 0) partial_d[tile] = acc;
  }
}

__global__ void __launch_bounds__(kThreads)
    random_start_l2_kernel(Batch b, PhiloxArgs a, const float* partial_d) {
  __shared__ float bcast;
  const Rng rng = read_rng(a);
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
    const float dn = sample_norm(partial_d + r.first, b.tiles_per_sample[r.t], &bcast);
    const uint4 rr =
        philox4x32_10(rng.off4 + 1, static_cast<uint64_t>(b.sample_base[r.t] + r.sample), rng.seed);
    // the reference's full_like(r, eps).div_(||d||).mul_(r)
    const float scale = __fmul_rn(__fdiv_rn(p.eps, dn), uniform01(rr.x));
    dispatch_type(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      T* __restrict__ x = static_cast<T*>(p.x);
      const T* __restrict__ x0 = static_cast<const T*>(p.x0);
      tile_normals(rng, b.group_base[r.t], r.base, r.len, [&](int64_t e, float d) {
        const float v = __fadd_rn(to_f(x0[e]), __fmul_rn(d, scale));
        x[e] = from_f<T>(min_nan(max_nan(v, p.lo), p.hi));
      });
    });
  }
}

// ---------------------------------------------------------------------------- host side

int elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

uintptr_t addr(const void* p) { return reinterpret_cast<uintptr_t>(p); }

bool aligned16(const void* p) { return (addr(p) & 15u) == 0; }

int64_t tiles_per_sample(int64_t per_sample) { return (per_sample + kTile - 1) / kTile; }

// Step: vectors follow the addresses. x, g and x0 at one offset modulo 16 B -> peel a head.
FlatTensor flat_step_tensor(const PgdTensor& p) {
  FlatTensor f{};
  f.x = p.x;
  f.g = p.g;
  f.x0 = p.x0;
  f.n = p.samples * p.per_sample;
  f.alpha = p.alpha;
  f.eps = p.eps;
  f.lo = p.lo;
  f.hi = p.hi;
  f.dtype = p.dtype;
  const int es = elem_size(p.dtype), w = 16 / es;
  const uintptr_t mis = addr(p.x) & 15u;
  f.vec = mis == (addr(p.g) & 15u) && mis == (addr(p.x0) & 15u) && mis % es == 0;
  if (f.vec) {
    f.head = static_cast<int64_t>((16u - mis) % 16u) / es;
    if (f.head > f.n) f.head = f.n;
    f.vecs = (f.n - f.head) / w;
  }
  return f;
}

// Random start: units follow element indices (draws independent of the alignment); vectors
// only when x and x0 are 16-byte aligned.
FlatTensor flat_start_tensor(const StartTensor& p, int64_t group_base) {
  FlatTensor f{};
  f.x = p.x;
  f.x0 = p.x0;
  f.n = p.samples * p.per_sample;
  f.eps = p.eps;
  f.lo = p.lo;
  f.hi = p.hi;
  f.dtype = p.dtype;
  f.group_base = group_base;
  f.vec = aligned16(p.x) && aligned16(p.x0);
  if (f.vec) f.vecs = f.n / (16 / elem_size(p.dtype));
  return f;
}

// Calls launch(batch) for consecutive chunks of at most kMaxTensorsPerLaunch tensors.
template <typename Make, typename Launch>
cudaError_t for_each_flat_batch(int n, Make&& make, Launch&& launch) {
  for (int start = 0; start < n; start += kMaxTensorsPerLaunch) {
    FlatBatch b{};
    b.n = n - start < kMaxTensorsPerLaunch ? n - start : kMaxTensorsPerLaunch;
    for (int i = 0; i < b.n; ++i) {
      b.t[i] = make(start + i);
      b.unit_begin[i + 1] = b.unit_begin[i] + flat_units(b.t[i], 16 / elem_size(b.t[i].dtype));
    }
    if (b.unit_begin[b.n] == 0) continue;
    const cudaError_t err = launch(b);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// SMs x resident blocks of `kernel` on the current device, queried once per (device, kernel).
cudaError_t resident_blocks(const void* kernel, int64_t* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(device, kernel);
  auto it = cache.find(key);
  if (it == cache.end()) {
    int sms = 1, per_sm = 1;
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    if (err != cudaSuccess) return err;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
    if (err != cudaSuccess) return err;
    it = cache.emplace(key, static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1)).first;
  }
  *out = it->second;
  return cudaSuccess;
}

// Grid for `work` blocks' worth of work, at most what is resident at once (the loops stride).
template <typename Kernel>
cudaError_t grid_for(Kernel kernel, int64_t work, int* grid) {
  int64_t full = 1;
  const cudaError_t err = resident_blocks(reinterpret_cast<const void*>(kernel), &full);
  if (err != cudaSuccess) return err;
  *grid = static_cast<int>(work < full ? (work > 0 ? work : 1) : full);
  return cudaSuccess;
}

// Tiles of a list for the L2 kernels, chunked like the flat batches.
template <typename Get, typename Launch>
cudaError_t for_each_tile_batch(int n, Get&& get, Launch&& launch) {
  int64_t group_base = 0, sample_base = 0;
  for (int start = 0; start < n; start += kMaxTensorsPerLaunch) {
    Batch b{};
    b.n = n - start < kMaxTensorsPerLaunch ? n - start : kMaxTensorsPerLaunch;
    for (int i = 0; i < b.n; ++i) {
      const PgdTensor p = get(start + i);
      b.t[i] = p;
      b.tiles_per_sample[i] = tiles_per_sample(p.per_sample);
      b.tile_begin[i + 1] = b.tile_begin[i] + p.samples * b.tiles_per_sample[i];
      const int64_t w = 16 / elem_size(p.dtype);
      b.vec[i] = aligned16(p.x) && (p.g == nullptr || aligned16(p.g)) && aligned16(p.x0) &&
                 (p.samples == 1 || p.per_sample % w == 0);
      b.group_base[i] = group_base;
      b.sample_base[i] = sample_base;
      group_base += (p.samples * p.per_sample + 3) / 4;
      sample_base += p.samples;
    }
    const int64_t tiles = b.tile_begin[b.n];
    if (tiles == 0) continue;
    const cudaError_t err = launch(b, tiles);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

int64_t pgd_workspace_floats(const PgdTensor* tensors, int n, Norm norm) {
  if (norm != Norm::kL2) return 0;
  int64_t tiles = 0;
  for (int i = 0; i < n; ++i) tiles += tensors[i].samples * tiles_per_sample(tensors[i].per_sample);
  return 2 * tiles;
}

cudaError_t launch_pgd_step(const PgdTensor* tensors, int n, Norm norm, float* workspace,
                            cudaStream_t stream) {
  if (norm == Norm::kLinf) {
    return for_each_flat_batch(
        n, [&](int i) { return flat_step_tensor(tensors[i]); },
        [&](const FlatBatch& b) {
          int grid = 1;
          cudaError_t err =
              grid_for(pgd_linf_kernel, (b.unit_begin[b.n] + kThreads - 1) / kThreads, &grid);
          if (err != cudaSuccess) return err;
          pgd_linf_kernel<<<grid, kThreads, 0, stream>>>(b);
          return cudaGetLastError();
        });
  }
  const int64_t total = pgd_workspace_floats(tensors, n, norm) / 2;
  float* partial_g = workspace;
  float* partial_d = workspace + total;
  return for_each_tile_batch(
      n, [&](int i) { return tensors[i]; },
      [&](const Batch& b, int64_t tiles) {
        int ga = 1, gb = 1, gc = 1;
        cudaError_t err = grid_for(l2_grad_sumsq_kernel, tiles, &ga);
        if (err == cudaSuccess) err = grid_for(l2_step_kernel, tiles, &gb);
        if (err == cudaSuccess) err = grid_for(l2_project_kernel, tiles, &gc);
        if (err != cudaSuccess) return err;
        l2_grad_sumsq_kernel<<<ga, kThreads, 0, stream>>>(b, partial_g);
        l2_step_kernel<<<gb, kThreads, 0, stream>>>(b, partial_g, partial_d);
        l2_project_kernel<<<gc, kThreads, 0, stream>>>(b, partial_d);
        partial_g += tiles;
        partial_d += tiles;
        return cudaGetLastError();
      });
}

uint64_t random_start_offset_increment(Norm norm) { return norm == Norm::kL2 ? 8 : 4; }

int64_t random_start_workspace_floats(const StartTensor* tensors, int n, Norm norm) {
  if (norm != Norm::kL2) return 0;
  int64_t tiles = 0;
  for (int i = 0; i < n; ++i) tiles += tensors[i].samples * tiles_per_sample(tensors[i].per_sample);
  return tiles;
}

cudaError_t launch_random_start(const StartTensor* tensors, int n, Norm norm, PhiloxArgs rng,
                                float* workspace, cudaStream_t stream) {
  if (norm == Norm::kLinf) {
    int64_t group_base = 0;
    return for_each_flat_batch(
        n,
        [&](int i) {
          const FlatTensor f = flat_start_tensor(tensors[i], group_base);
          group_base += (f.n + 3) / 4;
          return f;
        },
        [&](const FlatBatch& b) {
          int grid = 1;
          cudaError_t err = grid_for(random_start_linf_kernel,
                                     (b.unit_begin[b.n] + kThreads - 1) / kThreads, &grid);
          if (err != cudaSuccess) return err;
          random_start_linf_kernel<<<grid, kThreads, 0, stream>>>(b, rng);
          return cudaGetLastError();
        });
  }
  float* partial_d = workspace;
  return for_each_tile_batch(
      n,
      [&](int i) {
        const StartTensor& s = tensors[i];
        PgdTensor p{};
        p.x = s.x;
        p.x0 = s.x0;
        p.samples = s.samples;
        p.per_sample = s.per_sample;
        p.eps = s.eps;
        p.lo = s.lo;
        p.hi = s.hi;
        p.dtype = s.dtype;
        return p;
      },
      [&](const Batch& b, int64_t tiles) {
        int ga = 1, gb = 1;
        cudaError_t err = grid_for(random_start_l2_norm_kernel, tiles, &ga);
        if (err == cudaSuccess) err = grid_for(random_start_l2_kernel, tiles, &gb);
        if (err != cudaSuccess) return err;
        random_start_l2_norm_kernel<<<ga, kThreads, 0, stream>>>(b, rng, partial_d);
        random_start_l2_kernel<<<gb, kThreads, 0, stream>>>(b, rng, partial_d);
        partial_d += tiles;
        return cudaGetLastError();
      });
}

}  // namespace cuda
}  // namespace advcal
