"""Hostile inputs: narrow integer dtypes, out-of-range ids and segments with value checks off (as under
torch.compile), non-finite values that must stay where they are, garbage at masked-out positions, and precision
at large logits. Inputs that once crashed the process run in a subprocess, so a crash fails one test instead
of ending the session. docs/api.md, "Out-of-range inputs", states the rules tested here."""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import appo_kernels as ak
import oracle
from helpers import assert_close, f64

NAN, INF = float("nan"), float("inf")


# ----------------------------------------------------------------------------------------------------------
# narrow integer token dtypes: every comparison is made in int64, identically on every backend
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, vocab, ids, ignore_index", [
    (torch.uint8, 256, [0, 255, 156, 100], -100),    # 156 == -100 as a uint8; 255 is the last valid id
    (torch.uint8, 200, [156, 3, 199, 0], -100),
    (torch.int8, 128, [127, 0, 5, 100], -100),       # -100 is an int8, but V = 128 holds 127
    (torch.int16, 300, [100, 299, 0, 7], 65436),     # 65436 wraps to -100 as an int16
    (torch.int32, 300, [100, 299, 0, 7], 2 ** 40),
])
def test_narrow_token_dtypes_equal_int64(backend, gen, dtype, vocab, ids, ignore_index):
    logits = torch.randn(len(ids), vocab, generator=gen)
    tokens = torch.tensor(ids, dtype=torch.int64)
    want = ak.token_stats(logits, tokens, topk=3, ignore_index=ignore_index, backend=backend)
    got = ak.token_stats(logits, tokens.to(dtype), topk=3, ignore_index=ignore_index, backend=backend)
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a, b), f"{name} differs for {dtype} tokens on {backend}"
    rows = oracle.token_stats(f64(logits), ids, topk=3, ignore_index=ignore_index)
    assert_close(got.logp, rows["logp"], 1e-5, 1e-5, "logp vs the oracle")


def test_narrow_tokens_out_of_range_are_refused(backend):
    with pytest.raises(ValueError, match="tokens"):
        ak.token_stats(torch.randn(1, 100), torch.tensor([156], dtype=torch.uint8), backend=backend)


def test_narrow_ignore_index_matches_only_its_value(backend, gen):
    """ignore_index = -100 with int8 tokens ignores exactly the rows holding -100."""
    logits = torch.randn(3, 10, generator=gen)
    tokens = torch.tensor([-100, 4, 9], dtype=torch.int8)
    st = ak.token_stats(logits, tokens, backend=backend)
    assert st.logp[0] == 0 and st.lse[0] == 0
    want = ak.token_stats(logits[1:], tokens[1:].long(), backend=backend)
    assert torch.equal(st.logp[1:], want.logp)


def test_branching_score_uint8_tokens(backend, gen):
    logits = torch.randn(2, 6, 256, generator=gen)
    tokens = torch.randint(0, 256, (2, 6), generator=gen)
    tokens[0, 1] = 156                                 # -100 as a uint8: once read as the ignore sentinel
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    lpo = torch.randn(2, 6, generator=gen)
    want = ak.branching_score(logits, tokens, lpo, mask, topk=2, backend=backend)
    got = ak.branching_score(logits, tokens.to(torch.uint8), lpo, mask, topk=2, backend=backend)
    for name, a, b in zip(want._fields, got, want):
        assert torch.equal(a, b), f"{name} differs for uint8 tokens on {backend}"
    assert got.logp[0, 1] != 0


# ----------------------------------------------------------------------------------------------------------
# value checks off: out-of-range ids and segments never leave the buffers (in a subprocess)
# ----------------------------------------------------------------------------------------------------------

