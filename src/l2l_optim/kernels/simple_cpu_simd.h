// Pass 1's coordinate loop for the default hidden size (10) in fp32 compute, for fp32 and bf16
// hidden state, written once over a small vector interface (struct Simd) with one
// implementation per instruction set:
//   L2L_SIMD_BACKEND 1: AVX2 + FMA, eight lanes (the AVX2 copy);
//   L2L_SIMD_BACKEND 2: AVX-512 (F, BW, DQ), sixteen lanes (the AVX-512 copy).
//
// simple_cpu_isa.h includes this file in a copy whose L2L_SIMD_BACKEND is non-zero, under that
// copy's target pragma, and pass1_fixed calls pass1_simd in place of its portable loop. It
// computes the portable loop's operations in the same order (the same fused multiply-adds, the
// tanh of tanh_f32 but for the reciprocal's first estimate, see simd_tanh); tests/test_kernels.py
// checks every copy against the reference. What it changes is the schedule, which GCC does not
// find on its own (on AVX-512 it takes 0.74-0.83 of the time of GCC's vectorisation of the
// portable loop with fp32 state, about the same with bf16 state; BENCHMARKS.md):
//   - the pre-activations are summed with the input unit outermost, ten accumulators in
//     registers, so the ten chains of eleven multiply-adds run side by side; the weights sit
//     broadcast in a stack array and enter the multiply-adds as memory operands;
//   - the tanh runs on two hidden units at a time, or on all ten before any is stored with
//     bf16 state on AVX2, whichever measured faster (AVX2: BENCHMARKS.md; AVX-512, bf16 state:
//     two at a time took 0.96 of the time of ten on an AMD EPYC Zen 4, 65,536 coordinates);
//   - bf16 state is loaded and stored one vector of lanes at a time (GCC vectorises 16-bit
//     loads at twice the lanes of a float vector, two registers per value, and spills).

// ------------------------------------------------------------------------------ the backends

#if L2L_SIMD_BACKEND == 1
struct Simd {
  using F = __m256;
  using I = __m256i;
  static constexpr int kLanes = 8;
  static F set1(float x) { return _mm256_set1_ps(x); }
  static I set1i(int32_t x) { return _mm256_set1_epi32(x); }
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c, one rounding
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b, one rounding
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  // 1 / a within 2^-22 (relative): vrcpps (12 bits) and one Newton step, r + r (1 - a r)
  static F recip(F a) {
    const F r = _mm256_rcp_ps(a);
    return _mm256_fmadd_ps(r, _mm256_fnmadd_ps(a, r, _mm256_set1_ps(1.0f)), r);
  }
  static F min(F a, F b) { return _mm256_min_ps(a, b); }  // a < b ? a : b (NaN in a: b)
  static F and_(F a, F b) { return _mm256_and_ps(a, b); }
  static F or_(F a, F b) { return _mm256_or_ps(a, b); }
  static F xor_(F a, F b) { return _mm256_xor_ps(a, b); }
  static I as_int(F a) { return _mm256_castps_si256(a); }
  static F as_float(I a) { return _mm256_castsi256_ps(a); }
  static I addi(I a, I b) { return _mm256_add_epi32(a, b); }
  static I mullo(I a, I b) { return _mm256_mullo_epi32(a, b); }  // low 32 bits of each product
  static I lanes() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }
  static I andi(I a, I b) { return _mm256_and_si256(a, b); }
  template <int k> static I shl(I a) { return _mm256_slli_epi32(a, k); }
  template <int k> static I shr(I a) { return _mm256_srli_epi32(a, k); }  // logical
  static I where_nan(F t, I a, I b) {  // per lane: t is NaN ? b : a
    return _mm256_blendv_epi8(a, b, _mm256_castps_si256(_mm256_cmp_ps(t, t, _CMP_UNORD_Q)));
  }
  static F load_bf16(const uint16_t* p) {  // bf2f on every lane
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
  }
  // two rows' bf16 values, each lane's in its low half
  static void store_bf16_2(uint16_t* p0, uint16_t* p1, I r0, I r1) {
    // packus interleaves the 128-bit halves, [r0 0-3, r1 0-3, r0 4-7, r1 4-7]; the permute sorts
    const __m256i both = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p0), _mm256_castsi256_si128(both));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p1), _mm256_extracti128_si256(both, 1));
  }
};
#elif L2L_SIMD_BACKEND == 2
struct Simd {
  using F = __m512;
  using I = __m512i;
  static constexpr int kLanes = 16;
  static F set1(float x) { return _mm512_set1_ps(x); }
  static I set1i(int32_t x) { return _mm512_set1_epi32(x); }
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  // 1 / a within 2^-14 (relative): vrcp14ps, enough for the quotient's one correction
  static F recip(F a) { return _mm512_rcp14_ps(a); }
  static F min(F a, F b) { return _mm512_min_ps(a, b); }  // vminps: NaN in a gives b
  static F and_(F a, F b) { return _mm512_and_ps(a, b); }  // AVX512DQ
  static F or_(F a, F b) { return _mm512_or_ps(a, b); }
  static F xor_(F a, F b) { return _mm512_xor_ps(a, b); }
  static I as_int(F a) { return _mm512_castps_si512(a); }
  static F as_float(I a) { return _mm512_castsi512_ps(a); }
  static I addi(I a, I b) { return _mm512_add_epi32(a, b); }
  static I mullo(I a, I b) { return _mm512_mullo_epi32(a, b); }
  static I lanes() { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
  static I andi(I a, I b) { return _mm512_and_si512(a, b); }
  template <int k> static I shl(I a) { return _mm512_slli_epi32(a, k); }
  template <int k> static I shr(I a) { return _mm512_srli_epi32(a, k); }
  static I where_nan(F t, I a, I b) {  // mask_blend takes b where the mask is set
    return _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), a, b);
  }
  static F load_bf16(const uint16_t* p) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
  }
  static void store_bf16_2(uint16_t* p0, uint16_t* p1, I r0, I r1) {
    // vpmovdw keeps each lane's low 16 bits (the values are below 2^16: no saturation needed)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0), _mm512_cvtepi32_epi16(r0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1), _mm512_cvtepi32_epi16(r1));
  }
};
#endif

