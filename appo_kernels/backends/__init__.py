"""Backend registry.

A backend is a module exposing, for flat inputs, the primitives it implements (its `OPS`); the public API
validates, normalises layouts and composes them:

    token_stats_forward / token_stats_backward                    [N, V] logits
    linear_token_stats_forward / linear_token_stats_backward       hidden [N, H], weight [V, H]
    reverse_discounted_scan(x, layout, gamma)                      flat [N], layout: _layout.SeqLayout
    branching_score(entropy, omega, eligible, layout)              flat [N]

and `supports(op, device, dtype, **features) -> bool`, `available() -> bool`. "auto" picks, for the op and
the input's device and dtype, the first backend in PREFERENCE[device type] that supports it. An explicitly
named backend that cannot run the op raises: nothing falls back silently.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, List, Optional, Sequence, Union

import torch

from . import native, torch_ref, triton_backend
from .._ops import Dispatch

class BackendUnsupported(ValueError):
    """A named backend cannot run the requested op on this device/dtype (a ValueError naming `backend`)."""


_REGISTRY: Dict[str, ModuleType] = {m.NAME: m for m in (native, triton_backend, torch_ref) if m.available()}
# What "auto" tries, fastest first, per device type. The Triton interpreter on CPU is for tests only.
PREFERENCE = {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")}
ORDER = ("native", "triton", "torch")


def available_backends() -> List[str]:
    """Names of the backends usable in this process (always includes "torch")."""
    return [name for name in ORDER if name in _REGISTRY]


def runs(backend: str, op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the available backend named `backend` implements `op` on `device` for `dtype` inputs."""
    return backend in _REGISTRY and _REGISTRY[backend].supports(op, device, dtype)


def backend_module(name: str) -> ModuleType:
    """The registered backend module `name` (the custom ops call it; users go through `resolve`)."""
    return _REGISTRY[name]


def resolve(backend: str, device: torch.device, ops: Union[str, Sequence[str]],
            dtype: Optional[torch.dtype] = None, **features) -> Dispatch:
    """The backend module for `backend` ("auto" or a name) that runs `ops` on `device` with `dtype` inputs
    and the given features (e.g. topk=100), which a backend may not support."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    ops = (ops,) if isinstance(ops, str) else tuple(ops)

    def ok(impl):
        return all(impl.supports(op, device, dtype, **features) for op in ops)

    if backend == "auto":
        for name in (n for n in PREFERENCE.get(device.type, ("torch",)) if n in _REGISTRY):
            if ok(_REGISTRY[name]):
                return Dispatch(name)
        raise ValueError(f"backend: no available backend runs {', '.join(ops)} on {device} with {dtype}")
    if backend not in _REGISTRY:
        known = "" if backend not in ORDER else " (it is not built or not installed here)"
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, got {backend!r}{known}")
    if not ok(_REGISTRY[backend]):
        raise BackendUnsupported(f"backend: {backend!r} does not run {', '.join(ops)} on {device} with {dtype} "
                                 f"inputs; use backend='auto' or 'torch'")
    return Dispatch(backend)
