// Fiber scheduler of the SIMT emulator (x86-64 System V only).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "emu.h"

EmuDim3 threadIdx, blockIdx, blockDim, gridDim;

extern "C" void emu_switch(void** save_sp, void* new_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");

namespace emu {
namespace {

constexpr size_t kStack = 256 * 1024;

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  unsigned tid = 0;
  bool done = false;
};

struct Barrier {
  unsigned count = 0;
  unsigned gen = 0;
};

std::vector<Fiber> fibers;
void* main_sp = nullptr;
int cur = -1;
unsigned live = 0;
unsigned cur_block = 0;
KernelFn body_fn = nullptr;
void* body_ctx = nullptr;
Barrier block_bar;
std::vector<Barrier> warp_bars;
std::vector<uint64_t> slots;

void enter(int f) {
  threadIdx = EmuDim3{fibers[f].tid, 0, 0};
  blockIdx = EmuDim3{cur_block, 0, 0};
}

// Switch from fiber `from` (-1: main) to the next unfinished fiber after it, or back to main.
void switch_next(int from) {
  const int n = int(fibers.size());
  int next = -1;
  for (int i = 1; i <= n; ++i) {
    const int c = ((from < 0 ? -1 : from) + i + n) % n;
    if (!fibers[c].done) { next = c; break; }
  }
  void** save = from < 0 ? &main_sp : &fibers[from].sp;
  if (next < 0) { cur = -1; emu_switch(save, main_sp); return; }
  if (next == from) return;
  cur = next;
  emu_switch(save, fibers[next].sp);
}

void yield() {
  const int me = cur;
  bool other = false;
  for (size_t i = 0; i < fibers.size() && !other; ++i) other = int(i) != me && !fibers[i].done;
  if (!other) { std::fprintf(stderr, "emu: deadlock (a barrier no other thread can reach)\n"); std::abort(); }
  switch_next(me);
  cur = me;
  enter(me);
}

void release_block_if_full() {
  if (block_bar.count > 0 && block_bar.count >= live) { block_bar.count = 0; ++block_bar.gen; }
}

extern "C" void emu_fiber_main() {
  const int me = cur;
  enter(me);
  body_fn(body_ctx);
  fibers[me].done = true;
  --live;
  release_block_if_full();
  switch_next(me);
  std::abort();  // never resumed
}

void prepare(int f) {
  Fiber& fb = fibers[f];
  if (!fb.stack) fb.stack = static_cast<char*>(std::aligned_alloc(64, kStack));
  uintptr_t top = (reinterpret_cast<uintptr_t>(fb.stack) + kStack) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                      // fake return address of emu_fiber_main (rsp % 16 == 8)
  *--sp = reinterpret_cast<void*>(&emu_fiber_main);     // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;          // rbp rbx r12..r15
  fb.sp = sp;
  fb.done = false;
}

}  // namespace

void block_barrier() {
  const unsigned g = block_bar.gen;
  ++block_bar.count;
  release_block_if_full();
  while (block_bar.gen == g) yield();
}

void warp_barrier() {
  Barrier& b = warp_bars[threadIdx.x >> 5];
  const unsigned g = b.gen;
  if (++b.count == 32) { b.count = 0; ++b.gen; return; }
  while (b.gen == g) yield();
}

uint64_t* warp_slots() { return &slots[(threadIdx.x >> 5) * 32]; }

void run_grid(unsigned grid, unsigned block, KernelFn body, void* ctx) {
  if (block == 0 || block % 32 != 0) { std::fprintf(stderr, "emu: block size must be a multiple of 32\n"); std::abort(); }
  if (fibers.size() < block) fibers.resize(block);
  fibers.resize(block);
  warp_bars.assign(block / 32, Barrier{});
  slots.assign(block, 0);
  blockDim = EmuDim3{block, 1, 1};
  gridDim = EmuDim3{grid, 1, 1};
  body_fn = body;
  body_ctx = ctx;
  for (unsigned b = 0; b < grid; ++b) {
    cur_block = b;
    block_bar = Barrier{};
    for (unsigned t = 0; t < block; ++t) { fibers[t].tid = t; prepare(int(t)); }
    live = block;
    cur = 0;
    emu_switch(&main_sp, fibers[0].sp);
    for (auto& w : warp_bars) if (w.count) { std::fprintf(stderr, "emu: divergent warp op\n"); std::abort(); }
  }
}

}  // namespace emu
