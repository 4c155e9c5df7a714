// Multi-tensor, in-place elementwise kernels for XLA's CPU backend (jax.ffi).
//
// A *rule* is the per-element arithmetic of one state update: it reads a
// gradient g and the rule's state (2 to 4 floats), writes the new state and
// returns the update u. The kernel layer runs rules over many leaves; it
// knows nothing of optimizers, chains or steps. Each rule has two kernels:
//
//   update:  args  scalars, g[0..k), s0[0..k), s1[0..k) [, s2[0..k) [, s3[0..k)]]
//            rets  s0[0..k), s1[0..k) [, s2[0..k) [, s3[0..k)]]
//            (the state only: the caller forms u from it inside XLA's loop
//            that applies u, so no buffer of updates is written and read)
//   step:    args  scalars, step[2], p[0..k), g[0..k), s0.., s1.. [, s2.. [, s3..]]
//            rets  p[0..k), s0[0..k), s1[0..k) [, s2[0..k) [, s3[0..k)]]
//            attr  decay: int64[k], 1 where weight decay applies
//
//   update_q8: args  scalars, values, mids, below, g[0..k),
//                   codes0[0..k), scale0[0..k), codes1.., scale1.. [, codes2, scale2 ...]
//              rets  u[0..k), codes0[0..k), scale0[0..k), ...
//              attrs last: int64[k] (each leaf's last-axis length), top_min
//            (the state in block-wise 8-bit storage, see below)
//
// and one kernel that is not a rule, the variational σ-filter's draw:
//
//   sample:  args  [N, scale], delta[k], words[k][3] (uint32), p[0..k), r[0..k)
//                  [, σ[0..k)]
//            rets  p̃[0..k)
//            (with σ, the variational online-Newton step's proximal draw)
//
// (k = number of leaves). The step kernel also applies the update to the
// parameters: p ← fma(u + wd·p [if decay], factor, p) with step = [factor, wd]
// (factor is -learning_rate, or whatever scalar the chain multiplies by).
// State buffers alias their inputs (jax.ffi.ffi_call's input_output_aliases),
// so the state and, in the step kernel, the parameters are updated in place.
//
// One call processes every leaf it is given: the leaves are cut into
// chunks, and the chunks are shared between the calling thread and helpers
// scheduled on XLA's intra-op thread pool.
//
// Every element is computed by one fixed sequence of IEEE float32
// operations, written out below (the file is built with -ffp-contract=off,
// so only the explicit fmaf calls fuse). XLA compiles the pure-JAX statement
// of the same rule differently in different contexts (it regroups divisions
// by scalars, folds constants, contracts products into FMAs), so the test
// suite bounds the difference in rounding units of each result's terms.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

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

// Minimum and maximum that return NaN when either operand is NaN (as XLA's
// minimum and maximum do; std::fmin and std::fmax drop the NaN).
BJ_ALWAYS_INLINE float MinNan(float a, float b) {
  const float m = a < b ? a : b;
  return a != a ? a : (b != b ? b : m);
}
BJ_ALWAYS_INLINE float MaxNan(float a, float b) {
  const float m = a > b ? a : b;
  return a != a ? a : (b != b ? b : m);
}

// ---------------------------------------------------------------------------
// The rules. Each states its scalars (the float32 operand, in this order),
// its state and its per-element arithmetic, once. Every instruction-set copy
// below inlines these bodies; each operation is a correctly rounded IEEE
// operation (multiply, divide, fused multiply-add, square root), so every
// copy gives the same bits.
// ---------------------------------------------------------------------------

// Adam: state (m, v).
//   scalars: b1, 1-b1, b2, 1-b2, 1/(1-b1^t), 1/(1-b2^t), eps, clip
//   m ← fma(m, b1, (1-b1)·g), v ← fma(v, b2, (g·g)·(1-b2))
//   u = (m·r1) / (sqrt(v·r2) + eps)
struct Adam {
  static constexpr int kStates = 2;
  static constexpr int kScalars = 8;
  struct K {
    float b1, c1, b2, c2, r1, r2, eps, clip;
  };
  static K Read(const float* s) { return K{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]}; }
  static BJ_ALWAYS_INLINE float Element(const K& k, float g, float& m, float& v, float&, float&) {
    const float gc = ClipFinite(g, k.clip);
    m = std::fmaf(m, k.b1, gc * k.c1);
    v = std::fmaf(v, k.b2, (gc * gc) * k.c2);
    return (m * k.r1) / (std::sqrt(v * k.r2) + k.eps);
  }
};

// AMSGrad: state (m, v, n), n the running maximum.
//   scalars: b1, 1-b1, b2, 1-b2, r1 = 1/(1-b1^t), r2 = 1/(1-b2^t) (1 where
//            a correction is off), eps, clip, raw (1: n is the maximum of
//            the raw v, 0: of the corrected v)
//   m ← fma(m, b1, (1-b1)·g), v ← fma(v, b2, (g·g)·(1-b2))
//   raw:       n ← max(n, v),        u = (m·r1) / (sqrt(n·r2) + eps)
//   corrected: n ← max(n, v·r2),     u = (m·r1) / (sqrt(n) + eps)
//   (products by reciprocals, as in Adam: one division per element)
struct Amsgrad {
  static constexpr int kStates = 3;
  static constexpr int kScalars = 9;
  struct K {
    float b1, c1, b2, c2, r1, r2, eps, clip, raw;
  };
  static K Read(const float* s) { return K{s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]}; }
  static BJ_ALWAYS_INLINE float Element(const K& k, float g, float& m, float& v, float& n,
                                         float&) {
    const float gc = ClipFinite(g, k.clip);
    m = std::fmaf(m, k.b1, gc * k.c1);
    v = std::fmaf(v, k.b2, (gc * gc) * k.c2);
    // Both branches are computed and one is selected, so that the loop
    // has no control flow and vectorizes.
    const float v_hat = v * k.r2;
    n = MaxNan(n, k.raw != 0.0f ? v : v_hat);
    const float n_hat = n * k.r2;
    return (m * k.r1) / (std::sqrt(k.raw != 0.0f ? n_hat : n) + k.eps);
  }
};

