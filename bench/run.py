"""The benchmark harness: every measurement case on one device, written as data (one JSON object a line).

    python bench/run.py --wait-idle 1500 --retries 2     # CPU, full sweep -> bench/results/cpu.jsonl
    python bench/run.py --device cuda                    # GPU suite -> bench/results/gpu.jsonl (bench/gpu_check.sh)
    python bench/run.py --quick                          # tiny shapes, few repeats: the harness's smoke check
    python bench/render.py                               # the data -> bench/results/*.md and the README's tables

A case builds its inputs, checks every contender's output against an independent eager reference, then times
the contenders interleaved round-robin in one process. Each contender gives one row per metric (time; peak
memory on CUDA) with its median, quartiles, min, max, every repeat, and the run's machine, versions, commit
and load. Ratios (forward / read, top-k / forward, ...) are computed by bench/render.py from repeats that ran
side by side. See bench/README.md.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import appo_kernels as ak  # noqa: E402
from appo_kernels import backends as ak_backends  # noqa: E402
from _common import (SEQ_GAMMA, OtherLoad, check_future_kl, check_future_values, check_grad,  # noqa: E402
                     check_policy_loss, check_procedure, check_scores, check_token_stats, compile_fn,
                     dense_future_values, eager_future_kl_weights, eager_policy_loss_fwd_bwd,
                     eager_procedure_advantages, eager_score_tokens, eager_token_stats, fwd_bwd, load_average,
                     machine, make_logits, make_seq_batch, make_tree, measure, ours_future_kl_weights,
                     ours_future_values, ours_policy_loss_fwd_bwd, ours_procedure_advantages, ours_score_tokens,
                     ours_token_stats, peak_memory_mib, prime_allocator, read_floor, read_write_floor)

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional: plain progress lines instead
    tqdm = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# ----------------------------------------------------------------------------------------------------------
# what is measured
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    """Shapes and repeats of one suite (cpu or gpu) in full or quick mode."""
    suite: str
    device: torch.device
    quick: bool
    compile: bool
    fwd_shapes: List[Tuple[int, int]]       # logits [N, V]; the first is where every contender runs
    fwd_dtypes: List[str]
    bwd_dtypes: List[str]
    ks: List[int]                           # top-k of ours at every shape
    contender_ks: List[int]                 # top-k of the comparison contenders (eager, torch backend; first shape)
    compile_ks: List[int]                   # top-k of torch.compile (first shape; one compile each)
    compile_dtypes: List[str]
    fv_b: int                               # future_values vs the dense O(T^2) matrix: B rollouts, lengths fv_ts
    fv_ts: List[int]
    seq_b: int                              # the other sequence ops at B x T
    seq_t: int
    repeats: int
    warmup: int
    packed: List[List[int]] = dataclasses.field(default_factory=list)   # GPU: packed scans (segment lengths)


def make_config(suite: str, device: torch.device, quick: bool, use_compile: bool) -> Config:
    if suite == "cpu":
        if quick:
            return Config(suite, device, quick, use_compile, [(64, 512)], ["fp32", "bf16"], ["fp32"],
                          [0, 5], [0, 5], [0, 5], ["fp32", "bf16"], 4, [64], 8, 256, 2, 1)
        # the vocabularies of real models: Llama 2 / Mistral 32000, StarCoder 2 49152, Llama 3 128256,
        # Qwen 2.5 / 3 151936; the rows keep each near the issue-13 shapes ([2048, 32000], [1024, 128256],
        # [512, 151936]) so one case takes a fraction of a second per repeat
        return Config(suite, device, quick, use_compile,
                      [(2048, 32000), (1024, 49152), (1024, 128256), (512, 151936)], ["fp32", "bf16", "fp16"],
                      ["fp32", "bf16"], [0, 5, 16], [0, 5], [0, 5], ["fp32", "bf16"], 16, [1024, 4096, 8192], 64,
                      8192, 5, 1)
    if quick:   # the GPU suite's code paths at tiny sizes (runs on CPU too: the harness's own test)
        return Config(suite, device, quick, use_compile, [(64, 512)], ["bf16"], ["bf16"], [0, 10],
                      [0, 10], [0], ["bf16"], 4, [64], 8, 256, 2, 1, packed=[[256] * 4])
    return Config(suite, device, quick, use_compile,
                  [(16384, 151936), (8192, 151936), (64, 151936), (16384, 32000), (16384, 49152), (16384, 128256)],
                  ["bf16", "fp32"], ["bf16", "fp32"], [0, 10], [0, 10], [0], ["bf16"], 16, [8192], 64, 8192, 20, 3,
                  packed=[[8192] * 512, [1 << 22]])


@dataclasses.dataclass
class Contender:
    name: str                         # "ours[native]", "eager", "read", ...
    fn: Callable[[], object]
    op: str                           # what it computes: token_stats_fwd, read, exp, future_values, ...
    backend: str = ""
    k: int = 0
    elements: Optional[int] = None    # elements processed (the exp-throughput contender)

    @property
    def key(self) -> str:
        return f"{self.name} k={self.k}"


@dataclasses.dataclass
class Case:
    label: str
    family: str                       # token_stats_fwd, token_stats_fwd_bwd, future_values, seq_ops, packed_scan
    shape: List[int]
    dtype: str
    build: Callable[[], List[Contender]]   # inputs and correctness checks; returns the contenders to time


def ours_backends(device: torch.device, op: str, dtype: torch.dtype) -> List[str]:
    """The backends that run `op` on `device` for `dtype`, in the order backend='auto' tries them (so the
    first is what 'auto' picks; the Triton interpreter on CPU, a test tool, is not among them)."""
    return [b for b in ak_backends.PREFERENCE[device.type] if ak_backends.runs(b, op, device, dtype)]


EXP_BLOCK = 4096   # floats: 16 KiB, stays in L1


def exp_library() -> Optional[ctypes.CDLL]:
    """bench/exp_bound.cpp built with the native extension's flags (setup.py; -march from
    APPO_KERNELS_CPU_ARCH, default native) into bench/.build/, rebuilt when a source is newer; None without g++."""
    src = os.path.join(HERE, "exp_bound.cpp")
    numerics = os.path.join(ROOT, "csrc", "cpu", "numerics.h")
    lib = os.path.join(HERE, ".build", "libexp_bound.so")
    if not os.path.exists(lib) or os.path.getmtime(lib) < max(os.path.getmtime(src), os.path.getmtime(numerics)):
        arch = os.environ.get("APPO_KERNELS_CPU_ARCH", "native").strip() or "native"
        os.makedirs(os.path.dirname(lib), exist_ok=True)
        cmd = ["g++", "-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
               *([] if arch == "none" else [f"-march={arch}"]), "-shared", "-fPIC", "-I", os.path.join(ROOT, "csrc"),
               src, "-o", lib]
        try:
            subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"exp bound left out (building {src} failed: {getattr(e, 'stderr', e)})", file=sys.stderr)
            return None
    dll = ctypes.CDLL(lib)
    dll.appo_bench_vexp.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    dll.appo_bench_vexp.restype = ctypes.c_double
    return dll


def exp_contender(elements: int) -> Optional[Contender]:
    """The native kernels' exp (appo::vexp) over an L1-resident block on torch's thread count, `elements` exps:
    what the forward's one exp per logit costs at the machine's exp throughput, with no memory traffic."""
    dll = exp_library()
    if dll is None:
        return None
    block = torch.randn(EXP_BLOCK) * 4
    threads = torch.get_num_threads()
    return Contender("exp bound", lambda: dll.appo_bench_vexp(block.data_ptr(), EXP_BLOCK, elements, threads),
                     "exp", elements=elements)


def token_fwd_case(cfg: Config, n: int, v: int, dn: str, everyone: bool) -> List[Contender]:
    """token_stats forward: ours at each top-k (on every backend in the GPU suite; on CPU the torch backend only
    where `everyone`), the floors (one read; GPU suite: a device copy; CPU suite: the exp bound), and where
    `everyone`, torch eager, torch.compile, Liger and (GPU suite) the Branching Score."""
    dev = cfg.device
    x, tok = make_logits(n, v, DTYPES[dn], device=dev)
    label = f"fwd {dn} [{n}, {v}]"
    out = [Contender("read", lambda: read_floor(x), "read")]
    if cfg.suite == "gpu":
        y = torch.empty_like(x)
        out.append(Contender("copy", lambda: y.copy_(x), "copy"))
    else:
        out += [c for c in [exp_contender(n * v)] if c is not None]
    ks = sorted(set(cfg.ks) | (set(cfg.contender_ks) if everyone else set()))
    # one eager pass for every k: torch.topk's sorted top-k of the largest k holds the smaller ones
    lp = torch.log_softmax(x.float(), -1)
    logp, ent, ids, top = eager_token_stats(x, tok, max(ks))
    for k in ks:
        ref = (logp, ent, ids[:, :k], top[:, :k])
        for i, b in enumerate(ours_backends(dev, "token_stats", DTYPES[dn])):
            if i == 0 or cfg.suite == "gpu" or everyone and k in cfg.contender_ks:
                check_token_stats(ours_token_stats(x, tok, k, backend=b), ref, x, k, f"{label} ours[{b}] k={k}", lp)
                out.append(Contender(f"ours[{b}]", lambda b=b, k=k: ours_token_stats(x, tok, k, backend=b),
                                     "token_stats_fwd", backend=b, k=k))
    del lp, logp, ent, ids, top
    if not everyone:
        return out
    for k in cfg.contender_ks:
        out.append(Contender("eager", lambda k=k: eager_token_stats(x, tok, k), "token_stats_fwd", k=k))
    if cfg.compile and dn in cfg.compile_dtypes:
        for k in cfg.compile_ks:
            torch._dynamo.reset()
            comp = compile_fn(eager_token_stats)
            check_token_stats(comp(x, tok, k), eager_token_stats(x, tok, k), x, k, f"{label} compiled k={k}")
            out.append(Contender("torch.compile", lambda comp=comp, k=k: comp(x, tok, k), "token_stats_fwd", k=k))
    liger = liger_logp(dev)
    if liger is not None:
        xl = x.clone()   # Liger's cross entropy may write its gradient over its input: its own copy
        try:
            torch.testing.assert_close(liger(xl, tok).float(), eager_token_stats(x, tok)[0], atol=2e-3, rtol=2e-3)
            out.append(Contender("liger (logp only)", lambda: liger(xl, tok), "cross_entropy"))
        except Exception as e:  # noqa: BLE001 - a contender, not ours: say so and time the others
            print(f"liger left out of {label}: {type(e).__name__}: {e}", file=sys.stderr)
    if cfg.suite == "gpu":
        out += branching_score_contenders(cfg, x, tok, label)
    return out


def liger_logp(device: torch.device) -> Optional[Callable]:
    """Liger-Kernel's cross entropy, reduction none (= -logp): its nearest op to token_stats; CUDA only."""
    if device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError:
        return None
    return lambda logits, tokens: -liger_cross_entropy(logits, tokens, reduction="none")


