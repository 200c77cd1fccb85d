"""Token statistics of a fused linear head as Triton kernels (method §1, `linear_token_stats`).

Same signatures and semantics as `torch_ref/vocab.py`'s `linear_token_stats_forward/backward`: hidden [N, H],
weight [V, H], bias [V] | None (float32/bfloat16/float16), int tokens [N]; the scaled logits
s = (hidden @ weight.T + bias) / temperature are computed tile by tile and never written to memory as [N, V].
Statistics are float32 (ids int64); gradients have the dtypes of hidden / weight / bias.

Forward (`_fwd_kernel`): a grid over (row tiles of BLOCK_N, vocabulary splits). Each program loops over its
vocabulary range in BLOCK_V tiles; each [BLOCK_N, BLOCK_V] logits tile is `tl.dot` over H in BLOCK_H steps
(fp32 accumulation), then folded into per-row online partials: running max m, se = sum exp(s - m),
sh = sum exp(s - m) * (s - m) (one exp2 per element) and the target logit. The per-(split, row) partials are
merged in torch by `_numerics.merge_row_partials` (rescale by exp(m - m_new), as the reference's `merge`). Top-k
(k > 0): each tile yields its k best (value desc, ties to the smaller id) as candidates [N, tiles, k], which
`merge_row_partials` sorts by (value desc, id asc) into the global top-k. The top-k
entropy, c and topk_set are O(N*k) and computed in torch (`_numerics.topk_entropy`).

Backward, by recomputation, deterministic (no atomics), two kernels sharing `_grad_tile`:
  `_bwd_hidden_kernel`: one program per row tile loops over all vocabulary tiles: recompute s, grad_s
      (as the reference's `grad_tile_`, fp32), g_hidden[rows] += grad_s @ W_tile;
  `_bwd_weight_kernel`: one program per vocabulary tile loops over all row tiles: recompute s, grad_s,
      g_weight[tile] += grad_s.T @ h_rows, g_bias[tile] += column sums.
Each program owns its output rows and accumulates them in an fp32 buffer (read-modify-write by the same
program, same pointer layout), cast to the output dtype at the end. The logits are recomputed twice
(4 matmuls of 2*N*H*V FLOPs instead of the minimal 3); the price of determinism without an [N, V] buffer.

Matmul precision: float32 inputs use `input_precision="ieee"` (no TF32); bf16/fp16 inputs use the native
tensor-core dot with fp32 accumulation when compiled (the backward rounds grad_s to the weight/hidden dtype
for its two dots, as Liger does), and fp32 dots in the interpreter (TRITON_INTERPRET=1), where bf16 dots are
wrong. Ignored rows (token == ignore_index) give 0 everywhere (ids 0, topk_set -1) and no gradient.
`chunk=(rows, cols)`: `cols` (rounded up to BLOCK_V) is the vocabulary width of one forward split; `rows` is
ignored (the row tile is BLOCK_N).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from ..._numerics import merge_row_partials
from .._interface import RowStats, SavedStats, TokenOptions, copy_stats_, kernel_backward_inputs
from . import interpreting
from .token_stats import _num_sms

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_in, cols, col_in, H, inv_t,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """s[rows, cols] = (h[rows] @ w[cols].T + b[cols]) * inv_t in fp32; out-of-range entries are finite junk."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    hk0 = tl.arange(0, BLOCK_H)
    for k0 in range(0, H, BLOCK_H):
        hk = k0 + hk0
        k_in = hk < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + hk[:, None], mask=col_in[None, :] & k_in[:, None], other=0.0)
        if DOT_F32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return acc * inv_t