// The σ-filter and its fixed point: state ([m,] s, σ).
//   scalars: beta, 1-beta, rs = 1/(1-beta^t), floor, eta, eta², first,
//            ratio_on, kappa, max_on, sigma_max, fixed, clip, b1, 1-b1,
//            rm = 1/(1-b1^t) (the corrections are 1 where they are off;
//            first, ratio_on, max_on and fixed are 0 or 1)
//   s ← fma(s, beta, (g·g)·(1-beta)),  ŝ = s·rs + floor
//   d = g (no m), or m ← fma(m, b1, (1-b1)·g), d = m·rm
//   (two divisions per element, 1/ŝ and the filter's, and one square root)
//   σ* = eta²/2 + eta·sqrt(eta²/4 + 1/ŝ)
//   σ ← σ* if fixed or first, else σ/(1 + ŝ·σ) + eta²
//   σ ← min(σ, kappa·σ*) if ratio_on;  σ ← min(σ, sigma_max) if max_on
//   u = σ·d
template <bool kMomentum>
struct Sigma {
  static constexpr int kStates = kMomentum ? 3 : 2;
  static constexpr int kScalars = 16;
  struct K {
    float beta, cb, rs, floor, eta, eta2, star_now, ratio_on, kappa, max_on, smax, clip, b1, c1,
        rm;
  };
  // Flags stay floats (0 or 1): a float select vectorizes where a bool may not.
  static K Read(const float* s) {
    const float star_now = (s[6] != 0.0f || s[11] != 0.0f) ? 1.0f : 0.0f;
    return K{s[0],  s[1],  s[2], s[3],  s[4],  s[5],  star_now, s[7],
             s[8],  s[9],  s[10], s[12], s[13], s[14], s[15]};
  }
  // With momentum the state is (m, s, σ); without it (s, σ) and the third
  // slot is unused.
  static BJ_ALWAYS_INLINE float Element(const K& k, float g, float& a, float& b, float& c,
                                         float&) {
    float& s = kMomentum ? b : a;
    float& sigma = kMomentum ? c : b;
    const float gc = ClipFinite(g, k.clip);
    s = std::fmaf(s, k.beta, (gc * gc) * k.cb);
    const float s_hat = s * k.rs + k.floor;
    float d = gc;
    if (kMomentum) {
      a = std::fmaf(a, k.b1, gc * k.c1);
      d = a * k.rm;
    }
    const float star = k.eta2 / 2.0f + k.eta * std::sqrt(k.eta2 / 4.0f + 1.0f / s_hat);
    const float filtered = sigma / (1.0f + s_hat * sigma) + k.eta2;
    // Every candidate is computed and selected (no control flow: vectorizes).
    const float chosen = k.star_now != 0.0f ? star : filtered;
    const float capped = MinNan(chosen, k.kappa * star);
    const float ratioed = k.ratio_on != 0.0f ? capped : chosen;
    const float maxed = MinNan(ratioed, k.smax);
    sigma = k.max_on != 0.0f ? maxed : ratioed;
    return sigma * d;
  }
};

// The variational σ-filter ("variance" curvature): the σ-filter's state and
// element, and r, an EMA of the squared deviation of g from the debiased
// gradient mean before this step (its control variate).
//   scalars: the σ-filter's (above), then gamma, 1-gamma,
//            rp = 1/(1-b1^(t-1)) (0 at the first step, 1 where the
//            correction is off)
//   dev = g (no m), or g − m·rp clipped like g (m as it was before this step)
//   r ← fma(r, gamma, (dev·dev)·(1-gamma)); then the σ-filter's element
//   state ([m,] s, σ, r); u = σ·d as in the σ-filter
template <bool kMomentum>
struct Variational {
  using Filter = Sigma<kMomentum>;
  static constexpr int kStates = Filter::kStates + 1;
  static constexpr int kScalars = Filter::kScalars + 3;
  struct K {
    typename Filter::K filter;
    float gamma, cg, rp;
  };
  static K Read(const float* s) {
    constexpr int n = Filter::kScalars;
    return K{Filter::Read(s), s[n], s[n + 1], s[n + 2]};
  }
  static BJ_ALWAYS_INLINE float Element(const K& k, float g, float& a, float& b, float& c,
                                         float& d) {
    float& r = kMomentum ? d : c;
    const float gc = ClipFinite(g, k.filter.clip);
    float dev = gc;
    if (kMomentum) {
      const float m_prev = k.rp != 0.0f ? a * k.rp : 0.0f;
      dev = ClipFinite(gc - m_prev, k.filter.clip);
    }
    r = std::fmaf(r, k.gamma, (dev * dev) * k.cg);
    float unused = 0.0f;
    if constexpr (kMomentum) return Filter::Element(k.filter, g, a, b, c, unused);
    return Filter::Element(k.filter, g, a, b, unused, unused);
  }
};

// ---------------------------------------------------------------------------
// The loops: a rule over one chunk, as an update (the state only) or as a
// step (p updated too). Up to four state streams; unused ones are null.
// ---------------------------------------------------------------------------

// Element i of a chunk: reads the state, applies the rule, writes the state
// back, returns u.
template <class R>
BJ_ALWAYS_INLINE float ApplyAt(const typename R::K& k, const float* __restrict g,
                               float* __restrict s0, float* __restrict s1,
                               float* __restrict s2, float* __restrict s3, int64_t i) {
  float a = s0[i], b = s1[i], c = 0.0f, d = 0.0f;
  if constexpr (R::kStates > 2) c = s2[i];
  if constexpr (R::kStates > 3) d = s3[i];
  const float u = R::Element(k, g[i], a, b, c, d);
  s0[i] = a;
  s1[i] = b;
  if constexpr (R::kStates > 2) s2[i] = c;
  if constexpr (R::kStates > 3) s3[i] = d;
  return u;
}

