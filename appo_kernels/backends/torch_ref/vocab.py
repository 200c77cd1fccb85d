"""Token statistics over the vocabulary in plain torch (the reference backend).

Work is done in tiles of rows (and, for the fused linear variant, of the vocabulary) so that no [N, V]
temporary is ever held: each tile yields partial statistics (running max, sum of exp, sum of exp * shifted
logit, target logit, top-k) that merge exactly, and the backward recomputes probabilities from the saved
per-row log-sum-exp. Everything is computed in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._types import RowStats

# One [rows, V] fp32 temporary holds at most this many elements (16 MiB).
TILE_ELEMENTS = 1 << 22
DEFAULT_LINEAR_CHUNK = (1024, 4096)  # (rows, vocabulary) of one recomputed logits tile


class Partial(NamedTuple):
    """Statistics of the rows of one tile, mergeable across vocabulary tiles."""
    m: Tensor          # [n] max of s over the tile (-inf when the tile is all -inf)
    sumexp: Tensor     # [n] sum exp(s - m)
    shifted: Tensor    # [n] sum exp(s - m) * (s - m)   (entropy = log sumexp - shifted / sumexp)
    target: Tensor     # [n] s[token] when the token lies in the tile, else 0
    topk_vals: Tensor  # [n, k] largest s, descending, ties to the smaller id
    topk_ids: Tensor   # [n, k] int64


def _finite_floor(x: Tensor) -> Tensor:
    # -inf -> most negative finite value, so that 0 * x is 0 for masked vocabulary entries (NaN stays NaN).
    return x.clamp(min=torch.finfo(x.dtype).min)


def tile_partial(s: Tensor, v0: int, tokens: Tensor, k: int) -> Partial:
    """Partial statistics of scaled logits `s` [n, v] whose first column is vocabulary id `v0`."""
    m = s.amax(dim=-1)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    shifted = s - m_safe[:, None]
    e = torch.exp(shifted)
    sumexp = e.sum(dim=-1)
    shifted_sum = (e * _finite_floor(shifted)).sum(dim=-1)
    local = tokens - v0
    inside = (local >= 0) & (local < s.shape[1])
    picked = s.gather(1, local.clamp(0, s.shape[1] - 1)[:, None]).squeeze(1)
    target = torch.where(inside, picked, torch.zeros_like(picked))
    if k:
        kk = min(k, s.shape[1])
        vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
        topk_vals, topk_ids = vals[:, :kk], idx[:, :kk] + v0
    else:
        topk_vals = s.new_empty(s.shape[0], 0)
        topk_ids = tokens.new_empty(s.shape[0], 0, dtype=torch.int64)
    return Partial(m, sumexp, shifted_sum, target, topk_vals, topk_ids)


def _rescale(p: Partial, m_new: Tensor) -> Tuple[Tensor, Tensor]:
    d = p.m - m_new
    live = p.sumexp != 0  # an all -inf tile contributes nothing; NaN stays live and propagates
    scale = torch.where(live, torch.exp(d), torch.zeros_like(d))
    shifted = torch.where(live, scale * (p.shifted + d * p.sumexp), torch.zeros_like(d))
    return p.sumexp * scale, shifted


def merge(a: Optional[Partial], b: Partial, k: int) -> Partial:
    """Merge the partials of two vocabulary tiles of the same rows; `a` holds the smaller ids."""
    if a is None:
        return b
    m = torch.maximum(a.m, b.m)
    sa, ha = _rescale(a, m)
    sb, hb = _rescale(b, m)
    if k:
        # a's ids are all smaller than b's, so a stable sort keeps ties ordered by id.
        vals = torch.cat([a.topk_vals, b.topk_vals], dim=1)
        ids = torch.cat([a.topk_ids, b.topk_ids], dim=1)
        vals, order = torch.sort(vals, dim=-1, descending=True, stable=True)
        topk_vals, topk_ids = vals[:, :k], ids.gather(1, order[:, :k])
    else:
        topk_vals, topk_ids = a.topk_vals, a.topk_ids
    return Partial(m, sa + sb, ha + hb, a.target + b.target, topk_vals, topk_ids)


def finalize(p: Partial, tokens: Tensor, valid: Tensor, entropy_topk: bool) -> RowStats:
    """Row statistics from merged partials; rows that are not `valid` (ignored) become 0."""
    log_sumexp = torch.log(p.sumexp)
    lse = p.m + log_sumexp
    entropy = log_sumexp - p.shifted / p.sumexp
    logp = p.target - lse
    topk_logp = p.topk_vals - lse[:, None]
    topk_set = c = lse.new_empty(0)
    if entropy_topk:
        in_topk = (p.topk_ids == tokens[:, None]).any(dim=1)
        lp = torch.cat([topk_logp, logp[:, None]], dim=1)                    # [n, k+1]
        member = torch.cat([torch.ones_like(p.topk_ids, dtype=torch.bool), ~in_topk[:, None]], dim=1)
        prob = torch.where(member, torch.exp(lp), torch.zeros_like(lp))
        lp_floor = _finite_floor(lp)
        entropy = -(prob * lp_floor).sum(dim=1)
        c = (prob * (1 + lp_floor)).sum(dim=1)
        topk_set = torch.where(member, torch.cat([p.topk_ids, tokens[:, None]], dim=1), -1)
        topk_set = torch.where(valid[:, None], topk_set, -1)
    zero = torch.zeros_like(lse)
    vcol = valid[:, None]
    return RowStats(
        logp=torch.where(valid, logp, zero),
        entropy=torch.where(valid, entropy, zero),
        lse=torch.where(valid, lse, zero),
        topk_ids=torch.where(vcol, p.topk_ids, torch.zeros_like(p.topk_ids)),
        topk_logp=torch.where(vcol, topk_logp, torch.zeros_like(topk_logp)),
        topk_set=topk_set,
        c=torch.where(valid, c, zero) if entropy_topk else c,
    )


def grad_tile(s: Tensor, v0: int, tokens: Tensor, valid: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor,
              c: Tensor, g_logp: Tensor, g_entropy: Tensor, temperature: float, entropy_topk: bool) -> Tensor:
    """d loss / d logits for one tile of scaled logits `s` [n, v] (SPEC 1 gradients), in s's dtype."""
    lp = s - lse[:, None]
    p = torch.exp(lp)
    grad = -g_logp[:, None] * p
    if entropy_topk:
        # d(-sum_S p log p)/ds_j = p_j * c - [j in S] (1 + log p_j) p_j
        grad = grad + (g_entropy * c)[:, None] * p
        local = topk_set - v0
        inside = (topk_set >= 0) & (local >= 0) & (local < s.shape[1])
        local = local.clamp(0, s.shape[1] - 1)
        lp_set = lp.gather(1, local)
        corr = torch.exp(lp_set) * (1 + _finite_floor(lp_set)) * g_entropy[:, None]
        grad = grad.scatter_add(1, local, torch.where(inside, -corr, torch.zeros_like(corr)))
    else:
        # -g_H * p * (s - (lse - H)) = -g_H * p * (log p + H)
        grad = grad - g_entropy[:, None] * p * (_finite_floor(lp) + entropy[:, None])
    local = tokens - v0
    inside = (local >= 0) & (local < s.shape[1])
    add = torch.where(inside, g_logp, torch.zeros_like(g_logp))
    grad = grad.scatter_add(1, local.clamp(0, s.shape[1] - 1)[:, None], add[:, None])
    grad = torch.where(valid[:, None], grad, torch.zeros_like(grad))
    return grad / temperature


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_tiles(n: int, width: int):
    rows = max(1, TILE_ELEMENTS // max(width, 1))
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows)