@triton.jit
def _fwd_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr, m_ptr, se_ptr, sh_ptr, tgt_ptr, cv_ptr, ci_ptr,
                N, V, H, inv_t, v_per_split, NT,
                HAS_BIAS: tl.constexpr, K: tl.constexpr, DOT_F32: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    split = tl.program_id(1)
    v_start = split * v_per_split
    v_stop = tl.minimum(V, v_start + v_per_split)
    tok = tl.load(tok_ptr + rows, mask=row_in, other=-1)
    offs = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    se = tl.zeros((BLOCK_N,), tl.float32)
    sh = tl.zeros((BLOCK_N,), tl.float32)
    tgt = tl.zeros((BLOCK_N,), tl.float32)
    for v0 in range(v_start, v_stop, BLOCK_V):
        cols = v0 + offs
        col_in = cols < v_stop
        s = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_in, cols.to(tl.int64), col_in, H,
                         inv_t, HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
        s = tl.where(col_in[None, :], s, NEG_INF)
        tgt += tl.sum(tl.where(cols[None, :] == tok[:, None], s, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)     # all -inf so far: shift by 0, keep p = 0
        d = s - m_ref[:, None]
        e = tl.exp2(d * LOG2E)
        alpha = tl.exp2((m - m_ref) * LOG2E)                # 0 while nothing was live
        ed = tl.where(d == NEG_INF, 0.0, e * d)             # -inf logits contribute 0, not NaN
        sh = tl.where(se == 0.0, 0.0, alpha * (sh + (m - m_ref) * se)) + tl.sum(ed, axis=1)
        se = se * alpha + tl.sum(e, axis=1)
        m = m_new
        if K > 0:
            # The tile's K best, value desc, ties to the smaller id; -inf / id V when the tile has fewer.
            t = v0 // BLOCK_V   # rows is int64, so the offset below is int64
            avail = tl.broadcast_to(col_in[None, :], (BLOCK_N, BLOCK_V))
            for j in tl.static_range(K):
                sv = tl.where(avail, s, NEG_INF)
                tv = tl.max(sv, axis=1)
                ti = tl.min(tl.where(avail & (sv == tv[:, None]), cols[None, :], V), axis=1)
                off = (rows * NT + t) * K + j
                tl.store(cv_ptr + off, tv, mask=row_in)
                tl.store(ci_ptr + off, ti.to(tl.int64), mask=row_in)
                avail = avail & (cols[None, :] != ti[:, None])

    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_in)
    tl.store(se_ptr + out, se, mask=row_in)
    tl.store(sh_ptr + out, sh, mask=row_in)
    tl.store(tgt_ptr + out, tgt, mask=row_in)


@triton.jit
def _grad_tile(s, cols, col_in, tok, valid, lse, ent, glp, gh, set_ptr, c_ptr, rows, row_in, inv_t,
               K: tl.constexpr, TOPK_ENTROPY: tl.constexpr):
    """d loss / d logits of a tile (as the reference's `grad_tile_`), fp32, 0 outside valid rows / columns."""
    LOG2E: tl.constexpr = 1.4426950408889634
    NEG_INF: tl.constexpr = float("-inf")
    lp = s - lse[:, None]
    p = tl.exp2(lp * LOG2E)
    if TOPK_ENTROPY:
        c = tl.load(c_ptr + rows, mask=row_in, other=0.0)
        g = p * (gh * c - glp)[:, None]
        in_set = cols[None, :] < 0
        for j in tl.static_range(K + 1):
            sid = tl.load(set_ptr + rows * (K + 1) + j, mask=row_in, other=-1)   # -1 never matches
            in_set = in_set | (cols[None, :] == sid[:, None])
        corr = tl.where(lp == NEG_INF, 0.0, (1.0 + lp) * p) * gh[:, None]
        g = tl.where(in_set, g - corr, g)
    else:
        # p multiplies first, so a -inf logit (p = 0) gives exactly 0.
        ph = tl.where(lp == NEG_INF, 0.0, p * (lp + ent[:, None]))
        g = -(p * glp[:, None] + ph * gh[:, None])
    g = tl.where(cols[None, :] == tok[:, None], g + glp[:, None], g)   # target term in fp32
    return tl.where(valid[:, None] & col_in[None, :], g * inv_t, 0.0)


@triton.jit
def _load_row_saved(tok_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, rows, row_in, ignore_index,
                    TOPK_ENTROPY: tl.constexpr):
    tok = tl.load(tok_ptr + rows, mask=row_in, other=-1)
    valid = row_in & (tok != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_in, other=0.0)
    ent = lse
    if not TOPK_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_in, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_in, other=0.0)
    gh = tl.load(gh_ptr + rows, mask=row_in, other=0.0)
    return tok, valid, lse, ent, glp, gh


