"""Dual-group advantages with prefix credit and per-procedure scaling (method §5)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends
from ._layout import seq_layout
from ._validation import (as_bool_mask, require_float, require_int, require_positive_float, require_same_device,
                          require_shape, require_tensor, value_checks_enabled)
from ._numerics import compute_dtype, segment_sum, segment_zscore
from ._sequence_ops import reverse_discounted_scan
from .branch_points import resolve_num_groups


class ProcedureAdvantages(NamedTuple):
    """Outputs of `procedure_advantages` (per-token ones in the shape of `mask`).

    advantages         float per-token: A[i, t] (0 on masked-out positions and untrained branch rows)
    loss_mask          bool per-token: the tokens to train
    group_advantages   float [R]: A_hat, the reward normalised within (group, kind)
    multiplier         float per-token: M[i, t] on initial rows (1 when unused), 0 elsewhere
    """
    advantages: Tensor
    loss_mask: Tensor
    group_advantages: Tensor
    multiplier: Tensor


def _per_rollout(name: str, t, r: int, device, *, kind: str) -> Tensor:
    t = (require_float if kind == "float" else require_int)(name, t)
    require_shape(name, t, (r,), "[R], one per rollout")
    require_same_device(**{"rewards/mask": torch.empty(0, device=device), name: t})
    return t


def group_advantages(rewards: Tensor, group_ids: Tensor, is_branch: Optional[Tensor] = None, *,
                     num_groups: Optional[int] = None, scale_by_std: bool = True) -> Tensor:
    """A_hat: each rollout's reward normalised within its (group, kind) (method §5).

    Args:
        rewards: float `[R]`. group_ids: integer `[R]` in `[0, G)`.
        is_branch: bool `[R]` (None: all initial); initial and branch rollouts are normalised separately.
        num_groups: G (None infers it with a host sync). scale_by_std: divide by (population std + 1e-6).

    Returns:
        float32 `[R]` (float64 for float64 rewards): `(r - mean) / (std + 1e-6)` or `r - mean`.
    """
    require_tensor("rewards", rewards)
    require_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards: expected a 1-D [R] tensor, got shape {list(rewards.shape)}")
    r = rewards.shape[0]
    group_ids = _per_rollout("group_ids", group_ids, r, rewards.device, kind="int")
    if is_branch is None:
        is_branch = torch.zeros(r, dtype=torch.bool, device=rewards.device)
    elif not isinstance(is_branch, Tensor) or is_branch.dtype != torch.bool:
        raise TypeError(f"is_branch: expected a bool tensor, got "
                        f"{is_branch.dtype if isinstance(is_branch, Tensor) else type(is_branch).__name__}")
    require_shape("is_branch", is_branch, (r,), "[R], one per rollout")
    groups = resolve_num_groups(group_ids, num_groups)
    key = group_ids.clamp(0, max(groups - 1, 0)) * 2 + is_branch.to(torch.int64)  # clamp: checks may be off
    include = torch.ones(r, dtype=torch.bool, device=rewards.device)
    return segment_zscore(rewards, include, key, 2 * groups, scale=bool(scale_by_std)).to(compute_dtype(rewards.dtype))


def procedure_advantages(rewards: Tensor, group_ids: Tensor, parent: Tensor, split: Tensor, mask: Tensor, *,
                         cu_seqlens: Optional[Tensor] = None, branch_score: Optional[Tensor] = None,
                         scale_by_std: bool = True, branch_strength_scaling: bool = False, decay: float = 0.9,
                         train_branches: bool = False, num_groups: Optional[int] = None,
                         backend: str = "auto") -> ProcedureAdvantages:
    """Per-token advantages of APPO's rollout trees: dual-group normalisation, prefix credit from the
    branches that share each token, and optional scaling by branch strength (method §5).

    Args:
        rewards: float `[R]`, one scalar per rollout (initial and branch rollouts together).
        group_ids: integer `[R]`, the prompt group of each rollout, in `[0, G)`.
        parent: integer `[R]`: -1 for an initial rollout, else the index of the initial rollout (same
            group) the branch was forked from.
        split: integer `[R]`: for a branch, s_b, the last position it shares with its parent, or -1 when it
            shares none (a contrastive fork at the first position: no prefix credit, but it counts among the
            parent's branches for M); ignored on initial rows. Branch rows hold their whole response in the
            parent's position coordinates.
        mask: 0/1 per-token `[R, T]` (padded) or `[N]` with `cu_seqlens` (packed): generated tokens.
        branch_score: float `[R]`, BS_b of each branch (its split token's score); needed for
            `branch_strength_scaling`.
        scale_by_std: divide by the (group, kind) std when normalising rewards.
        branch_strength_scaling: apply M (method §5) with decay lambda = `decay`.
        train_branches: train branch continuation tokens (t > s_b) with their own A_hat.
        num_groups: G (None infers it with a host sync).

    Returns:
        ProcedureAdvantages(advantages, loss_mask, group_advantages, multiplier). O(N) segmented scans.
    """
    require_tensor("mask", mask)
    lay = seq_layout("mask", mask, cu_seqlens)
    device = mask.device
    m = as_bool_mask("mask", mask, lay.shape, device).reshape(-1)
    r = lay.num_rollouts
    _per_rollout("rewards", rewards, r, device, kind="float")
    group_ids = _per_rollout("group_ids", group_ids, r, device, kind="int")
    parent = _per_rollout("parent", parent, r, device, kind="int")
    split = _per_rollout("split", split, r, device, kind="int")
    if branch_strength_scaling:
        if branch_score is None:
            raise ValueError("branch_score: expected a float [R] tensor when branch_strength_scaling=True, got None")
        _per_rollout("branch_score", branch_score, r, device, kind="float")
        decay = require_positive_float("decay", decay, upper=1.0)
    name = backends.resolve(backend, device, "reverse_discounted_scan", compute_dtype(rewards.dtype)).NAME
    is_branch = parent >= 0
    lengths = lay.cu_seqlens[1:] - lay.cu_seqlens[:-1]
    if value_checks_enabled():
        _check_tree(parent, split, group_ids, is_branch, lengths)
    a_hat = group_advantages(rewards, group_ids, is_branch, num_groups=num_groups, scale_by_std=scale_by_std)
    dtype = a_hat.dtype
    zero = torch.zeros((), dtype=dtype, device=device)

    # Each branch drops an impulse at (its parent, s_b); reverse scans turn them into prefix sums over t <= s_b.
    # Index n is a sink: a branch that shares no token (split -1), or, with value checks off, a parent or split
    # out of range, drops its impulse there (never outside, nor into a neighbouring rollout).
    n = lay.numel
    src = torch.where(is_branch, parent, 0).clamp(0, max(r - 1, 0))
    at = lay.cu_seqlens[src] + torch.where(is_branch, split, 0)
    shares = is_branch & (split >= 0) & (split < lay.cu_seqlens[src + 1] - lay.cu_seqlens[src])
    at = torch.where(shares, at, n)

    def impulses(values: Tensor) -> Tensor:
        return torch.zeros(n + 1, dtype=dtype, device=device).index_add_(0, at, torch.where(is_branch, values,
                                                                                           zero))[:n]

    credit_sum = reverse_discounted_scan(impulses(a_hat), lay, 1.0, name)
    credit_cnt = reverse_discounted_scan(impulses(torch.ones_like(a_hat)), lay, 1.0, name)
    adv = a_hat[lay.seg] + torch.where(credit_cnt > 0, credit_sum / credit_cnt.clamp(min=1), zero)

    multiplier = torch.ones(n, dtype=dtype, device=device)
    if branch_strength_scaling:
        bs = branch_score.to(dtype)
        strongest = torch.full((r,), float("-inf"), dtype=dtype, device=device).scatter_reduce(
            0, src, torch.where(is_branch, bs, float("-inf")), "amax")[src]
        weight = torch.where(strongest > 0, bs.clamp(min=0) / strongest.clamp(min=torch.finfo(dtype).tiny), zero)
        n_branches = segment_sum(is_branch.to(dtype), src, r)
        boost = reverse_discounted_scan(impulses(weight), lay, decay, name)
        multiplier = 1 + torch.where(n_branches[lay.seg] > 0, boost / n_branches[lay.seg].clamp(min=1), zero)
        adv = adv * multiplier

    initial_tok = m & ~is_branch[lay.seg]
    loss_mask = initial_tok
    advantages = torch.where(initial_tok, adv, zero)
    if train_branches:
        cont = m & is_branch[lay.seg] & (lay.pos > split[lay.seg])
        loss_mask = loss_mask | cont
        advantages = torch.where(cont, a_hat[lay.seg], advantages)
    return ProcedureAdvantages(lay.unflat(advantages), lay.unflat(loss_mask), a_hat,
                               lay.unflat(torch.where(initial_tok, multiplier, zero)))


def _check_tree(parent: Tensor, split: Tensor, group_ids: Tensor, is_branch: Tensor, lengths: Tensor) -> None:
    r = parent.shape[0]
    if bool(((parent < -1) | (parent >= r)).any()):
        bad = int(parent[(parent < -1) | (parent >= r)][0])
        raise ValueError(f"parent: expected -1 (initial) or a rollout index in [0, {r}), got {bad}")
    src = parent.clamp(min=0)
    nested = is_branch & (parent[src] >= 0)
    if bool(nested.any()):
        b = int(torch.nonzero(nested)[0])
        raise ValueError(f"parent: expected branches to fork from initial rollouts, but rollout {b}'s parent "
                         f"{int(parent[b])} is itself a branch")
    other_group = is_branch & (group_ids[src] != group_ids)
    if bool(other_group.any()):
        b = int(torch.nonzero(other_group)[0])
        raise ValueError(f"parent: expected a parent in the same group, but rollout {b} (group "
                         f"{int(group_ids[b])}) forks from {int(parent[b])} (group {int(group_ids[parent[b]])})")
    out = is_branch & ((split < -1) | (split >= lengths[src]))
    if bool(out.any()):
        b = int(torch.nonzero(out)[0])
        raise ValueError(f"split: expected -1 or a position in [0, {int(lengths[parent[b]])}) of parent "
                         f"{int(parent[b])}, got {int(split[b])} for rollout {b}")
