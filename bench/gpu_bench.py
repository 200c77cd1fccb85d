"""GPU benchmark: every backend against the torch backend (correctness) and against torch eager,
torch.compile and Liger-Kernel (time, achieved bandwidth as a fraction of a device-to-device copy measured in
the same run, peak memory). Run by bench/gpu_check.sh on a GPU machine:

    python bench/gpu_bench.py --out bench/results/gpu.md            # [16384, 151936] bf16, T up to 8192
    python bench/gpu_bench.py --device cpu --small --no-compile     # smoke check of the script itself

Timings are medians of CUDA-event timed repeats (perf_counter on CPU) after a warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time
from typing import Callable, Dict, List

import torch

import appo_kernels as ak
from appo_kernels import backends


def timer(device: torch.device, fn: Callable, reps: int) -> float:
    """Median milliseconds of fn() over `reps` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mib(device: torch.device, fn: Callable) -> float:
    """Peak extra device memory of fn() in MiB (CUDA only; NaN on CPU)."""
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def eager_stats(logits: torch.Tensor, tokens: torch.Tensor):
    lsm = torch.log_softmax(logits.float(), dim=-1)
    logp = lsm.gather(-1, tokens[:, None]).squeeze(-1)
    return logp, -(lsm.exp() * lsm).sum(-1)


def liger_logp():
    """Liger-Kernel's cross entropy (reduction none) = -logp: its nearest op to token_stats, if installed."""
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None
    return lambda logits, tokens: -liger_cross_entropy(logits, tokens, reduction="none")


def token_stats_rows(device, n, v, dtype, reps, compile_eager) -> List[List[str]]:
    g = torch.Generator(device=device).manual_seed(0)
    logits = (torch.randn(n, v, device=device, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, v, (n,), device=device, generator=g)
    nbytes = logits.numel() * logits.element_size()
    copy_dst = torch.empty_like(logits)
    copy_ms = timer(device, lambda: copy_dst.copy_(logits), reps)
    copy_bw = 2 * nbytes / (copy_ms * 1e-3)  # bytes moved per second by a device-to-device copy
    del copy_dst
    ref = ak.token_stats(logits, tokens, backend="torch")

    def fwd_bwd(fn):
        def run():
            x = logits.detach().requires_grad_()
            logp, ent = fn(x)
            (logp.sum() + ent.sum()).backward()
        return run

    contenders: Dict[str, tuple] = {}
    ref_top = ak.token_stats(logits, tokens, topk=10, backend="torch")
    for name in ak.available_backends():
        if backends.runs(name, "token_stats", device, dtype):
            out = ak.token_stats(logits, tokens, backend=name)
            err = max((out.logp - ref.logp).abs().max().item(), (out.entropy - ref.entropy).abs().max().item())
            stats = (lambda x, name=name: ak.token_stats(x, tokens, backend=name)[:2])
            contenders[f"ours[{name}]"] = (stats, err)
            # top-10 in the same pass; then the gradient written over the logits (x.view_as(x): not a leaf)
            out = ak.token_stats(logits, tokens, topk=10, backend=name)
            err = (out.topk_logp - ref_top.topk_logp).abs().max().item()
            contenders[f"ours[{name}] topk=10"] = (
                lambda x, name=name: ak.token_stats(x, tokens, topk=10, backend=name)[:2], err)
            contenders[f"ours[{name}] inplace_backward"] = (
                lambda x, name=name: ak.token_stats(x.view_as(x), tokens, inplace_backward=True, backend=name)[:2],
                float("nan"))
    contenders["eager"] = (lambda x: eager_stats(x, tokens), float("nan"))
    if compile_eager:
        compiled = torch.compile(eager_stats, dynamic=False)
        compiled(logits, tokens)
        contenders["torch.compile"] = (lambda x: compiled(x, tokens), float("nan"))
    liger = liger_logp()
    if liger is not None and device.type == "cuda":
        contenders["liger cross_entropy (logp only)"] = (lambda x: (liger(x, tokens), torch.zeros(())), float("nan"))

    rows = []
    for label, (fn, err) in contenders.items():
        f_ms = timer(device, lambda: fn(logits), reps)
        b_ms = timer(device, fwd_bwd(fn), reps)
        rows.append([f"token_stats [{n}, {v}] {str(dtype).split('.')[-1]}", label, f"{f_ms:.3f}",
                     f"{(nbytes / (f_ms * 1e-3)) / copy_bw:.2f}", f"{b_ms:.3f}",
                     f"{(2 * nbytes / (b_ms * 1e-3)) / copy_bw:.2f}", f"{peak_mib(device, fwd_bwd(fn)):.0f}",
                     f"{err:.1e}"])
    return rows, copy_ms


def sequence_rows(device, b, t, reps) -> List[List[str]]:
    g = torch.Generator(device=device).manual_seed(1)
    n = b * t
    cu = torch.arange(b + 1, device=device) * t
    logp = torch.randn(n, device=device, generator=g) * 0.3 - 1
    logp_old = logp + torch.randn(n, device=device, generator=g) * 0.05
    entropy = torch.rand(n, device=device, generator=g) * 4
    mask = torch.rand(n, device=device, generator=g) > 0.2
    ops = {
        "future_values": lambda be: ak.future_values(logp, logp_old, mask, cu_seqlens=cu, gamma=0.995,
                                                     backend=be).omega,
        "score_tokens": lambda be: ak.score_tokens(entropy, logp, logp_old, mask, cu_seqlens=cu, backend=be).score,
        "future_kl_weights": lambda be: ak.future_kl_weights(logp, logp_old, entropy - 2, mask, cu_seqlens=cu,
                                                             backend=be).advantages,
    }
    rows = []
    for op, fn in ops.items():
        ref = fn("torch")
        for name in ak.available_backends():
            if not backends.runs(name, "reverse_discounted_scan", device, torch.float32):
                continue
            out = fn(name)
            finite = torch.isfinite(ref)
            err = (out[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
            ms = timer(device, lambda: fn(name), reps)
            rows.append([f"{op} B={b} T={t}", f"ours[{name}]", f"{ms:.3f}", f"{ms * 1e6 / n:.2f}", f"{err:.1e}"])
    return rows


def table(header: List[str], rows: List[List[str]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small sizes (a smoke check of this script)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contender")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    shapes = [(64, 4096), (2, 4096)] if args.small else [(16384, 151936), (64, 151936)]   # few rows: split grid
    seq = (4, 512) if args.small else (64, 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"# appo_kernels GPU benchmark ({'small' if args.small else 'full'} sizes)", "",
             f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: {name}",
             f"- torch {torch.__version__}, cuda {torch.version.cuda}, appo_kernels {ak.__version__}, "
             f"backends {ak.available_backends()}", ""]
    header = ["case", "contender", "fwd ms", "fwd bw / copy", "fwd+bwd ms", "fwd+bwd bw / copy", "peak MiB",
              "max err vs torch"]
    rows = []
    for n, v in shapes:
        for dtype in (torch.bfloat16, torch.float32):
            r, copy_ms = token_stats_rows(device, n, v, dtype, args.reps, not args.no_compile)
            rows += r
            lines.append(f"- device-to-device copy of the [{n}, {v}] {dtype} logits: {copy_ms:.3f} ms")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    lines += [""] + table(header, rows) + [""]
    lines += table(["case", "contender", "ms", "ns / token", "max err vs torch"], sequence_rows(device, *seq, args.reps))
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
