"""Segmented scans and reductions over packed token vectors, in plain torch (the reference backend).

All functions take flat `[N]` vectors plus, per position, its rollout `seg` and in-rollout position `pos`
(see appo_kernels._layout). Everything is vectorised and O(N): no Python loop over tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._numerics import segment_zscore

# Width of the dense blocks of the chunked scan. Work is O(N * SCAN_CHUNK); recursion depth log_C(N).
SCAN_CHUNK = 32


def _block_scan(x: Tensor, seg: Tensor, step: float) -> Tensor:
    """F[i] = sum_{j >= i, seg[j] == seg[i]} step^(j - i) * x[j] over flat [n] with contiguous segments.

    Blocks of SCAN_CHUNK positions are solved with a dense decay matrix masked to the segment; the value at
    each block's head is the same scan one level up over the heads (a distance of one head is SCAN_CHUNK
    positions, hence step^SCAN_CHUNK), and is then carried back into every block. No step^-i rescaling,
    so nothing overflows for any step in (0, 1].
    """
    n, c = x.numel(), SCAN_CHUNK
    blocks = -(-n // c)
    pad = blocks * c - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        seg = torch.nn.functional.pad(seg, (0, pad), value=-1)
    xs, ss = x.view(blocks, c), seg.view(blocks, c)
    offs = torch.arange(c, device=x.device)
    dist = offs[None, :] - offs[:, None]                                    # [i, j] = j - i
    decay = torch.where(dist >= 0, torch.pow(step, dist.clamp(min=0).to(x.dtype)), 0).to(x.dtype)
    same = ss[:, None, :] == ss[:, :, None]                                 # [blocks, i, j]
    local = (torch.where(same, decay, 0) @ xs.unsqueeze(-1)).squeeze(-1)
    if blocks > 1:
        heads = _block_scan(local[:, 0].contiguous(), ss[:, 0].contiguous(), step ** c)
        nxt_val = torch.cat([heads[1:], heads.new_zeros(1)])
        nxt_seg = torch.cat([ss[1:, 0], ss.new_full((1,), -2)])           # -2: never a real or padding segment
        carry = torch.pow(step, (c - offs).to(x.dtype))                      # distance from i to the next head
        local = local + torch.where(ss == nxt_seg[:, None], carry * nxt_val[:, None], 0)
    return local.reshape(-1)[:n]


def _non_finite_suffix(x: Tensor, layout) -> Tensor:
    """What the non-finite entries at or after each position of its rollout make of a suffix sum: +inf or -inf
    when only that kind is present, NaN for a NaN or both infinities, 0 when none (gamma > 0 never scales an
    infinity away). A sequential scan gets the same; the dense blocks of `_block_scan` would spread it (0 * inf)."""
    n = x.numel()
    idx = torch.arange(n, device=x.device)
    kinds = torch.stack([x == float("inf"), x == float("-inf"), torch.isnan(x)])          # [3, N]
    at_or_after = torch.where(kinds, idx, n).flip(1).cummin(dim=1).values.flip(1)       # next index of each kind
    seg_end = layout.cu_seqlens[1:][layout.seg]
    pos_inf, neg_inf, nan = (at_or_after < seg_end).unbind(0)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out = torch.where(pos_inf, float("inf"), torch.where(neg_inf, float("-inf"), zero))
    return torch.where(nan | (pos_inf & neg_inf), float("nan"), out)


def reverse_discounted_scan(x: Tensor, layout, gamma: float, out: Tensor) -> None:
    """out[t] = sum_{k >= t in the same rollout} gamma^(k - t) * x[k] over flat [N] `x` (method §2, 5, 6).

    `layout` is an appo_kernels._layout.SeqLayout; exact, O(N), vectorised. A non-finite x[k] reaches only the
    positions t <= k of its own rollout, as in a sequential scan.
    """
    if x.numel() == 0:
        return
    finite = torch.isfinite(x)
    scan = _block_scan(torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), layout.seg,
                       float(gamma))
    nonfinite = _non_finite_suffix(x, layout)
    out.copy_(torch.where(nonfinite == 0, scan, nonfinite))


def branching_score(entropy: Tensor, omega, eligible: Tensor, layout, out) -> None:
    """method §3 over flat [N] vectors into out = (score, candidate): score = Z(H) * Z(omega) (or Z(H) without
    omega), -inf where not eligible; candidate = eligible & Z(H) > 0 (& Z(omega) > 0)."""
    seg, num_segments = layout.seg, layout.num_rollouts
    z_h = segment_zscore(entropy, eligible, seg, num_segments)
    if omega is None:
        score, candidate = z_h, eligible & (z_h > 0)
    else:
        z_o = segment_zscore(omega, eligible, seg, num_segments)
        score, candidate = z_h * z_o, eligible & (z_h > 0) & (z_o > 0)
    neg_inf = torch.full((), float("-inf"), dtype=score.dtype, device=score.device)
    out[0].copy_(torch.where(eligible, score, neg_inf))   # z-scores are float64 inside; out has entropy's dtype
    out[1].copy_(candidate)
