"""docs/trl.md's APPOTrainer example on a real model (SmolLM2-135M-Instruct through appo-train's `smollm2`
preset), run as written: a 93 MB download on first use and about a minute or two on 2 CPU cores, so it is
deselected by default (`model_download` marker, pyproject.toml). Run it with

    python -m pytest -q -m model_download tests/test_trl_model.py

The page's code is executed in this interpreter with `APPOTrainer` swapped for a subclass that keeps each
generation batch and each loss, so the test can check what the example's printout does not show."""
import math
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytest.importorskip("gguf")

import appo_kernels.integrations.trl as appo_trl  # noqa: E402
from appo_train.hf_policy import ModelUnavailable  # noqa: E402

HEADING = "## A real model: SmolLM2-135M-Instruct"


class Recorder(appo_trl.APPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.losses = [], []

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        parents = [x["appo_parent"] for x in inputs]
        self.batches.append((parents, {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}))
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        self.losses.append(loss.detach())
        return loss


def _example() -> str:
    text = (Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text()
    return re.search(r"```python\n(.*?)```", text.split(HEADING)[1], flags=re.DOTALL).group(1)


@pytest.mark.model_download
def test_the_docs_real_model_example_runs(monkeypatch, capsys):
    monkeypatch.setattr(appo_trl, "APPOTrainer", Recorder)      # the example imports it from the module
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(_example(), "docs/trl.md", "exec"), namespace)
    except ModelUnavailable as e:                                # offline: the preset cannot be downloaded
        pytest.skip(str(e))
    trainer = namespace["trainer"]
    assert isinstance(trainer, Recorder)
    steps = trainer.args.max_steps
    assert trainer.state.global_step == steps
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == steps and all(math.isfinite(row["loss"]) for row in logged)
    assert all(row["appo/forked_fraction"] > 0 for row in logged)
    assert len(trainer.batches) == steps and len(trainer.losses) >= steps
    n_init, groups = trainer.args.appo_num_initial, len(namespace["prompts"])
    for parents, out in trainer.batches:
        # each group: appo_num_initial initial rows (parent -1), then branches of one of them
        assert len(parents) == groups * trainer.args.num_generations
        branches = [p for p in parents if p >= 0]
        assert branches and len(branches) == len(parents) - groups * n_init
        adv = out["advantages"]
        assert adv.dim() == 2 and adv.shape == out["completion_ids"].shape
        assert torch.isfinite(adv).all()
    assert all(torch.isfinite(loss).all() for loss in trainer.losses)
    rows = [line for line in capsys.readouterr().out.splitlines() if "'step': " in line]   # the example's own
    assert len(rows) == steps and all("appo/forked_fraction" in line for line in rows)
    with capsys.disabled():                                      # shown with -s
        print("", *rows, sep="\n")
