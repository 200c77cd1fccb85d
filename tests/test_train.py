"""The reference trainer (python/appo_train): tasks and rewards, KV-cache generation with the tool loop,
each algorithm's rollouts and advantages, exact resume, and the CLI end to end (tiny configurations)."""
import copy
import json
import math
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import oracle
import pytest
import torch

import appo_kernels as ak

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from appo_train import algorithms, cli
from appo_train.cli import SMOKE, compare_parser, main, report_parser, train_parser
from appo_train.policy import (
    GEN,
    PROMPT,
    TOOL,
    PolicyConfig,
    Rollout,
    build_policy,
    generate,
    pad_batch,
    start_rollout,
    token_logits,
)
from appo_train.tasks import (
    LIMITS,
    MISTAKES,
    decision_positions,
    demonstrations,
    make_task,
    score_response,
    solution_trace,
)
from appo_train.tokenizer import CharTokenizer
from appo_train.trainer import TrainConfig, Trainer, backend_in_use

ROOT = Path(__file__).resolve().parents[1]
TOK = CharTokenizer()
TINY = PolicyConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)


def smoke_config(tmp_path, **over) -> TrainConfig:
    kw = dict(SMOKE) | {"out_dir": str(tmp_path / "run"), "sft_cache": str(tmp_path / "sft.pt")}
    return TrainConfig(**(kw | over))


def test_tokenizer_round_trip_and_rejection():
    text = "<bos>ax*bo?<call>kv ax</call><res>47</res><ans>-12 q<eos>"
    ids = TOK.encode(text)
    assert TOK.decode(ids) == text
    assert ids[0] == TOK.bos_id and TOK.pad_id == 0 and len(set(TOK.vocab)) == TOK.vocab_size
    with pytest.raises(ValueError, match=r"'A' at index 1"):
        TOK.encode("aAb")


def test_tools_and_reward_shape():
    task = make_task(random.Random(3))
    key = task.keys[0]
    assert task.tool(f"kv {key}") == task.table[key]
    assert task.tool("kv zz" if "zz" not in task.table else "kv yy") == "none"
    assert task.tool("calc 12*-3") == "-36" and task.tool("calc 1/2") == "err" and task.tool("kv") == "err"
    gold = solution_trace(task, random.Random(0))
    ep = score_response(task, gold)
    assert ep.success and ep.well_formed and ep.reward == pytest.approx(1.1)     # F1 1 + both tools 0.1
    assert ep.answer == task.answer
    no_tools = score_response(task, f"<ans>{task.answer}<eos>")
    assert no_tools.success and no_tools.reward == pytest.approx(1.0)            # no tool bonus
    for bad in ("", f"<ans>{task.answer}", f"{task.answer}<eos>", "<call>kv ab</call><ans>1<eos>",
                f"<call>kv {key}</call><res>1</res><ans><eos>", "<call>oops</call><res>err</res><ans>1<eos>"):
        assert score_response(task, bad).reward == -1.0, bad
    for mistake in MISTAKES["easy"]:
        wrong = solution_trace(task, random.Random(1), mistake)
        ep = score_response(task, wrong)
        assert ep.well_formed and ep.reward > -1.0, (mistake, wrong)


def _prompt(task):
    ids = [TOK.bos_id] + TOK.encode(task.prompt)
    return ids, [PROMPT] * len(ids)


def test_branch_prefix_reuses_tool_results_and_counts_the_budget():
    task = make_task(random.Random(4))
    ids, kinds = _prompt(task)
    call = [TOK.call_id] + TOK.encode(f"kv {task.keys[0]}") + [TOK.end_call_id]
    r = start_rollout(0, ids + call, kinds + [GEN] * len(call), len(ids), [task], TOK, budget=3)
    assert r.calls == 1
    assert TOK.decode(r.tokens[len(ids) + len(call):]) == f"<res>{task.table[task.keys[0]]}</res>"
    assert r.kinds[-1] == TOOL and r.pending == r.tokens                    # the whole prefix is fed once
    over = start_rollout(0, ids + call, kinds + [GEN] * len(call), len(ids), [task], TOK, budget=0)
    assert TOK.decode(over.tokens[-5:]) == "<res>err</res>"