def branching_score_contenders(cfg: Config, x: torch.Tensor, tok: torch.Tensor, label: str) -> List[Contender]:
    """ak.branching_score from the logits (token statistics, Omega and the score in one call), rows read as
    rollouts of up to 2048 tokens; checked against the eager token statistics + the dense-U score."""
    n, v = x.shape
    t = min(n, 2048)
    b = n // t
    x3, tok3 = x[: b * t].view(b, t, v), tok[: b * t].view(b, t)
    d = make_seq_batch(b, t, seed=3)
    logp_old, mask, eligible = (d[key].to(x.device) for key in ("logp_old", "mask", "eligible"))
    logp, ent, _, _ = eager_token_stats(x3.reshape(-1, v), tok3.reshape(-1))
    score, cand, _ = eager_score_tokens(ent.view(b, t).cpu(), logp.view(b, t).cpu(), logp_old.cpu(), mask.cpu(),
                                        eligible.cpu(), SEQ_GAMMA)
    out = []
    for bk in ours_backends(cfg.device, "token_stats", x.dtype):
        run = (lambda bk=bk: ak.branching_score(x3, tok3, logp_old, mask, eligible=eligible, gamma=SEQ_GAMMA,
                                                backend=bk))
        try:
            got = run()
        except ak_backends.BackendUnsupported as e:   # a backend that does not run every part of it
            print(f"{label}: branching_score ours[{bk}] left out: {e}", file=sys.stderr)
            continue
        check_scores(got, score.to(x.device), cand.to(x.device), f"{label} branching_score ours[{bk}]")
        out.append(Contender(f"branching_score ours[{bk}]", run, "branching_score", backend=bk))
    return out


