"""Segmented scans and reductions over packed token vectors, in plain torch (the reference backend).

All functions take flat `[N]` vectors plus, per position, its rollout `seg` and in-rollout position `pos`
(see appo_kernels._layout). Everything is vectorised and O(N): no Python loop over tokens.
"""
from __future__ import annotations

import torch
from torch import Tensor

# Width of the dense blocks of the chunked scan. Work is O(N * SCAN_CHUNK); recursion depth log_C(N).
SCAN_CHUNK = 32


def _decay(gamma: float, dist: Tensor, same: Tensor, dtype: torch.dtype) -> Tensor:
    """gamma ** dist where `same`, else 0 (dist clamped first so masked entries never overflow)."""
    if gamma == 1.0:
        return same.to(dtype)
    w = torch.pow(torch.tensor(gamma, dtype=dtype, device=dist.device), dist.clamp(min=0).to(dtype))
    return torch.where(same, w, torch.zeros_like(w))


def reverse_discounted_scan(x: Tensor, seg: Tensor, pos: Tensor, gamma: float) -> Tensor:
    """F[i] = sum_{j >= i, seg[j] == seg[i]} gamma^(pos[j] - pos[i]) * x[j]   (x, seg, pos: [N]).

    Segments must be contiguous with increasing `pos`. Blocks of SCAN_CHUNK positions are solved with a
    small dense decay matrix; the value at each block's first position is the same scan one level up,
    over the block heads (whose `pos` differences are again the distances), which is then carried back
    into each block. Exact for any gamma in (0, 1]: no gamma^-t rescaling, so nothing overflows.
    """
    n = x.numel()
    c = SCAN_CHUNK
    if n == 0:
        return x.clone()
    blocks = -(-n // c)
    pad = blocks * c - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
        seg = torch.nn.functional.pad(seg, (0, pad), value=-1)
        pos = torch.nn.functional.pad(pos, (0, pad))
    xs, ss, ps = x.view(blocks, c), seg.view(blocks, c), pos.view(blocks, c)
    dist = ps[:, None, :] - ps[:, :, None]                        # [blocks, i, j] = pos[j] - pos[i]
    upper = torch.ones(c, c, dtype=torch.bool, device=x.device).triu()
    same = (ss[:, None, :] == ss[:, :, None]) & upper
    local = (_decay(gamma, dist, same, x.dtype) @ xs.unsqueeze(-1)).squeeze(-1)
    if blocks > 1:
        heads = reverse_discounted_scan(local[:, 0].contiguous(), ss[:, 0].contiguous(), ps[:, 0].contiguous(),
                                        gamma)
        nxt_val = torch.cat([heads[1:], heads.new_zeros(1)])
        nxt_seg = torch.cat([ss[1:, 0], ss.new_full((1,), -2)])   # -2: never a real (or padding) segment
        nxt_pos = torch.cat([ps[1:, 0], ps.new_zeros(1)])
        carry = _decay(gamma, nxt_pos[:, None] - ps, ss == nxt_seg[:, None], x.dtype)
        local = local + carry * nxt_val[:, None]
    return local.reshape(-1)[:n]


def segment_sum(x: Tensor, seg: Tensor, num_segments: int) -> Tensor:
    return x.new_zeros(num_segments).index_add_(0, seg, x)


def segment_zscore(x: Tensor, include: Tensor, seg: Tensor, num_segments: int, eps: float = 1e-6,
                   scale: bool = True) -> Tensor:
    """(x - mean) / (std + eps) with mean and population std over the `include`d positions of each segment
    (just x - mean when not `scale`).

    Computed in float64 so that a constant segment gives exactly 0 (a rounding residue would otherwise be
    divided by eps and flip the sign tests that define candidates). Values at excluded positions are
    meaningless; callers mask them.
    """
    xd = torch.where(include, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    w = include.to(torch.float64)
    count = segment_sum(w, seg, num_segments).clamp(min=1)
    mean = segment_sum(xd, seg, num_segments) / count
    centred = xd - mean[seg]
    if not scale:
        return centred
    dev = centred * w
    std = torch.sqrt(segment_sum(dev * dev, seg, num_segments) / count)
    return centred / (std[seg] + eps)


def branching_score(entropy: Tensor, omega, eligible: Tensor, seg: Tensor, num_segments: int):
    """SPEC 3: score = Z(H) * Z(omega) (or Z(H) without omega) and candidate, over flat [N] vectors."""
    z_h = segment_zscore(entropy, eligible, seg, num_segments)
    if omega is None:
        score, candidate = z_h, eligible & (z_h > 0)
    else:
        z_o = segment_zscore(omega, eligible, seg, num_segments)
        score, candidate = z_h * z_o, eligible & (z_h > 0) & (z_o > 0)
    neg_inf = torch.full((), float("-inf"), dtype=score.dtype, device=score.device)
    return torch.where(eligible, score, neg_inf), candidate
