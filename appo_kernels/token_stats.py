"""Per-token statistics over the vocabulary in one pass (method §1): log-prob, entropy, lse, top-k."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import backends
from .backends._interface import RowStats, SavedStats, TokenOptions, empty_row_stats
from ._validation import (as_bool_mask, require_choice, require_float, require_int, require_int64_arg, require_int_arg,
                          require_ndim, require_positive_float, require_same_device, require_shape,
                          value_checks_enabled)

ENTROPY_KINDS = ("exact", "topk")
STATS_FIELDS = RowStats._fields   # the outputs an `_out` op writes
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


def check_token_options(vocab: int, temperature, topk, ignore_index, entropy: str) -> TokenOptions:
    """Validate the options shared by token_stats and linear_token_stats."""
    if vocab == 0:
        raise ValueError("logits: expected a non-empty vocabulary dimension (V >= 1), got V = 0")
    temperature = require_positive_float("temperature", temperature, lower=MIN_TEMPERATURE)
    topk = require_int_arg("topk", topk, minimum=0, maximum=vocab)
    ignore_index = require_int64_arg("ignore_index", ignore_index)
    require_choice("entropy", entropy, ENTROPY_KINDS)
    if entropy == "topk" and topk == 0:
        raise ValueError("entropy: 'topk' entropy sums over the top-k ids, so it needs topk >= 1, got topk = 0")
    return TokenOptions(temperature, topk, ignore_index, entropy == "topk")


def ignore_masked(tokens: Tensor, mask: Optional[Tensor], ignore_index: int) -> Tensor:
    """int64 `tokens` with `ignore_index` where `mask` (0/1, tokens' shape) is 0; `tokens` when mask is None."""
    if mask is None:
        return tokens
    m = as_bool_mask("mask", mask, tokens.shape, tokens.device)
    return torch.where(m, tokens, torch.full((), ignore_index, dtype=torch.int64, device=tokens.device))


def check_token_ids(tokens: Tensor, vocab: int, ignore_index: int, name: str = "tokens") -> None:
    """Token ids must lie in [0, V) or equal ignore_index (a value check)."""
    if not value_checks_enabled() or tokens.numel() == 0:
        return
    bad = (tokens != ignore_index) & ((tokens < 0) | (tokens >= vocab))
    if bool(bad.any()):
        where = torch.nonzero(bad)[0].tolist()
        raise ValueError(f"{name}: expected ids in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {int(tokens[tuple(where)])} at index {where}")


# ---- the custom ops: every kernel call goes through them, so torch.compile sees opaque ops with fake
# implementations whatever the backend (an argument: its name). `_out` ops write into outputs the caller
# allocated (backends/_interface.empty_row_stats); the plain functions below allocate and call them.

@torch.library.custom_op("appo_kernels::token_stats_fwd_out", mutates_args=STATS_FIELDS)
def token_stats_fwd_out(logits: Tensor, tokens: Tensor, temperature: float, topk: int, ignore_index: int,
                        entropy_topk: bool, backend: str, logp: Tensor, entropy: Tensor, lse: Tensor,
                        topk_ids: Tensor, topk_logp: Tensor, topk_set: Tensor, c: Tensor) -> None:
    backends.get(backend).token_stats_forward(logits, tokens, TokenOptions(temperature, topk, ignore_index,
                                                                           entropy_topk),
                                              RowStats(logp, entropy, lse, topk_ids, topk_logp, topk_set, c))


@token_stats_fwd_out.register_fake
def _(logits, tokens, temperature, topk, ignore_index, entropy_topk, backend, *out):
    return None


def token_stats_fwd(logits: Tensor, tokens: Tensor, opts: TokenOptions, backend: str) -> RowStats:
    """logits [N, V], tokens [N] -> RowStats (newly allocated) by backend `backend`."""
    out = empty_row_stats(logits.shape[0], opts.topk, opts.entropy_topk, logits)
    token_stats_fwd_out(logits, tokens, *opts, backend, *out)
    return out


@torch.library.custom_op("appo_kernels::token_stats_bwd_out", mutates_args=("grad",))
def token_stats_bwd_out(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor,
                        g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                        entropy_topk: bool, backend: str, grad: Tensor) -> None:
    """The gradient w.r.t. logits [N, V] into `grad` (contiguous, logits' dtype)."""
    _backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index,
              entropy_topk, backend, grad)


@torch.library.custom_op("appo_kernels::token_stats_bwd_inplace", mutates_args=("logits",))
def token_stats_bwd_inplace(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor,
                            c: Tensor, g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                            entropy_topk: bool, backend: str) -> None:
    """token_stats_bwd_out writing the gradient over the (contiguous) logits."""
    _backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index,
              entropy_topk, backend, logits)


