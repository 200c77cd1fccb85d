// A tiny single-OS-thread SIMT emulator, just enough to run the appo_kernels CUDA sources on a CPU for
// logic tests (no GPU on the development machines). Every CUDA thread of a block is a fiber; blocks run one
// after another; warp intrinsics and __syncthreads are fiber barriers. Full-mask, convergent warp ops only
// (all the kernels use). Numerics differ from a GPU only in exp2 (exact here, ex2.approx there).
#pragma once
#include <stdint.h>
#include <string.h>

#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <tuple>
#include <type_traits>
#include <utility>

struct EmuDim3 {
  unsigned x, y, z;
};
extern EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

void block_barrier();
void warp_barrier();
// Lane values of the calling warp after every lane wrote its own (two warp barriers around the read).
uint64_t* warp_slots();

using KernelFn = void (*)(void*);
void run_grid(unsigned grid, unsigned block, KernelFn body, void* ctx);

template <typename T>
inline T exchange(T v, int src, bool keep_own) {
  static_assert(sizeof(T) <= 8, "");
  uint64_t* s = warp_slots();
  const int lane = threadIdx.x & 31;
  uint64_t bits = 0;
  memcpy(&bits, &v, sizeof(T));
  s[lane] = bits;
  warp_barrier();
  T r = v;
  if (!keep_own) memcpy(&r, &s[src & 31], sizeof(T));
  warp_barrier();
  return r;
}

}  // namespace emu

template <typename T> inline T __shfl_sync(unsigned, T v, int src) { return emu::exchange(v, src, false); }
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int m) {
  return emu::exchange(v, int(threadIdx.x & 31) ^ m, false);
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int lane = threadIdx.x & 31;
  return emu::exchange(v, lane - int(d), lane - int(d) < 0);
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned d) {
  const int lane = threadIdx.x & 31;
  return emu::exchange(v, lane + int(d), lane + int(d) > 31);
}
inline unsigned __ballot_sync(unsigned, int pred) {
  uint64_t* s = emu::warp_slots();
  const int lane = threadIdx.x & 31;
  s[lane] = pred ? 1 : 0;
  emu::warp_barrier();
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) m |= unsigned(s[l] & 1) << l;
  emu::warp_barrier();
  return m;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline void __syncthreads() { emu::block_barrier(); }

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
template <typename T> inline T __ldg(const T* p) { return *p; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
using std::fma;
using std::fmaf;
using std::fmaxf;
using std::sqrt;

// Kernel launch: the build script rewrites `k<<<grid, block, smem, stream>>>(args)` into
// `emu_launch(k, grid, block, args)`.
template <typename... P, typename... A>
inline void emu_launch(void (*k)(P...), unsigned grid, unsigned block, A&&... args) {
  struct Ctx {
    void (*k)(P...);
    std::tuple<std::decay_t<P>...> args;
  } ctx{k, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  emu::run_grid(grid, block, [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->k, x->args);
  }, &ctx);
}