template <class R>
BJ_ALWAYS_INLINE void UpdateLoop(const typename R::K k, const float* __restrict g,
                                 float* __restrict s0, float* __restrict s1,
                                 float* __restrict s2, float* __restrict s3, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    (void)ApplyAt<R>(k, g, s0, s1, s2, s3, i);  // u is dead code here: only the state is kept
  }
}

template <class R, bool kDecay>
BJ_ALWAYS_INLINE void StepLoop(const typename R::K k, float factor, float wd,
                               float* __restrict p, const float* __restrict g,
                               float* __restrict s0, float* __restrict s1,
                               float* __restrict s2, float* __restrict s3, int64_t n) {
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    float u = ApplyAt<R>(k, g, s0, s1, s2, s3, i);
    if (kDecay) u = std::fmaf(wd, p[i], u);
    p[i] = std::fmaf(u, factor, p[i]);
  }
}

// ---------------------------------------------------------------------------
// The rules over state in block-wise 8-bit storage (bayesopt_jax/_src/
// quantize.py states the format; this is its transcription). A state array
// is int8 (signed code map) or uint8 (unsigned) codes in the array's shape
// and one float32 scale per block: the last axis of length L is cut into B
// runs of run = ceil(L / B) elements, the last one shorter. Per block:
//   decode  x = values[code] · scale                      (one multiply)
//   rule    the rule's Element on the float32 values, u written out
//   encode  scale = max |x| (NaN if any x is NaN), y = x · (1 / (scale or 1)),
//           code = the count of decision points below y, found with one read
//           of `below` (indexed by y's top 16 bits) and one comparison;
//           every code of a block with a non-finite scale is 0.
// The tables come from Python as operands: values[2][256] and mids[2][256]
// (row 0 unsigned, row 1 signed; mids padded with +inf), below[2][2·buckets]
// (per sign of y, per bucket). Every operation is exact or one correctly
// rounded IEEE operation, so the result is the pure-JAX statement's decode,
// rule (this file's Element) and encode, bit for bit.
// ---------------------------------------------------------------------------

struct CodeTables {
  const float* values;   // [2][256]
  const float* mids;     // [2][256]
  const int32_t* below;  // [2][2 * buckets]
  int64_t buckets;       // per sign of y
  int64_t top_min;       // top 16 bits of the smallest bucket's lower edge (bucket 1)
};

struct Slot {
  void* codes;  // int8 or uint8, the leaf's elements
  float* scale;
  int sign;  // 1: signed map (int8 codes), 0: unsigned (uint8)
};

struct Geometry {
  int64_t last, blocks, run;  // last-axis length, blocks per row, run length
};

// The code of y = x / scale in [-1, 1] for one map: `below` and `mids` are
// that map's rows. Integer arithmetic on the bits, so the loop vectorizes.
BJ_ALWAYS_INLINE int32_t NearestCode(const int32_t* __restrict below,
                                     const float* __restrict mids, int32_t buckets,
                                     int32_t top_min, float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  const int32_t neg = static_cast<int32_t>(bits >> 31);
  int32_t bucket = static_cast<int32_t>((bits & 0x7fffffffu) >> 16) - top_min + 1;
  bucket = bucket < 0 ? 0 : (bucket > buckets - 1 ? buckets - 1 : bucket);
  const int32_t first = below[neg * buckets + bucket];
  return first + (mids[first] < y ? 1 : 0);
}

// Encodes the n values x into codes (int8: index - 128, or uint8) and
// returns the block's scale.
template <typename Code>
BJ_ALWAYS_INLINE float EncodeBlock(const CodeTables& t, int sign_map, const float* __restrict x,
                                   Code* __restrict codes, int64_t n) {
  // max |x| on the bits: for non-negative floats the order of the bits as
  // integers is the order of the values, and a NaN's are above infinity's,
  // so a NaN anywhere gives a NaN scale. An integer maximum vectorizes.
  uint32_t top_bits = 0;
  const uint32_t* __restrict xb = reinterpret_cast<const uint32_t*>(x);
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t a = xb[i] & 0x7fffffffu;
    top_bits = a > top_bits ? a : top_bits;
  }
  float top;
  std::memcpy(&top, &top_bits, sizeof(top));
  if ((top_bits & 0x7f800000u) == 0x7f800000u) {  // inf or NaN: every code 0
    std::memset(codes, sign_map ? 128 : 0, n);  // index 0: int8 -128 or uint8 0
    return top;
  }
  const float inverse = 1.0f / (top > 0.0f ? top : 1.0f);
  const int32_t buckets = static_cast<int32_t>(t.buckets);
  const int32_t top_min = static_cast<int32_t>(t.top_min);
  const int32_t* __restrict below = t.below + sign_map * 2 * t.buckets;
  const float* __restrict mids = t.mids + sign_map * 256;
  const int32_t offset = sign_map ? 128 : 0;
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    codes[i] = static_cast<Code>(NearestCode(below, mids, buckets, top_min, x[i] * inverse) - offset);
  }
  return top;
}

