"""Side-by-side micro-benchmarks of appo_kernels against plain torch, torch.compile and memory floors.

    python bench/run.py                               # full sizes (several minutes on 2 cores)
    python bench/run.py --quick                       # small sizes, a smoke check (< 1 minute)
    python bench/run.py --out bench/results/cpu.md    # also write the markdown report there

Every contender of a case is timed in the same process, interleaved round-robin, and reported as the median
of its repeats, with its ratio to ours and to the plain read of the same tensor. See bench/README.md.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import appo_kernels as ak  # noqa: E402
from _common import (SEQ_GAMMA, OtherLoad, check_future_kl, check_future_values, check_grad,  # noqa: E402
                     check_policy_loss, check_procedure, check_scores, check_token_stats, compile_fn,
                     dense_future_values, eager_future_kl_weights, eager_policy_loss_fwd_bwd,
                     eager_procedure_advantages, eager_score_tokens, eager_token_stats, fwd_bwd, header_lines,
                     load_average, make_logits, make_seq_batch, make_tree, measure, median,
                     ours_future_kl_weights, ours_future_values, ours_policy_loss_fwd_bwd,
                     ours_procedure_advantages, ours_score_tokens, ours_token_stats, prime_allocator, read_floor,
                     read_write_floor)

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: plain progress lines instead
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# dynamo keys its cache on the code object: the eager function is recompiled per dtype / top-k / grad mode.
for _attr in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _attr):
        setattr(torch._dynamo.config, _attr, 64)


class Sizes:
    def __init__(self, quick: bool):
        self.quick = quick
        self.n, self.v = (256, 4096) if quick else (2048, 32000)
        self.fv_b, self.fv_ts = (4, (256, 512, 1024)) if quick else (16, (1024, 4096, 8192))
        self.seq_b, self.seq_t = (8, 1024) if quick else (64, 8192)
        self.repeats = 5 if quick else 7
        self.dense_big_repeats = 3          # the dense O(T^2) baseline at the largest T
        self.topk_repeats = 5               # ours with top-k is slow on CPU (see README); >= 5 still


class Progress:
    """One progress line per case (a tqdm bar if tqdm is installed), and the other processes' CPU use during
    each case (see _common.OtherLoad). With `wait_idle` > 0, waits before each case (at most that many
    seconds) until the other processes have used < 0.1 cores for two consecutive seconds."""

    def __init__(self, total: int, wait_idle: float = 0.0):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.wait_idle = wait_idle
        self.loads: List[List[str]] = []
        self.max_load = 0.0
        self.bar = tqdm(total=total, unit="case", file=sys.stderr) if tqdm is not None else None

    def _wait(self) -> float:
        t0 = time.perf_counter()
        quiet = 0
        while quiet < 2 and time.perf_counter() - t0 < self.wait_idle:
            with OtherLoad() as probe:
                time.sleep(1.0)
            quiet = quiet + 1 if probe.cores < 0.1 else 0
        return time.perf_counter() - t0

    def start(self, label: str) -> None:
        waited = self._wait() if self.wait_idle > 0 else 0.0
        self.waited = waited
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            print(f"[{self.done + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)
        self.load = OtherLoad().__enter__()

    def end(self, label: str, final: bool = True) -> float:
        """Close the case (or one attempt of it, `final=False`); returns the other processes' cores."""
        self.load.__exit__(None, None, None)
        took, cores = self.load.wall, self.load.cores
        self.loads.append([label, f"{took:.1f}", f"{cores:.2f}", f"{self.waited:.0f}", ""])
        if final:
            self.done += 1
            if self.bar is not None:
                self.bar.update(1)
        if self.bar is None:
            print(f"[{self.done if final else self.done + 1}/{self.total}] {label} done in {took:.1f}s, other "
                  f"processes used {cores:.2f} cores (total {time.perf_counter() - self.t0:.0f}s)",
                  file=sys.stderr, flush=True)
        return cores

    def run_case(self, label: str, fn: Callable[[], tuple], retries: int = 0, threshold: float = 0.25):
        """Run `fn` (-> (rows, extra)) once, or again up to `retries` times while other processes used more
        than `threshold` cores during it; returns the result of the attempt with the least other load."""
        best = None
        for attempt in range(retries + 1):
            name = label if attempt == 0 else f"{label} (attempt {attempt + 1})"
            self.start(name)
            out = fn()
            last = attempt == retries
            cores = self.end(name, final=False)
            if best is None or cores < best[0]:
                best = (cores, out, len(self.loads) - 1)
            if cores <= threshold or last:
                break
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        self.max_load = max(self.max_load, best[0])
        self.loads[best[2]][-1] = "yes"
        return best[1]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def fmt_ratio(r: Optional[float]) -> str:
    return "" if r is None else f"{r:.2f}x"


