// appo_kernels CUDA kernels: raw CUDA with extern "C" launchers, no torch headers.
//
// Every launcher takes device pointers, sizes, strides and a stream, enqueues its kernels on that stream and
// returns 0 on success or a cudaError_t code (cudaErrorInvalidValue for bad arguments). None synchronises the
// host; all are CUDA-graph capturable (the forward's split-vocabulary path uses cudaMallocAsync/cudaFreeAsync
// on the given stream). Design, ABI details and measured register use: docs/cuda.md.
#pragma once
#include <stdint.h>

#ifndef __cplusplus
#include <stdbool.h>
#endif

// The runtime's own typedef (driver_types.h) is the same; repeating it is legal C++.
struct CUstream_st;
typedef struct CUstream_st* cudaStream_t;

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes of `logits` / `grad`: 0 = float32, 1 = bfloat16, 2 = float16.
enum { APPO_CUDA_F32 = 0, APPO_CUDA_BF16 = 1, APPO_CUDA_F16 = 2 };
// Largest supported `topk` and vocabulary.
enum { APPO_CUDA_MAX_TOPK = 64 };
#define APPO_CUDA_MAX_VOCAB (INT64_C(1) << 30)

// Token statistics forward (method §1). logits: n rows of `vocab` contiguous elements, row i at
// logits + i * stride_row (elements); s = logits * inv_temperature. Float32 outputs [n]: logp, entropy
// (exact, or top-k truncated when entropy_topk != 0), lse; topk_ids int64 [n, topk] / topk_logp [n, topk]
// (may be NULL when topk == 0); topk_set int64 [n, topk + 1] and c [n], written only when entropy_topk
// (may be NULL otherwise). Rows whose token == ignore_index: every output 0 (ids 0, topk_set -1).
int appo_token_stats_fwd_cuda(const void* logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row,
                              const int64_t* tokens, int64_t ignore_index, float inv_temperature, int topk,
                              int entropy_topk, float* logp, float* entropy, float* lse, int64_t* topk_ids,
                              float* topk_logp, int64_t* topk_set, float* c, cudaStream_t stream);

// Token statistics backward: grad [n, vocab] contiguous, dtype of the logits, from the forward's lse,
// entropy (exact mode) or topk_set and c (top-k mode), and upstream g_logp, g_entropy [n] (float32; NULL
// means all zeros). Ignored rows get 0.
int appo_token_stats_bwd_cuda(const void* logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row,
                              const int64_t* tokens, int64_t ignore_index, float inv_temperature, int topk,
                              int entropy_topk, const float* lse, const float* entropy, const int64_t* topk_set,
                              const float* c, const float* g_logp, const float* g_entropy, void* grad,
                              cudaStream_t stream);

// out[t] = sum_{k >= t, k in t's segment} gamma^(k - t) * x[k]; segment b is [cu_seqlens[b], cu_seqlens[b+1])
// (clamped to [0, n)); positions outside every segment are not written. Accumulated in float64.
int appo_reverse_scan_cuda(const float* x, const int64_t* cu_seqlens, int64_t num_segments, int64_t n,
                           float gamma, float* out, cudaStream_t stream);

// method §3 per segment over `eligible` positions: z-scores (population std, + 1e-6, float64) of entropy and,
// when omega != NULL, of omega; score = z_H * z_O (z_H without omega), -inf where not eligible;
// candidate = eligible && z_H > 0 && (omega == NULL || z_O > 0).
int appo_branching_score_cuda(const float* entropy, const float* omega, const bool* eligible,
                              const int64_t* cu_seqlens, int64_t num_segments, int64_t n, float* score,
                              bool* candidate, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
