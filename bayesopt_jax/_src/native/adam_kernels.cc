// Multi-tensor, in-place Adam kernels for XLA's CPU backend (jax.ffi).
//
// One call processes every float32 leaf of a parameter tree: the leaves are
// cut into chunks, and the chunks are shared between the calling thread and
// helpers scheduled on XLA's intra-op thread pool. Buffers named as outputs
// alias their inputs (jax.ffi.ffi_call's input_output_aliases), so the moments
// and, in the fused step, the parameters are updated in place.
//
// Every element is computed by one fixed sequence of IEEE float32
// operations, written out below: the sequence XLA's CPU compiler emits for
// bayesopt_jax's pure-JAX Adam in a plain jitted step on an FMA-capable x86
// machine (a multiply feeding an add becomes one fused multiply-add where
// XLA contracts it; the file is built with -ffp-contract=off so that only the
// explicit fmaf calls fuse). XLA rewrites the pure path differently in other
// contexts (it regroups divisions by scalars, folds constants), so the test
// suite bounds the difference in rounding units rather than asking for
// identical bits.
//
// Handlers (k = number of leaves; `scalars` is float32[kNumScalars], laid
// out as the Scalar enum below):
//   BjAdamMomentsF32: args  scalars, g[0..k), m[0..k), v[0..k)
//                     rets  m[0..k), v[0..k)
//   BjAdamStepF32:    args  scalars, p[0..k), g[0..k), m[0..k), v[0..k)
//                     rets  p[0..k), m[0..k), v[0..k)
//                     attr  decay: int64[k], 1 where weight decay applies

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Index of each value in the float32 scalars operand.
enum Scalar : int {
  kB1 = 0,       // b1
  kOneMinusB1,   // 1 - b1, rounded once from the user's value
  kB2,           // b2
  kOneMinusB2,   // 1 - b2
  kInvBc1,       // 1 / (1 - b1^t), or 1 without bias correction
  kInvBc2,       // 1 / (1 - b2^t), or 1
  kEps,          // eps (outside the square root)
  kNegLr,        // -learning_rate (fused step only)
  kWeightDecay,  // weight decay (fused step only)
  kClip,         // the finite-gradient clip sqrt(FLT_MAX)/2
  kNumScalars,
};

struct Coefficients {
  float b1, c1, b2, c2, r1, r2, eps, neg_lr, wd, clip;
};

Coefficients ReadScalars(const float* s) {
  return Coefficients{s[kB1],   s[kOneMinusB1], s[kB2],   s[kOneMinusB2],  s[kInvBc1],
                      s[kInvBc2], s[kEps],      s[kNegLr], s[kWeightDecay], s[kClip]};
}

#define BJ_ALWAYS_INLINE inline __attribute__((always_inline))

// g where it is finite, clipped to [-clip, clip]; non-finite values pass
// through. Branch-free so that the loops vectorize.
BJ_ALWAYS_INLINE float ClipFinite(float g, float clip) {
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof(bits));
  const bool finite = (bits & 0x7f800000u) != 0x7f800000u;
  const float low = g < -clip ? -clip : g;
  const float clipped = low > clip ? clip : low;
  return finite ? clipped : g;
}

// The per-element math, stated once. Every instruction-set variant below
// inlines these bodies; since each operation is a correctly rounded IEEE
// operation (multiply, fused multiply-add, divide, square root), every
// variant produces the same bits.

// The moments of one chunk, in place.
BJ_ALWAYS_INLINE void MomentsBody(const Coefficients& k, const float* __restrict g,
                                  float* __restrict m, float* __restrict v, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float gc = ClipFinite(g[i], k.clip);
    m[i] = std::fmaf(m[i], k.b1, gc * k.c1);
    v[i] = std::fmaf(v[i], k.b2, (gc * gc) * k.c2);
  }
}

// One whole step on a chunk: p, m and v in place.
template <bool kDecay>
BJ_ALWAYS_INLINE void StepBody(const Coefficients& k, float* __restrict p,
                               const float* __restrict g, float* __restrict m,
                               float* __restrict v, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float gc = ClipFinite(g[i], k.clip);
    const float m_new = std::fmaf(m[i], k.b1, gc * k.c1);
    const float v_new = std::fmaf(v[i], k.b2, (gc * gc) * k.c2);
    m[i] = m_new;
    v[i] = v_new;
    float u = (m_new * k.r1) / (std::sqrt(v_new * k.r2) + k.eps);
    if (kDecay) u = std::fmaf(k.wd, p[i], u);
    p[i] = std::fmaf(u, k.neg_lr, p[i]);
  }
}

