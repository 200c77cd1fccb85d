// Token statistics over the vocabulary (method §1) on CPU: one read of the logits per row in the forward,
// one read + one write in the backward; OpenMP over rows, and over vocabulary splits when rows are few.
#include <omp.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <vector>

#include "appo_cpu.h"
#include "numerics.h"

namespace appo {
namespace {

constexpr int64_t kBlock = 2048;       // vocabulary elements converted and reduced at a time (8 KiB, in L1)
constexpr int64_t kSub = 256;          // a run of the block: the top-k skips runs below its threshold
constexpr int kLanes = 16;             // partial results kept per loop (one AVX-512 register of floats)
constexpr int64_t kMinSplit = 8192;    // smallest vocabulary range worth a thread of its own
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// float16 -> float32, exact for every input (zero, subnormals, inf, NaN) and branch-free, so that the loops
// that convert vectorise: GCC 12 converts _Float16 one element at a time without AVX512-FP16.
inline float f16_to_float(uint16_t h16) {
  const uint32_t h = h16, em = h & 0x7fffu, sign = (h & 0x8000u) << 16;
  const uint32_t normal = (em << 13) + (em >= 0x7c00u ? 0x70000000u : 0x38000000u);  // rebias; inf/NaN to 255
  const uint32_t tiny = float_to_bits(float(int32_t(em)) * 0x1p-24f);                 // zero and subnormals
  const uint32_t is_tiny = 0u - uint32_t(em < 0x0400u);
  return bits_to_float((tiny & is_tiny) | (normal & ~is_tiny) | sign);
}

// Element D as float (Elem<D>::load, with float16 through f16_to_float).
template <int D>
inline float load(const typename Elem<D>::T* p) {
  if constexpr (D == kF16) { uint16_t h; std::memcpy(&h, p, 2); return f16_to_float(h); }
  else return Elem<D>::load(p);
}

// Bit j set where p[j] * scale > thr (>= thr with kOrEqual), for j < 16; never for NaN. One vector multiply
// and compare where the target has them (times 1 is exact).
template <bool kOrEqual = false>
inline uint32_t above_mask16(const float* p, float thr, float scale = 1.f) {
#if defined(__AVX512F__)
  return uint32_t(_mm512_cmp_ps_mask(_mm512_mul_ps(_mm512_loadu_ps(p), _mm512_set1_ps(scale)), _mm512_set1_ps(thr),
                                     kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ));
#elif defined(__AVX__)
  const __m256 t = _mm256_set1_ps(thr), c = _mm256_set1_ps(scale);
  constexpr int op = kOrEqual ? _CMP_GE_OQ : _CMP_GT_OQ;
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_mul_ps(_mm256_loadu_ps(p), c), t, op))) |
         uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_mul_ps(_mm256_loadu_ps(p + 8), c), t, op))) << 8;
#else
  uint32_t m = 0;
  for (int j = 0; j < 16; ++j) m |= uint32_t(kOrEqual ? p[j] * scale >= thr : p[j] * scale > thr) << j;
  return m;
#endif
}

// Statistics of one vocabulary range of one row; ranges of a row merge exactly.
struct Partial {
  float m = kNegInf;   // max of s
  double sum = 0;      // sum exp(s - m)
  double shifted = 0;  // sum exp(s - m) * (s - m)
  // Running top-k: the first `filled` slots, descending, equal values ordered by id (smaller first).
  std::vector<float> top_val;
  std::vector<int64_t> top_id;
  int filled = 0;

  void rescale_to(float m_new) {
    if (sum == 0 || m_new == m) { m = m_new; return; }  // nothing accumulated yet (or same max)
    const double d = double(m) - double(m_new);
    const double scale = std::exp(d);
    shifted = scale * (shifted + d * sum);
    sum *= scale;
    m = m_new;
  }

  // Insert candidate (v, id) with id larger than every id offered so far: it goes after equal values, and
  // a full list takes it only when it beats the k-th value (so a tie with it keeps the smaller id).
  void offer(float v, int64_t id, int k) {
    if (filled == k && !(v > top_val[size_t(k - 1)])) return;
    int pos = filled < k ? filled++ : k - 1;  // the slot freed: the next empty one, or the k-th's
    for (; pos > 0 && v > top_val[size_t(pos - 1)]; --pos) {
      top_val[size_t(pos)] = top_val[size_t(pos - 1)];
      top_id[size_t(pos)] = top_id[size_t(pos - 1)];
    }
    top_val[size_t(pos)] = v;
    top_id[size_t(pos)] = id;
  }

