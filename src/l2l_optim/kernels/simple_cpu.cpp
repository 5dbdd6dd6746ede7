// Fused SimpleOptimizer update for CPU tensors (C++ / OpenMP), loaded by kernels/cpu.py.
// One file on purpose: the extension is compiled from a single source, and the two passes,
// the dtype dispatch and the vectorised tanh share their block layout.
//
// The update, per coordinate i (see nets.py / kernels/reference.py):
//
//     h_i' = tanh(w_ih * g_i + w_hh @ h_i + b_h)
//     u_i  = w_a . h_i' + b_out + w_b . mean_j(h_j')      (mean over every coordinate of the call)
//     theta_i += lr * u_i
//
// Because the aggregate enters linearly, w_b . mean(h') = (1/N) sum_j (w_b . h_j') is ONE scalar
// shared by every coordinate, so the step is two passes:
//
//   pass 1 (one sweep over all coordinates, all tensors): read g, h, theta; compute h'; write h';
//          apply the per-coordinate part lr * (w_a . h' + b_out); store per-block partial sums of
//          w_b . h'.
//   reduce: the partial sums, in block order, in double.
//   pass 2: theta += lr * S / N (one scalar per tensor).
//
// simple_update runs all three. simple_update_pass1 / simple_update_pass2 run the passes as two
// ops, so that a caller whose mean spans more coordinates than one call holds (a sharded
// parameter's other shards live in other processes) can all-reduce S and N in between.
//
// Determinism: the coordinates are cut into fixed blocks (kBlock coordinates of one tensor). Every
// block is computed by exactly one thread, its partial sum is accumulated in a fixed lane order,
// and the partial sums are reduced sequentially in block order. Which thread runs which block is
// dynamic (so a loaded core does not stall the step) but cannot change any bit of the result:
// results are bitwise independent of the thread count.
//
// Layout: the hidden state of a tensor with n coordinates is a contiguous (H, n) array, so for a
// fixed hidden unit k the coordinates are contiguous and the coordinate loops vectorise
// (`#pragma omp simd`, H fully unrolled for the default H = 10; -march=native picks the widest
// vectors the CPU has).
//
// Precision: fp64 parameters are computed in fp64, everything else in fp32, each with the
// vectorisable tanh below (max error 1.46 ulp over all fp32 inputs, checked exhaustively; the
// accuracy tests in tests/test_kernels.py re-check every 97th input and samples the fp64 one).
// bf16 / fp16 parameters keep the per-coordinate part in a zeroed fp32 scratch buffer between
// the passes so that theta is rounded once, as in the reference; fp32 / fp64 parameters are
// updated in place in both passes (one extra rounding of theta per step, <= 1 ulp).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kBlock = 2048;  // coordinates per work item (fixed: part of the result's definition)
constexpr int kLanes = 16;        // lanes of the fixed-order partial sums
constexpr int kMaxH = 64;         // largest hidden size of the generic (runtime-H) kernel

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

// bfloat16 <-> float. Round to nearest even, NaN -> 0x7FC0: the same as c10::BFloat16.
inline float bf2f(uint16_t b) { return u2f(static_cast<uint32_t>(b) << 16); }
inline uint16_t f2bf(float f) {
  const uint32_t u = f2u(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded);
}

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

// ---------------------------------------------------------------------------------------------
// tanh