// ---------------------------------------------------------------------- the loop, written once

using SimdF = Simd::F;
using SimdI = Simd::I;

struct SimdWeights {
  SimdF ih[10], bh[10], hh[100], a[10], b[10];
  SimdF b_out;
};

inline void simd_broadcast(const Weights<float>& w, SimdWeights* v) {
  for (int j = 0; j < 10; ++j) {
    v->ih[j] = Simd::set1(w.ih[j]);
    v->bh[j] = Simd::set1(w.bh[j]);
    v->a[j] = Simd::set1(w.a[j]);
    v->b[j] = Simd::set1(w.b[j]);
  }
  for (int j = 0; j < 100; ++j) v->hh[j] = Simd::set1(w.hh[j]);
  v->b_out = Simd::set1(w.b_out);
}

inline SimdF simd_load_h(const float* p) { return Simd::load(p); }
inline SimdF simd_load_h(const uint16_t* p) { return Simd::load_bf16(p); }

// f2bf on every lane (round to nearest even, NaN -> 0x7FC0), each result in its lane's low half.
inline SimdI simd_bf16_bits(SimdF t) {
  const SimdI u = Simd::as_int(t);
  const SimdI odd = Simd::andi(Simd::shr<16>(u), Simd::set1i(1));
  const SimdI r = Simd::shr<16>(Simd::addi(Simd::addi(u, Simd::set1i(0x7FFF)), odd));
  return Simd::where_nan(t, r, Simd::set1i(0x7FC0));
}

// f2bf_stochastic on every lane: xg holds each lane's (key + i H + j) * kGolden, modulo 2^32
// (rounding.py).
inline SimdI simd_bf16_bits_stochastic(SimdF t, SimdI xg) {
  const SimdI r = Simd::shr<16>(xg);
  return Simd::where_nan(t, Simd::shr<16>(Simd::addi(Simd::as_int(t), r)), Simd::set1i(0x7FC0));
}

