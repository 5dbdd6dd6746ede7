// Fused SimpleOptimizer update for CPU tensors: a plain C++ / OpenMP shared library with a C ABI
// (raw pointers, dtype codes), loaded with ctypes by kernels/cpu.py. No libtorch headers or
// symbols: the library is built once, at install time (hatch_build.py), for every torch
// version, and picks its instruction set when it is loaded.
//
// The update, per coordinate i (see nets.py / kernels/reference.py):
//
//     x_i  = g_i, or with the rms input norm (rule.rms_normalise):
//            v_i = beta v_i + ((1 - beta) g_i) g_i  (saturated: no finite g_i makes it inf),
//            c   = beta c + (1 - beta),
//            x_i = g_i / (sqrt(v_i) / sqrt(c) + eps)      (v, c updated in place)
//          where c, the bias correction, is one value per tensor (or, in the per-coordinate
//          layout, one per coordinate: c_i, the same numbers)
//     h_i' = tanh(w_ih * x_i + w_hh @ h_i + b_h)
//     u_i  = w_a . h_i' + b_out + w_b . mean_j(h_j')      (mean over every coordinate of the call)
//     theta_i += lr * u_i
//
// Because the aggregate enters linearly, w_b . mean(h') = (1/N) sum_j (w_b . h_j') is ONE scalar
// shared by every coordinate, so the step is two passes:
//
//   pass 1 (one sweep over all coordinates, all tensors): read g, h, theta (and v, c: write them
//          back); compute h'; write h';
//          apply the per-coordinate part lr * (w_a . h' + b_out); store per-block partial sums of
//          w_b . h'.
//   reduce: the partial sums, in block order, in double.
//   pass 2: theta += lr * S / N (one scalar per tensor).
//
// l2l_simple_pass1 with sums == NULL runs all three. With a sums array it runs pass 1 only and
// returns the per-tensor sums, and l2l_simple_pass2 runs pass 2 with a shared scalar the caller
// supplies: a caller whose mean spans more coordinates than one call holds (a sharded
// parameter's other shards live in other processes) all-reduces S and N in between.
//
// Determinism: the coordinates are cut into fixed blocks (kBlock coordinates of one tensor). Every
// block is computed by exactly one thread, its partial sum is accumulated in a fixed lane order,
// and the partial sums are reduced sequentially in block order. Which thread runs which block is
// dynamic (so a loaded core does not stall the step) but cannot change any bit of the result:
// results are bitwise independent of the thread count, which the caller passes in (torch's).
//
// Layout: the hidden state of a tensor with n coordinates is a contiguous (H, n) array, so for a
// fixed hidden unit k the coordinates are contiguous and the coordinate loops vectorise
// (`#pragma omp simd`, H fully unrolled for the default H = 10). An 8-bit hidden state (int8
// codes with one fp32 scale per hidden unit and block of kI8Block coordinates, state.py's codec)
// is cut into work items of kI8Block coordinates: each is decoded into a per-thread fp32 buffer,
// stepped there by the fp32-state loop and encoded back (simple_cpu_isa.h, run_block_int8).
//
// Instruction sets: the per-coordinate code (simple_cpu_isa.h) is compiled three times on
// x86-64, for AVX-512 (x86-64-v4), AVX2 + FMA (x86-64-v3) and the SSE2 baseline, and the best
// one the CPU supports is chosen when the library loads (l2l_isa names it; l2l_select_isa
// forces another). The build uses no -march flag, so one binary runs on any x86-64. The copies
// run the same operations in the same order, but for two things: where the compiler contracts
// a * b + c into an FMA (AVX-512, AVX2) or not (the baseline has none), and the first estimate
// of the fp32 tanh's reciprocal (the hardware's vrcp14ps / vrcpps in the AVX-512 / AVX2 loops,
// a portable one elsewhere). So the last bit may differ between copies: results are bitwise
// reproducible per instruction set (and independent of the thread count), and every copy meets
// the reference's tolerances (tests/test_kernels.py). Other architectures get one copy, for the
// compiler's default target.
//
// Precision: fp64 parameters are computed in fp64, everything else in fp32, each with the
// vectorisable tanh of simple_cpu_isa.h; the fp32 one has no division (a reciprocal estimate
// and one correction of the quotient): max error 2.33 ulp, relative 1.7e-7, in the AVX-512 and
// AVX2 copies, 2.88 ulp in the baseline (every 97th fp32 input against torch's fp64 tanh,
// tests/test_kernels.py, which also samples the fp64 one). bf16 / fp16 parameters keep the
// per-coordinate part in a zeroed fp32 scratch buffer between the passes so that theta is
// rounded once, as in the reference; fp32 / fp64 parameters are updated in place in both passes
// (one extra rounding of theta per step, <= 1 ulp).
//
// The caller (cpu.py) checks every tensor before it hands a pointer over: plain, dense,
// contiguous CPU tensors of the dtypes below, hidden states of shape (H, n). This file checks
// what it can see (dtype codes, the packed weight length, counts) and returns a negative code
// instead of reading memory it was not given.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>  // the AVX2 and AVX-512 copies' coordinate loop (simple_cpu_simd.h)
#endif

