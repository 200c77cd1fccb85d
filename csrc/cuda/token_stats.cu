// Token statistics over the vocabulary (method §1) in CUDA: forward and fused backward.
//
// Forward: one 256-thread block per row (or, when rows are few, `splits` blocks per row whose partials a
// second small kernel merges). Each thread streams 16-byte vectors of the row with an online max / sum of
// 2^u / sum of 2^u * u (u = (x - max) * log2(e) / T): one exp2 per element, rescaling only when its running
// max grows. The top-k is kept per warp as a sorted list in registers (k <= 64) and touched only when an
// element beats the warp's current k-th entry; warp lists, then block partials, are merged by rank.
// Backward: the probabilities are recomputed from the saved lse; every element is written once with the
// dense part of the gradient, then the <= k + 2 special ids (target token, top-k set) are rewritten from
// a full fp32 recomputation, so no term is rounded twice. Design notes: docs/cuda.md.
#include "appo_cuda.h"
#include "common.cuh"

namespace appo_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kFwdUnroll = 4;         // 16-byte vectors per thread per loop iteration (forward: 64 B in flight)
constexpr int kBwdUnroll = 2;         // (backward: 32 B loads + 32 B stores)
constexpr int kMaxSplits = 32;        // vocabulary splits per row (forward small-n path)
constexpr int kMaxK = APPO_CUDA_MAX_TOPK;
constexpr int kSentinelId = 1 << 30;  // + a unique offset: ids of the initial (-inf) list entries
constexpr int kInvalidId = 0x7fffff00;  // + j: padding elements past the row end; they beat nothing

static_assert(kMaxSplits * kWarps * kMaxK < (1 << 30), "sentinel ids must stay below kInvalidId");

// ---------------------------------------------------------------------------------------------------------
// Online statistics of a set of logits x: mx = max x (never NaN), and with ms = (mx == -inf ? 0 : mx),
// u = (x - ms) * c where c = log2(e) / T:  S = sum 2^u,  A = sum 2^u * u  (log2 units).
// Then lse = mx / T + log S and the exact entropy is log S - ln2 * A / S.
struct Online {
  float mx, S, A;
};

__device__ __forceinline__ float safe_max(float mx) { return mx == neg_inf() ? 0.f : mx; }

template <int N>
__device__ __forceinline__ float online_update(Online& st, const float* v, float c) {
  float lmax = v[0];
#pragma unroll
  for (int j = 1; j < N; ++j) lmax = fmaxf(lmax, v[j]);
  if (lmax > st.mx) {  // rare after the first iterations: one extra exp2 per rescale
    if (st.S != 0.f) {
      const float d = (safe_max(st.mx) - lmax) * c;
      const float f = fast_exp2(d);
      st.A = f * fmaf(d, st.S, st.A);
      st.S *= f;
    }
    st.mx = lmax;
  }
  const float ms = safe_max(st.mx);
  constexpr int P = N >= 4 ? 4 : 1;  // independent partial sums: shorter dependency chains
  float ps[P], pa[P];
#pragma unroll
  for (int q = 0; q < P; ++q) ps[q] = pa[q] = 0.f;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float u = (v[j] - ms) * c;  // -inf for masked vocabulary, NaN for NaN
    const float e = fast_exp2(u);     // 0 for -inf
    ps[j % P] += e;
    pa[j % P] = fmaf(e, fmaxf(u, -FLT_MAX), pa[j % P]);  // 0 * -FLT_MAX = 0: no NaN from masked entries
  }
#pragma unroll
  for (int q = 1; q < P; ++q) {
    ps[0] += ps[q];
    pa[0] += pa[q];
  }
  st.S += ps[0];
  st.A += pa[0];
  return lmax;
}

__device__ __forceinline__ void online_add(Online& r, float ms_r, const Online& a, float c) {
  if (a.S != 0.f) {  // also taken for NaN, which then propagates
    const float d = (safe_max(a.mx) - ms_r) * c;
    const float f = fast_exp2(d);
    r.S += f * a.S;
    r.A += f * fmaf(d, a.S, a.A);
  }
}