_CHECKS_OFF_SCRIPT = r"""
import math, sys, torch
import appo_kernels as ak
from appo_kernels._layout import nearest_partition
backend = sys.argv[1]
g = torch.Generator().manual_seed(0)

def say(case):
    print("ok", case, flush=True)

def same(a, b):
    return torch.allclose(a, b, equal_nan=True, atol=1e-6, rtol=1e-6)

# token ids outside [0, V): never read; that row's logp is NaN, every other output and row as with valid ids
x = torch.randn(5, 7, generator=g)
good = torch.tensor([0, 1, 2, 6, 3])
for bad_id in (10 ** 7, -5, 7, -(2 ** 62)):
    for entropy, topk in (("exact", 0), ("exact", 3), ("topk", 3)):
        ak.set_value_checks(True)
        ref = ak.token_stats(x, good, topk=topk, entropy=entropy, backend=backend)
        ak.set_value_checks(False)
        xx = x.clone().requires_grad_(True)
        tok = good.clone(); tok[2] = bad_id
        st = ak.token_stats(xx, tok, topk=topk, entropy=entropy, backend=backend)
        assert math.isnan(st.logp[2]), st.logp
        keep = torch.tensor([0, 1, 3, 4])
        assert same(st.logp[keep], ref.logp[keep]) and same(st.lse, ref.lse), (st, ref)
        assert same(st.topk_logp, ref.topk_logp) and torch.equal(st.topk_ids, ref.topk_ids)
        if entropy == "exact":
            assert same(st.entropy, ref.entropy)
        else:
            assert same(st.entropy[keep], ref.entropy[keep]) and math.isnan(st.entropy[2])
        (st.logp[keep].sum() + st.entropy[keep].sum()).backward()
        assert torch.isfinite(xx.grad[keep]).all()
        say(f"token {bad_id} entropy={entropy} topk={topk}")
        # the custom op itself, called directly, with the id out of range
        from appo_kernels.backends._interface import empty_row_stats
        torch.ops.appo_kernels.token_stats_fwd_out(x, tok, 1.0, topk, -100, entropy == "topk", backend,
                                                   *empty_row_stats(5, topk, entropy == "topk", x))
        say(f"custom op token {bad_id} entropy={entropy} topk={topk}")
ak.set_value_checks(True)

# torch.compile switches value checks off by itself
f = torch.compile(lambda a, t: ak.token_stats(a, t, backend=backend).logp, backend="aot_eager", fullgraph=True)
out = f(torch.randn(4, 7, generator=g), torch.tensor([0, 1, 2, 10 ** 7]))
assert math.isnan(out[3]) and torch.isfinite(out[:3]).all(), out
say("compiled token_stats")

# cu_seqlens that is not a partition of [0, N): read as the nearest one
N = 12
lp, lpo, ent = (torch.randn(N, generator=g) for _ in range(3))
mask = torch.rand(N, generator=g) > 0.2
rewards = torch.randn(3, generator=g)
bad_cus = ([0, 3, 7, 100000000], [0, -5, 7, 12], [0, 9, 3, 12], [4, 3, 12, 11], [-3, 20, 1, 5])
for bad in bad_cus:
    bad = torch.tensor(bad)
    fixed = nearest_partition(bad, N)
    ak.set_value_checks(False)
    fv = ak.future_values(lp, lpo, mask, cu_seqlens=bad, backend=backend)
    sc = ak.score_tokens(ent, lp, lpo, mask, cu_seqlens=bad, backend=backend)
    pa = ak.procedure_advantages(rewards, torch.tensor([0, 0, 1]), torch.tensor([-1, 0, -1]),
                                 torch.tensor([1, 1, 0]), mask, cu_seqlens=bad, backend=backend)
    ak.set_value_checks(True)
    want_fv = ak.future_values(lp, lpo, mask, cu_seqlens=fixed, backend=backend)
    want_sc = ak.score_tokens(ent, lp, lpo, mask, cu_seqlens=fixed, backend=backend)
    assert same(fv.gain, want_fv.gain) and same(sc.score, want_sc.score), (bad, fixed)
    assert torch.equal(sc.candidate, want_sc.candidate)
    assert pa.advantages.shape == (N,)
    say(f"cu_seqlens {bad.tolist()}")
    # the custom ops themselves, called directly with the bad cu_seqlens: no access outside [0, N)
    torch.ops.appo_kernels.reverse_scan_out(lp, bad, 1.0, backend, torch.empty_like(lp))
    torch.ops.appo_kernels.branching_score_out(ent, lpo, mask, bad, backend, torch.empty_like(ent),
                                               torch.zeros_like(mask))
    say(f"custom ops cu_seqlens {bad.tolist()}")

# parent / split / group ids out of range with checks off: clamped or dropped, never an index error
ak.set_value_checks(False)
pa = ak.procedure_advantages(rewards, torch.tensor([0, 0, 5]), torch.tensor([-1, 9, 1]),
                             torch.tensor([1, 10 ** 6, -4]), mask, cu_seqlens=torch.tensor([0, 3, 7, 12]),
                             num_groups=2, backend=backend)
bp = ak.select_branch_points(sc.score, sc.candidate, torch.tensor([0, 7, -1]), 2, cu_seqlens=torch.tensor([0, 3, 7, 12]),
                             num_groups=2)
ak.set_value_checks(True)
say("tree and group ids")

cf = torch.compile(lambda a, b, c: ak.future_values(a, b, cu_seqlens=c, backend=backend).gain,
                   backend="aot_eager", fullgraph=True)
cf(lp, lpo, torch.tensor([0, 3, 7, 100000000]))
say("compiled future_values")
print("done", flush=True)
"""


