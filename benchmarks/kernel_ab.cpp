// A/B timing of two or more builds of the fused CPU kernel's library, in one process.
//
// On a shared machine, separate runs of a benchmark spread by 10-40% (other tenants' load
// comes and goes over seconds), which hides a change worth 5%. This program loads every build
// given and calls their pass 1 (l2l_simple_pass1: the rms norm, the recurrence, the tanh and the
// update) in alternation on the same data, rotating which build goes first each round; the
// ratio of each build's time to the first's in the same round, its median over the rounds, is
// what to quote (a burst of load that hits one call moves a mean, not the median). Two copies of one build agree to 1-2% (an A/A run says how far to trust it).
// Before timing, each build takes three steps from the same state, and the tool says whether
// the parameters, hidden state and running means it leaves have the first build's bits (a
// hash of them): a faster build that computes something else shows up there.
//
// Build the variants with the package's flags (kernels/_build.py: FLAGS), e.g.
//   g++ -O3 -std=c++17 -fPIC -shared -fopenmp -ffp-contract=fast -fno-trapping-math
//       -fno-math-errno -fno-tree-loop-distribute-patterns -fvisibility=hidden
//       src/l2l_optim/kernels/simple_cpu.cpp -o /tmp/a.so
// and this program with
//   g++ -O2 -fopenmp benchmarks/kernel_ab.cpp -o /tmp/kernel_ab -ldl
// (-fopenmp links libgomp: the library takes its threads from the process's OpenMP runtime,
// as it takes torch's in a torch process, and runs one thread where there is none)
// Usage:
//   /tmp/kernel_ab N ROUNDS THREADS STATE ISA LIB [LIB ...]
//     N coordinates in one tensor (10000000: memory-bound; 65536: in cache), STATE float32 or
//     bfloat16 (the hidden state), ISA avx512, avx2 or baseline.
// The data: fp32 parameters, gradients of magnitude 1e-3, the rms input norm on with one bias
// correction c for the tensor (L2L_AB_C=coordinate: one per coordinate, L2L_AB_C=none: no
// input norm; L2L_AB_AVERAGING=1: with Schedule-Free averaging, a second parameter copy y),
// random weights (the time does not depend on their values). The timed call is
// pass 1 alone, without the aggregate's pass 2 and without Python.
#include <dlfcn.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// l2l_simple_pass1 of the library's C ABI, version 6 (kernels/simple_cpu.cpp)
constexpr int kAbi = 6;
typedef int (*Pass1)(int64_t n_tensors, void* const* params, const int32_t* param_dtypes,
                     const void* const* grads, const int32_t* grad_dtypes, void* const* hiddens,
                     const int32_t* hidden_dtypes, void* const* hidden_scales,
                     const uint32_t* rounding_keys,
                     void* const* squares, const int32_t* squares_dtypes, void* const* ones,
                     const int64_t* ones_numels, const double* norm, const int64_t* numels,
                     const double* lrs, float* const* scratch, void* const* averaged,
                     const double* averaging, const double* weights, int64_t n_weights,
                     const uint8_t* skip, double* sums, int n_threads);
typedef int (*IntFn)(void);
typedef int (*SelectIsa)(const char*);