#include <atomic>

#ifndef L2L_SOURCE_HASH
#define L2L_SOURCE_HASH "unknown"
#endif

#define L2L_API extern "C" __attribute__((visibility("default")))

namespace l2l {

constexpr int64_t kBlock = 2048;  // coordinates per work item (fixed: part of the result's definition)
constexpr int64_t kI8Block = 4096;  // coordinates per scale of an 8-bit hidden state (state.py's
                                    // INT8_BLOCK): one work item, a multiple of kBlock
constexpr int64_t kI8Stride = kI8Block + 16;  // floats per row of its work buffer
constexpr int kLanes = 16;        // lanes of the fixed-order partial sums
constexpr int kMaxH = 64;         // largest hidden size of the generic (runtime-H) kernel
constexpr int kSub = 256;         // coordinates per L1-resident sub-block of pass 1
constexpr int64_t kScanBlock = 1 << 16;  // elements per work item of the whole-array helpers

// dtype codes of the ABI (cpu.py's DTYPE_CODES)
enum : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3, kI8 = 4 };

// rounding.squares_key: the key of a bf16 running mean of squares, MurmurHash3's finaliser of
// the tensor's rounding key mixed with a constant of its own
inline uint32_t squares_key(uint32_t key) {
  uint32_t x = key ^ 0x5BD1E995u;
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  return x ^ (x >> 16);
}

// error codes of the ABI (cpu.py's _ERRORS)
enum : int { kOk = 0, kBadWeights = -1, kBadDtype = -2, kNoMemory = -3, kBadArgument = -4 };

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
void unpack(const double* w, int H, Weights<C>* out) {
  std::memset(out, 0, sizeof(*out));
  out->H = H;
  for (int j = 0; j < H; ++j) out->ih[j] = static_cast<C>(w[j]);
  for (int j = 0; j < H * H; ++j) out->hh[j] = static_cast<C>(w[H + j]);
  for (int j = 0; j < H; ++j) out->bh[j] = static_cast<C>(w[H + H * H + j]);
  for (int j = 0; j < H; ++j) out->a[j] = static_cast<C>(w[2 * H + H * H + j]);
  for (int j = 0; j < H; ++j) out->b[j] = static_cast<C>(w[3 * H + H * H + j]);
  out->b_out = static_cast<C>(w[4 * H + H * H]);
}

// One work item: kBlock (kI8Block for an 8-bit hidden state; fewer at a tensor's end)
// coordinates of one tensor.
struct Item {
  int64_t tensor;
  int64_t start;
  int64_t len;
};

// The rms input norm's constants (rule.RMS_BETA, RMS_EPS), as the caller passes them.
struct Norm {
  double beta, one_minus_beta, eps;
};