__device__ __forceinline__ Online online_merge(const Online& a, const Online& b, float c) {
  Online r{fmaxf(a.mx, b.mx), 0.f, 0.f};
  const float ms = safe_max(r.mx);
  online_add(r, ms, a, c);
  online_add(r, ms, b, c);
  return r;
}

__device__ __forceinline__ Online online_shfl_xor(const Online& a, int off) {
  return Online{__shfl_xor_sync(kFull, a.mx, off), __shfl_xor_sync(kFull, a.S, off),
                __shfl_xor_sync(kFull, a.A, off)};
}

// ---------------------------------------------------------------------------------------------------------
// Top-k: the total order is value descending, then id ascending (ties to the smaller id); NaN beats nothing.
__device__ __forceinline__ bool beats(float av, int ai, float bv, int bi) {
  return av > bv || (av == bv && ai < bi);
}

// A sorted list of 32 * KS entries per warp; slot s of lane l holds position 32 * s + l.
template <int KS>
struct WarpList {
  float v[KS];
  int id[KS];
  float thr_v;  // the entry at position k - 1 (what a candidate must beat)
  int thr_i;

  __device__ __forceinline__ void init(int uid_base, int k, int lane) {
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      v[s] = neg_inf();
      id[s] = kSentinelId + uid_base + 32 * s + lane;
    }
    thr_v = neg_inf();
    thr_i = kSentinelId + uid_base + k - 1;
  }

  __device__ __forceinline__ void update_threshold(int k) {
    const float tv = (KS == 2 && k > 32) ? v[KS - 1] : v[0];
    const int ti = (KS == 2 && k > 32) ? id[KS - 1] : id[0];
    thr_v = __shfl_sync(kFull, tv, (k - 1) & 31);
    thr_i = __shfl_sync(kFull, ti, (k - 1) & 31);
  }

  // Insert (cv, ci), warp-uniform; the caller checked that it beats the k-th entry.
  __device__ __forceinline__ void insert(float cv, int ci, int lane) {
    int p = 0;
#pragma unroll
    for (int s = 0; s < KS; ++s) p += __popc(__ballot_sync(kFull, beats(v[s], id[s], cv, ci)));
    // new[q] = old[q] for q < p, cand for q == p, old[q - 1] for q > p; last slot first (reads old values)
#pragma unroll
    for (int s = KS - 1; s >= 0; --s) {
      float uv = __shfl_up_sync(kFull, v[s], 1);
      int ui = __shfl_up_sync(kFull, id[s], 1);
      if (s > 0) {
        const float wv = __shfl_sync(kFull, v[s > 0 ? s - 1 : 0], 31);
        const int wi = __shfl_sync(kFull, id[s > 0 ? s - 1 : 0], 31);
        if (lane == 0) {
          uv = wv;
          ui = wi;
        }
      }
      const int q = 32 * s + lane;
      if (q > p) {
        v[s] = uv;
        id[s] = ui;
      } else if (q == p) {
        v[s] = cv;
        id[s] = ci;
      }
    }
  }

  // Offer NV groups of VL consecutive elements (ids id0[u] + j). Within a warp the ids offered are larger
  // than every id offered before, so an element equal to the threshold can only beat a sentinel: the
  // fast test below is exact and skips almost every call once the list holds real entries. The slow path
  // walks the elements (one ballot each), re-testing every candidate against the threshold as it rises
  // (a rejected candidate costs a few instructions; filling the list from sentinels stays cheap); the
  // insertion itself is one out-of-line function, which keeps the unrolled code small.
  template <int NV, int VL>
  __device__ __forceinline__ void offer(const float* x, const int* id0, float lmax, int k, int lane);
};

template <int KS>
__device__ __noinline__ WarpList<KS> warp_list_insert(WarpList<KS> l, float cv, int ci, int k) {
  l.insert(cv, ci, threadIdx.x & 31);
  l.update_threshold(k);
  return l;
}

