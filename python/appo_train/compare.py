"""The comparison protocol (docs/trainer.md, "The comparison protocol"): named arms, the two budgets, one
resumable folder per (arm, seed), and the statistics of the table: held-out success and the area under its
sample-efficiency curve per run, and paired differences (same seed, same warm start) with a 95% bootstrap
confidence interval over the seeds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Each arm fixes every setting it is named for; compare's command line sets the rest for all arms alike.
ARMS: dict[str, dict] = {
    "grpo": {"algo": "grpo"},
    "arpo": {"algo": "arpo"},
    "appo": {"algo": "appo", "branch_mode": "resample"},
    "appo-topk": {"algo": "appo", "branch_mode": "topk"},
    "appo-entropy": {"algo": "appo-entropy", "branch_mode": "resample"},
    "appo-no-prefix-credit": {"algo": "appo", "branch_mode": "resample", "prefix_credit": False},
    "appo-no-future-kl": {"algo": "appo", "branch_mode": "resample", "future_kl": False},
}
ARM_SETTINGS = ("algo", "branch_mode", "prefix_credit", "future_kl")     # not on compare's command line
BASELINES = ("grpo", "arpo")
BUDGETS = ("tokens", "rollouts")
ROLLOUT_BUDGET = 10_240        # rollouts per run under --budget rollouts: 80 steps of 8 prompts x 16
UNLIMITED_TOKENS = 10**12      # the token budget of a rollout-budget run: the rollout budget alone stops it
METRICS = (("success", "held-out success"), ("area", "area under the curve"))


def budget_config(budget: str, size: int, rollouts_per_step: int) -> dict:
    """The TrainConfig fields that give every run the budget `size` in `budget` units. A rollout budget is whole
    steps (every algorithm allots `rollouts_per_step` rollouts per step), so it must be a multiple of it."""
    if budget not in BUDGETS:
        raise ValueError(f"budget: expected one of {BUDGETS}, got {budget!r}")
    if size < 1:
        raise ValueError(f"budget size: expected a positive number of {budget}, got {size}")
    if budget == "tokens":
        return {"token_budget": size, "max_steps": None}
    if size % rollouts_per_step:
        raise ValueError(f"rollout budget: expected a multiple of the {rollouts_per_step} rollouts of one step "
                         f"(prompts_per_step x rollouts_per_prompt), got {size}")
    return {"token_budget": UNLIMITED_TOKENS, "max_steps": size // rollouts_per_step}


def check_protocol(out: Path, protocol: dict) -> None:
    """Write `out`/protocol.json, or refuse a folder whose runs were started under another protocol (their
    checkpoints would be extended or mixed with runs of a different budget)."""
    path = out / "protocol.json"
    if path.exists():
        held = json.loads(path.read_text())
        if held != protocol:
            diff = ", ".join(f"{k}={held.get(k)!r} there, {protocol.get(k)!r} now"
                             for k in sorted(set(held) | set(protocol)) if held.get(k) != protocol.get(k))
            raise ValueError(f"out: {out} holds a comparison under another protocol ({diff}); use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(protocol, indent=1) + "\n")


def load_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def finished(records: list[dict], token_budget: int, max_steps: int | None) -> bool:
    """Whether a run's last record reached its budget (a run that is not is resumed from its checkpoint)."""
    if not records:
        return False
    last = records[-1]
    return last["gen_tokens"] >= token_budget or (max_steps is not None and last["step"] >= max_steps)


def curve(records: list[dict], budget: str, rollouts_per_step: int) -> tuple[np.ndarray, np.ndarray]:
    """A run's sample-efficiency curve: held-out success at each evaluation (step 0 included) against the
    budget's unit, generated tokens or rollouts."""
    evals = [r for r in records if "eval_success" in r]
    x = [r["gen_tokens"] if budget == "tokens" else r["step"] * rollouts_per_step for r in evals]
    return np.array(x, dtype=float), np.array([r["eval_success"] for r in evals], dtype=float)


def area(x: np.ndarray, y: np.ndarray, budget: float) -> float:
    """Area under the piecewise-linear curve (x, y) over [0, budget], divided by `budget`: the curve's mean over
    the budget (a curve at a constant c has area c). The curve must start at 0 and reach the budget."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2 or np.any(np.diff(x) <= 0):
        raise ValueError(f"area: expected at least 2 points with increasing x, got x={x.tolist()}")
    if x[0] != 0 or x[-1] < budget:
        raise ValueError(f"area: the curve must span [0, {budget}], it spans [{x[0]}, {x[-1]}]")
    inside = x < budget
    xs = np.append(x[inside], budget)
    ys = np.append(y[inside], np.interp(budget, x, y))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2) / budget)


def paired_bootstrap(diffs, level: float = 0.95, resamples: int = 20_000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the per-seed differences and its percentile bootstrap interval at
    `level`, resampling the seeds with replacement (`resamples` draws from a fixed stream, so the interval is
    the same on every call). With few seeds the interval is narrower than the truth; docs/trainer.md says so."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"diffs: expected at least 2 paired differences (one per seed), got {d.tolist()}")
    if not 0 < level < 1:
        raise ValueError(f"level: expected a probability in (0, 1), got {level}")
    means = d[np.random.default_rng(seed).integers(0, len(d), (resamples, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(d.mean()), float(lo), float(hi)


def differences(values: dict[str, dict[int, float]], arm: str, baseline: str) -> list[float]:
    """Per-seed differences arm - baseline of one metric (`values[arm][seed]`); both need the same seeds."""
    if set(values[arm]) != set(values[baseline]):
        raise ValueError(f"seeds: {arm} has seeds {sorted(values[arm])}, {baseline} has {sorted(values[baseline])}; "
                         f"a paired difference needs the same seeds")
    return [values[arm][s] - values[baseline][s] for s in sorted(values[arm])]


def summarize(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """The table's two parts from the runs (one dict per (arm, seed) with `success`, `area` and the trainer's
    summary): per arm the mean and population std over seeds; per non-baseline arm and baseline present, the
    paired differences of held-out success and of the area, with their 95% bootstrap intervals."""
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    per_arm = []
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        row = {"arm": arm, "seeds": len(rs), "steps": float(np.mean([r["steps"] for r in rs])),
               "gen_tokens": int(np.mean([r["gen_tokens"] for r in rs])),
               "success_before": float(np.mean([r["success_before"] for r in rs]))}
        for key in ("success", "area"):
            vals = np.array([r[key] for r in rs])
            row[f"{key}_mean"], row[f"{key}_std"] = float(vals.mean()), float(vals.std())
        for key in ("post_answer_forks", "decision_forks"):
            forks = [r[key] for r in rs if r[key] is not None]
            row[key] = float(np.mean(forks)) if forks else None
        per_arm.append(row)
    values = {key: {arm: {r["seed"]: r[key] for r in runs if r["arm"] == arm} for arm in arms} for key, _ in METRICS}
    diffs = []
    for arm in (a for a in arms if a not in BASELINES):
        for base in (b for b in BASELINES if b in arms):
            row = {"arm": arm, "baseline": base}
            for key, _ in METRICS:
                d = differences(values[key], arm, base)
                row[f"{key}_diff"], row[f"{key}_lo"], row[f"{key}_hi"] = paired_bootstrap(d)
            diffs.append(row)
    return per_arm, diffs
