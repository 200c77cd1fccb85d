"""`appo-train`: the reference trainer's command line.

    appo-train                        warm start + APPO on the default task (< 10 min on 2 CPU cores)
    appo-train --algo grpo            the same budget with GRPO (or arpo, appo-entropy)
    appo-train compare                GRPO, ARPO, APPO and the entropy-only ablation on 3 seeds at an equal
                                      budget of generated tokens; writes a results table
    appo-train report --out DIR       rebuild the plots and the HTML report of a run or comparison
    torchrun --standalone --nproc_per_node 2 -m appo_train ...
                                      the same run data-parallel over 2 processes (gloo): prompts sharded,
                                      gradients summed, the same result as one process for the same seed

A run killed at any point resumes from its last checkpoint when started again with the same arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

from .algorithms import ALGORITHMS, OMEGA_SOURCES

SMOKE = dict(sft_examples=1000, sft_steps=200, prompts_per_step=4, rollouts_per_prompt=8, minibatch_prompts=2,
             token_budget=2500, eval_prompts=16, eval_samples=1, eval_every=2,
             policy=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))


def _config(args, **over):
    from .trainer import TrainConfig
    kw = dict(SMOKE) if args.smoke else {}
    names = {f.name for f in fields(TrainConfig)}
    kw |= {k: v for k, v in vars(args).items() if k in names and v is not None}
    kw |= over
    return TrainConfig(**kw)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--token-budget", dest="token_budget", type=int,
                   help="generated tokens of RL per run (default 300000)")
    p.add_argument("--max-steps", dest="max_steps", type=int, help="stop after this many RL steps as well")
    p.add_argument("--lr", type=float, help="RL learning rate (default 1e-4)")
    p.add_argument("--omega-source", dest="omega_source", choices=OMEGA_SOURCES,
                   help="what logp_old means in APPO's Omega (default prev_policy)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="steps between evaluations (default 10)")
    p.add_argument("--backend", choices=("auto", "torch", "native", "triton"), help="appo_kernels backend")
    p.add_argument("--smoke", action="store_true", help="a tiny configuration that runs in seconds (CI)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _load_records(run_dirs: list[Path]) -> list[dict]:
    out = []
    for d in run_dirs:
        path = d / "metrics.jsonl"
        if path.exists():
            out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def _write_report(out: Path, run_dirs: list[Path], summary_rows: list[dict], title: str, notes: str,
                  comparison: list[dict] | None = None, sample_dirs: list[Path] | None = None,
                  sample_groups: int | None = None) -> list[Path]:
    """Training curves (+ the comparison bars), then report.html with the last evaluated step's rollouts of
    `sample_dirs` (default: every run), the first `sample_groups` prompts of each."""
    from . import report
    images = [report.plot_training_curves(_load_records(run_dirs), out / "training_curves.png")]
    if comparison:
        images.append(report.plot_comparison(comparison, out / "comparison.png"))
    samples = []
    for d in run_dirs if sample_dirs is None else sample_dirs:
        path = d / "samples.json"
        if path.exists():
            samples += [s for s in json.loads(path.read_text()) if sample_groups is None or s["group"] < sample_groups]
    html = report.write_html_report(out / "report.html", title=title, summary_rows=summary_rows,
                                    rollouts=samples, images=images, notes=notes)
    return images + [html]


@contextlib.contextmanager
def _distributed():
    """Under torchrun (WORLD_SIZE > 1): a gloo process group for the run (the trainer runs on CPU), torn down
    after it; yields this process's rank (0 without torchrun)."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0
        return
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
        dist.barrier()                  # every rank done with its collectives before the group goes away
    finally:
        dist.destroy_process_group()


