"""Token statistics over the vocabulary as Triton kernels (method §1).

Same Python-side interface and semantics as `native.token_stats_forward/backward` and the torch reference
(`torch_ref/vocab.py`): logits [N, V] float32/bfloat16/float16 whose last dimension is contiguous (other
layouts are copied once to be so), int tokens [N]; float32 statistics, int64 ids; the gradient has the
logits' dtype and is contiguous.

Forward (`_fwd_kernel`, a grid over rows x vocabulary splits; one split per row unless there are too few
rows to fill the GPU, then about 4 programs per SM): each program makes one pass over its columns in BLOCK_V
tiles, keeping a running max `m`, `se = sum exp(s - m)` and `sh = sum exp(s - m) * (s - m)` (rescaled when
the max grows), with one exp2 per element, and loads the target logit if its split holds it. Top-k (k > 0,
at most 64) is kept in registers during the same pass: a tile is merged into the running list (k rounds
over tile + list, value desc, ties to the smaller id) only when its maximum beats the k-th kept value, so
the per-element work stays that of the statistics. With one split the kernel writes the final statistics:
lse = m + log se, exact entropy = log se - sh / se (= lse - sum p*s, never -sum p log p per element), top-k
log-probs; with several, the per-split partials and candidates are merged in torch by the same formulas
(`_numerics.merge_row_partials`, shared with linear_token_stats and the torch reference). The exact-entropy
accumulator compiles out when the top-k entropy is asked for; the top-k entropy, its constant c and topk_set
are O(N*k) and are computed in torch from the top-k log-probs and target log-prob (`_numerics.topk_entropy`).

Backward (`_bwd_kernel`, one program per row x BLOCK_V tile): reads logits once, recomputes p from the
saved lse, writes the gradient once; the target term and the top-k-set correction are applied in fp32
before the single rounding to the output dtype.

Conventions (as the reference): ignored rows (token == ignore_index) give 0 everywhere (ids 0, topk_set -1)
and a zero gradient; -inf logits give p = 0 and no NaN; an all -inf row gives lse = -inf and NaN
logp/entropy. NaN logits are not ordered by top-k (the reference puts them first); their rows' statistics
are NaN anyway. Interpreter rules (TRITON_INTERPRET=1): values are upcast to fp32 right after tl.load and
downcast only at tl.store; no libdevice, no block pointers, no autotune.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._numerics import merge_row_partials, topk_entropy
from .._interface import (RowStats, SavedStats, TokenOptions, copy_stats_, kernel_backward_inputs,
                          rows_contiguous)
from . import TOKEN_STATS_MAX_TOPK as MAX_TOPK
from . import interpreting

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _block(v: int, cap: int) -> int:
    # The interpreter's cost is per op, so it gets far larger tiles than compiled code.
    return max(16, min(triton.next_power_of_2(max(v, 1)), 1 << 15 if interpreting() else cap))


@triton.jit(do_not_specialize=["V", "v_per_split"])   # V seeds loop-carried ids: never a constexpr (V == 1)
def _fwd_kernel(x_ptr, stride_row, tok_ptr, m_ptr, se_ptr, sh_ptr, tgt_ptr, lse_ptr, logp_ptr, ent_ptr,
                val_ptr, id_ptr, N, V, v_per_split, ignore_index, inv_t,
                K: tl.constexpr, KP: tl.constexpr, EXACT_ENTROPY: tl.constexpr, SINGLE: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """Program (row, split) over columns [split * v_per_split, +v_per_split) of one row. SINGLE (one split):
    the row's final lse / logp / entropy and top-k (val = log-probs, id = ids, [N, K]). Otherwise partials
    (m, se, sh, target logit) at [split, row] and top-k candidates (val = scaled logits) at [row, split, K]."""
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    base = x_ptr + row * stride_row
    tok = tl.load(tok_ptr + row)
    valid = tok != ignore_index
    v_start = split * v_per_split
    v_stop = tl.minimum(V, v_start + v_per_split)
    v_end = tl.where(valid, v_stop, v_start)   # ignored rows load nothing (a column bound, not `& valid`: the
                                               # interpreter mishandles a scalar bool broadcast into a mask)
    offs = tl.arange(0, BLOCK_V)
    slot = tl.arange(0, KP)
    top_v = tl.full((KP,), NEG_INF, tl.float32)   # running top-K, (value desc, id asc); id V marks "empty"
    top_i = tl.full((KP,), V, tl.int32)

    m = float("-inf")   # running max of s
    se = 0.0            # sum exp(s - m)
    sh = 0.0            # sum exp(s - m) * (s - m)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + offs
        mask = cols < v_end
        s = tl.load(base + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
        tile_max = tl.max(s, axis=0)
        m_new = tl.maximum(m, tile_max)
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)     # all -inf so far: shift by 0, keep p = 0
        d = s - m_ref
        e = tl.exp2(d * LOG2E)
        alpha = tl.exp2((m - m_ref) * LOG2E)              # 0 while nothing was live
        if EXACT_ENTROPY:
            ed = tl.where(d == NEG_INF, 0.0, e * d)      # -inf logits contribute 0, not NaN
            sh = tl.where(se == 0.0, 0.0, alpha * (sh + (m - m_ref) * se)) + tl.sum(ed, axis=0)
        se = se * alpha + tl.sum(e, axis=0)
        m = m_new
        if K > 0:
            # Off the per-element path: only a tile whose best beats the K-th kept value (or that meets a
            # list not yet full) is merged. Later tiles hold larger ids, so an equal value never beats it.
            kth_v = tl.max(tl.where(slot == K - 1, top_v, NEG_INF), axis=0)
            kth_i = tl.min(tl.where(slot == K - 1, top_i, V), axis=0)
            if (tile_max > kth_v) | (kth_i == V):
                # K rounds over tile + list; round j takes the best entry strictly after round j-1's pick.
                new_v = tl.full((KP,), NEG_INF, tl.float32)
                new_i = tl.full((KP,), V, tl.int32)
                prev_v = float("inf")
                prev_i = -1
                for j in range(K):
                    el = mask & ((s < prev_v) | ((s == prev_v) & (cols > prev_i)))
                    sv = tl.where(el, s, NEG_INF)
                    tv = tl.max(sv, axis=0)
                    ti = tl.min(tl.where(el & (sv == tv), cols, V), axis=0)
                    ll = (slot < K) & ((top_v < prev_v) | ((top_v == prev_v) & (top_i > prev_i)))
                    lv_all = tl.where(ll, top_v, NEG_INF)
                    lv = tl.max(lv_all, axis=0)
                    li = tl.min(tl.where(ll & (lv_all == lv), top_i, V), axis=0)
                    from_list = (lv > tv) | ((lv == tv) & (li < ti))
                    prev_v = tl.where(from_list, lv, tv)
                    prev_i = tl.where(from_list, li, ti)
                    new_v = tl.where(slot == j, prev_v, new_v)
                    new_i = tl.where(slot == j, prev_i, new_i)
                top_v = new_v
                top_i = new_i

    # The target logit, from the split whose columns hold it (others add 0).
    here = valid & (tok >= v_start) & (tok < v_stop)
    tgt = tl.where(here, tl.load(base + tl.where(here, tok, 0), mask=here, other=0.0).to(tl.float32) * inv_t, 0.0)
    tgt = tl.where(valid & ((tok < 0) | (tok >= V)), float("nan"), tgt)   # id out of range (checks off): NaN logp
    off = (row * splits + split) * K + slot
    if SINGLE:      # the common case (enough rows): final statistics, no merge pass
        log_se = tl.log(se)
        lse = m + log_se
        tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
        # (s - m) - log se rather than s - lse: exact where |s| is large (logits around -1000).
        tl.store(logp_ptr + row, tl.where(valid, (tgt - m) - log_se, 0.0))
        if EXACT_ENTROPY:
            tl.store(ent_ptr + row, tl.where(valid, log_se - sh / se, 0.0))
        if K > 0:
            tl.store(val_ptr + off, tl.where(valid, (top_v - m) - log_se, 0.0), mask=slot < K)
            tl.store(id_ptr + off, tl.where(valid, top_i, 0).to(tl.int64), mask=slot < K)
    else:
        out = split.to(tl.int64) * N + row
        tl.store(m_ptr + out, m)
        tl.store(se_ptr + out, se)
        tl.store(sh_ptr + out, sh)
        tl.store(tgt_ptr + out, tgt)
        if K > 0:
            tl.store(val_ptr + off, top_v, mask=slot < K)
            tl.store(id_ptr + off, top_i.to(tl.int64), mask=slot < K)


@triton.jit
def _bwd_kernel(x_ptr, stride_row, g_ptr, tok_ptr, lse_ptr, ent_ptr, set_ptr, c_ptr, glp_ptr, gh_ptr,
                V, ignore_index, inv_t,
                K: tl.constexpr, TOPK_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    v0 = tl.program_id(1) * BLOCK_V
    cols = v0 + tl.arange(0, BLOCK_V)
    inb = cols < V
    tok = tl.load(tok_ptr + row)
    valid = tok != ignore_index
    v_end = tl.where(valid, V, 0)   # ignored rows load nothing
    s = tl.load(x_ptr + row * stride_row + cols, mask=cols < v_end, other=NEG_INF).to(tl.float32) * inv_t
    lse = tl.load(lse_ptr + row)
    glp = tl.load(glp_ptr + row)
    gh = tl.load(gh_ptr + row)
    lp = s - lse
    p = tl.exp2(lp * LOG2E)
    if TOPK_ENTROPY:
        c = tl.load(c_ptr + row)
        g = p * (gh * c - glp)
        in_set = cols < 0
        for j in tl.static_range(K + 1):
            sid = tl.load(set_ptr + row * (K + 1) + j)   # -1 never matches
            in_set = in_set | (cols == sid)
        corr = tl.where(lp == NEG_INF, 0.0, (1.0 + lp) * p) * gh
        g = tl.where(in_set, g - corr, g)
    else:
        h = tl.load(ent_ptr + row)
        # p multiplies first, so a -inf logit (p = 0) gives exactly 0.
        ph = tl.where(lp == NEG_INF, 0.0, p * (lp + h))
        g = -(p * glp + ph * gh)
    g = tl.where(cols == tok, g + glp, g)             # target term in fp32, before rounding
    g = tl.where(valid, g * inv_t, 0.0)
    tl.store(g_ptr + row * V + cols, g.to(g_ptr.dtype.element_ty), mask=inb)


def _rows_contiguous(logits: Tensor) -> Tensor:
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits: expected float32/bfloat16/float16, got {logits.dtype}")
    return rows_contiguous(logits)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def token_stats_forward(logits: Tensor, tokens: Tensor, opts: TokenOptions, out: RowStats,
                        vocab_splits: int | None = None, block_v: int | None = None) -> None:
    """logits [N, V] -> `out` (float32), as the torch reference computes it.

    The grid is (rows, vocabulary splits): with few rows the vocabulary is split so that about 4 programs per
    SM run (`vocab_splits` overrides; `block_v` overrides the tile width; both for tests and tuning)."""
    logits = _rows_contiguous(logits)
    n, v = logits.shape
    topk = int(opts.topk)
    if topk > MAX_TOPK:
        raise ValueError(f"topk: the Triton kernel keeps at most {MAX_TOPK} ids in registers, got {topk}")
    tokens = tokens.to(torch.int64).contiguous()
    dev = logits.device
    cap = 4096
    if vocab_splits is None:
        tiles = triton.cdiv(v, cap)
        vocab_splits = min(tiles, max(1, triton.cdiv(4 * _num_sms(dev), max(n, 1))))
    per_split = triton.cdiv(v, max(1, min(int(vocab_splits), v)))
    splits = triton.cdiv(v, per_split)
    block = int(block_v) if block_v is not None else _block(per_split, cap)
    single = splits == 1
    valid = tokens != opts.ignore_index
    part = torch.empty(4, 0 if single else splits, n, dtype=torch.float32, device=dev)
    cand_v = out.topk_logp if single else torch.empty(n, splits, topk, dtype=torch.float32, device=dev)
    cand_i = out.topk_ids if single else torch.empty(n, splits, topk, dtype=torch.int64, device=dev)
    if n:
        partials = (out.lse,) * 4 if single else tuple(part)      # unused pointers get a valid tensor
        _fwd_kernel[(n, splits)](logits, logits.stride(0), tokens, *partials, out.lse, out.logp, out.entropy,
                                 cand_v, cand_i, n, v, per_split, int(opts.ignore_index), 1.0 / float(opts.temperature),
                                 K=topk, KP=max(2, triton.next_power_of_2(topk)),
                                 EXACT_ENTROPY=not opts.entropy_topk, SINGLE=single, BLOCK_V=block,
                                 num_warps=8 if block >= 2048 else 4)
    if not single:
        copy_stats_(out, merge_row_partials(part, cand_v, cand_i, tokens, valid, v, topk, opts.entropy_topk))
    elif opts.entropy_topk:
        entropy, c, topk_set = topk_entropy(out.logp, out.topk_ids, out.topk_logp, tokens, valid)
        out.entropy.copy_(entropy)
        out.topk_set.copy_(topk_set)
        out.c.copy_(c)


def token_stats_backward(logits: Tensor, tokens: Tensor, saved: SavedStats, g_logp: Tensor, g_entropy: Tensor,
                         opts: TokenOptions, out: Tensor) -> None:
    """Gradient w.r.t. logits [N, V] into contiguous `out` (logits' dtype), which may be `logits` itself (each
    program reads its tile before writing the same tile)."""
    logits = _rows_contiguous(logits)
    n, v = logits.shape
    if n and v:
        b = kernel_backward_inputs(tokens, saved, g_logp, g_entropy, opts.entropy_topk)
        block = _block(v, 2048)
        _bwd_kernel[(n, triton.cdiv(v, block))](
            logits, logits.stride(0), out, b.tokens, b.lse, b.entropy, b.topk_set, b.c, b.g_logp, b.g_entropy,
            v, int(opts.ignore_index), 1.0 / float(opts.temperature),
            K=b.k, TOPK_ENTROPY=bool(opts.entropy_topk), BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
