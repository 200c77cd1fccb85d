// pybind11 bindings of the CUDA launchers: `appo_kernels._C_cuda`. Arguments are raw device addresses, sizes
// and the address of the current torch stream; the Python side (appo_kernels/backends/native.py) owns the
// tensors. Launchers only enqueue work (no host sync); a non-zero status becomes a RuntimeError.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/appo_cuda.h"

namespace py = pybind11;

namespace {

template <typename T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

cudaStream_t stream_of(uintptr_t address) { return reinterpret_cast<cudaStream_t>(address); }

void check(int status, const char* what) {
  if (status != 0)
    throw std::runtime_error(std::string("appo_kernels CUDA ") + what + ": " +
                             cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "appo_kernels CUDA kernels; called through appo_kernels.backends.native";

  m.def("token_stats_fwd",
        [](uintptr_t logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row, uintptr_t tokens,
           int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk, uintptr_t logp, uintptr_t entropy,
           uintptr_t lse, uintptr_t topk_ids, uintptr_t topk_logp, uintptr_t topk_set, uintptr_t c, uintptr_t stream) {
          check(appo_token_stats_fwd_cuda(ptr<const void>(logits), dtype, n, vocab, stride_row,
                                          ptr<const int64_t>(tokens), ignore_index, inv_temperature, topk,
                                          entropy_topk, ptr<float>(logp), ptr<float>(entropy), ptr<float>(lse),
                                          ptr<int64_t>(topk_ids), ptr<float>(topk_logp), ptr<int64_t>(topk_set),
                                          ptr<float>(c), stream_of(stream)),
                "token_stats forward");
        });

  m.def("token_stats_bwd",
        [](uintptr_t logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row, uintptr_t tokens,
           int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk, uintptr_t lse, uintptr_t entropy,
           uintptr_t topk_set, uintptr_t c, uintptr_t g_logp, uintptr_t g_entropy, uintptr_t grad, uintptr_t stream) {
          check(appo_token_stats_bwd_cuda(ptr<const void>(logits), dtype, n, vocab, stride_row,
                                          ptr<const int64_t>(tokens), ignore_index, inv_temperature, topk,
                                          entropy_topk, ptr<const float>(lse), ptr<const float>(entropy),
                                          ptr<const int64_t>(topk_set), ptr<const float>(c),
                                          ptr<const float>(g_logp), ptr<const float>(g_entropy), ptr<void>(grad),
                                          stream_of(stream)),
                "token_stats backward");
        });

  // `f64` keeps the argument lists equal to the CPU module's; float64 never reaches the CUDA kernels.
  m.def("reverse_scan", [](uintptr_t x, uintptr_t cu, int64_t num_segments, int64_t n, float gamma, uintptr_t out,
                           bool f64, uintptr_t stream) {
    if (f64) throw std::invalid_argument("appo_kernels CUDA reverse_scan: float64 is not supported");
    check(appo_reverse_scan_cuda(ptr<const float>(x), ptr<const int64_t>(cu), num_segments, n, gamma,
                                 ptr<float>(out), stream_of(stream)),
          "reverse_scan");
  });

  m.def("branching_score", [](uintptr_t entropy, uintptr_t omega, uintptr_t eligible, uintptr_t cu,
                              int64_t num_segments, int64_t n, uintptr_t score, uintptr_t candidate, bool f64,
                              uintptr_t stream) {
    if (f64) throw std::invalid_argument("appo_kernels CUDA branching_score: float64 is not supported");
    check(appo_branching_score_cuda(ptr<const float>(entropy), ptr<const float>(omega), ptr<const bool>(eligible),
                                    ptr<const int64_t>(cu), num_segments, n, ptr<float>(score),
                                    ptr<bool>(candidate), stream_of(stream)),
          "branching_score");
  });
}
