"""Padded `[B, T]` and packed `[N]` + `cu_seqlens` layouts, normalised to one flat form.

Every sequence op works on flat per-token vectors `[N]` with, for each position, its rollout (`seg`) and
its index inside the rollout (`pos`). A padded batch is the packed batch whose rollouts all have length T,
so the two layouts share one implementation and agree exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ._validation import (require_float, require_int, require_ndim, require_same_device, require_shape,
                          require_tensor, value_checks_enabled)


@dataclass(frozen=True)
class SeqLayout:
    shape: torch.Size          # per-token shape of the caller: (B, T) padded or (N,) packed
    cu_seqlens: torch.Tensor   # int64 [B + 1]
    seg: torch.Tensor          # int64 [N], rollout of each flat position
    pos: torch.Tensor          # int64 [N], position t inside its rollout
    num_rollouts: int          # B

    @property
    def numel(self) -> int:
        return self.seg.numel()

    @property
    def padded(self) -> bool:
        return len(self.shape) == 2

    def flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1)

    def unflat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape + x.shape[1:])


def seq_layout(name: str, ref: torch.Tensor, cu_seqlens: Optional[torch.Tensor]) -> SeqLayout:
    """The layout of per-token tensor `ref` (named `name` in errors), validating `cu_seqlens`."""
    require_tensor(name, ref)
    device = ref.device
    if cu_seqlens is None:
        if ref.dim() == 1:
            raise ValueError(
                f"{name}: a 1-D per-token tensor (shape {list(ref.shape)}) is the packed layout and needs "
                "cu_seqlens; pass shape [1, T] for a single padded rollout")
        require_ndim(name, ref, (2,), "a padded [B, T] tensor, or a packed [N] tensor with cu_seqlens")
        b, t = ref.shape
        n = b * t
        idx = torch.arange(n, device=device)
        cu = torch.arange(b + 1, device=device) * t
        seg = idx // t if t else idx
        pos = idx - seg * t
        return SeqLayout(ref.shape, cu, seg, pos, b)

    require_int("cu_seqlens", cu_seqlens)
    require_same_device(**{name: ref, "cu_seqlens": cu_seqlens})
    require_ndim("cu_seqlens", cu_seqlens, (1,), "a 1-D [B + 1] tensor")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape [B + 1] with B >= 1, got {list(cu_seqlens.shape)}")
    require_ndim(name, ref, (1,), "a packed [N] tensor (cu_seqlens was given)")
    n = ref.shape[0]
    cu = cu_seqlens.to(torch.int64)
    if value_checks_enabled():
        first, last = int(cu[0]), int(cu[-1])
        if first != 0:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[0] == 0, got {first}")
        if last != n:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[-1] == {n} (the length of {name}), got {last}")
        steps = cu[1:] - cu[:-1]
        if bool((steps < 0).any()):
            i = int(torch.nonzero(steps < 0)[0])
            raise ValueError(f"cu_seqlens: expected non-decreasing values, got {int(cu[i])} then {int(cu[i + 1])} "
                             f"at index {i}")
    flat = layout_from_cu_seqlens(cu, n)
    return SeqLayout(ref.shape, cu, flat.seg, flat.pos, flat.num_rollouts)


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> SeqLayout:
    """The packed layout of `n` flat positions split by (already validated) int64 `cu_seqlens`."""
    idx = torch.arange(n, device=cu_seqlens.device)
    seg = torch.searchsorted(cu_seqlens[1:], idx, right=True)
    return SeqLayout(torch.Size([n]), cu_seqlens, seg, idx - cu_seqlens[seg], cu_seqlens.numel() - 1)


def per_token(name: str, t: Optional[torch.Tensor], layout: SeqLayout, *, kind: str = "float"):
    """Check that per-token input `t` matches `layout`; return it flat ([N]). None passes through."""
    if t is None:
        return None
    if kind == "float":
        require_float(name, t)
    require_shape(name, t, layout.shape, "the shape of the per-token inputs")
    require_same_device(**{"cu_seqlens/first input": layout.seg, name: t})
    return t.reshape(-1)
