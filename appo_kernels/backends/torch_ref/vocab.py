"""Token statistics over the vocabulary in plain torch (the reference backend).

Work is done in tiles of rows (and, for the fused linear variant, of the vocabulary) so that no [N, V]
temporary is ever held: each tile yields partial statistics (running max, sum of exp, sum of exp * shifted
logit, target logit, top-k) that merge exactly, and the backward recomputes probabilities from the saved
per-row log-sum-exp. Tiles are computed in place in two scratch buffers reused across tiles (fresh
allocations per tile fragment the CPU heap and grow the resident set). Everything is computed in fp32
(fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._types import RowStats

# One [rows, V] scratch tile holds at most this many elements (16 MiB in fp32).
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


class Scratch:
    """Two reusable [rows, cols] buffers; `view(i, rows, cols)` is a contiguous view of buffer i."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.bufs = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(2)]

    def view(self, i: int, rows: int, cols: int) -> Tensor:
        return self.bufs[i][: rows * cols].view(rows, cols)


def _finite_floor_(x: Tensor) -> Tensor:
    # -inf -> most negative finite value, so that 0 * x is 0 for masked vocabulary entries (NaN stays NaN).
    return x.clamp_(min=torch.finfo(x.dtype).min)


def topk_ties_to_smaller_id(s: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k largest entries of each row of s, descending, equal values ordered by id (torch.topk is not)."""
    n, v = s.shape
    kth = s.topk(k, dim=-1).values[:, -1:]            # the k-th largest value is unambiguous
    above = s > kth
    at = s == kth
    room = k - above.sum(dim=-1, keepdim=True, dtype=torch.int32)   # how many ids valued exactly kth make it
    take = above | (at & (at.cumsum(dim=-1, dtype=torch.int32) <= room))   # ... the smallest such ids
    rev_id = torch.arange(v, 0, -1, dtype=torch.int32, device=s.device)     # v - id: larger for smaller ids
    ids = (v - torch.where(take, rev_id, 0).topk(k, dim=-1).values).long()  # the k taken ids, ascending
    ids.clamp_(max=v - 1)                              # rows holding NaN take nothing; their stats are NaN
    vals = s.gather(1, ids)
    order = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    return vals.gather(1, order), ids.gather(1, order)


def tile_partial(s: Tensor, e: Tensor, v0: int, tokens: Tensor, k: int) -> Partial:
    """Partial statistics of scaled logits `s` [n, v] whose first column is vocabulary id `v0`.

    `s` is overwritten (shifted in place); `e` is a scratch buffer of the same shape.
    """
    v = s.shape[1]
    local = tokens - v0
    inside = (local >= 0) & (local < v)
    picked = s.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1)
    target = torch.where(inside, picked, torch.zeros_like(picked))
    if k:
        kk = min(k, v)
        topk_vals, topk_ids = topk_ties_to_smaller_id(s, kk)
        topk_ids = topk_ids + v0
    else:
        topk_vals = s.new_empty(s.shape[0], 0)
        topk_ids = torch.empty(s.shape[0], 0, dtype=torch.int64, device=s.device)
    m = s.amax(dim=-1)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    s.sub_(m_safe[:, None])
    torch.exp(s, out=e)
    sumexp = e.sum(dim=-1)
    shifted_sum = e.mul_(_finite_floor_(s)).sum(dim=-1)
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


def finalize(p: Partial, tokens: Tensor, valid: Tensor, vocab: int, entropy_topk: bool) -> RowStats:
    """Row statistics from merged partials; rows that are not `valid` (ignored) become 0, and a valid row whose
    token lies outside [0, vocab) (value checks off) gets NaN logp."""
    log_sumexp = torch.log(p.sumexp)
    lse = p.m + log_sumexp
    entropy = log_sumexp - p.shifted / p.sumexp
    # (s - m) - log sum exp(s - m), not s - lse: exact where |s| is large (logits around -1000 in fp32).
    target = torch.where((tokens >= 0) & (tokens < vocab), p.target, float("nan"))
    logp = (target - p.m) - log_sumexp
    topk_logp = (p.topk_vals - p.m[:, None]) - log_sumexp[:, None]
    topk_set, c = lse.new_empty(0), lse.new_empty(0)
    if entropy_topk:
        in_topk = (p.topk_ids == tokens[:, None]).any(dim=1)
        lp = torch.cat([topk_logp, logp[:, None]], dim=1)                    # [n, k+1]
        member = torch.cat([torch.ones_like(p.topk_ids, dtype=torch.bool), ~in_topk[:, None]], dim=1)
        prob = torch.where(member, torch.exp(lp), torch.zeros_like(lp))
        lp_floor = _finite_floor_(lp)
        entropy = -(prob * lp_floor).sum(dim=1)
        c = torch.where(valid, (prob * (1 + lp_floor)).sum(dim=1), 0)
        topk_set = torch.where(member & valid[:, None], torch.cat([p.topk_ids, tokens[:, None]], dim=1), -1)
    zero = torch.zeros_like(lse)
    vcol = valid[:, None]
    return RowStats(
        logp=torch.where(valid, logp, zero),
        entropy=torch.where(valid, entropy, zero),
        lse=torch.where(valid, lse, zero),
        topk_ids=torch.where(vcol, p.topk_ids, torch.zeros_like(p.topk_ids)),
        topk_logp=torch.where(vcol, topk_logp, torch.zeros_like(topk_logp)),
        topk_set=topk_set,
        c=c,
    )


def grad_tile_(s: Tensor, grad: Tensor, v0: int, tokens: Tensor, valid: Tensor, lse: Tensor, entropy: Tensor,
               topk_set: Tensor, c: Tensor, g_logp: Tensor, g_entropy: Tensor, temperature: float,
               entropy_topk: bool) -> Tensor:
    """Write d loss / d logits of one tile of scaled logits `s` [n, v] into `grad` (method §1 gradients).

    With lp = s - lse and p = exp(lp):
      exact entropy:  grad = -(p * g_logp + p * (lp + H) * g_H) + g_logp * 1[v = token]
      top-k entropy:  grad = p * (g_H * c - g_logp) - g_H * 1[v in set] (1 + lp) p + g_logp * 1[v = token]
    all divided by the temperature. `s` is overwritten.
    """
    v = s.shape[1]
    s.sub_(lse[:, None])                                          # log p
    if entropy_topk:
        local = topk_set - v0
        inside = (topk_set >= 0) & (local >= 0) & (local < v)
        local = local.clamp(0, v - 1)
        lp_set = s.gather(1, local)
        corr = torch.exp(lp_set) * (1 + _finite_floor_(lp_set)) * g_entropy[:, None]
        torch.exp(s, out=grad).mul_((g_entropy * c - g_logp)[:, None])
        grad.scatter_add_(1, local, torch.where(inside, -corr, torch.zeros_like(corr)))
    else:
        # -(p * g_logp + (p * (log p + H)) * g_H): p multiplies first, so a -inf logit (p = 0) gives 0 even
        # when g_H * (log p + H) would overflow.
        torch.exp(s, out=grad)
        s = _finite_floor_(s).add_(entropy[:, None]).mul_(grad).mul_(g_entropy[:, None])
        grad.mul_(g_logp[:, None]).add_(s).neg_()
    local = tokens - v0
    inside = (local >= 0) & (local < v)
    add = torch.where(inside, g_logp, torch.zeros_like(g_logp))
    grad.scatter_add_(1, local.clamp(0, v - 1)[:, None], add[:, None])
    return grad.masked_fill_(~valid[:, None], 0).div_(temperature)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_tiles(n: int, width: int):
    rows = max(1, min(n, TILE_ELEMENTS // max(width, 1)))
    return rows, [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def _scaled(dst: Tensor, src: Tensor, temperature: float) -> Tensor:
    return dst.copy_(src).div_(temperature)


def _cat_stats(parts, k: int, like: Tensor, entropy_topk: bool) -> RowStats:
    if parts:
        return RowStats(*[torch.cat(f, dim=0) for f in zip(*parts)])
    # No rows: distinct empty tensors (autograd must be able to tell the outputs apart).
    ids = torch.zeros(0, k, dtype=torch.int64, device=like.device)
    topk_set = torch.zeros(0, k + 1, dtype=torch.int64, device=like.device) if entropy_topk else like.new_zeros(0)
    return RowStats(like.new_zeros(0), like.new_zeros(0), like.new_zeros(0), ids, like.new_zeros(0, k), topk_set,
                    like.new_zeros(0))


def _valid_tokens(tokens: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    tokens = tokens.to(torch.int64)   # before comparing: a narrow dtype would wrap ignore_index
    valid = tokens != ignore_index
    return torch.where(valid, tokens, torch.zeros_like(tokens)), valid


def token_stats_forward(logits: Tensor, tokens: Tensor, temperature: float, topk: int, ignore_index: int,
                        entropy_topk: bool) -> RowStats:
    """logits [N, V] (any strides), tokens [N] -> RowStats (fp32, fp64 for fp64 logits)."""
    n, v = logits.shape
    cdt = _compute_dtype(logits.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    rows, tiles = _row_tiles(n, v)
    scratch = Scratch(rows, v, cdt, logits.device)
    parts = []
    for r0, r1 in tiles:
        s = _scaled(scratch.view(0, r1 - r0, v), logits[r0:r1], temperature)
        part = tile_partial(s, scratch.view(1, r1 - r0, v), 0, tokens[r0:r1], topk)
        parts.append(finalize(part, tokens[r0:r1], valid[r0:r1], v, entropy_topk))
    return _cat_stats(parts, topk, logits.new_zeros(0, dtype=cdt), entropy_topk)


def token_stats_backward(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor,
                         g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                         entropy_topk: bool, out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. logits [N, V] (contiguous, logits' dtype), recomputing p tile by tile; written into
    `out` when given (it may be `logits` itself: each row tile is copied to scratch before it is written)."""
    n, v = logits.shape
    cdt = _compute_dtype(logits.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    g_logp, g_entropy = g_logp.to(cdt), g_entropy.to(cdt)
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device) if out is None else out
    rows, tiles = _row_tiles(n, v)
    scratch = Scratch(rows, v, cdt, logits.device)
    for r0, r1 in tiles:
        s = _scaled(scratch.view(0, r1 - r0, v), logits[r0:r1], temperature)
        # fp32/fp64 gradients are written straight into the output; others go through scratch.
        out = grad[r0:r1] if grad.dtype == cdt else scratch.view(1, r1 - r0, v)
        g = grad_tile_(s, out, 0, tokens[r0:r1], valid[r0:r1], lse[r0:r1], entropy[r0:r1], topk_set[r0:r1],
                       c[r0:r1], g_logp[r0:r1], g_entropy[r0:r1], temperature, entropy_topk)
        if g is not grad[r0:r1]:
            grad[r0:r1].copy_(g)
    return grad


def _linear_tiles(n: int, v: int, chunk: Optional[Tuple[int, int]]):
    rows, cols = chunk or DEFAULT_LINEAR_CHUNK
    rows, cols = min(rows, max(n, 1)), min(cols, v)
    tiles = [(r0, min(n, r0 + rows), [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)])
             for r0 in range(0, n, rows)]
    return rows, cols, tiles


