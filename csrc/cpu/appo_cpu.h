// appo_kernels native CPU kernels: plain C++17 + OpenMP, no torch headers.
// Pointers and sizes come from the Python side (appo_kernels/backends/native.py), which owns all tensors.
#pragma once
#include <cstdint>

namespace appo {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Token statistics forward (method §1). logits: n rows of `vocab` contiguous elements, row i at
// logits + i * stride_row. Outputs are float32; topk_ids/topk_logp are [n, topk] (unused when topk == 0);
// topk_set [n, topk + 1] and c [n] are written only when entropy_topk (see backends/_types.py RowStats).
void token_stats_fwd(const void* logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row,
                     const int64_t* tokens, int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk,
                     float* logp, float* entropy, float* lse, int64_t* topk_ids, float* topk_logp,
                     int64_t* topk_set, float* c, int num_threads);

// Token statistics backward: grad [n, vocab] contiguous, same dtype as the logits.
void token_stats_bwd(const void* logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row,
                     const int64_t* tokens, int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk,
                     const float* lse, const float* entropy, const int64_t* topk_set, const float* c,
                     const float* g_logp, const float* g_entropy, void* grad, int num_threads);

// out[t] = sum_{k >= t in t's segment} gamma^(k - t) * x[k]; segments [cu[b], cu[b + 1]) over n positions,
// each clamped into [0, n) (no access outside the buffers whatever cu_seqlens holds). T = float or double.
template <typename T>
void reverse_scan(const T* x, const int64_t* cu_seqlens, int64_t num_segments, int64_t n, double gamma, T* out,
                  int num_threads);

// method §3 per segment over eligible positions: score = Z(entropy) * Z(omega) (Z(entropy) when omega is null),
// -inf where not eligible; candidate = eligible && Z(entropy) > 0 && Z(omega) > 0. Statistics in double.
template <typename T>
void branching_score(const T* entropy, const T* omega, const bool* eligible, const int64_t* cu_seqlens,
                     int64_t num_segments, int64_t n, T* score, bool* candidate, int num_threads);

}  // namespace appo
