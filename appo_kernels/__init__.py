"""appo_kernels: fused, exact kernels for APPO (Agentic Procedural Policy Optimization).

Token statistics in one pass over the vocabulary, the Branching Score, branch-point selection, dual-group
per-procedure advantages, future-KL weighting and the policy loss. See README.md and docs/api.md.
"""
from ._validation import set_value_checks
from .advantages import ProcedureAdvantages, group_advantages, procedure_advantages
from .backends import available_backends
from .branch_points import BranchPoints, ForkRequest, ForkRequests, fork_requests, select_branch_points
from .linear_token_stats import linear_token_stats
from .loss import FutureKLWeights, PolicyLoss, future_kl_weights, policy_loss
from .scores import BranchingScores, FutureValues, branching_score, future_values, score_tokens
from .token_stats import TokenStats, token_stats

__version__ = "0.1.0"

__all__ = [
    "BranchPoints", "BranchingScores", "ForkRequest", "ForkRequests", "FutureKLWeights", "FutureValues",
    "PolicyLoss", "ProcedureAdvantages", "TokenStats", "available_backends", "branching_score", "fork_requests",
    "future_kl_weights", "future_values",
    "group_advantages", "linear_token_stats", "policy_loss", "procedure_advantages", "score_tokens",
    "select_branch_points", "set_value_checks", "token_stats",
]
