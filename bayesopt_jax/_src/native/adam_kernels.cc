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

// g where it is finite, clipped to [-clip, clip]; non-finite values pass
// through. Branch-free so that the loops vectorize.
inline float ClipFinite(float g, float clip) {
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof(bits));
  const bool finite = (bits & 0x7f800000u) != 0x7f800000u;
  const float low = g < -clip ? -clip : g;
  const float clipped = low > clip ? clip : low;
  return finite ? clipped : g;
}

// The moments of one chunk: m and v in place, u into its own buffer.
// The moments of one chunk, in place.
void MomentsChunk(const Coefficients& k, const float* __restrict g, float* __restrict m,
                  float* __restrict v, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float gc = ClipFinite(g[i], k.clip);
    m[i] = std::fmaf(m[i], k.b1, gc * k.c1);
    v[i] = std::fmaf(v[i], k.b2, (gc * gc) * k.c2);
  }
}

// One whole step on a chunk: p, m and v in place.
template <bool kDecay>
void StepChunk(const Coefficients& k, float* __restrict p, const float* __restrict g,
               float* __restrict m, float* __restrict v, int64_t n) {
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
  ParallelFor(pool, MakeChunks(sizes), total, [k, in, out](const Chunk& c) {
    const int64_t n = c.end - c.begin;
    const float* g = F32(in[0][c.leaf]) + c.begin;
    const float* m0 = F32(in[1][c.leaf]) + c.begin;
    const float* v0 = F32(in[2][c.leaf]) + c.begin;
    float* m = F32(out[0][c.leaf]) + c.begin;
    float* v = F32(out[1][c.leaf]) + c.begin;
    if (m != m0) std::memcpy(m, m0, n * sizeof(float));
    if (v != v0) std::memcpy(v, v0, n * sizeof(float));
    MomentsChunk(k, g, m, v, n);
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
  ParallelFor(pool, MakeChunks(sizes), total, [k, in, out, decays](const Chunk& c) {
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
    if (decays[c.leaf]) {
      StepChunk<true>(k, p, g, m, v, n);
    } else {
      StepChunk<false>(k, p, g, m, v, n);
    }
  });
  return ffi::Error::Success();
}

}  // namespace

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
extern "C" int bj_native_abi_version() { return 1; }