def ratio_rows(case: str, times: Dict[str, List[float]], ours: str, floor: Optional[str]) -> List[List[str]]:
    """Table rows: case, contender, median, min-max, reps, time / ours, time / floor."""
    rows = []
    base = median(times[ours])
    fl = median(times[floor]) if floor else None
    for name, ts in times.items():
        med = median(ts)
        rows.append([case, name, fmt_ms(med), f"{fmt_ms(min(ts))}-{fmt_ms(max(ts))}", str(len(ts)),
                     fmt_ratio(med / base), fmt_ratio(med / fl) if fl else ""])
    return rows


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def cleanup() -> None:
    gc.collect()


def ours_backends(device: torch.device) -> List[str]:
    """Every available backend that supports `device` (ours); the first is what backend='auto' picks."""
    names = []
    probe = torch.zeros(1, 2)
    for name in ak.available_backends():
        try:
            ak.token_stats(probe.to(device), torch.zeros(1, dtype=torch.long, device=device), backend=name)
        except ValueError:
            continue
        names.append(name)
    return names


# ----------------------------------------------------------------------------------------------------------
# a / b: token_stats
# ----------------------------------------------------------------------------------------------------------


def bench_token_stats_fwd(sz: Sizes, backends: List[str], dtype_name: str, k: int, use_compile: bool):
    """-> (table rows, compile-time rows)"""
    dtype = DTYPES[dtype_name]
    x, tok = make_logits(sz.n, sz.v, dtype)
    label = f"fwd {dtype_name} [{sz.n}, {sz.v}] topk={k}"
    ref = eager_token_stats(x, tok, k)
    contenders: List[Tuple[str, Callable, int]] = []
    compile_times: List[List[str]] = []
    reps = sz.topk_repeats if k else sz.repeats
    for b in backends:
        check_token_stats(ours_token_stats(x, tok, k, backend=b), ref, x, k, f"{label} ours[{b}]")
        contenders.append((f"ours[{b}]", lambda b=b: ours_token_stats(x, tok, k, backend=b), reps))
    contenders.append(("eager", lambda: eager_token_stats(x, tok, k), reps))
    if use_compile:
        torch._dynamo.reset()
        comp = compile_fn(eager_token_stats)
        t0 = time.perf_counter()
        out = comp(x, tok, k)
        compile_times.append([label, f"{time.perf_counter() - t0:.1f}"])
        check_token_stats(out, ref, x, k, f"{label} compiled")
        contenders.append(("compiled", lambda: comp(x, tok, k), reps))
    contenders.append(("read x.sum()", lambda: read_floor(x), reps))
    del ref
    times = measure(contenders, warmup=1)
    rows = ratio_rows(label, times, f"ours[{backends[0]}]", "read x.sum()")
    cleanup()
    return rows, compile_times


