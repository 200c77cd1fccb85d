"""The backend primitives as PyTorch custom ops (`torch.ops.appo_kernels.*`), each with a fake implementation.

Every kernel call of the public API goes through these ops, so torch.compile (fullgraph) and FakeTensor see
opaque ops with known output shapes instead of pointer-passing extension calls, whatever the backend. The
backend is an argument (its name), chosen before the op is called. `Dispatch(name)` offers the same methods as
a backend module and routes them through the ops.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._layout import layout_from_cu_seqlens
from .backends._types import RowStats, empty_row_stats


def _impl(backend: str):
    from . import backends
    return backends.backend_module(backend)


def _cdt(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _fake_row_stats(like: Tensor, n: int, topk: int, entropy_topk: bool):
    return tuple(empty_row_stats(n, topk, entropy_topk, like.device, _cdt(like)))


@torch.library.custom_op("appo_kernels::token_stats_fwd", mutates_args=())
def token_stats_fwd(logits: Tensor, tokens: Tensor, temperature: float, topk: int, ignore_index: int,
                    entropy_topk: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    st = _impl(backend).token_stats_forward(logits, tokens, temperature, topk, ignore_index, entropy_topk)
    return tuple(st)


@token_stats_fwd.register_fake
def _(logits, tokens, temperature, topk, ignore_index, entropy_topk, backend):
    return _fake_row_stats(logits, logits.shape[0], topk, entropy_topk)


@torch.library.custom_op("appo_kernels::token_stats_bwd", mutates_args=())
def token_stats_bwd(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor,
                    g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int, entropy_topk: bool,
                    backend: str) -> Tensor:
    return _impl(backend).token_stats_backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy,
                                               temperature, ignore_index, entropy_topk)


@token_stats_bwd.register_fake
def _(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index, entropy_topk,
      backend):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("appo_kernels::token_stats_bwd_inplace", mutates_args=("logits",))
def token_stats_bwd_inplace(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor,
                            c: Tensor, g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                            entropy_topk: bool, backend: str) -> None:
    """token_stats_bwd writing the gradient over the (contiguous) logits."""
    _impl(backend).token_stats_backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature,
                                        ignore_index, entropy_topk, out=logits)


@token_stats_bwd_inplace.register_fake
def _(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index, entropy_topk,
      backend):
    return None


@torch.library.custom_op("appo_kernels::linear_token_stats_fwd", mutates_args=())
def linear_token_stats_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                           temperature: float, topk: int, ignore_index: int, entropy_topk: bool, chunk: List[int],
                           backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    st = _impl(backend).linear_token_stats_forward(hidden, weight, bias, tokens, temperature, topk, ignore_index,
                                                   entropy_topk, tuple(chunk) if chunk else None)
    return tuple(st)


@linear_token_stats_fwd.register_fake
def _(hidden, weight, bias, tokens, temperature, topk, ignore_index, entropy_topk, chunk, backend):
    return _fake_row_stats(hidden, hidden.shape[0], topk, entropy_topk)


@torch.library.custom_op("appo_kernels::linear_token_stats_bwd", mutates_args=())
def linear_token_stats_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, lse: Tensor,
                           entropy: Tensor, topk_set: Tensor, c: Tensor, g_logp: Tensor, g_entropy: Tensor,
                           temperature: float, ignore_index: int, entropy_topk: bool, chunk: List[int],
                           backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    g_h, g_w, g_b = _impl(backend).linear_token_stats_backward(
        hidden, weight, bias, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index,
        entropy_topk, tuple(chunk) if chunk else None)
    return g_h, g_w, g_b if g_b is not None else weight.new_empty(0)  # no bias: an empty placeholder


@linear_token_stats_bwd.register_fake
def _(hidden, weight, bias, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature, ignore_index,
      entropy_topk, chunk, backend):
    return (hidden.new_empty(hidden.shape), weight.new_empty(weight.shape),
            weight.new_empty(bias.shape) if bias is not None else weight.new_empty(0))


@torch.library.custom_op("appo_kernels::reverse_scan", mutates_args=())
def reverse_scan(x: Tensor, cu_seqlens: Tensor, gamma: float, backend: str) -> Tensor:
    return _impl(backend).reverse_discounted_scan(x, layout_from_cu_seqlens(cu_seqlens, x.numel()), gamma)


@reverse_scan.register_fake
def _(x, cu_seqlens, gamma, backend):
    return torch.empty_like(x)


@torch.library.custom_op("appo_kernels::branching_score", mutates_args=())
def branching_score(entropy: Tensor, omega: Optional[Tensor], eligible: Tensor, cu_seqlens: Tensor,
                    backend: str) -> Tuple[Tensor, Tensor]:
    return _impl(backend).branching_score(entropy, omega, eligible,
                                          layout_from_cu_seqlens(cu_seqlens, entropy.numel()))


@branching_score.register_fake
def _(entropy, omega, eligible, cu_seqlens, backend):
    return torch.empty_like(entropy), torch.empty_like(eligible)


class Dispatch:
    """A chosen backend, called through the custom ops (same methods as a backend module)."""

    def __init__(self, name: str):
        self.NAME = name

    def token_stats_forward(self, logits, tokens, temperature, topk, ignore_index, entropy_topk) -> RowStats:
        return RowStats(*token_stats_fwd(logits, tokens, temperature, topk, ignore_index, entropy_topk, self.NAME))

    def token_stats_backward(self, logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature,
                             ignore_index, entropy_topk) -> Tensor:
        return token_stats_bwd(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature,
                               ignore_index, entropy_topk, self.NAME)

    def token_stats_backward_inplace(self, logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy,
                                     temperature, ignore_index, entropy_topk) -> Tensor:
        token_stats_bwd_inplace(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy, temperature,
                                ignore_index, entropy_topk, self.NAME)
        return logits

    def linear_token_stats_forward(self, hidden, weight, bias, tokens, temperature, topk, ignore_index,
                                   entropy_topk, chunk=None) -> RowStats:
        return RowStats(*linear_token_stats_fwd(hidden, weight, bias, tokens, temperature, topk, ignore_index,
                                                entropy_topk, list(chunk or ()), self.NAME))

    def linear_token_stats_backward(self, hidden, weight, bias, tokens, lse, entropy, topk_set, c, g_logp,
                                    g_entropy, temperature, ignore_index, entropy_topk, chunk=None):
        g_h, g_w, g_b = linear_token_stats_bwd(hidden, weight, bias, tokens, lse, entropy, topk_set, c, g_logp,
                                               g_entropy, temperature, ignore_index, entropy_topk,
                                               list(chunk or ()), self.NAME)
        return g_h, g_w, g_b if bias is not None else None

    def reverse_discounted_scan(self, x, layout, gamma) -> Tensor:
        return reverse_scan(x, layout.cu_seqlens, float(gamma), self.NAME)

    def branching_score(self, entropy, omega, eligible, layout):
        return branching_score(entropy, omega, eligible, layout.cu_seqlens, self.NAME)
