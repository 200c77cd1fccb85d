"""A randomized sweep of the native kernels against the torch reference: vocabulary sizes from 1 to 65537,
row strides, vocabulary splits (few rows), top-k up to 64, fp32/bf16/fp16, -inf and NaN entries, packed
sequences with empty segments, 1-8 threads, with value checks off and invalid cu_seqlens.

APPO_SWEEP_CASES sets the number of cases (default 60; .ci/sanitize.sh runs a few thousand under
AddressSanitizer + UBSan, where a read or write out of bounds aborts the process). Each case is drawn from its
own seed, printed in the failure message, so `APPO_SWEEP_FIRST=<seed> APPO_SWEEP_CASES=1` replays it.
"""
import math
import os

import pytest
import torch

import appo_kernels as ak
from appo_kernels._layout import nearest_partition

pytestmark = pytest.mark.skipif("native" not in ak.available_backends(), reason="the native extension is not built")

CASES = int(os.environ.get("APPO_SWEEP_CASES", "60"))
FIRST = int(os.environ.get("APPO_SWEEP_FIRST", "0"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _logits(g, n, v, dtype):
    """[n, v] logits with a random row stride (a slice of a wider buffer) or a transposed layout, and some -inf
    and NaN entries, some all -inf rows."""
    layout = int(torch.randint(0, 3, (1,), generator=g))
    if layout == 0:
        x = torch.randn(n, v, generator=g) * 4
    elif layout == 1:
        pad = int(torch.randint(1, 9, (1,), generator=g))
        x = (torch.randn(n, v + pad, generator=g) * 4)[:, pad // 2: pad // 2 + v]
    else:
        x = (torch.randn(v, n, generator=g) * 4).T
    x = x.to(dtype)
    special = torch.rand(n, v, generator=g)
    x = x.masked_fill(special < 0.05, float("-inf"))
    if n > 2 and torch.rand(1, generator=g) < 0.3:
        x[1] = float("-inf")
    if n > 3 and torch.rand(1, generator=g) < 0.3:
        x[2, int(torch.randint(0, v, (1,), generator=g))] = float("nan")
    return x


def _close(a, b, tol, what, case):
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True), (
        f"{what} differs, case {case}: max diff "
        f"{(a.double() - b.double()).abs().nan_to_num(0).max().item():.3g}")


def _token_case(seed):
    g = torch.Generator().manual_seed(seed)
    v = max(1, int(math.exp(float(torch.rand(1, generator=g)) * math.log(65537))))
    n = int(torch.randint(1, 4 if v > 8192 else 24, (1,), generator=g))   # few rows: vocabulary splits
    dtype = DTYPES[int(torch.randint(0, 3, (1,), generator=g))]
    k = int(torch.randint(0, min(v, 64) + 1, (1,), generator=g))
    entropy = "topk" if k and torch.rand(1, generator=g) < 0.3 else "exact"
    threads = int(torch.randint(1, 9, (1,), generator=g))
    case = dict(seed=seed, v=v, n=n, dtype=dtype, k=k, entropy=entropy, threads=threads)
    x = _logits(g, n, v, dtype)
    tokens = torch.randint(0, v, (n,), generator=g)
    tokens[torch.rand(n, generator=g) < 0.2] = -100
    if n > 4:
        tokens[4] = v + int(torch.randint(0, 5, (1,), generator=g))   # out of range: checks are off
    return case, x, tokens


@pytest.mark.parametrize("seed", range(FIRST, FIRST + CASES))
def test_token_stats_native_vs_torch(seed, value_checks_restored):
    case, x, tokens = _token_case(seed)
    k, entropy = case["k"], case["entropy"]
    tol = 1e-4 if case["dtype"] == torch.float32 else 2e-3
    ak.set_value_checks(False)
    outs, grads = {}, {}
    old_threads = torch.get_num_threads()
    for backend in ("native", "torch"):
        torch.set_num_threads(case["threads"] if backend == "native" else old_threads)
        xx = x.detach().clone().requires_grad_(True)
        st = ak.token_stats(xx, tokens, topk=k, entropy=entropy, backend=backend)
        g_lp = torch.linspace(-1, 1, x.shape[0])
        live = torch.isfinite(st.logp) & torch.isfinite(st.entropy)      # NaN rows would poison the sum
        (torch.where(live, st.logp * g_lp + st.entropy * 0.5, 0)).sum().backward()
        outs[backend], grads[backend] = st, xx.grad
    torch.set_num_threads(old_threads)
    nat, ref = outs["native"], outs["torch"]
    for name in ("logp", "entropy", "lse", "topk_logp"):
        _close(getattr(nat, name), getattr(ref, name), tol, name, case)
    finite_rows = torch.isfinite(ref.lse) & ~torch.isnan(x.float()).any(dim=1)
    assert torch.equal(nat.topk_ids[finite_rows], ref.topk_ids[finite_rows]), f"topk_ids differ, case {case}"
    rows = finite_rows & torch.isfinite(ref.logp) & torch.isfinite(ref.entropy)
    _close(grads["native"][rows].float(), grads["torch"][rows].float(), 10 * tol, "gradient", case)


def _random_cu(g, n, b):
    cuts = torch.sort(torch.randint(0, n + 1, (b - 1,), generator=g)).values
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), cuts, torch.full((1,), n)])
    if torch.rand(1, generator=g) < 0.3:   # an invalid one: read as the nearest partition (checks off)
        cu = cu + torch.randint(-3, 4, cu.shape, generator=g)
    return cu


@pytest.mark.parametrize("seed", range(FIRST, FIRST + CASES))
def test_sequence_ops_native_vs_torch(seed, value_checks_restored):
    g = torch.Generator().manual_seed(10 ** 6 + seed)
    n = int(torch.randint(0, 3000, (1,), generator=g))
    b = int(torch.randint(1, 40, (1,), generator=g))
    dtype = (torch.float32, torch.float64)[int(torch.randint(0, 2, (1,), generator=g))]
    cu = _random_cu(g, n, b)
    lp, lpo, ent = (torch.randn(n, generator=g, dtype=dtype) for _ in range(3))
    if n:
        lp[torch.rand(n, generator=g) < 0.01] = float("-inf")
    mask = torch.rand(n, generator=g) > 0.1
    eligible = torch.rand(n, generator=g) > 0.1
    gamma = float(torch.rand(1, generator=g)) * 0.5 + 0.5
    case = dict(seed=seed, n=n, b=b, dtype=dtype, cu=cu.tolist() if b < 8 else "...", gamma=gamma)
    ak.set_value_checks(False)
    got = {be: (ak.future_values(lp, lpo, mask, cu_seqlens=cu, gamma=gamma, backend=be),
                ak.score_tokens(ent, lp, lpo, mask, cu_seqlens=cu, eligible=eligible, gamma=gamma, backend=be))
           for be in ("native", "torch")}
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    (fv_n, sc_n), (fv_t, sc_t) = got["native"], got["torch"]
    _close(fv_n.gain, fv_t.gain, tol, "gain", case)
    _close(fv_n.omega, fv_t.omega, tol, "omega", case)
    _close(sc_n.score, sc_t.score, 1e-3 if dtype == torch.float32 else 1e-9, "score", case)
    ak.set_value_checks(True)
    fixed = ak.future_values(lp, lpo, mask, cu_seqlens=nearest_partition(cu, n), gamma=gamma, backend="native")
    _close(fv_n.gain, fixed.gain, 0, "gain vs the nearest partition", case)
