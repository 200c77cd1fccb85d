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
from appo_train.cli import SMOKE, main
from appo_train.compare import UNLIMITED_TOKENS, area, budget_config, differences, paired_bootstrap, summarize
from appo_train.policy import GEN, PROMPT
from appo_train.trainer import TrainConfig, Trainer


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


# ------------------------------------------------------------------------------ statistics, known answers


def test_a_constant_difference_has_a_zero_width_interval_at_that_value():
    assert paired_bootstrap([0.03] * 5) == pytest.approx((0.03, 0.03, 0.03))


def test_the_bootstrap_interval_is_the_exact_percentile_of_the_resampled_means():
    # Resampling [0, 1, 3] gives 27 equally likely triples: the mean 0 and the mean 3 have 1/27 = 3.7% each,
    # more than 2.5%, so the exact 95% percentile interval is [0, 3]; [0, 0, 0, 0, 4] gives 0 in 0.8^5 = 33%
    # of the resamples and 4 (all five on the 4) in 0.2^5 = 0.03% < 2.5%: the upper end is below 4.
    assert paired_bootstrap([0.0, 1.0, 3.0]) == pytest.approx((4 / 3, 0.0, 3.0))
    mean, lo, hi = paired_bootstrap([0.0, 0.0, 0.0, 0.0, 4.0])
    assert (mean, lo) == pytest.approx((0.8, 0.0)) and 1.6 <= hi < 4.0
    assert paired_bootstrap([0.0, 0.0, 0.0, 0.0, 4.0], level=0.5)[2] < hi       # a lower level, a narrower interval


def test_paired_differences_need_the_same_seeds():
    values = {"appo": {1: 0.8, 2: 0.7}, "grpo": {1: 0.75, 2: 0.72}, "arpo": {1: 0.7, 3: 0.7}}
    assert differences(values, "appo", "grpo") == pytest.approx([0.05, -0.02])
    with pytest.raises(ValueError, match=r"seeds: appo has seeds \[1, 2\], arpo has \[1, 3\]"):
        differences(values, "appo", "arpo")
    with pytest.raises(ValueError, match="diffs: expected at least 2"):
        paired_bootstrap([0.1])


def test_area_is_the_curves_mean_over_the_budget():
    assert area([0, 40, 100], [0.5, 0.5, 0.5], 100) == pytest.approx(0.5)
    assert area([0, 100], [0.0, 1.0], 100) == pytest.approx(0.5)                       # a straight line: half
    # a run stops at the first step past the budget: the curve is cut at 100, its value there interpolated (0.9)
    assert area([0, 50, 150], [0.2, 0.6, 1.2], 100) == pytest.approx((50 * 0.4 + 50 * 0.75) / 100)
    with pytest.raises(ValueError, match=r"must span \[0, 100\]"):
        area([0, 50], [0.2, 0.6], 100)
    with pytest.raises(ValueError, match="increasing x"):
        area([0, 50, 50], [0.2, 0.6, 0.7], 10)


def test_a_rollout_budget_is_whole_steps():
    assert budget_config("rollouts", 256, 128) == {"token_budget": UNLIMITED_TOKENS, "max_steps": 2}
    assert budget_config("tokens", 5000, 128) == {"token_budget": 5000, "max_steps": None}
    with pytest.raises(ValueError, match="rollout budget: expected a multiple of the 128 rollouts of one step"):
        budget_config("rollouts", 200, 128)


def test_summary_pairs_every_appo_arm_with_each_baseline():
    runs = [{"arm": arm, "seed": s, "steps": 3, "gen_tokens": 100, "success_before": 0.5, "success": v,
             "area": v / 2, "post_answer_forks": None, "decision_forks": None}
            for arm, vals in (("grpo", [0.6, 0.7]), ("appo-topk", [0.7, 0.8])) for s, v in zip((1, 2), vals)]
    per_arm, diffs = summarize(runs)
    assert [r["arm"] for r in per_arm] == ["grpo", "appo-topk"]
    assert per_arm[1]["success_mean"] == pytest.approx(0.75) and per_arm[1]["success_std"] == pytest.approx(0.05)
    assert len(diffs) == 1 and (diffs[0]["arm"], diffs[0]["baseline"]) == ("appo-topk", "grpo")
    assert (diffs[0]["success_diff"], diffs[0]["success_lo"], diffs[0]["success_hi"]) == pytest.approx((0.1,) * 3)
    assert diffs[0]["area_diff"] == pytest.approx(0.05)