// fp32 tanh, vectorisable (no calls, no tables, selects instead of branches):
//   |x| < 0.55 : x + x^3 P(x^2), P a degree-4 minimax fit of (tanh(x) - x) / x^3
//   otherwise  : sign(x) (1 - 2 / (1 + exp(2|x|))), exp by Cody-Waite reduction and the Cephes
//                expf polynomial, 2^n built in the exponent bits; 2|x| is clamped to 20, where
//                the result is 1.0f.
// Max error 1.46 ulp (relative 1.7e-7) over all fp32 inputs; tanh(+-inf) = +-1; NaN propagates.
inline float tanh_f32(float x) {
  const float a = std::fabs(x);
  const float t = x * x;
  float p = -0.0062823668122291565f;
  p = p * t + 0.021077677607536316f;
  p = p * t + -0.0538538359105587f;
  p = p * t + 0.13332600891590118f;
  p = p * t + -0.33333319425582886f;
  const float small = x + (x * t) * p;

  float y = 2.0f * a;
  y = (20.0f < y) ? 20.0f : y;  // min that keeps NaN
  const float n = std::nearbyint(y * 1.44269504088896341f);
  float r = y - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float q = 1.9875691500E-4f;
  q = q * r + 1.3981999507E-3f;
  q = q * r + 8.3334519073E-3f;
  q = q * r + 4.1665795894E-2f;
  q = q * r + 1.6666665459E-1f;
  q = q * r + 5.0000001201E-1f;
  const float er = (q * (r * r) + r) + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);  // 0 <= n <= 29 (garbage only for NaN, harmless)
  const float scale = u2f(static_cast<uint32_t>(ni + 127) << 23);
  const float e = er * scale;
  const float big = std::copysign(1.0f - 2.0f / (1.0f + e), x);
  return (a < 0.55f) ? small : big;
}

// fp64 tanh, vectorisable, the same scheme: |x| < 0.55: x + x^3 P(x^2) with a degree-10 fit
// (also in triton.py); otherwise 1 - 2 / (1 + exp(2|x|)) with exp by Cody-Waite reduction
// (fdlibm's ln2 split) and its Taylor polynomial to r^13. Max error 1.5 ulp (checked against
// long double tanhl on 2e7 random inputs); unlike std::tanh it vectorises.
inline double u2d(uint64_t u) {
  double d;
  std::memcpy(&d, &u, 8);
  return d;
}
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
  const double n = std::nearbyint(y * 1.4426950408889634);
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
// weights

template <typename C>
struct Weights {
  int H;
  C ih[kMaxH];
  C bh[kMaxH];
  C a[kMaxH];
  C b[kMaxH];
  C hh[kMaxH * kMaxH];  // row-major (H, H), row stride H
  C b_out;
};

// packed: fp64 [w_ih (H), w_hh (H*H), b_h (H), w_a (H), w_b (H), b_out (1)]. Casting fp64 -> C
// rounds exactly like tensor.to(C) in the reference.
template <typename C>
Weights<C> unpack(const double* w, int H) {
  Weights<C> out{};
  out.H = H;
  for (int j = 0; j < H; ++j) out.ih[j] = static_cast<C>(w[j]);
  for (int j = 0; j < H * H; ++j) out.hh[j] = static_cast<C>(w[H + j]);
  for (int j = 0; j < H; ++j) out.bh[j] = static_cast<C>(w[H + H * H + j]);
  for (int j = 0; j < H; ++j) out.a[j] = static_cast<C>(w[2 * H + H * H + j]);
  for (int j = 0; j < H; ++j) out.b[j] = static_cast<C>(w[3 * H + H * H + j]);
  out.b_out = static_cast<C>(w[4 * H + H * H]);
  return out;
}

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

// Pass 1 on one block, hidden size H known at compile time (the default 10).
// theta (type C) is updated in place: out[i] += lr * (w_a . h' + b_out). For bf16 / fp16
// parameters `out` is a zeroed fp32 scratch buffer and lr = 1, so it receives u exactly.
// Returns the block's sum of w_b . h'.
//
// The block is processed in sub-blocks of kSub coordinates, in three vectorised sweeps over an
// L1-resident buffer: (a) the pre-activations w_ih g + b_h + w_hh h for all H units, (b) tanh
// in place, (c) store h', accumulate u and s. Fusing all three in one loop body needs more
// vector registers than there are, and the spills cost more than the extra sweeps.
//
// noinline: GCC vectorises these loops reliably only when the function is compiled on its own
// (inlined into a caller it can fall back to scalar code).
constexpr int kSub = 256;