def _backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index,
              entropy_topk, backend, out):
    topk = topk_set.shape[1] - 1 if entropy_topk else 0
    backends.get(backend).token_stats_backward(logits, tokens, SavedStats(lse, entropy, topk_set, c), g_logp,
                                               g_entropy, TokenOptions(temperature, topk, ignore_index, entropy_topk),
                                               out)


@token_stats_bwd_out.register_fake
def _(*args):
    return None


@token_stats_bwd_inplace.register_fake
def _(*args):
    return None


def forward_outputs(ctx, st: RowStats, needs_grad: bool, *inputs: Tensor) -> tuple:
    """The autograd outputs (logp, entropy, lse, topk_ids, topk_logp) of a token-statistics forward; saves the
    inputs and what the backward reads only when a gradient will flow (flash-attention's rule)."""
    if needs_grad:
        ctx.save_for_backward(*inputs, *st.saved())
    ctx.mark_non_differentiable(st.lse, st.topk_ids, st.topk_logp)
    return st.logp, st.entropy, st.lse, st.topk_ids, st.topk_logp


def upstream_grads(g_logp, g_entropy, like: Tensor):
    """The gradients reaching logp and entropy (None, when an output was not used, reads as zeros)."""
    return (torch.zeros_like(like) if g_logp is None else g_logp,
            torch.zeros_like(like) if g_entropy is None else g_entropy)


class _TokenStatsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, opts: TokenOptions, backend: str, inplace: bool):
        ctx.args = (opts, backend, inplace)
        return forward_outputs(ctx, token_stats_fwd(logits, tokens, opts, backend), ctx.needs_input_grad[0],
                               logits, tokens)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_logp, g_entropy, *_):
        logits, tokens, lse, entropy, topk_set, c = ctx.saved_tensors
        opts, backend, inplace = ctx.args
        g_logp, g_entropy = upstream_grads(g_logp, g_entropy, lse)
        args = (logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, opts.temperature, opts.ignore_index,
                opts.entropy_topk, backend)
        if inplace:
            # The gradient overwrites the logits (a declared mutation, so their version counter moves and any
            # other saved use of them fails loudly in its backward instead of reading the gradient).
            token_stats_bwd_inplace(*args)
            return logits, None, None, None, None
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        token_stats_bwd_out(*args, grad)
        return grad, None, None, None, None


def _check_inplace(logits: Tensor) -> None:
    if not logits.is_contiguous():
        raise ValueError(f"inplace_backward: the gradient is written over the logits, which must be contiguous; "
                         f"got strides {logits.stride()} for shape {list(logits.shape)} (call .contiguous())")
    if logits.is_leaf:
        raise ValueError("inplace_backward: logits is a leaf tensor, whose .grad would then alias its own "
                         "values; use it on logits computed by the model (e.g. the LM head's output)")


def token_stats(logits: Tensor, tokens: Tensor, *, mask: Optional[Tensor] = None, temperature: float = 1.0,
                topk: int = 0, ignore_index: int = -100, entropy: str = "exact", inplace_backward: bool = False,
                backend: str = "auto") -> TokenStats:
    """Log-prob of the sampled token, entropy, logsumexp and top-k, in one pass over the vocabulary.

    Args:
        logits: float16/bfloat16/float32/float64 `[N, V]` or `[B, T, V]`, any strides.
        tokens: integer `logits.shape[:-1]`, ids in `[0, V)` or `ignore_index`.
        mask: 0/1 (bool, int or float) `logits.shape[:-1]`, or None: rows at `mask == 0` are ignored whatever
            their token holds (as if it were `ignore_index`), e.g. prompt, tool output and padding.
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
    opts = check_token_options(vocab, temperature, topk, ignore_index, entropy)
    tokens = ignore_masked(tokens, mask, opts.ignore_index)
    check_token_ids(tokens, vocab, opts.ignore_index)
    if inplace_backward and logits.requires_grad:
        _check_inplace(logits)
    name = backends.resolve(backend, logits.device, "token_stats", logits.dtype, topk=opts.topk).NAME
    out = _TokenStatsFn.apply(logits.reshape(-1, vocab), tokens.reshape(-1), opts, name, bool(inplace_backward))
    return shaped_stats(out, tokens.shape, opts.topk)


def shaped_stats(flat_outputs, lead: torch.Size, topk: int) -> TokenStats:
    """TokenStats with the caller's leading shape from the flat (logp, entropy, lse, ids, topk_logp)."""
    logp, ent, lse, ids, top_lp = flat_outputs
    return TokenStats(logp.reshape(lead), ent.reshape(lead), lse.reshape(lead), ids.reshape(*lead, topk),
                      top_lp.reshape(*lead, topk))
