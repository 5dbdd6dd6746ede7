// The per-instruction-set half of the fused CPU kernel: everything that runs per coordinate.
//
// simple_cpu.cpp includes this file once per instruction set, each time inside its own
// namespace and under a target pragma (AVX-512, AVX2 + FMA, the architecture's baseline), and
// picks one copy at run time. So there is no include guard, nothing here may depend on the
// compiler's ISA macros (a target pragma does not change them in C++), and the shared types
// (Weights, Job, Item, the dtype codes, the block constants) come from simple_cpu.cpp.
//
// L2L_SIMD_BACKEND (0: none) names the vector interface of simple_cpu_simd.h whose loop replaces
// the copy's fp32-compute loop for the default hidden size (see there).
//
// L2L_FAST_ROUND is 1 where std::nearbyint compiles to one vector instruction (SSE4.1 and up,
// AArch64); the x86-64 baseline (SSE2) rounds by adding and subtracting 1.5 * 2^23 instead,
// which is the same round-to-nearest-even for the magnitudes the tanh sees and, unlike a
// library call, vectorises.

// ---------------------------------------------------------------------------------------------
// scalar conversions (written so that the compiler vectorises them)

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline double u2d(uint64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}

// bfloat16 <-> float. Round to nearest even, NaN -> 0x7FC0: the same as torch's c10::BFloat16.
inline float bf2f(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
inline uint16_t f2bf(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

// float16 <-> float, exact IEEE conversions (round to nearest even, NaN -> sign | 0x7E00), the
// values torch's c10::Half gives.
inline float h2f(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu;
  const uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return u2f(sign | 0x7F800000u | (m << 13));
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return u2f(sign | ((e + 112u) << 23) | (m << 13));
}
inline uint16_t f2h(float f) {
  uint32_t x = f2u(f);
  const uint32_t sign = x & 0x80000000u;
  x ^= sign;
  uint32_t o;
  if (x >= 0x47800000u) {  // >= 2^16 (rounds to inf), inf or NaN
    o = (x > 0x7F800000u) ? 0x7E00u : 0x7C00u;
  } else if (x < 0x38800000u) {  // below 2^-14: subnormal or zero; adding 0.5 rounds at 2^-24
    o = f2u(u2f(x) + 0.5f) - 0x3F000000u;
  } else {  // normal: rebias, round the 13 dropped bits to nearest even
    const uint32_t odd = (x >> 13) & 1u;
    x += 0xC8000FFFu;  // ((15 - 127) << 23) + 0xFFF, modulo 2^32
    x += odd;
    o = x >> 13;
  }
  return static_cast<uint16_t>(o | (sign >> 16));
}

// Stochastic rounding to bf16 (rounding.py, the definition): the float's bit pattern plus the
// high half of x * kGolden, truncated; x = key + i * H + j for hidden unit j of coordinate i,
// modulo 2^32. NaN -> 0x7FC0, as f2bf.
constexpr uint32_t kGolden = 0x9E3779B1u;
inline uint16_t f2bf_stochastic(float f, uint32_t x) {
  const uint32_t r = (x * kGolden) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>((f2u(f) + r) >> 16);
}

// How a bf16 hidden state is rounded: to nearest even, or stochastically with the tensor's key
// of this step.
struct Rounding {
  uint32_t key;
  bool stochastic;
};

template <typename S, typename C>
struct Cvt;  // load S as C, store C as S

template <typename C>
struct Cvt<float, C> {
  static inline C load(float v) { return static_cast<C>(v); }
  static inline float store(C v) { return static_cast<float>(v); }
};
template <typename C>
struct Cvt<double, C> {
  static inline C load(double v) { return static_cast<C>(v); }
  static inline double store(C v) { return static_cast<double>(v); }
};
// bf16 hidden state: computed in fp32 (C = float) or fp64 (C = double); stored rounded to bf16
template <>
struct Cvt<uint16_t, float> {
  static inline float load(uint16_t v) { return bf2f(v); }
  static inline uint16_t store(float v) { return f2bf(v); }
};
template <>
struct Cvt<uint16_t, double> {
  static inline double load(uint16_t v) { return static_cast<double>(bf2f(v)); }
  // double -> float -> bf16, the same two roundings as torch's tensor.to(torch.bfloat16)
  static inline uint16_t store(double v) { return f2bf(static_cast<float>(v)); }
};

// Store a new hidden value; x: its stochastic rounding sequence (read for bf16 state only).
template <typename S, typename C>
inline S store_h(C v, uint32_t, bool) {
  return Cvt<S, C>::store(v);
}
template <>
inline uint16_t store_h<uint16_t, float>(float v, uint32_t x, bool stochastic) {
  return stochastic ? f2bf_stochastic(v, x) : f2bf(v);
}
template <>
inline uint16_t store_h<uint16_t, double>(double v, uint32_t x, bool stochastic) {
  // double -> float rounds to nearest first, as Cvt's store
  return stochastic ? f2bf_stochastic(static_cast<float>(v), x) : Cvt<uint16_t, double>::store(v);
}

// ---------------------------------------------------------------------------------------------
// tanh

// Round to the nearest integer, ties to even (|x| <= 40 here, or NaN).
template <typename T>
inline T round_even(T x) {
#if L2L_FAST_ROUND
  return std::nearbyint(x);
#else
  constexpr T big = T(1.5) / std::numeric_limits<T>::epsilon();  // 1.5 * 2^23 or 1.5 * 2^52
  return (x + big) - big;
#endif
}

// 1 / d for the fp32 tanh's d in [2, 5e8] (or NaN), without a division: a first estimate from
// the bits (the exponent negated, the mantissa roughly reciprocated: within 12%), then three
// Newton steps r + r (1 - d r), each squaring the relative error (to about 1e-7).
inline float tanh_recip(float d) {
  float r = u2f(0x7EF311C3u - f2u(d));
  r = r + r * (1.0f - d * r);
  r = r + r * (1.0f - d * r);
  r = r + r * (1.0f - d * r);
  return r;
}

// fp32 tanh, vectorisable (no calls, no tables, no branches, no division, one formula for
// every input):
//   tanh|x| = E / (E + 2) with E = expm1(2|x|), so small inputs lose nothing to cancellation.
//   expm1 by Cody-Waite reduction 2|x| = n ln2 + r (|r| <= ln2 / 2) and the Cephes expf
//   polynomial: expm1(r) = r + r^2 P(r), E = 2^n expm1(r) + (2^n - 1), 2^n built in the exponent
//   bits. |x| is clamped to 10, where the result is 1.0f.
//   The quotient E / d (d = E + 2) without a division (on many CPUs a narrow unit whose
//   latency sits on every hidden unit's path):
//   q0 = E r with r an estimate of 1 / d, then one correction by the residual, q0 + r (E - q0 d)
//   (with a fused multiply-add the residual is exact, and the quotient's relative error is
//   about the square of r's: from r within 1e-7 here, or the AVX-512 copy's 2^-14 hardware
//   estimate, well under an ulp).
// Written for few vector operations (the tanh is about half of the kernel's arithmetic):
//   - it works on y = |x| (not 2|x|) with r/2, and P's coefficients scaled by powers of two
//     instead: every intermediate is the textbook one times a power of two;
//   - n is rounded by adding 1.5 * 2^23 (one fused multiply-add where the ISA has it, the same
//     round-to-nearest-even), and 2^(n+1) is built from that sum's low bits;
//   - the sign goes back on with one OR, the result being >= 0.
// Max error 2.33 ulp with fused multiply-adds (the AVX-512 and AVX2 copies, either estimate of
// 1 / d), 2.88 ulp without (the baseline, whose residual rounds), over every 97th fp32 input
// against torch's fp64 tanh (tests/test_kernels.py, in every instruction set's copy). A
// separate polynomial for small |x| would bring it to ~1.5 ulp, but every lane of a vector
// would compute both formulas (the hidden units' inputs mix both ranges): ~25% more vector
// operations in the kernel's costliest sweep.
// tanh(+-0) = +-0, tanh(+-inf) = +-1; NaN propagates (its payload is not kept).
inline float tanh_f32(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds [0, 2^22) to integers
  const uint32_t sign = f2u(x) & 0x80000000u;
  const float a = u2f(f2u(x) ^ sign);
  const float y = (10.0f < a) ? 10.0f : a;  // min that keeps NaN
  const float biased = y * 2.88539008177792682f + kRound;  // kRound + n, n = round(2|x| log2 e)
  const float n = biased - kRound;
#if L2L_FMA
  // r / 2 = y - n ln2/2 in one fused multiply-add (n C is exact inside it): C's own error,
  // 9.5e-10, times n <= 29, moves E by under 6e-8 relative where E is large enough for
  // E / (E + 2) to shrink it to nothing
  const float r = y - n * 0.346573591f;
#else
  float r = y - n * 0.3466796875f;  // r / 2, with ln2 / 2 in two parts (n times the first exact)
  r = r - n * -1.06097220e-4f;
#endif
  float q = 1.9875691500E-4f * 64.0f;  // 2 P(2r), Horner
  q = q * r + 1.3981999507E-3f * 32.0f;
  q = q * r + 8.3334519073E-3f * 16.0f;
  q = q * r + 4.1665795894E-2f * 8.0f;
  q = q * r + 1.6666665459E-1f * 4.0f;
  q = q * r + 5.0000001201E-1f * 2.0f;
  const float em = q * (r * r) + r;  // expm1(2r) / 2
  // 2^(n+1) in the exponent bits: biased's low mantissa bits hold n, its higher bits shift out
  const float scale = u2f((f2u(biased) + 128u) << 23);
  const float e = scale * em + (scale * 0.5f - 1.0f);  // expm1(2|x|)
  const float d = e + 2.0f;
  const float rd = tanh_recip(d);
  const float q0 = e * rd;
  return u2f(f2u(rd * (e - q0 * d) + q0) | sign);
}

// fp64 tanh, vectorisable, two formulas (fp64 parameters are rare, so accuracy comes before
// the cost of computing both in every lane): |x| < 0.55: x + x^3 P(x^2) with a degree-10 fit
// (also in triton.py); otherwise 1 - 2 / (1 + exp(2|x|)) with exp by Cody-Waite reduction
// (fdlibm's ln2 split) and its Taylor polynomial to r^13. Max error 1.5 ulp (checked against
// long double tanhl on 2e7 random inputs); unlike std::tanh it vectorises.
inline double tanh_f64(double x) {
  const double a = std::fabs(x);
  const double t = x * x;
  double p = t * -2.060276537636634e-05 + 8.511313685577672e-05;
  p = p * t + -0.0002346347410887237;
  p = p * t + 0.0005889360520074057;
  p = p * t + -0.001455661830100716;
  p = p * t + 0.003592110378689024;
  p = p * t + -0.008863234397814355;
  p = p * t + 0.021869488493666944;
  p = p * t + -0.053968253967434016;
  p = p * t + 0.13333333333332714;
  p = p * t + -0.3333333333333333;
  const double small = x + (x * t) * p;
  double y = 2.0 * a;
  y = (40.0 < y) ? 40.0 : y;
  const double n = round_even(y * 1.4426950408889634);
  double r = y - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  // e^r = 1 + r + r^2 q(r), q = sum_{k>=2} r^(k-2)/k!, Taylor to r^13
  double q = r * (1.0 / 6227020800.0) + (1.0 / 479001600.0);
  q = q * r + (1.0 / 39916800.0);
  q = q * r + (1.0 / 3628800.0);
  q = q * r + (1.0 / 362880.0);
  q = q * r + (1.0 / 40320.0);
  q = q * r + (1.0 / 5040.0);
  q = q * r + (1.0 / 720.0);
  q = q * r + (1.0 / 120.0);
  q = q * r + (1.0 / 24.0);
  q = q * r + (1.0 / 6.0);
  q = q * r + 0.5;
  const double er = (q * (r * r) + r) + 1.0;
  const int64_t ni = static_cast<int64_t>(n);
  const double scale = u2d(static_cast<uint64_t>(ni + 1023) << 52);
  const double e = er * scale;
  const double big = std::copysign(1.0 - 2.0 / (1.0 + e), x);
  return (a < 0.55) ? small : big;
}

inline double tanh_c(double x) { return tanh_f64(x); }
inline float tanh_c(float x) { return tanh_f32(x); }

// ---------------------------------------------------------------------------------------------
// pass 1 on one block

// Partial sum of sbuf[0..len) in a fixed order: kLanes interleaved accumulators (a vector add),
// then a sequential fold in double.
template <typename C>
inline double block_sum(const C* __restrict sbuf, int64_t len) {
  C acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = C(0);
  int64_t ii = 0;
  for (; ii + kLanes <= len; ii += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += sbuf[ii + l];
  }
  for (int l = 0; ii < len; ++ii, ++l) acc[l] += sbuf[ii];
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(acc[l]);
  return total;
}

#if L2L_SIMD_BACKEND
#include "simple_cpu_simd.h"
#endif

// Pass 1 on one block, hidden size H known at compile time (the default 10).
// theta (type C) is updated in place: out[i] += lr * (w_a . h' + b_out). For bf16 / fp16
// parameters `out` is a zeroed fp32 scratch buffer and lr = 1, so it receives u exactly.
// Returns the block's sum of w_b . h'.
//
// The block is processed in sub-blocks of kSub coordinates, in three vectorised sweeps over an
// L1-resident buffer: (a) the pre-activations w_ih g + b_h + w_hh h for all H units, (b) tanh in
// place, (c) store h', accumulate u and s; fused into one sweep, GCC's code spills. Copies with
// an intrinsics loop (AVX-512, AVX2) hand fp32 compute with fp32 or bf16 state to pass1_simd
// (simple_cpu_simd.h) instead; this loop serves the rest (fp64 compute or state, the baseline).
//
// noinline: GCC vectorises these loops reliably only when the function is compiled on its own
// (inlined into a caller it can fall back to scalar code).
template <int H, typename C, typename S>
__attribute__((noinline)) double pass1_fixed(
    const C* __restrict g,  // block's gradients (already offset)
    S* __restrict h,        // hidden state base of the tensor, (H, n)
    int64_t n, int64_t i0, int64_t len,
    C* __restrict out,  // theta or scratch, offset to the block
    C lr, const Weights<C>& w, C* __restrict sbuf, const Rounding& rnd) {
#if L2L_SIMD_BACKEND
  if constexpr (H == 10 && sizeof(C) == 4 && sizeof(S) != 8) {
    return pass1_simd<S>(g, h, n, i0, len, out, lr, w, sbuf, rnd);
  }
#endif
  const bool stochastic = rnd.stochastic;
  // local copies of the weights so that the compiler sees loop-invariant broadcast operands
  C ih[H], bh[H], wa[H], wb[H], hh[H * H];
  for (int j = 0; j < H; ++j) {
    ih[j] = w.ih[j];
    bh[j] = w.bh[j];
    wa[j] = w.a[j];
    wb[j] = w.b[j];
    for (int k = 0; k < H; ++k) hh[j * H + k] = w.hh[j * H + k];
  }
  const C b_out = w.b_out;
  alignas(64) C pre[H][kSub];

  for (int64_t c0 = 0; c0 < len; c0 += kSub) {
    const int cl = static_cast<int>(std::min<int64_t>(kSub, len - c0));
    S* __restrict hc = h + i0 + c0;
    const C* __restrict gc = g + c0;
#pragma omp simd
    for (int ii = 0; ii < cl; ++ii) {
      C hk[H];
#pragma GCC unroll 16
      for (int k = 0; k < H; ++k) hk[k] = Cvt<S, C>::load(hc[k * n + ii]);
      const C gi = gc[ii];
#pragma GCC unroll 16
      for (int j = 0; j < H; ++j) {
        C p = ih[j] * gi + bh[j];
#pragma GCC unroll 16
        for (int k = 0; k < H; ++k) p += hh[j * H + k] * hk[k];
        pre[j][ii] = p;
      }
    }
    for (int j = 0; j < H; ++j) {
      C* __restrict pj = pre[j];
#pragma omp simd
      for (int ii = 0; ii < cl; ++ii) pj[ii] = tanh_c(pj[ii]);
    }
    C* __restrict oc = out + c0;
    C* __restrict sc = sbuf + c0;
    const uint32_t rb = rnd.key + static_cast<uint32_t>(i0 + c0) * static_cast<uint32_t>(H);
#pragma omp simd
    for (int ii = 0; ii < cl; ++ii) {
      C u = b_out;
      C s = C(0);
#pragma GCC unroll 16
      for (int j = 0; j < H; ++j) {
        const C t = pre[j][ii];
        hc[j * n + ii] = store_h<S, C>(t, rb + static_cast<uint32_t>(ii * H + j), stochastic);
        u += wa[j] * t;
        s += wb[j] * t;
      }
      oc[ii] = oc[ii] + lr * u;
      sc[ii] = s;
    }
  }
  return block_sum(sbuf, len);
}

// The same for any hidden size <= kMaxH (runtime loops; slower, used for H != 10).
template <typename C, typename S>
double pass1_generic(const C* __restrict g, S* __restrict h, int64_t n, int64_t i0, int64_t len,
                     C* __restrict out, C lr, const Weights<C>& w, C* __restrict sbuf,
                     const Rounding& rnd) {
  const int H = w.H;
  S* __restrict hb = h + i0;
  const uint32_t rb = rnd.key + static_cast<uint32_t>(i0) * static_cast<uint32_t>(H);
  for (int64_t ii = 0; ii < len; ++ii) {
    C hk[kMaxH];
    for (int k = 0; k < H; ++k) hk[k] = Cvt<S, C>::load(hb[k * n + ii]);
    const C gi = g[ii];
    C u = w.b_out;
    C s = C(0);
    for (int j = 0; j < H; ++j) {
      C pre = w.ih[j] * gi + w.bh[j];
      for (int k = 0; k < H; ++k) pre += w.hh[j * H + k] * hk[k];
      const C hn = tanh_c(pre);
      hb[j * n + ii] = store_h<S, C>(hn, rb + static_cast<uint32_t>(ii * H + j), rnd.stochastic);
      u += w.a[j] * hn;
      s += w.b[j] * hn;
    }
    out[ii] = out[ii] + lr * u;
    sbuf[ii] = s;
  }
  return block_sum(sbuf, len);
}

// The block's gradients in compute precision: a pointer into the tensor when it already is,
// else a converted copy in buf (the same values as grad.to(C)).
template <typename C>
inline const C* load_grad_block(const Job& job, int64_t i0, int64_t len, C* __restrict buf) {
  if ((sizeof(C) == 4 && job.gk == kF32) || (sizeof(C) == 8 && job.gk == kF64))
    return static_cast<const C*>(job.grad) + i0;
  switch (job.gk) {
    case kF32: {
      const float* src = static_cast<const float*>(job.grad) + i0;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(src[i]);
      break;
    }
    case kF64: {
      const double* src = static_cast<const double*>(job.grad) + i0;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(src[i]);
      break;
    }
    case kBF16: {
      const uint16_t* src = static_cast<const uint16_t*>(job.grad) + i0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(bf2f(src[i]));
      break;
    }
    default: {  // kF16 (the dtype codes are checked before any block runs)
      const uint16_t* src = static_cast<const uint16_t*>(job.grad) + i0;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(h2f(src[i]));
      break;
    }
  }
  return buf;
}

// A tensor's one bias correction c (the rms input norm's per-tensor layout): c = beta c +
// (1 - beta) in place, once per step, and 1 / sqrt(c) for its blocks. The same operations as
// the per-coordinate layout's in normalise_block, so both layouts give the same bits.
template <typename C>
void rms_prepare_typed(Job& job) {
  C* c = static_cast<C*>(job.ones);
  const C cn = *c * static_cast<C>(job.norm->beta) + static_cast<C>(job.norm->one_minus_beta);
  *c = cn;
  job.rms_scale = static_cast<double>(C(1) / std::sqrt(cn));
}

void rms_prepare(Job& job) {
  if (job.pk == kF64) {
    rms_prepare_typed<double>(job);
  } else {
    rms_prepare_typed<float>(job);
  }
}

// v' = beta v + ((1 - beta) g) g from bf16 v, saturated at the largest finite float unless g is
// infinite, into vn; v rounded stochastically in place (the high half of (key + i) kGolden
// added below the bf16 mantissa; NaN -> 0x7FC0; a finite value that would round up to
// infinity stays at the largest finite bf16).
inline void update_squares_bf16(const float* __restrict g, uint16_t* __restrict v, int64_t len,
                                float beta, float omb, uint32_t x0g, float* __restrict vn) {
  constexpr float kMax = std::numeric_limits<float>::max();
  constexpr float kInf = std::numeric_limits<float>::infinity();
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float gi = g[i];
    float x = u2f(static_cast<uint32_t>(v[i]) << 16) * beta + (omb * gi) * gi;
    const bool inf_g = std::fabs(gi) == kInf;
    x = (inf_g || !(x > kMax)) ? x : kMax;  // NaN stays NaN
    const uint32_t r = (x0g + static_cast<uint32_t>(i) * kGolden) >> 16;
    const uint32_t b = (x != x) ? 0x7FC0u : (f2u(x) + r) >> 16;
    v[i] = static_cast<uint16_t>((b == 0x7F80u && !inf_g) ? 0x7F7Fu : b);
    vn[i] = x;
  }
}

// normalise_block (below) with v in bf16 (fp32 compute): v updated in fp32, x from the
// unrounded value, v written back by update_squares_bf16's stochastic rounding
// (rounding.round_squares_bf16).
inline const float* normalise_block_bf16(const Job& job, const float* __restrict g, int64_t i0,
                                         int64_t len, float* __restrict buf) {
  uint16_t* __restrict v = static_cast<uint16_t*>(job.squares) + i0;
  const float beta = static_cast<float>(job.norm->beta);
  const float omb = static_cast<float>(job.norm->one_minus_beta);
  const float eps = static_cast<float>(job.norm->eps);
  const uint32_t x0g = (job.squares_key + static_cast<uint32_t>(i0)) * kGolden;
  // the new v, saturated, into buf; then rounded into v (in place) and x into buf
  update_squares_bf16(g, v, len, beta, omb, x0g, buf);
  if (job.ones_per_tensor) {
    const float k = static_cast<float>(job.rms_scale);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) buf[i] = g[i] / (std::sqrt(buf[i]) * k + eps);
    return buf;
  }
  float* __restrict c = static_cast<float*>(job.ones) + i0;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float cn = c[i] * beta + omb;
    c[i] = cn;
    buf[i] = g[i] / (std::sqrt(buf[i]) * (1.0f / std::sqrt(cn)) + eps);
  }
  return buf;
}

