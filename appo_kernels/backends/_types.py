"""Types shared by all backends."""
from typing import NamedTuple

import torch
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


def empty_row_stats(n: int, topk: int, entropy_topk: bool, device, dtype=torch.float32) -> RowStats:
    """Uninitialised outputs of a token-statistics forward over n rows (what the kernels write into)."""
    vec = [torch.empty(n, dtype=dtype, device=device) for _ in range(3)]
    ids = torch.empty(n, topk, dtype=torch.int64, device=device)
    topk_set = torch.empty(n, topk + 1, dtype=torch.int64, device=device) if entropy_topk else \
        torch.empty(0, dtype=dtype, device=device)
    c = torch.empty(n if entropy_topk else 0, dtype=dtype, device=device)
    return RowStats(*vec, ids, torch.empty(n, topk, dtype=dtype, device=device), topk_set, c)


def rows_contiguous(logits: Tensor) -> Tensor:
    """Logits whose last dimension is contiguous, as the kernels read them (one copy otherwise)."""
    return logits if logits.stride(-1) == 1 else logits.contiguous()


class BackwardInputs(NamedTuple):
    """The saved statistics and upstream gradients of a token-statistics backward, as the kernels take them:
    contiguous int64 tokens and float32 vectors; the entropy-mode inputs the kernel does not read are
    replaced by `lse` (a valid pointer); k is the top-k of the top-k entropy (0 for exact entropy)."""
    tokens: Tensor
    lse: Tensor
    entropy: Tensor
    topk_set: Tensor
    c: Tensor
    g_logp: Tensor
    g_entropy: Tensor
    k: int


def backward_inputs(tokens, lse, entropy, topk_set, c, g_logp, g_entropy, entropy_topk: bool) -> BackwardInputs:
    f32 = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    lse = f32(lse)
    if entropy_topk:
        return BackwardInputs(tokens.to(torch.int64).contiguous(), lse, lse, topk_set.to(torch.int64).contiguous(),
                              f32(c), f32(g_logp), f32(g_entropy), topk_set.shape[1] - 1)
    return BackwardInputs(tokens.to(torch.int64).contiguous(), lse, f32(entropy), lse, lse, f32(g_logp),
                          f32(g_entropy), 0)