  // Offer, in id order, the elements of s[i, end) * scale (within one run) above thr (at or above it with kOrEqual):
  // the run's groups of 16 are compared first, one vector compare each and no branch, then only the groups
  // holding such an element are visited. offer() re-checks against the k-th value, which may have risen.
  template <bool kOrEqual>
  void offer_run(const float* s, float scale, int64_t i, int64_t end, int64_t id0, float thr, int k) {
    const int64_t groups = (end - i) / 16;
    uint16_t masks[kSub / 16];
    uint32_t hit = 0;
    for (int64_t g = 0; g < groups; ++g) {
      masks[g] = uint16_t(above_mask16<kOrEqual>(s + i + 16 * g, thr, scale));
      hit |= uint32_t(masks[g] != 0) << g;
    }
    for (; hit; hit &= hit - 1) {
      const int g = __builtin_ctz(hit);
      for (uint32_t m = masks[g]; m; m &= m - 1) {
        const int64_t j = i + 16 * g + __builtin_ctz(m);
        offer(s[j] * scale, id0 + j, k);
      }
    }
    for (int64_t j = i + 16 * groups; j < end; ++j)
      if (kOrEqual ? s[j] * scale >= thr : s[j] * scale > thr) offer(s[j] * scale, id0 + j, k);
  }

  // Offer the scaled logits s[0, len) * scale of vocabulary ids id0 + [0, len) (a converted block, scale 1, or
  // fp32 logits and 1 / temperature: the product is the converted value); run_max[c] holds the lane maxima of
  // the c-th run of kSub (a lane with no element holds -inf). The threshold (the k-th kept value) only rises,
  // so a run none of whose lanes beats it is skipped whole.
  void offer_block(const float* s, float scale, int64_t len, int64_t id0, const float (*run_max)[kLanes], int k) {
    const int64_t runs = (len + kSub - 1) / kSub;
    if (filled == 0 && k <= runs * kLanes) {
      // The first block, with the list empty. Its lane maxima are maxima of disjoint sets of elements, so the
      // k-th largest of them (`lower`) is at most the block's k-th largest element: an element below `lower`
      // cannot be kept, and the others are few. Offering only those (ties included) keeps the same top-k as
      // offering all, without the k ln(len / k) insertions of filling from a cold start.
      float lanes[kBlock / kSub * kLanes];
      std::copy(run_max[0], run_max[0] + runs * kLanes, lanes);
      std::nth_element(lanes, lanes + (k - 1), lanes + runs * kLanes, std::greater<float>());
      const float lower = lanes[k - 1];
      for (int64_t c = 0; c < runs; ++c)
        if (above_mask16<true>(run_max[c], lower)) offer_run<true>(s, scale, c * kSub, std::min(len, (c + 1) * kSub), id0, lower, k);
      return;
    }
    int64_t i = 0;
    for (; i < len && filled < k; ++i) offer(s[i] * scale, id0 + i, k);  // filling: every element enters
    for (; i < len; i = (i / kSub + 1) * kSub)                     // the rest of each run
      if (above_mask16(run_max[i / kSub], top_val[size_t(k - 1)]))
        offer_run<false>(s, scale, i, std::min(len, (i / kSub + 1) * kSub), id0, top_val[size_t(k - 1)], k);
  }
};

// Merge `b` (a range of larger ids) into `a`.
void merge(Partial& a, const Partial& b, int k) {
  if (b.sum != 0 || std::isnan(b.m)) {
    const float m = std::max(a.m, b.m);
    Partial bb = b;
    a.rescale_to(std::isnan(b.m) ? b.m : m);
    bb.rescale_to(std::isnan(b.m) ? b.m : m);
    a.sum += bb.sum;
    a.shifted += bb.shifted;
  }
  if (k == 0) return;
  std::vector<float> val(size_t(k), 0.f);
  std::vector<int64_t> id(size_t(k), 0);
  int i = 0, j = 0, n = 0;
  for (; n < k && (i < a.filled || j < b.filled); ++n) {
    const bool take_a = j >= b.filled || (i < a.filled && !(b.top_val[size_t(j)] > a.top_val[size_t(i)]));
    if (take_a) { val[size_t(n)] = a.top_val[size_t(i)]; id[size_t(n)] = a.top_id[size_t(i)]; ++i; }
    else { val[size_t(n)] = b.top_val[size_t(j)]; id[size_t(n)] = b.top_id[size_t(j)]; ++j; }
  }
  a.top_val.swap(val);
  a.top_id.swap(id);
  a.filled = n;
}

