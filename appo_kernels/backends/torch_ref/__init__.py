"""The torch reference backend: vectorised, exact, runs wherever torch does."""
from .sequence import branching_score, reverse_discounted_scan, segment_zscore
from .vocab import (linear_token_stats_backward, linear_token_stats_forward, token_stats_backward,
                    token_stats_forward)

NAME = "torch"


def supports(device) -> bool:
    return True


__all__ = ["NAME", "supports", "branching_score", "reverse_discounted_scan", "segment_zscore",
           "token_stats_forward", "token_stats_backward", "linear_token_stats_forward",
           "linear_token_stats_backward"]
