"""Future-KL advantage weighting (method §6) and the clipped policy loss (method §7)."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends
from ._layout import SeqLayout, per_token, seq_layout
from ._numerics import compute_dtype, segment_sum
from ._sequence_ops import reverse_discounted_scan
from ._validation import (as_bool_mask, check_clip_eps, check_gamma, require_choice, require_finite_float,
                          require_positive_float)

LOG_RATIO_CLIP = 20.0
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


class FutureKLWeights(NamedTuple):
    """weights     float per-token: f[t] (method §6)
    advantages  float per-token: A[t] * (1 + coef * f[t])
    Both 0 at masked-out positions."""
    weights: Tensor
    advantages: Tensor


class PolicyLoss(NamedTuple):
    """loss                scalar, differentiable: the aggregated per-token loss
    pg_loss             scalar (detached): token-mean clipped surrogate
    kl                  scalar (detached): token-mean KL to the reference (0 without logp_ref)
    clip_fraction       scalar (detached): share of tokens where the ratio clip is active
    dual_clip_fraction  scalar (detached): share of tokens where the dual clip is active"""
    loss: Tensor
    pg_loss: Tensor
    kl: Tensor
    clip_fraction: Tensor
    dual_clip_fraction: Tensor


def future_kl_weights(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Optional[Tensor] = None, *,
                      cu_seqlens: Optional[Tensor] = None, gamma: float = 2 ** (-1 / 64), clip_ratio_c: float = 3.0,
                      clip_eps: float = 0.2, high_only: bool = True, coef: float = 1.0,
                      ratio_threshold: float = 6.0, backend: str = "auto") -> FutureKLWeights:
    """Weight each token's advantage by the (discounted, clipped) KL its future has drifted (method §6).

    Args:
        logp, logp_old, advantages: float `[B, T]` (padded) or `[N]` with `cu_seqlens` (packed); detached.
        mask: 0/1 same shape (None = all ones).
        gamma: discount in (0, 1] (default 2^(-1/64)). clip_ratio_c: dual-clip constant c; tokens with
            log-ratio > log(c) are left out of the sum. clip_eps: f in [1, 1 + eps] (high_only) or
            [1 - eps, 1 + eps]. ratio_threshold: for A < 0 and ratio above it, f is clipped to [1 - eps, 1].
        coef: b in A * (1 + b f).

    Returns:
        FutureKLWeights(weights, advantages), float32 (float64 for float64 logp).
    """
    lay = seq_layout("logp", logp, cu_seqlens)
    lp, lpo, adv = (per_token(n, t, lay) for n, t in (("logp", logp), ("logp_old", logp_old),
                                                         ("advantages", advantages)))
    if lpo is None or adv is None:
        raise TypeError(f"{'logp_old' if lpo is None else 'advantages'}: expected a float tensor, got None")
    m = as_bool_mask("mask", mask, lay.shape, logp.device).reshape(-1)
    gamma, clip_eps = check_gamma("gamma", gamma), check_clip_eps(clip_eps)
    clip_ratio_c = require_positive_float("clip_ratio_c", clip_ratio_c)
    ratio_threshold = require_positive_float("ratio_threshold", ratio_threshold)
    coef = require_finite_float("coef", coef)
    dtype = compute_dtype(logp.dtype)
    name = backends.resolve(backend, logp.device, "reverse_discounted_scan", dtype).NAME
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    with torch.no_grad():
        delta = (lp.to(dtype) - lpo.to(dtype)).clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
        kept = torch.where(m & (delta <= math.log(clip_ratio_c)), delta, zero)
        fkl = reverse_discounted_scan(kept, lay, gamma, name)
        f = torch.exp(fkl).clamp(1.0 if high_only else 1 - clip_eps, 1 + clip_eps)
        a = adv.to(dtype)
        f = torch.where((a < 0) & (torch.exp(delta) > ratio_threshold), f.clamp(1 - clip_eps, 1.0), f)
        out = a * (1 + coef * f)
    return FutureKLWeights(lay.unflat(torch.where(m, f, zero)), lay.unflat(torch.where(m, out, zero)))


def _aggregate(tok: Tensor, m: Tensor, lay: SeqLayout, aggregation: str, token_count, loss_scale) -> Tensor:
    w = m.to(tok.dtype)
    tok = tok * w
    if aggregation == "token-mean":
        denom = w.sum().clamp(min=1) if token_count is None else token_count
        return tok.sum() / denom
    seq_sum = segment_sum(tok, lay.seg, lay.num_rollouts)
    if aggregation == "seq-mean-token-sum-norm":
        return seq_sum.sum() / (lay.num_rollouts * loss_scale)
    seq_cnt = segment_sum(w, lay.seg, lay.num_rollouts)
    present = (seq_cnt > 0).to(tok.dtype)
    per_seq = seq_sum / seq_cnt.clamp(min=1) if aggregation == "seq-mean-token-mean" else seq_sum
    return (per_seq * present).sum() / present.sum().clamp(min=1)


def _drop_dual_clipped(pg: Tensor, hit: Tensor, m: Tensor, lay: SeqLayout, aggregation: str,
                       token_count) -> Tensor:
    """The surrogate with every rollout holding more than one `hit` token (A < 0, ratio > c) zeroed. For a
    token-mean over the mask itself, the kept tokens are rescaled by count / kept count, so that the surrogate
    is their mean (the authors' filtered mask) while the KL keeps the whole mask; nothing changes, to the bit,
    when nothing is dropped."""
    dropped = segment_sum(hit.to(pg.dtype), lay.seg, lay.num_rollouts)[lay.seg] > 1
    keep = m & ~dropped
    if aggregation == "token-mean" and token_count is None:
        scale = m.sum().clamp(min=1).to(pg.dtype) / keep.sum().clamp(min=1).to(pg.dtype)
        return torch.where(keep, pg * scale, torch.zeros((), dtype=pg.dtype, device=pg.device))
    return torch.where(keep, pg, torch.zeros((), dtype=pg.dtype, device=pg.device))


def policy_loss(logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Optional[Tensor] = None, *,
                cu_seqlens: Optional[Tensor] = None, logp_ref: Optional[Tensor] = None, eps_low: float = 0.2,
                eps_high: float = 0.28, clip_ratio_c: float = 3.0, kl_coef: float = 0.001,
                kl_estimator: str = "k3", aggregation: str = "token-mean", token_count: Optional[float] = None,
                loss_scale: Optional[float] = None, entropy: Optional[Tensor] = None,
                entropy_coef: float = 0.0, drop_dual_clipped: bool = True,
                kl_clamp: Optional[float] = 10.0) -> PolicyLoss:
    """APPO's PPO objective: clip-higher surrogate, dual clip, KL to the reference (method §7).

    Args:
        logp: float per-token `[B, T]` or packed `[N]` (with `cu_seqlens`), log pi_theta, with gradient.
        logp_old: float, same shape: log-probs at rollout time. advantages: float, same shape.
        mask: 0/1 loss mask (e.g. `ProcedureAdvantages.loss_mask`); None = all ones.
        logp_ref: float or None: log-probs under the frozen reference; the KL term needs it.
        eps_low, eps_high: ratio clip [1 - eps_low, 1 + eps_high]. clip_ratio_c: dual clip for A < 0.
        kl_coef, kl_estimator ("k1" | "k2" | "k3"): KL(pi_theta || pi_ref) penalty per token.
        aggregation: "token-mean" (over the masked tokens, or divided by `token_count`: pass the whole
            mini-batch's count when accumulating gradients over micro-batches), "seq-mean-token-mean",
            "seq-mean-token-sum" (means over sequences with at least one masked token), or
            "seq-mean-token-sum-norm" (Dr.GRPO: sum over all tokens / (number of sequences * loss_scale);
            loss_scale defaults to T in the padded layout and is required for packed input).
        entropy, entropy_coef: optional entropy bonus (subtracted), differentiable in `entropy`.
        drop_dual_clipped: as the authors' loss does, a rollout with more than one masked token where A < 0 and
            ratio > clip_ratio_c leaves the surrogate term for this update (its KL and entropy terms stay);
            with "token-mean" the surrogate is then averaged over the kept tokens (the KL over all), unless
            `token_count` fixes the denominator. False keeps every token (the dual clip alone bounds them).
        kl_clamp: the per-token KL estimate is clamped to [-kl_clamp, kl_clamp] (the authors' 10: no gradient
            beyond it); None leaves it unclamped.

    Returns:
        PolicyLoss(loss, pg_loss, kl, clip_fraction, dual_clip_fraction); float32 (float64 for float64 logp).
    """
    lay = seq_layout("logp", logp, cu_seqlens)
    lp = per_token("logp", logp, lay)
    lpo = per_token("logp_old", logp_old, lay)
    adv = per_token("advantages", advantages, lay)
    if lpo is None or adv is None:
        raise TypeError(f"{'logp_old' if lpo is None else 'advantages'}: expected a float tensor, got None")
    ref = per_token("logp_ref", logp_ref, lay)
    ent = per_token("entropy", entropy, lay)
    m = as_bool_mask("mask", mask, lay.shape, logp.device).reshape(-1)
    eps_low = require_positive_float("eps_low", eps_low, allow_zero=True, upper=1.0, upper_inclusive=False)
    eps_high = require_positive_float("eps_high", eps_high, allow_zero=True)
    clip_ratio_c = require_positive_float("clip_ratio_c", clip_ratio_c)
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c: expected a dual-clip constant > 1, got {clip_ratio_c}")
    kl_coef = require_positive_float("kl_coef", kl_coef, allow_zero=True)
    require_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    require_choice("aggregation", aggregation, AGGREGATIONS)
    if token_count is not None:
        token_count = require_positive_float("token_count", token_count)
    if aggregation == "seq-mean-token-sum-norm":
        if loss_scale is None:
            if not lay.padded:
                raise ValueError("loss_scale: expected a positive number for 'seq-mean-token-sum-norm' with packed "
                                 "input (the padded layout defaults it to T), got None")
            loss_scale = lay.shape[1]
        loss_scale = require_positive_float("loss_scale", loss_scale)
    entropy_coef = require_finite_float("entropy_coef", entropy_coef)
    if kl_clamp is not None:
        kl_clamp = require_positive_float("kl_clamp", kl_clamp)
    if entropy_coef and ent is None:
        raise ValueError(f"entropy: expected a float tensor when entropy_coef={entropy_coef}, got None")

    dtype = compute_dtype(logp.dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    def kept(x: Tensor) -> Tensor:  # masked-out positions read as 0, so NaN/inf there cannot reach the loss
        return torch.where(m, x.to(dtype), zero)

    lp = kept(lp)
    a = kept(adv).detach()
    log_ratio = (lp - kept(lpo).detach()).clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
    ratio = torch.exp(log_ratio)
    pg_plain = -a * ratio
    pg_clipped = -a * ratio.clamp(1 - eps_low, 1 + eps_high)
    pg = torch.maximum(pg_plain, pg_clipped)
    pg_dual = -a * clip_ratio_c
    dual = (a < 0) & (pg_dual < pg)
    pg = torch.where(a < 0, torch.minimum(pg, pg_dual), pg)
    tok = pg
    if drop_dual_clipped:
        tok = _drop_dual_clipped(pg, m & (a < 0) & (ratio.detach() > clip_ratio_c), m, lay, aggregation,
                                 token_count)
    kl = torch.zeros_like(pg)
    if ref is not None and kl_coef > 0:
        d = (kept(ref).detach() - lp).clamp(-LOG_RATIO_CLIP, LOG_RATIO_CLIP)
        kl = {"k1": -d, "k2": 0.5 * d * d, "k3": torch.exp(d) - d - 1}[kl_estimator]
        if kl_clamp is not None:
            kl = kl.clamp(-kl_clamp, kl_clamp)
        tok = tok + kl_coef * kl
    if ent is not None and entropy_coef:
        tok = tok - entropy_coef * kept(ent)
    loss = _aggregate(tok, m, lay, aggregation, token_count, loss_scale)

    with torch.no_grad():
        w = m.to(dtype)
        count = w.sum().clamp(min=1)
        clipped = (pg_clipped > pg_plain).to(dtype)
        metrics = [(x * w).sum() / count for x in (pg, kl, clipped, dual.to(dtype))]
    return PolicyLoss(loss, *metrics)
