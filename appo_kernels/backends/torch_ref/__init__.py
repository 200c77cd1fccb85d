"""The torch reference backend: vectorised, exact, runs wherever torch does (implements backends.Backend)."""
from typing import Optional

from .sequence import branching_score, reverse_discounted_scan
from .vocab import (linear_token_stats_backward, linear_token_stats_forward, token_stats_backward,
                    token_stats_forward)
from .._interface import OPS

NAME = "torch"


def available() -> bool:
    return True


def unavailable_reason() -> str:
    return "never: the torch reference runs wherever torch does"


def unsupported(op: str, device, dtype=None, **features) -> Optional[str]:
    """None for every op, device, dtype and feature (the reference runs everything)."""
    return None if op in OPS else f"it has no {op} op"


__all__ = ["NAME", "available", "unavailable_reason", "unsupported", "branching_score", "reverse_discounted_scan",
           "token_stats_forward", "token_stats_backward", "linear_token_stats_forward", "linear_token_stats_backward"]