// One tensor of the call.
struct Job {
  void* param;
  const void* grad;
  void* hidden;
  void* squares;  // the rms input norm's running means v and c, in the compute dtype (fp64 for
  void* ones;     // fp64 parameters, else fp32), updated in place; nullptr: no input norm
  bool squares_bf16 = false;  // v in bf16 (fp32 compute), rounded stochastically with
  uint32_t squares_key = 0;   // rounding.squares_key(rounding_key)
  const Norm* norm;
  bool ones_per_tensor;  // c is one value for the tensor (else one per coordinate)
  double rms_scale;      // per-tensor c: 1 / sqrt(c) of this step, in the compute dtype
  float* scratch;  // bf16 / fp16 parameters: the zeroed fp32 buffer of u; else nullptr
  int32_t pk, gk, hk;  // dtype codes of param, grad, hidden state
  int64_t n;
  double lr;
  uint32_t rounding_key = 0;  // a bf16 or 8-bit hidden state's stochastic rounding
  bool stochastic = false;    // (rounding.py), when the caller gives keys; else bf16 rounds to
                              // nearest even (an 8-bit state needs a key)
  float* hidden_scale = nullptr;  // an 8-bit hidden state's scales, (H, blocks of kI8Block)
  // Schedule-Free averaging (rule.averaged_step): param holds the base sequence z, avg_y the
  // parameter y (same dtype, fp32 or fp64), moved as y' = y + c (z - y) + k (z' - z) (avg = c, k)
  void* avg_y = nullptr;
  double avg[2] = {0.0, 0.0};
};

}  // namespace l2l

// ------------------------------------------------------------------------------------------------
// the per-instruction-set copies

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define L2L_MULTI_ISA 1
// Both vector copies run pass 1's default loop (fp32 compute, H = 10) in intrinsics
// (simple_cpu_simd.h): GCC's vectorisation of the portable loop measured slower on AVX-512
// (sixteen lanes; benchmarks/avx512_check.sh, BENCHMARKS.md) and on AVX2 (eight lanes).
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4", "prefer-vector-width=512")
#define L2L_FAST_ROUND 1
#define L2L_FMA 1
#define L2L_SIMD_BACKEND 2
namespace l2l {
namespace avx512 {
#include "simple_cpu_isa.h"
}  // namespace avx512
}  // namespace l2l
#undef L2L_FAST_ROUND
#undef L2L_FMA
#undef L2L_SIMD_BACKEND
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define L2L_FAST_ROUND 1
#define L2L_FMA 1
#define L2L_SIMD_BACKEND 1
namespace l2l {
namespace avx2 {
#include "simple_cpu_isa.h"
}  // namespace avx2
}  // namespace l2l
#undef L2L_FAST_ROUND
#undef L2L_FMA
#undef L2L_SIMD_BACKEND
#pragma GCC pop_options

#define L2L_FAST_ROUND 0
#else
#define L2L_MULTI_ISA 0
#if !defined(__x86_64__) || defined(__SSE4_1__)
#define L2L_FAST_ROUND 1
#else
#define L2L_FAST_ROUND 0
#endif
#endif
#define L2L_SIMD_BACKEND 0
// a * b + c contracts to one fused multiply-add where the target has one (-ffp-contract=fast)
#if defined(__FMA__) || defined(__aarch64__) || defined(__ARM_FEATURE_FMA)
#define L2L_FMA 1
#else
#define L2L_FMA 0
#endif
namespace l2l {
namespace baseline {
#include "simple_cpu_isa.h"
}  // namespace baseline
}  // namespace l2l
#undef L2L_FAST_ROUND
#undef L2L_FMA
#undef L2L_SIMD_BACKEND

namespace l2l {

// What one instruction-set copy provides.
struct Kernels {
  const char* name;
  double (*pass1)(const Job&, const Item&, const Weights<float>&, const Weights<double>&, float*);
  void (*pass2)(const Job&, const Item&, double);
  bool (*nonfinite)(int, const void*, int64_t, int64_t);
  void (*tanh)(int, const void*, void*, int64_t, int64_t);
  void (*rms_prepare)(Job&);
};

#if L2L_MULTI_ISA
const Kernels kAvx512 = {"avx512", avx512::pass1_item, avx512::pass2_item,
                         avx512::nonfinite_range, avx512::tanh_range, avx512::rms_prepare};
const Kernels kAvx2 = {"avx2", avx2::pass1_item, avx2::pass2_item, avx2::nonfinite_range,
                       avx2::tanh_range, avx2::rms_prepare};
#endif
const Kernels kBaseline = {"baseline", baseline::pass1_item, baseline::pass2_item,
                           baseline::nonfinite_range, baseline::tanh_range,
                           baseline::rms_prepare};

bool supported(const Kernels* k) {
#if L2L_MULTI_ISA
  __builtin_cpu_init();
  // the micro-architecture levels the copies are compiled for, each a set of features
  if (k == &kAvx512) return __builtin_cpu_supports("x86-64-v4");
  if (k == &kAvx2) return __builtin_cpu_supports("x86-64-v3");
#endif
  return k == &kBaseline;
}

// every copy, best first
const Kernels* const kAll[] = {
#if L2L_MULTI_ISA
    &kAvx512, &kAvx2,
#endif
    &kBaseline};

const Kernels* best() {
  for (const Kernels* k : kAll)
    if (supported(k)) return k;
  return &kBaseline;
}

const Kernels* g_kernels = nullptr;  // set when the library loads (l2l_init), or by l2l_select_isa

__attribute__((constructor)) void l2l_init() { g_kernels = best(); }

}  // namespace l2l

