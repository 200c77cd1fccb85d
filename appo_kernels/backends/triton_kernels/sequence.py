"""Segmented sequence kernels in Triton: the reverse discounted scan (method §2, 5, 6) and the branching score
(method §3), over flat `[N]` vectors packed by `layout.cu_seqlens` (see appo_kernels._layout).

One program per rollout (segment). Both kernels compute in float64 whatever the input dtype (float32 or
float64) and round once at the store, so they agree with the torch reference (which is exact, or float64)
to the output's precision: a float32 gamma raised to the thousandth power would otherwise drift by 1e-4.
Runs compiled on a GPU and on CPU under TRITON_INTERPRET=1 (no libdevice, no block pointers, no autotune).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

SCAN_BLOCK = 1024   # positions per tile of the scan
SCORE_BLOCK = 1024  # positions per tile of the branching-score passes
NUM_WARPS = 4


@triton.jit
def _affine_combine(a_later, b_later, a_cur, b_cur):
    # Element t is the map y -> a_t * y + b_t applied to out[t + 1]; compose with the (later) suffix.
    return a_cur * a_later, b_cur + a_cur * b_later


@triton.jit
def _segment_bounds(cu_ptr, seg, N):
    """Segment seg's [start, end), clamped into [0, N) whatever cu_seqlens holds (the Python side passes a valid
    partition; this keeps a direct call with a bad one inside the buffers)."""
    start = tl.minimum(tl.maximum(tl.load(cu_ptr + seg).to(tl.int64), 0), N)
    end = tl.minimum(tl.maximum(tl.load(cu_ptr + seg + 1).to(tl.int64), start), N)
    return start, end


@triton.jit
def _reverse_scan_kernel(x_ptr, cu_ptr, gamma_ptr, out_ptr, N, BLOCK: tl.constexpr):
    """out[t] = sum_{k >= t in t's segment} gamma^(k - t) * x[k], one program per segment.

    The segment is walked backwards in BLOCK tiles aligned to its end. Within a tile, a reverse associative
    scan over the affine maps (gamma, x[t]) gives A[i] = gamma^(tile_end - i) and B[i] = the tile-local
    discounted suffix sum; out[i] = B[i] + A[i] * carry, with carry = out at the first position after the tile.
    """
    seg = tl.program_id(0)
    start, end = _segment_bounds(cu_ptr, seg, N)
    gamma = tl.load(gamma_ptr)                      # float64
    n_tiles = (end - start + BLOCK - 1) // BLOCK
    idx = tl.arange(0, BLOCK)
    carry = gamma * 0.0                             # float64 scalar
    k = n_tiles * 0
    while k < n_tiles:  # `while`: `range` over a loaded bound breaks triton 3.6's interpreter
        k += 1
        offs = end - k * BLOCK + idx                # int64
        valid = offs >= start
        x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float64)
        a = tl.where(valid, gamma, 1.0)
        a_suf, b_suf = tl.associative_scan((a, x), 0, _affine_combine, reverse=True)
        out = b_suf + a_suf * carry
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid)
        carry = tl.sum(tl.where(idx == 0, out, 0.0), axis=0)


@triton.jit
def _eligible_tile(x_ptr, elig_ptr, offs, end):
    """The tile `offs` of a segment ending at `end`: (inside, eligible, x in float64); 0 outside."""
    inside = offs < end
    e = tl.load(elig_ptr + offs, mask=inside, other=0) != 0
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float64)
    return inside, e, x


@triton.jit
def _segment_moments(x_ptr, elig_ptr, start, end, idx, BLOCK: tl.constexpr):
    """(mean, population std) in float64 of x over the eligible positions of [start, end)."""
    total = tl.zeros((BLOCK,), dtype=tl.float64)
    count = tl.zeros((BLOCK,), dtype=tl.float64)
    lo = tl.full((BLOCK,), float("inf"), dtype=tl.float64)
    hi = tl.full((BLOCK,), float("-inf"), dtype=tl.float64)
    s = start
    while s < end:
        offs = s + idx
        s += BLOCK
        _, e, x = _eligible_tile(x_ptr, elig_ptr, offs, end)
        total += tl.where(e, x, 0.0)
        count += tl.where(e, 1.0, 0.0)
        lo = tl.minimum(lo, tl.where(e, x, float("inf")))
        hi = tl.maximum(hi, tl.where(e, x, float("-inf")))
    n = tl.maximum(tl.sum(count, axis=0), 1.0)
    mean = tl.sum(total, axis=0) / n
    # A constant segment must give z == 0 exactly (a rounding residue in the mean, divided by std + eps,
    # would flip the sign tests that define candidates): its mean is its value.
    lo_all = tl.min(lo, axis=0)
    hi_all = tl.max(hi, axis=0)
    mean = tl.where(lo_all == hi_all, lo_all, mean)
    sq = tl.zeros((BLOCK,), dtype=tl.float64)
    s = start
    while s < end:
        offs = s + idx
        s += BLOCK
        _, e, x = _eligible_tile(x_ptr, elig_ptr, offs, end)
        d = tl.where(e, x - mean, 0.0)
        sq += d * d
    std = tl.sqrt(tl.sum(sq, axis=0) / n)
    return mean, std


@triton.jit
def _branching_score_kernel(h_ptr, o_ptr, elig_ptr, cu_ptr, score_ptr, cand_ptr, N,
                            HAS_OMEGA: tl.constexpr, BLOCK: tl.constexpr):
    """method §3 for one segment: z-scores over its eligible positions, score = z_H * z_O (or z_H), -inf where
    not eligible; candidate = eligible & z_H > 0 (& z_O > 0)."""
    seg = tl.program_id(0)
    start, end = _segment_bounds(cu_ptr, seg, N)
    idx = tl.arange(0, BLOCK).to(tl.int64)
    eps = tl.full((), 1e-6, tl.float64)
    mean_h, std_h = _segment_moments(h_ptr, elig_ptr, start, end, idx, BLOCK)
    denom_h = std_h + eps
    if HAS_OMEGA:
        mean_o, std_o = _segment_moments(o_ptr, elig_ptr, start, end, idx, BLOCK)
        denom_o = std_o + eps
    s = start
    while s < end:
        offs = s + idx
        s += BLOCK
        inside, e, h = _eligible_tile(h_ptr, elig_ptr, offs, end)
        z_h = (h - mean_h) / denom_h
        if HAS_OMEGA:
            o = tl.load(o_ptr + offs, mask=inside, other=0.0).to(tl.float64)
            z_o = (o - mean_o) / denom_o
            score = z_h * z_o
            cand = e & (z_h > 0) & (z_o > 0)
        else:
            score = z_h
            cand = e & (z_h > 0)
        score = tl.where(e, score, float("-inf"))
        tl.store(score_ptr + offs, score.to(score_ptr.dtype.element_ty), mask=inside)
        tl.store(cand_ptr + offs, cand.to(tl.int8), mask=inside)


def _cu(layout, device: torch.device) -> Tensor:
    return layout.cu_seqlens.to(device=device, dtype=torch.int64).contiguous()


def _scan_block(cu: Tensor) -> int:
    """Tile width of the scan. The interpreter (CPU tensors) runs tl.associative_scan as a Python loop over
    every lane, padding included, so there the tile is fitted to the longest segment; a GPU keeps SCAN_BLOCK
    (fitting it would cost a device-to-host sync)."""
    if cu.device.type != "cpu" or cu.numel() < 2:
        return SCAN_BLOCK
    longest = int((cu[1:] - cu[:-1]).max())
    return max(16, min(SCAN_BLOCK, triton.next_power_of_2(max(longest, 1))))


def reverse_discounted_scan(x: Tensor, layout, gamma: float, out: Tensor) -> None:
    """out[t] = sum_{k >= t in the same rollout} gamma^(k - t) * x[k] over flat float32/float64 [N] `x`."""
    x = x.contiguous()
    if x.numel() == 0 or layout.num_rollouts == 0:
        return
    g = torch.full((1,), float(gamma), dtype=torch.float64, device=x.device)
    cu = _cu(layout, x.device)
    _reverse_scan_kernel[(layout.num_rollouts,)](x, cu, g, out, x.numel(), BLOCK=_scan_block(cu),
                                                 num_warps=NUM_WARPS)


def branching_score(entropy: Tensor, omega: Tensor | None, eligible: Tensor, layout, out) -> None:
    """method §3 over flat [N] vectors into out = (score in entropy's dtype, -inf where not eligible;
    candidate bool)."""
    entropy = entropy.contiguous()
    omega = None if omega is None else omega.to(entropy.dtype).contiguous()
    elig = eligible.contiguous().view(torch.uint8) if eligible.dtype == torch.bool else (eligible != 0).to(torch.uint8)
    score, candidate = out
    if entropy.numel() == 0 or layout.num_rollouts == 0:
        return
    _branching_score_kernel[(layout.num_rollouts,)](
        entropy, entropy if omega is None else omega, elig, _cu(layout, entropy.device), score,
        candidate.view(torch.int8), entropy.numel(), HAS_OMEGA=omega is not None, BLOCK=SCORE_BLOCK,
        num_warps=NUM_WARPS)
