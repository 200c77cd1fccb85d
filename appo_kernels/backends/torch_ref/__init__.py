"""The torch reference backend: vectorised, exact, runs wherever torch does."""
from .sequence import branching_score, reverse_discounted_scan, segment_zscore
from .vocab import (linear_token_stats_backward, linear_token_stats_forward, token_stats_backward,
                    token_stats_forward)

NAME = "torch"


OPS = ("token_stats", "linear_token_stats", "reverse_discounted_scan", "branching_score")


def available() -> bool:
    return True


def supports(op: str, device, dtype=None, **features) -> bool:
    return op in OPS


__all__ = ["NAME", "OPS", "available", "supports", "branching_score", "reverse_discounted_scan", "segment_zscore",
           "token_stats_forward", "token_stats_backward", "linear_token_stats_forward",
           "linear_token_stats_backward"]