def token_fwd_bwd_case(cfg: Config, n: int, v: int, dn: str, everyone: bool) -> List[Contender]:
    """Forward + backward of logp.sum() + entropy.sum() w.r.t. the logits, against one read + one write."""
    dev = cfg.device
    x0, tok = make_logits(n, v, DTYPES[dn], device=dev)
    x = x0.requires_grad_(True)
    label = f"fwd+bwd {dn} [{n}, {v}]"
    ref = fwd_bwd(eager_token_stats, x, tok).clone()
    x.grad = None
    out = [Contender("read+write", lambda: read_write_floor(x), "read+write")]
    if cfg.suite == "gpu":
        y = torch.empty_like(x0.detach())
        out.append(Contender("copy", lambda: y.copy_(x.detach()), "copy"))
    xi = x.detach().clone().requires_grad_(True) if cfg.suite == "gpu" else None   # in-place: overwritten
    for i, b in enumerate(ours_backends(dev, "token_stats", DTYPES[dn])):
        if i and not (everyone or cfg.suite == "gpu"):
            break
        stats = lambda lg, tk, k, b=b: ours_token_stats(lg, tk, k, backend=b)  # noqa: E731
        check_grad(fwd_bwd(stats, x, tok), ref, f"{label} ours[{b}]")
        out.append(Contender(f"ours[{b}]", lambda stats=stats: fwd_bwd(stats, x, tok), "token_stats_fwd_bwd",
                             backend=b))
        if xi is not None:   # the gradient written over the logits: their own copy, overwritten by every call
            with torch.no_grad():
                xi.copy_(x)
            check_grad(inplace_fwd_bwd(xi, tok, b), ref, f"{label} ours[{b}] inplace_backward")
            out.append(Contender(f"ours[{b}] inplace_backward", lambda xi=xi, b=b: inplace_fwd_bwd(xi, tok, b),
                                 "token_stats_fwd_bwd", backend=b))
    if not everyone:
        return out
    out.append(Contender("eager", lambda: fwd_bwd(eager_token_stats, x, tok), "token_stats_fwd_bwd"))
    if cfg.compile and dn in cfg.compile_dtypes:
        torch._dynamo.reset()
        comp = compile_fn(eager_token_stats)
        check_grad(fwd_bwd(comp, x, tok), ref, f"{label} compiled")
        out.append(Contender("torch.compile", lambda: fwd_bwd(comp, x, tok), "token_stats_fwd_bwd"))
    liger = liger_logp(dev)
    if liger is not None:
        xl = x0.detach().clone().requires_grad_(True)

        def liger_fwd_bwd():
            xl.grad = None
            liger(xl, tok).sum().backward()
        out.append(Contender("liger (logp only)", liger_fwd_bwd, "cross_entropy_fwd_bwd"))
    return out


