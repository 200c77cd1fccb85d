"""The backend interface, written once: what every backend module implements, the types its ops exchange,
and the one allocator of their outputs.

A backend is a module (`native`, `triton_backend`, `torch_ref`) that satisfies `Backend`. Its ops take flat
inputs and write into outputs allocated by the caller (the custom ops in appo_kernels/token_stats.py,
linear_token_stats.py and _sequence_ops.py), so allocation lives here and nowhere else:

    token_stats_forward(logits [N, V], tokens [N], opts, out: RowStats)
    token_stats_backward(logits, tokens, saved: SavedStats, g_logp [N], g_entropy [N], opts, out [N, V])
        (out may be logits itself: the in-place backward)
    linear_token_stats_forward(hidden [N, H], weight [V, H], bias [V] | None, tokens, opts, chunk, out: RowStats)
    linear_token_stats_backward(hidden, weight, bias, tokens, saved, g_logp, g_entropy, opts, chunk,
                                out: (g_hidden, g_weight, g_bias | None))
    reverse_discounted_scan(x [N], layout, gamma, out [N])
    branching_score(entropy [N], omega [N] | None, eligible [N] bool, layout, out: (score [N], candidate [N]))

`layout` is an appo_kernels._layout.SeqLayout whose cu_seqlens is a valid partition of [0, N).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .._numerics import compute_dtype

OPS = ("token_stats", "linear_token_stats", "reverse_discounted_scan", "branching_score")


class TokenOptions(NamedTuple):
    """The options of a token-statistics op, validated (appo_kernels.token_stats.check_token_options)."""
    temperature: float
    topk: int
    ignore_index: int
    entropy_topk: bool   # the top-k truncated entropy (entropy="topk") rather than the exact one


class RowStats(NamedTuple):
    """Per-row results of a token-statistics forward, flat over rows ([n]); float32 (float64 for float64 inputs).

    The backward needs only lse, entropy and, for the top-k entropy, topk_set and c (`SavedStats`).
    """
    logp: Tensor
    entropy: Tensor      # exact, or top-k truncated when asked
    lse: Tensor
    topk_ids: Tensor     # int64 [n, k]
    topk_logp: Tensor    # [n, k]
    topk_set: Tensor     # int64 [n, k+1]: topk ∪ {token} (-1 for a duplicate); empty unless entropy="topk"
    c: Tensor            # [n] sum_{v in set} (1 + log p_v) p_v; empty unless entropy="topk"

    def saved(self) -> "SavedStats":
        return SavedStats(self.lse, self.entropy, self.topk_set, self.c)


class SavedStats(NamedTuple):
    """What a token-statistics backward reads of its forward."""
    lse: Tensor
    entropy: Tensor
    topk_set: Tensor
    c: Tensor


class Backend(Protocol):
    """A backend module. `unsupported` says why it cannot run an op for these inputs (None when it can);
    features are keyword options that some backends limit (today `topk`)."""
    NAME: str

    def available(self) -> bool: ...

    def unavailable_reason(self) -> str: ...

    def unsupported(self, op: str, device: torch.device, dtype: Optional[torch.dtype] = None,
                    **features) -> Optional[str]: ...

    def token_stats_forward(self, logits: Tensor, tokens: Tensor, opts: TokenOptions, out: RowStats) -> None: ...

    def token_stats_backward(self, logits: Tensor, tokens: Tensor, saved: SavedStats, g_logp: Tensor,
                             g_entropy: Tensor, opts: TokenOptions, out: Tensor) -> None: ...

    def linear_token_stats_forward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                   opts: TokenOptions, chunk: Optional[Tuple[int, int]], out: RowStats) -> None: ...

    def linear_token_stats_backward(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor,
                                    saved: SavedStats, g_logp: Tensor, g_entropy: Tensor, opts: TokenOptions,
                                    chunk: Optional[Tuple[int, int]],
                                    out: Tuple[Tensor, Tensor, Optional[Tensor]]) -> None: ...

    def reverse_discounted_scan(self, x: Tensor, layout, gamma: float, out: Tensor) -> None: ...

    def branching_score(self, entropy: Tensor, omega: Optional[Tensor], eligible: Tensor, layout,
                        out: Tuple[Tensor, Tensor]) -> None: ...


def empty_row_stats(n: int, topk: int, entropy_topk: bool, like: Tensor) -> RowStats:
    """Uninitialised outputs of a token-statistics forward over n rows whose inputs look like `like` (device;
    float64 inputs get float64 statistics)."""
    dtype, device = compute_dtype(like.dtype), like.device
    vec = [torch.empty(n, dtype=dtype, device=device) for _ in range(3)]
    ids = torch.empty(n, topk, dtype=torch.int64, device=device)
    topk_set = torch.empty(n, topk + 1, dtype=torch.int64, device=device) if entropy_topk else \
        torch.empty(0, dtype=dtype, device=device)
    c = torch.empty(n if entropy_topk else 0, dtype=dtype, device=device)
    return RowStats(*vec, ids, torch.empty(n, topk, dtype=dtype, device=device), topk_set, c)


def copy_stats_(out: RowStats, stats: RowStats) -> None:
    """Write computed statistics into the caller's outputs (backends that compute out of place)."""
    for dst, src in zip(out, stats):
        if dst.numel():
            dst.copy_(src)


def rows_contiguous(logits: Tensor) -> Tensor:
    """Logits whose last dimension is contiguous, as the kernels read them (one copy otherwise)."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


class KernelBackwardInputs(NamedTuple):
    """The saved statistics and upstream gradients of a token-statistics backward as the compiled kernels take
    them: contiguous int64 tokens and float32 vectors; the entropy-mode inputs the kernel does not read are
    replaced by `lse` (a valid pointer); k is the top-k of the top-k entropy (0 for exact entropy)."""
    tokens: Tensor
    lse: Tensor
    entropy: Tensor
    topk_set: Tensor
    c: Tensor
    g_logp: Tensor
    g_entropy: Tensor
    k: int


def kernel_backward_inputs(tokens: Tensor, saved: SavedStats, g_logp: Tensor, g_entropy: Tensor,
                           entropy_topk: bool) -> KernelBackwardInputs:
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    tokens = tokens.to(torch.int64).contiguous()
    lse = f32(saved.lse)
    if entropy_topk:
        return KernelBackwardInputs(tokens, lse, lse, saved.topk_set.to(torch.int64).contiguous(), f32(saved.c),
                                    f32(g_logp), f32(g_entropy), saved.topk_set.shape[1] - 1)
    return KernelBackwardInputs(tokens, lse, f32(saved.entropy), lse, lse, f32(g_logp), f32(g_entropy), 0)