// The rms input norm on one block: v = beta v + ((1 - beta) g) g, saturated at the largest
// finite value unless g is infinite, in place, and x = g / (sqrt(v) (1 / sqrt(c)) + eps) into
// buf, in the order of rule.rms_normalise (the compiler may fuse a multiply and an add: the
// last bit may differ from torch's); c = beta c + (1 - beta) in place too where it is one per
// coordinate (else rms_prepare has advanced it). No finite g makes v infinite, which would
// freeze the coordinate (every later x would be 0).
template <typename C>
inline const C* normalise_block(const Job& job, const C* __restrict g, int64_t i0, int64_t len,
                                C* __restrict buf) {
  if constexpr (std::is_same_v<C, float>) {
    if (job.squares_bf16) return normalise_block_bf16(job, g, i0, len, buf);
  }
  C* __restrict v = static_cast<C*>(job.squares) + i0;
  const C beta = static_cast<C>(job.norm->beta);
  const C omb = static_cast<C>(job.norm->one_minus_beta);
  const C eps = static_cast<C>(job.norm->eps);
  constexpr C kMax = std::numeric_limits<C>::max();
  constexpr C kInf = std::numeric_limits<C>::infinity();
  if (job.ones_per_tensor) {
    const C k = static_cast<C>(job.rms_scale);
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const C gi = g[i];
      C vn = v[i] * beta + (omb * gi) * gi;
      vn = (std::fabs(gi) == kInf || !(vn > kMax)) ? vn : kMax;  // NaN stays NaN
      v[i] = vn;
      buf[i] = gi / (std::sqrt(vn) * k + eps);
    }
    return buf;
  }
  C* __restrict c = static_cast<C*>(job.ones) + i0;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const C gi = g[i];
    C vn = v[i] * beta + (omb * gi) * gi;
    vn = (std::fabs(gi) == kInf || !(vn > kMax)) ? vn : kMax;  // NaN stays NaN
    const C cn = c[i] * beta + omb;
    v[i] = vn;
    c[i] = cn;
    buf[i] = gi / (std::sqrt(vn) * (C(1) / std::sqrt(cn)) + eps);
  }
  return buf;
}

