"""Numerics shared by the public ops and every backend, in one home: the compute-dtype rule, segment sums and
z-scores over packed rollouts, and the merge of per-split vocabulary statistics into row statistics.

Nothing here validates input (appo_kernels._validation does); everything is plain, vectorised torch.
"""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are computed and returned in float32, or float64 for float64 inputs (docs/api.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def finite_floor_(x: Tensor) -> Tensor:
    """-inf -> the most negative finite value, in place, so that 0 * x is 0 for masked vocabulary entries (NaN
    stays NaN)."""
    return x.clamp_(min=torch.finfo(x.dtype).min)


# ----------------------------------------------------------------------------------------------------------
# segments of packed rollouts: `seg` [N] holds each position's rollout (appo_kernels._layout.SeqLayout.seg)
# ----------------------------------------------------------------------------------------------------------

def segment_sum(x: Tensor, seg: Tensor, num_segments: int) -> Tensor:
    return x.new_zeros(num_segments).index_add_(0, seg, x)


def segment_zscore(x: Tensor, include: Tensor, seg: Tensor, num_segments: int, eps: float = 1e-6,
                   scale: bool = True) -> Tensor:
    """(x - mean) / (std + eps) with mean and population std over the `include`d positions of each segment
    (just x - mean when not `scale`).

    A constant segment gives exactly 0: its mean is taken to be its value (sum / count can leave a rounding
    residue that, divided by eps, would flip the sign tests that define candidates). Computed in float64.
    Values at excluded positions are meaningless; callers mask them.
    """
    xd = torch.where(include, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    w = include.to(torch.float64)
    count = segment_sum(w, seg, num_segments).clamp(min=1)
    mean = segment_sum(xd, seg, num_segments) / count
    inf = torch.full((num_segments,), float("inf"), dtype=torch.float64, device=x.device)
    lo = inf.scatter_reduce(0, seg, torch.where(include, xd, float("inf")), "amin")
    hi = (-inf).scatter_reduce(0, seg, torch.where(include, xd, float("-inf")), "amax")
    mean = torch.where(lo == hi, lo, mean)
    centred = xd - mean[seg]
    if not scale:
        return centred
    dev = centred * w
    std = torch.sqrt(segment_sum(dev * dev, seg, num_segments) / count)
    return centred / (std[seg] + eps)


# ----------------------------------------------------------------------------------------------------------
# row statistics from per-split partials (method §1)
# ----------------------------------------------------------------------------------------------------------

def topk_entropy(logp: Tensor, topk_ids: Tensor, topk_logp: Tensor, tokens: Tensor, valid: Tensor):
    """Truncated entropy -sum p log p over topk ∪ {token}, c = sum (1 + log p) p over that set, and topk_set
    ([n, k+1]: the top-k ids then the token, or -1 when the token is among them; -1 for ignored rows)."""
    tok = torch.where(valid, tokens, torch.zeros_like(tokens))
    in_topk = (topk_ids == tok[:, None]).any(dim=1)
    lp = torch.cat([topk_logp, logp[:, None]], dim=1)
    member = torch.cat([torch.ones_like(topk_ids, dtype=torch.bool), ~in_topk[:, None]], dim=1)
    prob = torch.where(member, torch.exp(lp), torch.zeros_like(lp))
    lp_floor = finite_floor_(lp.clone())
    entropy = torch.where(valid, -(prob * lp_floor).sum(dim=1), 0)
    c = torch.where(valid, (prob * (1 + lp_floor)).sum(dim=1), 0)
    topk_set = torch.where(member & valid[:, None], torch.cat([topk_ids, tok[:, None]], dim=1), -1)
    return entropy, c, topk_set


def merge_row_partials(part: Tensor, cand_v: Tensor, cand_i: Tensor, tokens: Tensor, valid: Tensor, vocab: int,
                       topk: int, entropy_topk: bool):
    """Row statistics (logp, entropy, lse, topk_ids, topk_logp, topk_set, c) from per-split partials.

    part: `[4, S, n]` = (m, se, sh, target) of each vocabulary split s of each row: m the max of the scaled
        logits s, se = sum exp(s - m), sh = sum exp(s - m) (s - m) (-inf entries add 0), target = s[token]
        where the split holds the token, else 0.
    cand_v, cand_i: top-k candidates `[n, C]` (or `[n, S, k]`): scaled logits and their ids (id `vocab` = none).
    Each split is rescaled by exp(m_s - m); the candidates are ordered by (value desc, id asc). Logp and top-k
    log-probs are (s - m) - log se, exact where |s| is large. A valid row whose token lies outside [0, vocab)
    gets NaN logp; rows that are not `valid` (ignored) give 0 everywhere (ids 0, topk_set -1).
    """
    n = tokens.shape[0]
    opts = {"dtype": part.dtype, "device": tokens.device}
    pm, pse, psh, ptgt = part
    m = pm.amax(dim=0) if pm.shape[0] else torch.full((n,), float("-inf"), **opts)
    d = pm - m
    live = pse != 0   # a split of -inf logits adds nothing; NaN stays live and propagates
    scale = torch.where(live, torch.exp(d), torch.zeros_like(d))
    se = (pse * scale).sum(dim=0)
    sh = torch.where(live, scale * (psh + d * pse), torch.zeros_like(d)).sum(dim=0)
    log_se = torch.log(se)
    lse = m + log_se
    entropy = log_se - sh / se
    target = torch.where((tokens >= 0) & (tokens < vocab), ptgt.sum(dim=0), float("nan"))
    logp = (target - m) - log_se
    if topk:
        ids = cand_i.reshape(n, cand_i[0].numel() if n else 0)
        by_id = torch.argsort(ids, dim=1, stable=True)          # ties then keep the smaller id first
        ids, vals = ids.gather(1, by_id), cand_v.reshape(ids.shape).gather(1, by_id)
        vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
        topk_ids = ids.gather(1, order[:, :topk])
        topk_logp = (vals[:, :topk] - m[:, None]) - log_se[:, None]
    else:
        topk_ids = torch.empty(n, 0, dtype=torch.int64, device=tokens.device)
        topk_logp = torch.empty(n, 0, **opts)
    zero = torch.zeros_like(lse)
    logp = torch.where(valid, logp, zero)
    lse = torch.where(valid, lse, zero)
    topk_ids = torch.where(valid[:, None], topk_ids, torch.zeros_like(topk_ids))
    topk_logp = torch.where(valid[:, None], topk_logp, torch.zeros_like(topk_logp))
    if entropy_topk:
        entropy, c, topk_set = topk_entropy(logp, topk_ids, topk_logp, tokens, valid)
    else:
        entropy = torch.where(valid, entropy, zero)
        topk_set, c = torch.empty(0, **opts), torch.empty(0, **opts)
    return logp, entropy, lse, topk_ids, topk_logp, topk_set, c
