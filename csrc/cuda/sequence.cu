// Segmented sequence ops in CUDA: the reverse discounted scan (method §2) and the Branching Score (method §3).
//
// Both run one 256-thread block per segment [cu[b], cu[b + 1]) and accumulate in float64.
// reverse_scan walks the segment from its end in tiles of 1024 positions (4 consecutive per thread): each
// thread folds its positions into a pair (a, b) = (gamma^count, local suffix value), pairs combine
// associatively ((a1, b1) to the left of (a2, b2) gives (a1 a2, b1 + a1 b2)), a warp-shuffle + shared-memory
// scan gives every thread the value entering it from the right, and the tile's total is carried to the next
// tile on the left. branching_score makes three passes over the segment (sums, squared deviations, output).
#include "appo_cuda.h"
#include "common.cuh"

namespace appo_cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kItems = 4;
constexpr int kTile = kThreads * kItems;

__device__ __forceinline__ bool segment_bounds(const int64_t* cu, int64_t n, int64_t* lo, int64_t* hi) {
  const int64_t b = blockIdx.x;
  int64_t l = cu[b], h = cu[b + 1];
  if (l < 0) l = 0;
  if (h > n) h = n;
  *lo = l;
  *hi = h;
  return h > l;
}

__global__ void __launch_bounds__(kThreads)
reverse_scan_kernel(const float* __restrict__ x, const int64_t* __restrict__ cu, int64_t n, double g,
                    float* __restrict__ out) {
  __shared__ double s_a[kWarps], s_b[kWarps];
  int64_t lo, hi;
  if (!segment_bounds(cu, n, &lo, &hi)) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  double carry = 0.0;  // F at the first position right of the current tile (0 past the segment end)
  for (int64_t end = hi; end > lo; end -= kTile) {  // block-uniform
    const int64_t beg = end - kTile > lo ? end - kTile : lo;
    const int64_t t0 = beg + int64_t(tid) * kItems;
    const int64_t left = end - t0;
    const int cnt = left <= 0 ? 0 : (left >= kItems ? kItems : int(left));
    double xv[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) xv[i] = i < cnt ? double(__ldg(x + t0 + i)) : 0.0;
    // this thread's pair: value at t0 given 0 entering from the right, and gamma^cnt
    double a = 1.0, b = 0.0;
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i)
      if (i < cnt) {
        b = fma(g, b, xv[i]);
        a *= g;
      }
    // inclusive scan towards the left within the warp: lane l gets the pairs of lanes l..31 combined
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const double ra = __shfl_down_sync(kFull, a, off), rb = __shfl_down_sync(kFull, b, off);
      if (lane + off < 32) {
        b = fma(a, rb, b);
        a *= ra;
      }
    }
    double ea = __shfl_down_sync(kFull, a, 1), eb = __shfl_down_sync(kFull, b, 1);  // lanes l+1..31
    if (lane == 31) {
      ea = 1.0;
      eb = 0.0;
    }
    if (lane == 0) {
      s_a[warp] = a;
      s_b[warp] = b;
    }
    __syncthreads();
    double cw = carry;  // F entering this warp from the right
    for (int w = kWarps - 1; w > warp; --w) cw = fma(s_a[w], cw, s_b[w]);
    double f = fma(ea, cw, eb);  // F at t0 + cnt
#pragma unroll
    for (int i = kItems - 1; i >= 0; --i)
      if (i < cnt) {
        f = fma(g, f, xv[i]);
        out[t0 + i] = float(f);
      }
    double next = carry;  // F at `beg`, identical in every thread
#pragma unroll
    for (int w = kWarps - 1; w >= 0; --w) next = fma(s_a[w], next, s_b[w]);
    carry = next;
    __syncthreads();  // s_a / s_b are rewritten by the next tile
  }
}

__global__ void __launch_bounds__(kThreads)
branching_score_kernel(const float* __restrict__ entropy, const float* __restrict__ omega,
                       const bool* __restrict__ eligible, const int64_t* __restrict__ cu, int64_t n,
                       float* __restrict__ score, bool* __restrict__ candidate) {
  __shared__ double scratch[kWarps];
  int64_t lo, hi;
  if (!segment_bounds(cu, n, &lo, &hi)) return;
  const bool has_omega = omega != nullptr;  // block-uniform
  double cnt = 0.0, sh = 0.0, so = 0.0;
  for (int64_t t = lo + threadIdx.x; t < hi; t += kThreads)
    if (eligible[t]) {
      cnt += 1.0;
      sh += double(entropy[t]);
      if (has_omega) so += double(omega[t]);
    }
  cnt = block_sum<kThreads>(cnt, scratch);
  sh = block_sum<kThreads>(sh, scratch);
  if (has_omega) so = block_sum<kThreads>(so, scratch);
  const double count = cnt > 1.0 ? cnt : 1.0;
  const double mh = sh / count, mo = so / count;
  double vh = 0.0, vo = 0.0;
  for (int64_t t = lo + threadIdx.x; t < hi; t += kThreads)
    if (eligible[t]) {
      const double dh = double(entropy[t]) - mh;
      vh += dh * dh;
      if (has_omega) {
        const double d = double(omega[t]) - mo;
        vo += d * d;
      }
    }
  vh = block_sum<kThreads>(vh, scratch);
  if (has_omega) vo = block_sum<kThreads>(vo, scratch);
  const double dh = sqrt(vh / count) + 1e-6, dn = sqrt(vo / count) + 1e-6;
  for (int64_t t = lo + threadIdx.x; t < hi; t += kThreads) {
    if (!eligible[t]) {
      score[t] = neg_inf();
      candidate[t] = false;
      continue;
    }
    const double zh = (double(entropy[t]) - mh) / dh;
    if (has_omega) {
      const double zo = (double(omega[t]) - mo) / dn;
      score[t] = float(zh * zo);
      candidate[t] = zh > 0.0 && zo > 0.0;
    } else {
      score[t] = float(zh);
      candidate[t] = zh > 0.0;
    }
  }
}

}  // namespace
}  // namespace appo_cuda

using namespace appo_cuda;

extern "C" int appo_reverse_scan_cuda(const float* x, const int64_t* cu_seqlens, int64_t num_segments, int64_t n,
                                      float gamma, float* out, cudaStream_t stream) {
  if (num_segments < 0 || n < 0 || num_segments > INT32_MAX) return cudaErrorInvalidValue;
  if (num_segments == 0 || n == 0) return cudaSuccess;
  if (!x || !cu_seqlens || !out) return cudaErrorInvalidValue;
  reverse_scan_kernel<<<unsigned(num_segments), kThreads, 0, stream>>>(x, cu_seqlens, n, double(gamma), out);
  return int(cudaGetLastError());
}

extern "C" int appo_branching_score_cuda(const float* entropy, const float* omega, const bool* eligible,
                                         const int64_t* cu_seqlens, int64_t num_segments, int64_t n, float* score,
                                         bool* candidate, cudaStream_t stream) {
  if (num_segments < 0 || n < 0 || num_segments > INT32_MAX) return cudaErrorInvalidValue;
  if (num_segments == 0 || n == 0) return cudaSuccess;
  if (!entropy || !eligible || !cu_seqlens || !score || !candidate) return cudaErrorInvalidValue;
  branching_score_kernel<<<unsigned(num_segments), kThreads, 0, stream>>>(entropy, omega, eligible, cu_seqlens, n,
                                                                          score, candidate);
  return int(cudaGetLastError());
}