// Store two hidden units' new values, to rows p0 and p1; xg: the first unit's rounding
// sequence times kGolden (the second's is xg + kGolden), read for stochastically rounded bf16
// state only.
inline void simd_store_h2(float* p0, float* p1, SimdF t0, SimdF t1, SimdI, bool) {
  Simd::store(p0, t0);
  Simd::store(p1, t1);
}
inline void simd_store_h2(uint16_t* p0, uint16_t* p1, SimdF t0, SimdF t1, SimdI xg,
                          bool stochastic) {
  if (stochastic) {
    const SimdI g = Simd::set1i(static_cast<int32_t>(kGolden));
    Simd::store_bf16_2(p0, p1, simd_bf16_bits_stochastic(t0, xg),
                       simd_bf16_bits_stochastic(t1, Simd::addi(xg, g)));
  } else {
    Simd::store_bf16_2(p0, p1, simd_bf16_bits(t0), simd_bf16_bits(t1));
  }
}

// tanh_f32 on every lane: its operations, in its order (see there for the method), except for
// the reciprocal's first estimate, which comes from the hardware (fewer operations, other bits).
inline SimdF simd_tanh(SimdF x) {
  const SimdF sign = Simd::and_(x, Simd::as_float(Simd::set1i(static_cast<int32_t>(0x80000000u))));
  const SimdF a = Simd::xor_(x, sign);
  const SimdF y = Simd::min(Simd::set1(10.0f), a);  // 10 < a ? 10 : a, keeps NaN
  const SimdF round = Simd::set1(12582912.0f);
  const SimdF biased = Simd::fmadd(y, Simd::set1(2.88539008177792682f), round);
  const SimdF n = Simd::sub(biased, round);
  const SimdF r = Simd::fnmadd(n, Simd::set1(0.346573591f), y);
  SimdF q = Simd::fmadd(Simd::set1(1.9875691500E-4f * 64.0f), r,
                        Simd::set1(1.3981999507E-3f * 32.0f));
  q = Simd::fmadd(q, r, Simd::set1(8.3334519073E-3f * 16.0f));
  q = Simd::fmadd(q, r, Simd::set1(4.1665795894E-2f * 8.0f));
  q = Simd::fmadd(q, r, Simd::set1(1.6666665459E-1f * 4.0f));
  q = Simd::fmadd(q, r, Simd::set1(5.0000001201E-1f * 2.0f));
  const SimdF em = Simd::fmadd(q, Simd::mul(r, r), r);
  const SimdF scale = Simd::as_float(
      Simd::shl<23>(Simd::addi(Simd::as_int(biased), Simd::set1i(128))));
  const SimdF e = Simd::fmadd(
      scale, em, Simd::fmadd(scale, Simd::set1(0.5f), Simd::set1(-1.0f)));
  // e / (e + 2) as tanh_f32 computes it, from the hardware's reciprocal estimate (Simd::recip)
  // in place of tanh_f32's portable one
  const SimdF d = Simd::add(e, Simd::set1(2.0f));
  const SimdF rd = Simd::recip(d);
  const SimdF q0 = Simd::mul(e, rd);
  const SimdF t = Simd::fmadd(rd, Simd::fnmadd(q0, d, e), q0);
  return Simd::or_(t, sign);
}

// dst[0, len) = simd_tanh(src[...]), the last partial vector through a zero-padded copy.
inline void simd_tanh_range(const float* __restrict src, float* __restrict dst, int64_t len) {
  constexpr int kV = Simd::kLanes;
  int64_t i = 0;
  for (; i + kV <= len; i += kV) Simd::store(dst + i, simd_tanh(Simd::load(src + i)));
  if (i < len) {
    alignas(64) float t[kV] = {};
    std::memcpy(t, src + i, static_cast<size_t>(len - i) * sizeof(float));
    Simd::store(t, simd_tanh(Simd::load(t)));
    std::memcpy(dst + i, t, static_cast<size_t>(len - i) * sizeof(float));
  }
}

