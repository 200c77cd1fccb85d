"""Future likelihood gain (method §2) and the Branching Score (method §3)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends
from ._layout import SeqLayout, per_token, seq_layout
from ._numerics import compute_dtype
from ._sequence_ops import reverse_discounted_scan, segment_branching_score
from ._validation import (as_bool_mask, check_clip_eps, check_gamma, require_float, require_int, require_ndim,
                          require_same_device, require_shape)
from .token_stats import check_token_ids, token_stats

OMEGA_LOG_CLIP = 20.0
SCORE_OPS = ("reverse_discounted_scan", "branching_score")


class FutureValues(NamedTuple):
    """omega  float per-token: clip(exp(clip(gain, -20, 20)), 1 - clip_eps, 1 + clip_eps)
    gain   float per-token: F[t], the discounted sum of future log-ratios in the rollout
    Both are 0 at masked-out positions."""
    omega: Tensor
    gain: Tensor


class BranchingScores(NamedTuple):
    """Per-token outputs of `score_tokens` / `branching_score` (shape of the per-token inputs).

    score      float  Z(entropy) * Z(omega) (Z(entropy) without logp_old); -inf where not eligible
    candidate  bool   eligible and Z(entropy) > 0 and Z(omega) > 0
    entropy    float  per-token entropy (0 at masked-out positions)
    logp       float  log-prob of the sampled token (0 at masked-out positions), or None
    omega      float  future likelihood gain factor (0 at masked-out positions), or None without logp_old
    topk_ids   int64 [..., k] / topk_logp float [..., k]: from `branching_score`; None from `score_tokens`
    """
    score: Tensor
    candidate: Tensor
    entropy: Tensor
    logp: Optional[Tensor]
    omega: Optional[Tensor]
    topk_ids: Optional[Tensor] = None
    topk_logp: Optional[Tensor] = None


def _future_values(backend: str, lay: SeqLayout, logp: Tensor, logp_old: Tensor, mask: Tensor, gamma: float,
                   clip_eps: float, dtype: torch.dtype) -> FutureValues:
    """Flat [N] inputs -> flat FutureValues (method §2)."""
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    r = torch.where(mask, logp.to(dtype) - logp_old.to(dtype), zero)
    gain = reverse_discounted_scan(r, lay, gamma, backend)
    omega = torch.exp(gain.clamp(-OMEGA_LOG_CLIP, OMEGA_LOG_CLIP)).clamp(1 - clip_eps, 1 + clip_eps)
    return FutureValues(torch.where(mask, omega, zero), torch.where(mask, gain, zero))


def future_values(logp: Tensor, logp_old: Tensor, mask: Optional[Tensor] = None, *,
                  cu_seqlens: Optional[Tensor] = None, gamma: float = 1.0, clip_eps: float = 0.2,
                  backend: str = "auto") -> FutureValues:
    """Omega, the clipped future likelihood gain of every token (method §2), by an O(N) segmented scan.

    Args:
        logp: float `[B, T]` (padded) or `[N]` with `cu_seqlens` (packed): current-policy log-probs.
        logp_old: float, same shape: log-probs of the same tokens under the behaviour, previous or
            reference policy (the choice decides what Omega means; see method §2).
        mask: 0/1 (bool, int or float) same shape, 1 for generated tokens; None = all ones.
        cu_seqlens: int32/int64 `[B + 1]` for the packed layout.
        gamma: discount in (0, 1]. clip_eps: Omega is clipped to [1 - clip_eps, 1 + clip_eps].

    Returns:
        FutureValues(omega, gain), float32 (float64 for float64 logp), shape of `logp`.
    """
    lay = seq_layout("logp", logp, cu_seqlens)
    lp = per_token("logp", logp, lay)
    lpo = per_token("logp_old", logp_old, lay)
    if lpo is None:
        raise TypeError("logp_old: expected a float tensor, got None")
    m = as_bool_mask("mask", mask, lay.shape, logp.device).reshape(-1)
    gamma, clip_eps = check_gamma("gamma", gamma), check_clip_eps(clip_eps)
    name = backends.resolve(backend, logp.device, "reverse_discounted_scan", compute_dtype(logp.dtype)).NAME
    fv = _future_values(name, lay, lp, lpo, m, gamma, clip_eps, compute_dtype(logp.dtype))
    return FutureValues(lay.unflat(fv.omega), lay.unflat(fv.gain))


def _score(backend: str, lay: SeqLayout, entropy: Tensor, logp: Optional[Tensor], logp_old: Optional[Tensor],
           mask: Tensor, eligible: Tensor, gamma: float, clip_eps: float, dtype: torch.dtype):
    """Flat [N] inputs -> flat (score, candidate, entropy, logp, omega)."""
    zero = torch.zeros((), dtype=dtype, device=entropy.device)
    omega = None
    if logp_old is not None:
        omega = _future_values(backend, lay, logp, logp_old, mask, gamma, clip_eps, dtype).omega
    score, candidate = segment_branching_score(entropy.to(dtype), omega, eligible & mask, lay, backend)
    ent = torch.where(mask, entropy.to(dtype), zero)
    lp = None if logp is None else torch.where(mask, logp.to(dtype), zero)
    return score.to(dtype), candidate, ent, lp, omega


def _check_score_inputs(lay: SeqLayout, entropy, logp, logp_old, mask, eligible, device):
    ent = per_token("entropy", entropy, lay)
    lp = per_token("logp", logp, lay)
    lpo = per_token("logp_old", logp_old, lay)
    if lpo is not None and lp is None:
        raise ValueError("logp: expected a float tensor when logp_old is given (Omega needs both), got None")
    m = as_bool_mask("mask", mask, lay.shape, device).reshape(-1)
    el = None
    if eligible is not None:
        if eligible.dtype != torch.bool:
            raise TypeError(f"eligible: expected a bool tensor, got dtype {eligible.dtype}")
        el = as_bool_mask("eligible", eligible, lay.shape, device).reshape(-1)
    else:
        el = torch.ones_like(m)
    return ent, lp, lpo, m, el


def _unflat_scores(lay: SeqLayout, flat, topk_ids=None, topk_logp=None) -> BranchingScores:
    score, candidate, ent, lp, omega = flat
    u = lay.unflat
    return BranchingScores(u(score), u(candidate), u(ent), None if lp is None else u(lp),
                           None if omega is None else u(omega), topk_ids, topk_logp)


def score_tokens(entropy: Tensor, logp: Optional[Tensor] = None, logp_old: Optional[Tensor] = None,
                 mask: Optional[Tensor] = None, *, cu_seqlens: Optional[Tensor] = None,
                 eligible: Optional[Tensor] = None, gamma: float = 1.0, clip_eps: float = 0.2,
                 backend: str = "auto") -> BranchingScores:
    """The Branching Score (method §3) from per-token entropy and log-probs a trainer already has.

    Args:
        entropy: float `[B, T]` or packed `[N]` (with `cu_seqlens`).
        logp, logp_old: float, same shape; with `logp_old` the score is Z(entropy) * Z(omega), without it
            the entropy-only ablation Z(entropy).
        mask: 0/1, same shape (None = all ones). eligible: bool, same shape (None = all); e.g. False on
            whitespace-only tokens. Z-scores are taken per rollout over `mask & eligible` positions.
        gamma, clip_eps: as in `future_values`.

    Returns:
        BranchingScores(score, candidate, entropy, logp, omega, None, None) in the per-token shape.
    """
    lay = seq_layout("entropy", entropy, cu_seqlens)
    gamma, clip_eps = check_gamma("gamma", gamma), check_clip_eps(clip_eps)
    ent, lp, lpo, m, el = _check_score_inputs(lay, entropy, logp, logp_old, mask, eligible, entropy.device)
    dtype = compute_dtype(entropy.dtype)
    name = backends.resolve(backend, entropy.device, SCORE_OPS, dtype).NAME
    return _unflat_scores(lay, _score(name, lay, ent, lp, lpo, m, el, gamma, clip_eps, dtype))


def branching_score(logits: Tensor, tokens: Tensor, logp_old: Optional[Tensor] = None,
                    mask: Optional[Tensor] = None, *, cu_seqlens: Optional[Tensor] = None,
                    eligible: Optional[Tensor] = None, temperature: float = 1.0, topk: int = 0,
                    gamma: float = 1.0, clip_eps: float = 0.2, entropy: str = "exact",
                    backend: str = "auto") -> BranchingScores:
    """Token statistics, Omega and the Branching Score in one call (method §1-3).

    Args:
        logits: float `[B, T, V]` (padded) or `[N, V]` with `cu_seqlens` (packed), the current policy's.
        tokens: integer `[B, T]` / `[N]`: the sampled tokens; values at masked-out positions are not read.
        logp_old: float per-token or None (entropy-only ablation).
        mask, eligible, cu_seqlens, gamma, clip_eps: as in `score_tokens`.
        temperature, topk, entropy: as in `token_stats`.

    Returns:
        BranchingScores(score, candidate, entropy, logp, omega, topk_ids, topk_logp); runs without
        gradient (use `token_stats` to train).
    """
    require_float("logits", logits)
    tokens = require_int("tokens", tokens)
    require_ndim("logits", logits, (2, 3), "a packed [N, V] or padded [B, T, V] tensor")
    require_shape("tokens", tokens, logits.shape[:-1], "logits.shape[:-1]")
    require_same_device(logits=logits, tokens=tokens)
    lay = seq_layout("tokens", tokens, cu_seqlens)
    gamma, clip_eps = check_gamma("gamma", gamma), check_clip_eps(clip_eps)
    m = as_bool_mask("mask", mask, lay.shape, logits.device)
    # Masked-in tokens must be real ids (none may pass for ignore_index); masked-out ones are not read.
    check_token_ids(torch.where(m, tokens, torch.zeros_like(tokens)), max(logits.shape[-1], 1), ignore_index=0)
    with torch.no_grad():
        st = token_stats(logits, tokens, mask=m, temperature=temperature, topk=topk, entropy=entropy,
                         backend=backend)
        dtype = compute_dtype(logits.dtype)
        name = backends.resolve(backend, logits.device, SCORE_OPS, dtype).NAME
        ent, lp, lpo, mf, el = _check_score_inputs(lay, st.entropy, st.logp, logp_old, m, eligible,
                                                   logits.device)
        flat = _score(name, lay, ent, lp, lpo, mf, el, gamma, clip_eps, dtype)
    return _unflat_scores(lay, flat, st.topk_ids, st.topk_logp)
