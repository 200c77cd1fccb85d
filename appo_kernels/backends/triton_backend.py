"""The Triton backend: the primary GPU path (kernels in backends/triton_kernels/).

On a CPU it runs only under the Triton interpreter (TRITON_INTERPRET=1, set before triton is first imported),
which is how CI tests it; "auto" never picks the interpreter. Triton is imported on first use, so importing
appo_kernels stays light.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

NAME = "triton"
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SEQUENCE_DTYPES = (torch.float32, torch.float64)
TOKEN_STATS_MAX_TOPK = 64      # token_stats keeps its running top-k in registers
OPS = {"token_stats": _LOGIT_DTYPES, "linear_token_stats": _LOGIT_DTYPES,
       "reverse_discounted_scan": _SEQUENCE_DTYPES, "branching_score": _SEQUENCE_DTYPES}


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supports(op: str, device: torch.device, dtype: Optional[torch.dtype] = None, topk: int = 0) -> bool:
    runs_here = device.type == "cuda" or (device.type == "cpu" and interpreting())
    fits = op != "token_stats" or topk <= TOKEN_STATS_MAX_TOPK
    return runs_here and fits and op in OPS and (dtype is None or dtype in OPS[op])


def token_stats_forward(*args):
    from .triton_kernels import token_stats
    return token_stats.token_stats_forward(*args)


def token_stats_backward(*args, **kwargs):
    from .triton_kernels import token_stats
    return token_stats.token_stats_backward(*args, **kwargs)


def linear_token_stats_forward(*args):
    from .triton_kernels import linear_token_stats
    return linear_token_stats.linear_token_stats_forward(*args)


def linear_token_stats_backward(*args):
    from .triton_kernels import linear_token_stats
    return linear_token_stats.linear_token_stats_backward(*args)


def reverse_discounted_scan(x, layout, gamma):
    from .triton_kernels import sequence
    return sequence.reverse_discounted_scan(x, layout, gamma)


def branching_score(entropy, omega, eligible, layout):
    from .triton_kernels import sequence
    return sequence.branching_score(entropy, omega, eligible, layout)
