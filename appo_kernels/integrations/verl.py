"""verl: APPO's advantage estimator and future-KL policy loss, registered through verl's public registries.

    import appo_kernels.integrations.verl as appo_verl
    appo_verl.register()          # once per process that builds advantages or losses (driver and workers)
    # then, in verl's config:
    #   algorithm.adv_estimator=appo
    #   actor_rollout_ref.actor.policy_loss.loss_mode=appo

- Advantage estimator "appo" (`verl.trainer.ppo.core_algos.get_adv_estimator_fn("appo")`): method §5's
  dual-group advantages via `appo_kernels.procedure_advantages`. verl's stock `compute_advantage` passes only
  the rewards, the response mask and the prompt uid, so out of the box every rollout is an initial one and
  the result is the group-normalised reward with the method's population std (verl's own "grpo" uses the sample
  std). A rollout loop that forks branches passes the tree as keyword arguments `appo_parent`, `appo_split`
  (and `appo_branch_score` for branch-strength scaling); then branch credit reaches the shared prefixes.
- Policy loss "appo" (`get_policy_loss_fn("appo")`): method §6's future-KL advantage weighting
  (`appo_kernels.future_kl_weights`) followed by the clip-higher / dual-clip surrogate of
  `appo_kernels.policy_loss`, with verl's clip settings (`clip_ratio_low`, `clip_ratio_high`, `clip_ratio_c`)
  and verl's global token normalisation for "token-mean". The KL-to-reference term stays verl's own
  (`use_kl_loss`). `rollout_is_weights` are folded into the advantages, which is exact: every branch of the
  surrogate is linear in the advantage, and positive weights keep its sign.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import future_kl_weights, policy_loss, procedure_advantages
from . import require

ESTIMATOR = "appo"
POLICY_LOSS = "appo"


def _get(config, name: str, default):
    if config is None:
        return default
    value = config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)
    return default if value is None else value


def compute_appo_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                           index: np.ndarray | None = None, config=None, *, appo_parent=None, appo_split=None,
                           appo_branch_score=None, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator: `[bs, T]` rewards and mask, `index` the prompt uid per row -> (advantages,
    returns), both `[bs, T]` float32, 0 outside the loss mask (branch rows, unless the tree is given with
    `train_branches` set in the algorithm config)."""
    bs = token_level_rewards.shape[0]
    device = token_level_rewards.device
    if index is None:
        groups = torch.zeros(bs, dtype=torch.int64, device=device)
    else:
        groups = torch.as_tensor(np.unique(np.asarray(index), return_inverse=True)[1].reshape(-1), device=device)
    parent = torch.full((bs,), -1, dtype=torch.int64, device=device) if appo_parent is None else \
        torch.as_tensor(np.asarray(appo_parent), dtype=torch.int64, device=device)
    split = torch.zeros(bs, dtype=torch.int64, device=device) if appo_split is None else \
        torch.as_tensor(np.asarray(appo_split), dtype=torch.int64, device=device).clamp(min=0)
    score = None if appo_branch_score is None else torch.as_tensor(np.asarray(appo_branch_score),
                                                                   dtype=torch.float32, device=device)
    out = procedure_advantages(token_level_rewards.sum(-1).float(), groups, parent, split, response_mask.bool(),
                               branch_score=score, branch_strength_scaling=score is not None,
                               scale_by_std=bool(_get(config, "norm_adv_by_std_in_grpo", True)),
                               train_branches=bool(_get(config, "train_branches", False)))
    adv = out.advantages * out.loss_mask
    return adv, adv


def compute_policy_loss_appo(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                             response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config=None,
                             rollout_is_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """verl policy loss: `[bs, T]` log-probs, advantages and mask -> (scalar loss, metrics)."""
    mask = response_mask.bool()
    clip = _get(config, "clip_ratio", 0.2)
    eps_low, eps_high = _get(config, "clip_ratio_low", clip), _get(config, "clip_ratio_high", clip)
    clip_ratio_c = _get(config, "clip_ratio_c", 3.0)
    fkl = future_kl_weights(log_prob.detach(), old_log_prob, advantages, mask, clip_ratio_c=clip_ratio_c)
    adv = fkl.advantages if rollout_is_weights is None else fkl.advantages * rollout_is_weights.detach()
    info = _get(config, "global_batch_info", {}) or {}
    dp_size = info.get("dp_size", 1)
    token_count = None
    if loss_agg_mode == "token-mean" and info.get("batch_num_tokens") is not None:
        token_count = float(info["batch_num_tokens"]) / dp_size      # = verl's sum / tokens * dp_size
    elif loss_agg_mode != "token-mean" and (dp_size > 1 or info.get("global_batch_size") is not None):
        raise NotImplementedError(f"loss_agg_mode: APPO's verl loss normalises {loss_agg_mode!r} per micro-batch "
                                  f"only; use 'token-mean' with data parallelism (dp_size={dp_size})")
    # verl adds its own KL term (use_kl_loss); the authors' response filter (method §7) is on unless the actor
    # config sets drop_dual_clipped: false.
    out = policy_loss(log_prob, old_log_prob, adv, mask, eps_low=eps_low, eps_high=eps_high,
                      clip_ratio_c=clip_ratio_c, kl_coef=0.0, aggregation=loss_agg_mode, token_count=token_count,
                      drop_dual_clipped=bool(_get(config, "drop_dual_clipped", True)))
    m = mask.to(log_prob.dtype)
    ppo_kl = ((old_log_prob - log_prob).detach() * m).sum() / m.sum().clamp(min=1)
    f = (fkl.weights * m).sum() / m.sum().clamp(min=1)
    return out.loss, {"actor/pg_clipfrac": out.clip_fraction.item(), "actor/ppo_kl": ppo_kl.item(),
                      "actor/pg_clipfrac_lower": out.dual_clip_fraction.item(), "actor/appo_fkl_weight": f.item()}


def register() -> None:
    """Register "appo" in verl's advantage-estimator and policy-loss registries (idempotent)."""
    core_algos = require("verl.trainer.ppo.core_algos", "verl")
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(ESTIMATOR) is not compute_appo_advantage:
        core_algos.register_adv_est(ESTIMATOR)(compute_appo_advantage)
    core_algos.register_policy_loss(POLICY_LOSS)(compute_policy_loss_appo)