template <int KS>
template <int NV, int VL>
__device__ __forceinline__ void WarpList<KS>::offer(const float* x, const int* id0, float lmax, int k, int lane) {
  const bool maybe = lmax > thr_v || (lmax == thr_v && thr_i >= kSentinelId);
  if (!__any_sync(kFull, maybe)) return;
#pragma unroll
  for (int e = 0; e < NV * VL; ++e) {
    const float xv = x[e];
    const int xi = id0[e / VL] + e % VL;
    unsigned m = __ballot_sync(kFull, beats(xv, xi, thr_v, thr_i));
    while (m) {
      const int src = __ffs(m) - 1;
      m &= m - 1;
      const float cv = __shfl_sync(kFull, xv, src);
      const int ci = __shfl_sync(kFull, xi, src);
      if (beats(cv, ci, thr_v, thr_i)) *this = warp_list_insert(*this, cv, ci, k);
    }
  }
}

template <>
struct WarpList<0> {  // no top-k
  __device__ __forceinline__ void init(int, int, int) {}
  template <int NV, int VL>
  __device__ __forceinline__ void offer(const float*, const int*, float, int, int) {}
};

// Merge `nlists` sorted lists of k entries (shared, list o at sv + o * k) into the top k (fv, fi): each
// entry's rank in the union is its own position plus, per other list, the entries beating it (binary
// search). Ranks are unique because every (value, id) pair is distinct. Whole block; caller syncs after.
__device__ __forceinline__ void rank_merge(const float* sv, const int* si, int nlists, int k, float* fv, int* fi) {
  for (int e = threadIdx.x; e < nlists * k; e += kThreads) {
    const int w = e / k;
    const float x = sv[e];
    const int xi = si[e];
    int rank = e - w * k;
    for (int o = 0; o < nlists && rank < k; ++o) {
      if (o == w) continue;
      const float* lv = sv + o * k;
      const int* li = si + o * k;
      int lo = 0, hi = k;
      while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (beats(lv[mid], li[mid], x, xi)) lo = mid + 1; else hi = mid;
      }
      rank += lo;
    }
    if (rank < k) {
      fv[rank] = x;
      fi[rank] = xi;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
struct FwdParams {
  const void* logits;
  int64_t n, vocab, stride_row;
  const int64_t* tokens;
  int64_t ignore_index;
  float inv_t;
  int k, entropy_topk, splits;
  float *logp, *entropy, *lse;
  int64_t* topk_ids;
  float* topk_logp;
  int64_t* topk_set;
  float* c;
  float* ws_stats;  // [n, splits, 3]   (split path only)
  float* ws_val;    // [n, splits, k]
  int* ws_id;       // [n, splits, k]
};

__device__ void write_ignored(const FwdParams& p, int64_t row) {
  const int k = p.k;
  if (threadIdx.x == 0) {
    p.logp[row] = 0.f;
    p.entropy[row] = 0.f;
    p.lse[row] = 0.f;
    if (p.entropy_topk) p.c[row] = 0.f;
  }
  for (int q = threadIdx.x; q < k; q += kThreads) {
    p.topk_ids[row * k + q] = 0;
    p.topk_logp[row * k + q] = 0.f;
  }
  if (p.entropy_topk)
    for (int q = threadIdx.x; q <= k; q += kThreads) p.topk_set[row * (k + 1) + q] = -1;
}

// Row outputs from the merged statistics and top-k list (fv, fi in shared memory). Whole block.
template <int DT>
__device__ void finalize_row(const FwdParams& p, int64_t row, int64_t tok, const void* rowp, const Online& tot,
                             const float* fv, const int* fi) {
  const int k = p.k;
  const int64_t V = p.vocab;
  const float log_s = logf(tot.S);
  const float lse = tot.mx * p.inv_t + log_s;  // all -inf row: -inf
  const bool tok_ok = tok >= 0 && tok < V;
  const float x_tok = tok_ok ? Elem<DT>::load(rowp, tok) : quiet_nan();
  const float logp = x_tok * p.inv_t - lse;
  for (int q = threadIdx.x; q < k; q += kThreads) {
    const int id = fi[q] < V ? fi[q] : int(V - 1);  // only a row holding NaN can leave a sentinel here
    p.topk_ids[row * k + q] = id;
    p.topk_logp[row * k + q] = fv[q] * p.inv_t - lse;
  }
  if (p.entropy_topk) {
    if (threadIdx.x < 32) {  // warp 0: -sum p log p and c over topk ∪ {token}
      const int lane = threadIdx.x;
      bool hit = false;
      for (int q = lane; q < k; q += 32) hit |= (fi[q] < V ? fi[q] : V - 1) == tok;
      hit = __any_sync(kFull, hit);
      float h = 0.f, cc = 0.f;
      for (int q = lane; q <= k; q += 32) {
        float lp;
        bool member = true;
        int64_t sid;
        if (q < k) {
          lp = fv[q] * p.inv_t - lse;
          sid = fi[q] < V ? fi[q] : V - 1;
        } else {
          lp = logp;
          member = !hit;
          sid = member ? tok : -1;
        }
        if (member) {
          const float pr = expf(lp);
          const float lf = finite_floor(lp);
          h -= pr * lf;
          cc += pr * (1.f + lf);
        }
        p.topk_set[row * (k + 1) + q] = sid;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        h += __shfl_xor_sync(kFull, h, off);
        cc += __shfl_xor_sync(kFull, cc, off);
      }
      if (lane == 0) {
        p.entropy[row] = h;
        p.c[row] = cc;
      }
    }
  } else if (threadIdx.x == 0) {
    p.entropy[row] = log_s - kLn2 * tot.A / tot.S;  // lse - sum p s; NaN for an all -inf row
  }
  if (threadIdx.x == 0) {
    p.logp[row] = logp;
    p.lse[row] = lse;
  }
}

// One block per (row, split). KS: 0 without top-k, 1 for k <= 32, 2 for k <= 64.
template <int DT, int KS>
__global__ void __launch_bounds__(kThreads) token_stats_fwd_kernel(const FwdParams p) {
  constexpr int kSize = Elem<DT>::kSize;
  constexpr int VEC = 16 / kSize;
  constexpr int NL = KS > 0 ? kWarps * kMaxK : 1;
  __shared__ float s_wv[NL];
  __shared__ int s_wi[NL];
  __shared__ float s_fv[KS > 0 ? kMaxK : 1];
  __shared__ int s_fi[KS > 0 ? kMaxK : 1];
  __shared__ Online s_st[kWarps];

  const int splits = p.splits;
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int chunk = int(int64_t(blockIdx.x) - row * splits);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int k = p.k;
  const int64_t tok = p.tokens[row];
  if (tok == p.ignore_index) {  // block-uniform; logits not read
    if (splits == 1) write_ignored(p, row);
    return;
  }
  const int64_t V = p.vocab;
  const char* rowp = static_cast<const char*>(p.logits) + row * p.stride_row * kSize;
  const int64_t head = misaligned_head(rowp, kSize, V);
  const int64_t nvec = (V - head) / VEC;
  const int64_t tail0 = head + nvec * VEC;  // scalar tail [tail0, V)
  const int64_t vbeg = nvec * chunk / splits, vend = nvec * (chunk + 1) / splits;
  const float c = p.inv_t * kLog2e;

  Online st{neg_inf(), 0.f, 0.f};
  WarpList<KS> top;
  top.init((chunk * kWarps + warp) * kMaxK, k, lane);

  if (chunk == 0 && head > 0) {  // block-uniform
    const bool in = tid < head;
    float x[1] = {in ? Elem<DT>::load(rowp, tid) : neg_inf()};
    const int id0[1] = {in ? tid : kInvalidId};
    const float lmax = online_update<1>(st, x, c);
    top.template offer<1, 1>(x, id0, lmax, k, lane);
  }

  const uint4* vp = reinterpret_cast<const uint4*>(rowp + head * kSize);
  for (int64_t base = vbeg; base < vend; base += kThreads * kFwdUnroll) {  // block-uniform trip count
    float x[kFwdUnroll * VEC];
    int id0[kFwdUnroll];
#pragma unroll
    for (int u = 0; u < kFwdUnroll; ++u) {
      const int64_t vi = base + u * kThreads + tid;
      if (vi < vend) {
        Elem<DT>::unpack(__ldg(vp + vi), x + u * VEC);
        id0[u] = int(head + vi * VEC);
      } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[u * VEC + j] = neg_inf();
        id0[u] = kInvalidId;
      }
    }
    const float lmax = online_update<kFwdUnroll * VEC>(st, x, c);
    top.template offer<kFwdUnroll, VEC>(x, id0, lmax, k, lane);
  }

  if (chunk == splits - 1 && tail0 < V) {  // block-uniform
    const bool in = tid < V - tail0;
    float x[1] = {in ? Elem<DT>::load(rowp, tail0 + tid) : neg_inf()};
    const int id0[1] = {in ? int(tail0 + tid) : kInvalidId};
    const float lmax = online_update<1>(st, x, c);
    top.template offer<1, 1>(x, id0, lmax, k, lane);
  }

  // ---- block merge ----
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = online_merge(st, online_shfl_xor(st, off), c);
  if (lane == 0) s_st[warp] = st;
  if constexpr (KS > 0) {
#pragma unroll
    for (int s = 0; s < KS; ++s) {
      const int q = 32 * s + lane;
      if (q < k) {
        s_wv[warp * k + q] = top.v[s];
        s_wi[warp * k + q] = top.id[s];
      }
    }
  }
  __syncthreads();
  Online tot = s_st[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) tot = online_merge(tot, s_st[w], c);  // same order in every thread
  if constexpr (KS > 0) {
    rank_merge(s_wv, s_wi, kWarps, k, s_fv, s_fi);
    __syncthreads();
  }

  if (splits == 1) {
    finalize_row<DT>(p, row, tok, rowp, tot, s_fv, s_fi);
    return;
  }
  const int64_t slot = row * splits + chunk;
  if (tid == 0) {
    p.ws_stats[slot * 3 + 0] = tot.mx;
    p.ws_stats[slot * 3 + 1] = tot.S;
    p.ws_stats[slot * 3 + 2] = tot.A;
  }
  if constexpr (KS > 0) {
    for (int q = tid; q < k; q += kThreads) {
      p.ws_val[slot * k + q] = s_fv[q];
      p.ws_id[slot * k + q] = s_fi[q];
    }
  }
}

// Split path, second pass: merge the `splits` partials of each row (one block per row).
template <int DT>
__global__ void __launch_bounds__(kThreads) token_stats_fwd_merge_kernel(const FwdParams p) {
  __shared__ float s_v[kMaxSplits * kMaxK];
  __shared__ int s_i[kMaxSplits * kMaxK];
  __shared__ float s_fv[kMaxK];
  __shared__ int s_fi[kMaxK];
  const int64_t row = blockIdx.x;
  const int64_t tok = p.tokens[row];
  if (tok == p.ignore_index) {
    write_ignored(p, row);
    return;
  }
  const int splits = p.splits, k = p.k;
  const float c = p.inv_t * kLog2e;
  const int64_t base = row * splits;
  Online tot{p.ws_stats[base * 3 + 0], p.ws_stats[base * 3 + 1], p.ws_stats[base * 3 + 2]};
  for (int j = 1; j < splits; ++j) {  // same order in every thread
    const Online o{p.ws_stats[(base + j) * 3 + 0], p.ws_stats[(base + j) * 3 + 1], p.ws_stats[(base + j) * 3 + 2]};
    tot = online_merge(tot, o, c);
  }
  for (int e = threadIdx.x; e < splits * k; e += kThreads) {
    s_v[e] = p.ws_val[base * k + e];
    s_i[e] = p.ws_id[base * k + e];
  }
  __syncthreads();
  rank_merge(s_v, s_i, splits, k, s_fv, s_fi);
  __syncthreads();
  const char* rowp = static_cast<const char*>(p.logits) + row * p.stride_row * Elem<DT>::kSize;
  finalize_row<DT>(p, row, tok, rowp, tot, s_fv, s_fi);
}

// ---------------------------------------------------------------------------------------------------------
struct BwdParams {
  const void* logits;
  int64_t n, vocab, stride_row;
  const int64_t* tokens;
  int64_t ignore_index;
  float inv_t;
  int k, splits;
  const float *lse, *entropy;
  const int64_t* topk_set;
  const float* c;
  const float *g_logp, *g_entropy;
  void* grad;
};

// d loss / d s at one element, before the target / top-k-set terms and the 1/T factor (all fp32):
//   exact:  -p * ((lp + H) * g_H + g_lp)          top-k:  p * (g_H * c - g_lp)
// with lp = s - lse, p = exp(lp); exact: p == 0 (masked vocabulary, underflow) gives exactly 0.
template <bool TOPK>
struct DenseGrad {
  float inv_t, lse, h, g_h, g_lp, b;
  __device__ __forceinline__ float log_p(float x) const { return fmaf(x, inv_t, -lse); }
  __device__ __forceinline__ float operator()(float x) const {
    const float lp = log_p(x);
    const float pr = fast_exp2(lp * kLog2e);
    if (TOPK) return pr * b;
    const float g = -(pr * fmaf(lp + h, g_h, g_lp));
    return pr == 0.f ? 0.f : g;
  }
};

template <int DT, bool TOPK>
__global__ void __launch_bounds__(kThreads) token_stats_bwd_kernel(const BwdParams p) {
  constexpr int kSize = Elem<DT>::kSize;
  constexpr int VEC = 16 / kSize;
  const int splits = p.splits;
  const int64_t row = int64_t(blockIdx.x) / splits;
  const int chunk = int(int64_t(blockIdx.x) - row * splits);
  const int tid = threadIdx.x;
  const int64_t V = p.vocab;
  const int64_t tok = p.tokens[row];
  const bool valid = tok != p.ignore_index;
  const char* in = static_cast<const char*>(p.logits) + row * p.stride_row * kSize;
  char* out = static_cast<char*>(p.grad) + row * V * kSize;

  DenseGrad<TOPK> f;
  f.inv_t = p.inv_t;
  f.lse = valid ? p.lse[row] : 0.f;
  f.g_lp = valid && p.g_logp ? p.g_logp[row] : 0.f;
  f.g_h = valid && p.g_entropy ? p.g_entropy[row] : 0.f;
  f.h = !TOPK && valid ? p.entropy[row] : 0.f;
  f.b = TOPK && valid ? f.g_h * p.c[row] - f.g_lp : 0.f;
  const float inv_t = p.inv_t;

  const int64_t head_in = misaligned_head(in, kSize, V), head_out = misaligned_head(out, kSize, V);
  int64_t e0, e1;  // this block's element range [e0, e1)
  if (head_in == head_out) {
    const int64_t head = head_in;
    const int64_t nvec = (V - head) / VEC;
    const int64_t tail0 = head + nvec * VEC;
    const int64_t vbeg = nvec * chunk / splits, vend = nvec * (chunk + 1) / splits;
    e0 = chunk == 0 ? 0 : head + vbeg * VEC;
    e1 = chunk == splits - 1 ? V : head + vend * VEC;
    if (chunk == 0 && tid < head)
      Elem<DT>::store(out, tid, valid ? f(Elem<DT>::load(in, tid)) * inv_t : 0.f);
    const uint4* vin = reinterpret_cast<const uint4*>(in + head * kSize);
    uint4* vout = reinterpret_cast<uint4*>(out + head * kSize);
    if (valid) {
      for (int64_t vi = vbeg + tid; vi < vend; vi += kThreads * kBwdUnroll) {
        float x[kBwdUnroll][VEC];
        bool live[kBwdUnroll];
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          live[u] = vi + u * kThreads < vend;
          if (live[u]) Elem<DT>::unpack(__ldg(vin + vi + u * kThreads), x[u]);
        }
#pragma unroll
        for (int u = 0; u < kBwdUnroll; ++u) {
          if (!live[u]) continue;
#pragma unroll
          for (int j = 0; j < VEC; ++j) x[u][j] = f(x[u][j]) * inv_t;
          vout[vi + u * kThreads] = Elem<DT>::pack(x[u]);
        }
      }
    } else {
      float z[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = 0.f;
      const uint4 zq = Elem<DT>::pack(z);
      for (int64_t vi = vbeg + tid; vi < vend; vi += kThreads) vout[vi] = zq;
    }
    if (chunk == splits - 1 && tid < V - tail0)
      Elem<DT>::store(out, tail0 + tid, valid ? f(Elem<DT>::load(in, tail0 + tid)) * inv_t : 0.f);
  } else {  // input and output rows aligned differently: scalar path
    e0 = V * chunk / splits;
    e1 = V * (chunk + 1) / splits;
    for (int64_t e = e0 + tid; e < e1; e += kThreads)
      Elem<DT>::store(out, e, valid ? f(Elem<DT>::load(in, e)) * inv_t : 0.f);
  }
  if (!valid) return;  // block-uniform

  // Rewrite the special ids of [e0, e1) from a full fp32 value (after every dense write of the block).
  __syncthreads();
  const int k = p.k;
  if (TOPK) {
    const int64_t* set = p.topk_set + row * (k + 1);
    if (tid <= k) {
      const int64_t id = set[tid];
      if (id >= 0 && id >= e0 && id < e1) {
        const float x = Elem<DT>::load(in, id);
        const float lp = f.log_p(x);
        const float pr = fast_exp2(lp * kLog2e);
        float g = pr * f.b - pr * (1.f + finite_floor(lp)) * f.g_h;
        if (id == tok) g += f.g_lp;
        Elem<DT>::store(out, id, g * inv_t);
      }
    } else if (tid == k + 1 && tok >= e0 && tok < e1) {  // token outside the set (not produced by the forward)
      bool in_set = false;
      for (int q = 0; q <= k; ++q) in_set |= set[q] == tok;
      if (!in_set) Elem<DT>::store(out, tok, (f(Elem<DT>::load(in, tok)) + f.g_lp) * inv_t);
    }
  } else if (tid == 0 && tok >= e0 && tok < e1) {
    Elem<DT>::store(out, tok, (f(Elem<DT>::load(in, tok)) + f.g_lp) * inv_t);
  }
}

// ---------------------------------------------------------------------------------------------------------
template <int DT, int KS>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  const int64_t blocks = p.n * p.splits;
  token_stats_fwd_kernel<DT, KS><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  if (p.splits > 1) token_stats_fwd_merge_kernel<DT><<<unsigned(p.n), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <int DT>
cudaError_t launch_fwd_k(const FwdParams& p, cudaStream_t stream) {
  if (p.k == 0) return launch_fwd<DT, 0>(p, stream);
  if (p.k <= 32) return launch_fwd<DT, 1>(p, stream);
  return launch_fwd<DT, 2>(p, stream);
}

template <int DT>
cudaError_t launch_bwd(const BwdParams& p, bool topk, cudaStream_t stream) {
  const unsigned blocks = unsigned(p.n * p.splits);
  if (topk) token_stats_bwd_kernel<DT, true><<<blocks, kThreads, 0, stream>>>(p);
  else token_stats_bwd_kernel<DT, false><<<blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

int elem_size(int dtype) { return dtype == 0 ? 4 : 2; }

// Vocabulary splits per row when rows are few (< 2 per SM): enough blocks for ~4 per SM, each streaming
// at least `min_vectors` 16-byte vectors.
int choose_splits(int64_t n, int64_t vocab, int dtype, int max_splits, int64_t min_vectors) {
  const int64_t sms = sm_count();
  if (n >= 2 * sms) return 1;
  const int64_t nvec = vocab / (16 / elem_size(dtype));
  int64_t s = (4 * sms + n - 1) / n;
  const int64_t by_work = nvec / min_vectors;
  if (s > by_work) s = by_work;
  if (s > max_splits) s = max_splits;
  if (s < 1) s = 1;
  return int(s);
}

bool common_args_ok(const void* logits, int dtype, int64_t n, int64_t vocab, const int64_t* tokens,
                    float inv_temperature, int topk) {
  if (dtype < 0 || dtype > 2 || n < 0 || vocab < 1 || vocab > APPO_CUDA_MAX_VOCAB) return false;
  if (topk < 0 || topk > kMaxK || topk > vocab) return false;
  if (!(inv_temperature > 0.f) || !(inv_temperature < INFINITY)) return false;
  if (n > 0 && (!logits || !tokens)) return false;
  if (n > INT32_MAX) return false;  // one block per row
  return true;
}

}  // namespace
}  // namespace appo_cuda