def _logits_tile(dst: Tensor, h: Tensor, weight: Tensor, bias: Optional[Tensor], v0: int, v1: int,
                 temperature: float) -> Tensor:
    torch.matmul(h, weight[v0:v1].to(h.dtype).T, out=dst)
    if bias is not None:
        dst.add_(bias[v0:v1].to(h.dtype))
    return dst.div_(temperature)


def linear_token_stats_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                               temperature: float, topk: int, ignore_index: int, entropy_topk: bool,
                               chunk: Optional[Tuple[int, int]] = None) -> RowStats:
    """hidden [N, H], weight [V, H], bias [V] | None -> RowStats of s = (hidden @ weight.T + bias) / T."""
    n, v = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    rows, cols, tiles = _linear_tiles(n, v, chunk)
    scratch = Scratch(rows, cols, cdt, hidden.device)
    parts = []
    for r0, r1, vtiles in tiles:
        h = hidden[r0:r1].to(cdt)
        acc = None
        for v0, v1 in vtiles:
            s = _logits_tile(scratch.view(0, r1 - r0, v1 - v0), h, weight, bias, v0, v1, temperature)
            acc = merge(acc, tile_partial(s, scratch.view(1, r1 - r0, v1 - v0), v0, tokens[r0:r1], topk), topk)
        parts.append(finalize(acc, tokens[r0:r1], valid[r0:r1], v, entropy_topk))
    return _cat_stats(parts, topk, hidden.new_zeros(0, dtype=cdt), entropy_topk)