// One compiled copy of the loops per instruction set. The library itself is
// built for the architecture's baseline (no -march), so it loads on any CPU;
// the copy used is chosen at load time from the CPU's features (cpuid), or
// by name for testing. Without hardware FMA, std::fmaf is the C library's
// correctly rounded software routine: slower, same results.
using MomentsFn = void (*)(const Coefficients&, const float*, float*, float*, int64_t);
using StepFn = void (*)(const Coefficients&, float*, const float*, float*, float*, int64_t);

struct Variant {
  const char* name;
  bool (*supported)();
  MomentsFn moments;
  StepFn step;
  StepFn step_decay;
};

#define BJ_DEFINE_VARIANT(SUFFIX, ATTRIBUTES)                                                \
  ATTRIBUTES void Moments##SUFFIX(const Coefficients& k, const float* __restrict g,         \
                                  float* __restrict m, float* __restrict v, int64_t n) {    \
    MomentsBody(k, g, m, v, n);                                                              \
  }                                                                                          \
  ATTRIBUTES void Step##SUFFIX(const Coefficients& k, float* __restrict p,                  \
                               const float* __restrict g, float* __restrict m,              \
                               float* __restrict v, int64_t n) {                            \
    StepBody<false>(k, p, g, m, v, n);                                                       \
  }                                                                                          \
  ATTRIBUTES void StepDecay##SUFFIX(const Coefficients& k, float* __restrict p,             \
                                    const float* __restrict g, float* __restrict m,         \
                                    float* __restrict v, int64_t n) {                       \
    StepBody<true>(k, p, g, m, v, n);                                                        \
  }

