"""Compile every Triton kernel ahead of time for sm_80 and sm_90 (no GPU or driver needed) and print its
registers, spills and shared memory.

The test suite runs the Triton kernels in the interpreter, which never lowers them: type errors in loop-carried
values, unsupported ops in compiled control flow or register blow-ups only show up when Triton compiles them.
This compiles each kernel with the constexpr variants and block sizes its wrapper uses on a GPU, via
`triton.compile(ASTSource, target=GPUTarget("cuda", arch, 32))`, then reads the resource usage of the cubin
with the cuobjdump that ships with Triton (local memory > 0 means register spills). Exits 1 on any compile
error.

    python .ci/check_triton.py            # about a minute on 2 cores
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)      # the jit functions must be compilable ones, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # Triton 3.9's default, stated (it warns otherwise)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from appo_kernels.backends.triton_kernels import linear_token_stats as lin  # noqa: E402
from appo_kernels.backends.triton_kernels import sequence as seq  # noqa: E402
from appo_kernels.backends.triton_kernels import token_stats as ts  # noqa: E402

ARCHS = (80, 90)
FLOATS = {"inv_t"}                      # fp32 scalars; every other non-pointer argument is an int


def signature(fn, constexprs: dict, ptrs: dict) -> dict:
    """Triton signature of `fn`: pointers `*fp32` unless named in `ptrs`, ints `i32`, floats `fp32`."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = ptrs.get(name, "*fp32")
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
    return sig


def variants():
    """(label, kernel, constexprs, pointer dtypes, num_warps): what the wrappers launch on a GPU."""
    for dt, k, exact, single in (("bf16", 0, True, True), ("bf16", 10, True, True), ("fp32", 64, False, True),
                                 ("bf16", 10, True, False)):
        yield (f"token_stats fwd {dt} k={k} {'exact' if exact else 'topk'}-entropy "
               f"{'one split' if single else 'splits'}", ts._fwd_kernel,
               {"K": k, "KP": max(2, triton.next_power_of_2(k)), "EXACT_ENTROPY": exact, "SINGLE": single,
                "BLOCK_V": 4096}, {"x_ptr": f"*{dt}", "tok_ptr": "*i64", "id_ptr": "*i64"}, 8)
    for dt, k, topk_entropy in (("bf16", 0, False), ("fp32", 10, True)):
        yield (f"token_stats bwd {dt} {'topk' if topk_entropy else 'exact'}-entropy", ts._bwd_kernel,
               {"K": k, "TOPK_ENTROPY": topk_entropy, "BLOCK_V": 2048},
               {"x_ptr": f"*{dt}", "g_ptr": f"*{dt}", "tok_ptr": "*i64", "set_ptr": "*i64"}, 8)
    for dt, bias, k, topk_entropy in (("bf16", True, 10, False), ("fp32", False, 0, True)):
        dot_f32 = dt == "fp32"
        blocks = dict(zip(("BLOCK_N", "BLOCK_V", "BLOCK_H"), lin._blocks(4096, 151936, 4096, dot_f32)))
        warps = 4 if dot_f32 else 8
        tensors = {"h_ptr": f"*{dt}", "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "tok_ptr": "*i64", "ci_ptr": "*i64",
                   "set_ptr": "*i64"}
        tag = f"{dt} bias={bias}"
        yield (f"linear_token_stats fwd {tag} k={k}", lin._fwd_kernel,
               {"HAS_BIAS": bias, "K": k, "DOT_F32": dot_f32, **blocks}, tensors, warps)
        for name, fn in (("bwd hidden", lin._bwd_hidden_kernel), ("bwd weight", lin._bwd_weight_kernel)):
            yield (f"linear_token_stats {name} {tag} {'topk' if topk_entropy else 'exact'}-entropy", fn,
                   {"HAS_BIAS": bias, "K": k, "TOPK_ENTROPY": topk_entropy, "DOT_F32": dot_f32, **blocks},
                   tensors, warps)
    for dt in ("fp32", "fp64"):
        yield (f"reverse_discounted_scan {dt}", seq._reverse_scan_kernel, {"BLOCK": seq.SCAN_BLOCK},
               {"x_ptr": f"*{dt}", "out_ptr": f"*{dt}", "cu_ptr": "*i64", "gamma_ptr": "*fp64"}, seq.NUM_WARPS)
    for omega in (True, False):
        yield (f"branching_score omega={omega}", seq._branching_score_kernel,
               {"HAS_OMEGA": omega, "BLOCK": seq.SCORE_BLOCK},
               {"elig_ptr": "*u8", "cu_ptr": "*i64", "cand_ptr": "*i8"}, seq.NUM_WARPS)


def resource_usage(cubin: bytes) -> str:
    """Registers, local memory (spills and stack) and shared memory per thread block, from the cubin via the
    cuobjdump that ships with Triton."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    use = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return f"{use.get('REG', '?'):>4} regs, local {use.get('LOCAL', '?')} B, stack {use.get('STACK', '?')} B"


def main() -> int:
    failures = 0
    start = time.perf_counter()
    for label, fn, constexprs, ptrs, warps in variants():
        for arch in ARCHS:
            t0 = time.perf_counter()
            try:
                src = ASTSource(fn=fn, signature=signature(fn, constexprs, ptrs), constexprs=constexprs)
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
                usage = f"{resource_usage(kernel.asm['cubin'])}, smem {kernel.metadata.shared} B"
            except Exception as err:  # noqa: BLE001 - report every kernel, then fail
                failures += 1
                usage = f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"sm_{arch}  {label:<58} {usage}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"check_triton: {failures} failures, {time.perf_counter() - start:.0f} s (triton {triton.__version__})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