def inplace_fwd_bwd(x: torch.Tensor, tok: torch.Tensor, backend: str) -> torch.Tensor:
    """token_stats(inplace_backward=True) through a non-leaf view of the leaf `x`: the backward writes the
    gradient over x's memory (the logits are gone afterwards). Returns the gradient."""
    x.grad = None
    st = ak.token_stats(x.view_as(x), tok, inplace_backward=True, backend=backend)
    (st.logp.sum() + st.entropy.sum()).backward()
    return x.grad


def future_values_case(cfg: Config, T: int) -> List[Contender]:
    """Omega (method §2): ours on every backend vs the authors' dense O(T^2) U @ r, both checked first."""
    d = {k: t.to(cfg.device) for k, t in make_seq_batch(cfg.fv_b, T).items()}
    omega_ref, gain_ref = dense_future_values(d["logp"].cpu(), d["logp_old"].cpu(), d["mask"].cpu(), SEQ_GAMMA)
    out = []
    for b in ours_backends(cfg.device, "reverse_discounted_scan", torch.float32):
        check_future_values(ours_future_values(d, b), omega_ref.to(cfg.device), gain_ref.to(cfg.device),
                            f"future_values T={T} ours[{b}]")
        out.append(Contender(f"ours[{b}]", lambda b=b: ours_future_values(d, b), "future_values", backend=b))
    out.append(Contender("dense U@r (authors)",
                         lambda: dense_future_values(d["logp"], d["logp_old"], d["mask"], SEQ_GAMMA),
                         "future_values"))
    return out


