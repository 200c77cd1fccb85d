"""Token statistics over the vocabulary as Triton kernels (SPEC section 1).

Same Python-side interface and semantics as `native.token_stats_forward/backward` and the torch reference
(`torch_ref/vocab.py`): logits [N, V] float32/bfloat16/float16 whose last dimension is contiguous (other
layouts are copied once to be so), int tokens [N]; float32 statistics, int64 ids; the gradient has the
logits' dtype and is contiguous.

Forward (`_fwd_kernel`, one program per row): one pass over the row in BLOCK_V tiles keeps a running max `m`,
`se = sum exp(s - m)` and `sh = sum exp(s - m) * (s - m)` (rescaled when the max grows), with one exp2 per
element; then lse = m + log se and the exact entropy = log se - sh / se (= lse - sum p*s, never
-sum p log p per element). The target logit is loaded directly. Top-k (k > 0) is k further passes over the
row, each taking the largest value strictly after the previous pick in the order (value desc, id asc), so
ties go to the smaller id; this re-reads the row k times (cheap for the small k this is used with, and
compiled out for k = 0). The exact-entropy accumulator compiles out when the top-k entropy is asked for.
The top-k entropy, its constant c and topk_set are O(N*k) and are computed in torch from the kernel's
top-k log-probs and target log-prob (`_topk_entropy`).

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

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._types import RowStats, backward_inputs, empty_row_stats, rows_contiguous

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _block(v: int, cap: int) -> int:
    # The interpreter's cost is per op, so it gets far larger tiles than compiled code.
    return max(16, min(triton.next_power_of_2(max(v, 1)), 1 << 15 if _interpreted() else cap))


@triton.jit(do_not_specialize=["V"])  # V seeds a loop-carried id: never a constexpr (V == 1)
def _fwd_kernel(x_ptr, stride_row, tok_ptr, logp_ptr, ent_ptr, lse_ptr, ids_ptr, tlogp_ptr,
                V, ignore_index, inv_t,
                K: tl.constexpr, EXACT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride_row
    tok = tl.load(tok_ptr + row)
    valid = tok != ignore_index
    tok = tl.where(valid, tok, 0)
    offs = tl.arange(0, BLOCK_V)
    v_end = tl.where(valid, V, 0)   # ignored rows load nothing (a column bound, not `& valid`: the
                                    # interpreter mishandles a scalar bool broadcast into a mask)

    m = float("-inf")   # running max of s
    se = 0.0            # sum exp(s - m)
    sh = 0.0            # sum exp(s - m) * (s - m)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        mask = cols < v_end
        s = tl.load(base + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(s, axis=0))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)     # all -inf so far: shift by 0, keep p = 0
        d = s - m_ref
        e = tl.exp2(d * LOG2E)
        alpha = tl.exp2((m - m_ref) * LOG2E)              # 0 while nothing was live
        if EXACT_ENTROPY:
            ed = tl.where(d == NEG_INF, 0.0, e * d)      # -inf logits contribute 0, not NaN
            sh = tl.where(se == 0.0, 0.0, alpha * (sh + (m - m_ref) * se)) + tl.sum(ed, axis=0)
        se = se * alpha + tl.sum(e, axis=0)
        m = m_new

    log_se = tl.log(se)
    lse = m + log_se
    tgt = tl.load(base + tok, mask=valid, other=0.0).to(tl.float32) * inv_t
    tl.store(logp_ptr + row, tl.where(valid, tgt - lse, 0.0))
    tl.store(lse_ptr + row, tl.where(valid, lse, 0.0))
    if EXACT_ENTROPY:
        tl.store(ent_ptr + row, tl.where(valid, log_se - sh / se, 0.0))

    if K > 0:
        # Round j takes the largest s strictly after the previous pick in (value desc, id asc) order.
        prev_v = float("inf")
        prev_i = -1
        for j in range(K):
            best_v = float("-inf")
            best_i = V
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                mask = cols < v_end
                s = tl.load(base + cols, mask=mask, other=NEG_INF).to(tl.float32) * inv_t
                elig = mask & ((s < prev_v) | ((s == prev_v) & (cols > prev_i)))
                sv = tl.where(elig, s, NEG_INF)
                tv = tl.max(sv, axis=0)
                ti = tl.min(tl.where(elig & (sv == tv), cols, V), axis=0)
                take = (tv > best_v) | ((tv == best_v) & (ti < best_i))
                best_v = tl.where(take, tv, best_v)
                best_i = tl.where(take, ti, best_i)
            tl.store(ids_ptr + row * K + j, tl.where(valid, best_i, 0).to(tl.int64))
            tl.store(tlogp_ptr + row * K + j, tl.where(valid, best_v - lse, 0.0))
            prev_v = best_v
            prev_i = best_i


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


def _topk_entropy(logp: Tensor, topk_ids: Tensor, topk_logp: Tensor, tokens: Tensor, valid: Tensor):
    """Truncated entropy -sum p log p over topk ∪ {token}, c = sum (1 + log p) p over that set, and topk_set
    ([n, k+1]: the top-k ids then the token, or -1 when the token is among them; -1 for ignored rows)."""
    tok = torch.where(valid, tokens, torch.zeros_like(tokens))
    in_topk = (topk_ids == tok[:, None]).any(dim=1)
    lp = torch.cat([topk_logp, logp[:, None]], dim=1)
    member = torch.cat([torch.ones_like(topk_ids, dtype=torch.bool), ~in_topk[:, None]], dim=1)
    prob = torch.where(member, torch.exp(lp), torch.zeros_like(lp))
    lp_floor = lp.clamp(min=torch.finfo(lp.dtype).min)
    entropy = torch.where(valid, -(prob * lp_floor).sum(dim=1), 0)
    c = torch.where(valid, (prob * (1 + lp_floor)).sum(dim=1), 0)
    topk_set = torch.where(member & valid[:, None], torch.cat([topk_ids, tok[:, None]], dim=1), -1)
    return entropy, c, topk_set


def token_stats_forward(logits: Tensor, tokens: Tensor, temperature: float, topk: int, ignore_index: int,
                        entropy_topk: bool) -> RowStats:
    """logits [N, V] -> RowStats (float32), as the torch reference computes it."""
    logits = _rows_contiguous(logits)
    n, v = logits.shape
    tokens = tokens.to(torch.int64).contiguous()
    logp, entropy, lse, topk_ids, topk_logp, topk_set, c = empty_row_stats(n, topk, False, logits.device)
    if n:
        block = _block(v, 4096)
        _fwd_kernel[(n,)](logits, logits.stride(0), tokens, logp, entropy, lse, topk_ids, topk_logp,
                          v, int(ignore_index), 1.0 / float(temperature),
                          K=int(topk), EXACT_ENTROPY=not entropy_topk, BLOCK_V=block,
                          num_warps=8 if block >= 2048 else 4)
    if entropy_topk:
        entropy, c, topk_set = _topk_entropy(logp, topk_ids, topk_logp, tokens, tokens != ignore_index)
    return RowStats(logp, entropy, lse, topk_ids, topk_logp, topk_set, c)


def token_stats_backward(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor,
                         g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                         entropy_topk: bool) -> Tensor:
    """Gradient w.r.t. logits [N, V] (contiguous, logits' dtype)."""
    logits = _rows_contiguous(logits)
    n, v = logits.shape
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n and v:
        tokens, lse, entropy, topk_set, c, g_logp, g_entropy, k = backward_inputs(
            tokens, lse, entropy, topk_set, c, g_logp, g_entropy, entropy_topk)
        block = _block(v, 2048)
        _bwd_kernel[(n, triton.cdiv(v, block))](
            logits, logits.stride(0), grad, tokens, lse, entropy, topk_set, c, g_logp, g_entropy,
            v, int(ignore_index), 1.0 / float(temperature),
            K=k, TOPK_ENTROPY=bool(entropy_topk), BLOCK_V=block, num_warps=8 if block >= 2048 else 4)
    return grad
