"""Triton kernels of the triton backend (token statistics, sequence ops). Importing this package does not import
triton (its modules do); `backends.triton_backend` loads them on first use."""
import os

TOKEN_STATS_MAX_TOPK = 64      # token_stats keeps its running top-k in registers


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1, which must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