template <int H, typename C, typename S>
__attribute__((noinline)) double pass1_fixed(
    const C* __restrict g,  // block's gradients (already offset)
    S* __restrict h,        // hidden state base of the tensor, (H, n)
    int64_t n, int64_t i0, int64_t len,
    C* __restrict out,  // theta or scratch, offset to the block
    C lr, const Weights<C>& w, C* __restrict sbuf) {
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
#pragma omp simd
    for (int ii = 0; ii < cl; ++ii) {
      C u = b_out;
      C s = C(0);
#pragma GCC unroll 16
      for (int j = 0; j < H; ++j) {
        const C t = pre[j][ii];
        hc[j * n + ii] = Cvt<S, C>::store(t);
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
                     C* __restrict out, C lr, const Weights<C>& w, C* __restrict sbuf) {
  const int H = w.H;
  S* __restrict hb = h + i0;
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
      hb[j * n + ii] = Cvt<S, C>::store(hn);
      u += w.a[j] * hn;
      s += w.b[j] * hn;
    }
    out[ii] = out[ii] + lr * u;
    sbuf[ii] = s;
  }
  return block_sum(sbuf, len);
}

// ---------------------------------------------------------------------------------------------
// per-tensor description and dispatch

enum class HKind { F32, F64, BF16 };
enum class PKind { F32, F64, BF16, F16 };

struct Item {
  int tensor;
  int64_t start;
  int64_t len;
};

struct TensorJob {
  at::Tensor param, grad, hidden, scratch;
  PKind pk;
  HKind hk;
  int64_t n;
  double lr;
  bool f64;  // compute in fp64
};

template <typename C>
inline void load_grad_block(const at::Tensor& grad, int64_t i0, int64_t len, C* buf, const C** gp) {
  // The gradient in compute precision: a pointer into the tensor when it already is, else a
  // converted copy of the block (the same values as grad.to(C)).
  const auto st = grad.scalar_type();
  if ((std::is_same<C, float>::value && st == at::kFloat) ||
      (std::is_same<C, double>::value && st == at::kDouble)) {
    *gp = static_cast<const C*>(grad.data_ptr()) + i0;
    return;
  }
  switch (st) {
    case at::kFloat: {
      const float* src = grad.data_ptr<float>() + i0;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(src[i]);
      break;
    }
    case at::kDouble: {
      const double* src = grad.data_ptr<double>() + i0;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(src[i]);
      break;
    }
    case at::kBFloat16: {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(grad.data_ptr<at::BFloat16>()) + i0;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(bf2f(src[i]));
      break;
    }
    case at::kHalf: {
      const at::Half* src = grad.data_ptr<at::Half>() + i0;
      for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<C>(static_cast<float>(src[i]));
      break;
    }
    default:
      TORCH_CHECK(false, "l2l_optim cpu kernel: unsupported gradient dtype ", st);
  }
  *gp = buf;
}

template <typename C, typename S>
double run_block_typed(TensorJob& job, const Item& it, const Weights<C>& w) {
  alignas(64) C gbuf[kBlock];
  alignas(64) C sbuf[kBlock];
  const C* g = nullptr;
  load_grad_block<C>(job.grad, it.start, it.len, gbuf, &g);
  S* h = static_cast<S*>(job.hidden.data_ptr());
  C* out;
  C lr;
  if (job.scratch.defined()) {  // bf16 / fp16 params (computed in fp32): u into zeroed scratch
    out = static_cast<C*>(job.scratch.data_ptr()) + it.start;
    lr = C(1);
  } else {  // fp32 / fp64 params: theta in place
    out = static_cast<C*>(job.param.data_ptr()) + it.start;
    lr = static_cast<C>(job.lr);
  }
  if (w.H == 10) return pass1_fixed<10, C, S>(g, h, job.n, it.start, it.len, out, lr, w, sbuf);
  return pass1_generic<C, S>(g, h, job.n, it.start, it.len, out, lr, w, sbuf);
}

