"""The Triton backend: the primary GPU path (kernels in backends/triton_kernels/).

On a CPU it runs only under the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported),
which is how CI tests it; "auto" never picks the interpreter. Triton is imported on first use, so importing
appo_kernels stays light.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Optional

import torch

from .triton_kernels import TOKEN_STATS_MAX_TOPK, interpreting

NAME = "triton"
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SEQUENCE_DTYPES = (torch.float32, torch.float64)
OPS = {"token_stats": _LOGIT_DTYPES, "linear_token_stats": _LOGIT_DTYPES,
       "reverse_discounted_scan": _SEQUENCE_DTYPES, "branching_score": _SEQUENCE_DTYPES}
# Which kernel module implements each op (they import triton, so they load on first use: `__getattr__`).
_KERNELS = {"token_stats_forward": "token_stats", "token_stats_backward": "token_stats",
            "linear_token_stats_forward": "linear_token_stats", "linear_token_stats_backward": "linear_token_stats",
            "reverse_discounted_scan": "sequence", "branching_score": "sequence"}


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def available() -> bool:
    """Installed, and with somewhere to run: a CUDA device, or the interpreter on the CPU."""
    return installed() and (interpreting() or torch.cuda.is_available())


def unavailable_reason() -> str:
    if not installed():
        return "triton is not installed (pip install -e '.[triton]' from the clone)"
    return ("Triton kernels run on CUDA GPUs, and on the CPU only under the Triton interpreter "
            "(TRITON_INTERPRET=1, set before triton is first imported; for tests)")


def unsupported(op: str, device: torch.device, dtype: Optional[torch.dtype] = None, **features) -> Optional[str]:
    """Why this backend cannot run `op` on `device` with `dtype` inputs and `features` (topk), or None."""
    if device.type == "cpu" and not interpreting():
        return unavailable_reason()
    if device.type not in ("cpu", "cuda"):
        return f"it runs on CUDA devices, not {device.type}"
    if op not in OPS:
        return f"it has no {op} kernel"
    if dtype is not None and dtype not in OPS[op]:
        return f"its {op} kernel takes {', '.join(str(d) for d in OPS[op])} inputs"
    topk = features.get("topk", 0)
    if op == "token_stats" and topk > TOKEN_STATS_MAX_TOPK:
        return (f"its token_stats kernel keeps the running top-k in registers, so topk <= {TOKEN_STATS_MAX_TOPK}, "
                f"got {topk}")
    return None


def __getattr__(name: str):
    if name in _KERNELS:
        return getattr(importlib.import_module(f"{__package__}.triton_kernels.{_KERNELS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
