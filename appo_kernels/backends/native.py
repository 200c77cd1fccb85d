"""The native backend: C++17/OpenMP kernels on CPU (`appo_kernels._C`) and raw CUDA kernels on GPUs
(`appo_kernels._C_cuda`), both built by setup.py from csrc/.

Tensors are allocated here and passed to the kernels as addresses; the kernels never see torch. Token
statistics take float32/bfloat16/float16 logits whose last dimension is contiguous (other layouts are copied
once to be so); the sequence ops take float32 (and float64 on CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._types import RowStats, backward_inputs, empty_row_stats, rows_contiguous

try:
    from .. import _C
except ImportError:  # not built: the registry leaves this backend out
    _C = None
try:
    from .. import _C_cuda
except ImportError:  # built only where nvcc and a GPU driver are present
    _C_cuda = None

NAME = "native"
_LOGIT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SEQUENCE_DTYPES = (torch.float32, torch.float64)
OPS = {  # op -> input dtypes, per device type
    "cpu": {"token_stats": _LOGIT_CODES, "reverse_discounted_scan": _SEQUENCE_DTYPES,
            "branching_score": _SEQUENCE_DTYPES},
    "cuda": {"token_stats": _LOGIT_CODES, "reverse_discounted_scan": (torch.float32,),
             "branching_score": (torch.float32,)},
}


def available() -> bool:
    return _C is not None or _C_cuda is not None


def unavailable_reason() -> str:
    return ("its C++ extension appo_kernels._C was not built: reinstall from the clone with a C++17 compiler "
            "with OpenMP present (setup.py prints why a build failed)")


CUDA_MAX_TOPK = 64  # the CUDA kernels keep the running top-k in registers


def unsupported(op: str, device: torch.device, dtype: Optional[torch.dtype], topk: int = 0) -> Optional[str]:
    """Why this backend cannot run `op` on `device` with `dtype` inputs and `topk`, or None when it can."""
    if {"cpu": _C, "cuda": _C_cuda}.get(device.type) is None:
        return f"its kernels for {device.type} were not built"
    ops = OPS.get(device.type, {})
    if op not in ops:
        return f"it has no {op} kernel for {device.type}"
    if dtype is not None and dtype not in ops[op]:
        return f"its {op} kernel on {device.type} takes {', '.join(str(d) for d in ops[op])} inputs"
    if device.type == "cuda" and topk > CUDA_MAX_TOPK:
        return f"its CUDA kernel keeps the running top-k in registers, so topk <= {CUDA_MAX_TOPK}, got {topk}"
    return None


def _launch(device: torch.device, name: str, *args) -> None:
    """Call kernel `name` of the extension for `device`; the last argument is the number of OpenMP threads on
    CPU and the current stream on CUDA (where the launchers also need the current device set)."""
    if device.type == "cpu":
        getattr(_C, name)(*args, torch.get_num_threads())
        return
    with torch.cuda.device(device):
        getattr(_C_cuda, name)(*args, torch.cuda.current_stream(device).cuda_stream)


def token_stats_forward(logits: Tensor, tokens: Tensor, temperature: float, topk: int, ignore_index: int,
                        entropy_topk: bool) -> RowStats:
    """logits [N, V] -> RowStats (float32), as the torch reference computes it."""
    logits = rows_contiguous(logits)
    n, v = logits.shape
    tokens = tokens.to(torch.int64).contiguous()
    out = empty_row_stats(n, topk, entropy_topk, logits.device)
    logp, entropy, lse, topk_ids, topk_logp, topk_set, c = out
    if n:
        _launch(logits.device, "token_stats_fwd", logits.data_ptr(), _LOGIT_CODES[logits.dtype], n, v,
                logits.stride(0), tokens.data_ptr(), ignore_index, 1.0 / temperature, topk, entropy_topk,
                logp.data_ptr(), entropy.data_ptr(), lse.data_ptr(), topk_ids.data_ptr(), topk_logp.data_ptr(),
                topk_set.data_ptr(), c.data_ptr())
    return out


def token_stats_backward(logits: Tensor, tokens: Tensor, lse: Tensor, entropy: Tensor, topk_set: Tensor, c: Tensor,
                         g_logp: Tensor, g_entropy: Tensor, temperature: float, ignore_index: int,
                         entropy_topk: bool, out: Optional[Tensor] = None) -> Tensor:
    """Gradient w.r.t. logits [N, V] (contiguous, logits' dtype). With `out` (which may be `logits`) the result
    is copied into it: the kernel re-reads special ids after writing the bulk, so it cannot run in place."""
    if out is not None:
        return out.copy_(token_stats_backward(logits, tokens, lse, entropy, topk_set, c, g_logp, g_entropy,
                                              temperature, ignore_index, entropy_topk))
    logits = rows_contiguous(logits)
    n, v = logits.shape
    grad = torch.empty((n, v), dtype=logits.dtype, device=logits.device)
    if n:
        b = backward_inputs(tokens, lse, entropy, topk_set, c, g_logp, g_entropy, entropy_topk)
        _launch(logits.device, "token_stats_bwd", logits.data_ptr(), _LOGIT_CODES[logits.dtype], n, v,
                logits.stride(0), b.tokens.data_ptr(), ignore_index, 1.0 / temperature, b.k, entropy_topk,
                b.lse.data_ptr(), b.entropy.data_ptr(), b.topk_set.data_ptr(), b.c.data_ptr(), b.g_logp.data_ptr(),
                b.g_entropy.data_ptr(), grad.data_ptr())
    return grad


def reverse_discounted_scan(x: Tensor, layout, gamma: float) -> Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    cu = layout.cu_seqlens.contiguous()
    _launch(x.device, "reverse_scan", x.data_ptr(), cu.data_ptr(), layout.num_rollouts, x.numel(), float(gamma),
            out.data_ptr(), x.dtype == torch.float64)
    return out


def branching_score(entropy: Tensor, omega: Optional[Tensor], eligible: Tensor, layout):
    entropy = entropy.contiguous()
    omega = None if omega is None else omega.to(entropy.dtype).contiguous()
    eligible = eligible.contiguous()
    cu = layout.cu_seqlens.contiguous()
    score = torch.empty_like(entropy)
    candidate = torch.empty(entropy.shape, dtype=torch.bool, device=entropy.device)
    _launch(entropy.device, "branching_score", entropy.data_ptr(), 0 if omega is None else omega.data_ptr(),
            eligible.data_ptr(), cu.data_ptr(), layout.num_rollouts, entropy.numel(), score.data_ptr(),
            candidate.data_ptr(), entropy.dtype == torch.float64)
    return score, candidate