def test_kv_cache_generation_matches_a_full_forward():
    # Left-padded chunks, masked padding inside the sequence, tool results fed mid-generation, rows of
    # different lengths (prompts and branch prefixes) and cache compaction: every greedy token must be the
    # argmax of a plain full-sequence forward at its position.
    model = build_policy(TOK, TINY, seed=1).eval()
    rng = random.Random(0)
    tasks = [make_task(rng) for _ in range(5)]
    demo = [solution_trace(t, rng) for t in tasks]
    rows = algorithms.prompt_rows(tasks, 2, TOK, 3, key=("test",))
    for i in range(3):                                   # branch-like rows: a demonstration prefix
        ids, kinds = _prompt(tasks[i])
        resp = TOK.encode(demo[i])
        cut = 4 + 5 * i
        rows.append(start_rollout(i, ids + resp[:cut], kinds + [GEN] * cut, len(ids), tasks, TOK, 3))
    before = [len(r.tokens) for r in rows]
    generate(model, rows, tasks, TOK, max_new=40, budget=3, greedy=True)
    tokens, attention, kinds = pad_batch(rows, TOK.pad_id)
    with torch.no_grad():
        logits = token_logits(model, tokens, attention)
    checked = 0
    for i, r in enumerate(rows):
        for t in range(before[i], len(r.tokens)):
            if r.kinds[t] == GEN:
                assert float(logits[i, t].max() - logits[i, t, r.tokens[t]]) < 1e-4, (i, t)
                checked += 1
        assert r.num_generated <= 40 and (r.truncated or r.tokens[-1] == TOK.eos_id)
        for call, result in score_response(tasks[r.task], TOK.decode(r.tokens[r.prompt_len:])).calls:
            assert result in (tasks[r.task].tool(call), "err")
    assert checked > 100