template <typename C>
double run_block(TensorJob& job, const Item& it, const Weights<C>& w) {
  switch (job.hk) {
    case HKind::F32:
      return run_block_typed<C, float>(job, it, w);
    case HKind::F64:
      return run_block_typed<C, double>(job, it, w);
    case HKind::BF16:
      return run_block_typed<C, uint16_t>(job, it, w);
  }
  return 0.0;
}

// pass 2 on one block
void pass2_block(TensorJob& job, const Item& it, double shared) {
  const int64_t i0 = it.start, len = it.len;
  if (job.pk == PKind::F64) {
    double* th = job.param.data_ptr<double>() + i0;
    const double c = job.lr * shared;  // fp64 compute: lr * shared in fp64
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) th[i] = th[i] + c;
    return;
  }
  const float sh = static_cast<float>(shared);
  const float lr = static_cast<float>(job.lr);
  if (job.pk == PKind::F32) {
    float* th = job.param.data_ptr<float>() + i0;
    const float c = lr * sh;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) th[i] = th[i] + c;
    return;
  }
  const float* u = job.scratch.data_ptr<float>() + i0;
  if (job.pk == PKind::BF16) {
    uint16_t* th = reinterpret_cast<uint16_t*>(job.param.data_ptr<at::BFloat16>()) + i0;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) th[i] = f2bf(bf2f(th[i]) + lr * (u[i] + sh));
    return;
  }
  at::Half* th = job.param.data_ptr<at::Half>() + i0;
  for (int64_t i = 0; i < len; ++i)
    th[i] = at::Half(static_cast<float>(th[i]) + lr * (u[i] + sh));
}

// Run fn(item_index) over all items: dynamically scheduled on torch's intra-op thread pool.
template <typename F>
void for_items(int64_t n_items, const F& fn) {
  if (n_items == 0) return;
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), n_items);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      int64_t i;
      while ((i = next.fetch_add(1, std::memory_order_relaxed)) < n_items) fn(i);
    }
  });
}

PKind pkind(const at::Tensor& p) {
  switch (p.scalar_type()) {
    case at::kFloat:
      return PKind::F32;
    case at::kDouble:
      return PKind::F64;
    case at::kBFloat16:
      return PKind::BF16;
    case at::kHalf:
      return PKind::F16;
    default:
      TORCH_CHECK(false, "l2l_optim cpu kernel: unsupported parameter dtype ", p.scalar_type());
  }
}

HKind hkind(const at::Tensor& h) {
  switch (h.scalar_type()) {
    case at::kFloat:
      return HKind::F32;
    case at::kDouble:
      return HKind::F64;
    case at::kBFloat16:
      return HKind::BF16;
    default:
      TORCH_CHECK(false, "l2l_optim cpu kernel: unsupported hidden-state dtype ", h.scalar_type(),
                  " (use float32, bfloat16 or float64)");
  }
}

// Every op checks each tensor before it reads a pointer: a tensor the loops cannot address (a
// tensor subclass such as DTensor, a fake, functional, meta, sparse or nested tensor) raises
// here instead of handing a null or foreign pointer to the loops.
void check_addressable(const at::Tensor& t, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), "l2l_optim cpu kernel: ", what, " ", i, " is undefined");
  const auto keys = t.key_set();
  TORCH_CHECK(!keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Functionalize),
              "l2l_optim cpu kernel: ", what, " ", i,
              " is a tensor subclass or wrapper (e.g. DTensor); the kernel takes plain CPU "
              "tensors (for a DTensor, pass its .to_local())");
  TORCH_CHECK(t.layout() == at::kStrided && !t.is_nested(), "l2l_optim cpu kernel: ", what, " ",
              i, " is not a dense strided tensor (layout ", t.layout(),
              t.is_nested() ? ", nested" : "", ")");
  TORCH_CHECK(t.device().is_cpu(), "l2l_optim cpu kernel: all tensors must be on the CPU (",
              what, " ", i, " is on ", t.device(), ")");
  TORCH_CHECK(t.has_storage() && (t.numel() == 0 || t.data_ptr() != nullptr),
              "l2l_optim cpu kernel: ", what, " ", i, " has no addressable storage");
}

