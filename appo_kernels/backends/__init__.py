"""Backend registry.

A backend is a module exposing the primitives below for flat inputs; the public API validates, normalises
layouts and composes them:

    token_stats_forward / token_stats_backward                    [N, V] logits
    linear_token_stats_forward / linear_token_stats_backward       hidden [N, H], weight [V, H]
    reverse_discounted_scan(x, layout, gamma)                      flat [N], layout: _layout.SeqLayout
    branching_score(entropy, omega, eligible, layout)              flat [N]
    supports(device) -> bool

"auto" picks, for the input's device, the first available backend in PREFERENCE that supports it.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, List

import torch

from . import torch_ref

_REGISTRY: Dict[str, ModuleType] = {torch_ref.NAME: torch_ref}
# Fastest first; backends that are not built or not installed are simply absent from the registry.
PREFERENCE = ("torch",)


def available_backends() -> List[str]:
    """Names of the backends usable in this process (always includes "torch")."""
    return [name for name in PREFERENCE if name in _REGISTRY]


def resolve(backend: str, device: torch.device) -> ModuleType:
    """The backend module for `backend` ("auto" or a name) on `device`; raises if unusable."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend == "auto":
        for name in available_backends():
            if _REGISTRY[name].supports(device):
                return _REGISTRY[name]
        raise ValueError(f"backend: no available backend supports device {device}")
    if backend not in _REGISTRY:
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, got {backend!r}")
    impl = _REGISTRY[backend]
    if not impl.supports(device):
        raise ValueError(f"backend: {backend!r} does not support device {device}")
    return impl