template <int D>
Partial row_range(const typename Elem<D>::T* row, int64_t v0, int64_t v1, float inv_t, int k) {
  Partial acc;
  acc.top_val.assign(size_t(k), 0.f);
  acc.top_id.assign(size_t(k), 0);
  // fp32 reads its logits where the others read their converted copy in buf (measured faster for fp32, slower
  // for the 16-bit types)
  constexpr bool kDirect = D == kF32;
  alignas(64) float buf[kBlock];
  alignas(64) float run_max[kBlock / kSub][kLanes];
  for (int64_t b0 = v0; b0 < v1; b0 += kBlock) {
    const int64_t len = std::min(kBlock, v1 - b0);
    const typename Elem<D>::T* src = row + b0;
    // The block's max, skipping NaN (a NaN still poisons the sums below, and so the row): fp32 takes it from
    // the logits themselves (with top-k, from the runs' lane maxima), the 16-bit types convert and scale the
    // block into buf on the way. fl(x * inv_t) is monotone in x: the max of the products is the product of
    // the max.
    float bmax = kNegInf;
    if (kDirect && !k) {
#pragma omp simd reduction(max : bmax)
      for (int64_t i = 0; i < len; ++i) bmax = load<D>(src + i) > bmax ? load<D>(src + i) : bmax;
      bmax *= inv_t;
    } else if (!kDirect) {
#pragma omp simd reduction(max : bmax)
      for (int64_t i = 0; i < len; ++i) {
        buf[i] = load<D>(src + i) * inv_t;
        bmax = buf[i] > bmax ? buf[i] : bmax;
      }
    }
    // The scaled block the top-k reads: buf, or the fp32 logits times inv_t (the same values)
    const float* s = buf;
    if constexpr (kDirect) s = src;
    const float scale = kDirect ? inv_t : 1.f;
    if (k) {  // each run's lane maxima, kLanes maxima that GCC holds in one vector register (and fp32's max)
      for (int64_t c0 = 0; c0 < len; c0 += kSub) {
        const int64_t end = std::min(len, c0 + kSub);
        float* lanes = run_max[c0 / kSub];
        for (int l = 0; l < kLanes; ++l) lanes[l] = kNegInf;
        int64_t i = c0;
        for (; i + kLanes <= end; i += kLanes) {
#pragma omp simd
          for (int l = 0; l < kLanes; ++l) lanes[l] = s[i + l] > lanes[l] ? s[i + l] : lanes[l];
        }
        for (; i < end; ++i) lanes[0] = s[i] > lanes[0] ? s[i] : lanes[0];  // a range's tail: lane 0
        if (kDirect)
          for (int l = 0; l < kLanes; ++l) {
            lanes[l] *= inv_t;
            bmax = lanes[l] > bmax ? lanes[l] : bmax;
          }
      }
      acc.offer_block(s, scale, len, b0, run_max, k);
    }
    if (bmax == kNegInf) {  // an all -inf block adds nothing, unless it hides a NaN (rare path)
      for (int64_t i = 0; i < len; ++i)
        if (load<D>(src + i) != load<D>(src + i)) acc.sum = acc.shifted = std::numeric_limits<double>::quiet_NaN();
      continue;
    }
    if (bmax > acc.m) acc.rescale_to(bmax);
    const float m = acc.m;
    // The exp pass is arithmetic-bound: it prefetches the next block of the range, one cache line per group
    // of kLanes (4 bytes per element: the whole of an fp32 block), so that the next max pass reads from cache
    // instead of waiting on memory.
    const char* next = reinterpret_cast<const char*>(src + len);
    const int64_t next_bytes = std::min(kBlock, v1 - b0 - len) * int64_t(sizeof(*src));
    float sum[kLanes] = {}, shifted[kLanes] = {};
    int64_t i = 0;
    for (; i + kLanes <= len; i += kLanes) {
      if (4 * i < next_bytes) __builtin_prefetch(next + 4 * i);
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) {
        // kDirect reads the logits again (now in L1): the same sums with top-k as without
        const float d = (kDirect ? load<D>(src + i + l) * inv_t : buf[i + l]) - m;
        const float e = vexp(d);
        sum[l] += e;
        shifted[l] += e * finite_floor(d);
      }
    }
    for (; i < len; ++i) {  // a range's tail: lane 0
      const float d = (kDirect ? load<D>(src + i) * inv_t : buf[i]) - m;
      const float e = vexp(d);
      sum[0] += e;
      shifted[0] += e * finite_floor(d);
    }
    float block_sum = 0.f, block_shifted = 0.f;
    for (int l = 0; l < kLanes; ++l) block_sum += sum[l], block_shifted += shifted[l];
    acc.sum += block_sum;
    acc.shifted += block_shifted;
  }
  return acc;
}