// The skip flag: true means the op changes nothing.
bool skip_set(const std::optional<at::Tensor>& skip) {
  if (!skip.has_value() || !skip->defined()) return false;
  check_addressable(*skip, "skip flag", 0);
  TORCH_CHECK(skip->numel() == 1, "l2l_optim cpu kernel: the skip flag must have one element");
  return skip->item<bool>();
}

// The hidden size of a packed weight vector (its length is 4H + H^2 + 1).
int hidden_size(const at::Tensor& weights) {
  check_addressable(weights, "weights", 0);
  TORCH_CHECK(weights.scalar_type() == at::kDouble && weights.is_contiguous() && weights.dim() == 1,
              "l2l_optim cpu kernel: weights must be a packed contiguous fp64 vector");
  const int64_t wn = weights.numel();
  int H = 0;
  while (4 * H + H * H + 1 < wn) ++H;
  TORCH_CHECK(4 * H + H * H + 1 == wn, "l2l_optim cpu kernel: bad packed weight length ", wn);
  TORCH_CHECK(H >= 1 && H <= kMaxH, "l2l_optim cpu kernel: hidden size ", H, " not in [1, ", kMaxH,
              "]");
  return H;
}

// One call's tensors cut into blocks, with the weights unpacked in both compute precisions.
struct Step {
  int H = 0;
  const double* wp = nullptr;
  Weights<float> w32;
  Weights<double> w64;
  std::vector<TensorJob> jobs;
  std::vector<Item> items;
  int64_t N = 0;  // coordinates in the call

  Step(const at::Tensor& weights, size_t T) : H(hidden_size(weights)), jobs(T) {
    wp = weights.data_ptr<double>();
    w32 = unpack<float>(wp, H);
    w64 = unpack<double>(wp, H);
  }

  // Job t for a parameter of n coordinates: its blocks, its dtype, its learning rate.
  void add(size_t t, const at::Tensor& p, double lr) {
    check_addressable(p, "param", t);
    TORCH_CHECK(p.is_contiguous(), "l2l_optim cpu kernel: tensors must be contiguous");
    TensorJob& job = jobs[t];
    job.param = p;
    job.pk = pkind(p);
    job.n = p.numel();
    job.lr = lr;
    job.f64 = job.pk == PKind::F64;
    for (int64_t s = 0; s < job.n; s += kBlock)
      items.push_back(Item{static_cast<int>(t), s, std::min(kBlock, job.n - s)});
    N += job.n;
  }

  // Pass 2 changes theta unless the aggregate weights are all zero (then the shared scalar is
  // exactly 0) and no parameter waits in a scratch buffer.
  bool needs_pass2() const {
    bool all_zero_b = true;
    for (int j = 0; j < H; ++j) all_zero_b = all_zero_b && (wp[3 * H + H * H + j] == 0.0);
    bool any_scratch = false;
    for (auto& job : jobs) any_scratch = any_scratch || job.scratch.defined();
    return !(all_zero_b && !any_scratch);
  }
};