using namespace appo_cuda;

extern "C" int appo_token_stats_fwd_cuda(const void* logits, int dtype, int64_t n, int64_t vocab,
                                         int64_t stride_row, const int64_t* tokens, int64_t ignore_index,
                                         float inv_temperature, int topk, int entropy_topk, float* logp,
                                         float* entropy, float* lse, int64_t* topk_ids, float* topk_logp,
                                         int64_t* topk_set, float* c, cudaStream_t stream) {
  if (!common_args_ok(logits, dtype, n, vocab, tokens, inv_temperature, topk)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!logp || !entropy || !lse) return cudaErrorInvalidValue;
  if (topk > 0 && (!topk_ids || !topk_logp)) return cudaErrorInvalidValue;
  if (entropy_topk && (!topk_set || !c)) return cudaErrorInvalidValue;

  FwdParams p{};
  p.logits = logits;
  p.n = n;
  p.vocab = vocab;
  p.stride_row = stride_row;
  p.tokens = tokens;
  p.ignore_index = ignore_index;
  p.inv_t = inv_temperature;
  p.k = topk;
  p.entropy_topk = entropy_topk ? 1 : 0;
  p.logp = logp;
  p.entropy = entropy;
  p.lse = lse;
  p.topk_ids = topk_ids;
  p.topk_logp = topk_logp;
  p.topk_set = topk_set;
  p.c = c;
  p.splits = choose_splits(n, vocab, dtype, kMaxSplits, int64_t(kThreads) * kFwdUnroll * 2);

  void* ws = nullptr;
  if (p.splits > 1) {  // not while a CUDA graph is being captured: no memory nodes in users' graphs
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &capture) != cudaSuccess || capture != cudaStreamCaptureStatusNone) {
      cudaGetLastError();
      p.splits = 1;
    }
  }
  if (p.splits > 1) {
    const size_t per = size_t(3 + 2 * topk) * sizeof(float);
    if (cudaMallocAsync(&ws, size_t(n) * p.splits * per, stream) != cudaSuccess) {
      cudaGetLastError();  // clear it: the one-block-per-row path needs no workspace
      ws = nullptr;
      p.splits = 1;
    } else {
      float* f = static_cast<float*>(ws);
      p.ws_stats = f;
      p.ws_val = f + size_t(n) * p.splits * 3;
      p.ws_id = reinterpret_cast<int*>(p.ws_val + size_t(n) * p.splits * topk);
    }
  }

  cudaError_t err;
  switch (dtype) {
    case 0: err = launch_fwd_k<0>(p, stream); break;
    case 1: err = launch_fwd_k<1>(p, stream); break;
    default: err = launch_fwd_k<2>(p, stream); break;
  }
  if (ws) {
    const cudaError_t e2 = cudaFreeAsync(ws, stream);
    if (err == cudaSuccess) err = e2;
  }
  return int(err);
}

