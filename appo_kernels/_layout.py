"""Padded `[B, T]` and packed `[N]` + `cu_seqlens` layouts, normalised to one flat form.

Every sequence op works on flat per-token vectors `[N]` with, for each position, its rollout (`seg`) and
its index inside the rollout (`pos`). A padded batch is the packed batch whose rollouts all have length T,
so the two layouts share one implementation and agree exactly.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._validation import (require_float, require_int, require_ndim, require_same_device, require_shape,
                          require_tensor, value_checks_enabled)


class SeqLayout:
    """A batch of rollouts over `numel` flat positions: rollout b is [cu_seqlens[b], cu_seqlens[b + 1]).

    `seg` (the rollout of each position) and `pos` (its index t inside the rollout) are int64 [N] tensors
    computed on first use: the native and Triton kernels need only `cu_seqlens`.
    """

    def __init__(self, shape: torch.Size, cu_seqlens: torch.Tensor, numel: int):
        self.shape = shape                  # per-token shape of the caller: (B, T) padded or (N,) packed
        self.cu_seqlens = cu_seqlens        # int64 [B + 1]
        self.numel = numel                  # N
        self.num_rollouts = cu_seqlens.numel() - 1
        self._seg = self._pos = None  # cached by hand: functools.cached_property takes a lock dynamo cannot trace

    @property
    def seg(self) -> torch.Tensor:
        if self._seg is None:
            idx = torch.arange(self.numel, device=self.cu_seqlens.device)
            self._seg = torch.searchsorted(self.cu_seqlens[1:], idx, right=True)
        return self._seg

    @property
    def pos(self) -> torch.Tensor:
        if self._pos is None:
            self._pos = torch.arange(self.numel, device=self.cu_seqlens.device) - self.cu_seqlens[self.seg]
        return self._pos

    @property
    def padded(self) -> bool:
        return len(self.shape) == 2

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
        return SeqLayout(ref.shape, torch.arange(b + 1, device=device) * t, b * t)

    require_same_device(**{name: ref, "cu_seqlens": cu_seqlens})
    require_ndim("cu_seqlens", cu_seqlens, (1,), "a 1-D [B + 1] tensor")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected shape [B + 1] with B >= 1, got {list(cu_seqlens.shape)}")
    require_ndim(name, ref, (1,), "a packed [N] tensor (cu_seqlens was given)")
    n = ref.shape[0]
    cu = require_int("cu_seqlens", cu_seqlens)
    if not value_checks_enabled():
        return SeqLayout(ref.shape, nearest_partition(cu, n), n)
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
    return SeqLayout(ref.shape, cu, n)


def nearest_partition(cu: torch.Tensor, n: int) -> torch.Tensor:
    """The valid cu_seqlens nearest to int64 `cu` over n positions: entries clamped into [0, n], made
    non-decreasing (a running maximum), the first set to 0 and the last to n. The identity on a valid one.

    With value checks off (or while compiling) an invalid cu_seqlens is read this way, on the device and without
    a sync, so that no kernel is ever handed segments outside its buffers (docs/api.md, "Out-of-range inputs").
    """
    inner = torch.cummax(cu[1:-1].clamp(0, n), dim=0).values
    return torch.cat([cu.new_zeros(1), inner, cu.new_full((1,), n)])


def layout_from_cu_seqlens(cu_seqlens: torch.Tensor, n: int) -> SeqLayout:
    """The packed layout of `n` flat positions split by int64 `cu_seqlens`, as the custom ops see it. The public
    ops pass a valid partition; a direct call of a custom op may not, so it is read as the nearest one here
    (the identity on a valid one: a few [B]-sized ops)."""
    return SeqLayout(torch.Size([n]), nearest_partition(cu_seqlens.to(torch.int64), n), n)


def per_token(name: str, t: Optional[torch.Tensor], layout: SeqLayout, *, kind: str = "float"):
    """Check that per-token input `t` matches `layout`; return it flat ([N]). None passes through."""
    if t is None:
        return None
    if kind == "float":
        require_float(name, t)
    require_shape(name, t, layout.shape, "the shape of the per-token inputs")
    require_same_device(**{"cu_seqlens/first input": layout.cu_seqlens, name: t})
    return t.reshape(-1)