// Fill `step` with every tensor of the call (checked) and allocate the bf16 / fp16 scratch.
void add_all(Step& step, at::TensorList params, at::TensorList grads, at::TensorList hiddens,
             at::ArrayRef<double> lrs) {
  const int H = step.H;
  for (size_t t = 0; t < params.size(); ++t) {
    const at::Tensor& p = params[t];
    const at::Tensor& g = grads[t];
    const at::Tensor& h = hiddens[t];
    check_addressable(g, "grad", t);
    check_addressable(h, "hidden", t);
    TORCH_CHECK(g.is_contiguous() && h.is_contiguous(),
                "l2l_optim cpu kernel: tensors must be contiguous");
    pkind(g);  // a gradient dtype the loops read
    step.add(t, p, lrs[t]);
    TensorJob& job = step.jobs[t];
    const int64_t n = job.n;
    TORCH_CHECK(g.numel() == n, "l2l_optim cpu kernel: grad ", t, " has ", g.numel(),
                " elements, param has ", n);
    TORCH_CHECK(h.dim() == 2 && h.size(0) == H && h.size(1) == n, "l2l_optim cpu kernel: hidden ",
                t, " must have shape (", H, ", ", n, "), got ", h.sizes());
    job.grad = g;
    job.hidden = h;
    job.hk = hkind(h);
    if (job.pk == PKind::BF16 || job.pk == PKind::F16)
      job.scratch = at::zeros({n}, p.options().dtype(at::kFloat));
  }
}

// Pass 1 over every block: the partial sums of w_b . h', one per block, in block order.
std::vector<double> run_pass1(Step& step) {
  const int64_t n_items = static_cast<int64_t>(step.items.size());
  std::vector<double> partial(n_items, 0.0);
  for_items(n_items, [&](int64_t i) {
    const Item& it = step.items[i];
    TensorJob& job = step.jobs[it.tensor];
    partial[i] =
        job.f64 ? run_block<double>(job, it, step.w64) : run_block<float>(job, it, step.w32);
  });
  return partial;
}

void run_pass2(Step& step, double shared) {
  for_items(static_cast<int64_t>(step.items.size()), [&](int64_t i) {
    const Item& it = step.items[i];
    pass2_block(step.jobs[it.tensor], it, shared);
  });
}

void check_lengths(size_t T, size_t a, size_t b, size_t c) {
  TORCH_CHECK(a == T && b == T && c == T,
              "l2l_optim cpu kernel: params, grads, hiddens and lrs differ in length");
}

}  // namespace

// params / grads: contiguous CPU tensors (grads the same numel as params); hiddens: contiguous
// (H, numel); lrs: one per tensor; weights: packed fp64 (see unpack); skip: optional bool.
void simple_update(at::TensorList params, at::TensorList grads, at::TensorList hiddens,
                   at::ArrayRef<double> lrs, const at::Tensor& weights,
                   const std::optional<at::Tensor>& skip) {
  check_lengths(params.size(), grads.size(), hiddens.size(), lrs.size());
  if (skip_set(skip)) return;
  Step step(weights, params.size());
  add_all(step, params, grads, hiddens, lrs);
  if (step.N == 0) return;
  const std::vector<double> partial = run_pass1(step);
  // deterministic reduction, then the shared scalar
  double S = 0.0;
  for (double x : partial) S += x;
  const double shared = S / static_cast<double>(step.N);
  if (!step.needs_pass2()) return;  // no aggregate (shared is exactly 0): nothing to add
  run_pass2(step, shared);
}

// The same step in two halves, for an aggregate that spans more than this call (sharded
// parameters: the caller all-reduces between the halves). Pass 1 returns, per tensor, the sum
// of w_b . h' over its coordinates (its blocks' partial sums added in block order, in double)
// and the fp32 scratch buffers of bf16 / fp16 parameters (empty tensors for the others), which
// pass 2 takes back together with `shared`, the scalar w_b . mean(h') to add.
std::tuple<at::Tensor, std::vector<at::Tensor>> simple_update_pass1(
    at::TensorList params, at::TensorList grads, at::TensorList hiddens,
    at::ArrayRef<double> lrs, const at::Tensor& weights, const std::optional<at::Tensor>& skip) {
  const size_t T = params.size();
  check_lengths(T, grads.size(), hiddens.size(), lrs.size());
  at::Tensor sums = at::zeros({static_cast<int64_t>(T)}, at::TensorOptions().dtype(at::kDouble));
  std::vector<at::Tensor> scratch(T);
  for (auto& s : scratch) s = at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  if (skip_set(skip)) return {sums, scratch};
  Step step(weights, T);
  add_all(step, params, grads, hiddens, lrs);
  const std::vector<double> partial = run_pass1(step);
  double* out = sums.data_ptr<double>();
  for (size_t i = 0; i < partial.size(); ++i) out[step.items[i].tensor] += partial[i];
  for (size_t t = 0; t < T; ++t)
    if (step.jobs[t].scratch.defined()) scratch[t] = step.jobs[t].scratch;
  return {sums, scratch};
}