def bench_token_stats_bwd(sz: Sizes, backends: List[str], dtype_name: str, use_compile: bool):
    """-> (table rows, compile-time rows)"""
    dtype = DTYPES[dtype_name]
    x0, tok = make_logits(sz.n, sz.v, dtype)
    x = x0.clone().requires_grad_(True)
    del x0
    label = f"fwd+bwd {dtype_name} [{sz.n}, {sz.v}] topk=0"
    ref_grad = fwd_bwd(eager_token_stats, x, tok)
    x.grad = None
    contenders: List[Tuple[str, Callable, int]] = []
    compile_times: List[List[str]] = []
    for b in backends:
        stats = lambda lg, tk, k, b=b: ours_token_stats(lg, tk, k, backend=b)  # noqa: E731
        check_grad(fwd_bwd(stats, x, tok), ref_grad, f"{label} ours[{b}]")
        contenders.append((f"ours[{b}]", lambda stats=stats: fwd_bwd(stats, x, tok), sz.repeats))
    contenders.append(("eager+autograd", lambda: fwd_bwd(eager_token_stats, x, tok), sz.repeats))
    if use_compile:
        torch._dynamo.reset()
        comp = compile_fn(eager_token_stats)
        t0 = time.perf_counter()
        g = fwd_bwd(comp, x, tok)
        compile_times.append([label, f"{time.perf_counter() - t0:.1f}"])
        check_grad(g, ref_grad, f"{label} compiled")
        contenders.append(("compiled", lambda: fwd_bwd(comp, x, tok), sz.repeats))
    contenders.append(("read+write x.sum()+x.clone()", lambda: read_write_floor(x), sz.repeats))
    del ref_grad
    x.grad = None
    times = measure(contenders, warmup=1)
    rows = ratio_rows(label, times, f"ours[{backends[0]}]", "read+write x.sum()+x.clone()")
    cleanup()
    return rows, compile_times


# ----------------------------------------------------------------------------------------------------------
# c: future_values vs the authors' dense approach
# ----------------------------------------------------------------------------------------------------------


def bench_future_values(sz: Sizes, backends: List[str], T: int) -> List[List[str]]:
    d = make_seq_batch(sz.fv_b, T)
    label = f"future_values B={sz.fv_b} T={T}"
    omega_ref, gain_ref = dense_future_values(d["logp"], d["logp_old"], d["mask"], SEQ_GAMMA)
    reps = sz.repeats
    dense_reps = sz.dense_big_repeats if T == max(sz.fv_ts) else reps
    contenders: List[Tuple[str, Callable, int]] = []
    for b in backends:
        check_future_values(ours_future_values(d, b), omega_ref, gain_ref, f"{label} ours[{b}]")
        contenders.append((f"ours[{b}]", lambda b=b: ours_future_values(d, b), reps))
    contenders.append(("dense U@r (authors)",
                       lambda: dense_future_values(d["logp"], d["logp_old"], d["mask"], SEQ_GAMMA), dense_reps))
    times = measure(contenders, warmup=1)
    rows = ratio_rows(label, times, f"ours[{backends[0]}]", None)
    cleanup()
    return rows, []


# ----------------------------------------------------------------------------------------------------------
# d: the other sequence ops, ours (plus the dense O(T^2) baseline for future_values); each checked once against
#    an eager reference first
# ----------------------------------------------------------------------------------------------------------


