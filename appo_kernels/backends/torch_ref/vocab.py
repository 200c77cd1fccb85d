"""Token statistics over the vocabulary in plain torch (the reference backend).

Work is done in tiles of rows (and, for the fused linear variant, of the vocabulary) so that no [N, V]
temporary is ever held: each tile yields partial statistics (running max, sum of exp, sum of exp * shifted
logit, target logit, top-k candidates) that `_numerics.merge_row_partials` merges exactly (the same merge the
Triton kernels' vocabulary splits use), and the backward recomputes probabilities from the saved
per-row log-sum-exp. Tiles are computed in place in two scratch buffers reused across tiles (fresh
allocations per tile fragment the CPU heap and grow the resident set). Everything is computed in fp32
(fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..._numerics import compute_dtype, finite_floor_, merge_row_partials
from .._interface import RowStats, SavedStats, TokenOptions

# One [rows, V] scratch tile holds at most this many elements (16 MiB in fp32).
TILE_ELEMENTS = 1 << 22
DEFAULT_LINEAR_CHUNK = (1024, 4096)  # (rows, vocabulary) of one recomputed logits tile


class Scratch:
    """Two reusable [rows, cols] buffers; `view(i, rows, cols)` is a contiguous view of buffer i."""

    def __init__(self, rows: int, cols: int, dtype: torch.dtype, device: torch.device):
        self.bufs = [torch.empty(rows * cols, dtype=dtype, device=device) for _ in range(2)]

    def view(self, i: int, rows: int, cols: int) -> Tensor:
        return self.bufs[i][: rows * cols].view(rows, cols)


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


def tile_partial(s: Tensor, e: Tensor, v0: int, tokens: Tensor, k: int, vocab: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Partial statistics of scaled logits `s` [n, v] whose first column is vocabulary id `v0`: the
    `[4, n]` (m, se, sh, target) of `_numerics.merge_row_partials` and `[n, k]` top-k candidates (values,
    ids; a tile narrower than k pads with -inf and the id `vocab`, which means none).

    `s` is overwritten (shifted in place); `e` is a scratch buffer of the same shape.
    """
    n, v = s.shape
    local = tokens - v0
    inside = (local >= 0) & (local < v)
    picked = s.gather(1, local.clamp(0, v - 1)[:, None]).squeeze(1)
    target = torch.where(inside, picked, torch.zeros_like(picked))
    cand_v = s.new_full((n, k), float("-inf"))
    cand_i = torch.full((n, k), vocab, dtype=torch.int64, device=s.device)
    if k:
        kk = min(k, v)
        cand_v[:, :kk], cand_i[:, :kk] = topk_ties_to_smaller_id(s, kk)
        cand_i[:, :kk] += v0
    m = s.amax(dim=-1)
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    s.sub_(m_safe[:, None])
    torch.exp(s, out=e)
    sumexp = e.sum(dim=-1)
    shifted_sum = e.mul_(finite_floor_(s)).sum(dim=-1)
    return torch.stack([m, sumexp, shifted_sum, target]), cand_v, cand_i


