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
import importlib
import json
import os
import statistics
import sys
import time
from dataclasses import fields
from pathlib import Path

from appo_kernels.branch_points import FORK_MODES, TOPK_CHOICES

from .algorithms import ALGORITHMS, OMEGA_SOURCES
from .tasks import TASKS

TRAIN_EXTRA = ("transformers", "matplotlib", "tqdm")       # what `pip install ".[train]"` adds
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


def _require(*modules: str) -> None:
    """Fail at start-up, not after training, when a package of the [train] extra is missing."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise SystemExit(f"appo-train: {', '.join(missing)} not installed; the trainer needs the [train] extra: "
                         f"pip install \"torch==2.13.0\" \".[train]\" in a clone of the repository")


def _backend_line(requested: str) -> str:
    """Which appo_kernels backend runs the trainer's ops, and from where the package was imported."""
    import appo_kernels as ak

    from .trainer import backend_in_use
    try:
        name = backend_in_use(requested)
    except ValueError as e:
        raise SystemExit(f"appo-train: --{e}") from None
    line = f"appo-train: appo_kernels backend {name} ({Path(ak.__file__).parent})"
    if name == "torch" and requested == "auto":
        line += (": the compiled native backend is not importable from there. From a clone's root, `python -m` "
                 "imports that source tree, which has no extension unless built in place (pip install -e .); "
                 "run `appo-train`, or start from another directory (docs/distributed.md)")
    return line


def _default(name: str) -> str:
    """The help text's statement of a TrainConfig field's default (and its --smoke value, if it has one)."""
    from .trainer import TrainConfig
    value = next(f.default for f in fields(TrainConfig) if f.name == name)
    return f"default {value}" + (f"; {SMOKE[name]} with --smoke" if name in SMOKE else "")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=TASKS,
                   help=f"the task family: easy = 2-3 tool calls, hard = 4-6 (multi-hop reads) ({_default('task')})")
    p.add_argument("--branch-mode", dest="branch_mode", choices=FORK_MODES,
                   help="APPO's branches: resample = keep token t, sample from t+1; topk = replace token t by "
                        f"another of its top-k tokens, then sample ({_default('branch_mode')})")
    p.add_argument("--topk-choice", dest="topk_choice", choices=TOPK_CHOICES,
                   help="with --branch-mode topk: best = the most likely other token, sample = one drawn from the "
                        f"top-k renormalised without token t ({_default('topk_choice')})")
    p.add_argument("--train-substituted", dest="train_substituted", action="store_const", const=True,
                   help="with --branch-mode topk: train the substituted token with its branch's advantage "
                        "(default off: it was not sampled from the policy, so it is left out of the loss)")
    p.add_argument("--omega-future-only", dest="omega_own_term", action="store_const", const=False,
                   help="Omega sums the log-ratios of the tokens after t only, k > t (default off: k >= t, "
                        "the paper's)")
    p.add_argument("--no-forks-after-answer", dest="forks_after_answer", action="store_const", const=False,
                   help="no APPO fork point after the first <ans> token (default off: any generated token, "
                        "the paper's)")
    p.add_argument("--no-prefix-credit", dest="prefix_credit", action="store_const", const=False,
                   help="ablation: an APPO token keeps its own rollout's advantage, without the mean over the "
                        "branches that share it (default off: prefix credit, the paper's)")
    p.add_argument("--no-future-kl", dest="future_kl", action="store_const", const=False,
                   help="ablation: no future-KL weighting of APPO's advantages in the loss (default off: "
                        "weighted, the paper's)")
    p.add_argument("--token-budget", dest="token_budget", type=int,
                   help=f"generated tokens of RL per run ({_default('token_budget')})")
    p.add_argument("--max-steps", dest="max_steps", type=int,
                   help=f"stop after this many RL steps as well ({_default('max_steps')}: the token budget "
                        "alone decides)")
    p.add_argument("--lr", type=float, help=f"RL learning rate ({_default('lr')})")
    p.add_argument("--omega-source", dest="omega_source", choices=OMEGA_SOURCES,
                   help=f"what logp_old means in APPO's Omega ({_default('omega_source')})")
    p.add_argument("--eval-every", dest="eval_every", type=int,
                   help=f"RL steps between held-out evaluations, plus one at the end ({_default('eval_every')})")
    p.add_argument("--backend", choices=("auto", "torch", "native", "triton"),
                   help=f"appo_kernels backend; auto = the compiled native one when it is built "
                        f"({_default('backend')})")
    p.add_argument("--smoke", action="store_true",
                   help="a tiny configuration that runs in seconds, for CI (default off; sets "
                        + ", ".join(f"{k}={v}" for k, v in SMOKE.items() if k != "policy") + " and a smaller policy)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (default: bars on stderr)")


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


