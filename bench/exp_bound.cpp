// The exp bound of the native CPU forward: the kernels' own exp (appo::vexp, csrc/cpu/numerics.h) over a block
// that stays in L1, on `threads` OpenMP threads, `n` exps in all: what one exp per logit costs with no memory
// traffic. Built by bench/run.py with the native extension's flags (setup.py) and called through ctypes.
#include <cstdint>

#include "cpu/numerics.h"

extern "C" double appo_bench_vexp(const float* x, int64_t block, int64_t n, int threads) {
  const int64_t passes = (n + block - 1) / block;
  double total = 0.0;  // returned, so that the work cannot be elided
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : total)
  for (int64_t p = 0; p < passes; ++p) {
    const float shift = float(p & 1023) * 1e-3f;  // another input on every pass
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = 0; i < block; ++i) acc += appo::vexp(x[i] - shift);
    total += acc;
  }
  return total;
}