BJ_DEFINE_VARIANT(Baseline, )
bool Always() { return true; }

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define BJ_X86_VARIANTS 1
// Haswell and later (x86-64-v3's vector part): 256-bit AVX2 with FMA.
BJ_DEFINE_VARIANT(Avx2, __attribute__((target("avx2,fma"))))
// AVX-512 (Skylake-X, Ice Lake, Zen 4 and later). The build prefers 256-bit
// vectors (-mprefer-vector-width=256): the loops are bound by memory
// bandwidth, and 512-bit instructions lower the clock on some Intel cores;
// this copy still gains AVX-512VL's masked tails and 32 vector registers.
BJ_DEFINE_VARIANT(Avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
// __builtin_cpu_supports also checks that the OS saves the wider registers.
bool HasAvx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool HasAvx512() {
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}
#endif

// Best first.
const Variant kVariants[] = {
#ifdef BJ_X86_VARIANTS
    {"avx512", HasAvx512, MomentsAvx512, StepAvx512, StepDecayAvx512},
    {"avx2", HasAvx2, MomentsAvx2, StepAvx2, StepDecayAvx2},
#endif
    {"baseline", Always, MomentsBaseline, StepBaseline, StepDecayBaseline},
};

std::atomic<const Variant*> g_variant{nullptr};

const Variant& Active() {
  const Variant* v = g_variant.load(std::memory_order_acquire);
  if (v == nullptr) {
    for (const Variant& candidate : kVariants) {
      if (candidate.supported()) {
        v = &candidate;
        break;
      }
    }
    g_variant.store(v, std::memory_order_release);
  }
  return *v;
}

// A piece of one leaf.
struct Chunk {
  int leaf;
  int64_t begin, end;
};

constexpr int64_t kChunk = 1 << 15;     // elements per chunk (128 KiB per stream)
constexpr int64_t kParallelMin = 1 << 16;  // below this many elements, no helpers

std::vector<Chunk> MakeChunks(const std::vector<int64_t>& sizes) {
  std::vector<Chunk> chunks;
  for (int leaf = 0; leaf < static_cast<int>(sizes.size()); ++leaf) {
    for (int64_t b = 0; b < sizes[leaf]; b += kChunk) {
      chunks.push_back({leaf, b, std::min(sizes[leaf], b + kChunk)});
    }
  }
  return chunks;
}

// Runs body(chunk) for every chunk on the calling thread and on helpers from
// XLA's intra-op pool. Helpers claim chunks from a shared counter; the caller
// claims too, so the call finishes even if no helper ever starts, and it
// returns only once every claimed chunk is done. A helper that starts late
// finds nothing left and exits; the shared state outlives the call.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, std::vector<Chunk> chunks, int64_t total, Body body) {
  struct Shared {
    std::vector<Chunk> chunks;
    Body body;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    Shared(std::vector<Chunk> c, Body b) : chunks(std::move(c)), body(std::move(b)) {}
    void Work() {
      const int64_t n = static_cast<int64_t>(chunks.size());
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        body(chunks[i]);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto shared = std::make_shared<Shared>(std::move(chunks), std::move(body));
  const int64_t n = static_cast<int64_t>(shared->chunks.size());
  int64_t helpers = 0;
  if (total >= kParallelMin) {
    helpers = std::min<int64_t>(pool.num_threads() - 1, n - 1);
  }
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([shared]() { shared->Work(); });
  }
  shared->Work();
  while (shared->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

// Checks that leaf i of every group has the same float32 element count.
ffi::Error Sizes(const std::vector<std::vector<ffi::AnyBuffer>>& groups,
                 std::vector<int64_t>& sizes) {
  const size_t k = groups[0].size();
  sizes.assign(k, 0);
  for (size_t i = 0; i < k; ++i) {
    sizes[i] = static_cast<int64_t>(groups[0][i].element_count());
    for (const auto& group : groups) {
      if (group[i].element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("bayesopt_jax native Adam: float32 buffers only");
      }
      if (static_cast<int64_t>(group[i].element_count()) != sizes[i]) {
        return ffi::Error::InvalidArgument("bayesopt_jax native Adam: leaf sizes differ");
      }
    }
  }
  return ffi::Error::Success();
}

// Reads `groups` consecutive runs of k buffers from args (after the scalars)
// and from rets.
ffi::Error Unpack(ffi::RemainingArgs& args, ffi::RemainingRets& rets, size_t in_groups,
                  size_t out_groups, std::vector<std::vector<ffi::AnyBuffer>>& ins,
                  std::vector<std::vector<ffi::AnyBuffer>>& outs) {
  if (args.size() % in_groups != 0 || rets.size() != args.size() / in_groups * out_groups) {
    return ffi::Error::InvalidArgument("bayesopt_jax native Adam: wrong number of buffers");
  }
  const size_t k = args.size() / in_groups;
  ins.assign(in_groups, {});
  outs.assign(out_groups, {});
  for (size_t grp = 0; grp < in_groups; ++grp) {
    for (size_t i = 0; i < k; ++i) {
      auto b = args.get<ffi::AnyBuffer>(grp * k + i);
      if (b.has_error()) return b.error();
      ins[grp].push_back(*b);
    }
  }
  for (size_t grp = 0; grp < out_groups; ++grp) {
    for (size_t i = 0; i < k; ++i) {
      auto r = rets.get<ffi::AnyBuffer>(grp * k + i);
      if (r.has_error()) return r.error();
      outs[grp].push_back(**r);
    }
  }
  return ffi::Error::Success();
}

float* F32(const ffi::AnyBuffer& b) { return static_cast<float*>(b.untyped_data()); }

ffi::Error AdamMoments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                       ffi::RemainingRets rets) {
  if (scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("bayesopt_jax native Adam: bad scalars operand");
  }
  std::vector<std::vector<ffi::AnyBuffer>> in, out;
  if (auto e = Unpack(args, rets, 3, 2, in, out); e.failure()) return e;
  std::vector<int64_t> sizes;
  if (auto e = Sizes({in[0], in[1], in[2], out[0], out[1]}, sizes); e.failure()) return e;
  const Coefficients k = ReadScalars(scalars.typed_data());
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  const MomentsFn moments = Active().moments;
  ParallelFor(pool, MakeChunks(sizes), total, [k, in, out, moments](const Chunk& c) {
    const int64_t n = c.end - c.begin;
    const float* g = F32(in[0][c.leaf]) + c.begin;
    const float* m0 = F32(in[1][c.leaf]) + c.begin;
    const float* v0 = F32(in[2][c.leaf]) + c.begin;
    float* m = F32(out[0][c.leaf]) + c.begin;
    float* v = F32(out[1][c.leaf]) + c.begin;
    if (m != m0) std::memcpy(m, m0, n * sizeof(float));
    if (v != v0) std::memcpy(v, v0, n * sizeof(float));
    moments(k, g, m, v, n);
  });
  return ffi::Error::Success();
}

ffi::Error AdamStep(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                    ffi::RemainingRets rets, ffi::Span<const int64_t> decay) {
  if (scalars.element_count() != kNumScalars) {
    return ffi::Error::InvalidArgument("bayesopt_jax native Adam: bad scalars operand");
  }
  std::vector<std::vector<ffi::AnyBuffer>> in, out;
  if (auto e = Unpack(args, rets, 4, 3, in, out); e.failure()) return e;
  std::vector<int64_t> sizes;
  if (auto e = Sizes({in[0], in[1], in[2], in[3], out[0], out[1], out[2]}, sizes); e.failure()) {
    return e;
  }
  if (decay.size() != sizes.size()) {
    return ffi::Error::InvalidArgument("bayesopt_jax native Adam: `decay` needs one flag per leaf");
  }
  std::vector<char> decays(decay.begin(), decay.end());
  const Coefficients k = ReadScalars(scalars.typed_data());
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  const StepFn step = Active().step;
  const StepFn step_decay = Active().step_decay;
  ParallelFor(pool, MakeChunks(sizes), total, [k, in, out, decays, step, step_decay](const Chunk& c) {
    const int64_t n = c.end - c.begin;
    const float* p0 = F32(in[0][c.leaf]) + c.begin;
    const float* g = F32(in[1][c.leaf]) + c.begin;
    const float* m0 = F32(in[2][c.leaf]) + c.begin;
    const float* v0 = F32(in[3][c.leaf]) + c.begin;
    float* p = F32(out[0][c.leaf]) + c.begin;
    float* m = F32(out[1][c.leaf]) + c.begin;
    float* v = F32(out[2][c.leaf]) + c.begin;
    if (p != p0) std::memcpy(p, p0, n * sizeof(float));
    if (m != m0) std::memcpy(m, m0, n * sizeof(float));
    if (v != v0) std::memcpy(v, v0, n * sizeof(float));
    (decays[c.leaf] ? step_decay : step)(k, p, g, m, v, n);
  });
  return ffi::Error::Success();
}

// A streaming kernel for measuring memory bandwidth (benchmarks only): every
// output buffer x_i (aliased to its input) becomes a·x_i + y, for one
// read-only y. With one x it is the classic in-place triad (12 bytes per
// element); with three it moves the 28 bytes of the fused Adam step.
ffi::Error Stream(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> y, ffi::RemainingArgs args,
                  ffi::RemainingRets rets, float a) {
  if (args.size() != rets.size() || args.size() == 0) {
    return ffi::Error::InvalidArgument("bayesopt_jax stream: one output per input");
  }
  const int64_t n = static_cast<int64_t>(y.element_count());
  std::vector<float*> xs;
  for (size_t i = 0; i < rets.size(); ++i) {
    auto in = args.get<ffi::AnyBuffer>(i);
    auto out = rets.get<ffi::AnyBuffer>(i);
    if (in.has_error()) return in.error();
    if (out.has_error()) return out.error();
    if (static_cast<int64_t>((*out)->element_count()) != n) {
      return ffi::Error::InvalidArgument("bayesopt_jax stream: sizes differ");
    }
    float* dst = F32(**out);
    if (dst != F32(*in)) std::memcpy(dst, F32(*in), n * sizeof(float));
    xs.push_back(dst);
  }
  const float* src = y.typed_data();
  ParallelFor(pool, MakeChunks({n}), n, [a, src, xs](const Chunk& c) {
    for (float* x : xs) {
      float* __restrict xp = x + c.begin;
      const float* __restrict yp = src + c.begin;
      const int64_t len = c.end - c.begin;
#pragma GCC ivdep
      for (int64_t i = 0; i < len; ++i) xp[i] = a * xp[i] + yp[i];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(BjStreamF32, Stream,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("a"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(BjAdamMomentsF32, AdamMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(BjAdamStepF32, AdamStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("decay"));

// Lets the loader check that the library matches the Python side.
extern "C" int bj_native_abi_version() { return 3; }

// The instruction-set copy in use ("avx512", "avx2" or "baseline").
extern "C" const char* bj_native_isa() { return Active().name; }

// The copies built (supported_only = 0) or those this CPU can run (1), best
// first, comma-separated.
extern "C" const char* bj_native_isas(int supported_only) {
  static const auto list = [](bool only_supported) {
    std::string out;
    for (const Variant& v : kVariants) {
      if (only_supported && !v.supported()) continue;
      if (!out.empty()) out += ",";
      out += v.name;
    }
    return out;
  };
  static const std::string built = list(false), supported = list(true);
  return (supported_only ? supported : built).c_str();
}

// Chooses the copy by name ("" or "auto": the best this CPU runs). Returns 0,
// or -1 for an unknown name, -2 for a copy this CPU cannot run.
extern "C" int bj_native_select(const char* name) {
  const std::string want = name == nullptr ? "" : name;
  for (const Variant& v : kVariants) {
    if (want.empty() || want == "auto" ? v.supported() : want == v.name) {
      if (!v.supported()) return -2;
      g_variant.store(&v, std::memory_order_release);
      return 0;
    }
  }
  return -1;
}
