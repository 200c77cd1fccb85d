// Device helpers shared by the appo_kernels CUDA sources (not part of the ABI).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <cfloat>

namespace appo_cuda {

constexpr unsigned kFull = 0xffffffffu;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// 2^x with one MUFU op (ex2.approx, max rel. error ~2^-22): 2^-inf = +0 exactly, NaN stays NaN, results
// below 2^-126 flush to 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
#if defined(__CUDA_ARCH__)
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
#else  // host-side emulation (csrc/cuda/emu): exact exp2 with the same flush to zero
  y = exp2f(x);
  if (y < FLT_MIN) y = 0.f;
#endif
  return y;
}

// -inf -> -FLT_MAX (so that 0 * x == 0 for masked vocabulary); NaN stays NaN (torch's clamp_ semantics).
__device__ __forceinline__ float finite_floor(float x) { return x < -FLT_MAX ? -FLT_MAX : x; }

// ---- element types: 0 = float32, 1 = bfloat16, 2 = float16 ----
template <int DT> struct Elem;
template <> struct Elem<0> {
  static constexpr int kSize = 4;
  __device__ __forceinline__ static float load(const void* base, int64_t i) {
    return __ldg(static_cast<const float*>(base) + i);
  }
  __device__ __forceinline__ static void store(void* base, int64_t i, float v) { static_cast<float*>(base)[i] = v; }
  // 16 bytes = 4 elements.
  __device__ __forceinline__ static void unpack(const uint4& q, float* v) {
    v[0] = __uint_as_float(q.x); v[1] = __uint_as_float(q.y); v[2] = __uint_as_float(q.z); v[3] = __uint_as_float(q.w);
  }
  __device__ __forceinline__ static uint4 pack(const float* v) {
    return make_uint4(__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]), __float_as_uint(v[3]));
  }
};
// 16-byte vectors of a 2-byte type (8 elements), from the type's 2-element word() / pack2().
template <typename E>
struct TwoByteVectors {
  __device__ __forceinline__ static void unpack(const uint4& q, float* v) {
    E::word(q.x, v); E::word(q.y, v + 2); E::word(q.z, v + 4); E::word(q.w, v + 6);
  }
  __device__ __forceinline__ static uint4 pack(const float* v) {
    return make_uint4(E::pack2(v[0], v[1]), E::pack2(v[2], v[3]), E::pack2(v[4], v[5]), E::pack2(v[6], v[7]));
  }
};

template <> struct Elem<1> : TwoByteVectors<Elem<1>> {
  static constexpr int kSize = 2;
  __device__ __forceinline__ static float load(const void* base, int64_t i) {
    const unsigned short h = __ldg(static_cast<const unsigned short*>(base) + i);
    return __uint_as_float(uint32_t(h) << 16);
  }
  __device__ __forceinline__ static void store(void* base, int64_t i, float v) {
    static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  }
  __device__ __forceinline__ static void word(uint32_t w, float* v) {
    v[0] = __uint_as_float(w << 16);
    v[1] = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);  // .x (low half) = a
    uint32_t w;
    memcpy(&w, &h, 4);
    return w;
  }
};
template <> struct Elem<2> : TwoByteVectors<Elem<2>> {
  static constexpr int kSize = 2;
  __device__ __forceinline__ static float load(const void* base, int64_t i) {
    return __half2float(__ldg(static_cast<const __half*>(base) + i));
  }
  __device__ __forceinline__ static void store(void* base, int64_t i, float v) {
    static_cast<__half*>(base)[i] = __float2half_rn(v);
  }
  __device__ __forceinline__ static void word(uint32_t w, float* v) {
    __half2 h;
    memcpy(&h, &w, 4);
    const float2 f = __half22float2(h);
    v[0] = f.x;
    v[1] = f.y;
  }
  __device__ __forceinline__ static uint32_t pack2(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    uint32_t w;
    memcpy(&w, &h, 4);
    return w;
  }
};

// Elements of a row before its first 16-byte boundary (at most 16 / size - 1), capped at `len`.
__host__ __device__ __forceinline__ int64_t misaligned_head(const void* p, int elem_size, int64_t len) {
  const int64_t h = int64_t((16u - (uint32_t(reinterpret_cast<uintptr_t>(p)) & 15u)) & 15u) / elem_size;
  return h < len ? h : len;
}

// ---- block reductions (blockDim.x == kThreads, a multiple of 32) ----
template <int kThreads, typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch /* shared, kThreads / 32 */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) total += scratch[w];  // same order in every thread
  return total;
}

// ---- launch helpers ----
static inline int sm_count() {
  static std::atomic<int> cached[64];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 108;
  if (dev >= 0 && dev < 64) {
    const int c = cached[dev].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int count = 0;
  if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || count <= 0)
    return 108;
  if (dev >= 0 && dev < 64) cached[dev].store(count, std::memory_order_relaxed);
  return count;
}

}  // namespace appo_cuda
