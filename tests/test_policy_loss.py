"""policy_loss (method §7, docs/api.md `policy_loss`): clip-higher, dual clip, KL estimators, aggregations,
metrics and gradients, against the oracle."""

import math

import oracle
import pytest
import torch
from helpers import FLOAT_DTYPES, LAYOUTS, SeqBatch, make_lengths, make_mask, rows, seq_logps

import appo_kernels as ak


def random_inputs(gen, B, T, dtype):
    lengths = make_lengths(gen, B, T)  # every rollout has >= 1 masked-in token
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, torch.float64, delta_scale=0.3, garbage=3.0)
    # some large ratios so that the dual clip (ratio > 3 for A < 0) is active somewhere
    big = torch.rand(B, T, generator=gen) < 0.12
    logp_old = torch.where(big, logp_old - 1.6, logp_old)
    logp_ref = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.5
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    # make sure both clips are exercised on masked-in tokens (t = 0 is never a tool span):
    #   rollout 0, t 0: A = -1.5, ratio e^1.6 = 4.95 > 3 -> dual clip active
    #   rollout 1, t 0: A = +1,   ratio e^0.5 = 1.65 > 1.28 -> upper clip active
    logp_old[0, 0], adv[0, 0] = logp[0, 0] - 1.6, -1.5
    logp_old[1, 0], adv[1, 0] = logp[1, 0] - 0.5, 1.0
    entropy = torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    cast = lambda x: x.to(dtype)
    return batch, mask, cast(logp), cast(logp_old), cast(logp_ref), cast(adv), cast(entropy)


def loss_tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 2e-4)


CONFIGS = [
    {"aggregation": "token-mean", "kl_estimator": "k3"},
    {"aggregation": "token-mean", "kl_estimator": "k1", "kl_coef": 0.1},
    {"aggregation": "token-mean", "kl_estimator": "k2", "kl_coef": 0.1, "entropy_coef": 0.01},
    {"aggregation": "token-mean", "kl_coef": 0.0},
    {"aggregation": "seq-mean-token-mean", "kl_estimator": "k3", "kl_coef": 0.1},
    {"aggregation": "seq-mean-token-sum", "kl_estimator": "k1", "kl_coef": 0.05, "entropy_coef": 0.02},
    {"aggregation": "seq-mean-token-sum-norm", "kl_estimator": "k2", "kl_coef": 0.1, "loss_scale": 16.0},
    {"aggregation": "token-mean", "eps_low": 0.1, "eps_high": 0.1, "clip_ratio_c": 2.0, "token_count": 123},
    # the authors' two details (method §7), off, and the KL clamp binding
    {"aggregation": "token-mean", "drop_dual_clipped": False, "kl_clamp": None},
    {"aggregation": "seq-mean-token-mean", "kl_coef": 0.1, "kl_clamp": 0.05},
    {"aggregation": "token-mean", "kl_estimator": "k2", "kl_coef": 0.1, "kl_clamp": 0.02, "token_count": 77},
]


def cfg_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items())


def call(batch, layout, logp, logp_old, adv, mask, logp_ref=None, entropy=None, with_ref=True, **cfg):
    lp, lpo, a, m, ref, ent, cu = batch.args(layout, logp, logp_old, adv, mask, logp_ref if with_ref else None,
                                             entropy)
    return ak.policy_loss(lp, lpo, a, m, cu_seqlens=cu, logp_ref=ref, entropy=ent, **cfg)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_matches_oracle(gen, dtype, layout, cfg):
    B, T = 5, 16
    batch, mask, logp, logp_old, logp_ref, adv, entropy = random_inputs(gen, B, T, dtype)
    res = call(batch, layout, logp, logp_old, adv, mask, logp_ref, entropy, **cfg)
    ref = oracle.policy_loss(rows(logp), rows(logp_old), rows(adv), rows(mask), logp_ref=rows(logp_ref),
                             entropy=rows(entropy), **cfg)
    t = loss_tol(dtype)
    assert res.loss.shape == ()
    assert res.loss.item() == pytest.approx(ref["loss"], abs=t, rel=t)
    if cfg.get("kl_coef", 0.001) > 0:  # with kl_coef = 0 the KL term (and so its metric) is not defined
        assert res.kl.item() == pytest.approx(ref["kl"], abs=t, rel=t)
    assert res.clip_fraction.item() == pytest.approx(ref["clip_fraction"], abs=1e-6)
    assert res.dual_clip_fraction.item() == pytest.approx(ref["dual_clip_fraction"], abs=1e-6)
    if cfg["aggregation"] == "token-mean" and "token_count" not in cfg:
        assert res.pg_loss.item() == pytest.approx(ref["pg_loss"], abs=t, rel=t)
    assert ref["dual_clip_fraction"] > 0 and ref["clip_fraction"] > 0  # the data exercises both clips


