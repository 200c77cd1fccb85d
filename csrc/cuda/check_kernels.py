#!/usr/bin/env python3
"""Check the CUDA kernels of csrc/cuda against the torch reference backend, through their extern "C" ABI.

Two targets, same cases:

  CPU, no GPU needed (the kernels run in the SIMT emulator of csrc/cuda/emu; checks their logic):
      python3 csrc/cuda/check_kernels.py                     # builds emu/build/libappo_cuda_emu.so first
      python3 csrc/cuda/check_kernels.py --asan              # the same under AddressSanitizer (out of bounds)

  GPU (the real kernels; see csrc/cuda/README):
      nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fPIC -shared csrc/cuda/*.cu -o /tmp/libappo_cuda.so
      python3 csrc/cuda/check_kernels.py --lib /tmp/libappo_cuda.so [--large]

--large adds real-size cases (logits [16384, 151936] bf16 and small-n split-path rows), a CUDA-graph capture
and the long single-segment scan. Timings are the benchmark harness's (bench/run.py --device cuda, run by
bench/gpu_check.sh), through the public ops.
Needs torch (CPU torch for the emulator, CUDA torch for --lib). Exit status 1 on any mismatch.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import pathlib
import subprocess
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))
from appo_kernels import _layout  # noqa: E402
from appo_kernels.backends.torch_ref import sequence as ref_seq  # noqa: E402
from appo_kernels.backends.torch_ref import vocab as ref_vocab  # noqa: E402
from appo_kernels.backends._interface import TokenOptions, empty_row_stats  # noqa: E402

DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DNAME = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
P, INT, I64, F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float

LIB = None
DEV = torch.device("cpu")
GPU = False
FAILS: list[str] = []


def load(path: str) -> None:
    global LIB
    LIB = ctypes.CDLL(path)
    LIB.appo_token_stats_fwd_cuda.argtypes = [P, INT, I64, I64, I64, P, I64, F, INT, INT, P, P, P, P, P, P, P, P]
    LIB.appo_token_stats_bwd_cuda.argtypes = [P, INT, I64, I64, I64, P, I64, F, INT, INT, P, P, P, P, P, P, P, P]
    LIB.appo_reverse_scan_cuda.argtypes = [P, P, I64, I64, F, P, P]
    LIB.appo_branching_score_cuda.argtypes = [P, P, P, P, I64, I64, P, P, P]
    for fn in ("appo_token_stats_fwd_cuda", "appo_token_stats_bwd_cuda", "appo_reverse_scan_cuda",
               "appo_branching_score_cuda"):
        getattr(LIB, fn).restype = ctypes.c_int


def ptr(t):
    return None if t is None else t.data_ptr()


def stream():
    return torch.cuda.current_stream().cuda_stream if GPU else None


def sync():
    if GPU:
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ calls
def fwd_buffers(n, topk, entropy_topk):
    f = dict(device=DEV)
    return dict(logp=torch.full((n,), 7.0, **f), entropy=torch.full((n,), 7.0, **f), lse=torch.full((n,), 7.0, **f),
                topk_ids=torch.full((n, topk), 77, dtype=torch.int64, **f), topk_logp=torch.full((n, topk), 7.0, **f),
                topk_set=torch.full((n, topk + 1), 77, dtype=torch.int64, **f) if entropy_topk else None,
                c=torch.full((n,), 7.0, **f) if entropy_topk else None)


def cuda_fwd_into(out, logits, tokens, temperature, topk, ignore_index, entropy_topk):
    n, v = logits.shape
    assert logits.stride(1) == 1
    rc = LIB.appo_token_stats_fwd_cuda(
        ptr(logits), DTYPES[logits.dtype], n, v, logits.stride(0), ptr(tokens), ignore_index, 1.0 / temperature,
        topk, int(entropy_topk), ptr(out["logp"]), ptr(out["entropy"]), ptr(out["lse"]),
        ptr(out["topk_ids"]) if topk else None, ptr(out["topk_logp"]) if topk else None, ptr(out["topk_set"]),
        ptr(out["c"]), stream())
    assert rc == 0, f"appo_token_stats_fwd_cuda returned {rc}"
    return out


def cuda_fwd(logits, tokens, temperature, topk, ignore_index, entropy_topk):
    out = cuda_fwd_into(fwd_buffers(logits.shape[0], topk, entropy_topk), logits, tokens, temperature, topk,
                        ignore_index, entropy_topk)
    sync()
    return out


def cuda_bwd_into(grad, logits, tokens, temperature, topk, ignore_index, entropy_topk, st, g_logp, g_entropy):
    n, v = logits.shape
    rc = LIB.appo_token_stats_bwd_cuda(
        ptr(logits), DTYPES[logits.dtype], n, v, logits.stride(0), ptr(tokens), ignore_index, 1.0 / temperature,
        topk, int(entropy_topk), ptr(st["lse"]), ptr(st["entropy"]), ptr(st["topk_set"]), ptr(st["c"]),
        ptr(g_logp), ptr(g_entropy), ptr(grad), stream())
    assert rc == 0, f"appo_token_stats_bwd_cuda returned {rc}"
    return grad


def cuda_bwd(logits, *args):
    grad = torch.full(logits.shape, 3.0, dtype=logits.dtype, device=DEV)
    cuda_bwd_into(grad, logits, *args)
    sync()
    return grad


# ------------------------------------------------------------------------------------------------ checks
def check(name, got, want, rtol, atol, exact=False):
    """Compare on the tensors' device, in row chunks (real-size gradients hold billions of elements)."""
    want = want.to(got.device)
    if got.shape != want.shape:
        FAILS.append(f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
        return False
    g2, w2 = got.reshape(got.shape[0], -1) if got.dim() else got.reshape(1, 1), \
        want.reshape(want.shape[0], -1) if want.dim() else want.reshape(1, 1)
    rows = max(1, (1 << 26) // max(1, g2.shape[1]))
    nbad, first, maxdiff = 0, None, 0.0
    for r0 in range(0, g2.shape[0], rows):
        g, w = g2[r0:r0 + rows], w2[r0:r0 + rows]
        if exact:
            bad = g != w
        else:
            g, w = g.double(), w.double()
            bad = ~torch.isclose(g, w, rtol=rtol, atol=atol, equal_nan=True)  # inf == inf; inf vs x fails
            maxdiff = max(maxdiff, (g - w).abs().nan_to_num(0, 0, 0).max().item() if g.numel() else 0.0)
        cnt = int(bad.sum())
        if cnt and first is None:
            idx = torch.nonzero(bad)[:3]
            first = [(int(i[0]) + r0, int(i[1])) for i in idx]
            vals = [(g[tuple(i)].item(), w[tuple(i)].item()) for i in idx]
        nbad += cnt
    if nbad:
        FAILS.append(f"{name}: {nbad} of {got.numel()} differ (max |diff| {maxdiff:.3g}); first at "
                     f"[row, col] {first}: (got, want) {vals}")
        return False
    return True


def make_logits(n, v, dtype, kind, gen, stride_pad=0, offset=0):
    dgen = torch.Generator(device=DEV).manual_seed(int(torch.randint(0, 1 << 30, (1,), generator=gen)))
    f = dict(generator=dgen, device=DEV)
    base = torch.randn(n, v, **f) * 3
    if kind == "ties":
        base = torch.round(base)  # many equal values
    elif kind == "const":
        base = torch.full((n, v), 1.5, device=DEV)
    elif kind == "masked":
        base[torch.rand(n, v, **f) < 0.6] = -math.inf
        base[:, 0] = 0.25  # at least one finite entry per row (id 0)
    elif kind == "shift":
        base = base + 100.0
    elif kind == "onehot":
        base = torch.full((n, v), -math.inf, device=DEV)
        base[torch.arange(n, device=DEV), torch.randint(0, v, (n,), **f)] = 2.0
    storage = torch.zeros(offset + n * (v + stride_pad) + 8, dtype=dtype, device=DEV)
    view = storage[offset:offset + n * (v + stride_pad)].view(n, v + stride_pad)[:, :v]
    view.copy_(base.to(dtype))
    return view


def fwd_tol():
    # The emulator's exp2 is exact; the GPU's ex2.approx is within ~2^-22 relative per element.
    return dict(rtol=2e-5, atol=2e-5) if not GPU else dict(rtol=5e-5, atol=5e-5)


def run_token_case(name, n, v, dtype, kind, topk, entropy_topk, temperature=1.0, stride_pad=0, offset=0,
                   ignore_rows=(), seed=0, backward=True, extra_rows=None, bad_tokens=None):
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits(n, v, dtype, kind, gen, stride_pad, offset)
    if extra_rows:
        for r, vals in extra_rows.items():
            logits[r] = vals.to(dtype)
    tokens = torch.randint(0, v, (n,), generator=gen)
    if kind == "masked":  # targets on finite logits
        picked = logits[torch.arange(n, device=DEV), tokens.to(DEV)].float().cpu()
        tokens = torch.where(torch.isinf(picked), 0, tokens)
    ignore = -100
    for r in ignore_rows:
        tokens[r] = ignore
    for r, tok in (bad_tokens or {}).items():   # ids outside [0, V) (value checks off): never read, NaN logp
        tokens[r] = tok
    tokens = tokens.to(DEV)
    got = cuda_fwd(logits, tokens, temperature, topk, ignore, entropy_topk)
    opts = TokenOptions(temperature, topk, ignore, entropy_topk)
    want = empty_row_stats(n, topk, entropy_topk, logits.float())
    ref_vocab.token_stats_forward(logits.float(), tokens, opts, want)
    t = fwd_tol()
    ok = check(f"{name} logp", got["logp"], want.logp, **t)
    ok &= check(f"{name} entropy", got["entropy"], want.entropy, **t)
    ok &= check(f"{name} lse", got["lse"], want.lse, **t)
    ok &= check(f"{name} topk_ids", got["topk_ids"], want.topk_ids, 0, 0, exact=True)
    ok &= check(f"{name} topk_logp", got["topk_logp"], want.topk_logp, **t)
    if entropy_topk:
        ok &= check(f"{name} topk_set", got["topk_set"], want.topk_set, 0, 0, exact=True)
        ok &= check(f"{name} c", got["c"], want.c, **t)
    if backward:
        g_logp = torch.randn(n, generator=gen).to(DEV)
        g_ent = (torch.randn(n, generator=gen) * 0.5).clamp(-1, 1).to(DEV)  # |g_H| > 1 makes the reference NaN
        st = dict(lse=want.lse.contiguous(), entropy=want.entropy.contiguous(),  # saved as autograd would
                  topk_set=want.topk_set.contiguous() if entropy_topk else None,
                  c=want.c.contiguous() if entropy_topk else None)
        g = cuda_bwd(logits, tokens, temperature, topk, ignore, entropy_topk, st, g_logp, g_ent)
        gw = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        ref_vocab.token_stats_backward(logits.float(), tokens, want.saved(), g_logp, g_ent, opts, gw)
        if dtype == torch.float32:
            ok &= check(f"{name} grad", g, gw, rtol=1e-4, atol=1e-6)
        else:  # one rounding of (almost) the same fp32 value: one ulp of the 16-bit type
            ok &= check(f"{name} grad", g.float(), gw.to(dtype).float(), rtol=1e-2, atol=1e-6)
    return ok


def token_cases(large):
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        dn = DNAME[dtype]
        for v in (1, 7, 64, 1001):
            for topk, et in ((0, False), (1, False), (5, True), (33, True), (64, False)):
                if topk <= v:
                    cases.append((f"{dn} v{v} k{topk} et{int(et)}",
                                  dict(n=5, v=v, dtype=dtype, kind="randn", topk=topk, entropy_topk=et,
                                       ignore_rows=(2,))))
        cases.append((f"{dn} strided+offset", dict(n=6, v=515, dtype=dtype, kind="randn", topk=10, entropy_topk=True,
                                                    stride_pad=3, offset=1, temperature=0.7)))
        cases.append((f"{dn} ties", dict(n=4, v=700, dtype=dtype, kind="ties", topk=40, entropy_topk=True)))
        cases.append((f"{dn} const", dict(n=3, v=300, dtype=dtype, kind="const", topk=20, entropy_topk=True)))
        cases.append((f"{dn} masked", dict(n=4, v=900, dtype=dtype, kind="masked", topk=64, entropy_topk=True)))
        cases.append((f"{dn} masked exact", dict(n=4, v=900, dtype=dtype, kind="masked", topk=3, entropy_topk=False)))
        cases.append((f"{dn} shift", dict(n=3, v=999, dtype=dtype, kind="shift", topk=8, entropy_topk=False)))
        cases.append((f"{dn} onehot", dict(n=3, v=257, dtype=dtype, kind="onehot", topk=4, entropy_topk=True)))
    # k above the number of finite entries, and an all -inf row (NaN statistics)
    row = torch.full((300,), -math.inf)
    row[[3, 7]] = torch.tensor([1.0, 2.0])
    cases.append(("f32 few finite", dict(n=3, v=300, dtype=torch.float32, kind="randn", topk=6, entropy_topk=True,
                                         extra_rows={1: row, 2: torch.full((300,), -math.inf)}, backward=False)))
    # token ids outside [0, V), as they arrive with value checks off (under ASan: no read outside the row)
    for et, topk in ((False, 0), (True, 5)):
        cases.append((f"f32 ids out of range et{int(et)}", dict(n=5, v=300, dtype=torch.float32, kind="randn",
                                                               topk=topk, entropy_topk=et,
                                                               bad_tokens={1: 300, 2: -5, 4: 10 ** 7})))
    cases.append(("split ids out of range", dict(n=2, v=20000, dtype=torch.bfloat16, kind="randn", topk=3,
                                                 entropy_topk=False, bad_tokens={0: 20000, 1: -1})))
    # the split-vocabulary path (rows < 2 x SMs; the emulator reports EMU_SMS = 8 SMs)
    for dtype in (torch.float32, torch.bfloat16):
        cases.append((f"split {DNAME[dtype]}", dict(n=2, v=40000 if dtype == torch.bfloat16 else 20000, dtype=dtype,
                                                    kind="randn", topk=50, entropy_topk=True)))
        cases.append((f"split ignore {DNAME[dtype]}", dict(n=3, v=20000, dtype=dtype, kind="ties", topk=12,
                                                           entropy_topk=False, ignore_rows=(1,), stride_pad=1)))
    cases.append(("split many f16", dict(n=1, v=70001, dtype=torch.float16, kind="randn", topk=64, entropy_topk=True,
                                         offset=3)))
    cases.append(("split many ties f32", dict(n=2, v=70000, dtype=torch.float32, kind="ties", topk=64,
                                              entropy_topk=False)))
    if large:
        v = 151936
        cases.append(("LARGE bf16 16384x151936 k0", dict(n=16384, v=v, dtype=torch.bfloat16, kind="randn", topk=0,
                                                        entropy_topk=False, ignore_rows=(5, 77))))
        cases.append(("LARGE bf16 4096x151936 k10 et", dict(n=4096, v=v, dtype=torch.bfloat16, kind="randn",
                                                           topk=10, entropy_topk=True, ignore_rows=(3,))))
        cases.append(("LARGE bf16 1024x151936 k64 ties", dict(n=1024, v=v, dtype=torch.bfloat16, kind="ties",
                                                             topk=64, entropy_topk=True)))
        for n in (1, 7, 100, 263):  # split path on an H200 (132 SMs): n < 264
            cases.append((f"LARGE split bf16 {n}x151936 k10", dict(n=n, v=v, dtype=torch.bfloat16, kind="randn",
                                                                  topk=10, entropy_topk=True, seed=n)))
        cases.append(("LARGE f32 2048x32000 strided", dict(n=2048, v=32000, dtype=torch.float32, kind="masked",
                                                           topk=5, entropy_topk=False, stride_pad=3, temperature=0.8)))
        cases.append(("LARGE f16 2048x32001", dict(n=2048, v=32001, dtype=torch.float16, kind="shift", topk=3,
                                                   entropy_topk=True, offset=1)))
    return cases


def run_scan(name, lens, gamma, seed, bad_cu=None):
    """`bad_cu`: a cu_seqlens that is not a partition of the n positions (value checks off); the launcher clamps
    each segment into [0, n), which for these cases is the nearest valid partition the Python side reads."""
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
    n = int(cu[-1])
    if bad_cu is not None:
        cu = torch.tensor(bad_cu, dtype=torch.int64)
        lens = [0] * (len(bad_cu) - 1)
    x = torch.randn(n, generator=gen)
    out = torch.full((n,), 9.0, device=DEV)
    rc = LIB.appo_reverse_scan_cuda(ptr(x.to(DEV)), ptr(cu.to(DEV)), len(lens), n, gamma, ptr(out), stream())
    assert rc == 0
    sync()
    g = float(torch.tensor(gamma, dtype=torch.float32))  # the ABI's float gamma
    want = torch.empty(n, dtype=torch.float64)
    xd = x.double().tolist()
    good = _layout.nearest_partition(cu, n)
    for b in range(len(lens)):
        acc = 0.0
        for t in range(int(good[b + 1]) - 1, int(good[b]) - 1, -1):
            acc = xd[t] + g * acc
            want[t] = acc
    ok = check(f"{name} vs float64", out, want.float(), rtol=1e-6, atol=1e-6)
    ref = torch.empty_like(x)
    ref_seq.reverse_discounted_scan(x, _layout.seq_layout("x", x, good), gamma, ref)
    ok &= check(f"{name} vs torch ref", out, ref, rtol=1e-4, atol=1e-4)
    return ok


def scan_cases(large):
    cases = [([1], 1.0), ([5, 0, 3], 0.9), ([1024], 1.0), ([1025, 1, 2047, 3000], 0.99), ([4096 + 17], 2 ** (-1 / 64)),
             ([300] * 7, 0.5)]
    if large:
        cases += [([8192] * 64, 1.0), ([1 << 20], 2 ** (-1 / 64))]
    named = [(f"scan {lens[:4]}{'...' if len(lens) > 4 else ''} g{gamma:.3f}", lens, gamma, None)
             for lens, gamma in cases]
    # cu_seqlens past the end or below 0 (value checks off): each segment clamped into [0, n)
    return named + [(f"scan bad cu {cu}", [12], 0.9, cu) for cu in ([0, 3, 7, 100000000], [0, -5, 7, 12])]


def run_score(name, lens, with_omega, seed):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int64)
    n = int(cu[-1])
    ent = torch.rand(n, generator=gen) * 3
    omega = (torch.rand(n, generator=gen) * 0.6 + 0.7).clamp(0.8, 1.2) if with_omega else None  # clipped ties
    elig = torch.rand(n, generator=gen) < 0.8
    if n > 10:
        ent[:5] = 1.0  # a constant run
    score = torch.full((n,), 9.0, device=DEV)
    cand = torch.ones(n, dtype=torch.bool, device=DEV)
    rc = LIB.appo_branching_score_cuda(ptr(ent.to(DEV)), ptr(None if omega is None else omega.to(DEV)),
                                       ptr(elig.to(DEV)), ptr(cu.to(DEV)), len(lens), n, ptr(score), ptr(cand),
                                       stream())
    assert rc == 0
    sync()
    ws, wc = torch.empty_like(ent), torch.zeros_like(elig)
    ref_seq.branching_score(ent, omega, elig, _layout.seq_layout("entropy", ent, cu), (ws, wc))
    ok = check(f"{name} score", score, ws.float(), rtol=1e-6, atol=1e-7)
    ok &= check(f"{name} candidate", cand, wc, 0, 0, exact=True)
    return ok


def score_cases(large):
    cases = [([7], True), ([50, 0, 1, 300], True), ([2000, 33], False), ([1, 1], True)]
    if large:
        cases += [([8192] * 64, True)]
    return [(f"score {lens[:4]} omega={om}", lens, om) for lens, om in cases]


def run_graph_capture():
    """The forward with few rows (split path outside capture) inside a CUDA graph, replayed."""
    gen = torch.Generator().manual_seed(5)
    logits = make_logits(8, 151936, torch.bfloat16, "randn", gen)
    tokens = torch.randint(0, 151936, (8,), generator=gen).to(DEV)
    want = cuda_fwd(logits, tokens, 1.0, 10, -100, True)
    out = fwd_buffers(8, 10, True)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        with torch.cuda.graph(graph, stream=s):
            cuda_fwd_into(out, logits, tokens, 1.0, 10, -100, True)
    graph.replay()
    torch.cuda.synchronize()
    ok = True
    for key in ("logp", "entropy", "lse", "topk_logp", "c"):
        ok &= check(f"graph {key}", out[key], want[key], rtol=1e-5, atol=1e-5)
    for key in ("topk_ids", "topk_set"):
        ok &= check(f"graph {key}", out[key], want[key], 0, 0, exact=True)
    return ok


# ------------------------------------------------------------------------------------------------ main
def main() -> int:
    global DEV, GPU
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", help="a CUDA build of csrc/cuda/*.cu (shared library); default: the CPU emulator")
    ap.add_argument("--large", action="store_true", help="real-size cases (GPU)")
    ap.add_argument("--asan", action="store_true",
                    help="emulator built with AddressSanitizer: out-of-bounds accesses of the kernels abort")
    ap.add_argument("-k", default="", help="run only cases whose name contains this")
    ap.add_argument("-q", action="store_true", help="print failures and the summary only")
    args = ap.parse_args()
    if args.lib:
        if not torch.cuda.is_available():
            print("check_kernels: --lib needs a CUDA device and a CUDA build of torch", file=sys.stderr)
            return 2
        DEV, GPU = torch.device("cuda"), True
        load(args.lib)
    else:
        if args.large:
            print("check_kernels: --large needs --lib (a GPU)", file=sys.stderr)
            return 2
        os.environ.setdefault("EMU_SMS", "8")  # few SMs: small n takes the split path at emulator sizes
        build = [sys.executable, str(HERE / "emu" / "build.py"), "--if-stale"] + (["--asan"] if args.asan else [])
        if args.asan and not os.environ.get("APPO_EMU_ASAN_CHILD"):
            if subprocess.call(build) != 0:
                return 1
            libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True,
                                     text=True).stdout.strip()
            env = dict(os.environ, APPO_EMU_ASAN_CHILD="1", LD_PRELOAD=libasan,
                       ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0")
            return subprocess.call([sys.executable, *sys.argv], env=env)  # libasan must be loaded first
        if not args.asan and subprocess.call(build) != 0:
            return 1
        load(str(HERE / "emu" / "build" / ("libappo_cuda_emu_asan.so" if args.asan else "libappo_cuda_emu.so")))
    target = args.lib or ("CPU emulator, AddressSanitizer" if args.asan else "CPU emulator")

    def report(name, fn, *a, **kw):
        if args.k not in name:
            return 0
        t = time.time()
        try:
            ok = fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - report and go on
            FAILS.append(f"{name}: {type(e).__name__}: {e}")
            ok = False
        if not args.q or not ok:
            print(f"{'ok  ' if ok else 'FAIL'} {name} ({time.time() - t:.1f} s)", flush=True)
        return 1

    t0 = time.time()
    count = 0
    for name, kw in token_cases(args.large):
        count += report(name, run_token_case, name, **kw)
    for name, lens, gamma, bad_cu in scan_cases(args.large):
        count += report(name, run_scan, name, lens, gamma, len(lens), bad_cu)
    for i, (name, lens, om) in enumerate(score_cases(args.large)):
        count += report(name, run_score, name, lens, om, i)
    if GPU:
        count += report("graph capture", run_graph_capture)
    print(f"check_kernels ({target}): {count} cases, {len(FAILS)} failures, {time.time() - t0:.0f} s")
    for f in FAILS:
        print("  " + f)
    return 1 if FAILS else 0


if __name__ == "__main__":
    sys.exit(main())