int main(int argc, char** argv) {
  if (argc < 7) {
    std::fprintf(stderr, "usage: %s N ROUNDS THREADS float32|bfloat16 ISA LIB [LIB ...]\n", argv[0]);
    return 2;
  }
  const int64_t n = std::atoll(argv[1]);
  const int rounds = std::atoi(argv[2]);
  const int threads = std::atoi(argv[3]);
  const bool bf16 = std::strcmp(argv[4], "bfloat16") == 0;
  const char* isa = argv[5];
  const int n_libs = argc - 6;
  if (n <= 0 || rounds <= 0 || threads <= 0 || (!bf16 && std::strcmp(argv[4], "float32") != 0)) {
    std::fprintf(stderr, "bad arguments\n");
    return 2;
  }
  if (threads > omp_get_num_procs()) {
    std::fprintf(stderr, "%d threads asked for, %d processors\n", threads, omp_get_num_procs());
    return 2;
  }
  std::vector<Pass1> pass1(n_libs);
  for (int i = 0; i < n_libs; ++i) {
    // RTLD_LOCAL: each build keeps its own symbols (give each build its own file name: the
    // loader returns the same handle for one path twice)
    void* lib = dlopen(argv[6 + i], RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      std::fprintf(stderr, "%s\n", dlerror());
      return 1;
    }
    auto abi = reinterpret_cast<IntFn>(dlsym(lib, "l2l_abi_version"));
    if (abi == nullptr || abi() != kAbi) {
      std::fprintf(stderr, "%s: not C ABI version %d\n", argv[6 + i], kAbi);
      return 1;
    }
    if (reinterpret_cast<SelectIsa>(dlsym(lib, "l2l_select_isa"))(isa) != 0) {
      std::fprintf(stderr, "%s: this CPU does not run %s\n", argv[6 + i], isa);
      return 1;
    }
    pass1[i] = reinterpret_cast<Pass1>(dlsym(lib, "l2l_simple_pass1"));
  }

  const char* layout = std::getenv("L2L_AB_C");
  const bool rms = layout == nullptr || std::strcmp(layout, "none") != 0;
  const bool c_per_coordinate = layout != nullptr && std::strcmp(layout, "coordinate") == 0;
  const int H = 10;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> param(n), grad(n), v(n, 0.f), c(c_per_coordinate ? n : 1, 0.f);
  std::vector<float> h32(bf16 ? 1 : H * n, 0.f);
  std::vector<uint16_t> h16(bf16 ? H * n : 1, 0);
  for (auto& x : param) x = normal(rng);
  for (auto& x : grad) x = normal(rng) * 1e-3f;
  std::vector<double> weights(4 * H + H * H + 1);  // the packed layout: only its length matters
  for (auto& x : weights) x = normal(rng) * 0.3;

  void* params[1] = {param.data()};
  const void* grads[1] = {grad.data()};
  void* hiddens[1] = {bf16 ? static_cast<void*>(h16.data()) : static_cast<void*>(h32.data())};
  void* squares[1] = {v.data()};
  void* ones[1] = {c.data()};
  const int32_t f32_code[1] = {0}, hidden_code[1] = {bf16 ? 2 : 0};
  const int64_t numels[1] = {n}, ones_numels[1] = {c_per_coordinate ? n : 1};
  const double lrs[1] = {1e-3};
  // bf16 state rounds stochastically, as SimpleOptimizer passes keys (L2L_AB_ROUNDING=nearest:
  // to nearest even)
  const char* rounding = std::getenv("L2L_AB_ROUNDING");
  const bool stochastic = rounding == nullptr || std::strcmp(rounding, "nearest") != 0;
  const uint32_t keys[1] = {0x2545F491u};
  const double norm[3] = {0.999, 1 - 0.999, 1e-12};
  // Schedule-Free averaging around the step (L2L_AB_AVERAGING=1): the parameter y beside z
  const char* averaging = std::getenv("L2L_AB_AVERAGING");
  const bool avg = averaging != nullptr && std::strcmp(averaging, "1") == 0;
  std::vector<float> y(avg ? n : 1);
  for (auto& x : y) x = normal(rng);
  void* averaged[1] = {y.data()};
  const double coefs[2] = {0.01, 0.9};

  // one call of build i's pass 1 on the data above; false (after a message) on an error
  auto run = [&](int i) {
    const int rc = pass1[i](1, params, f32_code, grads, f32_code, hiddens, hidden_code, nullptr,
                            stochastic ? keys : nullptr, rms ? squares : nullptr, nullptr,
                            rms ? ones : nullptr, rms ? ones_numels : nullptr, rms ? norm : nullptr,
                            numels, lrs, nullptr, avg ? averaged : nullptr, avg ? coefs : nullptr,
                            weights.data(),
                            static_cast<int64_t>(weights.size()), nullptr, nullptr, threads);
    if (rc != 0) std::fprintf(stderr, "%s: error %d\n", argv[6 + i], rc);
    return rc == 0;
  };
  // the starting state (assignment keeps each vector's buffer, so the pointers above hold)
  const std::vector<float> param0 = param, v0 = v, c0 = c, h32_0 = h32, y0 = y;
  const std::vector<uint16_t> h16_0 = h16;
  auto restore = [&] { param = param0, v = v0, c = c0, h32 = h32_0, h16 = h16_0, y = y0; };

  // the same three steps from the same state on every build: a hash of what they leave
  std::vector<uint64_t> bits(n_libs);
  for (int i = 0; i < n_libs; ++i) {
    restore();
    for (int step = 0; step < 3; ++step)
      if (!run(i)) return 1;
    uint64_t hash = 1469598103934665603ull;  // FNV-1a over 32-bit words
    auto mix = [&hash](const void* p, size_t bytes) {
      const unsigned char* b = static_cast<const unsigned char*>(p);
      for (size_t k = 0; k + 4 <= bytes; k += 4) {
        uint32_t w;
        std::memcpy(&w, b + k, 4);
        hash = (hash ^ w) * 1099511628211ull;
      }
    };
    mix(param.data(), 4 * param.size());
    mix(v.data(), 4 * v.size());
    mix(c.data(), 4 * c.size());
    mix(y.data(), 4 * y.size());
    if (bf16) mix(h16.data(), 2 * h16.size()); else mix(h32.data(), 4 * h32.size());
    bits[i] = hash;
  }
  restore();

  std::vector<std::vector<double>> ns_per_coord(n_libs);
  for (int r = 0; r <= rounds; ++r) {  // round 0 warms up
    for (int k = 0; k < n_libs; ++k) {
      const int i = (k + r) % n_libs;
      const auto t0 = std::chrono::steady_clock::now();
      const bool ok = run(i);
      const auto t1 = std::chrono::steady_clock::now();
      if (!ok) return 1;
      if (r > 0) ns_per_coord[i].push_back(std::chrono::duration<double>(t1 - t0).count() / n * 1e9);
    }
  }
  std::printf("n=%lld rounds=%d threads=%d state=%s isa=%s c=%s averaging=%s\n",
              static_cast<long long>(n), rounds, threads, argv[4], isa,
              !rms ? "none" : c_per_coordinate ? "per-coordinate" : "per-tensor", avg ? "on" : "off");
  for (int i = 0; i < n_libs; ++i) {
    std::vector<double> sorted = ns_per_coord[i];
    std::sort(sorted.begin(), sorted.end());
    std::vector<double> ratios;
    for (int r = 0; r < rounds; ++r) ratios.push_back(ns_per_coord[i][r] / ns_per_coord[0][r]);
    std::sort(ratios.begin(), ratios.end());
    std::printf("%-40s ns/coord: min %.2f, median %.2f; time / first's, median over rounds: %.3f; "
                "bits: %s\n",
                argv[6 + i], sorted[0], sorted[sorted.size() / 2], ratios[ratios.size() / 2],
                bits[i] == bits[0] ? "the first's" : "DIFFERENT from the first's");
  }
  return 0;
}