// Blocks [b0, b1) of one leaf (block b is row b / B, run b % B). `tmp` holds
// 4 · run floats.
template <class R>
BJ_ALWAYS_INLINE void Q8Loop(const typename R::K k, const CodeTables& t, const float* __restrict g,
                             float* __restrict u, const Slot* slots, Geometry geo, int64_t b0,
                             int64_t b1, float* __restrict tmp) {
  constexpr int kS = R::kStates;
  float* x[4] = {tmp, tmp + geo.run, tmp + 2 * geo.run, tmp + 3 * geo.run};
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t row = b / geo.blocks, j = b % geo.blocks;
    const int64_t begin = row * geo.last + j * geo.run;
    int64_t n = geo.last - j * geo.run;
    n = n < 0 ? 0 : (n > geo.run ? geo.run : n);
    for (int s = 0; s < kS; ++s) {
      const float scale = slots[s].scale[b];
      float* __restrict xs = x[s];
      if (slots[s].sign) {
        const int8_t* c = static_cast<const int8_t*>(slots[s].codes) + begin;
        const float* v = t.values + 256;
#pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) xs[i] = v[c[i] + 128] * scale;
      } else {
        const uint8_t* c = static_cast<const uint8_t*>(slots[s].codes) + begin;
#pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) xs[i] = t.values[c[i]] * scale;
      }
    }
    float* __restrict x0 = x[0];
    float* __restrict x1 = x[1];
    float* __restrict x2 = x[2];
    float* __restrict x3 = x[3];
    const float* __restrict gb = g + begin;
    float* __restrict ub = u + begin;
#pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      float c = kS > 2 ? x2[i] : 0.0f;
      float d = kS > 3 ? x3[i] : 0.0f;
      ub[i] = R::Element(k, gb[i], x0[i], x1[i], c, d);
      if constexpr (kS > 2) x2[i] = c;
      if constexpr (kS > 3) x3[i] = d;
    }
    for (int s = 0; s < kS; ++s) {
      slots[s].scale[b] =
          slots[s].sign
              ? EncodeBlock(t, 1, x[s], static_cast<int8_t*>(slots[s].codes) + begin, n)
              : EncodeBlock(t, 0, x[s], static_cast<uint8_t*>(slots[s].codes) + begin, n);
    }
  }
}

// ---------------------------------------------------------------------------
// The variational σ-filter's training-time draw (bayesopt_jax/_src/draws.py
// states it; this is its transcription): for entry c of a leaf (its row-major
// index, leaves below 2^32 entries) and the leaf's three key words,
//   b = f(f(f(c ^ k0) ^ k1) ^ k2)            f: lowbias32, integer arithmetic
//   u = (2·(b >> 9) + 1)·2^-23 − 1           exact in float32, in (−1, 1)
//   ε = √2·erf⁻¹(u)
//   h = max(scale·r, 0), v = 1/(N·(h + δ)),  p̃ = p + √v·ε
// or, given σ (the proximal precision of variational_newton),
//   v = 1/(N·((h + 1/σ) + δ))     (σ = 0: v = 0, the draw is the mean)
// The bits and u are those of the pure statement exactly. erf⁻¹ is Giles'
// single-precision approximation (the polynomials XLA's erf⁻¹ evaluates)
// through w = −log((1−u)(1+u)), with the logarithm below instead of the C
// library's, so that the loop vectorizes; the tests bound ε against
// float64 erf⁻¹ as they bound the pure path's.
// ---------------------------------------------------------------------------

constexpr uint32_t kMix1 = 0x7feb352du, kMix2 = 0x846ca68bu;

BJ_ALWAYS_INLINE uint32_t Mix(uint32_t x) {
  x ^= x >> 16;
  x *= kMix1;
  x ^= x >> 15;
  x *= kMix2;
  return x ^ (x >> 16);
}

// log y for a positive normal float y. y = 2^e·m with m in [√½, √2): the
// carry of adding (bits of 1) − (bits of √½) moves the exponent by one
// exactly when the mantissa is at or above √2's. log m = 2·atanh(s) with
// s = (m − 1)/(m + 1), |s| < 0.172, by its series through s⁹ (the next
// term is below 2.3e-9 of the sum); ln 2 in two parts, so that e·ln2_hi is
// exact. (A division and four multiply-adds: cheaper here than a
// division-free polynomial in m − 1 of the same accuracy, measured.)
BJ_ALWAYS_INLINE float LogPositive(float y) {
  constexpr uint32_t kOne = 0x3f800000u, kHalfRoot = 0x3f3504f3u;
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof(bits));
  const uint32_t shifted = bits + (kOne - kHalfRoot);
  const float e = static_cast<float>(static_cast<int32_t>(shifted >> 23) - 127);
  const uint32_t m_bits = (shifted & 0x007fffffu) + kHalfRoot;
  float m;
  std::memcpy(&m, &m_bits, sizeof(m));
  const float s = (m - 1.0f) / (m + 1.0f);
  const float z = s * s;
  float t = std::fmaf(z, 2.0f / 9.0f, 2.0f / 7.0f);
  t = std::fmaf(z, t, 2.0f / 5.0f);
  t = std::fmaf(z, t, 2.0f / 3.0f);
  const float log_m = std::fmaf(s * z, t, 2.0f * s);
  constexpr float kLn2Hi = 0.693145751953125f;          // 16 significant bits
  constexpr float kLn2Lo = 1.428606765330187045e-06f;  // ln 2 − kLn2Hi
  return std::fmaf(e, kLn2Hi, std::fmaf(e, kLn2Lo, log_m));
}

// √2·erf⁻¹(u) for u in (−1, 1) with 1 − u and 1 + u exact (u a multiple of
// 2^-23, as the draws' are). Giles, "Approximating the erfinv function",
// GPU Computing Gems Jade Edition, 2011: single-precision coefficients.
BJ_ALWAYS_INLINE float NormalFromUniform(float u) {
  constexpr float kLow[9] = {2.81022636e-08f,  3.43273939e-07f, -3.5233877e-06f,
                             -4.39150654e-06f, 0.00021858087f,  -0.00125372503f,
                             -0.00417768164f,  0.246640727f,    1.50140941f};
  constexpr float kHigh[9] = {-0.000200214257f, 0.000100950558f, 0.00134934322f,
                              -0.00367342844f,  0.00573950773f,  -0.0076224613f,
                              0.00943887047f,   1.00167406f,     2.83297682f};
  const float w = -LogPositive((1.0f - u) * (1.0f + u));
  // Both polynomials by Horner's rule with fused multiply-adds (two
  // independent chains; the loop is bound by their latency), then a select.
  const float x_low = w - 2.5f, x_high = std::sqrt(w) - 3.0f;
  float p_low = kLow[0], p_high = kHigh[0];
#pragma GCC unroll 8
  for (int i = 1; i < 9; ++i) {
    p_low = std::fmaf(p_low, x_low, kLow[i]);
    p_high = std::fmaf(p_high, x_high, kHigh[i]);
  }
  const float p = w < 5.0f ? p_low : p_high;
  return (p * u) * 1.41421354f;  // the float32 nearest √2
}

