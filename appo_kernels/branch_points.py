"""Choosing branch points per prompt group (SPEC 4)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._layout import per_token, seq_layout
from ._validation import require_int, require_int_arg, require_shape, require_same_device, value_checks_enabled


class BranchPoints(NamedTuple):
    """Chosen branch points, `[G, num_branches]` each, in selection order (cyclic repeats last).

    rollout    int64  index of the rollout (row of `score`, or packed sequence) to fork
    position   int64  t: the branch keeps tokens 0..t and samples from t + 1
    score      float  the Branching Score at that token
    candidate  bool   whether it was a strict candidate (else a fallback fill)
    valid      bool   False for groups without any eligible position (rollout = position = -1 there)
    """
    rollout: Tensor
    position: Tensor
    score: Tensor
    candidate: Tensor
    valid: Tensor


def resolve_num_groups(group_ids: Tensor, num_groups: Optional[int]) -> int:
    """G from `num_groups` or (a host sync) from the ids; checks ids lie in [0, G)."""
    if num_groups is None:
        num_groups = int(group_ids.max()) + 1 if group_ids.numel() else 0
    else:
        require_int_arg("num_groups", num_groups, minimum=1)
    if value_checks_enabled() and group_ids.numel():
        lo, hi = int(group_ids.min()), int(group_ids.max())
        if lo < 0 or hi >= num_groups:
            bad = lo if lo < 0 else hi
            raise ValueError(f"group_ids: expected values in [0, {num_groups}) (num_groups), got {bad}")
    return num_groups


def select_branch_points(score: Tensor, candidate: Tensor, group_ids: Tensor, num_branches: int, *,
                         cu_seqlens: Optional[Tensor] = None, num_groups: Optional[int] = None,
                         max_len: Optional[int] = None, max_per_rollout: Optional[int] = None,
                         min_distance: int = 0) -> BranchPoints:
    """Pick `num_branches` fork positions per group from the pooled positions of its initial rollouts.

    Greedy in the order: candidates first, then the other eligible positions (finite score); within each
    tier score descending, then rollout ascending, then position ascending. A group with `0 < n <
    num_branches` usable positions repeats them cyclically (slot j takes chosen slot j mod n).

    Args:
        score: float `[R, T]` (padded) or `[N]` with `cu_seqlens` (packed); -inf / NaN = not eligible.
        candidate: bool, same shape.
        group_ids: integer `[R]`, the group (prompt) of each rollout, values in `[0, G)`.
        num_branches: branches per group (>= 1).
        num_groups: G; None infers `group_ids.max() + 1` (a host sync).
        max_len: skip positions `t >= max_len - 1` (no room left to generate).
        max_per_rollout: at most this many distinct positions per rollout (None = no cap).
        min_distance: skip positions closer than this to a chosen one in the same rollout (0/1 = off).

    Returns:
        BranchPoints, each `[G, num_branches]`. Runs in O(num_branches * N), vectorised over groups.
    """
    lay = seq_layout("score", score, cu_seqlens)
    s = per_token("score", score, lay)
    if candidate is None or candidate.dtype != torch.bool:
        raise TypeError(f"candidate: expected a bool tensor, got "
                        f"{'None' if candidate is None else candidate.dtype}")
    cand = per_token("candidate", candidate, lay, kind="any")
    group_ids = require_int("group_ids", group_ids)
    require_shape("group_ids", group_ids, (lay.num_rollouts,), "[R], one per rollout")
    require_same_device(score=score, group_ids=group_ids)
    num_branches = require_int_arg("num_branches", num_branches, minimum=1)
    if max_len is not None:
        require_int_arg("max_len", max_len, minimum=1)
    if max_per_rollout is not None:
        require_int_arg("max_per_rollout", max_per_rollout, minimum=1)
    min_distance = require_int_arg("min_distance", min_distance, minimum=0)
    groups = resolve_num_groups(group_ids, num_groups)

    device, n = s.device, s.numel()
    seg, pos = lay.seg, lay.pos
    s64 = s.to(torch.float64)
    eligible = (s64 > float("-inf")) & ~torch.isnan(s64)
    if max_len is not None:
        eligible &= pos < max_len - 1
    grp = group_ids.clamp(0, max(groups - 1, 0))[seg]   # in range already, unless value checks are off
    # Total order: tier (candidates, then the rest), score desc, then flat index = (rollout, position).
    tier = torch.where(eligible & cand, 0, torch.where(eligible, 1, 2))
    by_score = torch.argsort(torch.where(eligible, -s64, torch.inf), stable=True)
    order = by_score[torch.argsort(tier[by_score], stable=True)]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)

    # Index n is a dummy position (no rollout, score -inf) standing for "nothing chosen".
    order = torch.cat([order, order.new_full((1,), n)])
    seg_x = torch.cat([seg, seg.new_full((1,), -1)])
    pos_x = torch.cat([pos, pos.new_full((1,), -1)])
    out_dtype = torch.float64 if s.dtype == torch.float64 else torch.float32
    score_x = torch.cat([s.to(out_dtype), s.new_full((1,), float("-inf"), dtype=out_dtype)])
    cand_x = torch.cat([cand, cand.new_zeros(1)])

    available = torch.cat([eligible, eligible.new_zeros(1)])
    taken = torch.zeros(lay.num_rollouts + 1, dtype=torch.int64, device=device)
    chosen = torch.full((groups, num_branches), n, dtype=torch.int64, device=device)
    for j in range(num_branches):
        key = torch.where(available[:n], rank, n)
        best_rank = torch.full((groups,), n, dtype=torch.int64, device=device).scatter_reduce(0, grp, key, "amin")
        best = order[best_rank]                                    # n where the group has nothing left
        chosen[:, j] = best
        available[best] = False
        if max_per_rollout is not None:
            spare = torch.full_like(best, lay.num_rollouts)        # the dummy counts into a spare slot
            taken.index_add_(0, torch.where(best < n, seg_x[best], spare), torch.ones_like(best))
            available[:n] &= taken[seg] < max_per_rollout
        if min_distance > 1:
            near = (seg == seg_x[best][grp]) & ((pos - pos_x[best][grp]).abs() < min_distance)
            available[:n] &= ~near

    count = (chosen < n).sum(dim=1, keepdim=True)
    slot = torch.arange(num_branches, device=device)[None, :] % count.clamp(min=1)
    idx = chosen.gather(1, slot)
    return BranchPoints(rollout=seg_x[idx], position=pos_x[idx], score=score_x[idx], candidate=cand_x[idx],
                        valid=idx < n)