def _headline(summary: dict, config: dict) -> str:
    return (f"Held-out success (sampled at temperature {config['temperature']}) went from "
            f"{summary['success_before']:.3f} after the warm start to {summary['success']:.3f} after "
            f"{summary['steps']} RL steps ({summary['gen_tokens']} generated tokens).")


def _run_report(out: Path, summary: dict) -> list[Path]:
    """The report of one run directory: its summary (held-out success), the headline, curves and rollouts."""
    config = json.loads((out / "config.json").read_text())
    return _write_report(out, [out], [summary], f"appo-train: {summary['algo']}, seed {summary['seed']}",
                         _headline(summary, config))


def _compare_report(out: Path, summaries: list[dict], run_dirs: list[Path]) -> tuple[str, list[Path]]:
    """results.md / results.json (mean, population std, min and max over seeds per algorithm) and the report
    of a comparison; returns the table and the report's paths."""
    algos = list(dict.fromkeys(s["algo"] for s in summaries))
    seeds = list(dict.fromkeys(s["seed"] for s in summaries))
    rows = []
    for algo in algos:
        runs = [s for s in summaries if s["algo"] == algo]
        row = {"algo": algo, "seeds": len(runs), "gen_tokens": int(statistics.mean(s["gen_tokens"] for s in runs)),
               "steps": statistics.mean(s["steps"] for s in runs)}
        for key in ("success", "reward", "tool_calls"):
            vals = [s[key] for s in runs]
            row[f"{key}_mean"] = statistics.mean(vals)
            row[f"{key}_std"] = statistics.pstdev(vals)
            row[f"{key}_min"], row[f"{key}_max"] = min(vals), max(vals)
        row["success_before"] = statistics.mean(s["success_before"] for s in runs)
        for key in ("post_answer_forks", "decision_forks"):
            forks = [s[key] for s in runs if s[key] is not None]
            row[key] = statistics.mean(forks) if forks else "-"
        rows.append(row)
    cols = ["algo", "seeds", "gen_tokens", "steps", "success_before", "success_mean", "success_std", "success_min",
            "success_max", "reward_mean", "reward_std", "tool_calls_mean", "tool_calls_std", "post_answer_forks",
            "decision_forks"]
    table = _table(rows, cols)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"summary": rows, "runs": summaries}, indent=1))
    paths = _write_report(out, run_dirs, rows, "appo-train compare",
                          f"{len(seeds)} seeds x {len(algos)} algorithms, each run stopped at the same budget of "
                          f"generated tokens; success = held-out success sampled at temperature 1. Rollouts below: "
                          f"the first prompt of the last evaluated step of each algorithm, seed {seeds[0]}.",
                          comparison=summaries, sample_dirs=[out / f"{a}-s{seeds[0]}" for a in algos],
                          sample_groups=1)
    return table, paths


def _print_paths(paths: list[Path]) -> None:
    for path in paths:
        print("report: " if path.suffix == ".html" else "plot:   ", path)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appo-train", usage="appo-train [train] [options]",
                                description="Warm start, then RL with one algorithm.", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=ALGORITHMS, help=f"the RL algorithm ({_default('algo')})")
    p.add_argument("--seed", type=int, help=f"random seed of the warm start and the RL ({_default('seed')})")
    p.add_argument("--out", dest="out_dir", help="run directory (default runs/<algo>, runs/<algo>-smoke with --smoke)")
    _add_common(p)
    return p