def train(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="appo-train", description="Warm start, then RL with one algorithm.")
    p.add_argument("--algo", choices=ALGORITHMS, default="appo")
    p.add_argument("--out", dest="out_dir", help="run directory (default runs/<algo>)")
    _add_common(p)
    args = p.parse_args(argv)
    from .trainer import Trainer
    cfg = _config(args, out_dir=args.out_dir or f"runs/{args.algo}{'-smoke' if args.smoke else ''}")
    t0 = time.perf_counter()
    with _distributed() as rank:
        summary = Trainer(cfg, progress=args.progress).run()
    if rank > 0:
        return 0
    summary["minutes"] = round((time.perf_counter() - t0) / 60, 2)
    out = Path(cfg.out_dir)
    paths = _write_report(out, [out], [summary], f"appo-train: {cfg.algo}, seed {cfg.seed}",
                          f"Held-out success (sampled at temperature {cfg.temperature}) went from "
                          f"{summary['success_before']:.3f} after the warm start to {summary['success']:.3f} after "
                          f"{summary['steps']} RL steps ({summary['gen_tokens']} generated tokens).")
    print()
    print(_table([summary], list(summary)))
    print("\nmetrics:", out / "metrics.jsonl", "|", out / "metrics.csv")
    for path in paths:
        print("report: " if path.suffix == ".html" else "plot:   ", path)
    return 0


def compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="appo-train compare",
                                description="Every algorithm on several seeds at an equal generated-token budget.")
    p.add_argument("--algos", nargs="+", choices=ALGORITHMS, default=["grpo", "arpo", "appo", "appo-entropy"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default="runs/compare", help="directory for the runs and the results table")
    _add_common(p)
    args = p.parse_args(argv)
    from .trainer import Trainer
    out = Path(args.out)
    summaries, run_dirs = [], []
    for seed in args.seeds:
        for algo in args.algos:
            run = out / f"{algo}-s{seed}"
            cfg = _config(args, algo=algo, seed=seed, out_dir=str(run), sft_cache=str(out / f"sft-s{seed}.pt"))
            if args.progress:
                print(f"== {algo}, seed {seed} -> {run}", file=sys.stderr)
            summaries.append(Trainer(cfg, progress=args.progress).run())
            run_dirs.append(run)
    rows = []
    for algo in args.algos:
        runs = [s for s in summaries if s["algo"] == algo]
        row = {"algo": algo, "seeds": len(runs), "gen_tokens": int(statistics.mean(s["gen_tokens"] for s in runs)),
               "steps": statistics.mean(s["steps"] for s in runs)}
        for key in ("success", "reward", "tool_calls"):
            vals = [s[key] for s in runs]
            row[f"{key}_mean"] = statistics.mean(vals)
            row[f"{key}_std"] = statistics.pstdev(vals)
            row[f"{key}_min"], row[f"{key}_max"] = min(vals), max(vals)
        row["success_before"] = statistics.mean(s["success_before"] for s in runs)
        forks = [s["post_answer_forks"] for s in runs if s.get("post_answer_forks") is not None]
        row["post_answer_forks"] = statistics.mean(forks) if forks else "-"
        rows.append(row)
    cols = ["algo", "seeds", "gen_tokens", "steps", "success_before", "success_mean", "success_std", "success_min",
            "success_max", "reward_mean", "reward_std", "tool_calls_mean", "tool_calls_std", "post_answer_forks"]
    table = _table(rows, cols)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"summary": rows, "runs": summaries}, indent=1))
    paths = _write_report(out, run_dirs, rows, "appo-train compare",
                          f"{len(args.seeds)} seeds x {len(args.algos)} algorithms, each run stopped at the same "
                          f"budget of generated tokens; success = held-out success sampled at temperature 1. "
                          f"Rollouts below: the first prompt of the last evaluated step of each algorithm, seed "
                          f"{args.seeds[0]}.",
                          comparison=summaries, sample_dirs=[out / f"{a}-s{args.seeds[0]}" for a in args.algos],
                          sample_groups=1)
    print()
    print(table)
    print("\nresults:", out / "results.md", "|", out / "results.json")
    for path in paths:
        print("report: " if path.suffix == ".html" else "plot:   ", path)
    return 0


def report_only(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="appo-train report", description="Rebuild the plots and the HTML report.")
    p.add_argument("--out", required=True, help="a run directory or a comparison directory")
    args = p.parse_args(argv)
    out = Path(args.out)
    run_dirs = [out] if (out / "metrics.jsonl").exists() else sorted(d for d in out.iterdir()
                                                                       if (d / "metrics.jsonl").exists())
    if not run_dirs:
        raise SystemExit(f"--out: no metrics.jsonl in {out} or its sub-directories")
    records = _load_records(run_dirs)
    last = {}
    for r in records:
        last[(r["algo"], r["seed"])] = r
    for path in _write_report(out, run_dirs, list(last.values()), f"appo-train: {out}", ""):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"train": train, "compare": compare, "report": report_only}
    if argv and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