// The OpenMP runtime the process already runs (torch's libgomp.so.1, which torch loads into
// the global scope), called through its GOMP entry points rather than linked: the library
// needs nothing beyond the C library (a wheel auditwheel accepts as manylinux), and torch's
// thread pool serves both. Weak references, resolved when the library loads; where no runtime
// is in the global scope they stay null and work items run serially (the same bits: results
// do not depend on the thread count). LLVM's and Intel's runtimes export these entry points too.
extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags)
    __attribute__((weak));
int omp_in_parallel() __attribute__((weak));
int omp_get_thread_num() __attribute__((weak));
}

namespace l2l {

// Subnormal numbers flushed to zero (x86's FTZ and DAZ) while a work item runs, the caller's
// mode restored after it. A hidden unit whose coordinate keeps a zero gradient (a dead ReLU's
// weights, an always-zero input) decays geometrically toward zero and passes through the
// subnormal range, where each x86 operation takes a microcode assist (measured: a 4M-parameter
// step 2-6x slower for several steps). Flushing changes values below 2^-126 only.
struct FlushSubnormals {
#if defined(__x86_64__)
  unsigned saved;
  FlushSubnormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

bool have_omp() {
  return &GOMP_parallel != nullptr && &omp_in_parallel != nullptr &&
         &omp_get_thread_num != nullptr;
}

// Run fn(i, slot) for i in [0, n): dynamically scheduled (one item at a time, as
// schedule(dynamic, 1)) over nt threads of the OpenMP runtime, serially for one thread or inside a
// parallel region. slot < nt is the running thread's index (0 when serial), for per-thread buffers.
template <typename F>
void for_items(int64_t n, int nt, const F& fn) {
  if (n <= 0) return;
  if (nt > n) nt = static_cast<int>(n);
  if (nt > 1 && have_omp() && !omp_in_parallel()) {
    struct Work {
      const F* fn;
      int64_t n;
      std::atomic<int64_t> next;
    } work{&fn, n, {0}};
    GOMP_parallel(
        [](void* p) {
          auto* w = static_cast<Work*>(p);
          const int slot = omp_get_thread_num();
          for (int64_t i; (i = w->next.fetch_add(1, std::memory_order_relaxed)) < w->n;)
            (*w->fn)(i, slot);
        },
        &work, static_cast<unsigned>(nt), 0);
    return;
  }
  for (int64_t i = 0; i < n; ++i) fn(i, 0);
}

// The hidden size of a packed weight vector (its length is 4H + H^2 + 1), or -1.
int hidden_size(int64_t wn) {
  int H = 0;
  while (4 * H + H * H + 1 < wn) ++H;
  if (4 * H + H * H + 1 != wn || H < 1 || H > kMaxH) return -1;
  return H;
}

bool valid_param_dtype(int32_t d) { return d == kF32 || d == kF64 || d == kBF16 || d == kF16; }
bool valid_hidden_dtype(int32_t d) { return d == kF32 || d == kF64 || d == kBF16 || d == kI8; }

// One call's tensors cut into blocks, with the weights unpacked in both compute precisions.
struct Step {
  int H = 0;
  const double* wp = nullptr;
  Weights<float> w32;
  Weights<double> w64;
  Job* jobs = nullptr;
  Item* items = nullptr;
  int64_t T = 0, n_items = 0;
  int64_t N = 0;  // coordinates in the call

  ~Step() {
    std::free(jobs);
    std::free(items);
  }

