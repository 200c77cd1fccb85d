"""token_stats (method §1, docs/api.md `token_stats`) against the float64 oracle: values, edge cases, gradients."""

import math

import oracle
import pytest
import torch
from helpers import FLOAT_DTYPES, LOW_DTYPES, assert_close, f64, out_dtype, tol

import appo_kernels as ak


def make_logits(gen, N, V, dtype, scale=3.0):
    return (torch.randn(N, V, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_tokens(gen, N, V, ignore=(), ignore_index=-100):
    tokens = torch.randint(0, V, (N,), generator=gen)
    tokens[0] = 0
    if N > 1:
        tokens[1] = V - 1
    for i in ignore:
        tokens[i] = ignore_index
    return tokens


def check_against_oracle(res, logits, tokens, *, temperature=1.0, topk=0, ignore_index=-100,
                         entropy="exact", atol_lp=None, atol_h=None, rtol=None):
    """Compare every output of a TokenStats with the oracle computed on the upcast input values."""
    dtype = logits.dtype
    lead = tokens.shape
    V = logits.shape[-1]
    ref = oracle.token_stats(f64(logits.reshape(-1, V)), tokens.reshape(-1).tolist(), temperature, topk,
                             ignore_index, entropy)
    a_lp, r_lp = tol(dtype, "logp")
    a_h, r_h = tol(dtype, "entropy")
    if atol_lp is not None:
        a_lp = atol_lp
    if atol_h is not None:
        a_h = atol_h
    if rtol is not None:
        r_lp = r_h = rtol
    od = out_dtype(dtype)
    for name in ("logp", "entropy", "lse"):
        out = getattr(res, name)
        assert out.shape == lead, name
        assert out.dtype == od, (name, out.dtype)
    assert res.topk_ids.shape == lead + (topk,)
    assert res.topk_logp.shape == lead + (topk,)
    assert res.topk_ids.dtype == torch.int64
    assert res.topk_logp.dtype == od
    assert_close(res.logp, ref["logp"], a_lp, r_lp, "logp")
    assert_close(res.lse, ref["lse"], a_lp, r_lp, "lse")
    assert_close(res.entropy, ref["entropy"], a_h, r_h, "entropy")
    if topk:
        exp_ids = [ids for ids in ref["topk_ids"]]
        assert res.topk_ids.reshape(-1, topk).tolist() == exp_ids
        assert_close(res.topk_logp, ref["topk_logp"], a_lp, r_lp, "topk_logp")
    return ref


# ----------------------------------------------------------------------------------------------------------
# values vs oracle
# ----------------------------------------------------------------------------------------------------------

CASES = [
    # (leading shape, V, topk, entropy mode, temperature)
    ((24,), 97, 0, "exact", 1.0),
    ((3, 8), 256, 5, "exact", 1.0),
    ((20,), 1001, 3, "topk", 0.7),
    ((2, 9), 50, 50, "exact", 1.5),
    ((16,), 64, 10, "topk", 1.0),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-V{c[1]}-k{c[2]}-{c[3]}-t{c[4]}")
def test_matches_oracle(backend, gen, dtype, case):
    lead, V, k, mode, tau = case
    N = math.prod(lead)
    logits = make_logits(gen, N, V, dtype).reshape(lead + (V,))
    tokens = make_tokens(gen, N, V, ignore=(N - 1,)).reshape(lead)
    res = ak.token_stats(logits, tokens, temperature=tau, topk=k, entropy=mode, backend=backend)
    check_against_oracle(res, logits, tokens, temperature=tau, topk=k, entropy=mode)


def test_auto_backend_equals_explicit(backend, gen):
    logits = make_logits(gen, 12, 33, torch.float32)
    tokens = make_tokens(gen, 12, 33)
    a = ak.token_stats(logits, tokens, topk=4, backend=backend)
    b = ak.token_stats(logits, tokens, topk=4, backend="auto")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_extreme_logits(backend, gen, dtype):
    # +-1e4 scale: any implementation that does not subtract the running max overflows.  The tolerance is a
    # few fp32 ulps of the logit scale (ulp(1e4) ~ 1e-3), the inherent precision of fp32 accumulation.
    N, V = 16, 97
    logits = (torch.randn(N, V, generator=gen, dtype=torch.float64) * 1e4).clamp(-6e4, 6e4).to(dtype)
    tokens = make_tokens(gen, N, V)
    res = ak.token_stats(logits, tokens, topk=3, backend=backend)
    atol = 1e-8 if dtype == torch.float64 else 1e-2
    check_against_oracle(res, logits, tokens, topk=3, atol_lp=atol, atol_h=atol, rtol=1e-6)
    assert torch.isfinite(res.logp).all() and torch.isfinite(res.entropy).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_all_negative_logits(backend, gen, dtype):
    # a running max started at 0 instead of -inf would underflow every exp here
    N, V = 10, 77
    logits = (-(torch.rand(N, V, generator=gen, dtype=torch.float64) * 5) - 90).to(dtype)
    tokens = make_tokens(gen, N, V)
    res = ak.token_stats(logits, tokens, topk=4, backend=backend)
    check_against_oracle(res, logits, tokens, topk=4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_neg_inf_entries(backend, gen, dtype, mode):
    # masked vocabulary: about half the entries are -inf; one row has a single finite entry (its target),
    # so logp = 0 and entropy = 0 there; topk=5 exceeds the finite entries of that row, whose remaining
    # slots are -inf entries in ascending id order (ties to the smaller id).
    N, V = 12, 61
    logits = make_logits(gen, N, V, torch.float64)
    drop = torch.rand(N, V, generator=gen) < 0.5
    tokens = make_tokens(gen, N, V)
    drop[torch.arange(N), tokens] = False  # keep every target finite
    drop[3] = True
    drop[3, tokens[3]] = False
    logits = logits.masked_fill(drop, float("-inf")).to(dtype)
    res = ak.token_stats(logits, tokens, topk=5, entropy=mode, backend=backend)
    check_against_oracle(res, logits, tokens, topk=5, entropy=mode)
    assert res.logp[3].item() == pytest.approx(0.0, abs=1e-6)
    assert res.entropy[3].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.isfinite(res.entropy).all()


def test_target_on_neg_inf_entry(backend):
    logits = torch.tensor([[0.0, float("-inf"), 1.0, 2.0]])
    res = ak.token_stats(logits, torch.tensor([1]), backend=backend)
    assert res.logp.item() == float("-inf")
    ref = oracle.token_stats_row([0.0, float("-inf"), 1.0, 2.0], 1)
    assert res.entropy.item() == pytest.approx(ref["entropy"], abs=1e-6)
    assert res.lse.item() == pytest.approx(ref["lse"], abs=1e-6)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_ties_and_constant_rows(backend, gen, dtype, mode):
    # integer-valued logits in [-2, 2]: many exact ties, so the top-k order depends on the tie rule
    # (descending value, then smaller id first).  Row 0 is constant: p uniform, entropy log V, ids 0..k-1.
    N, V, k = 9, 40, 10
    logits = torch.randint(-2, 3, (N, V), generator=gen).to(dtype)
    logits[0] = 1.5
    tokens = make_tokens(gen, N, V)
    res = ak.token_stats(logits, tokens, topk=k, entropy=mode, backend=backend)
    check_against_oracle(res, logits, tokens, topk=k, entropy=mode)
    assert res.topk_ids[0].tolist() == list(range(k))
    if mode == "exact":
        assert res.entropy[0].item() == pytest.approx(math.log(V), abs=1e-5)
    assert res.logp[0].item() == pytest.approx(-math.log(V), abs=1e-5)


def test_tie_order_hand_built(backend):
    # values [1, 3, 3, 2, 3, 0]: the three 3's come first in id order (1, 2, 4), then 2 (id 3)
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    res = ak.token_stats(logits, torch.tensor([5]), topk=4, backend=backend)
    assert res.topk_ids.tolist() == [[1, 2, 4, 3]]


# The native CPU kernel's running top-k (csrc/cpu/token_stats.cpp): blocks of 2048 ids, a vector compare of
# each group of 16 against the k-th kept value, a list that fills first, a tail shorter than a group, and a
# row split across threads when rows are few (splits of at least 8192 ids). V = 3 * 8192 + 37 is odd, gives
# three splits of 8205 ids for one row on 2 threads, and leaves a 37-id tail (2 groups + 5) in the last block.
_SPLIT_V = 3 * 8192 + 37
_SPAN = (_SPLIT_V + 2) // 3


def _native_topk_rows(gen, V):
    """Rows that stress the running top-k: ascending (every group beats the threshold), descending (none after
    the list fills), heavy ties, a constant row, tied maxima on block, group and split boundaries, -inf on all
    but 3 columns (k beyond the finite entries: the list ends in -inf ids, smallest first), finite entries in
    the tail group only, half -inf, and a plain random row."""
    f = dict(dtype=torch.float64)
    rows = [torch.arange(V, **f) * (8.0 / V), -torch.arange(V, **f) * (8.0 / V),
            torch.randint(0, 3, (V,), generator=gen).double(), torch.zeros(V, **f)]
    ties = torch.randn(V, generator=gen, **f).clamp(-3, 3)
    ties[[15, 16, 2047, 2048, _SPAN - 1, _SPAN, 2 * _SPAN - 1, 2 * _SPAN, V - 1]] = 5.0
    ties[[0, 31, 32, 4095, 4096, _SPAN + 1, 2 * _SPAN + 1, V - 17, V - 16, V - 2]] = 4.0
    rows.append(ties)
    sparse = torch.full((V,), float("-inf"), **f)
    sparse[torch.randperm(V - 20, generator=gen)[:3] + 20] = torch.randn(3, generator=gen, **f)
    rows.append(sparse)
    tail = torch.full((V,), float("-inf"), **f)
    tail[[V - 37, V - 20, V - 1]] = torch.tensor([1.0, 3.0, 2.0], **f)
    rows.append(tail)
    half = torch.randn(V, generator=gen, **f) * 3
    half[torch.rand(V, generator=gen) < 0.5] = float("-inf")
    rows.append(half)
    rows.append(torch.randn(V, generator=gen, **f) * 4)
    return torch.stack(rows)


@pytest.mark.parametrize("k,mode", [(1, "exact"), (5, "topk"), (16, "exact"), (17, "topk"), (40, "exact"),
                                    (130, "exact")])
@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_native_running_topk_blocks_groups_and_splits(gen, dtype, k, mode):
    if "native" not in ak.available_backends():
        pytest.skip("the native extension is not built")
    V = _SPLIT_V
    logits = _native_topk_rows(gen, V).to(dtype)
    n = logits.shape[0]
    tokens = make_tokens(gen, n, V)                              # targets 0 and V - 1 on rows 0 and 1
    for r in (5, 6, 7):                                          # a finite target where most of the row is -inf
        tokens[r] = int(torch.nonzero(torch.isfinite(logits[r].double()))[-1])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)                                     # one row alone splits across 2 threads
    try:
        whole = ak.token_stats(logits, tokens, topk=k, entropy=mode, backend="native")
        alone = [ak.token_stats(logits[r:r + 1], tokens[r:r + 1], topk=k, entropy=mode, backend="native")
                 for r in range(n)]
    finally:
        torch.set_num_threads(threads)
    ref = check_against_oracle(whole, logits, tokens, topk=k, entropy=mode)
    for r, res in enumerate(alone):
        assert res.topk_ids[0].tolist() == ref["topk_ids"][r], r
        for name in ("logp", "entropy", "lse", "topk_logp"):
            torch.testing.assert_close(getattr(res, name)[0], getattr(whole, name)[r], atol=1e-6, rtol=1e-6)
    if k >= 5:   # the hand-checkable rows: the tied maxima in id order, the -inf tail of the sparse row
        assert whole.topk_ids[4].tolist()[:9] == [15, 16, 2047, 2048, _SPAN - 1, _SPAN, 2 * _SPAN - 1,
                                                  2 * _SPAN, V - 1][:k]
        finite = sorted(torch.nonzero(torch.isfinite(logits[5].double())).flatten().tolist(),
                        key=lambda v: -float(logits[5, v]))
        assert whole.topk_ids[5].tolist() == finite + list(range(k - 3))
        assert whole.topk_ids[6].tolist() == [V - 20, V - 1, V - 37] + list(range(k - 3))


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
def test_native_statistics_do_not_depend_on_topk(gen, dtype):
    """fp32 reads its logits where the 16-bit types read a converted copy of the block (the max, the top-k
    scan, the exp pass); logp, entropy and lse are the same bits with and without top-k, on long rows split
    across threads, and every output matches the oracle, at a temperature other than 1 (which those paths
    apply themselves)."""
    if "native" not in ak.available_backends():
        pytest.skip("the native extension is not built")
    V = _SPLIT_V
    logits = _native_topk_rows(gen, V).to(dtype)
    tokens = make_tokens(gen, logits.shape[0], V)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in (slice(None), slice(3, 4)):                  # all rows; one row, split across the threads
            plain = ak.token_stats(logits[rows], tokens[rows], temperature=0.7, backend="native")
            check_against_oracle(plain, logits[rows], tokens[rows], temperature=0.7)
            for k in (1, 16):
                with_topk = ak.token_stats(logits[rows], tokens[rows], topk=k, temperature=0.7, backend="native")
                check_against_oracle(with_topk, logits[rows], tokens[rows], topk=k, temperature=0.7)
                for name in ("logp", "entropy", "lse"):
                    assert torch.equal(getattr(plain, name), getattr(with_topk, name)), (name, k)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("k", [0, 3, 16])
def test_native_undefined_rows_in_long_rows(gen, k):
    """A NaN after the list is full (it never beats the threshold) and an all -inf row still give NaN
    statistics in that row only, also when the row is split across threads."""
    if "native" not in ak.available_backends():
        pytest.skip("the native extension is not built")
    V = _SPLIT_V
    logits = make_logits(gen, 4, V, torch.float32)
    logits[1] = float("-inf")
    logits[2, 5000] = float("nan")
    tokens = make_tokens(gen, 4, V)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for rows in ([0, 1, 2, 3], [1], [2]):
            res = ak.token_stats(logits[rows], tokens[rows], topk=k, backend="native")
            for j, r in enumerate(rows):
                if r in (1, 2):
                    assert torch.isnan(res.logp[j]) and torch.isnan(res.entropy[j]), r
                    assert torch.isnan(res.topk_logp[j]).all(), r
                    assert ((res.topk_ids[j] >= 0) & (res.topk_ids[j] < V)).all(), r
        good = [0, 3]
        check_against_oracle(ak.token_stats(logits[good], tokens[good], topk=k, backend="native"), logits[good],
                             tokens[good], topk=k)
        # a NaN among fewer than k other entries: the list cannot fill; the row is NaN, its ids stay in range
        tiny = ak.token_stats(torch.tensor([[1.0, float("nan"), 2.0]]), torch.tensor([0]), topk=3, backend="native")
        assert torch.isnan(tiny.topk_logp).all() and ((tiny.topk_ids >= 0) & (tiny.topk_ids < 3)).all()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("mode,k", [("exact", 0), ("exact", 3), ("topk", 3)])
@pytest.mark.parametrize("garbage", ["none", "nan", "-inf"])
def test_ignored_rows(backend, gen, ignore_index, mode, k, garbage):
    # ignored rows give 0 in every output (ids 0 too); their logits are not read for validity, so a row of
    # NaN or of -inf must not leak into the outputs (nor crash), and other rows are unaffected
    N, V = 8, 29
    logits = make_logits(gen, N, V, torch.float32)
    if garbage != "none":
        logits[2] = float(garbage)
        logits[5, ::2] = float(garbage)
    tokens = make_tokens(gen, N, V, ignore=(2, 5, 6), ignore_index=ignore_index)
    res = ak.token_stats(logits, tokens, topk=k, ignore_index=ignore_index, entropy=mode, backend=backend)
    check_against_oracle(res, logits, tokens, topk=k, ignore_index=ignore_index, entropy=mode)
    for r in (2, 5, 6):
        assert res.logp[r].item() == 0 and res.entropy[r].item() == 0 and res.lse[r].item() == 0
        assert res.topk_ids[r].tolist() == [0] * k
        assert res.topk_logp[r].tolist() == [0.0] * k


def test_all_ignored(backend, gen):
    logits = make_logits(gen, 4, 9, torch.float32)
    tokens = torch.full((4,), -100)
    res = ak.token_stats(logits, tokens, topk=2, backend=backend)
    assert res.logp.abs().sum() == 0 and res.entropy.abs().sum() == 0 and res.lse.abs().sum() == 0


@pytest.mark.parametrize("k", [0, 3])
def test_undefined_rows_are_nan_in_that_row_only(backend, gen, k):
    # docs: a row that is entirely -inf has lse = -inf and NaN logp, entropy and topk_logp; a row holding a
    # NaN gives NaN in those four; other rows are unaffected (topk_ids of such rows are unspecified)
    N, V = 6, 23
    logits = make_logits(gen, N, V, torch.float32)
    logits[1] = float("-inf")
    logits[4, 7] = float("nan")
    tokens = make_tokens(gen, N, V)
    res = ak.token_stats(logits, tokens, topk=k, backend=backend)
    for r in (1, 4):
        assert torch.isnan(res.logp[r]), ("logp", r)
        assert torch.isnan(res.entropy[r]), ("entropy", r)
        assert torch.isnan(res.topk_logp[r]).all(), ("topk_logp", r)
    assert res.lse[1].item() == float("-inf")
    assert torch.isnan(res.lse[4])
    good = [0, 2, 3, 5]
    check_against_oracle(ak.token_stats(logits[good], tokens[good], topk=k, backend=backend), logits[good],
                         tokens[good], topk=k)
    for name in ("logp", "entropy", "lse", "topk_logp"):
        torch.testing.assert_close(getattr(res, name)[good],
                                   getattr(ak.token_stats(logits[good], tokens[good], topk=k, backend=backend), name))
    assert torch.equal(res.topk_ids[good], ak.token_stats(logits[good], tokens[good], topk=k, backend=backend).topk_ids)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_single_row(backend, gen, dtype):
    logits = make_logits(gen, 1, 97, dtype)
    tokens = torch.tensor([96])
    res = ak.token_stats(logits, tokens, topk=2, backend=backend)
    check_against_oracle(res, logits, tokens, topk=2)


@pytest.mark.parametrize("V", [1, 2, 97, 1001])
def test_odd_and_tiny_vocab(backend, gen, V):
    logits = make_logits(gen, 7, V, torch.float32)
    tokens = make_tokens(gen, 7, V)
    k = min(V, 3)
    res = ak.token_stats(logits, tokens, topk=k, backend=backend)
    check_against_oracle(res, logits, tokens, topk=k)
    if V == 1:
        assert res.logp.abs().max().item() == 0 and res.entropy.abs().max().item() < 1e-6


@pytest.mark.parametrize("kind", ["transposed", "vocab_stride", "row_stride", "permuted_3d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous(backend, gen, kind, dtype):
    N, V = 10, 53
    if kind == "transposed":
        logits = make_logits(gen, V, N, dtype).t()
    elif kind == "vocab_stride":
        logits = make_logits(gen, N, 2 * V, dtype)[:, ::2]
    elif kind == "row_stride":
        logits = make_logits(gen, 2 * N, V, dtype)[::2]
    else:
        logits = make_logits(gen, N, V, dtype).reshape(5, 2, V).permute(1, 0, 2)
    assert not logits.is_contiguous()
    tokens_base = torch.randint(0, V, (2 * N,), generator=gen)
    tokens = tokens_base[::2].reshape(logits.shape[:-1])
    res = ak.token_stats(logits, tokens, topk=4, backend=backend)
    check_against_oracle(res, logits, tokens, topk=4)
    ref = ak.token_stats(logits.contiguous(), tokens.contiguous(), topk=4, backend=backend)
    for a, b in zip(res, ref):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_shift_invariance(backend, gen, dtype, tau):
    # logits + 100 give the same logp, entropy and top-k; lse moves by 100 / tau
    N, V = 14, 97
    logits = make_logits(gen, N, V, dtype)
    tokens = make_tokens(gen, N, V)
    a = ak.token_stats(logits, tokens, temperature=tau, topk=5, backend=backend)
    b = ak.token_stats(logits + 100, tokens, temperature=tau, topk=5, backend=backend)
    atol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(b.logp, a.logp, atol=atol, rtol=0)
    torch.testing.assert_close(b.entropy, a.entropy, atol=atol, rtol=0)
    torch.testing.assert_close(b.lse - 100 / tau, a.lse, atol=atol, rtol=0)
    assert torch.equal(a.topk_ids, b.topk_ids)
    torch.testing.assert_close(b.topk_logp, a.topk_logp, atol=atol, rtol=0)


@pytest.mark.parametrize("tau", [0.25, 0.7, 2.0])
def test_temperature(backend, gen, tau):
    N, V = 11, 64
    logits = make_logits(gen, N, V, torch.float64)
    tokens = make_tokens(gen, N, V)
    res = ak.token_stats(logits, tokens, temperature=tau, topk=3, backend=backend)
    check_against_oracle(res, logits, tokens, temperature=tau, topk=3)
    # temperature tau on z is the same as temperature 1 on z / tau
    res1 = ak.token_stats(logits / tau, tokens, topk=3, backend=backend)
    torch.testing.assert_close(res.logp, res1.logp)
    torch.testing.assert_close(res.entropy, res1.entropy)


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_empty_rows(backend, lead, dtype):
    V, k = 13, 3
    logits = torch.zeros(lead + (V,), dtype=dtype, requires_grad=True)
    tokens = torch.zeros(lead, dtype=torch.int64)
    res = ak.token_stats(logits, tokens, topk=k, backend=backend)
    for name in ("logp", "entropy", "lse"):
        assert getattr(res, name).shape == lead
        assert getattr(res, name).dtype == out_dtype(dtype)
    assert res.topk_ids.shape == lead + (k,) and res.topk_ids.dtype == torch.int64
    assert res.topk_logp.shape == lead + (k,)
    (res.logp.sum() + res.entropy.sum()).backward()
    assert logits.grad.shape == logits.shape


def test_topk_zero_outputs(backend, gen):
    logits = make_logits(gen, 12, 7, torch.float32).reshape(3, 4, 7)
    tokens = torch.randint(0, 7, (3, 4), generator=gen)
    res = ak.token_stats(logits, tokens, backend=backend)
    assert res.topk_ids.shape == (3, 4, 0) and res.topk_ids.dtype == torch.int64
    assert res.topk_logp.shape == (3, 4, 0)


def test_int32_tokens_accepted(backend, gen):
    logits = make_logits(gen, 6, 19, torch.float32)
    tokens = make_tokens(gen, 6, 19)
    a = ak.token_stats(logits, tokens.to(torch.int32), topk=2, backend=backend)
    b = ak.token_stats(logits, tokens, topk=2, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_padded_equals_flat(backend, gen):
    # [B, T, V] and the same rows flattened to [N, V] give the same statistics
    B, T, V = 3, 5, 31
    logits = make_logits(gen, B * T, V, torch.float32).reshape(B, T, V)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    tokens[1, 3:] = -100
    a = ak.token_stats(logits, tokens, topk=3, backend=backend)
    b = ak.token_stats(logits.reshape(-1, V), tokens.reshape(-1), topk=3, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.reshape(y.shape), y)


def test_no_grad_on_lse_and_topk(backend, gen):
    logits = make_logits(gen, 5, 11, torch.float32).requires_grad_()
    res = ak.token_stats(logits, make_tokens(gen, 5, 11), topk=2, backend=backend)
    assert res.logp.requires_grad and res.entropy.requires_grad
    assert not res.lse.requires_grad
    assert not res.topk_logp.requires_grad


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------

GRAD_TARGETS = ["logp", "entropy", "both", "tuple"]


def _objective(res, target, w1, w2):
    if target == "logp":
        return res.logp
    if target == "entropy":
        return res.entropy
    if target == "both":
        return (res.logp * w1 + res.entropy * w2).sum()
    return res.logp, res.entropy


@pytest.mark.parametrize("target", GRAD_TARGETS)
@pytest.mark.parametrize("mode,k", [("exact", 0), ("exact", 3), ("topk", 3)])
@pytest.mark.parametrize("tau,ignore", [(1.0, ()), (0.7, (1, 4))], ids=["plain", "tau-ignored"])
def test_gradcheck(backend, gen, target, mode, k, tau, ignore):
    N, V = 6, 9
    logits = make_logits(gen, N, V, torch.float64, scale=1.5).requires_grad_()
    tokens = make_tokens(gen, N, V, ignore=ignore)
    w1 = torch.randn(N, generator=gen, dtype=torch.float64)
    w2 = torch.randn(N, generator=gen, dtype=torch.float64)

    def fn(x):
        res = ak.token_stats(x, tokens, temperature=tau, topk=k, entropy=mode, backend=backend)
        return _objective(res, target, w1, w2)

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_3d(backend, gen):
    logits = make_logits(gen, 8, 7, torch.float64).reshape(2, 4, 7).requires_grad_()
    tokens = torch.randint(0, 7, (2, 4), generator=gen)
    tokens[0, 2] = -100
    w = torch.randn(2, 4, generator=gen, dtype=torch.float64)

    def fn(x):
        r = ak.token_stats(x, tokens, temperature=1.3, backend=backend)
        return (r.logp * w + r.entropy).sum()

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


def torch_reference(logits, tokens, tau, topk, mode, ignore_index=-100):
    """Autograd-through-torch-ops reference (log_softmax etc.), computed in float64."""
    s = logits.to(torch.float64) / tau
    logp_all = torch.log_softmax(s, dim=-1)
    valid = tokens != ignore_index
    safe = torch.where(valid, tokens, torch.zeros_like(tokens))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    p = logp_all.exp()
    plogp = p * logp_all
    if mode == "exact":
        ent = -plogp.sum(-1)
    else:
        sel = torch.zeros_like(s, dtype=torch.bool)
        # top-k with ties to the smaller id: a stable descending sort keeps equal values in id order
        sel.scatter_(-1, torch.sort(s.detach(), dim=-1, descending=True, stable=True).indices[..., :topk], True)
        sel.scatter_(-1, safe.unsqueeze(-1), True)
        ent = -(plogp * sel).sum(-1)
    zero = torch.zeros((), dtype=torch.float64)
    return torch.where(valid, logp, zero), torch.where(valid, ent, zero)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("mode,k", [("exact", 0), ("topk", 4)])
@pytest.mark.parametrize("tau", [1.0, 0.8])
def test_grad_vs_torch_reference_and_oracle(backend, gen, dtype, mode, k, tau):
    N, V = 16, 83
    base = make_logits(gen, N, V, dtype)
    tokens = make_tokens(gen, N, V, ignore=(5,))
    w1 = torch.randn(N, generator=gen)
    w2 = torch.randn(N, generator=gen)

    logits = base.clone().requires_grad_()
    res = ak.token_stats(logits, tokens, temperature=tau, topk=k, entropy=mode, backend=backend)
    (res.logp * w1 + res.entropy * w2).sum().backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape

    ref_in = base.to(torch.float64).requires_grad_()
    lp, h = torch_reference(ref_in, tokens, tau, k, mode)
    (lp * w1.double() + h * w2.double()).sum().backward()

    atol, rtol = tol(dtype, "grad")
    assert_close(logits.grad, ref_in.grad, atol, rtol, "grad vs torch reference")

    rows = f64(base)
    exp = [oracle.token_stats_grad_row(rows[n], int(tokens[n]), float(w1[n]), float(w2[n]), tau, k,
                                       -100, mode) for n in range(N)]
    assert_close(logits.grad, exp, atol, rtol, "grad vs oracle")
    assert logits.grad[5].abs().max().item() == 0


@pytest.mark.parametrize("garbage", ["nan", "-inf"])
def test_ignored_rows_have_zero_grad(backend, gen, garbage):
    N, V = 6, 17
    logits = make_logits(gen, N, V, torch.float32)
    logits[3] = float(garbage)
    logits.requires_grad_()
    tokens = make_tokens(gen, N, V, ignore=(3,))
    res = ak.token_stats(logits, tokens, backend=backend)
    (res.logp.sum() + 0.5 * res.entropy.sum()).backward()
    assert torch.equal(logits.grad[3], torch.zeros(V))
    assert torch.isfinite(logits.grad).all()


def test_grad_non_contiguous(backend, gen):
    N, V = 8, 21
    base = make_logits(gen, V, N, torch.float64).requires_grad_()
    logits = base.t()
    tokens = make_tokens(gen, N, V)
    res = ak.token_stats(logits, tokens, backend=backend)
    (res.logp + 2 * res.entropy).sum().backward()
    exp_in = base.detach().clone().requires_grad_()
    lp, h = torch_reference(exp_in.t(), tokens, 1.0, 0, "exact")
    (lp + 2 * h).sum().backward()
    torch.testing.assert_close(base.grad, exp_in.grad, atol=1e-10, rtol=1e-10)


def test_topk_entropy_support_hand_worked(backend):
    # logits [2, 1, 0, -1], k = 2: the top-2 ids are {0, 1}.
    #   token 0 (inside the top-k): support {0, 1}      -> H = -(p0 log p0 + p1 log p1)
    #   token 3 (outside):          support {0, 1, 3}   -> H = -(p0 log p0 + p1 log p1 + p3 log p3)
    # with p the FULL softmax (not renormalised over the support)
    z = [2.0, 1.0, 0.0, -1.0]
    lse = math.log(sum(math.exp(x) for x in z))
    p = [math.exp(x - lse) for x in z]
    h = lambda ids: -sum(p[i] * math.log(p[i]) for i in ids)
    logits = torch.tensor([z, z], dtype=torch.float64)
    res = ak.token_stats(logits, torch.tensor([0, 3]), topk=2, entropy="topk", backend=backend)
    assert res.entropy.tolist() == pytest.approx([h([0, 1]), h([0, 1, 3])], abs=1e-12)
    assert res.topk_ids.tolist() == [[0, 1], [0, 1]]
    exact = ak.token_stats(logits, torch.tensor([0, 3]), topk=2, backend=backend)
    assert exact.entropy.tolist() == pytest.approx([h(range(4))] * 2, abs=1e-12)


@pytest.mark.parametrize("entropy", ["exact", "topk"])
def test_masked_vocab_gradient_is_exactly_zero_with_large_upstream(backend, gen, entropy):
    # p = 0 at a -inf logit must give gradient 0 there, even when g_entropy * (log p + H) would overflow.
    logits = make_logits(gen, 4, 50, torch.float32)
    logits[:, ::3] = float("-inf")
    tokens = torch.tensor([1, 2, 4, 5])
    x = logits.clone().requires_grad_()
    st = ak.token_stats(x, tokens, topk=3, entropy=entropy, backend=backend)
    (st.logp.sum() * 3.0 + st.entropy.sum() * 7.5).backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad[:, ::3], torch.zeros_like(x.grad[:, ::3]))


# ----------------------------------------------------------------------------------------------------------
# Triton: the vocabulary-split grid and the single-pass top-k, forced onto small tiles and many splits
# ----------------------------------------------------------------------------------------------------------

def _triton_forward():
    from appo_kernels.backends import triton_backend
    if not triton_backend.available():
        pytest.skip("Triton runs on CPU only under TRITON_INTERPRET=1")
    from appo_kernels.backends.triton_kernels.token_stats import token_stats_forward
    return token_stats_forward


def _hard_rows(gen, V):
    """Rows that stress the running top-k: ascending (every tile beats the list), descending (none after the
    first), heavy ties across tiles, a constant row, -inf on most columns, and a target on a -inf entry."""
    rows = [torch.arange(V, dtype=torch.float64) / V, -torch.arange(V, dtype=torch.float64) / V,
            torch.randint(0, 3, (V,), generator=gen).double(), torch.zeros(V, dtype=torch.float64),
            torch.randn(V, generator=gen, dtype=torch.float64)]
    for _ in range(2):                        # -inf but on 3 columns, so top-k lists end in -inf entries
        sparse = torch.full((V,), float("-inf"), dtype=torch.float64)
        sparse[torch.randperm(V - 20, generator=gen)[:3] + 20] = torch.randn(3, generator=gen, dtype=torch.float64)
        rows.append(sparse)
    return torch.stack(rows + [torch.randn(V, generator=gen, dtype=torch.float64) * 4])


# (vocabulary splits, tile width, k, entropy, dtype); 50 splits of V = 97 leave 2 columns per split, fewer
# than k: lists that never fill.
SPLIT_CASES = [(1, 16, 5, "exact", torch.float32), (3, 16, 5, "exact", torch.bfloat16),
               (3, 16, 0, "exact", torch.float32), (7, 16, 20, "topk", torch.float32),
               (2, 64, 64, "exact", torch.float32), (50, 16, 1, "exact", torch.float32),
               (13, 16, 5, "topk", torch.bfloat16), (50, 16, 5, "exact", torch.float32)]


@pytest.mark.parametrize("splits,block,k,mode,dtype", SPLIT_CASES, ids=lambda c: str(c))
def test_triton_splits_and_tiles_match_oracle(gen, splits, block, k, mode, dtype):
    forward = _triton_forward()
    V = 97 if k < 64 else 130
    logits = _hard_rows(gen, V).to(dtype)
    n = logits.shape[0]
    tokens = torch.randint(0, V, (n,), generator=gen)
    tokens[0], tokens[1], tokens[2] = 0, V - 1, -100
    tokens[5] = int(torch.nonzero(torch.isinf(logits[5].double()))[0])       # the target logit is -inf
    tokens[6] = int(torch.nonzero(torch.isfinite(logits[6].double()))[0])
    from appo_kernels.backends._interface import TokenOptions, empty_row_stats
    res = empty_row_stats(n, k, mode == "topk", logits)
    forward(logits, tokens, TokenOptions(0.8, k, -100, mode == "topk"), res, vocab_splits=splits, block_v=block)
    rows = [0, 1, 2, 3, 4, 6, 7]                 # row 5 has logp -inf (checked below)
    check_against_oracle(type(res)(*(t[rows] if t.dim() and t.shape[0] == n else t for t in res)), logits[rows], tokens[rows],
                         temperature=0.8, topk=k, entropy=mode)
    assert res.logp[5].item() == float("-inf") and math.isfinite(res.lse[5].item())


def test_triton_topk_beyond_the_register_limit_is_refused():
    _triton_forward()
    from appo_kernels.backends import triton_backend
    limit = triton_backend.TOKEN_STATS_MAX_TOPK
    logits, tokens = torch.randn(2, 200), torch.tensor([0, 1])
    with pytest.raises(ak.backends.BackendUnsupported, match="'triton' does not run token_stats"):
        ak.token_stats(logits, tokens, topk=limit + 1, backend="triton")
    ref = ak.token_stats(logits, tokens, topk=limit + 1, backend="torch")
    assert ak.token_stats(logits, tokens, topk=limit, backend="triton").topk_ids.tolist() == \
        ref.topk_ids[:, :limit].tolist()


# ----------------------------------------------------------------------------------------------------------
# inplace_backward: the gradient written over the logits
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,k", [("exact", 0), ("exact", 4), ("topk", 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_gives_the_same_gradient(backend, gen, mode, k, dtype):
    x = make_logits(gen, 12, 37, dtype).reshape(3, 4, 37).requires_grad_()
    tokens = make_tokens(gen, 12, 37, ignore=(5,)).reshape(3, 4)
    g_lp, g_h = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)

    def grad(inplace):
        x.grad = None
        logits = x * 1                         # the model's output: not a leaf, nothing else saves it
        st = ak.token_stats(logits, tokens, topk=k, entropy=mode, inplace_backward=inplace, backend=backend)
        (st.logp * g_lp + st.entropy * g_h).sum().backward()
        return x.grad.clone(), logits.detach()

    expected, untouched = grad(False)
    got, overwritten = grad(True)
    assert torch.equal(got, expected)
    assert torch.equal(overwritten, expected)            # the logits now hold the gradient ...
    assert not torch.equal(untouched, expected)          # ... which they did not without the option


def test_inplace_backward_makes_a_stale_read_fail_loudly(backend, gen):
    x = make_logits(gen, 4, 19, torch.float32).requires_grad_()
    tokens = make_tokens(gen, 4, 19)
    logits = x * 1
    squares = (logits * logits).sum()         # saves logits; its backward runs after token_stats' backward
    st = ak.token_stats(logits, tokens, inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (st.logp.sum() + squares).backward()


def test_inplace_backward_refuses_what_it_cannot_overwrite(backend, gen):
    x = make_logits(gen, 4, 19, torch.float32).requires_grad_()
    tokens = make_tokens(gen, 4, 19)
    with pytest.raises(ValueError, match="inplace_backward: logits is a leaf tensor"):
        ak.token_stats(x, tokens, inplace_backward=True, backend=backend)
    with pytest.raises(ValueError, match="inplace_backward: .* must be contiguous"):
        ak.token_stats((x * 1).t().contiguous().t(), tokens, inplace_backward=True, backend=backend)


def test_mask_ignores_rows_whatever_their_token(backend, gen):
    """mask == 0 rows are ignored as ignore_index rows are, even when their token is out of range."""
    logits = make_logits(gen, 6, 23, torch.float32)
    tokens = make_tokens(gen, 6, 23)
    mask = torch.tensor([1, 0, 1, 1, 0, 1])
    garbage = torch.where(mask.bool(), tokens, torch.full_like(tokens, 10 ** 6))
    got = ak.token_stats(logits, garbage, mask=mask, topk=2, backend=backend)
    want = ak.token_stats(logits, torch.where(mask.bool(), tokens, -100), topk=2, backend=backend)
    for name, a, b in zip(got._fields, got, want):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="mask"):
        ak.token_stats(logits, tokens, mask=torch.ones(5), backend=backend)