def seq_op_cases(cfg: Config) -> List[Case]:
    """score_tokens, procedure_advantages, future_kl_weights and policy_loss fwd+bwd at B x T, each checked
    once against its independent eager reference (dense U / per-rollout loops) before timing."""
    B, T = cfg.seq_b, cfg.seq_t
    state: Dict[str, object] = {}

    def batch():
        if "d" not in state:
            d = make_seq_batch(B, T)
            state["tree"] = make_tree(B, T, d["lengths"])
            state["d"] = d
        return state["d"], state["tree"]

    def bks():
        return ours_backends(cfg.device, "reverse_discounted_scan", torch.float32)

    def score_tokens():
        d, _ = batch()
        ref, cand, _ = eager_score_tokens(d["entropy"], d["logp"], d["logp_old"], d["mask"], d["eligible"], SEQ_GAMMA)
        out = []
        for b in bks():
            check_scores(ours_score_tokens(d, b), ref, cand, f"score_tokens ours[{b}]")
            out.append(Contender(f"ours[{b}]", lambda b=b: ours_score_tokens(d, b), "score_tokens", backend=b))
        return out

    def procedure():
        d, tree = batch()
        refs = eager_procedure_advantages(tree["rewards"], tree["group_ids"], tree["parent"], tree["split"],
                                          d["mask"], tree["branch_score"])
        out = []
        for b in bks():
            check_procedure(ours_procedure_advantages(d, tree, b), *refs, f"procedure_advantages ours[{b}]")
            out.append(Contender(f"ours[{b}]", lambda b=b: ours_procedure_advantages(d, tree, b),
                                 "procedure_advantages", backend=b))
        return out

    def future_kl():
        d, _ = batch()
        w, a = eager_future_kl_weights(d["logp"], d["logp_old"], d["advantages"], d["mask"])
        out = []
        for b in bks():
            check_future_kl(ours_future_kl_weights(d, b), w, a, f"future_kl_weights ours[{b}]")
            out.append(Contender(f"ours[{b}]", lambda b=b: ours_future_kl_weights(d, b), "future_kl_weights",
                                 backend=b))
        return out

    def loss():
        d, _ = batch()
        leaf = d["logp"].clone().requires_grad_(True)
        check_policy_loss(ours_policy_loss_fwd_bwd(d, leaf), eager_policy_loss_fwd_bwd(d, leaf), "policy_loss")
        # policy_loss has no backend argument: it is elementwise torch plus one reduction
        return [Contender("ours", lambda: ours_policy_loss_fwd_bwd(d, leaf), "policy_loss_fwd_bwd")]

    def on_device(build):
        # the GPU suite moves the batch to the device once; the CPU suite runs it where it is made
        def run():
            if cfg.device.type != "cpu" and "moved" not in state:
                d, tree = batch()
                state["d"] = {k: t.to(cfg.device) for k, t in d.items()}
                state["tree"] = {k: t.to(cfg.device) if torch.is_tensor(t) else t for k, t in tree.items()}
                state["moved"] = True
            return build()
        return run

    ops = [("score_tokens", score_tokens), ("future_kl_weights", future_kl)]
    if cfg.suite == "cpu":   # the GPU suite times the kernels; these two are torch compositions on top
        ops = [("score_tokens", score_tokens), ("procedure_advantages", procedure), ("future_kl_weights", future_kl),
               ("policy_loss fwd+bwd", loss)]
    return [Case(f"{op} B={B} T={T}", "seq_ops", [B, T], "fp32", on_device(build)) for op, build in ops]