template <int D>
void fwd_impl(const void* logits, int64_t n, int64_t vocab, int64_t stride_row, const int64_t* tokens,
              int64_t ignore_index, float inv_t, int k, bool entropy_topk, float* logp, float* entropy, float* lse,
              int64_t* topk_ids, float* topk_logp, int64_t* topk_set, float* c, int threads) {
  using T = typename Elem<D>::T;
  const T* base = static_cast<const T*>(logits);
  // Few rows: split each row's vocabulary so every thread has work; partials merge exactly.
  int64_t splits = 1;
  if (n < 2 * threads) splits = std::max<int64_t>(1, std::min<int64_t>((2 * threads + n - 1) / std::max<int64_t>(n, 1),
                                                                         vocab / kMinSplit));
  const int64_t span = (vocab + splits - 1) / splits;
  std::vector<Partial> parts(size_t(n * splits));
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t w = 0; w < n * splits; ++w) {
    const int64_t i = w / splits, s = w % splits;
    if (tokens[i] == ignore_index) continue;
    const int64_t v0 = s * span, v1 = std::min(vocab, v0 + span);
    if (v0 < v1) parts[size_t(w)] = row_range<D>(base + i * stride_row, v0, v1, inv_t, k);
  }
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    const int64_t tok = tokens[i];
    if (tok == ignore_index) {
      logp[i] = entropy[i] = lse[i] = 0.f;
      for (int j = 0; j < k; ++j) { topk_ids[i * k + j] = 0; topk_logp[i * k + j] = 0.f; }
      if (entropy_topk) { for (int j = 0; j <= k; ++j) topk_set[i * (k + 1) + j] = -1; c[i] = 0.f; }
      continue;
    }
    Partial acc = std::move(parts[size_t(i * splits)]);
    for (int64_t s = 1; s < splits; ++s) merge(acc, parts[size_t(i * splits + s)], k);
    // k <= V fills the list; should it not, the slots past `filled` read as id 0, NaN (a guard, not a case)
    acc.top_val.resize(size_t(k));
    acc.top_id.resize(size_t(k));
    for (int j = acc.filled; j < k; ++j) acc.top_val[size_t(j)] = kNaN, acc.top_id[size_t(j)] = 0;
    const double log_sum = std::log(acc.sum);
    const double row_lse = double(acc.m) + log_sum;
    // A token outside [0, V) (possible only with value checks off) is never read: its logp is NaN.
    const bool tok_ok = tok >= 0 && tok < vocab;
    const double target = tok_ok ? double(load<D>(base + i * stride_row + tok) * inv_t)
                                 : std::numeric_limits<double>::quiet_NaN();
    lse[i] = float(row_lse);
    logp[i] = float(target - row_lse);
    double ent = log_sum - acc.shifted / acc.sum;
    for (int j = 0; j < k; ++j) {
      topk_ids[i * k + j] = acc.top_id[size_t(j)];
      topk_logp[i * k + j] = float(double(acc.top_val[size_t(j)]) - row_lse);
    }
    if (entropy_topk) {  // -sum p log p and c = sum (1 + log p) p over topk ∪ {token}
      double h = 0, cc = 0;
      bool token_in_top = false;
      for (int j = 0; j <= k; ++j) {
        const bool is_token_slot = j == k;
        const int64_t id = is_token_slot ? tok : acc.top_id[size_t(j)];
        if (!is_token_slot) token_in_top = token_in_top || id == tok;
        const bool duplicate = is_token_slot && token_in_top;
        topk_set[i * (k + 1) + j] = duplicate ? -1 : id;  // an out-of-range token stays: its NaN logp counts
        if (duplicate) continue;
        const double lp = is_token_slot ? target - row_lse : double(acc.top_val[size_t(j)]) - row_lse;
        const double p = std::exp(lp);
        const double lpf = std::max(lp, -double(FLT_MAX));
        h -= p * lpf;
        cc += p * (1 + lpf);
      }
      ent = h;
      c[i] = float(cc);
    }
    entropy[i] = float(ent);
  }
}