BJ_ALWAYS_INLINE float UniformFromIndex(uint32_t c, uint32_t k0, uint32_t k1, uint32_t k2) {
  const uint32_t b = Mix(Mix(Mix(c ^ k0) ^ k1) ^ k2);
  const int32_t odd = static_cast<int32_t>(b >> 9) * 2 + 1;
  return static_cast<float>(odd) * 0x1p-23f - 1.0f;
}

struct SampleArgs {
  float num_data, scale, delta;
  uint32_t k0, k1, k2;
};

// Entries [begin, begin + n) of one leaf (sig: σ, read only with kProximal).
template <bool kProximal>
BJ_ALWAYS_INLINE void SampleLoop(const SampleArgs a, const float* __restrict p,
                                 const float* __restrict r, const float* __restrict sig,
                                 float* __restrict out, int64_t begin, int64_t n) {
  const uint32_t first = static_cast<uint32_t>(begin);
#pragma GCC ivdep
  for (int64_t i = 0; i < n; ++i) {
    const float eps =
        NormalFromUniform(UniformFromIndex(first + static_cast<uint32_t>(i), a.k0, a.k1, a.k2));
    float h = MaxNan(a.scale * r[i], 0.0f);
    if constexpr (kProximal) h = h + 1.0f / sig[i];
    const float v = 1.0f / (a.num_data * (h + a.delta));
    out[i] = p[i] + std::sqrt(v) * eps;
  }
}

using SampleFn = void (*)(const SampleArgs&, const float*, const float*, const float*, float*,
                          int64_t, int64_t);
#define BJ_DEFINE_SAMPLE(SUFFIX, ATTRIBUTES)                                                  \
  ATTRIBUTES void Sample##SUFFIX(const SampleArgs& a, const float* p, const float* r,         \
                                 const float* sig, float* out, int64_t begin, int64_t n) {    \
    if (sig == nullptr) {                                                                     \
      SampleLoop<false>(a, p, r, sig, out, begin, n);                                         \
    } else {                                                                                  \
      SampleLoop<true>(a, p, r, sig, out, begin, n);                                          \
    }                                                                                         \
  }

// One compiled copy of the loops per instruction set. The library itself is
// built for the architecture's baseline (no -march), so it loads on any CPU;
// the copy used is chosen at load time from the CPU's features (cpuid), or
// by name for testing. Without hardware FMA, std::fmaf is the C library's
// correctly rounded software routine: slower, same results.
template <class R>
struct Fns {
  using Update = void (*)(const typename R::K&, const float*, float*, float*, float*, float*,
                          int64_t);
  using Step = void (*)(const typename R::K&, float, float, float*, const float*, float*,
                        float*, float*, float*, int64_t);
  using Q8 = void (*)(const typename R::K&, const CodeTables&, const float*, float*,
                     const Slot*, Geometry, int64_t, int64_t, float*);
  Update update;
  Step step;
  Step step_decay;
  Q8 q8;
};

#define BJ_DEFINE_RULE(NAME, RULE, SUFFIX, ATTRIBUTES)                                        \
  ATTRIBUTES void Update##NAME##SUFFIX(const RULE::K& k, const float* g, float* s0, float* s1, \
                                       float* s2, float* s3, int64_t n) {                     \
    UpdateLoop<RULE>(k, g, s0, s1, s2, s3, n);                                                \
  }                                                                                           \
  ATTRIBUTES void Step##NAME##SUFFIX(const RULE::K& k, float f, float wd, float* p,           \
                                     const float* g, float* s0, float* s1, float* s2,         \
                                     float* s3, int64_t n) {                                  \
    StepLoop<RULE, false>(k, f, wd, p, g, s0, s1, s2, s3, n);                                 \
  }                                                                                           \
  ATTRIBUTES void StepDecay##NAME##SUFFIX(const RULE::K& k, float f, float wd, float* p,      \
                                          const float* g, float* s0, float* s1, float* s2,    \
                                          float* s3, int64_t n) {                             \
    StepLoop<RULE, true>(k, f, wd, p, g, s0, s1, s2, s3, n);                                  \
  }                                                                                           \
  ATTRIBUTES void Q8##NAME##SUFFIX(const RULE::K& k, const CodeTables& t, const float* g,     \
                                   float* u, const Slot* slots, Geometry geo, int64_t b0,     \
                                   int64_t b1, float* tmp) {                                  \
    Q8Loop<RULE>(k, t, g, u, slots, geo, b0, b1, tmp);                                        \
  }

using SigmaPlain = Sigma<false>;
using SigmaMomentum = Sigma<true>;
using VariationalPlain = Variational<false>;
using VariationalMomentum = Variational<true>;

// The rule table, the one place a rule is listed: its Python name (the FFI
// targets' and rules.py's), its handlers' symbol and its struct. Every list
// below (instruction-set copies, dispatch, handlers, the exported table) is
// generated from it; the loader checks the exported table against rules.py.
#define BJ_RULES(X, ...)                                   \
  X(adam, Adam, Adam, __VA_ARGS__)                         \
  X(amsgrad, Amsgrad, Amsgrad, __VA_ARGS__)                \
  X(sigma, Sigma, SigmaPlain, __VA_ARGS__)                 \
  X(sigma_momentum, SigmaMomentum, SigmaMomentum, __VA_ARGS__)    \
  X(variational, Variational, VariationalPlain, __VA_ARGS__)      \
  X(variational_momentum, VariationalMomentum, VariationalMomentum, __VA_ARGS__)