def test_hand_worked():
    # four tokens, one rollout, defaults eps_low 0.2, eps_high 0.28, c = 3, no KL:
    #   t0: A = +1, ratio 1.5 -> max(-1.5, -1.28) = -1.28          (clip-higher bound active)
    #   t1: A = -1, ratio 0.5 -> max(0.5, 0.8) = 0.8               (lower bound active)
    #   t2: A = -1, ratio 5   -> max(5, 1.28) = 5 -> min(5, 3) = 3 (dual clip active)
    #   t3: A = +1, ratio 0.5 -> max(-0.5, -0.8) = -0.5            (unclipped)
    # token-mean loss = (-1.28 + 0.8 + 3 - 0.5) / 4 = 0.505
    # clip_fraction = 2/4 (t0, t1), dual_clip_fraction = 1/4 (t2)
    # d loss / d logp = d(-A ratio)/d logp / 4 only where unclipped: t3 -> -(+1)(0.5)/4 = -0.125
    ratio = torch.tensor([[1.5, 0.5, 5.0, 0.5]], dtype=torch.float64)
    logp = torch.log(ratio).requires_grad_()
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    res = ak.policy_loss(logp, torch.zeros(1, 4, dtype=torch.float64), adv)
    assert res.loss.item() == pytest.approx(0.505, abs=1e-12)
    assert res.pg_loss.item() == pytest.approx(0.505, abs=1e-12)
    assert res.clip_fraction.item() == pytest.approx(0.5)
    assert res.dual_clip_fraction.item() == pytest.approx(0.25)
    res.loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, 0.0, 0.0, -0.125], abs=1e-12)
    # the same tokens with a mask dropping t2: loss = (-1.28 + 0.8 - 0.5) / 3
    res = ak.policy_loss(logp.detach(), torch.zeros(1, 4, dtype=torch.float64), adv,
                         torch.tensor([[1, 1, 0, 1]]))
    assert res.loss.item() == pytest.approx((-1.28 + 0.8 - 0.5) / 3, abs=1e-12)
    assert res.dual_clip_fraction.item() == 0


def test_hand_worked_kl_estimators():
    # d = logp_ref - logp = 0.5 at the only token, A = 0 (pg = 0), kl_coef = 1:
    #   k1 = -0.5;  k2 = 0.125;  k3 = exp(0.5) - 0.5 - 1 = 0.148721
    logp = torch.tensor([[-1.0]], dtype=torch.float64)
    for est, exp in (("k1", -0.5), ("k2", 0.125), ("k3", 0.1487212707001282)):
        res = ak.policy_loss(logp, logp, torch.zeros(1, 1, dtype=torch.float64), logp_ref=logp + 0.5,
                             kl_coef=1.0, kl_estimator=est)
        assert res.loss.item() == pytest.approx(exp, abs=1e-12), est
        assert res.kl.item() == pytest.approx(exp, abs=1e-12), est


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_padded_equals_packed(gen, cfg):
    batch, mask, logp, logp_old, logp_ref, adv, entropy = random_inputs(gen, 4, 13, torch.float32)
    a = call(batch, "padded", logp, logp_old, adv, mask, logp_ref, entropy, **cfg)
    b = call(batch, "packed", logp, logp_old, adv, mask, logp_ref, entropy, **cfg)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)


def _fd_grad(fn, x_rows, h=1e-6):
    """Central finite differences of a float64 scalar function of per-rollout lists, at masked-in tokens."""
    grads = []
    for b, r in enumerate(x_rows):
        g = []
        for t in range(len(r)):
            up = [list(rr) for rr in x_rows]
            dn = [list(rr) for rr in x_rows]
            up[b][t] += h
            dn[b][t] -= h
            g.append((fn(up) - fn(dn)) / (2 * h))
        grads.append(g)
    return grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("cfg", CONFIGS[:7], ids=cfg_id)
