"""Backend registry.

A backend is a module that implements the interface of backends/_interface.py (`Backend`): the primitives
it runs on flat inputs, writing into outputs the caller allocated, and `unsupported(op, device, dtype,
**features)` saying why it cannot run one (None when it can). The public ops validate, normalise layouts and
call the primitives through the custom ops, by backend name. "auto" picks, for the op and the input's device
and dtype, the first backend in PREFERENCE[device type] that runs it. An explicitly named backend that cannot
run the op raises: nothing falls back silently.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import native, torch_ref, triton_backend
from ._interface import Backend

class BackendUnsupported(ValueError):
    """A named backend cannot run the requested op on this device/dtype (a ValueError naming `backend`).

    Attributes say what was asked: `backend`, `ops` (tuple), `device`, `dtype`, `features` (e.g. {"topk": 65})
    and `reason` (the backend's own words)."""

    def __init__(self, backend: str, ops: Tuple[str, ...], device: torch.device, dtype, features: dict,
                 reason: str):
        self.backend, self.ops, self.device, self.dtype, self.features, self.reason = (
            backend, ops, device, dtype, features, reason)
        super().__init__(f"backend: {backend!r} does not run {', '.join(ops)} on {device} with {dtype} inputs: "
                         f"{reason}; use backend='auto' or 'torch'")


_MODULES = (native, triton_backend, torch_ref)
_REGISTRY: Dict[str, Backend] = {m.NAME: m for m in _MODULES if m.available()}
# What "auto" tries, fastest first, per device type. The Triton interpreter on CPU is for tests only.
PREFERENCE = {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")}
ORDER = ("native", "triton", "torch")


def available_backends() -> List[str]:
    """Names of the backends usable in this process (always includes "torch"; "triton" only where a CUDA
    device or the Triton interpreter can run it)."""
    return [name for name in ORDER if name in _REGISTRY]


def _why_not(impl: Backend, ops: Sequence[str], device: torch.device, dtype, features: dict) -> Optional[str]:
    for op in ops:
        reason = impl.unsupported(op, device, dtype, **features)
        if reason is not None:
            return reason
    return None


def runs(backend: str, op: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> bool:
    """Whether the available backend named `backend` implements `op` on `device` for `dtype` inputs."""
    return backend in _REGISTRY and _REGISTRY[backend].unsupported(op, device, dtype) is None


def get(name: str) -> Backend:
    """The registered backend `name` (the custom ops call it; the public ops choose it with `resolve`)."""
    return _REGISTRY[name]


def resolve(backend: str, device: torch.device, ops: Union[str, Sequence[str]],
            dtype: Optional[torch.dtype] = None, **features) -> Backend:
    """The backend (`backend`: "auto" or a name) that runs `ops` on `device` with `dtype` inputs and the given
    features (e.g. topk=100), which a backend may not support; raises ValueError naming `backend` otherwise."""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    ops = (ops,) if isinstance(ops, str) else tuple(ops)
    if backend == "auto":
        for name in (n for n in PREFERENCE.get(device.type, ("torch",)) if n in _REGISTRY):
            if _why_not(_REGISTRY[name], ops, device, dtype, features) is None:
                return _REGISTRY[name]
        raise ValueError(f"backend: no available backend runs {', '.join(ops)} on {device} with {dtype}")
    if backend not in _REGISTRY:
        module = {m.NAME: m for m in _MODULES}.get(backend)
        why = f" ({backend!r} is not usable here: {module.unavailable_reason()})" if module else ""
        raise ValueError(f"backend: expected 'auto' or one of {available_backends()}, got {backend!r}{why}")
    reason = _why_not(_REGISTRY[backend], ops, device, dtype, features)
    if reason is not None:
        raise BackendUnsupported(backend, ops, device, dtype, features, reason)
    return _REGISTRY[backend]
