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
//   random start (L-inf) one launch: read x0, write x = 8 B/element; Philox on the device.
// All launches of a list go to one stream with no host synchronisation and no allocation,
// so a call can be captured in a CUDA graph. Reductions are deterministic: per-tile partial
// sums (fixed shuffle tree) summed per sample in a fixed order, never float atomics, so two
// runs (eager or replayed) give bit-identical results.
//
// Work decomposition: every tensor is cut into tiles of kTile elements that never straddle a
// sample (L2) — tile t of a tensor is sample t / tiles_per_sample. Blocks walk the tiles of the
// whole list in a grid-stride loop (grid = SMs x resident blocks), so one launch covers all
// modalities whatever their sizes. 16-byte vector loads when all three pointers are 16-byte
// aligned and sample boundaries fall on a vector; a scalar tail otherwise.
//
// Element arithmetic uses __fadd_rn/__fmul_rn/__fdiv_rn/__fsqrt_rn: no FMA contraction and no
// fast-math approximations, so the L-inf step is bit-identical to the reference's separate ops.

#include "pgd_step_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace advcal {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kTile = 4096;  // elements per tile: 16 per thread
constexpr float kNormEps = 1e-12f;

struct Batch {
  PgdTensor t[kMaxTensorsPerLaunch];
  int64_t tile_begin[kMaxTensorsPerLaunch + 1];  // prefix sums of tiles over the list
  int64_t tiles_per_sample[kMaxTensorsPerLaunch];
  int32_t vec[kMaxTensorsPerLaunch];  // 16-byte vector path allowed
  int n;
};

struct StartBatch {
  StartTensor t[kMaxTensorsPerLaunch];
  int64_t tile_begin[kMaxTensorsPerLaunch + 1];
  int32_t vec[kMaxTensorsPerLaunch];
  int64_t group_base;  // Philox subsequence of this launch's first element group
  int n;
};

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_f<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_f<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T, int W>
struct alignas(sizeof(T) * W) Pack {
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> load(const T* p) {
  return *reinterpret_cast<const Pack<T, W>*>(p);
}
template <typename T, int W>
__device__ __forceinline__ void store(T* p, const Pack<T, W>& v) {
  *reinterpret_cast<Pack<T, W>*>(p) = v;
}

// torch.maximum / torch.minimum: a NaN in either operand propagates.
__device__ __forceinline__ float max_nan(float a, float b) {
  return (a != a) ? a : ((b != b) ? b : fmaxf(a, b));
}
__device__ __forceinline__ float min_nan(float a, float b) {
  return (a != a) ? a : ((b != b) ? b : fminf(a, b));
}
// torch.sign: -1, 0, +1, NaN for NaN.
__device__ __forceinline__ float sign_nan(float g) {
  return g > 0.f ? 1.f : (g < 0.f ? -1.f : g);
}

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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  v = lane < kWarps ? smem[lane] : 0.f;
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

struct TileRef {
  int t;           // tensor in the batch
  int64_t local;   // tile within the tensor
  int64_t base;    // first element of the tile in the tensor
  int64_t len;     // elements in the tile
  int64_t sample;  // sample the tile belongs to
};

__device__ __forceinline__ TileRef locate(const Batch& b, int64_t tile) {
  int t = 0;
  while (tile >= b.tile_begin[t + 1]) ++t;  // <= kMaxTensorsPerLaunch steps, uniform per block
  TileRef r;
  r.t = t;
  r.local = tile - b.tile_begin[t];
  const int64_t tps = b.tiles_per_sample[t];
  r.sample = r.local / tps;
  const int64_t off = (r.local % tps) * kTile;
  const int64_t m = b.t[t].per_sample;
  r.base = r.sample * m + off;
  r.len = m - off < kTile ? m - off : kTile;
  return r;
}

// Runs body.template operator()<T, W>(tensor, tile) with the tensor's type and vector width.
template <typename Body>
__device__ __forceinline__ void dispatch(DType dtype, bool vec, Body&& body) {
  switch (dtype) {
    case DType::kFloat32:
      vec ? body(float{}, std::integral_constant<int, 4>{})
          : body(float{}, std::integral_constant<int, 1>{});
      break;
    case DType::kBFloat16:
      vec ? body(__nv_bfloat16{}, std::integral_constant<int, 8>{})
          : body(__nv_bfloat16{}, std::integral_constant<int, 1>{});
      break;
    case DType::kFloat16:
      vec ? body(__half{}, std::integral_constant<int, 8>{})
          : body(__half{}, std::integral_constant<int, 1>{});
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// L-inf: x <- clamp(clamp(x + alpha sign(g), x0 - eps, x0 + eps), lo, hi)

__device__ __forceinline__ float linf_update(float x, float g, float x0, const PgdTensor& p) {
  float t = __fadd_rn(x, __fmul_rn(p.alpha, sign_nan(g)));
  t = min_nan(max_nan(t, __fsub_rn(x0, p.eps)), __fadd_rn(x0, p.eps));
  return min_nan(max_nan(t, p.lo), p.hi);
}

__global__ void __launch_bounds__(kThreads) pgd_linf_kernel(Batch b) {
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
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
          xv.v[j] = from_f<T>(linf_update(to_f(xv.v[j]), to_f(gv.v[j]), to_f(ov.v[j]), p));
        }
        store<T, V>(x + i, xv);
      });
    });
  }
}