  // The weights, the jobs (dtype codes checked) and their blocks; kOk or an error code.
  // hk: the hidden states' dtype codes (pass 1, checked by the caller: 8-bit ones are cut into
  // blocks of kI8Block), or nullptr (pass 2, which reads no hidden state).
  int init(int64_t n_tensors, void* const* params, const int32_t* pk, const int64_t* numels,
           const double* lrs, float* const* scratch, const double* weights, int64_t n_weights,
           const int32_t* hk = nullptr) {
    if (n_tensors < 0) return kBadArgument;
    H = hidden_size(n_weights);
    if (H < 0 || weights == nullptr) return kBadWeights;
    wp = weights;
    unpack<float>(wp, H, &w32);
    unpack<double>(wp, H, &w64);
    T = n_tensors;
    if (T == 0) return kOk;
    // coordinates per work item of tensor t
    const auto width = [hk](int64_t t) {
      return (hk != nullptr && hk[t] == kI8) ? kI8Block : kBlock;
    };
    jobs = static_cast<Job*>(std::calloc(static_cast<size_t>(T), sizeof(Job)));
    if (jobs == nullptr) return kNoMemory;
    for (int64_t t = 0; t < T; ++t) {
      if (!valid_param_dtype(pk[t]) || numels[t] < 0) return kBadDtype;
      Job& job = jobs[t];
      job.param = params[t];
      job.pk = pk[t];
      job.n = numels[t];
      job.lr = lrs[t];
      job.scratch = (job.pk == kBF16 || job.pk == kF16) ? scratch[t] : nullptr;
      if (job.n > 0 && (job.param == nullptr || ((job.pk == kBF16 || job.pk == kF16) &&
                                                 job.scratch == nullptr)))
        return kBadArgument;
      n_items += (job.n + width(t) - 1) / width(t);
      N += job.n;
    }
    items = static_cast<Item*>(std::malloc(static_cast<size_t>(std::max<int64_t>(n_items, 1)) *
                                           sizeof(Item)));
    if (items == nullptr) return kNoMemory;
    int64_t i = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t s = 0; s < jobs[t].n; s += width(t))
        items[i++] = Item{t, s, std::min(width(t), jobs[t].n - s)};
    return kOk;
  }

  // Pass 2 changes theta unless the aggregate weights are all zero (then the shared scalar is
  // exactly 0) and no parameter waits in a scratch buffer.
  bool needs_pass2() const {
    bool all_zero_b = true;
    for (int j = 0; j < H; ++j) all_zero_b = all_zero_b && (wp[3 * H + H * H + j] == 0.0);
    bool any_scratch = false;
    for (int64_t t = 0; t < T; ++t) any_scratch = any_scratch || jobs[t].scratch != nullptr;
    return !(all_zero_b && !any_scratch);
  }

  // Schedule-Free averaging: per tensor the parameter y (NULL: none) and 2 coefficients;
  // kOk or an error code (y needs an fp32 / fp64 parameter, which has no scratch buffer).
  int set_averaging(void* const* averaged, const double* coeffs) {
    if (averaged == nullptr) return kOk;
    if (coeffs == nullptr) return kBadArgument;
    for (int64_t t = 0; t < T; ++t) {
      if (averaged[t] == nullptr) {
        if (jobs[t].n > 0) return kBadArgument;
        continue;
      }
      if (jobs[t].pk != kF32 && jobs[t].pk != kF64) return kBadDtype;
      jobs[t].avg_y = averaged[t];
      for (int j = 0; j < 2; ++j) jobs[t].avg[j] = coeffs[2 * t + j];
    }
    return kOk;
  }

  void pass2(double shared, int nt) const {
    const Kernels* k = g_kernels;
    for_items(n_items, nt,
              [&](int64_t i, int) {
                const FlushSubnormals ftz;
                k->pass2(jobs[items[i].tensor], items[i], shared);
              });
  }
};

}  // namespace l2l

using namespace l2l;

// ------------------------------------------------------------------------------------------------
// the C ABI (argument order and meaning mirrored in cpu.py)

L2L_API int l2l_abi_version(void) { return 6; }

// the hash of the sources and flags this library was built from; _build.py finds it in the
// file by its prefix, so a loader can tell a stale library without loading it
static const char kSourceHash[] = "l2l-source-hash:" L2L_SOURCE_HASH;
L2L_API const char* l2l_source_hash(void) { return kSourceHash + 16; }