def test_grad_vs_oracle_finite_differences(gen, dtype, layout, cfg):
    B, T = 3, 9
    batch, mask, logp, logp_old, logp_ref, adv, entropy = random_inputs(gen, B, T, dtype)
    lp = logp.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()
    lp_a, lpo, a, m, ref, ent_a, cu = batch.args(layout, lp, logp_old, adv, mask, logp_ref, ent)
    res = ak.policy_loss(lp_a, lpo, a, m, cu_seqlens=cu, logp_ref=ref, entropy=ent_a, **cfg)
    res.loss.backward()
    kw = dict(cfg)
    R = {"logp_old": rows(logp_old), "adv": rows(adv), "mask": rows(mask), "logp_ref": rows(logp_ref), "entropy": rows(entropy)}

    def f_logp(lp_rows):
        return oracle.policy_loss(lp_rows, R["logp_old"], R["adv"], R["mask"], logp_ref=R["logp_ref"],
                                  entropy=R["entropy"], **kw)["loss"]

    def f_ent(ent_rows):
        return oracle.policy_loss(rows(logp), R["logp_old"], R["adv"], R["mask"], logp_ref=R["logp_ref"],
                                  entropy=ent_rows, **kw)["loss"]

    atol = 1e-7 if dtype == torch.float64 else 2e-5
    g_lp = torch.tensor(_fd_grad(f_logp, rows(logp)), dtype=torch.float64)
    torch.testing.assert_close(lp.grad.double(), g_lp, atol=atol, rtol=1e-4)
    if cfg.get("entropy_coef", 0.0):
        g_h = torch.tensor(_fd_grad(f_ent, rows(entropy)), dtype=torch.float64)
        torch.testing.assert_close(ent.grad.double(), g_h, atol=atol, rtol=1e-4)
    # masked-out tokens get no gradient
    assert (lp.grad[~mask.bool()] == 0).all()


@pytest.mark.parametrize("cfg", CONFIGS[:7], ids=cfg_id)
def test_gradcheck(gen, cfg):
    _batch, mask, logp, logp_old, logp_ref, adv, entropy = random_inputs(gen, 3, 7, torch.float64)
    lp = logp.clone().requires_grad_()
    ent = entropy.clone().requires_grad_()

    def fn(x, h):
        return ak.policy_loss(x, logp_old, adv, mask, logp_ref=logp_ref, entropy=h, **cfg).loss

    assert torch.autograd.gradcheck(fn, (lp, ent), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_masked_values_do_not_matter(gen):
    _batch, mask, logp, logp_old, logp_ref, adv, _entropy = random_inputs(gen, 4, 10, torch.float32)
    m = mask.bool()
    noise = torch.randn(logp.shape, generator=gen)
    a = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, kl_coef=0.1)
    b = ak.policy_loss(torch.where(m, logp, logp + noise), logp_old, torch.where(m, adv, adv - noise), mask,
                       logp_ref=torch.where(m, logp_ref, noise), kl_coef=0.1)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def test_token_count_rescales_token_mean(gen):
    # token-mean with token_count = n divides the same sum by n instead of the number of masked tokens
    _batch, mask, logp, logp_old, logp_ref, adv, _entropy = random_inputs(gen, 4, 10, torch.float64)
    n_tok = int(mask.sum())
    a = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref)
    b = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, token_count=3 * n_tok)
    assert b.loss.item() == pytest.approx(a.loss.item() / 3, rel=1e-12)


def test_loss_without_mask_is_all_ones(gen):
    _batch, _mask, logp, logp_old, _logp_ref, adv, _entropy = random_inputs(gen, 3, 6, torch.float64)
    a = ak.policy_loss(logp, logp_old, adv)
    b = ak.policy_loss(logp, logp_old, adv, torch.ones_like(logp))
    torch.testing.assert_close(a.loss, b.loss)
    ref = oracle.policy_loss(rows(logp), rows(logp_old), rows(adv), [[1] * 6] * 3)
    assert a.loss.item() == pytest.approx(ref["loss"], abs=1e-10)


def test_metrics_are_detached(gen):
    _batch, mask, logp, logp_old, logp_ref, adv, _entropy = random_inputs(gen, 3, 6, torch.float32)
    lp = logp.clone().requires_grad_()
    res = ak.policy_loss(lp, logp_old, adv, mask, logp_ref=logp_ref)
    assert res.loss.requires_grad
    for name in ("pg_loss", "kl", "clip_fraction", "dual_clip_fraction"):
        assert not getattr(res, name).requires_grad, name


