"""The native backend: C++17/OpenMP kernels on CPU (`appo_kernels._C`) and raw CUDA kernels on GPUs
(`appo_kernels._C_cuda`), both built by setup.py from csrc/.

The caller allocates every output (backends/_interface.py); tensors reach the kernels as addresses, and the
kernels never see torch. Token
statistics take float32/bfloat16/float16 logits whose last dimension is contiguous (other layouts are copied
once to be so); the sequence ops take float32 (and float64 on CPU).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._interface import RowStats, SavedStats, TokenOptions, kernel_backward_inputs, rows_contiguous

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


def unsupported(op: str, device: torch.device, dtype: Optional[torch.dtype] = None, **features) -> Optional[str]:
    """Why this backend cannot run `op` on `device` with `dtype` inputs and `features` (topk), or None."""
    topk = features.get("topk", 0)
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


def token_stats_forward(logits: Tensor, tokens: Tensor, opts: TokenOptions, out: RowStats) -> None:
    """logits [N, V] -> `out` (float32), as the torch reference computes it."""
    logits = rows_contiguous(logits)
    n, v = logits.shape
    tokens = tokens.to(torch.int64).contiguous()
    if n:
        _launch(logits.device, "token_stats_fwd", logits.data_ptr(), _LOGIT_CODES[logits.dtype], n, v,
                logits.stride(0), tokens.data_ptr(), opts.ignore_index, 1.0 / opts.temperature, opts.topk,
                opts.entropy_topk, *(t.data_ptr() for t in out))


def token_stats_backward(logits: Tensor, tokens: Tensor, saved: SavedStats, g_logp: Tensor, g_entropy: Tensor,
                         opts: TokenOptions, out: Tensor) -> None:
    """Gradient w.r.t. logits [N, V] into contiguous `out` (logits' dtype). The kernel re-reads special ids
    after writing the bulk, so when `out` is `logits` (in place) it computes into a buffer and copies."""
    if out.numel() and out.data_ptr() == logits.data_ptr():
        grad = torch.empty_like(out)
        token_stats_backward(logits, tokens, saved, g_logp, g_entropy, opts, grad)
        out.copy_(grad)
        return
    logits = rows_contiguous(logits)
    n, v = logits.shape
    if n:
        b = kernel_backward_inputs(tokens, saved, g_logp, g_entropy, opts.entropy_topk)
        _launch(logits.device, "token_stats_bwd", logits.data_ptr(), _LOGIT_CODES[logits.dtype], n, v,
                logits.stride(0), b.tokens.data_ptr(), opts.ignore_index, 1.0 / opts.temperature, b.k,
                opts.entropy_topk, b.lse.data_ptr(), b.entropy.data_ptr(), b.topk_set.data_ptr(), b.c.data_ptr(),
                b.g_logp.data_ptr(), b.g_entropy.data_ptr(), out.data_ptr())


def reverse_discounted_scan(x: Tensor, layout, gamma: float, out: Tensor) -> None:
    x = x.contiguous()
    cu = layout.cu_seqlens.contiguous()
    _launch(x.device, "reverse_scan", x.data_ptr(), cu.data_ptr(), layout.num_rollouts, x.numel(), float(gamma),
            out.data_ptr(), x.dtype == torch.float64)


def branching_score(entropy: Tensor, omega: Optional[Tensor], eligible: Tensor, layout, out) -> None:
    entropy = entropy.contiguous()
    omega = None if omega is None else omega.to(entropy.dtype).contiguous()
    eligible = eligible.contiguous()
    cu = layout.cu_seqlens.contiguous()
    score, candidate = out
    _launch(entropy.device, "branching_score", entropy.data_ptr(), 0 if omega is None else omega.data_ptr(),
            eligible.data_ptr(), cu.data_ptr(), layout.num_rollouts, entropy.numel(), score.data_ptr(),
            candidate.data_ptr(), entropy.dtype == torch.float64)
