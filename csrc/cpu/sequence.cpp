// Segmented sequence ops (method §2, 3, 5, 6) on CPU: O(N), OpenMP over segments, double accumulation.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "appo_cpu.h"

namespace appo {

namespace {

// Segment b's positions [lo, hi), clamped into [0, n): whatever cu_seqlens holds (the Python side passes a
// valid partition; this guard is what keeps a direct call with a bad one inside the buffers).
inline void segment_bounds(const int64_t* cu, int64_t b, int64_t n, int64_t* lo, int64_t* hi) {
  *lo = std::min(std::max<int64_t>(cu[b], 0), n);
  *hi = std::min(std::max(cu[b + 1], *lo), n);
}

}  // namespace

template <typename T>
void reverse_scan(const T* x, const int64_t* cu, int64_t num_segments, int64_t n, double gamma, T* out,
                  int threads) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t b = 0; b < num_segments; ++b) {
    int64_t lo, hi;
    segment_bounds(cu, b, n, &lo, &hi);
    double acc = 0;
    for (int64_t t = hi - 1; t >= lo; --t) {
      acc = double(x[t]) + gamma * acc;
      out[t] = T(acc);
    }
  }
}

namespace {

template <typename T>
void zscores(const T* x, const bool* eligible, int64_t lo, int64_t hi, double* mean, double* inv_std) {
  double sum = 0, lowest = INFINITY, highest = -INFINITY;
  int64_t count = 0;
  for (int64_t t = lo; t < hi; ++t)
    if (eligible[t]) {
      const double v = double(x[t]);
      sum += v;
      lowest = v < lowest ? v : lowest;
      highest = v > highest ? v : highest;
      ++count;
    }
  // A constant segment's mean is its value: sum / count may leave a residue that eps would magnify.
  *mean = count ? (lowest == highest ? lowest : sum / double(count)) : 0;
  double var = 0;
  for (int64_t t = lo; t < hi; ++t)
    if (eligible[t]) { const double d = double(x[t]) - *mean; var += d * d; }
  *inv_std = 1.0 / (std::sqrt(count ? var / double(count) : 0) + 1e-6);
}

}  // namespace

template <typename T>
void branching_score(const T* entropy, const T* omega, const bool* eligible, const int64_t* cu,
                     int64_t num_segments, int64_t n, T* score, bool* candidate, int threads) {
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads)
  for (int64_t b = 0; b < num_segments; ++b) {
    int64_t lo, hi;
    segment_bounds(cu, b, n, &lo, &hi);
    double mh, ih, mo = 0, io = 0;
    zscores(entropy, eligible, lo, hi, &mh, &ih);
    if (omega) zscores(omega, eligible, lo, hi, &mo, &io);
    for (int64_t t = lo; t < hi; ++t) {
      if (!eligible[t]) {
        score[t] = -std::numeric_limits<T>::infinity();
        candidate[t] = false;
        continue;
      }
      const double zh = (double(entropy[t]) - mh) * ih;
      const double zo = omega ? (double(omega[t]) - mo) * io : 1.0;
      score[t] = T(omega ? zh * zo : zh);
      candidate[t] = zh > 0 && zo > 0;
    }
  }
}

template void reverse_scan<float>(const float*, const int64_t*, int64_t, int64_t, double, float*, int);
template void reverse_scan<double>(const double*, const int64_t*, int64_t, int64_t, double, double*, int);
template void branching_score<float>(const float*, const float*, const bool*, const int64_t*, int64_t, int64_t,
                                     float*, bool*, int);
template void branching_score<double>(const double*, const double*, const bool*, const int64_t*, int64_t, int64_t,
                                      double*, bool*, int);

}  // namespace appo