L2L_API int64_t l2l_block_size(void) { return kBlock; }

// coordinates per scale of an 8-bit hidden state
L2L_API int64_t l2l_int8_block_size(void) { return kI8Block; }

// the instruction set in use
L2L_API const char* l2l_isa(void) { return g_kernels->name; }

// the instruction sets this CPU runs, best first, comma-separated
L2L_API const char* l2l_supported_isas(void) {
  static char buf[64];
  buf[0] = '\0';
  for (const Kernels* k : kAll) {
    if (!supported(k)) continue;
    if (buf[0] != '\0') std::strcat(buf, ",");
    std::strcat(buf, k->name);
  }
  return buf;
}

// Use the copy named `name` ("avx512", "avx2", "baseline"), or the best one for NULL / "".
// Returns 0, or -1 (unknown or not supported by this CPU; nothing changes). Not thread-safe
// with respect to a running step: call it between steps.
L2L_API int l2l_select_isa(const char* name) {
  if (name == nullptr || name[0] == '\0') {
    g_kernels = best();
    return 0;
  }
  for (const Kernels* k : kAll) {
    if (std::strcmp(k->name, name) == 0 && supported(k)) {
      g_kernels = k;
      return 0;
    }
  }
  return -1;
}

// Pass 1 over n_tensors tensors; with sums == NULL the whole step (pass 1, the block-order
// reduction, pass 2 with S / N), else pass 1 only with sums[t] = the sum of w_b . h' over tensor
// t's coordinates (its blocks' partial sums added in block order, in double).
//
//   params, grads, hiddens: data pointers (numels[t] elements; hiddens (H, numels[t]))
//   param_dtypes, grad_dtypes, hidden_dtypes: dtype codes (params and grads: any of the four;
//       hidden states: kF32, kF64, kBF16, or kI8 for a parameter that is not fp64)
//   hidden_scales: NULL when no hidden state is kI8, else per tensor the fp32 scales of its 8-bit
//       hidden state, (H, ceil(numels[t] / kI8Block)) (ignored for the others)
//   rounding_keys: NULL (bf16 hidden states round to nearest even; none may be kI8), or per
//       tensor the key of its bf16 or 8-bit hidden state's stochastic rounding (rounding.py);
//       ignored for other hidden dtypes
//   squares, squares_dtypes, ones, ones_numels, norm: NULL, or the rms input norm: per tensor
//       the running means v (numels[t] elements) and c, in the compute dtype (fp64 for fp64
//       parameters, else fp32; v may be kBF16 for fp32 compute, which needs rounding_keys: it
//       rounds stochastically with the bits of rounding.round_squares_bf16), updated in place;
//       squares_dtypes: NULL (every v in the compute dtype) or v's dtype codes; c's element
//       count, 1 (one bias correction for the tensor, advanced by every step that is not
//       skipped, an empty tensor's too) or numels[t] (one per coordinate), in ones_numels
//       (NULL: numels); norm = {beta, 1 - beta, eps}
//   lrs: one learning rate per tensor
//   scratch: per tensor, for bf16 / fp16 parameters a zeroed fp32 buffer of numels[t] elements
//       (pass 2 reads it back), ignored for the others; may be NULL when there are none
//   averaged, averaging: NULL, or Schedule-Free averaging (rule.averaged_step): params hold the
//       base sequences z, averaged[t] the parameter y (numels[t] elements of the same dtype,
//       fp32 or fp64; NULL for a tensor without), averaging[2t..2t+1] = c, k with
//       y' = y + c (z - y) + k (z' - z) (z' the moved z)
//   weights: the packed fp64 weights (see unpack), n_weights = 4H + H^2 + 1
//   skip: NULL, or one byte; nonzero: change nothing (sums stay zero)
//   n_threads: the number of threads to use (torch.get_num_threads())
// Returns 0 or a negative error code (nothing written for a bad weight vector or dtype code).
L2L_API int l2l_simple_pass1(int64_t n_tensors, void* const* params, const int32_t* param_dtypes,
                             const void* const* grads, const int32_t* grad_dtypes,
                             void* const* hiddens, const int32_t* hidden_dtypes,
                             void* const* hidden_scales, const uint32_t* rounding_keys,
                             void* const* squares, const int32_t* squares_dtypes,
                             void* const* ones,
                             const int64_t* ones_numels, const double* norm, const int64_t* numels, const double* lrs, float* const* scratch,
                             void* const* averaged, const double* averaging,
                             const double* weights, int64_t n_weights, const uint8_t* skip,
                             double* sums, int n_threads) {
  if (sums != nullptr)
    for (int64_t t = 0; t < n_tensors; ++t) sums[t] = 0.0;
  if (skip != nullptr && *skip) return kOk;
  for (int64_t t = 0; t < n_tensors; ++t)
    if (!valid_param_dtype(grad_dtypes[t]) || !valid_hidden_dtype(hidden_dtypes[t]) ||
        (hidden_dtypes[t] == kI8 && param_dtypes[t] == kF64))
      return kBadDtype;
  Step step;
  int rc = step.init(n_tensors, params, param_dtypes, numels, lrs, scratch, weights, n_weights,
                     hidden_dtypes);
  if (rc != kOk) return rc;
  rc = step.set_averaging(averaged, averaging);
  if (rc != kOk) return rc;
  if ((squares == nullptr) != (ones == nullptr) || (squares == nullptr) != (norm == nullptr))
    return kBadArgument;
  bool any_int8 = false;
  const Norm nm = norm == nullptr ? Norm{0.0, 0.0, 0.0} : Norm{norm[0], norm[1], norm[2]};
  for (int64_t t = 0; t < n_tensors; ++t) {
    Job& job = step.jobs[t];
    job.grad = grads[t];
    job.hidden = hiddens[t];
    job.gk = grad_dtypes[t];
    job.hk = hidden_dtypes[t];
    if (rounding_keys != nullptr) {
      job.rounding_key = rounding_keys[t];
      job.stochastic = true;
    }
    if (job.n > 0 && (job.grad == nullptr || job.hidden == nullptr)) return kBadArgument;
    if (job.hk == kI8) {
      if (hidden_scales == nullptr || rounding_keys == nullptr) return kBadArgument;
      job.hidden_scale = static_cast<float*>(hidden_scales[t]);
      if (job.n > 0 && job.hidden_scale == nullptr) return kBadArgument;
      any_int8 = any_int8 || job.n > 0;
    }
    if (norm != nullptr) {
      job.squares = squares[t];
      job.ones = ones[t];
      const int32_t compute = job.pk == kF64 ? kF64 : kF32;
      const int32_t vk = squares_dtypes == nullptr ? compute : squares_dtypes[t];
      if (vk != compute && !(vk == kBF16 && compute == kF32)) return kBadDtype;
      if (vk == kBF16) {
        if (rounding_keys == nullptr) return kBadArgument;
        job.squares_bf16 = true;
        job.squares_key = squares_key(rounding_keys[t]);
      }
      job.norm = &nm;
      const int64_t n_ones = ones_numels == nullptr ? job.n : ones_numels[t];
      if (n_ones != 1 && n_ones != job.n) return kBadArgument;
      job.ones_per_tensor = n_ones == 1;
      if ((job.n > 0 && job.squares == nullptr) || (n_ones > 0 && job.ones == nullptr))
        return kBadArgument;
    }
  }
  double* partial = nullptr;
  float* work = nullptr;  // 8-bit hidden states: a float32 block buffer per thread
  const int slots = std::max(n_threads, 1);
  const size_t slot_floats = static_cast<size_t>(step.H) * kI8Stride;
  if (step.N > 0) {
    partial = static_cast<double*>(std::malloc(static_cast<size_t>(step.n_items) * sizeof(double)));
    if (any_int8)
      work = static_cast<float*>(std::malloc(static_cast<size_t>(slots) * slot_floats * sizeof(float)));
    if (partial == nullptr || (any_int8 && work == nullptr)) {
      std::free(partial);
      std::free(work);
      return kNoMemory;
    }
  }
  const Kernels* k = g_kernels;
  // every check has passed: each per-tensor bias correction takes its step, once
  for (int64_t t = 0; t < n_tensors && norm != nullptr; ++t)
    if (step.jobs[t].ones_per_tensor) k->rms_prepare(step.jobs[t]);
  if (step.N == 0) return kOk;
  for_items(step.n_items, slots, [&](int64_t i, int slot) {
    const FlushSubnormals ftz;
    const Item& it = step.items[i];
    partial[i] = k->pass1(step.jobs[it.tensor], it, step.w32, step.w64,
                          work == nullptr ? nullptr : work + static_cast<size_t>(slot) * slot_floats);
  });
  std::free(work);
  if (sums != nullptr) {
    for (int64_t i = 0; i < step.n_items; ++i) sums[step.items[i].tensor] += partial[i];
    std::free(partial);
    return kOk;
  }
  // deterministic reduction, then the shared scalar
  double S = 0.0;
  for (int64_t i = 0; i < step.n_items; ++i) S += partial[i];
  std::free(partial);
  const double shared = S / static_cast<double>(step.N);
  if (step.needs_pass2()) step.pass2(shared, n_threads);  // else shared is exactly 0
  return kOk;
}