// Pass 1 on one block whose hidden state h has row stride `stride` and starts at column h_i0
// (the tensor's own state: stride n, h_i0 = the block's start; an 8-bit state's float32 work
// buffer: its own stride and offset).
template <typename C, typename S>
double run_block_typed(const Job& job, const Item& it, const Weights<C>& w, S* h, int64_t stride,
                       int64_t h_i0) {
  alignas(64) C gbuf[kBlock];
  alignas(64) C xbuf[kBlock];
  alignas(64) C sbuf[kBlock];
  const C* g = load_grad_block<C>(job, it.start, it.len, gbuf);
  if (job.squares != nullptr) g = normalise_block<C>(job, g, it.start, it.len, xbuf);
  C* out;
  C lr;
  if (job.scratch != nullptr) {  // bf16 / fp16 params (computed in fp32): u into zeroed scratch
    out = reinterpret_cast<C*>(job.scratch) + it.start;
    lr = C(1);
  } else {  // fp32 / fp64 params: theta in place
    out = static_cast<C*>(job.param) + it.start;
    lr = static_cast<C>(job.lr);
  }
  const Rounding rnd{job.rounding_key, job.stochastic};
  // Schedule-Free averaging: out is z, whose values before the step y' needs
  alignas(64) C zbuf[kBlock];
  if (job.avg_y != nullptr) std::memcpy(zbuf, out, static_cast<size_t>(it.len) * sizeof(C));
  const double sum =
      w.H == 10 ? pass1_fixed<10, C, S>(g, h, stride, h_i0, it.len, out, lr, w, sbuf, rnd)
                : pass1_generic<C, S>(g, h, stride, h_i0, it.len, out, lr, w, sbuf, rnd);
  if (job.avg_y == nullptr) return sum;
  // y' = y + c (z - y) + k (z' - z) (pass 2 adds k lr shared): a z that does not move leaves
  // y = z exactly where it is
  C* __restrict y = static_cast<C*>(job.avg_y) + it.start;
  const C c = static_cast<C>(job.avg[0]), k = static_cast<C>(job.avg[1]);
  const C* __restrict zn = out;
#pragma omp simd
  for (int64_t i = 0; i < it.len; ++i) y[i] = (y[i] + c * (zbuf[i] - y[i])) + k * (zn[i] - zbuf[i]);
  return sum;
}