#define BJ_DEFINE_ONE(PY, NAME, RULE, SUFFIX, ATTRIBUTES) BJ_DEFINE_RULE(NAME, RULE, SUFFIX, ATTRIBUTES)
#define BJ_DEFINE_VARIANT(SUFFIX, ATTRIBUTES) \
  BJ_RULES(BJ_DEFINE_ONE, SUFFIX, ATTRIBUTES) BJ_DEFINE_SAMPLE(SUFFIX, ATTRIBUTES)
#define BJ_TABLE_ENTRY(PY, NAME, RULE, SUFFIX) \
  {Update##NAME##SUFFIX, Step##NAME##SUFFIX, StepDecay##NAME##SUFFIX, Q8##NAME##SUFFIX},
#define BJ_VARIANT_TABLE(SUFFIX) BJ_RULES(BJ_TABLE_ENTRY, SUFFIX) Sample##SUFFIX

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
BJ_RULES(BJ_DEFINE_ONE, Avx512, __attribute__((target("avx512f,avx512vl,avx2,fma"))))
// The draw is bound by arithmetic, not memory: there 512-bit vectors pay
// (about 1.4× the 256-bit copy's throughput on a Zen 4 core, measured).
BJ_DEFINE_SAMPLE(Avx512,
                 __attribute__((target("avx512f,avx512vl,avx2,fma,prefer-vector-width=512"))))
// __builtin_cpu_supports also checks that the OS saves the wider registers.
bool HasAvx2() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }
bool HasAvx512() {
  return HasAvx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl");
}
#endif

#define BJ_FNS_MEMBER(PY, NAME, RULE, ...) Fns<RULE> PY;
struct Variant {
  const char* name;
  bool (*supported)();
  BJ_RULES(BJ_FNS_MEMBER, )
  SampleFn sample;
};