def packed_scan_case(cfg: Config, lens: List[int]) -> List[Contender]:
    """future_values on packed segments (cu_seqlens), every GPU backend checked against the torch backend."""
    n = sum(lens)
    g = torch.Generator(device=cfg.device).manual_seed(1)
    cu = torch.tensor([0] + lens, device=cfg.device).cumsum(0)
    logp = torch.randn(n, device=cfg.device, generator=g) * 0.3 - 1
    logp_old = logp + torch.randn(n, device=cfg.device, generator=g) * 0.05
    mask = torch.rand(n, device=cfg.device, generator=g) > 0.2

    def run(b):
        return ak.future_values(logp, logp_old, mask, cu_seqlens=cu, gamma=SEQ_GAMMA, backend=b)
    ref = run("torch")
    out = []
    for b in ours_backends(cfg.device, "reverse_discounted_scan", torch.float32):
        got = run(b)
        torch.testing.assert_close(got.omega, ref.omega, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.gain, ref.gain, atol=2e-4, rtol=1e-4)
        out.append(Contender(f"ours[{b}]", lambda b=b: run(b), "future_values", backend=b))
    return out


def cases(cfg: Config) -> List[Case]:
    out = []
    for i, (n, v) in enumerate(cfg.fwd_shapes):
        for dn in cfg.fwd_dtypes:
            everyone = i == 0 and dn in ("fp32", "bf16")
            if cfg.suite == "gpu" and dn == "fp32" and i:   # fp32 on the GPU: the largest shape only
                continue
            out.append(Case(f"token_stats fwd {dn} [{n}, {v}]", "token_stats_fwd", [n, v], dn,
                            lambda n=n, v=v, dn=dn, e=everyone: token_fwd_case(cfg, n, v, dn, e)))
    for i, (n, v) in enumerate(cfg.fwd_shapes):
        for dn in cfg.bwd_dtypes:
            if cfg.suite == "gpu" and (i > 1 or dn == "fp32" and i):
                continue
            everyone = i == 0 and dn in ("fp32", "bf16")
            out.append(Case(f"token_stats fwd+bwd {dn} [{n}, {v}]", "token_stats_fwd_bwd", [n, v], dn,
                            lambda n=n, v=v, dn=dn, e=everyone: token_fwd_bwd_case(cfg, n, v, dn, e)))
    for T in cfg.fv_ts:
        out.append(Case(f"future_values B={cfg.fv_b} T={T}", "future_values", [cfg.fv_b, T], "fp32",
                        lambda T=T: future_values_case(cfg, T)))
    out += seq_op_cases(cfg)
    for lens in cfg.packed:
        out.append(Case(f"future_values packed {len(lens)} x {lens[0]}", "packed_scan", [len(lens), lens[0]],
                        "fp32", lambda lens=lens: packed_scan_case(cfg, lens)))
    return out


# ----------------------------------------------------------------------------------------------------------
# running a case: waiting for a quiet machine, retries, rows
# ----------------------------------------------------------------------------------------------------------