# ------------------------------------------------------------------------------ appo-train compare, end to end


def _compare(capsys, out, *args) -> str:
    """`appo-train compare --smoke` in this process; returns what it printed."""
    assert main(["compare", "--smoke", "--no-progress", "--out", str(out), *args]) == 0
    return capsys.readouterr().out


def test_compare_resumes_per_run_writes_the_table_and_plots_and_keeps_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    # grpo seed 1 as a comparison killed after its first step leaves it: a checkpoint at step 1 (the settings
    # compare gives it, max_steps aside, which a checkpoint may change)
    killed = dict(algo="grpo", seed=1, out_dir=str(out / "grpo-s1"), sft_cache=str(out / "sft-s1.pt"),
                  token_budget=UNLIMITED_TOKENS, max_steps=1)
    Trainer(TrainConfig(**(SMOKE | killed)), progress=False).run()
    args = ("--budget", "rollouts", "--algos", "grpo", "appo-topk", "--seeds", "1", "2")
    first = _compare(capsys, out, *args)
    assert "grpo, seed 1: resuming after step 1" in first and first.count(": starting ->") == 3
    results = json.loads((out / "results.json").read_text())
    assert {(r["arm"], r["algo"], r["seed"]) for r in results["runs"]} == {
        ("grpo", "grpo", 1), ("grpo", "grpo", 2), ("appo-topk", "appo", 1), ("appo-topk", "appo", 2)}
    assert all(r["steps"] == 3 for r in results["runs"])              # 96 rollouts = 3 steps of 4 x 8
    assert [json.loads(x)["step"] for x in (out / "grpo-s1" / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]
    assert json.loads((out / "appo-topk-s1" / "config.json").read_text())["branch_mode"] == "topk"
    (diff,) = results["differences"]
    assert (diff["arm"], diff["baseline"]) == ("appo-topk", "grpo")
    assert diff["success_lo"] <= diff["success_diff"] <= diff["success_hi"]
    table = (out / "differences.md").read_text()
    assert table.splitlines()[2].startswith("| appo-topk | grpo | ")
    for name in ("results.md", "curves.png", "differences.png", "comparison.png", "report.html"):
        assert (out / name).stat().st_size > 0, name
    # A second call keeps every finished run (their metrics untouched) and rebuilds the same table.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*-s*/metrics.jsonl")}
    again = _compare(capsys, out, *args)
    assert again.count("kept:") == 4 and "starting" not in again and "resuming" not in again
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert (out / "differences.md").read_text() == table
    # Another budget in the same folder is refused, naming the option.
    with pytest.raises(SystemExit):
        _compare(capsys, out, "--budget", "rollouts", "--rollout-budget", "64")
    err = capsys.readouterr().err
    assert "--out: " in err and "size=96 there, 64 now" in err, err


def test_compare_refuses_options_that_contradict_its_budget(tmp_path, capsys):
    for args, message in ((("--budget", "rollouts", "--token-budget", "5000"), "--token-budget: with --budget rollouts"),
                          (("--rollout-budget", "96"), "--rollout-budget: only with --budget rollouts"),
                          (("--budget", "rollouts", "--rollout-budget", "100"), "--rollout-budget: rollout budget: "
                           "expected a multiple of the 32 rollouts"),
                          (("--branch-mode", "topk"), "unrecognized arguments: --branch-mode topk")):
        with pytest.raises(SystemExit) as e:
            main(["compare", "--smoke", "--out", str(tmp_path / "cmp"), *args])
        assert e.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "cmp").exists()