void simple_update_pass2(at::TensorList params, at::TensorList scratch, at::ArrayRef<double> lrs,
                         const at::Tensor& weights, const at::Tensor& shared,
                         const std::optional<at::Tensor>& skip) {
  const size_t T = params.size();
  TORCH_CHECK(scratch.size() == T && lrs.size() == T,
              "l2l_optim cpu kernel: params, scratch and lrs differ in length");
  if (skip_set(skip)) return;
  check_addressable(shared, "shared", 0);
  TORCH_CHECK(shared.numel() == 1 && shared.is_floating_point(),
              "l2l_optim cpu kernel: shared must be a one-element floating tensor");
  const double sh = shared.item<double>();
  Step step(weights, T);
  for (size_t t = 0; t < T; ++t) {
    step.add(t, params[t], lrs[t]);
    TensorJob& job = step.jobs[t];
    if (job.pk == PKind::BF16 || job.pk == PKind::F16) {
      const at::Tensor& s = scratch[t];
      check_addressable(s, "scratch", t);
      TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.numel() == job.n,
                  "l2l_optim cpu kernel: scratch ", t, " must be the float32 buffer of ", job.n,
                  " elements that simple_update_pass1 returned");
      job.scratch = s;
    }
  }
  if (step.N == 0 || !step.needs_pass2()) return;
  run_pass2(step, sh);
}

int64_t block_size() { return kBlock; }

// the kernels' tanh over a float32 / float64 CPU tensor (for the accuracy tests)
at::Tensor kernel_tanh(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "float32 / float64 CPU tensors only");
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (x.scalar_type() == at::kFloat) {
    const float* src = xc.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) dst[i] = tanh_f32(src[i]);
    });
  } else {
    const double* src = xc.data_ptr<double>();
    double* dst = out.data_ptr<double>();
    at::parallel_for(0, n, 1 << 16, [&](int64_t b, int64_t e) {
#pragma omp simd
      for (int64_t i = b; i < e; ++i) dst[i] = tanh_f64(src[i]);
    });
  }
  return out;
}

int64_t num_threads() { return at::get_num_threads(); }

// Registered as torch.ops.l2l_optim_cpu.*; the schema marks params and hiddens as mutated.
// The tensor ops are CPU kernels, not catch-all ones, so that cpu.py can register the
// shape-only (fake) versions torch.compile traces.
TORCH_LIBRARY(l2l_optim_cpu, m) {
  m.def(
      "simple_update(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] hiddens, float[] lrs, "
      "Tensor weights, Tensor? skip) -> ()");
  m.def(
      "simple_update_pass1(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] hiddens, "
      "float[] lrs, Tensor weights, Tensor? skip) -> (Tensor, Tensor[])");
  m.def(
      "simple_update_pass2(Tensor(a!)[] params, Tensor[] scratch, float[] lrs, Tensor weights, "
      "Tensor shared, Tensor? skip) -> ()");
  m.def("block_size() -> int", &block_size);
  m.def("num_threads() -> int", &num_threads);
  m.def("tanh(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(l2l_optim_cpu, CPU, m) {
  m.impl("simple_update", &simple_update);
  m.impl("simple_update_pass1", &simple_update_pass1);
  m.impl("simple_update_pass2", &simple_update_pass2);
  m.impl("tanh", &kernel_tanh);
}
