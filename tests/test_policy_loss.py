"""policy_loss (method §7, docs/api.md `policy_loss`): clip-higher, dual clip, KL estimators, aggregations,
metrics and gradients, against the oracle."""

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