class Progress:
    """One progress line per case (a tqdm bar if tqdm is installed) and the other processes' CPU use during
    each attempt (see _common.OtherLoad). `wait_idle` is the run's total budget, in seconds, for waiting until
    other processes have used < 0.1 cores for two consecutive seconds: the first case may spend all of it,
    every later attempt at most 30 s of what is left."""

    def __init__(self, total: int, wait_idle: float = 0.0):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.wait_left = wait_idle
        self.bar = tqdm(total=total, unit="case", file=sys.stderr) if tqdm is not None else None

    def _wait(self, first: bool) -> Tuple[float, bool]:
        """-> (seconds waited, whether two quiet seconds were seen)."""
        limit = self.wait_left if first else min(30.0, self.wait_left)
        t0 = time.perf_counter()
        quiet = 0
        while quiet < 2 and time.perf_counter() - t0 < limit:
            with OtherLoad() as probe:
                time.sleep(1.0)
            quiet = quiet + 1 if probe.cores < 0.1 else 0
        waited = time.perf_counter() - t0
        self.wait_left = max(0.0, self.wait_left - waited)
        return waited, quiet >= 2

    def _say(self, msg: str) -> None:
        if self.bar is None:
            print(msg, file=sys.stderr, flush=True)

    def run_case(self, case: Case, device: torch.device, warmup: int, repeats: int, retries: int,
                 threshold: float = 0.25) -> Tuple[List[Contender], Dict[str, List[float]], Dict[str, object]]:
        """Build and time `case`, again up to `retries` times while other processes used more than `threshold`
        cores during it and the machine was quiet again before the retry (re-running on a machine that stays
        busy would only take longer); returns the attempt with the least other load: (contenders, times,
        load info)."""
        best = None
        for attempt in range(retries + 1):
            waited, quiet = self._wait(self.done == 0 and attempt == 0) if self.wait_left > 0 else (0.0, False)
            if attempt and not quiet:
                break
            if self.bar is not None:
                self.bar.set_description(case.label)
            self._say(f"[{self.done + 1}/{self.total}] {case.label}" + (f" (attempt {attempt + 1})" if attempt else ""))
            with OtherLoad() as load:
                contenders = case.build()
                times = measure([(c.key, c.fn, repeats) for c in contenders], warmup=warmup, device=device)
            info = {"other_load_cores": round(load.cores, 3), "case_wall_s": round(load.wall, 2),
                    "waited_idle_s": round(waited, 1), "quiet_before": quiet, "attempt": attempt + 1}
            self._say(f"    {load.wall:.1f} s, other processes {load.cores:.2f} cores "
                      f"(total {time.perf_counter() - self.t0:.0f} s)")
            if best is None or load.cores < best[2]["other_load_cores"]:
                best = (contenders, times, info)
            else:
                del contenders, times
            if load.cores <= threshold:
                break
            gc.collect()
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        best[2]["attempts"] = attempt + (0 if attempt and not quiet else 1)
        return best

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary(xs: Sequence[float]) -> Dict[str, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs),
            "n_repeats": len(xs)}


def case_rows(case: Case, contenders: List[Contender], times: Dict[str, List[float]], info: Dict[str, object],
              device: torch.device) -> List[Dict[str, object]]:
    rows = []
    for c in contenders:
        base = {"case": case.label, "family": case.family, "op": c.op, "contender": c.name, "backend": c.backend,
                "shape": case.shape, "dtype": case.dtype, "k": c.k}
        ms = [t * 1e3 for t in times[c.key]]
        rows.append({**base, "metric": "time", "unit": "ms", **summary(ms), "samples": [round(t, 6) for t in ms],
                     **({"elements": c.elements} if c.elements else {}), **info})
        if device.type == "cuda" and case.family.startswith("token_stats"):
            rows.append({**base, "metric": "peak_memory", "unit": "MiB", **summary([peak_memory_mib(c.fn, device)]),
                         **info})
    return rows


