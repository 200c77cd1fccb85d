"""The two sequence primitives as custom ops: the segmented reverse discounted scan (method §2, 5, 6) and the
per-rollout Branching Score (method §3), over flat `[N]` vectors packed by a SeqLayout.

`_out` ops write into outputs the caller allocated; the plain functions allocate (here, the one place) and call
them with the chosen backend's name. A custom op called directly with an invalid cu_seqlens reads it as the
nearest valid partition (`_layout.layout_from_cu_seqlens`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import backends
from ._layout import SeqLayout, layout_from_cu_seqlens


@torch.library.custom_op("appo_kernels::reverse_scan_out", mutates_args=("out",))
def reverse_scan_out(x: Tensor, cu_seqlens: Tensor, gamma: float, backend: str, out: Tensor) -> None:
    backends.get(backend).reverse_discounted_scan(x, layout_from_cu_seqlens(cu_seqlens, x.numel()), gamma, out)


@reverse_scan_out.register_fake
def _(*args):
    return None


def reverse_discounted_scan(x: Tensor, layout: SeqLayout, gamma: float, backend: str) -> Tensor:
    """out[t] = sum_{k >= t in t's rollout} gamma^(k - t) * x[k] over flat float32/float64 [N] `x`."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    reverse_scan_out(x, layout.cu_seqlens, float(gamma), backend, out)
    return out


@torch.library.custom_op("appo_kernels::branching_score_out", mutates_args=("score", "candidate"))
def branching_score_out(entropy: Tensor, omega: Optional[Tensor], eligible: Tensor, cu_seqlens: Tensor,
                        backend: str, score: Tensor, candidate: Tensor) -> None:
    backends.get(backend).branching_score(entropy, omega, eligible,
                                          layout_from_cu_seqlens(cu_seqlens, entropy.numel()), (score, candidate))


@branching_score_out.register_fake
def _(*args):
    return None


def segment_branching_score(entropy: Tensor, omega: Optional[Tensor], eligible: Tensor, layout: SeqLayout,
                            backend: str) -> Tuple[Tensor, Tensor]:
    """(score [N] in entropy's dtype, -inf where not eligible; candidate bool [N]) per rollout (method §3)."""
    score = torch.empty(entropy.shape, dtype=entropy.dtype, device=entropy.device)
    candidate = torch.zeros(entropy.shape, dtype=torch.bool, device=entropy.device)
    branching_score_out(entropy, omega, eligible, layout.cu_seqlens, backend, score, candidate)
    return score, candidate