// Best first.
const Variant kVariants[] = {
#ifdef BJ_X86_VARIANTS
    {"avx512", HasAvx512, BJ_VARIANT_TABLE(Avx512)},
    {"avx2", HasAvx2, BJ_VARIANT_TABLE(Avx2)},
#endif
    {"baseline", Always, BJ_VARIANT_TABLE(Baseline)},
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

template <class R>
const Fns<R>& ActiveFns();
#define BJ_ACTIVE_FNS(PY, NAME, RULE, ...) \
  template <>                              \
  const Fns<RULE>& ActiveFns<RULE>() {     \
    return Active().PY;                    \
  }
BJ_RULES(BJ_ACTIVE_FNS, )

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
        return ffi::Error::InvalidArgument("bayesopt_jax native kernel: float32 buffers only");
      }
      if (static_cast<int64_t>(group[i].element_count()) != sizes[i]) {
        return ffi::Error::InvalidArgument("bayesopt_jax native kernel: leaf sizes differ");
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
    return ffi::Error::InvalidArgument("bayesopt_jax native kernel: wrong number of buffers");
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


// Copies input j of a chunk into its output buffer unless they alias.
float* InPlace(const ffi::AnyBuffer& in, const ffi::AnyBuffer& out, const Chunk& c) {
  const float* src = F32(in) + c.begin;
  float* dst = F32(out) + c.begin;
  if (dst != src) std::memcpy(dst, src, (c.end - c.begin) * sizeof(float));
  return dst;
}

int64_t Total(const std::vector<int64_t>& sizes) {
  int64_t total = 0;
  for (int64_t s : sizes) total += s;
  return total;
}

// Unpack, then check that every buffer of leaf i has one float32 size.
ffi::Error Gather(ffi::RemainingArgs& args, ffi::RemainingRets& rets, size_t in_groups,
                  size_t out_groups, std::vector<std::vector<ffi::AnyBuffer>>& in,
                  std::vector<std::vector<ffi::AnyBuffer>>& out, std::vector<int64_t>& sizes) {
  if (auto e = Unpack(args, rets, in_groups, out_groups, in, out); e.failure()) return e;
  std::vector<std::vector<ffi::AnyBuffer>> all(in);
  all.insert(all.end(), out.begin(), out.end());
  return Sizes(all, sizes);
}

template <class R>
ffi::Error Update(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::RemainingArgs args,
                  ffi::RemainingRets rets) {
  constexpr int kS = R::kStates;
  if (scalars.element_count() != R::kScalars) {
    return ffi::Error::InvalidArgument("bayesopt_jax native kernel: bad scalars operand");
  }
  std::vector<std::vector<ffi::AnyBuffer>> in, out;
  std::vector<int64_t> sizes;
  if (auto e = Gather(args, rets, 1 + kS, kS, in, out, sizes); e.failure()) return e;
  const typename R::K k = R::Read(scalars.typed_data());
  const auto fn = ActiveFns<R>().update;
  ParallelFor(pool, MakeChunks(sizes), Total(sizes), [k, in, out, fn](const Chunk& c) {
    float* s[4] = {nullptr, nullptr, nullptr, nullptr};
    for (int j = 0; j < kS; ++j) s[j] = InPlace(in[1 + j][c.leaf], out[j][c.leaf], c);
    fn(k, F32(in[0][c.leaf]) + c.begin, s[0], s[1], s[2], s[3], c.end - c.begin);
  });
  return ffi::Error::Success();
}

template <class R>
ffi::Error Step(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> step,
                ffi::RemainingArgs args, ffi::RemainingRets rets,
                ffi::Span<const int64_t> decay) {
  constexpr int kS = R::kStates;
  if (scalars.element_count() != R::kScalars || step.element_count() != 2) {
    return ffi::Error::InvalidArgument("bayesopt_jax native kernel: bad scalars operand");
  }
  std::vector<std::vector<ffi::AnyBuffer>> in, out;
  std::vector<int64_t> sizes;
  if (auto e = Gather(args, rets, 2 + kS, 1 + kS, in, out, sizes); e.failure()) return e;
  if (decay.size() != sizes.size()) {
    return ffi::Error::InvalidArgument("bayesopt_jax native kernel: `decay` needs one flag per leaf");
  }
  std::vector<char> decays(decay.begin(), decay.end());
  const typename R::K k = R::Read(scalars.typed_data());
  const float factor = step.typed_data()[0], wd = step.typed_data()[1];
  const Fns<R> fns = ActiveFns<R>();
  ParallelFor(pool, MakeChunks(sizes), Total(sizes),
              [k, factor, wd, in, out, decays, fns](const Chunk& c) {
                float* p = InPlace(in[0][c.leaf], out[0][c.leaf], c);
                float* s[4] = {nullptr, nullptr, nullptr, nullptr};
                for (int j = 0; j < kS; ++j) {
                  s[j] = InPlace(in[2 + j][c.leaf], out[1 + j][c.leaf], c);
                }
                (decays[c.leaf] ? fns.step_decay : fns.step)(
                    k, factor, wd, p, F32(in[1][c.leaf]) + c.begin, s[0], s[1], s[2], s[3],
                    c.end - c.begin);
              });
  return ffi::Error::Success();
}

// The update over 8-bit state: args scalars, values, mids, below, then the
// groups g, codes0, scale0, codes1, scale1 [, codes2, scale2 ...] of k leaves
// each; rets u and the codes and scales (aliased to their inputs).
template <class R>
ffi::Error UpdateQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars,
                    ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::F32> mids,
                    ffi::Buffer<ffi::S32> below, ffi::RemainingArgs args, ffi::RemainingRets rets,
                    ffi::Span<const int64_t> last, int64_t top_min) {
  constexpr int kS = R::kStates;
  const auto bad = [](const char* why) {
    return ffi::Error::InvalidArgument(std::string("bayesopt_jax 8-bit kernel: ") + why);
  };
  if (scalars.element_count() != R::kScalars) return bad("bad scalars operand");
  if (values.element_count() != 2 * 256 || mids.element_count() != 2 * 256 ||
      below.element_count() % 4 != 0 || below.element_count() == 0) {
    return bad("bad code tables");
  }
  std::vector<std::vector<ffi::AnyBuffer>> in, out;
  if (auto e = Unpack(args, rets, 1 + 2 * kS, 1 + 2 * kS, in, out); e.failure()) return e;
  const size_t k = in[0].size();
  if (last.size() != k) return bad("`last` needs one length per leaf");
  struct Leaf {
    const float* g;
    float* u;
    Slot slots[4];
    Geometry geo;
    int64_t blocks;  // in all rows
  };
  std::vector<Leaf> leaves(k);
  std::vector<Chunk> chunks;  // here: leaf, first block, end block
  int64_t total = 0, widest = 1;
  for (size_t i = 0; i < k; ++i) {
    const int64_t n = static_cast<int64_t>(in[0][i].element_count());
    const int64_t len = last[i];
    if (in[0][i].element_type() != ffi::DataType::F32 ||
        out[0][i].element_type() != ffi::DataType::F32 ||
        static_cast<int64_t>(out[0][i].element_count()) != n) {
      return bad("float32 gradients and updates only");
    }
    if (len <= 0 || n % len != 0) return bad("`last` does not divide a leaf's size");
    const int64_t rows = n / len;
    Leaf& leaf = leaves[i];
    leaf.g = F32(in[0][i]);
    leaf.u = F32(out[0][i]);
    int64_t nb = -1;
    for (int s = 0; s < kS; ++s) {
      const ffi::AnyBuffer &ci = in[1 + 2 * s][i], &si = in[2 + 2 * s][i];
      const ffi::AnyBuffer &co = out[1 + 2 * s][i], &so = out[2 + 2 * s][i];
      const bool sign = ci.element_type() == ffi::DataType::S8;
      if ((!sign && ci.element_type() != ffi::DataType::U8) ||
          co.element_type() != ci.element_type() || si.element_type() != ffi::DataType::F32 ||
          so.element_type() != ffi::DataType::F32) {
        return bad("codes must be int8 or uint8 and scales float32");
      }
      const int64_t ns = static_cast<int64_t>(si.element_count());
      if (static_cast<int64_t>(ci.element_count()) != n ||
          static_cast<int64_t>(co.element_count()) != n ||
          static_cast<int64_t>(so.element_count()) != ns || ns % rows != 0 ||
          (nb >= 0 && ns / rows != nb)) {
        return bad("codes and scales do not match the leaf");
      }
      nb = ns / rows;
      if (co.untyped_data() != ci.untyped_data()) {
        std::memcpy(co.untyped_data(), ci.untyped_data(), n);
      }
      if (so.untyped_data() != si.untyped_data()) {
        std::memcpy(so.untyped_data(), si.untyped_data(), ns * sizeof(float));
      }
      leaf.slots[s] = Slot{co.untyped_data(), F32(so), sign ? 1 : 0};
    }
    if (nb <= 0) return bad("no blocks");
    leaf.geo = Geometry{len, nb, (len + nb - 1) / nb};
    leaf.blocks = rows * nb;
    widest = std::max(widest, leaf.geo.run);
    const int64_t per = std::max<int64_t>(1, kChunk / leaf.geo.run);
    for (int64_t b = 0; b < leaf.blocks; b += per) {
      chunks.push_back({static_cast<int>(i), b, std::min(leaf.blocks, b + per)});
    }
    total += n;
  }
  const CodeTables t{values.typed_data(), mids.typed_data(), below.typed_data(),
                     static_cast<int64_t>(below.element_count() / 4), top_min};
  const typename R::K kk = R::Read(scalars.typed_data());
  const auto fn = ActiveFns<R>().q8;
  ParallelFor(pool, std::move(chunks), total, [kk, t, leaves, fn, widest](const Chunk& c) {
    thread_local std::vector<float> tmp;
    if (tmp.size() < static_cast<size_t>(4 * widest)) tmp.resize(4 * widest);
    const Leaf& leaf = leaves[c.leaf];
    fn(kk, t, leaf.g, leaf.u, leaf.slots, leaf.geo, c.begin, c.end, tmp.data());
  });
  return ffi::Error::Success();
}