def test_out_of_range_inputs_with_checks_off_do_not_crash(backend):
    proc = subprocess.run([sys.executable, "-c", _CHECKS_OFF_SCRIPT, backend], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ))
    done = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    last = done[-1] if done else "(none)"
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("done"), (
        f"exit {proc.returncode} after {last!r}\n{proc.stderr[-3000:]}")


def test_nearest_partition():
    from appo_kernels._layout import nearest_partition
    cases = {(0, 3, 7, 100000000): (0, 3, 7, 12), (0, -5, 7, 12): (0, 0, 7, 12), (0, 9, 3, 12): (0, 9, 9, 12),
             (4, 3, 12, 11): (0, 3, 12, 12), (0, 12): (0, 12), (0, 3, 7, 12): (0, 3, 7, 12)}
    for bad, want in cases.items():
        assert nearest_partition(torch.tensor(bad), 12).tolist() == list(want), bad


# ----------------------------------------------------------------------------------------------------------
# non-finite values stay in their rollout
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_non_finite_logp_stays_in_its_rollout(backend, gen, layout, gamma):
    B, T = 6, 40
    lp = torch.randn(B, T, generator=gen) * 0.1
    lpo = torch.randn(B, T, generator=gen) * 0.1
    lp[0, 20] = -INF
    lp[2, 5] = NAN
    lp[3, 30], lp[3, 10] = INF, -INF             # both infinities: NaN before position 10
    lpo[4, 39] = -INF                            # +inf log-ratio at the last token
    mask = torch.ones(B, T, dtype=torch.bool)
    want_omega, want_gain = oracle.future_values(f64(lp), f64(lpo), mask.tolist(), gamma=gamma)
    if layout == "padded":
        fv = ak.future_values(lp, lpo, mask, gamma=gamma, backend=backend)
    else:
        cu = torch.arange(B + 1) * T
        fv = ak.future_values(lp.reshape(-1), lpo.reshape(-1), mask.reshape(-1), cu_seqlens=cu, gamma=gamma,
                              backend=backend)
    assert_close(fv.gain.reshape(B, T), want_gain, 1e-5, 1e-5, "gain")
    assert_close(fv.omega.reshape(B, T), want_omega, 1e-6, 1e-6, "omega")
    assert torch.isfinite(fv.omega.reshape(B, T)[[1, 5]]).all()


def test_non_finite_values_agree_across_backends(gen):
    lp = torch.randn(5, 64, generator=gen) * 0.1
    lpo = torch.randn(5, 64, generator=gen) * 0.1
    lp[0, 50], lp[1, 3], lp[1, 60], lp[2, 0] = -INF, NAN, INF, INF
    outs = {b: ak.future_values(lp, lpo, backend=b) for b in ak.available_backends()}
    ref = outs.pop("torch")
    for b, fv in outs.items():
        assert torch.allclose(fv.gain, ref.gain, equal_nan=True, atol=1e-5), b
        assert torch.allclose(fv.omega, ref.omega, equal_nan=True), b


# ----------------------------------------------------------------------------------------------------------
# gradients at -inf logits, garbage under the mask, precision at large logits
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("g_entropy", [1.5, -3.0, 1e3])
def test_topk_entropy_gradient_is_finite_at_minus_inf(backend, g_entropy):
    x = torch.tensor([[-INF, 1.0, 0.5, -INF], [0.3, -INF, -INF, 2.0]], requires_grad=True)
    tokens = torch.tensor([1, 3])
    st = ak.token_stats(x, tokens, topk=3, entropy="topk", backend=backend)
    (st.entropy * g_entropy + st.logp * 0.5).sum().backward()
    assert torch.isfinite(x.grad).all(), x.grad
    for i in range(2):
        want = oracle.token_stats_grad_row(f64(x[i]), int(tokens[i]), 0.5, g_entropy, topk=3, entropy="topk")
        assert_close(x.grad[i], want, 1e-5, 1e-5, f"row {i}")


