"""Per-token statistics over the vocabulary in one pass (method §1): log-prob, entropy, lse, top-k."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import backends
from ._validation import (require_choice, require_float, require_int, require_int64_arg, require_int_arg,
                          require_ndim, require_positive_float, require_same_device, require_shape,
                          value_checks_enabled)

ENTROPY_KINDS = ("exact", "topk")
# Below this, logits / temperature leaves float32's range for ordinary logits (1 / 1e-39 is already inf).
MIN_TEMPERATURE = 1e-6


class TokenStats(NamedTuple):
    """Outputs of `token_stats` / `linear_token_stats`; `*` is the leading shape of `tokens`.

    logp       float [*]     log p(token) at the given temperature (differentiable)
    entropy    float [*]     exact entropy of the full softmax, or the top-k truncated one (differentiable)
    lse        float [*]     logsumexp(logits / temperature) (no gradient)
    topk_ids   int64 [*, k]  the k most likely token ids, descending, ties to the smaller id
    topk_logp  float [*, k]  their log-probs (no gradient)

    float is fp32 for fp16/bf16/fp32 inputs and fp64 for fp64 inputs. Ignored rows hold 0 everywhere.
    """
    logp: Tensor
    entropy: Tensor
    lse: Tensor
    topk_ids: Tensor
    topk_logp: Tensor


def check_token_options(vocab: int, temperature, topk, ignore_index, entropy: str) -> tuple:
    """Validate the options shared by token_stats and linear_token_stats."""
    if vocab == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension (V >= 1), got V = 0")
    temperature = require_positive_float("temperature", temperature, lower=MIN_TEMPERATURE)
    topk = require_int_arg("topk", topk, minimum=0, maximum=vocab)
    ignore_index = require_int64_arg("ignore_index", ignore_index)
    require_choice("entropy", entropy, ENTROPY_KINDS)
    if entropy == "topk" and topk == 0:
        raise ValueError("entropy: 'topk' entropy sums over the top-k ids, so it needs topk >= 1, got topk = 0")
    return temperature, topk, ignore_index


def check_token_ids(tokens: Tensor, vocab: int, ignore_index: int, name: str = "tokens") -> None:
    """Token ids must lie in [0, V) or equal ignore_index (a value check)."""
    if not value_checks_enabled() or tokens.numel() == 0:
        return
    bad = (tokens != ignore_index) & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        where = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"{name}: expected ids in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {int(tokens[tuple(where)])} at index {where}")


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature, topk, ignore_index, entropy_topk, impl, inplace):
        st = impl.token_stats_forward(logits, tokens, temperature, topk, ignore_index, entropy_topk)
        ctx.save_for_backward(logits, tokens, st.lse, st.entropy, st.topk_set, st.c)
        ctx.args = (temperature, ignore_index, entropy_topk, impl, inplace)
        ctx.mark_non_differentiable(st.lse, st.topk_ids, st.topk_logp)
        return st.logp, st.entropy, st.lse, st.topk_ids, st.topk_logp

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, *_):
        logits, tokens, lse, entropy, topk_set, c = ctx.saved_tensors
        temperature, ignore_index, entropy_topk, impl, inplace = ctx.args
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        g_entropy = torch.zeros_like(lse) if g_entropy is None else g_entropy
        # In place: the gradient overwrites the logits (a mutating op, so their version counter moves and any
        # other saved use of them fails loudly in its backward instead of reading the gradient).
        backward = impl.token_stats_backward_inplace if inplace else impl.token_stats_backward
        grad = backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index,
                        entropy_topk)
        return grad, None, None, None, None, None, None, None


def _check_inplace(logits: Tensor) -> None:
    if not logits.is_contiguous():
        raise ValueError(f"inplace_backward: the gradient is written over the logits, which must be contiguous; "
                         f"got strides {logits.stride()} for shape {list(logits.shape)} (call .contiguous())")
    if logits.is_leaf:
        raise ValueError("inplace_backward: logits is a leaf tensor, whose .grad would then alias its own "
                         "values; use it on logits computed by the model (e.g. the LM head's output)")


def token_stats(logits: Tensor, tokens: Tensor, *, temperature: float = 1.0, topk: int = 0,
                ignore_index: int = -100, entropy: str = "exact", inplace_backward: bool = False,
                backend: str = "auto") -> TokenStats:
    """Log-prob of the sampled token, entropy, logsumexp and top-k, in one pass over the vocabulary.

    Args:
        logits: float16/bfloat16/float32/float64 `[N, V]` or `[B, T, V]`, any strides.
        tokens: integer `logits.shape[:-1]`, ids in `[0, V)` or `ignore_index`.
        temperature: `>= 1e-6`; statistics are those of `softmax(logits / temperature)`.
        topk: number of most likely ids to return (`0 <= topk <= V`).
        ignore_index: rows with this token give 0 in every output and 0 gradient.
        entropy: `"exact"` (full vocabulary, `lse - sum p*s`) or `"topk"` (`-sum p log p` over
            `topk_ids ∪ {token}`, the authors' truncated estimate; needs `topk >= 1`).
        inplace_backward: write the gradient over `logits` in the backward instead of a new `[N, V]` buffer
            (as Liger-Kernel does; saves one logits-sized allocation on the Triton and torch backends, the
            native CPU kernel copies). `logits` must be contiguous and computed by autograd (not a leaf), and
            must not be read after the backward: it then holds the gradient.
        backend: `"auto"` or a name from `available_backends()`.

    Returns:
        TokenStats(logp, entropy, lse, topk_ids, topk_logp), leading shape of `tokens`; `logp` and
        `entropy` are differentiable w.r.t. `logits` (the backward recomputes p from the saved lse and holds
        no [N, V] temporary beyond the gradient itself).

    A row with every logit `-inf` gets lse = -inf and NaN logp/entropy/topk_logp; a row holding a NaN gets
    NaN in those four. Other rows are unaffected. With value checks off, a token outside `[0, V)` (and not
    `ignore_index`) is never read: its row's logp is NaN (docs/api.md, "Out-of-range inputs").
    """
    require_float("logits", logits)
    tokens = require_int("tokens", tokens)
    require_ndim("logits", logits, (2, 3), "a [N, V] or [B, T, V] tensor")
    require_shape("tokens", tokens, logits.shape[:-1], "logits.shape[:-1]")
    require_same_device(logits=logits, tokens=tokens)
    vocab = logits.shape[-1]
    temperature, topk, ignore_index = check_token_options(vocab, temperature, topk, ignore_index, entropy)
    check_token_ids(tokens, vocab, ignore_index)
    if inplace_backward and logits.requires_grad:
        _check_inplace(logits)
    impl = backends.resolve(backend, logits.device, "token_stats", logits.dtype, topk=topk)
    lead = tokens.shape
    flat_logits = logits.reshape(-1, vocab)
    out = _TokenStatsFn.apply(flat_logits, tokens.reshape(-1), temperature, topk, ignore_index,
                              entropy == "topk", impl, bool(inplace_backward))
    return shaped_stats(out, lead, topk)


def shaped_stats(flat_outputs, lead: torch.Size, topk: int) -> TokenStats:
    """TokenStats with the caller's leading shape from the flat (logp, entropy, lse, ids, topk_logp)."""
    logp, ent, lse, ids, top_lp = flat_outputs
    return TokenStats(logp.reshape(lead), ent.reshape(lead), lse.reshape(lead), ids.reshape(*lead, topk),
                      top_lp.reshape(*lead, topk))