template <typename C, typename S>
double run_block_own(const Job& job, const Item& it, const Weights<C>& w) {
  return run_block_typed<C, S>(job, it, w, static_cast<S*>(job.hidden), job.n, it.start);
}

// ---------------------------------------------------------------------------------------------
// the 8-bit hidden state (state.py's codec, the definition)
//
// Codes c (int8, (H, n)) and per hidden unit and block of kI8Block coordinates a float32 scale s
// (the block's max |h|): h = c * (s / 127). A block (one work item) is decoded into a float32
// work buffer, stepped there by the float32-state loop, and encoded back: s' = max |h'| over the
// block, c' = clamp(floor(h' * (127 / s') + u), -127, 127), u = the 16 random bits of
// rounding.py (key + i H + j) / 2^16: stochastic rounding, so a unit whose increments are below
// half a code step still moves on average. The buffer stays in the core's cache: the step reads
// and writes 10 bytes of hidden state per coordinate.

inline void decode_int8(const int8_t* __restrict codes, int64_t n, int64_t i0, int64_t len,
                        const float* __restrict scales, int64_t nb, int64_t b, int H,
                        float* __restrict work, int64_t stride) {
  for (int k = 0; k < H; ++k) {
    const float f = scales[k * nb + b] / 127.0f;
    const int8_t* __restrict in = codes + k * n + i0;
    float* __restrict row = work + k * stride;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) row[i] = static_cast<float>(in[i]) * f;
  }
}