def test_non_contiguous(gen):
    _batch, mask, logp, logp_old, logp_ref, adv, entropy = random_inputs(gen, 4, 11, torch.float32)
    nc = lambda x: x.t().contiguous().t()
    kw = {"kl_coef": 0.1, "entropy_coef": 0.01, "aggregation": "seq-mean-token-mean"}
    a = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, entropy=entropy, **kw)
    b = ak.policy_loss(nc(logp), nc(logp_old), nc(adv), nc(mask), logp_ref=nc(logp_ref), entropy=nc(entropy), **kw)
    assert not nc(logp).is_contiguous()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


def _drop_case(dtype=torch.float64):
    """Rollout 0: two tokens with A < 0 and ratio e^1.5 > 3 (dropped); rollout 1: one such token (kept)."""
    logp = torch.full((2, 4), -1.0, dtype=dtype)
    logp_old = logp.clone()
    adv = torch.tensor([[-1.0, -0.5, 0.3, 0.2], [-1.0, 0.4, -0.2, 0.1]], dtype=dtype)
    logp_old[0, :2] -= 1.5
    logp_old[1, 0] -= 1.5
    logp_ref = logp + torch.tensor([[0.3, -0.2, 0.1, 0.0], [0.2, 0.1, -0.3, 0.4]], dtype=dtype)
    return logp, logp_old, adv, logp_ref


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_dual_clipped_rollouts_leave_the_surrogate(aggregation):
    logp, logp_old, adv, ref = _drop_case()
    mask = torch.ones(2, 4, dtype=torch.bool)
    lp = logp.clone().requires_grad_(True)
    out = ak.policy_loss(lp, logp_old, adv, mask, logp_ref=ref, kl_coef=0.1, aggregation=aggregation)
    want = oracle.policy_loss(rows(logp), rows(logp_old), rows(adv), rows(mask), rows(ref), kl_coef=0.1,
                              aggregation=aggregation)
    torch.testing.assert_close(out.loss.item(), want["loss"], atol=1e-12, rtol=1e-12)
    kept = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=ref, kl_coef=0.1, aggregation=aggregation,
                          drop_dual_clipped=False)
    assert out.loss.item() != kept.loss.item()
    out.loss.backward()
    # rollout 0 trains only through its KL term: the gradient there is that of the KL alone
    lp_kl = logp.clone().requires_grad_(True)
    d = ref - lp_kl
    kl = (torch.exp(d) - d - 1)[0]
    (0.1 * kl.sum() / {"token-mean": 8, "seq-mean-token-mean": 8, "seq-mean-token-sum": 2}[aggregation]).backward()
    torch.testing.assert_close(lp.grad[0], lp_kl.grad[0])


def test_one_dual_clipped_token_keeps_its_rollout():
    logp, logp_old, adv, ref = _drop_case()
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 1] = False                           # rollout 0 keeps a single offending token
    a = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=ref)
    b = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=ref, drop_dual_clipped=False)
    assert torch.equal(a.loss, b.loss)


def test_nothing_dropped_is_bit_identical(gen):
    batch, mask, logp, logp_old, logp_ref, adv, ent = random_inputs(gen, 5, 9, torch.float32)
    logp_old = logp.clone()                      # ratio 1: nothing is dual-clipped
    for aggregation in ("token-mean", "seq-mean-token-mean"):
        a = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, aggregation=aggregation)
        b = ak.policy_loss(logp, logp_old, adv, mask, logp_ref=logp_ref, aggregation=aggregation,
                           drop_dual_clipped=False)
        assert torch.equal(a.loss, b.loss)


def test_kl_clamp_stops_the_gradient_beyond_it():
    logp = torch.tensor([[-5.0, -1.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.0, -1.2]], dtype=torch.float64)      # d = 4: k3 = e^4 - 5 = 49.6 > 10
    zero = torch.zeros(1, 2, dtype=torch.float64)
    out = ak.policy_loss(logp, logp.detach(), zero, logp_ref=ref, kl_coef=1.0)
    d = 4.0
    assert out.kl.item() == pytest.approx((10.0 + (math.exp(-0.2) + 0.2 - 1)) / 2)
    out.loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0
    free = ak.policy_loss(logp.detach(), logp.detach(), zero, logp_ref=ref, kl_coef=1.0, kl_clamp=None)
    assert free.kl.item() == pytest.approx((math.exp(d) - d - 1 + (math.exp(-0.2) + 0.2 - 1)) / 2)
