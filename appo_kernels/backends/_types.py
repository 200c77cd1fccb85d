"""Types shared by all backends."""
from typing import NamedTuple

from torch import Tensor


class RowStats(NamedTuple):
    """Per-row results of a token-statistics forward, flat over rows ([n]).

    The backward needs only lse, entropy and, for the top-k entropy, topk_set and c.
    """
    logp: Tensor
    entropy: Tensor      # exact, or top-k truncated when asked
    lse: Tensor
    topk_ids: Tensor     # int64 [n, k]
    topk_logp: Tensor    # [n, k]
    topk_set: Tensor     # int64 [n, k+1]: topk ∪ {token} (-1 for a duplicate); empty unless entropy="topk"
    c: Tensor            # [n] sum_{v in set} (1 + log p_v) p_v; empty unless entropy="topk"
