"""Data-parallel training of the reference trainer under torchrun (2 processes, gloo on CPU): prompts sharded
over the ranks, branch selection on the owning rank, gradients summed — the same run as one process."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ARGS = ["--smoke", "--no-progress", "--max-steps", "3", "--token-budget", "1000000000", "--eval-every", "3"]
# One thread per process in both runs, so the comparison is about sharding, not about thread counts.
ENV = os.environ | {"OMP_NUM_THREADS": "1"}
DISCRETE = ("step", "gen_tokens", "reward", "success", "tool_calls", "format", "branches", "candidate_share",
            "post_answer_forks", "decision_forks", "eval_success", "eval_reward", "eval_tool_calls")


def _run(cmd, cwd):
    out = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
    """The smoke warm start, trained once and handed to every run (a run reuses a matching sft.pt)."""
    tmp = tmp_path_factory.mktemp("warm")
    _run([sys.executable, "-m", "appo_train", *ARGS, "--algo", "grpo", "--max-steps", "0", "--out", str(tmp)], tmp)
    return tmp / "sft.pt"


@pytest.mark.parametrize("algo", ["appo", "appo-entropy", "arpo", "grpo"])
def test_two_ranks_give_the_single_process_run(tmp_path, warm_start, algo):
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "appo_train"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "appo_train"])):
        out = tmp_path / name
        out.mkdir()
        shutil.copy(warm_start, out / "sft.pt")
        _run([*launcher, *ARGS, "--algo", algo, "--out", str(out)], tmp_path)
        runs[name] = torch.load(out / "checkpoint.pt", weights_only=False)
    one, two = runs["one"], runs["two"]
    assert one["step"] == two["step"] == 3
    assert [r["ranks"] for r in two["records"][1:]] == [2, 2, 2]
    for a, b in zip(one["records"], two["records"], strict=True):
        # Same prompts, same rollouts, same forks: every count and reward agrees exactly.
        assert {k: a.get(k) for k in DISCRETE} == {k: b.get(k) for k in DISCRETE}
        for key in ("loss", "kl", "entropy"):
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
    for name, w in one["model"].items():
        torch.testing.assert_close(two["model"][name], w, rtol=1e-4, atol=1e-5, msg=name)
    assert any(not torch.equal(w, torch.load(warm_start, weights_only=False)["model"][name])
               for name, w in one["model"].items())                         # the runs did train