// h' * m + u in two roundings, as the codec's torch ops compute it: a fused multiply-add
// would round once and move some codes by one
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
__attribute__((noinline)) void encode_int8(const float* __restrict work, int64_t stride, int H,
                                           int64_t len,
                                           int8_t* __restrict codes, int64_t n, int64_t i0,
                                           float* __restrict scales, int64_t nb, int64_t b,
                                           uint32_t key) {
  for (int k = 0; k < H; ++k) {
    const float* __restrict row = work + k * stride;
    float s = 0.0f;
#pragma omp simd reduction(max : s)
    for (int64_t i = 0; i < len; ++i) s = std::max(s, std::fabs(row[i]));
    const float m = s > 0.0f ? 127.0f / s : 0.0f;
    scales[k * nb + b] = s;
    int8_t* __restrict out = codes + k * n + i0;
    // the sequence of unit k at coordinate i0 + i is x = key + (i0 + i) H + k, its bits the
    // high half of x kGolden = x0 kGolden + i (H kGolden), all modulo 2^32
    const uint32_t x0g = (key + static_cast<uint32_t>(i0) * static_cast<uint32_t>(H) +
                          static_cast<uint32_t>(k)) * kGolden;
    const uint32_t hg = static_cast<uint32_t>(H) * kGolden;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t r = (x0g + static_cast<uint32_t>(i) * hg) >> 16;
      // 16 bits: exact through a signed conversion, which every vector unit has
      const float u = static_cast<float>(static_cast<int32_t>(r)) * (1.0f / 65536.0f);
      float y = std::floor(row[i] * m + u);
      y = std::min(std::max(y, -127.0f), 127.0f);  // (no finite h' gives a NaN)
      out[i] = static_cast<int8_t>(static_cast<int32_t>(y));
    }
  }
}
#pragma GCC pop_options

