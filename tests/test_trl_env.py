"""APPOTrainer with TRL's `environment_factory` on CPU: TRL creates and resets one environment per row, the
rollout hook's tool loop calls that row's environment, and a branch's environment is brought to its prefix's state
by replaying the prefix's calls on it. The environment here is stateful and deterministic: a register whose
`add` returns the running sum of every earlier call, so a branch's later result is right only if its environment
holds its prefix's calls. The tiny Qwen2 and its fitting are test_trl_tools.py's."""
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from test_trl import check_losses, check_topk_forks  # noqa: E402
from test_trl_tools import (PROMPTS, ToolRecorder, _tool_rounds, _tool_spans, check_tool_batches,  # noqa: E402
                            tool_model, train_tools)  # noqa: F401  (tool_model: the fixture)
from appo_kernels.integrations.trl import APPOConfig, APPOTrainer  # noqa: E402


class Register:
    """`add` adds a + b to a register and returns the register (so each result depends on every earlier call);
    `get_reward` gives 0.1 per call. The method keeps the calculator's name, signature and docstring, which is
    the tool schema the tiny model was fitted to."""

    def reset(self, **kwargs):
        self.calls, self.total = [], 0

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls.append((a, b))
        self.total += a + b
        return self.total

    def get_reward(self) -> float:
        return 0.1 * len(self.calls)


def states_the_register(completions, environments, **_):
    """1 when the completion ends with the assistant stating the register's value: a reward that reads the
    environments TRL passes (one per completion, in order)."""
    assert len(environments) == len(completions)
    return [float(c[-1]["role"] == "assistant" and len(c) > 1 and c[-1]["content"].strip() == str(e.total))
            for c, e in zip(completions, environments)]


