"""Input checks shared by every public op.

Errors name the argument and say what was expected and what was given. Metadata checks (shape, dtype,
device) are free and always run. Checks that read tensor values need a device-to-host copy, so they can be
switched off (`set_value_checks(False)`) and are skipped while torch.compile traces or under FakeTensorMode.
"""
from __future__ import annotations

import math
import numbers
import operator
import os
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

_value_checks = os.environ.get("APPO_KERNELS_CHECK_VALUES", "1") not in ("0", "false", "False")


def set_value_checks(enabled: bool) -> None:
    """Turn the checks that read tensor values on or off (default on; env `APPO_KERNELS_CHECK_VALUES=0`).

    Value checks (token ids in range, `cu_seqlens` monotonic, masks holding only 0/1, ...) synchronise with
    the device. Switch them off for CUDA-graph capture or once a pipeline is known to be correct.
    """
    global _value_checks
    _value_checks = bool(enabled)


def value_checks_enabled() -> bool:
    if not _value_checks:
        return False
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and compiler.is_compiling():
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return _fake_mode() is None  # FakeTensors have no values to check


def _fake_mode():
    try:
        from torch._guards import detect_fake_mode
    except ImportError:  # pragma: no cover - older torch
        return None
    return detect_fake_mode()


def _shape(t: torch.Tensor) -> str:
    return str(list(t.shape))


def require_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def require_float(name: str, t) -> torch.Tensor:
    require_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a float16/bfloat16/float32/float64 tensor, got dtype {t.dtype}")
    return t


def require_int(name: str, t) -> torch.Tensor:
    """An integer tensor of any width, returned as int64: every later comparison (with ignore_index, -100,
    V, ...) is then made in int64, where a narrow dtype would wrap the Python int it is compared with."""
    require_tensor(name, t)
    if t.dtype not in INT_DTYPES:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    return t.to(torch.int64)


def require_shape(name: str, t: torch.Tensor, shape: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(shape):
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name}: expected shape {list(shape)}{extra}, got {_shape(t)}")


def require_ndim(name: str, t: torch.Tensor, ndims: Sequence[int], what: str) -> None:
    if t.dim() not in ndims:
        raise ValueError(f"{name}: expected {what}, got shape {_shape(t)}")


def require_same_device(**tensors: Optional[torch.Tensor]) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    if not items:
        return
    ref_name, ref = items[0]
    for k, v in items[1:]:
        if v.device != ref.device:
            raise ValueError(f"{k}: expected a tensor on {ref.device} (the device of {ref_name}), got {v.device}")


def require_finite_float(name: str, value) -> float:
    """A real number (int, float, numpy scalar; not a bool or a str) that is finite, as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    return v


def require_positive_float(name: str, value, *, allow_zero: bool = False, lower: Optional[float] = None,
                           upper: Optional[float] = None, upper_inclusive: bool = True) -> float:
    """A finite number > 0 (>= 0 with allow_zero; >= lower when given) and <= upper (< upper when not
    upper_inclusive)."""
    v = require_finite_float(name, value)
    lower_ok = (v >= 0 if allow_zero else v > 0) and (lower is None or v >= lower)
    upper_ok = upper is None or (v <= upper if upper_inclusive else v < upper)
    if not (lower_ok and upper_ok):
        low = f">= {lower}" if lower is not None else ">= 0" if allow_zero else "> 0"
        high = "" if upper is None else f" and {'<=' if upper_inclusive else '<'} {upper}"
        raise ValueError(f"{name}: expected a finite number {low}{high}, got {value}")
    return v


def check_gamma(name: str, gamma) -> float:
    """A discount in (0, 1]."""
    return require_positive_float(name, gamma, upper=1.0)


def check_clip_eps(clip_eps) -> float:
    """Omega's clip epsilon in [0, 1)."""
    return require_positive_float("clip_eps", clip_eps, allow_zero=True, upper=1.0, upper_inclusive=False)


def require_int_arg(name: str, value, *, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """An integer (int, numpy integer, anything with __index__; not a bool) in [minimum, maximum]."""
    if isinstance(value, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None
    if value < minimum or (maximum is not None and value > maximum):
        high = "" if maximum is None else f" and <= {maximum}"
        raise ValueError(f"{name}: expected an int >= {minimum}{high}, got {value}")
    return value


def require_int64_arg(name: str, value) -> int:
    """An integer that fits int64 (what the ops' schemas take), e.g. an ignore_index."""
    return require_int_arg(name, value, minimum=INT64_MIN, maximum=INT64_MAX)


def require_choice(name: str, value, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}")
    return value


def as_bool_mask(name: str, t: Optional[torch.Tensor], shape: Sequence[int], device) -> torch.Tensor:
    """A 0/1 mask (bool, integer or float) as a bool tensor of `shape`; None means all ones."""
    if t is None:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    require_tensor(name, t)
    require_shape(name, t, shape, "the shape of the per-token inputs")
    require_same_device(**{"the other inputs": torch.empty(0, device=device), name: t})
    if t.dtype == torch.bool:
        return t
    if t.dtype not in FLOAT_DTYPES + INT_DTYPES:
        raise TypeError(f"{name}: expected a bool, integer or float 0/1 mask, got dtype {t.dtype}")
    if value_checks_enabled() and t.numel() and not bool(((t == 0) | (t == 1)).all()):
        bad = t[(t != 0) & (t != 1)].flatten()[0].item()
        raise ValueError(f"{name}: expected a mask holding only 0 and 1, found the value {bad}")
    return t != 0