def measure_cases(todo: List[Case], prog: Progress, cfg: Config, retries: int, rows: List[Dict[str, object]],
                  failed: List[str]) -> None:
    """Run the cases in order, appending their rows (or an error row) to `rows`."""
    for case in todo:
        try:
            contenders, times, info = prog.run_case(case, cfg.device, cfg.warmup, cfg.repeats, retries)
            rows += case_rows(case, contenders, times, info, cfg.device)
        except Exception as e:  # noqa: BLE001 - a failed check or a crash: recorded, the other cases still run
            failed.append(case.label)
            print(f"FAILED {case.label}: {type(e).__name__}: {e}", file=sys.stderr)
            rows.append({"case": case.label, "family": case.family, "shape": case.shape, "dtype": case.dtype,
                         "metric": "error", "message": f"{type(e).__name__}: {e}"[:2000]})
        contenders = times = None   # the case's inputs go with them (reference counting; no cycles hold them)
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()


class Interrupted(BaseException):
    """SIGTERM (e.g. from `timeout`): stop after writing the rows measured so far."""


def _interrupt(signum, frame):
    raise Interrupted(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to measure (default: cuda when present, else cpu)")
    ap.add_argument("--suite", choices=("cpu", "gpu"), default=None,
                    help="which cases (default: gpu on cuda, cpu on cpu; --suite gpu --device cpu --quick checks "
                         "the GPU suite's code on a CPU)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes and 2 repeats: a smoke check in seconds")
    ap.add_argument("--data", default=None,
                    help="the JSON-lines file to write (default: bench/results/SUITE.jsonl; quick: "
                         "bench/results/quick-SUITE.jsonl, not committed)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="total time to spend waiting for other processes to leave the CPUs idle: up to all of it "
                         "before the first case, up to 30 s of what is left before each later one")
    ap.add_argument("--retries", type=int, default=0, metavar="N",
                    help="re-run a case up to N more times while other processes used > 0.25 cores during it, "
                         "each time the machine is quiet again within the --wait-idle budget; the attempt with the "
                         "least other load is kept")
    ap.add_argument("-k", dest="only", default="", help="run only the cases whose label contains this")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    suite = args.suite or ("gpu" if device.type == "cuda" else "cpu")
    cfg = make_config(suite, device, args.quick, not args.no_compile)
    if cfg.compile:   # dynamo keys its cache on the code object: one recompile per dtype / top-k / grad mode
        for attr in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, attr):
                setattr(torch._dynamo.config, attr, 64)
    data = args.data or os.path.join(RESULTS, f"{'quick-' if args.quick else ''}{suite}.jsonl")

    t_start = time.perf_counter()
    if device.type == "cpu":
        prime_allocator()
    run_info = {"suite": suite, "mode": "quick" if args.quick else "full",
                "command": "python bench/run.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv)),
                **machine(device), "load_avg_start": load_average()}
    todo = [c for c in cases(cfg) if args.only in c.label]
    prog = Progress(len(todo), args.wait_idle)
    rows: List[Dict[str, object]] = []
    failed: List[str] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        measure_cases(todo, prog, cfg, args.retries, rows, failed)
    except (Interrupted, KeyboardInterrupt) as e:
        run_info["interrupted"] = f"{type(e).__name__} {e} after {prog.done} of {len(todo)} cases"
        print(f"interrupted: writing the {len(rows)} rows measured so far", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
    prog.close()
    run_info.update(load_avg_end=load_average(), run_wall_s=round(time.perf_counter() - t_start, 1))
    os.makedirs(os.path.dirname(os.path.abspath(data)), exist_ok=True)
    with open(data, "w") as f:
        for row in rows:
            f.write(json.dumps({**run_info, **row}) + "\n")
    print(f"{len(rows)} rows written to {data} in {run_info['run_wall_s']:.0f} s; "
          f"render with: python bench/render.py", file=sys.stderr)
    if failed:
        print(f"{len(failed)} cases FAILED (error rows in the data): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed or "interrupted" in run_info else 0


if __name__ == "__main__":
    sys.exit(main())