class EnvRecorder(ToolRecorder):
    """Also keeps each batch's environment states when the rewards read them (TRL resets the instances for the
    next batch) and each branch's environment state right after its replay."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.states, self.replayed, self.names = [], [], []

    def _replay(self, head, tools, row, parent):
        super()._replay(head, tools, row, parent)
        env = tools.environment
        self.replayed.append((len(self.states), row, parent, _calls(head.messages), (list(env.calls), env.total)))

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        self.states.append([(list(e.calls), e.total) for e in self.environments])
        self.names.append([(name, type(e)) for name, e in zip(self._batch_environments, self.environments)])
        return out


def _calls(messages):
    """The arguments of every tool call in a completion's assistant turns, in order."""
    return [c["function"]["arguments"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or ()]


def _register_after(calls):
    """A fresh Register after `calls`, and the tool messages they return (a failing call's is its error)."""
    register, results = Register(), []
    register.reset()
    for arguments in calls:
        try:
            content = str(register.add(**arguments))
        except Exception as err:
            content = str({"error": str(err)})
        results.append({"role": "tool", "name": "add", "content": content})
    return register, results


def _check_register_row(messages, model_row, state, budget):
    """Each tool result is the register after the calls up to it (so a branch's results after its prefix are
    right only if its environment replayed the prefix); the row's environment holds the calls its results show,
    plus the last turn's calls when their results did not fit (run, then dropped, as in TRL); one run of tool
    tokens per round, within budget."""
    calls, results = _calls(messages), [m for m in messages if m["role"] == "tool"]
    shown, expected = _register_after(calls[:len(results)])
    assert results == expected
    dropped, _ = _register_after(calls)
    assert state in ((shown.calls, shown.total), (dropped.calls, dropped.total) if messages[-1].get("tool_calls")
                     else None)
    assert _tool_spans(model_row) == _tool_rounds(messages) <= budget


def _rewards(states):
    def rewards(k, messages):
        envs = [types.SimpleNamespace(total=total) for _, total in states[k]]
        return [answer + 0.1 * len(calls)
                for answer, (calls, _) in zip(states_the_register(messages, envs), states[k])]
    return rewards


def train_env(tool_model, tmp_path, budget, steps, factory=Register, **config):
    return train_tools(tool_model, tmp_path, budget, steps, trainer_cls=EnvRecorder,
                       reward_funcs=states_the_register, setup={"environment_factory": factory}, **config)


@pytest.mark.parametrize("mode", ["resample", "topk"])
def test_branches_replay_their_prefix_on_their_environment_and_train_on_the_oracle(tool_model, tmp_path, mode):
    trainer = train_env(tool_model, tmp_path, budget=2, steps=4, num_iterations=2, beta=0.05, appo_branch_mode=mode)
    if mode == "topk":
        check_topk_forks(trainer, "best")
    states = trainer.states
    later = check_tool_batches(
        trainer, tool_model[1], mode,
        check_row=lambda k, r, messages, model_row: _check_register_row(messages, model_row, states[k][r], 2),
        rewards=_rewards(states))
    # right after its replay, a branch's environment is in the state of a fresh one after its prefix's calls,
    # which are the first calls its parent's environment got
    replayed = 0
    for k, row, parent, prefix_calls, (calls, total) in trainer.replayed:
        register, _ = _register_after(prefix_calls)
        assert (calls, total) == (register.calls, register.total)
        assert calls == states[k][parent][0][:len(calls)]
        replayed += bool(prefix_calls)
    assert replayed == later                         # every fork inside a later turn replayed its prefix
    check_losses(trainer)
    assert any(h.get("rewards/Register/mean", 0) > 0 for h in trainer.state.log_history)   # get_reward's column


def test_the_tool_budget_counts_the_replayed_prefix(tool_model, tmp_path):
    trainer = train_env(tool_model, tmp_path, budget=1, steps=2, beta=0.0)
    refused = 0
    for k, row, parent, prefix_calls, (calls, _) in trainer.replayed:
        messages = trainer.tool_results[k][1][row]
        _check_register_row(messages, trainer.tool_results[k][0][row], trainer.states[k][row], budget=1)
        if prefix_calls:                            # a call left unrun, and the environment did not get it
            refused += bool(messages[-1].get("tool_calls"))
            assert trainer.states[k][row][0] == calls
    assert refused, "no branch after a tool round asked for another call: the test checks nothing"
    # evaluation: the same loop, each row on its own environment, without forks
    trainer.evaluate(datasets.Dataset.from_dict({"prompt": PROMPTS}))
    (tree, _), (model_rows, messages) = trainer.batches[-1], trainer.tool_results[-1][:2]
    assert all(p == -1 for p in tree["appo_parent"]) and sum(map(_tool_rounds, messages)) > 0
    for m, row, state in zip(messages, model_rows, trainer.states[-1]):
        _check_register_row(m, row, state, budget=1)


class Calculator(Register):
    """Stateless: `add` returns a + b whatever came before (and records the call)."""

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        self.calls.append((a, b))
        return a + b


def test_a_dict_of_environments_routes_each_group_to_its_own(tool_model, tmp_path):
    # TRL's multi-environment form: an `environment` column names each example's environment; the branches of a
    # group run on (and replay into) instances of that group's environment
    dataset = datasets.Dataset.from_dict({"prompt": PROMPTS, "environment": ["register", "calculator"]})
    trainer = train_tools(tool_model, tmp_path, budget=2, steps=2, trainer_cls=EnvRecorder, beta=0.0,
                          reward_funcs=states_the_register, setup={"train_dataset": dataset, "environment_factory": {
                              "register": Register, "calculator": Calculator}})
    kinds = {"register": Register, "calculator": Calculator}
    seen = set()
    for k, names in enumerate(trainer.names):
        model_rows, messages = trainer.tool_results[k][:2]
        for r, (name, kind) in enumerate(names):
            assert kind is kinds[name] and name == names[r - r % 4][0]      # one environment per group
            calls = _calls(messages[r])
            results = [m["content"] for m in messages[r] if m["role"] == "tool"]
            if name == "register":
                _check_register_row(messages[r], model_rows[r], trainer.states[k][r], budget=2)
            else:
                assert results == [str(c["a"] + c["b"]) for c in calls[:len(results)]]
            seen.add((name, bool(results)))
    assert {("register", True), ("calculator", True)} <= seen
    assert any(prefix_calls for _, _, _, prefix_calls, _ in trainer.replayed)


class Observed:
    """No tools: reset() adds an observation to the prompt and get_reward scores the rollout."""

    def reset(self, **example):
        self.resets = getattr(self, "resets", 0) + 1
        return " Go."

    def get_reward(self) -> float:
        return float(self.resets)


def _length(completions, **_):
    return [len(c[-1]["content"]) / 64 for c in completions]


def test_an_environment_without_tools_trains_single_turn(tool_model, tmp_path):
    trainer = train_tools(tool_model, tmp_path, budget=2, steps=1, trainer_cls=ToolRecorder, beta=0.0,
                          reward_funcs=_length, setup={"environment_factory": Observed})
    (tree, out), = trainer.batches
    assert not trainer.tool_results and any(p >= 0 for p in tree["appo_parent"])
    assert tool_model[1].decode(out["prompt_ids"][0]).count("Go.") == 1
    assert any("rewards/Observed/mean" in h for h in trainer.state.log_history)


class Drifting(Register):
    """Not deterministic: `add` also counts the calls every instance ever got, so a replay returns another value."""
    count = 0

    def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        Drifting.count += 1
        return super().add(a, b) + Drifting.count


class Numbered(Register):
    """Not deterministic: reset() numbers its observation, so the rows of a group see different prompts."""
    count = 0

    def reset(self, **kwargs):
        super().reset()
        Numbered.count += 1
        return f" ({Numbered.count})"


class AsyncRegister(Register):
    async def add(self, a: int, b: int) -> int:
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return a + b


def test_environment_errors(tool_model, tmp_path):
    with pytest.raises(RuntimeError, match=r"environment_factory: a branch \(row \d+\) replays its prefix's tool "
                                           r"calls .* APPOTrainer needs environments whose reset\(\) and methods "
                                           r"are deterministic"):
        train_env(tool_model, tmp_path, budget=2, steps=1, factory=Drifting)
    with pytest.raises(ValueError, match=r"whole groups of num_generations=4 .* With environment_factory, a prompt "
                                         r"includes its environment's reset\(\) observation"):
        train_env(tool_model, tmp_path, budget=2, steps=1, factory=Numbered)
    path, tok = tool_model
    with pytest.raises(NotImplementedError, match="environment_factory: AsyncRegister.add is async"):
        APPOTrainer(model=path, reward_funcs=states_the_register, processing_class=tok,
                    environment_factory=AsyncRegister,
                    args=APPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                                    use_cpu=True, report_to="none"),
                    train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))


def test_the_docs_tool_and_environment_examples_run():
    """The environment example continues the tool example (same tokenizer and model): both run in one
    interpreter, as the page says."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text()
    blocks = [re.search(r"```python\n(.*?)```", text.split(heading)[1], flags=re.DOTALL).group(1)
              for heading in ("### Multi-turn tools: an example that runs", "### Environments: an example that runs")]
    run = subprocess.run([sys.executable, "-c", "\n".join(blocks)], capture_output=True, text=True, timeout=600,
                         check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert any("tools/call_frequency" in line and not line.startswith("env") for line in lines)
    assert any(line.startswith("env") and "rewards/Register/mean" in line for line in lines)