// Pass 1 on one block of an 8-bit hidden state (fp32 compute): `work` holds H rows of
// kI8Stride floats. The rows are kI8Block + 16 floats apart, not a multiple of 4 KiB: rows a
// multiple apart share the L1 cache's sets and alias in the load-store unit.
double run_block_int8(const Job& job, const Item& it, const Weights<float>& w, float* work) {
  const int H = w.H;
  const int64_t len = it.len, b = it.start / kI8Block, nb = (job.n + kI8Block - 1) / kI8Block;
  int8_t* codes = static_cast<int8_t*>(job.hidden);
  decode_int8(codes, job.n, it.start, len, job.hidden_scale, nb, b, H, work, kI8Stride);
  double sum = 0.0;
  for (int64_t o = 0; o < len; o += kBlock) {
    const Item sub{it.tensor, it.start + o, std::min(kBlock, len - o)};
    sum += run_block_typed<float, float>(job, sub, w, work, kI8Stride, o);
  }
  encode_int8(work, kI8Stride, H, len, codes, job.n, it.start, job.hidden_scale, nb, b,
              job.rounding_key);
  return sum;
}

template <typename C>
double run_block(const Job& job, const Item& it, const Weights<C>& w) {
  switch (job.hk) {
    case kF32:
      return run_block_own<C, float>(job, it, w);
    case kF64:
      return run_block_own<C, double>(job, it, w);
    default:  // kBF16
      return run_block_own<C, uint16_t>(job, it, w);
  }
}

