"""The comparison protocol (docs/trainer.md, "The comparison protocol"): its statistics on synthetic numbers
with known answers, the ablation switches it needs, and `appo-train compare` end to end (tiny runs)."""
import json
import subprocess
import sys

import oracle
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from appo_train import algorithms
from appo_train.algorithms import StepBatch
from appo_train.policy import GEN, PROMPT
from appo_train.trainer import TrainConfig


# ------------------------------------------------------------------------------ the ablation switches


def _tree_batch():
    """Two prompts: initial rows 0-2 and 6-7, branches 3-5 (of rows 0, 0, 1) and 8 (of row 6), one prompt token
    then 6 generated ones; rewards chosen so that every (group, kind) has a spread."""
    parent = [-1, -1, -1, 0, 0, 1, -1, -1, 6]
    split = [0, 0, 0, 3, 5, 2, 0, 0, 4]
    group = [0, 0, 0, 0, 0, 0, 1, 1, 1]
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, -1.0, 0.2, 0.3, 0.9, 0.4])
    kinds = torch.tensor([[PROMPT] + [GEN] * 6] * len(parent))
    return StepBatch(tasks=[None, None], rows=[], tokens=torch.zeros_like(kinds), attention=torch.ones_like(kinds),
                     kinds=kinds, group=torch.tensor(group), parent=torch.tensor(parent), split=torch.tensor(split),
                     episodes=[], rewards=rewards, branch_score=torch.tensor([0, 0, 0, 1.5, 0.5, 2.0, 0, 0, 0.7]))


@pytest.mark.parametrize("prefix_credit", [True, False])
def test_no_prefix_credit_keeps_each_rollouts_own_advantage_against_the_oracle(prefix_credit):
    batch = _tree_batch()
    cfg = TrainConfig(algo="appo", prefix_credit=prefix_credit)          # the trainer's defaults: M on, branches trained
    adv, loss_mask = algorithms.advantages("appo", cfg, batch)
    ref = oracle.procedure_advantages(batch.rewards.tolist(), batch.group.tolist(), batch.parent.tolist(),
                                      batch.split.tolist(), batch.gen_mask.int().tolist(),
                                      batch.branch_score.tolist(), branch_strength_scaling=True, train_branches=True)
    expect = []
    for i, row in enumerate(ref["advantages"]):
        if prefix_credit or batch.parent[i] >= 0:
            expect.append(row)                   # branch rows: their own A_hat either way
        else:                                    # initial rows: A_hat_i * M[i, t], the branches' mean dropped
            expect.append([ref["group_advantages"][i] * m for m in ref["multiplier"][i]])
    torch.testing.assert_close(adv, torch.tensor(expect, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert loss_mask.tolist() == ref["loss_mask"]
    if not prefix_credit:               # the tokens row 0 shares with its branches 3 and 4 lost their credit
        assert all(a != b for a, b in zip(ref["advantages"][0][1:5], expect[0][1:5]))