@triton.jit
def _bwd_hidden_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr, lse_ptr, ent_ptr, set_ptr, c_ptr,
                       glp_ptr, gh_ptr, gx_ptr, N, V, H, ignore_index, inv_t,
                       HAS_BIAS: tl.constexpr, K: tl.constexpr, TOPK_ENTROPY: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < N
    tok, valid, lse, ent, glp, gh = _load_row_saved(tok_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, rows, row_in,
                                                    ignore_index, TOPK_ENTROPY)
    offs = tl.arange(0, BLOCK_V)
    hk0 = tl.arange(0, BLOCK_H)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        col_in = cols < V
        cols64 = cols.to(tl.int64)
        s = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_in, cols64, col_in, H, inv_t,
                         HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
        g = _grad_tile(s, cols, col_in, tok, valid, lse, ent, glp, gh, set_ptr, c_ptr, rows, row_in, inv_t,
                       K, TOPK_ENTROPY)
        if not DOT_F32:
            g = g.to(w_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            hk = k0 + hk0
            k_in = hk < H
            w = tl.load(w_ptr + cols64[:, None] * stride_w + hk[None, :], mask=col_in[:, None] & k_in[None, :],
                        other=0.0)
            gx_ptrs = gx_ptr + rows[:, None] * H + hk[None, :]
            gx_mask = row_in[:, None] & k_in[None, :]
            acc = tl.load(gx_ptrs, mask=gx_mask, other=0.0)
            if DOT_F32:
                acc = tl.dot(g, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(g, w, acc)
            tl.store(gx_ptrs, acc, mask=gx_mask)


@triton.jit
def _bwd_weight_kernel(h_ptr, stride_h, w_ptr, stride_w, b_ptr, tok_ptr, lse_ptr, ent_ptr, set_ptr, c_ptr,
                       glp_ptr, gh_ptr, gw_ptr, gb_ptr, N, V, H, ignore_index, inv_t,
                       HAS_BIAS: tl.constexpr, K: tl.constexpr, TOPK_ENTROPY: tl.constexpr, DOT_F32: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_in = cols < V
    cols64 = cols.to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    hk0 = tl.arange(0, BLOCK_H)
    gb = tl.zeros((BLOCK_V,), tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + offs.to(tl.int64)
        row_in = rows < N
        tok, valid, lse, ent, glp, gh = _load_row_saved(tok_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, rows, row_in,
                                                        ignore_index, TOPK_ENTROPY)
        s = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, b_ptr, rows, row_in, cols64, col_in, H, inv_t,
                         HAS_BIAS, DOT_F32, BLOCK_N, BLOCK_V, BLOCK_H)
        g = _grad_tile(s, cols, col_in, tok, valid, lse, ent, glp, gh, set_ptr, c_ptr, rows, row_in, inv_t,
                       K, TOPK_ENTROPY)
        if HAS_BIAS:
            gb += tl.sum(g, axis=0)
        gt = tl.trans(g)
        if not DOT_F32:
            gt = gt.to(h_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_H):
            hk = k0 + hk0
            k_in = hk < H
            x = tl.load(h_ptr + rows[:, None] * stride_h + hk[None, :], mask=row_in[:, None] & k_in[None, :],
                        other=0.0)
            gw_ptrs = gw_ptr + cols64[:, None] * H + hk[None, :]
            gw_mask = col_in[:, None] & k_in[None, :]
            acc = tl.load(gw_ptrs, mask=gw_mask, other=0.0)
            if DOT_F32:
                acc = tl.dot(gt, x.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(gt, x, acc)
            tl.store(gw_ptrs, acc, mask=gw_mask)
    if HAS_BIAS:
        tl.store(gb_ptr + cols, gb, mask=col_in)


# ---------------------------------------------------------------------------------------------------------------
# Python side


def _check(hidden: Tensor, weight: Tensor, bias: Tensor | None):
    for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in DTYPES:
            raise TypeError(f"{name}: expected float32/bfloat16/float16, got {t.dtype}")
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    # Native (tensor-core) dots only when compiled and both operands share a 16-bit dtype.
    dot_f32 = interpreting() or hidden.dtype != weight.dtype or hidden.dtype == torch.float32
    return hidden, weight, bias, dot_f32


def _blocks(n: int, v: int, h: int, dot_f32: bool):
    p2 = triton.next_power_of_2
    if interpreting():   # cost is per op: big tiles
        return max(16, min(p2(max(n, 1)), 64)), max(16, min(p2(max(v, 1)), 256)), max(16, min(p2(max(h, 1)), 128))
    if dot_f32:
        return 32, 64, 32
    # BLOCK_H 32, not 64: with 64 the three kernels sit at 255 registers and the weight backward spills
    # (656 B of stack on sm_90 per `.ci/check_triton.py`); with 32 none of the variants it compiles spills on
    # sm_90. Chosen from the compile check, not from timings (no GPU has run these kernels yet).
    return 64, 128, 32


def linear_token_stats_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                               opts: TokenOptions, chunk: tuple[int, int] | None, out: RowStats) -> None:
    """hidden [N, H], weight [V, H], bias [V] | None -> `out` (float32) of s = (hidden @ weight.T + bias) / T."""
    hidden, weight, bias, dot_f32 = _check(hidden, weight, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    k = int(opts.topk)
    tokens = tokens.to(torch.int64).contiguous()
    valid = tokens != opts.ignore_index
    f32 = {"dtype": torch.float32, "device": dev}
    bn, bv, bh = _blocks(n, v, h, dot_f32)
    nt = triton.cdiv(v, bv)
    row_tiles = triton.cdiv(n, bn)
    if chunk is not None:
        tiles_per_split = max(1, triton.cdiv(int(chunk[1]), bv))
    else:
        want = max(1, triton.cdiv(4 * _num_sms(dev), max(row_tiles, 1)))   # enough programs to fill the GPU
        tiles_per_split = triton.cdiv(nt, min(nt, want))
    splits = triton.cdiv(nt, tiles_per_split)
    part = torch.empty(4, splits, n, **f32)
    cand_v = torch.empty(n, nt, k, **f32)
    cand_i = torch.empty(n, nt, k, dtype=torch.int64, device=dev)
    if n and v:
        _fwd_kernel[(row_tiles, splits)](
            hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else hidden, tokens,
            part[0], part[1], part[2], part[3], cand_v, cand_i,
            n, v, h, 1.0 / float(opts.temperature), tiles_per_split * bv, nt,
            HAS_BIAS=bias is not None, K=k, DOT_F32=dot_f32, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh,
            num_warps=4 if dot_f32 else 8)
    copy_stats_(out, merge_row_partials(part, cand_v, cand_i, tokens, valid, v, k, opts.entropy_topk))


def linear_token_stats_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, tokens: Tensor,
                                saved: SavedStats, g_logp: Tensor, g_entropy: Tensor, opts: TokenOptions,
                                chunk: tuple[int, int] | None, out: tuple) -> None:
    """Gradients (hidden, weight, bias | None) into `out` by recomputing each logits tile; accumulated in fp32."""
    hidden, weight, bias, dot_f32 = _check(hidden, weight, bias)
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    g_hidden = torch.zeros((n, h), dtype=torch.float32, device=dev)
    g_weight = torch.zeros((v, h), dtype=torch.float32, device=dev)
    g_bias = torch.zeros(v, dtype=torch.float32, device=dev) if bias is not None else None
    if n and v and h:
        b = kernel_backward_inputs(tokens, saved, g_logp, g_entropy, opts.entropy_topk)
        bn, bv, bh = _blocks(n, v, h, dot_f32)
        args = (hidden, hidden.stride(0), weight, weight.stride(0), bias if bias is not None else hidden, b.tokens,
                b.lse, b.entropy, b.topk_set, b.c, b.g_logp, b.g_entropy)
        meta = {"HAS_BIAS": bias is not None, "K": b.k, "TOPK_ENTROPY": bool(opts.entropy_topk),
                "DOT_F32": dot_f32, "BLOCK_N": bn, "BLOCK_V": bv, "BLOCK_H": bh, "num_warps": 4 if dot_f32 else 8}
        scal = (n, v, h, int(opts.ignore_index), 1.0 / float(opts.temperature))
        _bwd_hidden_kernel[(triton.cdiv(n, bn),)](*args, g_hidden, *scal, **meta)
        _bwd_weight_kernel[(triton.cdiv(v, bv),)](*args, g_weight, g_bias if g_bias is not None else g_weight,
                                                  *scal, **meta)
    for dst, src in zip(out, (g_hidden, g_weight, g_bias)):
        if dst is not None:
            dst.copy_(src)