// Pass 1 on one block, in the job's compute precision (fp64 for fp64 parameters); `work`: this
// thread's buffer for an 8-bit hidden state (which only fp32 compute takes).
double pass1_item(const Job& job, const Item& it, const Weights<float>& w32,
                  const Weights<double>& w64, float* work) {
  if (job.hk == kI8) return run_block_int8(job, it, w32, work);
  return job.pk == kF64 ? run_block<double>(job, it, w64) : run_block<float>(job, it, w32);
}

// ---------------------------------------------------------------------------------------------
// pass 2 on one block

void pass2_item(const Job& job, const Item& it, double shared) {
  const int64_t i0 = it.start, len = it.len;
  if (job.pk == kF64) {
    double* __restrict th = static_cast<double*>(job.param) + i0;
    const double c = job.lr * shared;  // fp64 compute: lr * shared in fp64
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) th[i] = th[i] + c;
    if (job.avg_y != nullptr) {
      double* __restrict y = static_cast<double*>(job.avg_y) + i0;
      const double d = job.avg[1] * c;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) y[i] = y[i] + d;
    }
    return;
  }
  const float sh = static_cast<float>(shared);
  const float lr = static_cast<float>(job.lr);
  if (job.pk == kF32) {
    float* __restrict th = static_cast<float*>(job.param) + i0;
    const float c = lr * sh;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) th[i] = th[i] + c;
    if (job.avg_y != nullptr) {
      float* __restrict y = static_cast<float*>(job.avg_y) + i0;
      const float d = static_cast<float>(job.avg[1]) * c;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) y[i] = y[i] + d;
    }
    return;
  }
  const float* __restrict u = job.scratch + i0;
  uint16_t* __restrict th = static_cast<uint16_t*>(job.param) + i0;
  if (job.pk == kBF16) {
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) th[i] = f2bf(bf2f(th[i]) + lr * (u[i] + sh));
    return;
  }
  for (int64_t i = 0; i < len; ++i) th[i] = f2h(h2f(th[i]) + lr * (u[i] + sh));
}