def grad_tile_(s: Tensor, grad: Tensor, v0: int, tokens: Tensor, valid: Tensor, saved: SavedStats, g_logp: Tensor,
               g_entropy: Tensor, temperature: float, entropy_topk: bool) -> Tensor:
    """Write d loss / d logits of one tile of scaled logits `s` [n, v] into `grad` (method §1 gradients).

    With lp = s - lse and p = exp(lp):
      exact entropy:  grad = -(p * g_logp + p * (lp + H) * g_H) + g_logp * 1[v = token]
      top-k entropy:  grad = p * (g_H * c - g_logp) - g_H * 1[v in set] (1 + lp) p + g_logp * 1[v = token]
    all divided by the temperature. `s` is overwritten.
    """
    v = s.shape[1]
    s.sub_(saved.lse[:, None])                                    # log p
    if entropy_topk:
        local = saved.topk_set - v0
        inside = (saved.topk_set >= 0) & (local >= 0) & (local < v)
        local = local.clamp(0, v - 1)
        lp_set = s.gather(1, local)
        corr = torch.exp(lp_set) * (1 + finite_floor_(lp_set)) * g_entropy[:, None]
        torch.exp(s, out=grad).mul_((g_entropy * saved.c - g_logp)[:, None])
        grad.scatter_add_(1, local, torch.where(inside, -corr, torch.zeros_like(corr)))
    else:
        # -(p * g_logp + (p * (log p + H)) * g_H): p multiplies first, so a -inf logit (p = 0) gives 0 even
        # when g_H * (log p + H) would overflow.
        torch.exp(s, out=grad)
        s = finite_floor_(s).add_(saved.entropy[:, None]).mul_(grad).mul_(g_entropy[:, None])
        grad.mul_(g_logp[:, None]).add_(s).neg_()
    local = tokens - v0
    inside = (local >= 0) & (local < v)
    add = torch.where(inside, g_logp, torch.zeros_like(g_logp))
    grad.scatter_add_(1, local.clamp(0, v - 1)[:, None], add[:, None])
    return grad.masked_fill_(~valid[:, None], 0).div_(temperature)


