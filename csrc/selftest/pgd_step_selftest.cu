// Host self-test of the L-inf CUDA kernels' work decomposition and arithmetic, for machines
// without a GPU (scripts/check_cuda_compile.sh builds and runs it; not part of advcal._C).
//
// The L-inf step and the L-inf random start are __host__ __device__ per-thread functions
// (linf_step_thread, start_linf_thread): here every thread of a simulated grid runs on the
// host, one after another, over batches built by the same host code the launchers use
// (for_each_flat_batch: chunking at kMaxTensorsPerLaunch, head/vector/tail split). Checked
// against an independent scalar reference, bit for bit: every element updated exactly once,
// for fp32/bf16/fp16, sizes around the vector width, misaligned views (equal and unequal
// offsets), lists longer than one launch, several grid sizes, NaN in x/g/x0; random start
// draws depend on the element index only (aligned == misaligned), land in the box.
#include "../pgd_step_kernels.cu"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <vector>

namespace advcal {
namespace cuda {
namespace {

int failures = 0;

#define CHECK(cond, ...)                                 \
  do {                                                   \
    if (!(cond)) {                                       \
      if (failures++ < 20) {                             \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);                        \
        std::printf("\n");                               \
      }                                                  \
    }                                                    \
  } while (0)

float load_f(const void* p, DType d, int64_t i) {
  switch (d) {
    case DType::kFloat32:
      return static_cast<const float*>(p)[i];
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default:
      return __half2float(static_cast<const __half*>(p)[i]);
  }
}
void store_f(void* p, DType d, int64_t i, float v) {
  switch (d) {
    case DType::kFloat32:
      static_cast<float*>(p)[i] = v;
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<__half*>(p)[i] = __float2half_rn(v);
  }
}
float round_to(DType d, float v) {
  float out = 0;
  char buf[4];
  store_f(buf, d, 0, v);
  out = load_f(buf, d, 0);
  return out;
}
bool same(float a, float b) { return (a != a && b != b) || std::memcmp(&a, &b, 4) == 0; }

// torch semantics, written out independently of the kernel's helpers.
float t_max(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : (a > b ? a : b); }
float t_min(float a, float b) { return std::isnan(a) || std::isnan(b) ? NAN : (a < b ? a : b); }
float t_sign(float g) { return std::isnan(g) ? 0.f : (g > 0 ? 1.f : (g < 0 ? -1.f : 0.f)); }

struct Buf {  // one tensor's storage, with `off` leading elements (a buf[off:] view)
  std::vector<char> mem;
  void* p;
  Buf(int64_t n, DType d, int off) : mem(static_cast<size_t>((n + off) * 4 + 64)) {
    const uintptr_t a = (reinterpret_cast<uintptr_t>(mem.data()) + 15) & ~uintptr_t(15);
    p = reinterpret_cast<char*>(a) + off * elem_size(d);
  }
};

struct Case {
  int64_t n;
  DType d;
  int off_x, off_g, off_x0;
};

void run_grid(int64_t units, int64_t full_blocks, const std::function<void(int64_t, int64_t)>& f) {
  const int64_t want = (units + kThreads - 1) / kThreads;
  const int64_t blocks = want < full_blocks ? (want > 0 ? want : 1) : full_blocks;
  const int64_t stride = blocks * kThreads;
  for (int64_t tid = 0; tid < stride; ++tid) f(tid, stride);
}

void test_linf_step(const std::vector<Case>& cases, int64_t full_blocks, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<float> ud;
  std::vector<Buf> xs, gs, x0s;
  std::vector<PgdTensor> ts;
  std::vector<std::vector<float>> want;
  const float alpha = 0.01f, eps = 0.3f, lo = 0.05f, hi = 0.95f;
  for (const Case& c : cases) {
    xs.emplace_back(c.n, c.d, c.off_x);
    gs.emplace_back(c.n, c.d, c.off_g);
    x0s.emplace_back(c.n, c.d, c.off_x0);
    PgdTensor p{xs.back().p, gs.back().p, x0s.back().p, 1, c.n, alpha, eps, lo, hi, c.d};
    std::vector<float> w(static_cast<size_t>(c.n));
    for (int64_t i = 0; i < c.n; ++i) {
      float x0 = ud(rng), x = x0 + 0.1f * nd(rng), g = nd(rng);
      if (i % 97 == 13) g = NAN;
      if (i % 101 == 7) x = NAN;
      if (i % 103 == 5) x0 = NAN;
      if (i % 89 == 3) g = 0.f;
      store_f(p.x, c.d, i, x);
      store_f(const_cast<void*>(p.g), c.d, i, g);
      store_f(const_cast<void*>(p.x0), c.d, i, x0);
      x = load_f(p.x, c.d, i), g = load_f(p.g, c.d, i), x0 = load_f(p.x0, c.d, i);
      float t = x + t_sign(g) * alpha;
      t = t_min(t_max(t, x0 - eps), x0 + eps);
      w[static_cast<size_t>(i)] = round_to(c.d, t_min(t_max(t, lo), hi));
    }
    want.push_back(std::move(w));
    ts.push_back(p);
  }
  int launches = 0;
  for_each_flat_batch(
      static_cast<int>(ts.size()), [&](int i) { return flat_step_tensor(ts[i]); },
      [&](const FlatBatch& b) {
        ++launches;
        run_grid(b.unit_begin[b.n], full_blocks,
                 [&](int64_t tid, int64_t stride) { linf_step_thread(b, tid, stride); });
        return cudaSuccess;
      });
  const int want_launches =
      (static_cast<int>(ts.size()) + kMaxTensorsPerLaunch - 1) / kMaxTensorsPerLaunch;
  CHECK(launches == want_launches, "%d launches, want %d", launches, want_launches);
  for (size_t t = 0; t < ts.size(); ++t) {
    const FlatTensor f = flat_step_tensor(ts[t]);
    for (int64_t i = 0; i < ts[t].per_sample; ++i) {
      const float got = load_f(ts[t].x, ts[t].dtype, i), w = want[t][static_cast<size_t>(i)];
      CHECK(same(got, w), "step tensor %zu (n=%lld dtype=%d vec=%d head=%lld) elem %lld: %g != %g",
            t, (long long)ts[t].per_sample, (int)ts[t].dtype, f.vec, (long long)f.head,
            (long long)i, got, w);
    }
  }
}

void test_random_start(const std::vector<Case>& cases, int64_t full_blocks) {
  std::vector<Buf> xs, x0s;
  std::vector<StartTensor> ts;
  const float eps = 0.25f, lo = 0.f, hi = 1.f;
  for (const Case& c : cases) {
    xs.emplace_back(c.n, c.d, c.off_x);
    x0s.emplace_back(c.n, c.d, c.off_x0);
    StartTensor p{xs.back().p, x0s.back().p, 1, c.n, eps, lo, hi, c.d};
    for (int64_t i = 0; i < c.n; ++i) {
      store_f(p.x, c.d, i, -7.f);  // poisoned
      store_f(const_cast<void*>(p.x0), c.d, i, i % 31 == 4 ? NAN : 0.1f + 0.8f * (i % 10) / 9.f);
    }
    ts.push_back(p);
  }
  const Rng r{0x1234567890abcdefull, 40};
  int64_t group_base = 0;
  std::vector<int64_t> bases;
  for_each_flat_batch(
      static_cast<int>(ts.size()),
      [&](int i) {
        const FlatTensor f = flat_start_tensor(ts[i], group_base);
        bases.push_back(group_base);
        group_base += (f.n + 3) / 4;
        return f;
      },
      [&](const FlatBatch& b) {
        run_grid(b.unit_begin[b.n], full_blocks,
                 [&](int64_t tid, int64_t stride) { start_linf_thread(b, r, tid, stride); });
        return cudaSuccess;
      });
  for (size_t t = 0; t < ts.size(); ++t) {
    const StartTensor& p = ts[t];
    for (int64_t i = 0; i < p.per_sample; ++i) {
      const uint4 q = philox4x32_10(r.off4, static_cast<uint64_t>(bases[t] + i / 4), r.seed);
      const uint32_t bits[4] = {q.x, q.y, q.z, q.w};
      const float x0 = load_f(p.x0, p.dtype, i);
      const float u = static_cast<float>(bits[i % 4] >> 8) / 16777216.f;
      const float w = round_to(p.dtype, t_min(t_max(x0 + (2.f * u - 1.f) * eps, lo), hi));
      const float got = load_f(p.x, p.dtype, i);
      CHECK(same(got, w), "start tensor %zu (n=%lld dtype=%d) elem %lld: %g != %g", t,
            (long long)p.per_sample, (int)p.dtype, (long long)i, got, w);
      if (!std::isnan(x0)) {
        CHECK(got >= round_to(p.dtype, x0 - eps) && got <= round_to(p.dtype, x0 + eps),
              "start out of box");
      }
    }
  }
}

void test_philox_known_answer() {
  // Random123's published known-answer vectors for philox4x32_10.
  uint4 c = philox4x32_10(0, 0, 0);
  CHECK(c.x == 0x6627e8d5u && c.y == 0xe169c58du && c.z == 0xbc57ac4cu && c.w == 0x9b00dbd8u,
        "philox(0,0) = %08x %08x %08x %08x", c.x, c.y, c.z, c.w);
  c = philox4x32_10(0xffffffffffffffffull, 0xffffffffffffffffull, 0xffffffffffffffffull);
  CHECK(c.x == 0x408f276du && c.y == 0x41c83b0eu && c.z == 0xa20bc7c6u && c.w == 0x6d5451fdu,
        "philox(~0,~0) = %08x %08x %08x %08x", c.x, c.y, c.z, c.w);
}

}  // namespace
}  // namespace cuda
}  // namespace advcal

int main() {
  using namespace advcal::cuda;
  std::mt19937 rng(0);
  const DType dts[3] = {DType::kFloat32, DType::kBFloat16, DType::kFloat16};
  const int64_t sizes[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 33, 1023, 4097, 65537};
  std::vector<Case> all;
  int k = 0;
  for (int64_t n : sizes) {
    for (DType d : dts) {
      const int o = k % 5;  // offsets 0..4 elements; every 4th case unequal (scalar mode)
      all.push_back(Case{n, d, o, k % 4 == 3 ? (o + 1) % 8 : o, o});
      ++k;
    }
  }
  test_philox_known_answer();
  // H200-like grid (132 SMs x 8 blocks), a tiny grid (heavy striding), one block.
  for (int64_t full : {int64_t(132 * 8), int64_t(3), int64_t(1)}) {
    test_linf_step(all, full, rng);  // 48 tensors: two launches
    test_linf_step({Case{100003, DType::kFloat32, 0, 0, 0}}, full, rng);
    test_random_start(all, full);
  }
  if (failures) {
    std::printf("pgd_step_selftest: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("pgd_step_selftest: L-inf step + random start host simulation OK\n");
  return 0;
}