def _cat_stats(parts, k: int, like: Tensor, entropy_topk: bool) -> RowStats:
    if parts:
        return RowStats(*[torch.cat(f, dim=0) for f in zip(*parts)])
    empty = like.new_zeros(0)
    ids = torch.zeros(0, k, dtype=torch.int64, device=like.device)
    return RowStats(empty, empty, empty, ids, like.new_zeros(0, k),
                    torch.zeros(0, k + 1, dtype=torch.int64, device=like.device) if entropy_topk else empty, empty)


def _valid_tokens(tokens: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    valid = tokens != ignore_index
    return torch.where(valid, tokens, torch.zeros_like(tokens)).to(torch.int64), valid


def token_stats_forward(logits: Tensor, tokens: Tensor, temperature: float, topk: int, ignore_index: int,
                        entropy_topk: bool) -> RowStats:
    """logits [N, V] (any strides), tokens [N] -> RowStats (fp32, fp64 for fp64 logits)."""
    n, v = logits.shape
    cdt = _compute_dtype(logits.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    parts = []
    for r0, r1 in _row_tiles(n, v):
        s = logits[r0:r1].to(cdt) / temperature
        part = tile_partial(s, 0, tokens[r0:r1], topk)
        parts.append(finalize(part, tokens[r0:r1], valid[r0:r1], entropy_topk))
    return _cat_stats(parts, topk, logits.new_zeros(0, dtype=cdt), entropy_topk)


def token_stats_backward(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor,
                         g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                         entropy_topk: bool) -> Tensor:
    """Gradient w.r.t. logits [N, V] (contiguous, logits' dtype), recomputing p tile by tile."""
    n, v = logits.shape
    cdt = _compute_dtype(logits.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    for r0, r1 in _row_tiles(n, v):
        s = logits[r0:r1].to(cdt) / temperature
        grad[r0:r1] = grad_tile(s, 0, tokens[r0:r1], valid[r0:r1], lse[r0:r1], entropy[r0:r1], topk_set[r0:r1],
                                c[r0:r1], g_logp[r0:r1].to(cdt), g_entropy[r0:r1].to(cdt), temperature,
                                entropy_topk)
    return grad


def _linear_tiles(n: int, v: int, chunk: Optional[Tuple[int, int]]):
    rows, cols = chunk or DEFAULT_LINEAR_CHUNK
    for r0 in range(0, n, rows):
        yield r0, min(n, r0 + rows), [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)]


def _logits_tile(h: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int, temperature: float,
                 cdt: torch.dtype) -> Tensor:
    s = h @ weight[v0:v1].to(cdt).T
    if bias is not None:
        s = s + bias[v0:v1].to(cdt)
    return s / temperature


def linear_token_stats_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                               temperature: float, topk: int, ignore_index: int, entropy_topk: bool,
                               chunk: Optional[Tuple[int, int]] = None) -> RowStats:
    """hidden [N, H], weight [V, H], bias [V] | None -> RowStats of s = (hidden @ weight.T + bias) / T."""
    n, v = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    parts = []
    for r0, r1, vtiles in _linear_tiles(n, v, chunk):
        h = hidden[r0:r1].to(cdt)
        acc = None
        for v0, v1 in vtiles:
            s = _logits_tile(h, weight, bias, v0, v1, temperature, cdt)
            acc = merge(acc, tile_partial(s, v0, tokens[r0:r1], topk), topk)
        parts.append(finalize(acc, tokens[r0:r1], valid[r0:r1], entropy_topk))
    return _cat_stats(parts, topk, hidden.new_zeros(0, dtype=cdt), entropy_topk)


def linear_token_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor, g_logp: Tensor,
                                g_entropy: Tensor, temperature: float, ignore_index: int, entropy_topk: bool,
                                chunk: Optional[Tuple[int, int]] = None):
    """Gradients (hidden, weight, bias) by recomputing each logits tile; accumulated in fp32/fp64."""
    n, v = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    g_hidden = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device)
    g_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    g_bias = torch.zeros(v, dtype=cdt, device=weight.device) if bias is not None else None
    for r0, r1, vtiles in _linear_tiles(n, v, chunk):
        h = hidden[r0:r1].to(cdt)
        saved = (lse[r0:r1], entropy[r0:r1], topk_set[r0:r1], c[r0:r1])
        for v0, v1 in vtiles:
            s = _logits_tile(h, weight, bias, v0, v1, temperature, cdt)
            gs = grad_tile(s, v0, tokens[r0:r1], valid[r0:r1], *saved, g_logp[r0:r1].to(cdt),
                           g_entropy[r0:r1].to(cdt), temperature, entropy_topk)
            g_hidden[r0:r1] += gs @ weight[v0:v1].to(cdt)
            g_weight[v0:v1] += gs.T @ h
            if g_bias is not None:
                g_bias[v0:v1] += gs.sum(dim=0)
    return (g_hidden.to(hidden.dtype), g_weight.to(weight.dtype),
            g_bias.to(bias.dtype) if g_bias is not None else None)