def _row_tiles(n: int, width: int):
    rows = max(1, min(n, TILE_ELEMENTS // max(width, 1)))
    return rows, [(r0, min(n, r0 + rows)) for r0 in range(0, n, rows)]


def _scaled(dst: Tensor, src: Tensor, temperature: float) -> Tensor:
    return dst.copy_(src).div_(temperature)


def _valid_tokens(tokens: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    tokens = tokens.to(torch.int64)   # before comparing: a narrow dtype would wrap ignore_index
    valid = tokens != ignore_index
    return torch.where(valid, tokens, torch.zeros_like(tokens)), valid


def _write_rows(out: RowStats, r0: int, r1: int, stats) -> None:
    for dst, src in zip(out, stats):
        if dst.numel():
            dst[r0:r1].copy_(src)


def _saved_rows(saved: SavedStats, r0: int, r1: int) -> SavedStats:
    return SavedStats(*(t[r0:r1] if t.numel() else t for t in saved))


def token_stats_forward(logits: Tensor, tokens: Tensor, opts: TokenOptions, out: RowStats) -> None:
    """logits [N, V] (any strides), tokens [N] -> `out` (fp32, fp64 for fp64 logits)."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    tokens, valid = _valid_tokens(tokens, opts.ignore_index)
    rows, tiles = _row_tiles(n, v)
    scratch = Scratch(rows, v, cdt, logits.device)
    for r0, r1 in tiles:
        s = _scaled(scratch.view(0, r1 - r0, v), logits[r0:r1], opts.temperature)
        part, cand_v, cand_i = tile_partial(s, scratch.view(1, r1 - r0, v), 0, tokens[r0:r1], opts.topk, v)
        _write_rows(out, r0, r1, merge_row_partials(part[:, None], cand_v, cand_i, tokens[r0:r1], valid[r0:r1],
                                                    v, opts.topk, opts.entropy_topk))


def token_stats_backward(logits: Tensor, tokens: Tensor, saved: SavedStats, g_logp: Tensor, g_entropy: Tensor,
                         opts: TokenOptions, out: Tensor) -> None:
    """Gradient w.r.t. logits [N, V] written into contiguous `out` (logits' dtype), recomputing p tile by tile;
    `out` may be `logits` itself (each row tile is copied to scratch before it is written)."""
    n, v = logits.shape
    cdt = compute_dtype(logits.dtype)
    tokens, valid = _valid_tokens(tokens, opts.ignore_index)
    g_logp, g_entropy = g_logp.to(cdt), g_entropy.to(cdt)
    rows, tiles = _row_tiles(n, v)
    scratch = Scratch(rows, v, cdt, logits.device)
    for r0, r1 in tiles:
        s = _scaled(scratch.view(0, r1 - r0, v), logits[r0:r1], opts.temperature)
        # fp32/fp64 gradients are written straight into the output; others go through scratch.
        dst = out[r0:r1] if out.dtype == cdt else scratch.view(1, r1 - r0, v)
        g = grad_tile_(s, dst, 0, tokens[r0:r1], valid[r0:r1], _saved_rows(saved, r0, r1), g_logp[r0:r1],
                       g_entropy[r0:r1], opts.temperature, opts.entropy_topk)
        if g is not out[r0:r1]:
            out[r0:r1].copy_(g)


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
                               opts: TokenOptions, chunk: Optional[Tuple[int, int]], out: RowStats) -> None:
    """hidden [N, H], weight [V, H], bias [V] | None -> `out` of s = (hidden @ weight.T + bias) / T."""
    n, v = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    tokens, valid = _valid_tokens(tokens, opts.ignore_index)
    rows, cols, tiles = _linear_tiles(n, v, chunk)
    scratch = Scratch(rows, cols, cdt, hidden.device)
    for r0, r1, vtiles in tiles:
        h = hidden[r0:r1].to(cdt)
        parts = []
        for v0, v1 in vtiles:
            s = _logits_tile(scratch.view(0, r1 - r0, v1 - v0), h, weight, bias, v0, v1, opts.temperature)
            parts.append(tile_partial(s, scratch.view(1, r1 - r0, v1 - v0), v0, tokens[r0:r1], opts.topk, v))
        part = torch.stack([p[0] for p in parts], dim=1)                        # [4, tiles, rows]
        cand_v, cand_i = (torch.cat([p[i] for p in parts], dim=1) for i in (1, 2))
        _write_rows(out, r0, r1, merge_row_partials(part, cand_v, cand_i, tokens[r0:r1], valid[r0:r1], v,
                                                    opts.topk, opts.entropy_topk))


def linear_token_stats_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                saved: SavedStats, g_logp: Tensor, g_entropy: Tensor, opts: TokenOptions,
                                chunk: Optional[Tuple[int, int]],
                                out: Tuple[Tensor, Tensor, Optional[Tensor]]) -> None:
    """Gradients (hidden, weight, bias) into `out` by recomputing each logits tile; accumulated in fp32/fp64."""
    n, v = hidden.shape[0], weight.shape[0]
    cdt = compute_dtype(hidden.dtype)
    tokens, valid = _valid_tokens(tokens, opts.ignore_index)
    g_logp, g_entropy = g_logp.to(cdt), g_entropy.to(cdt)
    g_hidden = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device)
    g_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device)
    g_bias = torch.zeros(v, dtype=cdt, device=weight.device) if bias is not None else None
    rows, cols, tiles = _linear_tiles(n, v, chunk)
    scratch = Scratch(rows, cols, cdt, hidden.device)
    for r0, r1, vtiles in tiles:
        h = hidden[r0:r1].to(cdt)
        rows_saved = (tokens[r0:r1], valid[r0:r1], _saved_rows(saved, r0, r1), g_logp[r0:r1], g_entropy[r0:r1])
        for v0, v1 in vtiles:
            s = _logits_tile(scratch.view(0, r1 - r0, v1 - v0), h, weight, bias, v0, v1, opts.temperature)
            gs = grad_tile_(s, scratch.view(1, r1 - r0, v1 - v0), v0, *rows_saved, opts.temperature,
                            opts.entropy_topk)
            g_hidden[r0:r1].addmm_(gs, weight[v0:v1].to(cdt))
            g_weight[v0:v1].addmm_(gs.T, h)
            if g_bias is not None:
                g_bias[v0:v1] += gs.sum(dim=0)
    for dst, src in zip(out, (g_hidden, g_weight, g_bias)):
        if dst is not None:
            dst.copy_(src)