template <int D>
void bwd_impl(const void* logits, int64_t n, int64_t vocab, int64_t stride_row, const int64_t* tokens,
              int64_t ignore_index, float inv_t, int k, bool entropy_topk, const float* lse, const float* entropy,
              const int64_t* topk_set, const float* c, const float* g_logp, const float* g_entropy, void* grad_out,
              int threads) {
  using T = typename Elem<D>::T;
  const T* base = static_cast<const T*>(logits);
  T* grad = static_cast<T*>(grad_out);
  const int64_t chunks = (vocab + kMinSplit - 1) / kMinSplit;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t w = 0; w < n * chunks; ++w) {
    const int64_t i = w / chunks, v0 = (w % chunks) * kMinSplit, v1 = std::min(vocab, v0 + kMinSplit);
    const T* __restrict row = base + i * stride_row;
    T* __restrict out = grad + i * vocab;
    const int64_t tok = tokens[i];
    if (tok == ignore_index) {
#pragma omp simd
      for (int64_t v = v0; v < v1; ++v) Elem<D>::store(out + v, 0.f);
      continue;
    }
    const float l = lse[i], h = entropy[i], gl = g_logp[i], gh = g_entropy[i];
    const float cc = entropy_topk ? c[i] : 0.f;
    // d/ds of the bulk of the row; special ids (token, top-k set) are rewritten below in fp32.
    auto bulk = [=](float lp, float p) {  // by value: captured addresses would block vectorisation
      // p multiplies first, so a -inf logit (p = 0) gives 0 even when gh * (lp + h) would overflow.
      return entropy_topk ? p * (gh * cc - gl) : -(p * gl + p * (finite_floor(lp) + h) * gh);
    };
    if (entropy_topk) {  // two loops, so that neither has a branch inside
      const float a = (gh * cc - gl) * inv_t;
#pragma omp simd
      for (int64_t v = v0; v < v1; ++v) Elem<D>::store(out + v, vexp(load<D>(row + v) * inv_t - l) * a);
    } else {
      const float a = -gl * inv_t, b = -gh * inv_t;
#pragma omp simd
      for (int64_t v = v0; v < v1; ++v) {
        const float lp = load<D>(row + v) * inv_t - l;
        const float p = vexp(lp);
        Elem<D>::store(out + v, p * a + p * (finite_floor(lp) + h) * b);
      }
    }
    auto fix = [=](int64_t id) {  // full value of a special element, computed before any rounding
      if (id < v0 || id >= v1) return;
      const float lp = load<D>(row + id) * inv_t - l;
      const float p = vexp(lp);
      float g = bulk(lp, p);
      if (id == tok) g += gl;
      if (entropy_topk) {
        for (int j = 0; j <= k; ++j)
          if (topk_set[i * (k + 1) + j] == id) g -= (gh * p) * (1 + finite_floor(lp));  // p first: 0 at -inf
      }
      Elem<D>::store(out + id, g * inv_t);
    };
    fix(tok);
    if (entropy_topk)
      for (int j = 0; j <= k; ++j) {
        const int64_t id = topk_set[i * (k + 1) + j];
        if (id >= 0 && id != tok) fix(id);
      }
  }
}

}  // namespace

template <typename Fn>
void by_dtype(int dtype, Fn&& fn) {  // calls fn(std::integral_constant<int, D>) for the logits' dtype code
  switch (dtype) {
    case kF32: return fn(std::integral_constant<int, kF32>{});
    case kBF16: return fn(std::integral_constant<int, kBF16>{});
    default: return fn(std::integral_constant<int, kF16>{});
  }
}

void token_stats_fwd(const void* logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row,
                     const int64_t* tokens, int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk,
                     float* logp, float* entropy, float* lse, int64_t* topk_ids, float* topk_logp,
                     int64_t* topk_set, float* c, int num_threads) {
  by_dtype(dtype, [&](auto d) {
    fwd_impl<decltype(d)::value>(logits, n, vocab, stride_row, tokens, ignore_index, inv_temperature, topk,
                                 entropy_topk, logp, entropy, lse, topk_ids, topk_logp, topk_set, c, num_threads);
  });
}

void token_stats_bwd(const void* logits, int dtype, int64_t n, int64_t vocab, int64_t stride_row,
                     const int64_t* tokens, int64_t ignore_index, float inv_temperature, int topk, bool entropy_topk,
                     const float* lse, const float* entropy, const int64_t* topk_set, const float* c,
                     const float* g_logp, const float* g_entropy, void* grad, int num_threads) {
  by_dtype(dtype, [&](auto d) {
    bwd_impl<decltype(d)::value>(logits, n, vocab, stride_row, tokens, ignore_index, inv_temperature, topk,
                                 entropy_topk, lse, entropy, topk_set, c, g_logp, g_entropy, grad, num_threads);
  });
}

}  // namespace appo
