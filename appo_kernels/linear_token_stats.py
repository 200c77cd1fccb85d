"""Token statistics straight from hidden states and the output projection, never materialising [N, V]."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import backends
from .backends._interface import RowStats, SavedStats, TokenOptions, empty_row_stats
from ._validation import require_float, require_int, require_ndim, require_same_device, require_shape
from .token_stats import (STATS_FIELDS, TokenStats, check_token_ids, check_token_options, forward_outputs,
                          shaped_stats, upstream_grads)


@torch.library.custom_op("appo_kernels::linear_token_stats_fwd_out", mutates_args=STATS_FIELDS)
def linear_token_stats_fwd_out(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                               temperature: float, topk: int, ignore_index: int, entropy_topk: bool, chunk: List[int],
                               backend: str, logp: Tensor, entropy: Tensor, lse: Tensor, topk_ids: Tensor,
                               topk_logp: Tensor, topk_set: Tensor, c: Tensor) -> None:
    backends.get(backend).linear_token_stats_forward(
        hidden, weight, bias, tokens, TokenOptions(temperature, topk, ignore_index, entropy_topk),
        tuple(chunk) if chunk else None, RowStats(logp, entropy, lse, topk_ids, topk_logp, topk_set, c))


@linear_token_stats_fwd_out.register_fake
def _(*args):
    return None


@torch.library.custom_op("appo_kernels::linear_token_stats_bwd_out", mutates_args=("g_hidden", "g_weight", "g_bias"))
def linear_token_stats_bwd_out(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, lse: Tensor,
                               entropy: Tensor, topk_set: Tensor, c: Tensor, g_logp: Tensor, g_entropy: Tensor,
                               temperature: float, ignore_index: int, entropy_topk: bool, chunk: List[int],
                               backend: str, g_hidden: Tensor, g_weight: Tensor, g_bias: Optional[Tensor]) -> None:
    """Gradients w.r.t. hidden, weight and bias (None without a bias) into the given tensors."""
    topk = topk_set.shape[1] - 1 if entropy_topk else 0
    backends.get(backend).linear_token_stats_backward(
        hidden, weight, bias, tokens, SavedStats(lse, entropy, topk_set, c), g_logp, g_entropy,
        TokenOptions(temperature, topk, ignore_index, entropy_topk), tuple(chunk) if chunk else None,
        (g_hidden, g_weight, g_bias))


@linear_token_stats_bwd_out.register_fake
def _(*args):
    return None


class _LinearTokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, opts: TokenOptions, chunk, backend: str):
        st = empty_row_stats(hidden.shape[0], opts.topk, opts.entropy_topk, hidden)
        linear_token_stats_fwd_out(hidden, weight, bias, tokens, *opts, list(chunk or ()), backend, *st)
        ctx.args = (opts, chunk, backend)
        return forward_outputs(ctx, st, any(ctx.needs_input_grad[:3]), hidden, weight, bias, tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, *_):
        hidden, weight, bias, tokens, lse, entropy, topk_set, c = ctx.saved_tensors
        opts, chunk, backend = ctx.args
        g_logp, g_entropy = upstream_grads(g_logp, g_entropy, lse)
        grads = (torch.empty_like(hidden, memory_format=torch.contiguous_format),
                 torch.empty_like(weight, memory_format=torch.contiguous_format),
                 torch.empty_like(bias, memory_format=torch.contiguous_format) if bias is not None else None)
        linear_token_stats_bwd_out(hidden, weight, bias, tokens, lse, entropy, topk_set, c, g_logp, g_entropy,
                                   opts.temperature, opts.ignore_index, opts.entropy_topk, list(chunk or ()),
                                   backend, *grads)
        return (*grads, None, None, None, None)


def linear_token_stats(hidden: Tensor, weight: Tensor, tokens: Tensor, *, bias: Optional[Tensor] = None,
                       temperature: float = 1.0, topk: int = 0, ignore_index: int = -100, entropy: str = "exact",
                       backend: str = "auto", chunk_size: Optional[Tuple[int, int]] = None) -> TokenStats:
    """`token_stats` of the logits `hidden @ weight.T + bias`, computed tile by tile (the fused lm_head).

    Args:
        hidden: float `[N, H]` or `[B, T, H]`.
        weight: float `[V, H]`, same dtype as `hidden` (the output projection / lm_head weight).
        tokens: integer `hidden.shape[:-1]`.
        bias: float `[V]` or None.
        chunk_size: `(rows, vocabulary)` of one recomputed logits tile (torch backend; default (1024, 4096)).
        Other arguments as in `token_stats`.

    Returns:
        TokenStats as `token_stats` returns it. `logp` and `entropy` are differentiable w.r.t. `hidden`,
        `weight` and `bias`; the backward recomputes each logits tile instead of saving it. Matmuls run in
        fp32 (fp64 for fp64 inputs).
    """
    require_float("hidden", hidden)
    require_float("weight", weight)
    tokens = require_int("tokens", tokens)
    require_ndim("hidden", hidden, (2, 3), "a [N, H] or [B, T, H] tensor")
    require_ndim("weight", weight, (2,), "a [V, H] tensor")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden: expected a non-empty hidden dimension (H >= 1), got shape {list(hidden.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: expected shape [V, {hidden.shape[-1]}] (H from hidden), got {list(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight: expected dtype {hidden.dtype} (the dtype of hidden), got {weight.dtype}")
    require_shape("tokens", tokens, hidden.shape[:-1], "hidden.shape[:-1]")
    if bias is not None:
        require_float("bias", bias)
        require_shape("bias", bias, (weight.shape[0],), "[V]")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias: expected dtype {hidden.dtype} (the dtype of hidden), got {bias.dtype}")
    require_same_device(hidden=hidden, weight=weight, tokens=tokens, bias=bias)
    if chunk_size is not None:
        if (not isinstance(chunk_size, (tuple, list)) or len(chunk_size) != 2
                or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in chunk_size)):
            raise ValueError(f"chunk_size: expected a (rows, vocabulary) pair of positive ints, got {chunk_size!r}")
        chunk_size = tuple(chunk_size)
    vocab = weight.shape[0]
    opts = check_token_options(vocab, temperature, topk, ignore_index, entropy)
    check_token_ids(tokens, vocab, opts.ignore_index)
    name = backends.resolve(backend, hidden.device, "linear_token_stats", hidden.dtype).NAME
    out = _LinearTokenStatsFn.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1), opts,
                                    chunk_size, name)
    return shaped_stats(out, tokens.shape, opts.topk)