extern "C" int appo_token_stats_bwd_cuda(const void* logits, int dtype, int64_t n, int64_t vocab,
                                         int64_t stride_row, const int64_t* tokens, int64_t ignore_index,
                                         float inv_temperature, int topk, int entropy_topk, const float* lse,
                                         const float* entropy, const int64_t* topk_set, const float* c,
                                         const float* g_logp, const float* g_entropy, void* grad,
                                         cudaStream_t stream) {
  if (!common_args_ok(logits, dtype, n, vocab, tokens, inv_temperature, topk)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (!lse || !grad) return cudaErrorInvalidValue;
  if (entropy_topk ? (!topk_set || !c) : !entropy) return cudaErrorInvalidValue;
  if (topk + 2 > kThreads) return cudaErrorInvalidValue;

  BwdParams p{};
  p.logits = logits;
  p.n = n;
  p.vocab = vocab;
  p.stride_row = stride_row;
  p.tokens = tokens;
  p.ignore_index = ignore_index;
  p.inv_t = inv_temperature;
  p.k = topk;
  p.lse = lse;
  p.entropy = entropy;
  p.topk_set = topk_set;
  p.c = c;
  p.g_logp = g_logp;
  p.g_entropy = g_entropy;
  p.grad = grad;
  p.splits = choose_splits(n, vocab, dtype, 1 << 16, int64_t(kThreads) * kBwdUnroll * 2);
  if (n * p.splits > INT32_MAX) return cudaErrorInvalidValue;

  cudaError_t err;
  switch (dtype) {
    case 0: err = launch_bwd<0>(p, entropy_topk != 0, stream); break;
    case 1: err = launch_bwd<1>(p, entropy_topk != 0, stream); break;
    default: err = launch_bwd<2>(p, entropy_topk != 0, stream); break;
  }
  return int(err);
}