def linear_token_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor, g_logp: Tensor,
                                g_entropy: Tensor, temperature: float, ignore_index: int, entropy_topk: bool,
                                chunk: Optional[Tuple[int, int]] = None):
    """Gradients (hidden, weight, bias) by recomputing each logits tile; accumulated in fp32/fp64."""
    n, v = hidden.shape[0], weight.shape[0]
    cdt = _compute_dtype(hidden.dtype)
    tokens, valid = _valid_tokens(tokens, ignore_index)
    g_logp, g_entropy = g_logp.to(cdt), g_entropy.to(cdt)
    g_hidden = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device)
    g_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    g_bias = torch.zeros(v, dtype=cdt, device=weight.device) if bias is not None else None
    rows, cols, tiles = _linear_tiles(n, v, chunk)
    scratch = Scratch(rows, cols, cdt, hidden.device)
    for r0, r1, vtiles in tiles:
        h = hidden[r0:r1].to(cdt)
        saved = (tokens[r0:r1], valid[r0:r1], lse[r0:r1], entropy[r0:r1], topk_set[r0:r1], c[r0:r1],
                 g_logp[r0:r1], g_entropy[r0:r1])
        for v0, v1 in vtiles:
            s = _logits_tile(scratch.view(0, r1 - r0, v1 - v0), h, weight, bias, v0, v1, temperature)
            gs = grad_tile_(s, scratch.view(1, r1 - r0, v1 - v0), v0, *saved, temperature, entropy_topk)
            g_hidden[r0:r1].addmm_(gs, weight[v0:v1].to(cdt))
            g_weight[v0:v1].addmm_(gs.T, h)
            if g_bias is not None:
                g_bias[v0:v1] += gs.sum(dim=0)
    return (g_hidden.to(hidden.dtype), g_weight.to(weight.dtype),
            g_bias.to(bias.dtype) if g_bias is not None else None)
