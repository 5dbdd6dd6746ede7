// Pass 1's coordinate loop for the default hidden size (10) in fp32 compute, written in AVX2 +
// FMA intrinsics, for fp32 and bf16 hidden state.
//
// simple_cpu_isa.h includes this file in its AVX2 copy only (L2L_AVX2_INTRINSICS), under that
// copy's target pragma, and pass1_fixed calls pass1_avx2 in place of its portable loop. It
// computes the same operations in the same order (the same fused multiply-adds, the same tanh
// as tanh_f32), so the results have the same bits: tests/test_cpu_library.py builds the library
// without it and compares. What it changes is the schedule, which GCC does not find on its own
// with 16 vector registers:
//   - the pre-activations are summed with the input unit outermost, ten accumulators in
//     registers, so the ten chains of eleven multiply-adds run side by side; the weights sit
//     broadcast in a stack array and enter the multiply-adds as memory operands;
//   - the tanh runs on two hidden units at a time (fp32 state) or on all ten before any is
//     stored (bf16 state), whichever measured faster (BENCHMARKS.md);
//   - bf16 state is loaded and stored eight lanes at a time (GCC vectorises 16-bit loads at
//     sixteen lanes, two registers per value, and spills).

struct Avx2Weights {
  __m256 ih[10], bh[10], hh[100], a[10], b[10];
  __m256 b_out;
};

inline void avx2_broadcast(const Weights<float>& w, Avx2Weights* v) {
  for (int j = 0; j < 10; ++j) {
    v->ih[j] = _mm256_set1_ps(w.ih[j]);
    v->bh[j] = _mm256_set1_ps(w.bh[j]);
    v->a[j] = _mm256_set1_ps(w.a[j]);
    v->b[j] = _mm256_set1_ps(w.b[j]);
  }
  for (int j = 0; j < 100; ++j) v->hh[j] = _mm256_set1_ps(w.hh[j]);
  v->b_out = _mm256_set1_ps(w.b_out);
}

inline __m256 avx2_load_h(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 avx2_load_h(const uint16_t* p) {  // bf2f on eight lanes
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(b), 16));
}

// f2bf on eight lanes (round to nearest even, NaN -> 0x7FC0), each result in its lane's low half.
inline __m256i avx2_bf16_bits(__m256 t) {
  const __m256i u = _mm256_castps_si256(t);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), odd);
  r = _mm256_srli_epi32(r, 16);
  const __m256 nan = _mm256_cmp_ps(t, t, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}

// Store two hidden units' new values, to rows p0 and p1.
inline void avx2_store_h2(float* p0, float* p1, __m256 t0, __m256 t1) {
  _mm256_storeu_ps(p0, t0);
  _mm256_storeu_ps(p1, t1);
}
inline void avx2_store_h2(uint16_t* p0, uint16_t* p1, __m256 t0, __m256 t1) {
  // packus interleaves the 128-bit halves, [t0 0-3, t1 0-3, t0 4-7, t1 4-7]; the permute sorts
  const __m256i both = _mm256_permute4x64_epi64(
      _mm256_packus_epi32(avx2_bf16_bits(t0), avx2_bf16_bits(t1)), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p0), _mm256_castsi256_si128(both));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p1), _mm256_extracti128_si256(both, 1));
}

// tanh_f32 on eight lanes: its operations, in its order (see there for the method).
inline __m256 avx2_tanh(__m256 x) {
  const __m256 sign = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32(0x80000000)));
  const __m256 a = _mm256_xor_ps(x, sign);
  const __m256 y = _mm256_min_ps(_mm256_set1_ps(10.0f), a);  // 10 < a ? 10 : a, keeps NaN
  const __m256 round = _mm256_set1_ps(12582912.0f);
  const __m256 biased = _mm256_fmadd_ps(y, _mm256_set1_ps(2.88539008177792682f), round);
  const __m256 n = _mm256_sub_ps(biased, round);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.3466796875f), y);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(1.06097220e-4f), r);
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.9875691500E-4f * 64.0f), r,
                             _mm256_set1_ps(1.3981999507E-3f * 32.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(8.3334519073E-3f * 16.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(4.1665795894E-2f * 8.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.6666665459E-1f * 4.0f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(5.0000001201E-1f * 2.0f));
  const __m256 em = _mm256_fmadd_ps(q, _mm256_mul_ps(r, r), r);
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_add_epi32(_mm256_castps_si256(biased), _mm256_set1_epi32(128)), 23));
  const __m256 e = _mm256_fmadd_ps(
      scale, em, _mm256_fmadd_ps(scale, _mm256_set1_ps(0.5f), _mm256_set1_ps(-1.0f)));
  const __m256 t = _mm256_div_ps(e, _mm256_add_ps(e, _mm256_set1_ps(2.0f)));
  return _mm256_or_ps(t, sign);
}

