"""pytest-benchmark micro-benchmarks of token_stats: ours (every backend) vs eager torch, torch.compile and the
plain read of the logits. Small sizes (a smoke check in well under a minute); bench/run.py has the full ones.

    python -m pytest bench -q                        # timings, grouped by case
    python -m pytest bench -q --benchmark-disable    # each benchmark runs once: a correctness smoke check

Every benchmark checks its output against the eager contender (allclose), so a broken op cannot be
benchmarked silently; the eager contender itself is checked against the same formula in float64.
"""
import pytest
import torch

from _common import (check_grad, check_token_stats, compile_fn, eager_token_stats, fwd_bwd, make_logits,
                     ours_token_stats, read_floor, read_write_floor, timed_backends)

N, V = 512, 4096
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CONTENDERS = [f"ours[{b}]" for b in timed_backends()] + ["eager", "compiled", "read"]

_inputs = {}


def inputs(dtype_name):
    if dtype_name not in _inputs:
        _inputs[dtype_name] = make_logits(N, V, DTYPES[dtype_name], seed=1)
    return _inputs[dtype_name]


def stats_fn(contender, compiled_cache, key):
    """The (logits, tokens, k) -> (logp, entropy, topk_ids, topk_logp) function of a contender."""
    if contender.startswith("ours["):
        backend = contender[5:-1]
        return lambda lg, tk, k: ours_token_stats(lg, tk, k, backend=backend)
    if contender == "eager":
        return eager_token_stats
    if contender == "compiled":
        if key not in compiled_cache:
            compiled_cache[key] = compile_fn(eager_token_stats)
        return compiled_cache[key]
    raise ValueError(contender)


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("topk", [0, 5])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_token_stats_forward(benchmark, compiled_cache, dtype_name, topk, contender):
    x, tok = inputs(dtype_name)
    benchmark.group = f"token_stats fwd {dtype_name} [{N}, {V}] topk={topk}"
    benchmark.extra_info["contender"] = contender
    if contender == "read":
        out = benchmark(read_floor, x)
        torch.testing.assert_close(out.double(), x.double().sum(), atol=1e-2 * x.numel() ** 0.5, rtol=1e-2)
        return
    ref = eager_token_stats(x, tok, topk)
    fn = stats_fn(contender, compiled_cache, ("fwd", dtype_name, topk))
    fn(x, tok, topk)  # compile (for `compiled`) and warm up outside the timing
    out = benchmark(fn, x, tok, topk)
    check_token_stats(out, ref, x, topk, f"{contender} {dtype_name} topk={topk}")
    if contender == "eager":
        check_token_stats(tuple(t.float() if t.is_floating_point() else t for t in out),
                          eager_token_stats(x.double(), tok, topk), x, topk, "eager vs float64")


@pytest.mark.parametrize("contender", CONTENDERS)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_token_stats_forward_backward(benchmark, compiled_cache, dtype_name, contender):
    x0, tok = inputs(dtype_name)
    x = x0.clone().requires_grad_(True)
    benchmark.group = f"token_stats fwd+bwd {dtype_name} [{N}, {V}] topk=0"
    benchmark.extra_info["contender"] = contender
    if contender == "read":
        # read + write floor: x.sum() (the forward's read) + x.clone() (the backward's read and write)
        _, copy = benchmark(read_write_floor, x)
        assert torch.equal(copy, x0)
        return
    ref = fwd_bwd(eager_token_stats, x, tok).clone()
    fn = stats_fn(contender, compiled_cache, ("fwd+bwd", dtype_name))
    fwd_bwd(fn, x, tok)  # compile and warm up outside the timing
    grad = benchmark(fwd_bwd, fn, x, tok)
    check_grad(grad, ref, f"{contender} {dtype_name}")
    if contender == "eager":
        x64 = x0.double().requires_grad_(True)
        check_grad(fwd_bwd(eager_token_stats, x64, tok).to(grad.dtype), grad, "eager vs float64")