def seq_op_cases(sz: Sizes, backends: List[str]) -> List[Tuple[str, Callable[[], tuple]]]:
    """Build the batch, check every op once against its eager reference, and return (label, run) cases."""
    B, T = sz.seq_b, sz.seq_t
    d = make_seq_batch(B, T)
    tree = make_tree(B, T, d["lengths"])
    ntok = B * T

    def case(op: str, fns: Dict[str, Callable]) -> Tuple[str, Callable[[], tuple]]:
        label = f"{op} B={B} T={T}"

        def run():
            times = measure([(name, fn, sz.repeats) for name, fn in fns.items()], warmup=1)
            rows = []
            for name, ts in times.items():
                med = median(ts)
                rows.append([label, name, fmt_ms(med), f"{fmt_ms(min(ts))}-{fmt_ms(max(ts))}", str(len(ts)),
                             f"{med / ntok * 1e9:.2f}"])
            cleanup()
            return rows, []
        return label, run

    cases = []
    omega_ref, gain_ref = dense_future_values(d["logp"], d["logp_old"], d["mask"], SEQ_GAMMA)
    for b in backends:
        check_future_values(ours_future_values(d, b), omega_ref, gain_ref, f"future_values ours[{b}]")
    fv = {f"ours[{b}]": (lambda b=b: ours_future_values(d, b)) for b in backends}
    fv["dense U@r (authors)"] = lambda: dense_future_values(d["logp"], d["logp_old"], d["mask"], SEQ_GAMMA)
    cases.append(case("future_values", fv))

    score_ref, cand_ref, _ = eager_score_tokens(d["entropy"], d["logp"], d["logp_old"], d["mask"], d["eligible"],
                                                SEQ_GAMMA)
    for b in backends:
        check_scores(ours_score_tokens(d, b), score_ref, cand_ref, f"score_tokens ours[{b}]")
    cases.append(case("score_tokens", {f"ours[{b}]": (lambda b=b: ours_score_tokens(d, b)) for b in backends}))

    adv_ref, lm_ref, ahat_ref = eager_procedure_advantages(tree["rewards"], tree["group_ids"], tree["parent"],
                                                           tree["split"], d["mask"], tree["branch_score"])
    for b in backends:
        check_procedure(ours_procedure_advantages(d, tree, b), adv_ref, lm_ref, ahat_ref,
                        f"procedure_advantages ours[{b}]")
    cases.append(case("procedure_advantages", {f"ours[{b}]": (lambda b=b: ours_procedure_advantages(d, tree, b))
                                               for b in backends}))

    w_ref, a_ref = eager_future_kl_weights(d["logp"], d["logp_old"], d["advantages"], d["mask"])
    for b in backends:
        check_future_kl(ours_future_kl_weights(d, b), w_ref, a_ref, f"future_kl_weights ours[{b}]")
    cases.append(case("future_kl_weights", {f"ours[{b}]": (lambda b=b: ours_future_kl_weights(d, b))
                                            for b in backends}))

    leaf = d["logp"].clone().requires_grad_(True)
    check_policy_loss(ours_policy_loss_fwd_bwd(d, leaf), eager_policy_loss_fwd_bwd(d, leaf), "policy_loss ours")
    # policy_loss has no backend argument: it is elementwise torch plus one reduction.
    cases.append(case("policy_loss fwd+bwd", {"ours": lambda: ours_policy_loss_fwd_bwd(d, leaf)}))
    return cases