// One vector of coordinates: gradients g, hidden rows h + k * stride, out += lr * (w_a . h' +
// b_out), s = w_b . h'. rbg: per lane, (key + i * 10) * kGolden for the lane's coordinate i
// (the stochastic rounding's sequence of unit 0, multiplied out: unit j adds j * kGolden).
template <typename S>
inline void simd_step(const float* __restrict g, S* __restrict h, int64_t stride,
                      float* __restrict out, float* __restrict s, SimdF lr,
                      const SimdWeights& w, SimdI rbg, bool stochastic) {
  // hidden units per tanh group (see the top of the file)
  constexpr int kGroup = (sizeof(S) == 2 && Simd::kLanes == 8) ? 10 : 2;
  const SimdF gv = Simd::load(g);
  SimdF p[10];
#pragma GCC unroll 16
  for (int j = 0; j < 10; ++j) p[j] = Simd::fmadd(w.ih[j], gv, w.bh[j]);
#pragma GCC unroll 16
  for (int k = 0; k < 10; ++k) {
    const SimdF hk = simd_load_h(h + k * stride);
#pragma GCC unroll 16
    for (int j = 0; j < 10; ++j) p[j] = Simd::fmadd(w.hh[j * 10 + k], hk, p[j]);
  }
  SimdF u = w.b_out;
  SimdF sv = Simd::zero();
#pragma GCC unroll 16
  for (int j0 = 0; j0 < 10; j0 += kGroup) {
    SimdF t[kGroup];
#pragma GCC unroll 16
    for (int q = 0; q < kGroup; ++q) t[q] = simd_tanh(p[j0 + q]);
#pragma GCC unroll 16
    for (int q = 0; q < kGroup; q += 2) {
      simd_store_h2(h + (j0 + q) * stride, h + (j0 + q + 1) * stride, t[q], t[q + 1],
                    Simd::addi(rbg, Simd::set1i(static_cast<int32_t>((j0 + q) * kGolden))),
                    stochastic);
    }
#pragma GCC unroll 16
    for (int q = 0; q < kGroup; ++q) {
      u = Simd::fmadd(w.a[j0 + q], t[q], u);
      sv = Simd::fmadd(w.b[j0 + q], t[q], sv);
    }
  }
  Simd::store(out, Simd::fmadd(lr, u, Simd::load(out)));
  Simd::store(s, sv);
}

// pass1_fixed<10, float, S>: the same arguments and results.
template <typename S>
__attribute__((noinline)) double pass1_simd(const float* __restrict g, S* __restrict h, int64_t n,
                                            int64_t i0, int64_t len, float* __restrict out,
                                            float lr, const Weights<float>& w,
                                            float* __restrict sbuf, const Rounding& rnd) {
  constexpr int kV = Simd::kLanes;
  SimdWeights wv;
  simd_broadcast(w, &wv);
  const SimdF lrv = Simd::set1(lr);
  S* __restrict hb = h + i0;
  // the rounding sequence of unit 0 at coordinate i0 + ii, per lane, times kGolden (all modulo
  // 2^32: (a + b) kGolden = a kGolden + b kGolden, so no multiplication in the loop)
  const SimdI lane10g = Simd::mullo(Simd::lanes(), Simd::set1i(static_cast<int32_t>(10u * kGolden)));
  const uint32_t base_g = (rnd.key + static_cast<uint32_t>(i0) * 10u) * kGolden;
  const uint32_t step_g = static_cast<uint32_t>(kV) * 10u * kGolden;
  int64_t ii = 0;
  for (; ii + kV <= len; ii += kV) {
    const uint32_t at = base_g + static_cast<uint32_t>(ii / kV) * step_g;
    const SimdI rbg = Simd::addi(Simd::set1i(static_cast<int32_t>(at)), lane10g);
    simd_step(g + ii, hb + ii, n, out + ii, sbuf + ii, lrv, wv, rbg, rnd.stochastic);
  }
  if (ii < len) {  // the last 1 to kV - 1 coordinates, through a zero-padded copy: same operations
    const int rest = static_cast<int>(len - ii);
    alignas(64) float gt[kV] = {}, ot[kV] = {}, st[kV];
    alignas(64) S ht[10 * kV] = {};
    for (int i = 0; i < rest; ++i) {
      gt[i] = g[ii + i];
      ot[i] = out[ii + i];
      for (int k = 0; k < 10; ++k) ht[k * kV + i] = hb[k * n + ii + i];
    }
    const uint32_t at = base_g + static_cast<uint32_t>(ii / kV) * step_g;
    const SimdI rbg = Simd::addi(Simd::set1i(static_cast<int32_t>(at)), lane10g);
    simd_step(gt, ht, kV, ot, st, lrv, wv, rbg, rnd.stochastic);
    for (int i = 0; i < rest; ++i) {
      out[ii + i] = ot[i];
      sbuf[ii + i] = st[i];
      for (int k = 0; k < 10; ++k) hb[k * n + ii + i] = ht[k * kV + i];
    }
  }
  return block_sum(sbuf, len);
}