def test_sampling_is_deterministic_and_independent_of_the_batch():
    # Each row has its own random stream: the same rows sampled together, in another order, or in two
    # halves give the same tokens (what makes sharding prompts over ranks exact).
    model = build_policy(TOK, TINY, seed=2)
    rng = random.Random(5)
    tasks = [make_task(rng) for _ in range(4)]

    def sample(seed, groups):
        rows = algorithms.prompt_rows(tasks, 3, TOK, 3, (seed,), groups)
        generate(model, rows, tasks, TOK, max_new=30, budget=3)
        return {(r.task, r.seed): r.tokens for r in rows}
    together = sample(7, [0, 1, 2, 3])
    assert together == sample(7, [3, 1, 0, 2]) == sample(7, [0, 2]) | sample(7, [1, 3])
    assert together != sample(8, [0, 1, 2, 3])


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A smoke-sized warm-started trainer (shared: the warm start is the slow part)."""
    tmp = tmp_path_factory.mktemp("warm")
    return Trainer(smoke_config(tmp), progress=False)


def _collect(trainer, algo, omega_model=None, **over):
    cfg = replace(trainer.cfg, algo=algo, **over)
    tasks = [make_task(random.Random(11 + i)) for i in range(cfg.prompts_per_step)]
    return cfg, algorithms.algorithm(algo).collect(cfg, trainer.model, tasks, TOK, (0, 0), omega_model=omega_model)


@pytest.mark.parametrize("algo", ["appo", "appo-entropy"])
def test_appo_rollout_trees(warm, algo):
    prev = build_policy(TOK, warm.cfg.policy, seed=5).eval()            # a policy that differs: Omega != 1
    cfg, batch = _collect(warm, algo, prev)
    n, p = cfg.rollouts_per_prompt, cfg.prompts_per_step
    assert len(batch.rows) == n * p and int(batch.is_branch.sum()) == (n // 2) * p
    assert (batch.scores.omega is None) == (algo == "appo-entropy")
    eligible = algorithms.branch_eligible(*pad_batch(batch.rows[:p * n // 2], TOK.pad_id)[::2], TOK,
                                          cfg.max_new_tokens)
    for b, (i, t) in zip(batch.rows[p * n // 2:], batch.forks):
        parent = batch.rows[i]
        assert b.parent == i and b.split == t and b.task == parent.task
        assert b.tokens[:t + 1] == parent.tokens[:t + 1] and b.kinds[:t + 1] == parent.kinds[:t + 1]
        assert parent.kinds[t] == GEN and bool(eligible[i, t])
    adv, loss_mask = algorithms.algorithm(algo).advantages(replace(cfg, train_branches=False), batch)
    assert not loss_mask[batch.is_branch].any()              # SPEC 5's default: branches give signal, not gradient
    assert torch.equal(loss_mask[~batch.is_branch], batch.gen_mask[~batch.is_branch])
    assert torch.all(adv[~loss_mask] == 0)


def test_appo_can_train_branch_continuations(warm):
    cfg, batch = _collect(warm, "appo")
    cfg = replace(cfg, train_branches=True)
    _, loss_mask = algorithms.algorithm("appo").advantages(cfg, batch)
    pos = torch.arange(loss_mask.shape[1])
    expect = batch.gen_mask & (~batch.is_branch[:, None] | (pos[None] > batch.split[:, None]))
    assert torch.equal(loss_mask, expect)


def test_arpo_forks_only_after_tool_results(warm):
    cfg, batch = _collect(warm, "arpo")
    n = cfg.rollouts_per_prompt
    assert all(sum(r.task == g for r in batch.rows) == n for g in range(cfg.prompts_per_step))
    for i, t in batch.forks:
        r = batch.rows[i]
        assert r.kinds[t] == TOOL and r.tokens[t] == TOK.end_res_id and r.kinds[t + 1] == GEN
    adv, loss_mask = algorithms.algorithm("arpo").advantages(cfg, batch)
    expected = torch.tensor([e.reward for e in batch.episodes])
    for g in range(cfg.prompts_per_step):                    # plain GRPO advantages over all rollouts
        sel = batch.group == g
        z = (expected[sel] - expected[sel].mean()) / (expected[sel].std(unbiased=False) + 1e-6)
        rows = torch.nonzero(sel).flatten()
        for k, row in enumerate(rows):
            vals = adv[row][loss_mask[row]]
            assert torch.allclose(vals, torch.full_like(vals, float(z[k])), atol=1e-5)


def test_grpo_spends_the_budget_on_full_rollouts(warm):
    cfg, batch = _collect(warm, "grpo")
    assert len(batch.rows) == cfg.rollouts_per_prompt * cfg.prompts_per_step and not batch.is_branch.any()


def _state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _strip(records):
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_a_finished_run_extends_exactly(tmp_path):
    # 4 steps in one go versus 2 steps, then the same run asked to go on to 4: same weights, same metrics.
    long = dict(token_budget=10**9)
    full = Trainer(smoke_config(tmp_path, out_dir=str(tmp_path / "a"), max_steps=4, **long), progress=False)
    full.run()
    Trainer(smoke_config(tmp_path, out_dir=str(tmp_path / "b"), max_steps=2, **long), progress=False).run()
    resumed = Trainer(smoke_config(tmp_path, out_dir=str(tmp_path / "b"), max_steps=4, **long), progress=False)
    assert resumed.step == 2
    resumed.run()
    a, b = _state(full), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _strip(full.records) == _strip(resumed.records) and len(full.records) == 5


def test_a_killed_run_resumes_and_loses_no_finished_step(tmp_path):
    args = ["--smoke", "--no-progress", "--max-steps", "6", "--token-budget", "1000000000"]
    assert _run(*args, "--out", str(tmp_path / "a"), cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "appo_train", *args, "--out", str(tmp_path / "b")],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:      # steps 0..3 logged
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"]
    assert 1 <= killed_at < 6
    assert _run(*args, "--out", str(tmp_path / "b"), cwd=tmp_path).returncode == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(7)) and _strip(lines) == _strip(a["records"])


def test_resume_refuses_a_different_configuration(tmp_path):
    Trainer(smoke_config(tmp_path, max_steps=1), progress=False).run()
    Trainer(smoke_config(tmp_path, max_steps=2), progress=False)            # a new stopping point is fine
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(smoke_config(tmp_path, max_steps=1, lr=1e-3), progress=False)


@pytest.mark.parametrize("over, match", [
    ({"algo": "ppo"}, "algo: expected one of"),
    ({"omega_source": "old"}, "omega_source"),
    ({"rollouts_per_prompt": 5}, "rollouts_per_prompt"),
    ({"task": "medium"}, r"task: expected one of \('easy', 'hard'\), got 'medium'"),
    ({"branch_mode": "swap"}, "branch_mode: expected one of"),
    ({"topk_choice": "worst"}, "topk_choice: expected one of"),
    ({"branch_topk": 1}, "branch_topk: expected >= 2"),
])
def test_config_rejects_bad_values(tmp_path, over, match):
    with pytest.raises(ValueError, match=match):
        smoke_config(tmp_path, **over)


def test_each_task_family_has_its_limits(tmp_path):
    hard = smoke_config(tmp_path, task="hard")
    assert (hard.tool_budget, hard.max_new_tokens) == (8, 96) == tuple(LIMITS["hard"].values())
    assert (smoke_config(tmp_path).tool_budget, smoke_config(tmp_path).max_new_tokens) == (3, 64)
    assert smoke_config(tmp_path, task="hard", tool_budget=5).tool_budget == 5


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "appo_train", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, check=False)


def test_cli_smoke_run_writes_metrics_plots_and_report(tmp_path):
    out = _run("--smoke", "--no-progress", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("metrics.jsonl", "metrics.csv", "training_curves.png", "report.html", "checkpoint.pt",
                 "samples.json", "config.json"):
        assert (run / name).stat().st_size > 0, name
    assert "success_before" in out.stdout and str(run / "report.html") in out.stdout
    assert "this invocation: 5 RL steps" in out.stdout
    backend = backend_in_use("auto")
    assert out.stdout.startswith(f"appo-train: appo_kernels backend {backend} (")     # said at start ...
    assert f"| {backend} |" in out.stdout                                            # ... and in the summary
    # `report` rebuilds the run's own report: held-out success, the headline, the same table
    page = (run / "report.html").read_text()
    assert "Held-out success (sampled at temperature 1.0) went from" in page and "<th>success_before</th>" in page
    assert main(["report", "--out", str(run)]) == 0
    assert (run / "report.html").read_text() == page
    # Started again, the finished run trains nothing and says so (no wall time of this call beside rl_minutes).
    again = _run("--smoke", "--no-progress", "--out", str(run), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the run had already finished (step 5); nothing was trained" in again.stdout
    assert "this invocation" not in again.stdout and "| minutes" not in again.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["gen_tokens"] >= SMOKE["token_budget"] > records[-2]["gen_tokens"]
    samples = json.loads((run / "samples.json").read_text())
    assert any(t["branch_point"] for s in samples for t in s["tokens"])       # APPO's forks are in the report


def test_cli_compare_writes_a_results_table(tmp_path):
    out = _run("compare", "--smoke", "--no-progress", "--seeds", "0", "1", "--algos", "grpo", "appo",
               "--out", str(tmp_path / "cmp"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    table = (tmp_path / "cmp" / "results.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| grpo | 2 |") and table[3].startswith("| appo | 2 |")
    runs = json.loads((tmp_path / "cmp" / "results.json").read_text())["runs"]
    assert sorted((r["algo"], r["seed"]) for r in runs) == [("appo", 0), ("appo", 1), ("grpo", 0), ("grpo", 1)]
    assert all(r["gen_tokens"] >= SMOKE["token_budget"] for r in runs)
    assert (tmp_path / "cmp" / "comparison.png").stat().st_size > 0


def test_more_ranks_than_prompts_is_refused(tmp_path, monkeypatch):
    import appo_train.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "world", lambda: (0, 8))
    with pytest.raises(ValueError, match=r"prompts_per_step: expected at least one prompt per rank \(8 ranks\)"):
        Trainer(smoke_config(tmp_path), progress=False)


def test_report_of_a_missing_directory_is_a_one_line_error(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(tmp_path / "missing")])
    assert str(e.value) == f"appo-train report: --out: {tmp_path / 'missing'} is not a directory"


def test_help_lists_the_commands_and_states_every_default_truly(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "appo-train compare" in text and "appo-train report --out DIR" in text
    defaults = TrainConfig()
    for parser in (train_parser(), compare_parser(), report_parser()):
        for action in parser._actions:
            if action.dest == "help":
                continue
            assert action.required or "default" in action.help, (parser.prog, action.option_strings)
            if action.const is not None and hasattr(defaults, action.dest):   # a switch: says what it changes
                assert "(default off" in action.help and action.const != getattr(defaults, action.dest), action.dest
            elif hasattr(defaults, action.dest) and action.dest not in ("out_dir", "progress"):
                stated = re.search(r"\(default ([^;:)]+)", action.help).group(1)
                assert stated == str(getattr(defaults, action.dest)), (action.dest, stated)
                if action.dest in SMOKE:
                    assert f"; {SMOKE[action.dest]} with --smoke" in action.help, action.dest
            elif action.default not in (None, False, True):             # compare's --algos, --seeds, --out
                default = action.default if isinstance(action.default, str) else " ".join(map(str, action.default))
                assert f"(default {default})" in action.help, action.dest


def test_compare_takes_seeds_not_a_single_seed(capsys):
    assert compare_parser().parse_args(["--seeds", "3", "4"]).seeds == [3, 4]
    with pytest.raises(SystemExit):
        compare_parser().parse_args(["--seed", "3"])
    assert "unrecognized arguments: --seed 3" in capsys.readouterr().err


def test_progress_bar_shows_the_last_evaluation_between_evaluations(tmp_path, monkeypatch, warm):
    import tqdm.auto
    postfixes = []

    class Bar:                                          # records what the trainer shows
        def __init__(self, iterable=None, **kw):
            self.iterable, self.n = iterable, 0

        def __iter__(self):
            return iter(self.iterable)

        def update(self, n):
            self.n += n

        def set_postfix(self, **kw):
            postfixes.append(kw)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    trainer = Trainer(smoke_config(tmp_path, sft_cache=warm.cfg.sft_cache, max_steps=3, eval_every=2,
                                   token_budget=10**9), progress=True)
    trainer.run()
    evals = {r["step"]: r["eval_success"] for r in trainer.records if "eval_success" in r}
    assert list(evals) == [0, 2, 3]                     # step 1 has no evaluation: it shows step 0's
    assert [p["eval"] for p in postfixes if "step" in p] == [f"{evals[0]:.2f}", f"{evals[2]:.2f}", f"{evals[3]:.2f}"]


def test_a_missing_extra_stops_the_run_before_training(monkeypatch):
    import appo_train.trainer as trainer_module
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # what an environment without it looks like
    monkeypatch.setattr(trainer_module, "Trainer", lambda *a, **k: pytest.fail("started training"))
    for command in ([], ["compare"]):
        with pytest.raises(SystemExit, match=r"matplotlib not installed; the trainer needs the \[train\] extra"):
            main([*command, "--smoke"])


def test_the_backend_line_says_why_auto_fell_back_to_torch(monkeypatch):
    import appo_train.trainer as trainer_module
    monkeypatch.setattr(trainer_module, "backend_in_use", lambda requested: "torch")
    assert "the compiled native backend is not importable from there" in cli._backend_line("auto")
    assert cli._backend_line("torch").startswith("appo-train: appo_kernels backend torch (")
    assert "not importable" not in cli._backend_line("torch")                     # asked for: nothing to explain
    monkeypatch.undo()
    with pytest.raises(SystemExit, match=r"^appo-train: --backend: "):
        cli._backend_line("cuda-please")


# --- the hard task family, contrastive top-k branches and the switches of docs/trainer.md -----------------

def test_hard_tasks_chain_4_to_6_calls_keep_the_decoy_and_can_be_repaired():
    rng = random.Random(0)
    for _ in range(200):
        task = make_task(rng, "hard")
        assert 3 <= sum(map(len, task.chains)) <= 5 and len(task.chains) == len(task.keys)
        for chain in task.chains:                      # each value names the next key, the last is a number
            assert [task.table[k] for k in chain[:-1]] == list(chain[1:]) and task.table[chain[-1]].isdigit()
        gold = solution_trace(task, random.Random(1))
        ep = score_response(task, gold)
        assert ep.success and 4 <= len(ep.calls) <= 6 and gold[-len("<eos>") - 2] == " "     # the sign-off letter
        repaired = score_response(task, solution_trace(task, random.Random(2), "repair"))
        assert repaired.success and len(repaired.calls) == len(ep.calls) + 1       # a wrong read, then the right one
        wrong = score_response(task, solution_trace(task, random.Random(3), "key"))
        assert wrong.well_formed and len(wrong.calls) <= LIMITS["hard"]["tool_budget"]
    demos = demonstrations(400, seed=0, mistake_rate=0.35, family="hard")
    assert 0.55 < sum(score_response(t, r).success for t, r in demos) / 400 < 0.85


def test_decision_positions_mark_tool_names_keys_operands_and_the_answer():
    text = "<call>kv ab</call><res>cd</res><call>calc 47*-5</call><res>-235</res><ans>-235 q<eos>"
    pieces = [TOK.token_text(i) for i in TOK.encode(text)]
    marked = "".join(pieces[i] for i in sorted(decision_positions(pieces)))
    assert marked == "kab" + "c47*-5" + "-235"                 # not the result "cd", not the sign-off "q"
    assert all(pieces[i] != " " for i in decision_positions(pieces))


def test_no_forks_after_the_answer_started():
    text = "<call>kv ab</call><res>cd</res><ans>12 q<eos>"
    ids = [TOK.bos_id] + TOK.encode("ab+1?" + text)
    r = Rollout(0, ids, [PROMPT] * 6 + [GEN if k == "gen" else TOOL for k in _kinds(text)], 6)
    tokens, _, kinds = pad_batch([r], TOK.pad_id)
    every = algorithms.branch_eligible(tokens, kinds, TOK, 64)
    before = algorithms.branch_eligible(tokens, kinds, TOK, 64, after_answer=False)
    ans = ids.index(TOK.ans_id)
    assert torch.equal(before[0, :ans + 1], every[0, :ans + 1]) and before[0, ans]      # <ans> itself may fork
    assert every[0, ans + 1:].sum() == 4 and not before[0, ans + 1:].any()            # "12 q": forbidden


def _kinds(text):
    """'gen' / 'tool' for each token of a response text."""
    out, tool = [], False
    for i in TOK.encode(text):
        tool = tool or i == TOK.res_id
        out.append("tool" if tool else "gen")
        tool = tool and i != TOK.end_res_id
    return out


def test_forks_respect_the_after_answer_switch(warm):
    cfg, batch = _collect(warm, "appo")
    cfg_off = replace(cfg, forks_after_answer=False)
    tasks = batch.tasks
    off = algorithms.algorithm("appo").collect(cfg_off, warm.model, tasks, TOK, (0, 0))
    late = [t > batch.rows[i].tokens.index(TOK.ans_id) for i, t in batch.forks if TOK.ans_id in batch.rows[i].tokens]
    assert any(late)                                   # the paper's rule forks after the answer here ...
    for i, t in off.forks:                             # ... the switch never does
        toks = off.rows[i].tokens
        assert TOK.ans_id not in toks or t <= toks.index(TOK.ans_id)


def test_topk_branches_differ_from_their_parent_exactly_at_the_fork(warm):
    cfg, batch = _collect(warm, "appo", build_policy(TOK, warm.cfg.policy, seed=5).eval(), branch_mode="topk")
    n_init = len(batch.rows) - len(batch.forks)
    assert batch.substituted and batch.scores.topk_ids.shape[-1] == cfg.branch_topk
    for b, (i, t) in zip(batch.rows[n_init:], batch.forks):
        parent = batch.rows[i]
        assert b.parent == i and b.split == t - 1
        assert b.tokens[:t] == parent.tokens[:t] and b.kinds[:t] == parent.kinds[:t]    # the prefix, unchanged
        assert b.tokens[t] != parent.tokens[t] and b.kinds[t] == GEN                     # the substituted token
        best = next(x for x in batch.scores.topk_ids[i, t].tolist() if x != parent.tokens[t])
        assert b.tokens[t] == best                                                        # topk_choice "best"


def test_a_branch_budget_counts_its_prefix_calls():
    task = make_task(random.Random(4))
    ids, kinds = _prompt(task)
    call = [TOK.call_id] + TOK.encode(f"kv {task.keys[0]}") + [TOK.end_call_id]
    done = call + TOK.encode(f"<res>{task.table[task.keys[0]]}</res>")
    parent = start_rollout(0, ids + done + done, kinds + [GEN] * len(call) + [TOOL] * (len(done) - len(call))
                           + [GEN] * len(call) + [TOOL] * (len(done) - len(call)), len(ids), [task], TOK, budget=3)
    parent.tokens += [TOK.call_id] + TOK.encode("kv ab")
    parent.kinds += [GEN] * 6
    at = len(parent.tokens) - 1                        # the last token of a third call's body: "b"
    for token in (None, TOK.end_call_id):              # resample keeps "b"; topk puts </call> there
        b = algorithms.fork([parent], 0, at, [task], TOK, budget=2, seed=0, token=token)
        assert b.calls == (2 if token is None else 3)
        assert b.tokens[:at] == parent.tokens[:at]
    assert TOK.decode(b.tokens[-5:]) == "<res>err</res>"          # the third call is over the budget of 2


def test_substituted_tokens_leave_the_loss_unless_asked(warm):
    cfg, batch = _collect(warm, "appo", branch_mode="topk")
    branch_rows = torch.nonzero(batch.is_branch).flatten().tolist()
    appo = algorithms.algorithm("appo")
    for train_substituted in (False, True):
        adv, loss_mask = appo.advantages(replace(cfg, train_substituted=train_substituted), batch)
        ref_adv, ref_mask = appo.advantages(replace(cfg, branch_mode="resample"), replace(batch, substituted=False))
        for r in branch_rows:
            s = int(batch.split[r]) + 1                # the substituted token
            assert bool(loss_mask[r, s]) == train_substituted and bool(ref_mask[r, s])
            assert torch.equal(loss_mask[r, s + 1:], ref_mask[r, s + 1:])               # its continuation trains
            assert float(adv[r, s]) == (float(ref_adv[r, s]) if train_substituted else 0.0)
        others = torch.ones_like(loss_mask)
        others[branch_rows, batch.split[branch_rows] + 1] = False
        assert torch.equal(loss_mask & others, ref_mask & others)


def _oracle_scores(entropy, ratio, eligible, own_term):
    """Float64 Branching Score per rollout from the oracle's Omega gain, with or without token t's own term."""
    out = []
    for h, r, e in zip(entropy.tolist(), ratio.tolist(), eligible.tolist()):
        _, gain = oracle.future_values_rollout(r, [0.0] * len(r), [1] * len(r))
        omega = [min(max(math.exp(min(max(g - (0.0 if own_term else x), -20), 20)), 0.8), 1.2)
                 for g, x in zip(gain, r)]
        zh, zo = oracle.zscore(h, e), oracle.zscore(omega, e)
        out.append([zh[t] * zo[t] if e[t] else -math.inf for t in range(len(r))])
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("own_term", [True, False])
def test_omega_with_and_without_token_ts_own_term_against_the_oracle(warm, own_term):
    cfg = replace(warm.cfg, omega_own_term=own_term)
    tasks = [make_task(random.Random(11 + i)) for i in range(cfg.prompts_per_step)]
    rows = generate(warm.model, algorithms.prompt_rows(tasks, 4, TOK, 3, ("omega",)), tasks, TOK, max_new=64,
                    budget=3)
    tokens, attention, kinds = pad_batch(rows, TOK.pad_id)
    gen = kinds == GEN
    eligible = algorithms.branch_eligible(tokens, kinds, TOK, 64)
    prev = copy.deepcopy(warm.model)                   # the policy "before the last update": close to it
    with torch.no_grad():
        for w in prev.parameters():
            w.add_(0.02 * torch.randn(w.shape, generator=torch.Generator().manual_seed(w.numel())))
        logits = token_logits(warm.model, tokens, attention).double()
        logp_old = algorithms.policy_token_stats(prev, tokens, attention, gen, cfg.backend).logp.double()
    sc = algorithms.appo_scores(cfg, logits, tokens, attention, gen, eligible, logp_old)
    st = ak.token_stats(logits, tokens, mask=gen)
    ratio = torch.where(gen, st.logp - logp_old, 0.0)
    expect = _oracle_scores(st.entropy, ratio, eligible, own_term)
    assert (expect - _oracle_scores(st.entropy, ratio, eligible, not own_term)).nan_to_num().abs().max() > 0.1
    finite = torch.isfinite(expect)
    assert torch.equal(torch.isfinite(sc.score), finite)
    torch.testing.assert_close(sc.score[finite], expect[finite], atol=1e-7, rtol=1e-7)
    assert torch.equal(sc.logp, torch.where(gen, sc.logp, 0.0)) and torch.all(sc.omega[~gen] == 0)


def test_omega_against_the_reference_policy(tmp_path, warm, monkeypatch):
    # --omega-source reference: Omega's logp_old comes from the frozen warm start, also after updates.
    trainer = Trainer(smoke_config(tmp_path, sft_cache=warm.cfg.sft_cache, omega_source="reference", max_steps=2,
                                   token_budget=10**9), progress=False)
    seen = []
    collect = algorithms.APPO.collect
    monkeypatch.setattr(algorithms.APPO, "collect", lambda *a, **k: seen.append(a[-1]) or collect(*a, **k))
    trainer.train_step()
    trainer.train_step()
    assert seen == [trainer.ref, trainer.ref]
    assert any(not torch.equal(p, q) for p, q in zip(trainer.model.parameters(), trainer.ref.parameters()))


def test_decision_forks_are_counted(tmp_path, warm):
    trainer = Trainer(smoke_config(tmp_path, sft_cache=warm.cfg.sft_cache, max_steps=1, token_budget=10**9),
                      progress=False)
    record, batch, _ = trainer.train_step()
    expect = sum(t - batch.rows[i].prompt_len in decision_positions(
        [TOK.token_text(x) for x in batch.rows[i].tokens[batch.rows[i].prompt_len:]]) for i, t in batch.forks)
    assert record["decision_forks"] == pytest.approx(expect / len(batch.forks))
    assert 0 <= record["decision_forks"] + record["post_answer_forks"] <= 1


def test_cli_smoke_of_the_hard_task_with_topk_branches(tmp_path):
    out = _run("--smoke", "--no-progress", "--task", "hard", "--branch-mode", "topk", "--topk-choice", "sample",
               "--token-budget", "1500", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["decision_forks"] is not None for r in records[1:])
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    by_index = {s["index"]: s for s in samples}
    branches = [s for s in samples if s["is_branch"] and s["parent"] in by_index]
    assert branches
    for b in branches:
        t, parent = b["split"] + 1, by_index[b["parent"]]
        assert [x["text"] for x in b["tokens"][:t]] == [x["text"] for x in parent["tokens"][:t]]
        assert b["tokens"][t]["text"] != parent["tokens"][t]["text"]
