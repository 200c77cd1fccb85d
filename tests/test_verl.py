"""The verl adapter: APPO's estimator and loss registered in verl's registries and called through verl's own
lookup functions (verl.trainer.ppo.core_algos, on CPU); skipped where verl is not installed."""

import numpy as np
import pytest
import torch

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf

import appo_kernels as ak
from helpers import run_docs_example
from appo_kernels.integrations import verl as appo_verl

appo_verl.register()


def _actor_config(**over):
    cfg = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
           "global_batch_info": {"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None}}
    return OmegaConf.create(cfg | over)


def _batch(seed=0, bs=8, t=12):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, t + 1, (bs,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    rewards = torch.zeros(bs, t)
    rewards[torch.arange(bs), lengths - 1] = torch.randn(bs, generator=g)      # outcome reward on the last token
    index = np.array(["p0", "p1", "p0", "p2", "p1", "p0", "p2", "p1"][:bs], dtype=object)
    return rewards, mask, index


def test_registered_under_verl_lookup():
    assert core_algos.get_adv_estimator_fn("appo") is appo_verl.compute_appo_advantage
    assert core_algos.get_policy_loss_fn("appo") is appo_verl.compute_policy_loss_appo
    appo_verl.register()                                                     # idempotent


def test_estimator_without_tree_is_the_group_zscore():
    rewards, mask, index = _batch()
    adv, ret = core_algos.get_adv_estimator_fn("appo")(token_level_rewards=rewards, response_mask=mask, index=index,
                                                       config=OmegaConf.create({"norm_adv_by_std_in_grpo": True}))
    score = rewards.sum(-1).double().numpy()
    for uid in set(index):
        rows = np.nonzero(index == uid)[0]
        z = (score[rows] - score[rows].mean()) / (score[rows].std() + 1e-6)   # population std (method §5)
        for r, expected in zip(rows, z):
            got = adv[r][mask[r].bool()]
            torch.testing.assert_close(got, torch.full_like(got, float(expected)), rtol=1e-5, atol=1e-5)
    assert torch.all(adv[mask == 0] == 0) and torch.equal(adv, ret)


def test_estimator_with_a_tree_credits_shared_prefixes():
    rewards, mask, index = _batch(bs=4)
    index = np.array(["p", "p", "p", "p"], dtype=object)
    mask[:] = 1
    parent, split = np.array([-1, -1, 0, 0]), np.array([-1, -1, 3, 7])
    adv, _ = appo_verl.compute_appo_advantage(rewards, mask, index, appo_parent=parent, appo_split=split)
    want = ak.procedure_advantages(rewards.sum(-1), torch.zeros(4, dtype=torch.long), torch.tensor(parent),
                                   torch.tensor(split).clamp(min=0), mask.bool())
    torch.testing.assert_close(adv, want.advantages * want.loss_mask)
    # tokens 4..7 are shared with one branch only (its credit, +-1 in a branch group of two), 8.. with none
    torch.testing.assert_close((adv[0, 4:8] - adv[0, 8:]).abs(), torch.ones(4), rtol=1e-4, atol=1e-4)
    assert torch.all(adv[2:] == 0)                          # branch rows: signal, not gradient (method §5)


@pytest.mark.parametrize("drop", [True, False])
@pytest.mark.parametrize("weights", [False, True])
def test_loss_is_verls_vanilla_surrogate_on_future_kl_weighted_advantages(weights, drop):
    # Independent cross-check: verl's own dual-clip PPO ("vanilla") on A * (1 + f) must give APPO's loss and
    # gradient, with and without rollout importance weights. With the authors' filter (the default), vanilla
    # runs on the mask without the responses holding more than one token where A < 0 and ratio > c.
    g = torch.Generator().manual_seed(3)
    bs, t = 6, 10
    mask = (torch.rand(bs, t, generator=g) > 0.2).float()
    old = -torch.rand(bs, t, generator=g) * 3
    adv = torch.randn(bs, t, generator=g)
    new_a = (old + 0.6 * torch.randn(bs, t, generator=g)).requires_grad_()
    new_b = new_a.detach().clone().requires_grad_()
    w = torch.rand(bs, t, generator=g) + 0.5 if weights else None
    cfg = _actor_config(drop_dual_clipped=drop)
    loss, metrics = core_algos.get_policy_loss_fn("appo")(old, new_a, adv, mask, "token-mean", cfg, w)
    weighted = ak.future_kl_weights(new_b.detach(), old, adv, mask.bool()).advantages
    hits = ((mask > 0) & (weighted < 0) & (torch.exp(new_b.detach() - old) > 3.0)).sum(dim=1)
    assert drop is False or bool((hits > 1).any()), "the data should drop a response"
    kept = mask * (hits <= 1)[:, None] if drop else mask
    ref, _ = core_algos.get_policy_loss_fn("vanilla")(old, new_b, weighted, kept, "token-mean", cfg, w)
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-5, atol=1e-6)
    loss.backward()
    ref.backward()
    torch.testing.assert_close(new_a.grad, new_b.grad, rtol=1e-5, atol=1e-6)
    assert {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/appo_fkl_weight"} <= set(metrics)


def test_loss_follows_verls_global_token_normalisation():
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(4, 5)
    old, adv = -torch.rand(4, 5, generator=g), torch.randn(4, 5, generator=g)
    cfg = _actor_config(global_batch_info={"dp_size": 2, "batch_num_tokens": 40, "global_batch_size": None})
    loss, _ = core_algos.get_policy_loss_fn("appo")(old, old.clone(), adv, mask, "token-mean", cfg, None)
    weighted = ak.future_kl_weights(old, old, adv, mask.bool()).advantages
    ref, _ = core_algos.get_policy_loss_fn("vanilla")(old, old.clone(), weighted, mask, "token-mean", cfg, None)
    torch.testing.assert_close(loss, ref.to(loss.dtype))
    with pytest.raises(NotImplementedError, match="loss_agg_mode"):
        core_algos.get_policy_loss_fn("appo")(old, old, adv, mask, "seq-mean-token-mean", cfg, None)


def test_the_docs_example_runs():
    out = run_docs_example("verl.md")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "actor/appo_fkl_weight" in out.stdout