// ---------------------------------------------------------------------------------------------
// L2, pass A: partial sums of g^2 per tile.

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

// L2, pass B: d = (x + g * alpha/||g||) - x0 stored into x; partial sums of d^2 per tile
// (of d as stored, so ||d|| is the norm of what pass C reads).
__global__ void __launch_bounds__(kThreads)
    l2_step_kernel(Batch b, const float* partial_g, float* partial_d) {
  __shared__ float smem[kWarps];
  __shared__ float bcast;
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
    const int64_t tps = b.tiles_per_sample[r.t];
    const int64_t first = b.tile_begin[r.t] + r.sample * tps;
    const float gn = fmaxf(__fsqrt_rn(sample_sum(partial_g + first, tps, &bcast)), kNormEps);
    const float s = __fdiv_rn(p.alpha, gn);
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

// L2, pass C: x = clamp(x0 + d * min(1, eps/||d||), lo, hi).
__global__ void __launch_bounds__(kThreads) l2_project_kernel(Batch b, const float* partial_d) {
  __shared__ float bcast;
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const TileRef r = locate(b, tile);
    const PgdTensor& p = b.t[r.t];
    const int64_t tps = b.tiles_per_sample[r.t];
    const int64_t first = b.tile_begin[r.t] + r.sample * tps;
    const float dn = fmaxf(__fsqrt_rn(sample_sum(partial_d + first, tps, &bcast)), kNormEps);
    const float f = fminf(__fdiv_rn(p.eps, dn), 1.f);
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

// ---------------------------------------------------------------------------------------------
// Random start (L-inf). Philox4x32-10 (Salmon et al., SC'11), counter = (offset/4, element
// group), key = seed: the same counter layout torch's CUDA generators use (offset in the low
// half, subsequence in the high half), so our draws never overlap other ops' draws.

__device__ __forceinline__ uint4 philox4x32_10(uint4 c, uint2 k) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(kM0, c.x), lo0 = kM0 * c.x;
    const uint32_t hi1 = __umulhi(kM1, c.z), lo1 = kM1 * c.z;
    c = make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
    k.x += kW0;
    k.y += kW1;
  }
  return c;
}

// 24 random bits -> [0, 1), like torch's uniform for float.
__device__ __forceinline__ float uniform01(uint32_t r) {
  return static_cast<float>(r >> 8) * (1.0f / 16777216.0f);
}

