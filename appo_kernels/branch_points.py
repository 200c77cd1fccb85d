"""Choosing branch points per prompt group (method §4)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._layout import per_token, seq_layout
from ._numerics import compute_dtype
from ._validation import (require_choice, require_float, require_int, require_int_arg, require_same_device,
                          require_shape, value_checks_enabled)


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
    dtype = compute_dtype(s.dtype)
    score_x = torch.cat([s.to(dtype), s.new_full((1,), float("-inf"), dtype=dtype)])
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


FORK_MODES = ("resample", "topk")
TOPK_CHOICES = ("best", "sample")


class ForkRequest(NamedTuple):
    """One branch to generate, as Python values (`ForkRequests.tolist`).

    The branch is the parent's tokens `0 .. position - 1`, then `token` at `position`, then a continuation
    sampled from `position + 1`; `split` is the last position it shares with the parent."""
    group: int
    slot: int
    rollout: int
    position: int
    token: int
    split: int
    score: float


class ForkRequests(NamedTuple):
    """The branches to generate for chosen branch points, `[G, num_branches]` each (as `BranchPoints`).

    rollout   int64  the parent rollout (row of the per-token inputs, or packed sequence)
    position  int64  t, the chosen branch point
    token     int64  the branch's token at t: the parent's own (mode "resample") or an alternative from the
                     top-k at t (mode "topk")
    split     int64  the last position the branch shares with its parent: t ("resample") or t - 1 ("topk";
                     -1 when t is the first position of the sequence)
    score     float  the Branching Score at t
    valid     bool   as in `BranchPoints`; where False the other fields are -1 (score -inf)
    """
    rollout: Tensor
    position: Tensor
    token: Tensor
    split: Tensor
    score: Tensor
    valid: Tensor

    def tolist(self) -> list[ForkRequest]:
        """The valid requests as Python values, group by group in slot order, in one device-to-host copy."""
        ints = torch.stack([self.rollout, self.position, self.token, self.split], -1).to(torch.float64)
        table = torch.cat([ints, self.score.to(torch.float64)[..., None],
                           self.valid.to(torch.float64)[..., None]], -1).cpu().tolist()
        return [ForkRequest(g, j, int(r), int(p), int(tok), int(s), score)
                for g, row in enumerate(table) for j, (r, p, tok, s, score, ok) in enumerate(row) if ok]


def fork_requests(branch_points: BranchPoints, tokens: Tensor, *, mode: str = "resample",
                  topk_ids: Optional[Tensor] = None, topk_logp: Optional[Tensor] = None, choice: str = "best",
                  generator: Optional[torch.Generator] = None,
                  cu_seqlens: Optional[Tensor] = None) -> ForkRequests:
    """The branches to generate at `branch_points` (method §4): for each chosen token t of a parent rollout,
    the branch's prefix and the token it places at t, on the device without a host sync (beyond the value
    checks, which `set_value_checks(False)` turns off); `ForkRequests.tolist()` then makes the one copy a
    rollout loop needs.

    - mode "resample": the branch keeps the parent's tokens 0..t (its token at t is the parent's own) and
      samples from t + 1; split = t.
    - mode "topk" (contrastive branch): the branch keeps tokens 0..t-1 and replaces the parent's token a_t by
      an alternative from `topk_ids[t]`, then samples from t + 1; split = t - 1 (-1 at t = 0, which
      `procedure_advantages` takes as "shares no token"). Parent and branch differ
      exactly at the scored decision. `choice="best"`: the most likely top-k token other than a_t (the same
      token for every branch at t); `choice="sample"`: one drawn from the top-k probabilities
      (`topk_logp`) renormalised without a_t, with `generator`. The substituted token was not sampled
      from the policy: whether it is trained is the caller's choice.

    Args:
        branch_points: from `select_branch_points`, over the rollouts of `tokens`.
        tokens: integer `[R, T]` (padded) or `[N]` with `cu_seqlens` (packed): the parents' tokens.
        topk_ids: integer `[R, T, k]` / `[N, k]` with k >= 2, most likely first (`branching_score(...,
            topk=k).topk_ids`); mode "topk" only.
        topk_logp: float, same shape, their log-probabilities; `choice="sample"` only.
        generator: the random stream of `choice="sample"` (None: torch's global one); `[G, num_branches]`
            uniforms are drawn, whatever the number of valid points.

    Returns:
        ForkRequests, each `[G, num_branches]`.
    """
    if not isinstance(branch_points, BranchPoints):
        raise TypeError(f"branch_points: expected the BranchPoints of select_branch_points, got "
                        f"{type(branch_points).__name__}")
    mode = require_choice("mode", mode, FORK_MODES)
    choice = require_choice("choice", choice, TOPK_CHOICES)
    lay = seq_layout("tokens", tokens, cu_seqlens)
    flat_tokens = require_int("tokens", tokens).reshape(-1)
    bp = branch_points
    require_same_device(tokens=tokens, branch_points=bp.rollout)
    valid = bp.valid
    if value_checks_enabled() and bool(valid.any()):
        lengths = lay.cu_seqlens[1:] - lay.cu_seqlens[:-1]
        r, t = bp.rollout[valid], bp.position[valid]
        if int(r.min()) < 0 or int(r.max()) >= lay.num_rollouts:
            raise ValueError(f"branch_points: rollout index outside the {lay.num_rollouts} rollouts of tokens")
        if bool(((t < 0) | (t >= lengths[r])).any()):
            raise ValueError("branch_points: position outside its rollout in tokens")
    index = torch.where(valid, lay.cu_seqlens[bp.rollout.clamp(min=0)] + bp.position, 0)   # flat, [G, B]
    none = torch.full_like(bp.rollout, -1)
    if mode == "resample":
        token, split = flat_tokens[index], bp.position
    else:
        if topk_ids is None:
            raise TypeError("topk_ids: expected an integer tensor for mode='topk' (branching_score(..., topk=k)), "
                            "got None")
        ids = require_int("topk_ids", topk_ids)
        k = ids.shape[-1] if ids.dim() == len(lay.shape) + 1 else 0
        require_shape("topk_ids", ids, (*lay.shape, k), "the per-token shape + [k]")
        if k < 2:
            raise ValueError(f"topk_ids: expected k >= 2 (an alternative to the parent's token), got k = {k}")
        require_same_device(tokens=tokens, topk_ids=ids)
        ids = ids.reshape(-1, k)[index]                                             # [G, B, k]
        other = ids != flat_tokens[index][..., None]
        if choice == "best":
            pick = torch.argmax(other.to(torch.int8), dim=-1)                       # first, i.e. most likely
        else:
            if topk_logp is None:
                raise TypeError("topk_logp: expected a float tensor for choice='sample', got None")
            require_float("topk_logp", topk_logp)
            require_shape("topk_logp", topk_logp, tuple(topk_ids.shape), "the shape of topk_ids")
            require_same_device(tokens=tokens, topk_logp=topk_logp)
            lp = topk_logp.reshape(-1, k)[index].to(torch.float64)
            weight = torch.where(other, torch.exp(lp - lp.amax(-1, keepdim=True)), 0.0)
            cdf = weight.cumsum(-1)
            u = torch.rand(cdf.shape[:-1], generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[..., -1]
            pick = torch.searchsorted(cdf, u[..., None], right=True).clamp(max=k - 1)[..., 0]
        token, split = ids.gather(-1, pick[..., None])[..., 0], bp.position - 1
    return ForkRequests(rollout=bp.rollout, position=bp.position, token=torch.where(valid, token, none),
                        split=torch.where(valid, split, none), score=bp.score, valid=valid)
