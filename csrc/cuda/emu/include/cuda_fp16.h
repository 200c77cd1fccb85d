// Emulator stand-in (see ../emu.h): IEEE half through the compiler's _Float16.
#pragma once
#include "cuda_runtime.h"

struct __half {
  _Float16 v;
};
struct __half2 {
  __half x, y;
};
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return __half{_Float16(f)}; }
inline float2 __half22float2(__half2 h) { return float2{float(h.x.v), float(h.y.v)}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