__global__ void __launch_bounds__(kThreads) random_start_linf_kernel(StartBatch b, PhiloxArgs rng) {
  const uint64_t seed = rng.seed_ptr ? static_cast<uint64_t>(*rng.seed_ptr) : rng.seed;
  const uint64_t offset =
      rng.offset_ptr ? static_cast<uint64_t>(*rng.offset_ptr) + rng.offset_intragraph : rng.offset;
  const uint2 key = make_uint2(static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t off4 = offset / 4;
  const int64_t tiles = b.tile_begin[b.n];
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    int t = 0;
    while (tile >= b.tile_begin[t + 1]) ++t;
    const StartTensor& p = b.t[t];
    const int64_t base = (tile - b.tile_begin[t]) * kTile;
    const int64_t len = p.numel - base < kTile ? p.numel - base : kTile;
    // element groups of 4 share one Philox call; groups are numbered across the whole list
    int64_t group0 = b.group_base;
    for (int u = 0; u < t; ++u) group0 += (b.t[u].numel + 3) / 4;
    group0 += base / 4;
    dispatch(p.dtype, b.vec[t], [&](auto tag, auto) {
      using T = decltype(tag);
      T* __restrict__ x = static_cast<T*>(p.x) + base;
      const T* __restrict__ x0 = static_cast<const T*>(p.x0) + base;
      // 4 elements (one Philox call) per step; aligned 4-wide packs when allowed.
      for (int64_t i = int64_t(threadIdx.x) * 4; i < len; i += int64_t(kThreads) * 4) {
        const uint64_t sub = static_cast<uint64_t>(group0 + i / 4);
        const uint4 r = philox4x32_10(
            make_uint4(static_cast<uint32_t>(off4), static_cast<uint32_t>(off4 >> 32),
                       static_cast<uint32_t>(sub), static_cast<uint32_t>(sub >> 32)),
            key);
        const uint32_t rs[4] = {r.x, r.y, r.z, r.w};
        const int n = len - i < 4 ? static_cast<int>(len - i) : 4;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (j < n) {
            const float d = __fmul_rn(__fsub_rn(__fmul_rn(2.f, uniform01(rs[j])), 1.f), p.eps);
            const float v = __fadd_rn(to_f(x0[i + j]), d);
            x[i + j] = from_f<T>(min_nan(max_nan(v, p.lo), p.hi));
          }
        }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t tiles_per_sample(const PgdTensor& p) { return (p.per_sample + kTile - 1) / kTile; }

template <typename Kernel>
int grid_for(Kernel kernel, int64_t tiles) {
  // Grid sized to the device: every SM full of resident blocks, no more (the loop strides).
  int device = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0);
  const int64_t full = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
  return static_cast<int>(tiles < full ? (tiles > 0 ? tiles : 1) : full);
}

}  // namespace

int64_t pgd_workspace_floats(const PgdTensor* tensors, int n, Norm norm) {
  if (norm != Norm::kL2) return 0;
  int64_t tiles = 0;
  for (int i = 0; i < n; ++i) tiles += tensors[i].samples * tiles_per_sample(tensors[i]);
  return 2 * tiles;
}

cudaError_t launch_pgd_step(const PgdTensor* tensors, int n, Norm norm, float* workspace,
                            cudaStream_t stream) {
  const int64_t total = pgd_workspace_floats(tensors, n, norm) / 2;
  float* partial_g = workspace;
  float* partial_d = workspace ? workspace + total : nullptr;
  for (int start = 0; start < n; start += kMaxTensorsPerLaunch) {
    Batch b{};
    b.n = n - start < kMaxTensorsPerLaunch ? n - start : kMaxTensorsPerLaunch;
    b.tile_begin[0] = 0;
    for (int i = 0; i < b.n; ++i) {
      const PgdTensor& p = tensors[start + i];
      b.t[i] = p;
      b.tiles_per_sample[i] = tiles_per_sample(p);
      b.tile_begin[i + 1] = b.tile_begin[i] + p.samples * b.tiles_per_sample[i];
      const int64_t w = 16 / elem_size(p.dtype);
      b.vec[i] = aligned16(p.x) && aligned16(p.g) && aligned16(p.x0) &&
                 (p.samples == 1 || p.per_sample % w == 0);
    }
    const int64_t tiles = b.tile_begin[b.n];
    if (tiles == 0) continue;
    if (norm == Norm::kLinf) {
      pgd_linf_kernel<<<grid_for(pgd_linf_kernel, tiles), kThreads, 0, stream>>>(b);
    } else {
      l2_grad_sumsq_kernel<<<grid_for(l2_grad_sumsq_kernel, tiles), kThreads, 0, stream>>>(
          b, partial_g);
      l2_step_kernel<<<grid_for(l2_step_kernel, tiles), kThreads, 0, stream>>>(b, partial_g,
                                                                               partial_d);
      l2_project_kernel<<<grid_for(l2_project_kernel, tiles), kThreads, 0, stream>>>(b,
                                                                                     partial_d);
      partial_g += tiles;
      partial_d += tiles;
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

uint64_t random_start_offset_increment() { return 4; }

cudaError_t launch_random_start_linf(const StartTensor* tensors, int n, PhiloxArgs rng,
                                     cudaStream_t stream) {
  int64_t group_base = 0;
  for (int start = 0; start < n; start += kMaxTensorsPerLaunch) {
    StartBatch b{};
    b.n = n - start < kMaxTensorsPerLaunch ? n - start : kMaxTensorsPerLaunch;
    b.group_base = group_base;
    b.tile_begin[0] = 0;
    for (int i = 0; i < b.n; ++i) {
      const StartTensor& p = tensors[start + i];
      b.t[i] = p;
      b.tile_begin[i + 1] = b.tile_begin[i] + (p.numel + kTile - 1) / kTile;
      b.vec[i] = 0;  // 4 elements per Philox call; scalar loads (8 B/element either way)
      group_base += (p.numel + 3) / 4;
    }
    const int64_t tiles = b.tile_begin[b.n];
    if (tiles == 0) continue;
    random_start_linf_kernel<<<grid_for(random_start_linf_kernel, tiles), kThreads, 0, stream>>>(
        b, rng);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace advcal
