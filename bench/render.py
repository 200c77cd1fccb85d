"""Render the benchmark data (bench/results/*.jsonl, written by bench/run.py) as markdown: bench/results/cpu.md,
bench/results/gpu.md (when GPU data exist) and the README's performance tables, between the markers
<!-- bench:cpu begin ... --> / <!-- bench:cpu end --> (and bench:gpu). Nothing in them is typed by hand.

    python bench/render.py            # (re)write the reports and the README blocks from the committed data
    python bench/render.py --check    # exit 1 if any of them differs from what the data give (tests do this)

Every ratio is the median, over repeats, of the ratio of two contenders' i-th repeats, which ran side by side
(bench/run.py interleaves the contenders of a case round-robin); the bracket after it is the interquartile
range of those per-repeat ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
README = ROOT / "README.md"
TRL_H100_MS = 0.89   # published: TRL's fused log-prob + entropy kernel, [8192, 151936] bf16, H100 (no top-k)

Row = Dict[str, object]


def load(path: Path) -> List[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------------------
# numbers
# ----------------------------------------------------------------------------------------------------------


def stats(xs: Sequence[float]) -> Tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return statistics.median(xs), q[0], q[2]


def paired(num: Optional[Row], den: Optional[Row], f: Callable[[float, float], float] = lambda a, b: a / b):
    """Median and IQR of f(num_i, den_i) over the repeats the two contenders ran side by side (None when
    either is missing)."""
    if num is None or den is None:
        return None
    n = min(len(num["samples"]), len(den["samples"]))
    return stats([f(a, b) for a, b in zip(num["samples"][:n], den["samples"][:n])])


def ms(x: float) -> str:
    return f"{x:.1f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def ratio(r: Optional[Tuple[float, float, float]], digits: int = 2) -> str:
    if r is None:
        return ""
    m, lo, hi = r
    return f"{m:.{digits}f}x ({lo:.{digits}f}-{hi:.{digits}f})"


def frac(r: Optional[Tuple[float, float, float]]) -> str:
    return "" if r is None else f"{r[0]:.0%} ({r[1]:.0%}-{r[2]:.0%})"


def shape_str(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


class Data:
    """The rows of one run, looked up by case fields."""

    def __init__(self, rows: List[Row]):
        self.errors = [r for r in rows if r["metric"] == "error"]
        self.rows = [r for r in rows if r["metric"] != "error"]
        self.run = rows[0]

    def find(self, metric: str = "time", **kw) -> Optional[Row]:
        for r in self.rows:
            if r["metric"] == metric and all(r.get(k) == v for k, v in kw.items()):
                return r
        return None

    def cases(self, family: str) -> List[Row]:
        """One row per case of the family (its first), in run order."""
        seen, out = set(), []
        for r in self.rows:   # error rows are not in self.rows
            if r["family"] == family and r["case"] not in seen:
                seen.add(r["case"])
                out.append(r)
        return out

    def auto_backend(self, case: str) -> Optional[str]:
        """The backend backend='auto' picks: the first one the case timed (bench/run.py times it first)."""
        for r in self.rows:
            if r["case"] == case and r["backend"] and r["contender"].startswith("ours["):
                return r["backend"]
        return None

    def ours(self, case: str, k: int = 0, backend: Optional[str] = None) -> Optional[Row]:
        b = backend or self.auto_backend(case)
        return self.find(case=case, contender=f"ours[{b}]", k=k)

    def max_load(self) -> float:
        return max(float(r["other_load_cores"]) for r in self.rows)

    def ks(self, case: str) -> List[int]:
        b = self.auto_backend(case)
        return sorted({int(r["k"]) for r in self.rows if r["case"] == case and r["contender"] == f"ours[{b}]"})


def error_lines(d: Data) -> List[str]:
    if not d.errors:
        return []
    rows = [[r["case"], str(r["message"]).replace("|", "/").replace("\n", " ")[:300]] for r in d.errors]
    return ["", "## Failed cases", "", "These cases failed (a correctness check or a crash) and were not timed:",
            ""] + md_table(["case", "error"], rows)


def header(d: Data, source: str) -> List[str]:
    r = d.run
    dirty = " (with uncommitted changes)" if r["git_dirty"] else ""
    lines = [
        f"Generated by `python bench/render.py` from `{source}`, written by `{r['command']}`; do not edit.",
        "",
        f"- date: {r['date']}; commit {str(r['git_commit'])[:10]}{dirty}; {r['mode']} sizes",
        f"- device: {r['device_name']} ({r['logical_cores']} logical cores, torch threads {r['torch_threads']})",
        f"- python {r['python']}, torch {r['torch']}, triton {r['triton'] or '-'}, "
        f"liger-kernel {r['liger_kernel'] or '-'}, appo_kernels {r['appo_kernels']}; backends: "
        f"{', '.join(r['backends'])}",
        f"- platform: {r['platform']}",
        f"- run wall time {float(r['run_wall_s']):.0f} s; load average (1/5/15 min) at start {r['load_avg_start']}, "
        f"at end {r['load_avg_end']}; other processes used up to {d.max_load():.2f} cores during a case "
        "(last table)",
    ]
    if r.get("interrupted"):
        lines += ["", f"**The run was interrupted ({r['interrupted']}): the cases after that are missing.**"]
    if d.max_load() > 0.25:
        lines += ["", f"**Other processes used up to {d.max_load():.2f} CPU cores during a case (see the last "
                  "table): on a small machine a taken core slows torch's multi-threaded ops badly, so read the "
                  "ratios (measured side by side) rather than the absolute times, and rerun on a quiet machine "
                  "to confirm.**"]
    return lines


HOW_TO_READ = ("Times are medians over the repeats (n); a ratio is the median of the per-repeat ratios of two "
               "contenders timed side by side in the same run, with their interquartile range in brackets.")


# ----------------------------------------------------------------------------------------------------------
# CPU
# ----------------------------------------------------------------------------------------------------------


def cpu_fwd_rows(d: Data, readme: bool) -> List[List[str]]:
    rows = []
    bwd = {(tuple(r["shape"]), r["dtype"]): r["case"] for r in d.cases("token_stats_fwd_bwd")}
    for c in d.cases("token_stats_fwd"):
        case = c["case"]
        read, exp, fwd = d.find(case=case, contender="read"), d.find(case=case, contender="exp bound"), d.ours(case)
        if read is None or fwd is None:
            continue
        topk = [ratio(paired(d.ours(case, k), fwd)) for k in d.ks(case) if k]
        bwd_case = bwd.get((tuple(c["shape"]), c["dtype"]))
        fb = ""
        if bwd_case:
            fb = ratio(paired(d.ours(bwd_case), d.find(case=bwd_case, contender="read+write")))
        row = [shape_str(c["shape"]), c["dtype"], ms(read["median"]), ms(fwd["median"]), ratio(paired(fwd, read)),
               *topk, ratio(paired(fwd, exp)), fb]
        if not readme:
            row.insert(5 + len(topk), ms(exp["median"]) if exp else "")
        rows.append(row)
    return rows


def cpu_fwd_head(d: Data, readme: bool) -> List[str]:
    first = d.cases("token_stats_fwd")[0]["case"] if d.cases("token_stats_fwd") else ""
    ks = [k for k in d.ks(first) if k]
    head = ["logits", "dtype", "read ms", "forward ms", "forward / read", *[f"top-{k} / forward" for k in ks]]
    head += ([] if readme else ["exp bound ms"]) + ["forward / exp bound", "fwd+bwd / (read + write)"]
    return head


def exp_rate_rows(d: Data) -> List[List[str]]:
    rows = []
    for c in d.cases("token_stats_fwd"):
        r = d.find(case=c["case"], contender="exp bound")
        rate = stats([r["elements"] / (t * 1e-3) for t in r["samples"]])
        rows.append([shape_str(c["shape"]), c["dtype"], f"{r['elements']:,}", ms(r["median"]),
                     f"{rate[0] / 1e9:.2f} ({rate[1] / 1e9:.2f}-{rate[2] / 1e9:.2f})"])
    return rows


def contender_cases(d: Data, family: str) -> List[Row]:
    return [c for c in d.cases(family) if d.find(case=c["case"], contender="eager")]


def contender_rows(d: Data, family: str, floor: str) -> List[List[str]]:
    rows = []
    for c in contender_cases(d, family):
        case = c["case"]
        base_read = d.find(case=case, contender=floor)
        for r in [r for r in d.rows if r["case"] == case and r["metric"] == "time"]:
            if r["contender"] in (floor, "exp bound", "copy"):
                continue
            ours = d.ours(case, int(r["k"]))
            rows.append([f"{c['dtype']} {shape_str(c['shape'])}", r["contender"], str(r["k"]), ms(r["median"]),
                         f"{ms(r['q1'])}-{ms(r['q3'])}", str(r["n_repeats"]),
                         ratio(paired(r, ours)) if ours else "", ratio(paired(r, base_read))])
    return rows


def readme_contender_table(d: Data) -> List[str]:
    """Today's README table: per (op, dtype, k) at the contenders' shape, ours and every contender."""
    names = ["torch backend", "torch eager", "torch.compile"]
    out_rows, shape = [], None
    for family, floor in (("token_stats_fwd", "read"), ("token_stats_fwd_bwd", "read+write")):
        for c in contender_cases(d, family):
            case, shape = c["case"], c["shape"]
            auto = d.auto_backend(case)
            for k in sorted({int(r["k"]) for r in d.rows if r["case"] == case and r["contender"] == "eager"}):
                ours = d.ours(case, k)
                if ours is None:
                    continue
                cells = []
                for name in ("ours[torch]", "eager", "torch.compile"):
                    r = d.find(case=case, contender=name, k=k)
                    cells.append("" if r is None or name == f"ours[{auto}]" else
                                 f"{ms(r['median'])} ms ({paired(r, ours)[0]:.1f}x)")
                what = ("forward" if family == "token_stats_fwd" else "forward + backward") + f", {c['dtype']}"
                what += f", top-{k}" if k else ""
                out_rows.append([what, f"{ms(ours['median'])} ms", *cells,
                                 ratio(paired(ours, d.find(case=case, contender=floor)))])
    if not out_rows:
        return []
    auto = d.auto_backend(contender_cases(d, "token_stats_fwd")[0]["case"])
    head = [f"token_stats, logits {shape_str(shape)}", f"{auto} (auto)", *names, f"{auto} / floor"]
    return md_table(head, out_rows)


def fv_rows(d: Data) -> List[List[str]]:
    rows = []
    for c in d.cases("future_values"):
        case = c["case"]
        dense = d.find(case=case, contender="dense U@r (authors)")
        ours = d.ours(case)
        if ours is None or dense is None:
            continue
        others = [r for r in d.rows if r["case"] == case and r["metric"] == "time" and r["backend"]
                  and r is not ours]
        rows.append([f"B={c['shape'][0]}, T={c['shape'][1]}", f"{ms(ours['median'])} ms",
                     *[f"{ms(r['median'])} ms ({paired(r, ours)[0]:.1f}x)" for r in others],
                     f"{ms(dense['median'])} ms", ratio(paired(dense, ours), 0)])
    return rows


def fv_head(d: Data) -> List[str]:
    case = d.cases("future_values")[0]["case"] if d.cases("future_values") else ""
    auto = d.auto_backend(case)
    others = [r["backend"] for r in d.rows if r["case"] == case and r["metric"] == "time" and r["backend"]
              and r["backend"] != auto]
    return ["future_values (Omega)", f"{auto} (auto)", *[f"{b} backend" for b in others],
            "authors' dense O(T^2) `U @ r`", "dense / ours"]


def seq_rows(d: Data, family: str = "seq_ops") -> List[List[str]]:
    rows = []
    for c in d.cases(family):
        ntok = c["shape"][0] * c["shape"][1]
        for r in [r for r in d.rows if r["case"] == c["case"] and r["metric"] == "time"]:
            rows.append([c["case"], r["contender"], ms(r["median"]), f"{ms(r['q1'])}-{ms(r['q3'])}",
                         str(r["n_repeats"]), f"{r['median'] * 1e6 / ntok:.2f}"])
    return rows


def load_rows(d: Data) -> List[List[str]]:
    rows, seen = [], set()
    for r in d.rows:
        if r["case"] in seen:
            continue
        seen.add(r["case"])
        rows.append([r["case"], f"{float(r['case_wall_s']):.1f}", f"{float(r['other_load_cores']):.2f}",
                     f"{float(r['waited_idle_s']):.0f}", "yes" if r["quiet_before"] else "no",
                     f"{r['attempt']} of {r['attempts']}"])
    return rows


def bf16_bound_line(d: Data) -> List[str]:
    """The bf16 forward against both bounds, in words (issue 13 item 2)."""
    parts = []
    for c in d.cases("token_stats_fwd"):
        if c["dtype"] != "bf16":
            continue
        case = c["case"]
        fwd, read, exp = d.ours(case), d.find(case=case, contender="read"), d.find(case=case, contender="exp bound")
        if None in (fwd, read, exp):
            continue
        parts.append(f"{shape_str(c['shape'])}: {paired(fwd, read)[0]:.2f}x the read, "
                     f"{paired(fwd, exp)[0]:.2f}x the exp bound")
    rates = [statistics.median(r["elements"] / (t * 1e-3) for t in r["samples"])
             for r in d.rows if r["contender"] == "exp bound"]
    if not parts:
        return []
    return [f"bf16 forward: {'; '.join(parts)}. The exp bound is the time of one exp per logit at the machine's "
            f"exp throughput: the native kernels' own exp (`appo::vexp`) over an L1-resident block on "
            f"{d.run['torch_threads']} threads, timed in the same case ({min(rates) / 1e9:.2f}-"
            f"{max(rates) / 1e9:.2f} G exps/s over the cases)."]


def cpu_report(d: Data, source: str) -> str:
    fwd_cases = d.cases("token_stats_fwd")
    lines = [f"# appo_kernels CPU benchmarks ({d.run['mode']} sizes)", ""] + header(d, source)
    lines += ["", HOW_TO_READ, "",
              "## token_stats forward against one read of the logits, and what bounds it", "",
              f"Ours = `ours[{d.auto_backend(fwd_cases[0]['case']) if fwd_cases else ''}]`, what "
              "backend='auto' picks. "
              "read: `x.sum()` of the same logits. exp bound: one exp per logit with the native kernels' own exp "
              "(`appo::vexp`, bench/exp_bound.cpp) over an L1-resident block on the same threads (no memory "
              "traffic), timed in the same case. fwd+bwd: the gradient of logp.sum() + "
              "entropy.sum(), against `x.sum()` + `x.clone()` (one read, one read and write of a same-size "
              "tensor), timed side by side in its own case.", ""]
    lines += md_table(cpu_fwd_head(d, False), cpu_fwd_rows(d, False))
    lines += [""] + bf16_bound_line(d)
    lines += ["", "### exp throughput (exps per second on the torch threads, per case)", ""]
    lines += md_table(["logits", "dtype", "exps", "median ms", "G exps / s"], exp_rate_rows(d))
    lines += ["", "## Every contender", "",
              "ours[...] on each backend, plain torch as a user writes it (`eager`: log_softmax, gather, "
              "-(p * logp).sum, torch.topk) and `torch.compile` of it; `time / ours` > 1: ours is faster.", ""]
    head = ["case", "contender", "k", "median ms", "IQR ms", "n", "time / ours", "time / floor"]
    lines += md_table(head, contender_rows(d, "token_stats_fwd", "read") +
                      contender_rows(d, "token_stats_fwd_bwd", "read+write"))
    lines += ["", "## future_values (method §2 Omega) against the authors' dense O(T^2) approach", "",
              "dense: U[t, k] = gamma^(k-t) (upper-triangular [T, T], built inside the timed call), then per "
              "rollout F = U @ (mask * (logp - logp_old)). Both checked allclose before timing.", ""]
    lines += md_table(fv_head(d), fv_rows(d))
    lines += ["", "## The other sequence ops", "",
              "Each checked once against an independent eager reference before timing. procedure_advantages: "
              "groups of 8 rollouts (4 initial, 4 branches); policy_loss: token-mean, k3 KL, forward + backward.", ""]
    lines += md_table(["case", "contender", "median ms", "IQR ms", "n", "ns / token"], seq_rows(d))
    lines += ["", "## Machine load per case", "",
              "CPU used by other processes while the case ran (average busy cores from /proc/stat minus this "
              "process); near 0: an otherwise idle machine. quiet before: whether two idle seconds were seen "
              "before it (--wait-idle); attempt: the one kept (--retries keeps the least loaded).", ""]
    lines += md_table(["case", "wall s", "other processes, cores", "waited s", "quiet before", "attempt"],
                      load_rows(d))
    return "\n".join(lines + error_lines(d)) + "\n"


def cpu_readme_block(d: Data) -> str:
    r = d.run
    lines = [f"CPU: {r['device_name']}, {r['logical_cores']} logical cores, torch {r['torch']}, commit "
             f"{str(r['git_commit'])[:10]}, measured {r['date']}; load average {r['load_avg_start']} at the start, "
             f"{r['load_avg_end']} at the end, other processes up to {d.max_load():.2f} cores during a case. "
             f"Full report with every contender, spreads and the load per case: "
             f"[`bench/results/cpu.md`](bench/results/cpu.md). " + HOW_TO_READ, ""]
    lines += md_table(cpu_fwd_head(d, True), cpu_fwd_rows(d, True))
    lines += [""] + bf16_bound_line(d) + [""]
    lines += readme_contender_table(d)
    lines += [""] + md_table(fv_head(d), fv_rows(d))
    seq = [[row[0], row[1], f"{row[2]} ms", row[5]] for row in seq_rows(d)]
    lines += [""] + md_table(["sequence op", "contender", "median", "ns / token"], seq)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------


def gpu_fwd_rows(d: Data, family: str) -> List[List[str]]:
    rows = []
    for c in d.cases(family):
        case = c["case"]
        copy = d.find(case=case, contender="copy")
        read = d.find(case=case, contender="read" if family == "token_stats_fwd" else "read+write")
        for r in [r for r in d.rows if r["case"] == case and r["metric"] == "time"]:
            if r["contender"] in ("copy", "read", "read+write"):
                continue
            peak = d.find("peak_memory", case=case, contender=r["contender"], k=r["k"])
            if family == "token_stats_fwd":   # one read of the logits at copy speed = half a copy
                floor = ratio(paired(r, copy, lambda a, b: 2 * a / b))
                bw = frac(paired(r, copy, lambda a, b: b / (2 * a)))
            else:                             # one read + one write = a copy
                floor = ratio(paired(r, copy))
                bw = frac(paired(r, copy, lambda a, b: b / a))
            rows.append([f"{c['dtype']} {shape_str(c['shape'])}", r["contender"], str(r["k"]),
                         ms(r["median"]), f"{ms(r['q1'])}-{ms(r['q3'])}", floor, ratio(paired(r, read)), bw,
                         f"{peak['median']:.0f}" if peak else ""])
    return rows


def gpu_trl_line(d: Data) -> List[str]:
    for c in d.cases("token_stats_fwd"):
        if c["shape"] == [8192, 151936] and c["dtype"] == "bf16":
            r = d.ours(c["case"])
            if r is None:
                return []
            return [f"At [8192, 151936] bf16 the forward (logp + entropy, no top-k) takes {ms(r['median'])} ms on "
                    f"{d.run['device_name']}, beside the {TRL_H100_MS} ms published for TRL's fused log-prob + "
                    "entropy kernel on an H100 (not measured here)."]
    return []


def gpu_report(d: Data, source: str) -> str:
    lines = [f"# appo_kernels GPU benchmarks ({d.run['mode']} sizes)", ""] + header(d, source)
    fwd_head = ["case", "contender", "k", "median ms", "IQR ms", "time / one read (copy / 2)", "time / x.sum()",
                "bandwidth / copy", "peak MiB"]
    lines += ["", HOW_TO_READ, "", "## token_stats forward (and the Branching Score)", "",
              "copy: a device-to-device copy of the logits (reads and writes them); one read at copy speed is "
              "half of it. peak: device memory above what was allocated before one call.", ""]
    lines += md_table(fwd_head, gpu_fwd_rows(d, "token_stats_fwd"))
    lines += [""] + gpu_trl_line(d)
    lines += ["", "## token_stats forward + backward", "", "Floor: one copy of the logits (one read + one write).", ""]
    lines += md_table(["case", "contender", "k", "median ms", "IQR ms", "time / copy", "time / (x.sum() + x.clone())",
                       "bandwidth / copy", "peak MiB"], gpu_fwd_rows(d, "token_stats_fwd_bwd"))
    lines += ["", "## Sequence ops", ""]
    lines += md_table(fv_head(d), fv_rows(d)) + [""]
    lines += md_table(["case", "contender", "median ms", "IQR ms", "n", "ns / token"],
                      seq_rows(d) + seq_rows(d, "packed_scan"))
    lines += ["", "## Load per case", ""]
    lines += md_table(["case", "wall s", "other processes, cores", "waited s", "quiet before", "attempt"],
                      load_rows(d))
    return "\n".join(lines + error_lines(d)) + "\n"


def gpu_readme_block(d: Optional[Data]) -> str:
    if d is None:
        return ("No GPU measurements yet: no GPU has been available to this project. `bash bench/gpu_check.sh` "
                "runs the GPU suite in one script and writes `bench/results/gpu.jsonl`; `python bench/render.py` "
                "then fills this block.")
    r = d.run
    lines = [f"GPU: {r['device_name']}, torch {r['torch']}, triton {r['triton']}, commit {str(r['git_commit'])[:10]}, "
             f"measured {r['date']}; full report: [`bench/results/gpu.md`](bench/results/gpu.md).", ""]
    rows = [row[:4] + row[5:6] + row[7:] for row in gpu_fwd_rows(d, "token_stats_fwd")]
    lines += md_table(["case", "contender", "k", "median ms", "time / one read", "bandwidth / copy", "peak MiB"], rows)
    trl = gpu_trl_line(d)
    return "\n".join(lines + ([""] + trl if trl else []))


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------


def replace_block(text: str, name: str, body: str) -> str:
    begin = (f"<!-- bench:{name} begin: generated by python bench/render.py from bench/results/{name}.jsonl; "
             "do not edit -->")
    end = f"<!-- bench:{name} end -->"
    lines = text.split("\n")
    starts = [i for i, line in enumerate(lines) if line.startswith(f"<!-- bench:{name} begin")]
    ends = [i for i, line in enumerate(lines) if line == end]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError(f"README.md must hold exactly one {begin!r} ... {end!r} block")
    return "\n".join(lines[:starts[0]] + [begin, body, end] + lines[ends[0] + 1:])


def render_all(results: Path = RESULTS, readme: Path = README) -> Dict[Path, str]:
    """path -> the text it should hold, from the data in `results`."""
    out: Dict[Path, str] = {}
    text = readme.read_text()
    cpu = results / "cpu.jsonl"
    if cpu.exists() and cpu.stat().st_size:
        d = Data(load(cpu))
        out[results / "cpu.md"] = cpu_report(d, "bench/results/cpu.jsonl")
        text = replace_block(text, "cpu", cpu_readme_block(d))
    gpu = results / "gpu.jsonl"
    g = Data(load(gpu)) if gpu.exists() and gpu.stat().st_size else None
    if g is not None:
        out[results / "gpu.md"] = gpu_report(g, "bench/results/gpu.jsonl")
    out[readme] = replace_block(text, "gpu", gpu_readme_block(g))
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only check that the files are what the data give")
    ap.add_argument("--results", default=str(RESULTS), help="the folder holding cpu.jsonl / gpu.jsonl")
    ap.add_argument("--readme", default=str(README))
    args = ap.parse_args(argv)
    stale = []
    for path, text in render_all(Path(args.results), Path(args.readme)).items():
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text)
    verb = "differ from the data (run python bench/render.py)" if args.check else "written"
    for path in stale:
        print(f"{os.path.relpath(path)}: {verb}", file=sys.stderr)
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
