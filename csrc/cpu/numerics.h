// Scalar helpers written so that GCC vectorises the loops that call them (no libm calls inside).
#pragma once
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace appo {

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {  // round to nearest even; NaN stays NaN (branch-free)
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t quiet_nan = (u >> 16) | 0x40u;
  return uint16_t((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

template <int D> struct Elem;
template <> struct Elem<0> { using T = float;    static float load(const T* p) { return *p; }
                             static void store(T* p, float v) { *p = v; } };
template <> struct Elem<1> { using T = uint16_t; static float load(const T* p) { return bf16_to_float(*p); }
                             static void store(T* p, float v) { *p = float_to_bf16(v); } };
template <> struct Elem<2> { using T = _Float16; static float load(const T* p) { return float(*p); }
                             static void store(T* p, float v) { *p = T(v); } };

// exp(x) in float, Cephes-style: Cody-Waite reduction by ln 2 and a degree-6 polynomial (about 1 ulp).
// Branch-free so that loops vectorise; results below FLT_MIN flush to 0 (so exp(-inf) == 0 exactly),
// NaN propagates.
inline float vexp(float x) {
  const float xc = 88.3762626647949f < x ? 88.3762626647949f : x;  // NaN stays NaN
  // Round to nearest by the 1.5 * 2^23 trick; t's low mantissa bits hold n, so 2^n is (bits(t) << 23) + bias.
  const float t = __builtin_fmaf(xc, 1.44269504088896341f, 12582912.0f);
  const float n = t - 12582912.0f;
  float r = __builtin_fmaf(n, -0.693359375f, xc);
  r = __builtin_fmaf(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = __builtin_fmaf(p, r, 1.3981999507e-3f);
  p = __builtin_fmaf(p, r, 8.3334519073e-3f);
  p = __builtin_fmaf(p, r, 4.1665795894e-2f);
  p = __builtin_fmaf(p, r, 1.6666665459e-1f);
  p = __builtin_fmaf(p, r, 5.0000001201e-1f);
  const float y = __builtin_fmaf(p, r * r, r) + 1.0f;
  const float scaled = y * bits_to_float((float_to_bits(t) << 23) + (127u << 23));  // n in [-126, 128] here
  return xc < -87.33654475f ? 0.0f : scaled;
}

// -inf -> -FLT_MAX, so that 0 * x == 0 for masked vocabulary entries.
inline float finite_floor(float x) { return x < -FLT_MAX ? -FLT_MAX : x; }

}  // namespace appo
