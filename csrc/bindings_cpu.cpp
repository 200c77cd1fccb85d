// pybind11 bindings of the CPU kernels: `appo_kernels._C`. Arguments are raw addresses and sizes; the Python
// side (appo_kernels/backends/native.py) allocates every tensor, checks dtypes and layouts, and keeps the
// tensors alive for the duration of the call. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cpu/appo_cpu.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "appo_kernels native CPU kernels (C++17 + OpenMP); called through appo_kernels.backends.native";

  m.def("token_stats_fwd",
        [](uintptr_t logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row, uintptr_t tokens,
           int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk, uintptr_t logp, uintptr_t entropy,
           uintptr_t lse, uintptr_t topk_ids, uintptr_t topk_logp, uintptr_t topk_set, uintptr_t c, int threads) {
          py::gil_scoped_release release;
          appo::token_stats_fwd(ptr<const void>(logits), dtype, n, vocab, stride_row, ptr<const int64_t>(tokens),
                                ignore_index, inv_temperature, topk, entropy_topk, ptr<float>(logp),
                                ptr<float>(entropy), ptr<float>(lse), ptr<int64_t>(topk_ids), ptr<float>(topk_logp),
                                ptr<int64_t>(topk_set), ptr<float>(c), threads);
        });

  m.def("token_stats_bwd",
        [](uintptr_t logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row, uintptr_t tokens,
           int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk, uintptr_t lse, uintptr_t entropy,
           uintptr_t topk_set, uintptr_t c, uintptr_t g_logp, uintptr_t g_entropy, uintptr_t grad, int threads) {
          py::gil_scoped_release release;
          appo::token_stats_bwd(ptr<const void>(logits), dtype, n, vocab, stride_row, ptr<const int64_t>(tokens),
                                ignore_index, inv_temperature, topk, entropy_topk, ptr<const float>(lse),
                                ptr<const float>(entropy), ptr<const int64_t>(topk_set), ptr<const float>(c),
                                ptr<const float>(g_logp), ptr<const float>(g_entropy), ptr<void>(grad), threads);
        });

  m.def("reverse_scan",
        [](uintptr_t x, uintptr_t cu, int64_t num_segments, int64_t n, double gamma, uintptr_t out, bool f64,
           int threads) {
          py::gil_scoped_release release;
          if (f64) appo::reverse_scan(ptr<const double>(x), ptr<const int64_t>(cu), num_segments, n, gamma,
                                      ptr<double>(out), threads);
          else appo::reverse_scan(ptr<const float>(x), ptr<const int64_t>(cu), num_segments, n, gamma,
                                  ptr<float>(out), threads);
        });

  m.def("branching_score",
        [](uintptr_t entropy, uintptr_t omega, uintptr_t eligible, uintptr_t cu, int64_t num_segments,
           int64_t n, uintptr_t score, uintptr_t candidate, bool f64, int threads) {
          py::gil_scoped_release release;
          if (f64) appo::branching_score(ptr<const double>(entropy), ptr<const double>(omega),
                                         ptr<const bool>(eligible), ptr<const int64_t>(cu), num_segments, n,
                                         ptr<double>(score), ptr<bool>(candidate), threads);
          else appo::branching_score(ptr<const float>(entropy), ptr<const float>(omega), ptr<const bool>(eligible),
                                     ptr<const int64_t>(cu), num_segments, n, ptr<float>(score),
                                     ptr<bool>(candidate), threads);
        });
}