// Pass 2 after l2l_simple_pass1 with sums: theta += lr * shared (bf16 / fp16 parameters:
// theta = round(theta + lr * (scratch + shared)); with averaging also y += a3 lr shared). The
// arguments mean what they mean there.
L2L_API int l2l_simple_pass2(int64_t n_tensors, void* const* params, const int32_t* param_dtypes,
                             const int64_t* numels, const double* lrs, float* const* scratch,
                             void* const* averaged, const double* averaging,
                             const double* weights, int64_t n_weights, double shared,
                             const uint8_t* skip, int n_threads) {
  if (skip != nullptr && *skip) return kOk;
  Step step;
  int rc = step.init(n_tensors, params, param_dtypes, numels, lrs, scratch, weights, n_weights);
  if (rc != kOk) return rc;
  rc = step.set_averaging(averaged, averaging);
  if (rc != kOk) return rc;
  if (step.N == 0 || !step.needs_pass2()) return kOk;
  step.pass2(shared, n_threads);
  return kOk;
}

// The smallest t whose tensor holds a NaN or an infinity, -1 when every value is finite, or a
// negative error code below -1 (kBadDtype - 1 for a bad dtype code). Reads every element (no
// early exit: a step with a non-finite gradient is the rare case).
L2L_API int64_t l2l_first_nonfinite(int64_t n_tensors, const void* const* data,
                                    const int32_t* dtypes, const int64_t* numels, int n_threads) {
  int64_t n_items = 0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    if (!valid_param_dtype(dtypes[t]) || numels[t] < 0) return kBadDtype - 1;
    if (numels[t] > 0 && data[t] == nullptr) return kBadArgument - 1;
    n_items += (numels[t] + kScanBlock - 1) / kScanBlock;
  }
  if (n_items == 0) return -1;
  Item* items = static_cast<Item*>(std::malloc(static_cast<size_t>(n_items) * sizeof(Item)));
  uint8_t* bad = static_cast<uint8_t*>(std::calloc(static_cast<size_t>(n_items), 1));
  if (items == nullptr || bad == nullptr) {
    std::free(items);
    std::free(bad);
    return kNoMemory - 1;
  }
  int64_t i = 0;
  for (int64_t t = 0; t < n_tensors; ++t)
    for (int64_t s = 0; s < numels[t]; s += kScanBlock)
      items[i++] = Item{t, s, std::min(kScanBlock, numels[t] - s)};
  const Kernels* k = g_kernels;
  for_items(n_items, n_threads, [&](int64_t j, int) {
    const Item& it = items[j];
    bad[j] = k->nonfinite(dtypes[it.tensor], data[it.tensor], it.start, it.len) ? 1 : 0;
  });
  int64_t first = -1;
  for (int64_t j = 0; j < n_items && first < 0; ++j)
    if (bad[j]) first = items[j].tensor;
  std::free(items);
  std::free(bad);
  return first;
}

// out = the kernels' tanh of x, n elements of dtype kF32 or kF64 (for the accuracy tests).
L2L_API int l2l_tanh(int32_t dtype, const void* x, void* out, int64_t n, int n_threads) {
  if (dtype != kF32 && dtype != kF64) return kBadDtype;
  const Kernels* k = g_kernels;
  for_items((n + kScanBlock - 1) / kScanBlock, n_threads, [&](int64_t j, int) {
    const int64_t s = j * kScanBlock;
    k->tanh(dtype, x, out, s, std::min(kScanBlock, n - s));
  });
  return kOk;
}