# ----------------------------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke check that runs in < 1 minute")
    ap.add_argument("--out", default=None, help="also write the markdown report to this file")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each case, wait up to SECONDS for other processes to leave the CPUs idle")
    ap.add_argument("--retries", type=int, default=0, metavar="N",
                    help="re-run a case up to N more times while other processes used > 0.25 cores during it; "
                         "the attempt with the least other load is reported")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    alloc_line = prime_allocator()
    load_start = load_average()
    sz = Sizes(args.quick)
    device = torch.device("cpu")
    backends = ours_backends(device)
    use_compile = not args.no_compile
    compile_times: List[List[str]] = []

    fwd_cases = [(dn, k) for dn in DTYPES for k in (0, 5)]
    n_cases = len(fwd_cases) + len(DTYPES) + len(sz.fv_ts) + 5
    prog = Progress(n_cases, args.wait_idle)

    def run(label, fn):
        rows, extra = prog.run_case(label, fn, retries=args.retries)
        compile_times.extend(extra)
        return rows

    fwd_rows: List[List[str]] = []
    for dn, k in fwd_cases:
        fwd_rows += run(f"token_stats fwd {dn} topk={k}",
                        lambda dn=dn, k=k: bench_token_stats_fwd(sz, backends, dn, k, use_compile))
    bwd_rows: List[List[str]] = []
    for dn in DTYPES:
        bwd_rows += run(f"token_stats fwd+bwd {dn}", lambda dn=dn: bench_token_stats_bwd(sz, backends, dn, use_compile))
    fv_rows: List[List[str]] = []
    for T in sz.fv_ts:
        fv_rows += run(f"future_values T={T}", lambda T=T: bench_future_values(sz, backends, T))
    seq_rows: List[List[str]] = []
    for label, fn in seq_op_cases(sz, backends):
        seq_rows += run(label, fn)
    prog.close()
    total = time.perf_counter() - t_start

    head = ["case", "contender", "median ms", "min-max ms", "reps", "time / ours", "time / read"]
    lines = [f"# appo_kernels micro-benchmarks ({'quick' if args.quick else 'full'} sizes)", ""]
    lines += header_lines([f"- command: `python {' '.join(['bench/run.py', *(argv or sys.argv[1:])])}`",
                           f"- total wall time of the run: {total:.0f} s",
                           f"- load average (1/5/15 min) at start: {load_start}; at end: {load_average()}",
                           alloc_line])
    if prog.max_load > 0.25:
        lines += ["", f"**Warning: other processes used up to {prog.max_load:.2f} CPU cores during a case (see the "
                  "last table); torch's multi-threaded ops slow down badly when a core is taken, so those cases' "
                  "timings are unreliable. Rerun on an idle machine (or with --wait-idle / --retries).**"]
    lines += ["", "Medians of interleaved repeats in one process; `time / ours` > 1 means ours is faster "
              f"(ours = `ours[{backends[0]}]`, what backend='auto' picks here); `time / read` is the multiple of "
              "the plain read (or read + write) of the same logits.", ""]
    lines += [f"## a. token_stats forward, logits [{sz.n}, {sz.v}], temperature 1", ""]
    lines += md_table(head, fwd_rows)
    lines += ["", "## b. token_stats forward + backward (grad of logp.sum() + entropy.sum()), topk=0", "",
              "Floor: `x.sum()` (the forward's read) + `x.clone()` (the backward's read of x and write of a "
              "same-size gradient).", ""]
    lines += md_table(head[:-1] + ["time / read+write"], bwd_rows)
    if compile_times:
        lines += ["", "torch.compile: compile + first call, seconds (not in the timings above; depends on the "
                  "local inductor cache):", ""]
        lines += md_table(["case", "compile s"], compile_times)
    lines += ["", f"## c. future_values (method §2 Omega), B={sz.fv_b}, gamma={SEQ_GAMMA}, ours vs the authors' "
              "dense O(T^2) approach", "",
              "dense: U[t, k] = gamma^(k-t) (upper-triangular [T, T], built inside the timed call, once per call), "
              "then per rollout F = U @ (mask * (logp - logp_old)), exp of clipped F, clip. Both checked allclose "
              "(omega and gain) before timing.", ""]
    lines += md_table(head[:-1], [r[:-1] for r in fv_rows])
    lines += ["", f"## d. other sequence ops, B={sz.seq_b}, T={sz.seq_t} ({sz.seq_b * sz.seq_t} tokens), "
              "ours (and the dense baseline for future_values)",
              "", "Each op is checked once against an independent eager reference (dense U / per-rollout loops) "
              "before timing. procedure_advantages: groups of 8 rollouts (4 initial, 4 branches), "
              "branch_strength_scaling and train_branches on. policy_loss: token-mean, k3 KL to logp_ref, "
              "forward + backward w.r.t. logp.", ""]
    lines += md_table(["case", "contender", "median ms", "min-max ms", "reps", "ns / token"], seq_rows)
    lines += ["", "## Machine load per case", "",
              "CPU used by other processes while the case ran (average busy cores, from /proc/stat minus this "
              "process); near 0 means the case ran on an otherwise idle machine. With --retries, a case that saw more "
              "than 0.25 cores is run again and the attempt with the least other load is the one reported.", ""]
    lines += md_table(["case", "wall s", "other processes, cores", "waited for idle s", "reported"], prog.loads)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