// ---------------------------------------------------------------------------------------------
// whole-array helpers

// The largest bit pattern of p[0, len) with the sign bit cleared (a max reduction that reads at
// memory speed): for IEEE formats, the largest magnitude, NaN above infinity above the rest.
template <typename U>
inline U max_magnitude_bits(const U* __restrict p, int64_t len, U magnitude) {
  U m = 0;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < len; ++i) {
    const U v = static_cast<U>(p[i] & magnitude);
    m = v > m ? v : m;
  }
  return m;
}

// Whether x[start, start + len) holds a NaN or an infinity: its largest magnitude bit pattern
// reaches the format's exponent-all-ones pattern. The dtype code says the element size.
bool nonfinite_range(int dtype, const void* x, int64_t start, int64_t len) {
  if (dtype == kF32)
    return max_magnitude_bits(static_cast<const uint32_t*>(x) + start, len, 0x7FFFFFFFu) >=
           0x7F800000u;
  if (dtype == kF64)
    return max_magnitude_bits(static_cast<const uint64_t*>(x) + start, len,
                              uint64_t{0x7FFFFFFFFFFFFFFFull}) >= 0x7FF0000000000000ull;
  const uint16_t m =
      max_magnitude_bits(static_cast<const uint16_t*>(x) + start, len, uint16_t{0x7FFF});
  return m >= (dtype == kBF16 ? 0x7F80u : 0x7C00u);  // bf16 : fp16
}

// out[start, start + len) = tanh(x[...]) in the tanh of the copy's default loop (kF32 or kF64).
void tanh_range(int dtype, const void* x, void* out, int64_t start, int64_t len) {
  if (dtype == kF32) {
    const float* __restrict src = static_cast<const float*>(x) + start;
    float* __restrict dst = static_cast<float*>(out) + start;
#if L2L_SIMD_BACKEND
    simd_tanh_range(src, dst, len);  // the tanh of pass1_simd, the default loop
#else
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = tanh_f32(src[i]);
#endif
  } else {
    const double* __restrict src = static_cast<const double*>(x) + start;
    double* __restrict dst = static_cast<double*>(out) + start;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) dst[i] = tanh_f64(src[i]);
  }
}