// Eight coordinates: gradients g, hidden rows h + k * stride, out += lr * (w_a . h' + b_out),
// s = w_b . h'.
template <typename S>
inline void avx2_step8(const float* __restrict g, S* __restrict h, int64_t stride,
                       float* __restrict out, float* __restrict s, __m256 lr,
                       const Avx2Weights& w) {
  constexpr int kGroup = sizeof(S) == 2 ? 10 : 2;  // hidden units per tanh group
  const __m256 gv = _mm256_loadu_ps(g);
  __m256 p[10];
#pragma GCC unroll 16
  for (int j = 0; j < 10; ++j) p[j] = _mm256_fmadd_ps(w.ih[j], gv, w.bh[j]);
#pragma GCC unroll 16
  for (int k = 0; k < 10; ++k) {
    const __m256 hk = avx2_load_h(h + k * stride);
#pragma GCC unroll 16
    for (int j = 0; j < 10; ++j) p[j] = _mm256_fmadd_ps(w.hh[j * 10 + k], hk, p[j]);
  }
  __m256 u = w.b_out;
  __m256 sv = _mm256_setzero_ps();
#pragma GCC unroll 16
  for (int j0 = 0; j0 < 10; j0 += kGroup) {
    __m256 t[kGroup];
#pragma GCC unroll 16
    for (int q = 0; q < kGroup; ++q) t[q] = avx2_tanh(p[j0 + q]);
#pragma GCC unroll 16
    for (int q = 0; q < kGroup; q += 2) {
      avx2_store_h2(h + (j0 + q) * stride, h + (j0 + q + 1) * stride, t[q], t[q + 1]);
    }
#pragma GCC unroll 16
    for (int q = 0; q < kGroup; ++q) {
      u = _mm256_fmadd_ps(w.a[j0 + q], t[q], u);
      sv = _mm256_fmadd_ps(w.b[j0 + q], t[q], sv);
    }
  }
  _mm256_storeu_ps(out, _mm256_fmadd_ps(lr, u, _mm256_loadu_ps(out)));
  _mm256_storeu_ps(s, sv);
}

// pass1_fixed<10, float, S>: the same arguments and results.
template <typename S>
__attribute__((noinline)) double pass1_avx2(const float* __restrict g, S* __restrict h, int64_t n,
                                            int64_t i0, int64_t len, float* __restrict out,
                                            float lr, const Weights<float>& w,
                                            float* __restrict sbuf) {
  Avx2Weights wv;
  avx2_broadcast(w, &wv);
  const __m256 lrv = _mm256_set1_ps(lr);
  S* __restrict hb = h + i0;
  int64_t ii = 0;
  for (; ii + 8 <= len; ii += 8) avx2_step8(g + ii, hb + ii, n, out + ii, sbuf + ii, lrv, wv);
  if (ii < len) {  // the last 1-7 coordinates, through a zero-padded copy: the same operations
    const int rest = static_cast<int>(len - ii);
    alignas(32) float gt[8] = {}, ot[8] = {}, st[8];
    alignas(32) S ht[10 * 8] = {};
    for (int i = 0; i < rest; ++i) {
      gt[i] = g[ii + i];
      ot[i] = out[ii + i];
      for (int k = 0; k < 10; ++k) ht[k * 8 + i] = hb[k * n + ii + i];
    }
    avx2_step8(gt, ht, 8, ot, st, lrv, wv);
    for (int i = 0; i < rest; ++i) {
      out[ii + i] = ot[i];
      sbuf[ii + i] = st[i];
      for (int k = 0; k < 10; ++k) hb[k * n + ii + i] = ht[k * 8 + i];
    }
  }
  return block_sum(sbuf, len);
}