def test_policy_loss_ignores_garbage_under_the_mask(gen):
    B, T = 3, 8
    lp = (torch.randn(B, T, generator=gen) * 0.1 - 1).requires_grad_(True)
    lpo, ref, adv = (torch.randn(B, T, generator=gen) * 0.1 - 1 for _ in range(3))
    ent = torch.rand(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:], mask[2, :2] = False, False
    clean = ak.policy_loss(lp, lpo, adv, mask, logp_ref=ref, entropy=ent, entropy_coef=0.01)
    (g_clean,) = torch.autograd.grad(clean.loss, lp)
    dirty = [t.detach().clone() for t in (lp, lpo, ref, adv, ent)]
    for t, junk in zip(dirty, (NAN, -INF, NAN, INF, NAN)):
        t[~mask] = junk
    dirty[3][2, 0] = -INF
    lp_d = dirty[0].requires_grad_(True)
    for aggregation in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        out = ak.policy_loss(lp_d, dirty[1], dirty[3], mask, logp_ref=dirty[2], entropy=dirty[4],
                             entropy_coef=0.01, aggregation=aggregation)
        want = ak.policy_loss(lp, lpo, adv, mask, logp_ref=ref, entropy=ent, entropy_coef=0.01,
                              aggregation=aggregation)
        for name, a, b in zip(out._fields, out, want):
            assert torch.allclose(a, b), (aggregation, name, a, b)
    out = ak.policy_loss(lp_d, dirty[1], dirty[3], mask, logp_ref=dirty[2], entropy=dirty[4], entropy_coef=0.01)
    (g_dirty,) = torch.autograd.grad(out.loss, lp_d)
    assert torch.isfinite(g_dirty).all() and torch.allclose(g_dirty, g_clean)


def test_large_negative_logits_keep_float32_precision(backend, gen):
    """Rows around -1000: logp and top-k log-probs as (s - m) - log sum exp(s - m), within float32 rounding."""
    x = torch.randn(6, 1000, generator=gen) * 3 - 1000
    tokens = torch.randint(0, 1000, (6,), generator=gen)
    st = ak.token_stats(x, tokens, topk=5, backend=backend)
    rows = oracle.token_stats(f64(x), tokens.tolist(), topk=5)
    assert_close(st.logp, rows["logp"], 2e-6, 0, "logp")
    assert_close(st.topk_logp, rows["topk_logp"], 2e-6, 0, "topk_logp")


# ----------------------------------------------------------------------------------------------------------
# options: integer-likes accepted, the full int64 range of ignore_index, triton only where it can run
# ----------------------------------------------------------------------------------------------------------

def test_integer_like_options(backend, gen):
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 9, generator=gen)
    t = torch.tensor([1, 2, 3])
    want = ak.token_stats(x, t, topk=2, backend=backend)
    got = ak.token_stats(x, t, topk=np.int64(2), ignore_index=np.int32(-1), backend=backend)
    assert torch.equal(got.topk_ids, want.topk_ids) and torch.equal(got.logp, want.logp)


@pytest.mark.parametrize("ignore_index", [2 ** 63 - 1, -(2 ** 63)])
def test_ignore_index_spans_int64(backend, gen, ignore_index):
    x = torch.randn(2, 9, generator=gen)
    t = torch.tensor([ignore_index, 4])
    st = ak.token_stats(x, t, ignore_index=ignore_index, backend=backend)
    assert st.logp[0] == 0 and math.isclose(float(st.logp[1]), float(torch.log_softmax(x[1], 0)[4]), rel_tol=1e-5)


def test_triton_is_listed_only_where_it_can_run():
    code = textwrap.dedent("""
        import torch, appo_kernels as ak
        assert not torch.cuda.is_available()
        print(ak.available_backends())
        try:
            ak.token_stats(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")
        except ValueError as err:
            print(err)
    """)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    if "AssertionError" in proc.stderr:
        pytest.skip("a CUDA device is present")
    assert proc.returncode == 0, proc.stderr
    listed, message = proc.stdout.splitlines()[:2]
    assert "triton" not in listed
    assert "backend" in message and "TRITON_INTERPRET=1" in message
