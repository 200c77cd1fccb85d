"""The torch reference backend: vectorised, exact, runs wherever torch does."""
from typing import Optional

from .sequence import branching_score, reverse_discounted_scan, segment_zscore
from .vocab import (linear_token_stats_backward, linear_token_stats_forward, token_stats_backward,
                    token_stats_forward)

NAME = "torch"


OPS = ("token_stats", "linear_token_stats", "reverse_discounted_scan", "branching_score")


def available() -> bool:
    return True


def unsupported(op: str, device, dtype=None, topk: int = 0) -> Optional[str]:
    """None for every op, device, dtype and topk it knows (the reference runs everywhere)."""
    return None if op in OPS else f"it has no {op} op"


__all__ = ["NAME", "OPS", "available", "unsupported", "branching_score", "reverse_discounted_scan", "segment_zscore",
           "token_stats_forward", "token_stats_backward", "linear_token_stats_forward",
           "linear_token_stats_backward"]