def train(argv: list[str]) -> int:
    p = train_parser()
    args = p.parse_args(argv)
    _require(*TRAIN_EXTRA)
    from .trainer import Trainer
    cfg = _config(args)
    if args.out_dir is None:
        cfg.out_dir = f"runs/{cfg.algo}{'-smoke' if args.smoke else ''}"
    t0 = time.perf_counter()
    with _distributed() as rank:
        if rank == 0:
            print(_backend_line(cfg.backend), flush=True)
        trainer = Trainer(cfg, progress=args.progress)
        resumed_at = trainer.step
        summary = trainer.run()
    if rank > 0:
        return 0
    out = Path(cfg.out_dir)
    paths = _run_report(out, summary)
    print()
    print(_table([summary], list(summary)))
    if trainer.step > resumed_at:
        print(f"\nthis invocation: {trainer.step - resumed_at} RL steps, {(time.perf_counter() - t0) / 60:.2f} "
              f"minutes with the warm start and the evaluations")
    else:
        print(f"\nthe run had already finished (step {trainer.step}); nothing was trained, the report was rebuilt "
              f"(a larger --token-budget or --max-steps extends it)")
    print("metrics:", out / "metrics.jsonl", "|", out / "metrics.csv")
    _print_paths(paths)
    return 0


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appo-train compare", allow_abbrev=False,      # --seed is not --seeds
                                description="Every algorithm on several seeds at an equal generated-token budget.")
    default_algos, default_seeds = ["grpo", "arpo", "appo", "appo-entropy"], [0, 1, 2]
    p.add_argument("--algos", nargs="+", choices=ALGORITHMS, default=default_algos,
                   help=f"the algorithms (default {' '.join(default_algos)})")
    p.add_argument("--seeds", nargs="+", type=int, default=default_seeds,
                   help=f"one run per algorithm and seed (default {' '.join(map(str, default_seeds))})")
    p.add_argument("--out", default="runs/compare",
                   help="directory for the runs and the results table (default runs/compare)")
    _add_common(p)
    return p


def compare(argv: list[str]) -> int:
    p = compare_parser()
    args = p.parse_args(argv)
    _require(*TRAIN_EXTRA)
    from .trainer import Trainer
    print(_backend_line(args.backend or "auto"), flush=True)
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
    table, paths = _compare_report(out, summaries, run_dirs)
    print()
    print(table)
    print("\nresults:", out / "results.md", "|", out / "results.json")
    _print_paths(paths)
    return 0


def report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appo-train report",
                                description="Rebuild the summary, plots and HTML report of a run or a comparison.")
    p.add_argument("--out", required=True, help="a run directory or a comparison directory (required)")
    return p


def report_only(argv: list[str]) -> int:
    p = report_parser()
    args = p.parse_args(argv)
    _require("matplotlib")
    from .trainer import summarize
    out = Path(args.out)
    if not out.is_dir():
        raise SystemExit(f"appo-train report: --out: {out} is not a directory")
    if (out / "metrics.jsonl").exists():
        paths = _run_report(out, summarize(_load_records([out])))
    else:
        run_dirs = sorted(d for d in out.iterdir() if (d / "metrics.jsonl").exists())
        if not run_dirs:
            raise SystemExit(f"appo-train report: --out: no metrics.jsonl in {out} or its sub-directories")
        paths = _compare_report(out, [summarize(_load_records([d])) for d in run_dirs], run_dirs)[1]
    _print_paths(paths)
    return 0


COMMANDS = {"train": train, "compare": compare, "report": report_only}
_EPILOG = """commands:
  appo-train [train] [options]    warm start + RL with one algorithm (this page)
  appo-train compare [options]    every algorithm on several seeds at an equal budget; results table
  appo-train report --out DIR     rebuild the summary, plots and HTML report of a run or a comparison
Each has its own --help. A run killed at any point resumes when started again with the same arguments."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return train(argv)


if __name__ == "__main__":
    sys.exit(main())
