"""Token statistics straight from hidden states and the output projection, never materialising [N, V]."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._validation import require_float, require_int, require_ndim, require_same_device, require_shape
from .token_stats import TokenStats, check_token_ids, check_token_options, shaped_stats


class _LinearTokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, topk, ignore_index, entropy_topk, chunk, impl):
        st = impl.linear_token_stats_forward(hidden, weight, bias, tokens, temperature, topk, ignore_index,
                                             entropy_topk, chunk)
        ctx.save_for_backward(hidden, weight, bias, tokens, st.lse, st.entropy, st.topk_set, st.c)
        ctx.args = (temperature, ignore_index, entropy_topk, chunk, impl)
        ctx.mark_non_differentiable(st.lse, st.topk_ids, st.topk_logp)
        return st.logp, st.entropy, st.lse, st.topk_ids, st.topk_logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, *_):
        hidden, weight, bias, tokens, lse, entropy, topk_set, c = ctx.saved_tensors
        temperature, ignore_index, entropy_topk, chunk, impl = ctx.args
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        g_entropy = torch.zeros_like(lse) if g_entropy is None else g_entropy
        g_hidden, g_weight, g_bias = impl.linear_token_stats_backward(
            hidden, weight, bias, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature,
            ignore_index, entropy_topk, chunk)
        return g_hidden, g_weight, g_bias, None, None, None, None, None, None, None


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
    temperature, topk, ignore_index = check_token_options(vocab, temperature, topk, ignore_index, entropy)
    check_token_ids(tokens, vocab, ignore_index)
    impl = backends.resolve(backend, hidden.device, "linear_token_stats", hidden.dtype)
    lead = tokens.shape
    out = _LinearTokenStatsFn.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, tokens.reshape(-1),
                                    temperature, topk, ignore_index, entropy == "topk", chunk_size, impl)
    return shaped_stats(out, lead, topk)