// The draw over k leaves: args [N, scale], delta[k], words[k·3], p[0..k),
// r[0..k); rets p̃[0..k).
ffi::Error Sample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scalars, ffi::Buffer<ffi::F32> delta,
                  ffi::Buffer<ffi::U32> words, ffi::RemainingArgs args, ffi::RemainingRets rets) {
  std::vector<std::vector<ffi::AnyBuffer>> in, out;
  std::vector<int64_t> sizes;
  // p and r per leaf, and σ per leaf for the proximal draw
  const size_t groups = rets.size() > 0 && args.size() == 3 * rets.size() ? 3 : 2;
  if (auto e = Gather(args, rets, groups, 1, in, out, sizes); e.failure()) return e;
  const size_t k = sizes.size();
  if (scalars.element_count() != 2 || delta.element_count() != k ||
      words.element_count() != 3 * k) {
    return ffi::Error::InvalidArgument("bayesopt_jax sample kernel: bad scalars operands");
  }
  for (int64_t n : sizes) {
    if (n >= (int64_t{1} << 32)) {
      return ffi::Error::InvalidArgument("bayesopt_jax sample kernel: leaves below 2^32 entries");
    }
  }
  std::vector<SampleArgs> leaf_args(k);
  const float* sc = scalars.typed_data();
  const uint32_t* w = words.typed_data();
  for (size_t i = 0; i < k; ++i) {
    leaf_args[i] = SampleArgs{sc[0], sc[1], delta.typed_data()[i], w[3 * i], w[3 * i + 1],
                              w[3 * i + 2]};
  }
  const SampleFn fn = Active().sample;
  ParallelFor(pool, MakeChunks(sizes), Total(sizes),
              [leaf_args, in, out, fn, groups](const Chunk& c) {
                const float* sig = groups == 3 ? F32(in[2][c.leaf]) + c.begin : nullptr;
                fn(leaf_args[c.leaf], F32(in[0][c.leaf]) + c.begin,
                   F32(in[1][c.leaf]) + c.begin, sig, F32(out[0][c.leaf]) + c.begin, c.begin,
                   c.end - c.begin);
              });
  return ffi::Error::Success();
}

#ifdef BJ_BENCHMARK_KERNELS
// A streaming kernel for measuring memory bandwidth, compiled only into the
// benchmark's own copy of this file (benchmarks/bench.py builds it with
// -DBJ_BENCHMARK_KERNELS; the installed library does not carry it): every
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
#endif  // BJ_BENCHMARK_KERNELS

}  // namespace

#ifdef BJ_BENCHMARK_KERNELS
XLA_FFI_DEFINE_HANDLER_SYMBOL(BjStreamF32, Stream,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("a"));
#endif  // BJ_BENCHMARK_KERNELS

XLA_FFI_DEFINE_HANDLER_SYMBOL(BjVariationalSampleF32, Sample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .RemainingArgs()
                                  .RemainingRets());

// Each rule's handlers: Bj<Name>UpdateF32, Bj<Name>StepF32 and Bj<Name>UpdateQ8.
#define BJ_REGISTER_RULE(NAME, RULE)                                          \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Bj##NAME##UpdateF32, Update<RULE>,            \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .RemainingArgs()                          \
                                    .RemainingRets());                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Bj##NAME##StepF32, Step<RULE>,                \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .RemainingArgs()                          \
                                    .RemainingRets()                          \
                                    .Attr<ffi::Span<const int64_t>>("decay"));   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(Bj##NAME##UpdateQ8, UpdateQ8<RULE>,            \
                                ffi::Ffi::Bind()                              \
                                    .Ctx<ffi::ThreadPool>()                   \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::F32>>()             \
                                    .Arg<ffi::Buffer<ffi::S32>>()             \
                                    .RemainingArgs()                          \
                                    .RemainingRets()                          \
                                    .Attr<ffi::Span<const int64_t>>("last")   \
                                    .Attr<int64_t>("top_min"));

#define BJ_REGISTER_ONE(PY, NAME, RULE, ...) BJ_REGISTER_RULE(NAME, RULE)
BJ_RULES(BJ_REGISTER_ONE, )

// Lets the loader check that the library matches the Python side: the
// version of the calling convention, and the rule table
// ("name:states:scalars:handlers" joined by ";", the handlers being the
// update, step and 8-bit handler symbols joined by ","), whose names, state
// and scalar counts rules.py must equal; the loader registers the handlers
// named here.
#define BJ_ABI_VERSION 8
extern "C" int bj_native_abi_version() { return BJ_ABI_VERSION; }

extern "C" const char* bj_native_rules() {
  static const std::string table = [] {
    std::string out;
#define BJ_TABLE_TEXT(PY, NAME, RULE, ...)                                                  \
  out += std::string(out.empty() ? "" : ";") + #PY + ":" + std::to_string(RULE::kStates) +  \
         ":" + std::to_string(RULE::kScalars) +                                              \
         ":Bj" #NAME "UpdateF32,Bj" #NAME "StepF32,Bj" #NAME "UpdateQ8";
    BJ_RULES(BJ_TABLE_TEXT, )
#undef BJ_TABLE_TEXT
    return out;
  }();
  return table.c_str();
}

// The draw's handler symbol (not a rule: no state).
extern "C" const char* bj_native_sample_handler() { return "BjVariationalSampleF32"; }

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
