"""future_kl_weights (method §6, docs/api.md `future_kl_weights`) vs the oracle, padded and packed."""

import math

import oracle
import pytest
import torch
from helpers import FLOAT_DTYPES, LAYOUTS, SeqBatch, assert_close, make_lengths, make_mask, out_dtype, rows, tol

import appo_kernels as ak


def random_inputs(gen, B, T, dtype):
    lengths = make_lengths(gen, B, T, allow_empty=True)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    # deltas mostly small, some large positive (ratio > 3: dropped by `keep`; > 6: the dual rule) and
    # some large negative
    delta = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.15
    big = torch.rand(B, T, generator=gen)
    delta = torch.where(big < 0.08, delta + 2.5, delta)
    delta = torch.where(big > 0.95, delta - 2.0, delta)
    # avoid deltas within rounding of the thresholds log(3) and log(6)
    for thr in (math.log(3.0), math.log(6.0)):
        near = (delta - thr).abs() < 0.02
        delta = torch.where(near, delta + 0.05, delta)
    logp_old = logp - delta
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.where(adv.abs() < 1e-3, adv + 0.01, adv)
    return batch, mask, logp.to(dtype), logp_old.to(dtype), adv.to(dtype)


PARAMS = [
    {},
    {"gamma": 0.9, "clip_eps": 0.3, "high_only": False, "coef": 0.5},
    {"gamma": 1.0, "clip_ratio_c": 2.0, "ratio_threshold": 4.0},
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("params", PARAMS, ids=["default", "low_bound", "thresholds"])
def test_matches_oracle(backend, gen, dtype, layout, params):
    B, T = 6, 20
    batch, mask, logp, logp_old, adv = random_inputs(gen, B, T, dtype)
    lp, lpo, a, m, cu = batch.args(layout, logp, logp_old, adv, mask)
    res = ak.future_kl_weights(lp, lpo, a, m, cu_seqlens=cu, backend=backend, **params)
    ref_w, ref_a = oracle.future_kl_weights(rows(logp), rows(logp_old), rows(adv), rows(mask), **params)
    assert res.weights.dtype == out_dtype(dtype) and res.advantages.dtype == out_dtype(dtype)
    atol, rtol = tol(dtype)
    assert_close(batch.to_padded(res.weights, layout), ref_w, atol, rtol, "weights")
    assert_close(batch.to_padded(res.advantages, layout), ref_a, atol, rtol, "advantages")


def test_padded_equals_packed(backend, gen):
    batch, mask, logp, logp_old, adv = random_inputs(gen, 5, 17, torch.float32)
    outs = {}
    for layout in LAYOUTS:
        lp, lpo, a, m, cu = batch.args(layout, logp, logp_old, adv, mask)
        r = ak.future_kl_weights(lp, lpo, a, m, cu_seqlens=cu, backend=backend)
        outs[layout] = (batch.to_padded(r.weights, layout), batch.to_padded(r.advantages, layout))
    torch.testing.assert_close(outs["packed"][0], outs["padded"][0])
    torch.testing.assert_close(outs["packed"][1], outs["padded"][1])


def test_hand_worked(backend):
    # gamma = 0.5, defaults otherwise (c = 3, eps = 0.2, high-only, coef 1, threshold 6).
    # deltas d = [0.1, 2.0, 0.05, -0.3], mask all 1, advantages [1, -1, -2, 1]:
    #   keep: d <= log 3 = 1.0986 -> [T, F, T, T] (t = 1 is dropped from every sum)
    #   FKL[3] = -0.3;  FKL[2] = 0.05 - 0.15 = -0.1;  FKL[1] = 0 + 0.5 * -0.1 = -0.05
    #   FKL[0] = 0.1 + 0.25 * 0.05 + 0.125 * -0.3 = 0.075
    #   f = clip(exp(FKL), 1, 1.2) = [exp(0.075) = 1.077884, 1, 1, 1]
    #   t = 1: A < 0 but ratio exp(2) = 7.39 > 6 -> f = clip(1, 0.8, 1) = 1 (no change here)
    #   A_out = A * (1 + f) = [2.077884, -2, -4, 2]
    logp = torch.tensor([[0.1, 2.0, 0.05, -0.3]], dtype=torch.float64)
    res = ak.future_kl_weights(logp, torch.zeros_like(logp), torch.tensor([[1.0, -1.0, -2.0, 1.0]], dtype=torch.float64),
                               None, gamma=0.5, backend=backend)
    f0 = math.exp(0.075)
    assert_close(res.weights, [[f0, 1.0, 1.0, 1.0]], 1e-12, 1e-12)
    assert_close(res.advantages, [[1 + f0, -2.0, -4.0, 2.0]], 1e-12, 1e-12)
    # high_only=False: lower bound 1 - 0.2; exp(-0.05) = 0.951229, exp(-0.1) = 0.904837, exp(-0.3) = 0.740818 -> 0.8
    #   t = 1: A < 0 and ratio > 6 -> clip(0.951229, 0.8, 1.0) = 0.951229
    res = ak.future_kl_weights(logp, torch.zeros_like(logp), torch.tensor([[1.0, -1.0, -2.0, 1.0]], dtype=torch.float64),
                               None, gamma=0.5, high_only=False, backend=backend)
    assert_close(res.weights, [[f0, math.exp(-0.05), math.exp(-0.1), 0.8]], 1e-12, 1e-12)


def test_dual_rule_caps_weight_for_negative_advantage(backend):
    # gamma = 1, deltas d = [1.9, 0.15]: token 0 is not kept (1.9 > log 3), so FKL = [0.15, 0.15] and
    # f = clip(exp(0.15), 1, 1.2) = 1.161834 at both tokens.
    #   advantages [-1, 1]: token 0 has A < 0 and ratio exp(1.9) = 6.69 > 6 -> f = clip(1.1618, 0.8, 1) = 1,
    #   A_out = -1 * (1 + 1) = -2; token 1: A_out = 1 + exp(0.15)
    #   advantages [1, 1]: the rule does not apply, f = exp(0.15) at both tokens
    logp = torch.tensor([[1.9, 0.15]], dtype=torch.float64)
    res = ak.future_kl_weights(logp, torch.zeros_like(logp), torch.tensor([[-1.0, 1.0]], dtype=torch.float64), None,
                               gamma=1.0, backend=backend)
    assert_close(res.weights, [[1.0, math.exp(0.15)]], 1e-12, 1e-12)
    assert_close(res.advantages, [[-2.0, 1 + math.exp(0.15)]], 1e-12, 1e-12)
    res = ak.future_kl_weights(logp, torch.zeros_like(logp), torch.tensor([[1.0, 1.0]], dtype=torch.float64), None,
                               gamma=1.0, backend=backend)
    assert_close(res.weights, [[math.exp(0.15), math.exp(0.15)]], 1e-12, 1e-12)


def test_inputs_are_detached(backend, gen):
    _batch, mask, logp, logp_old, adv = random_inputs(gen, 3, 8, torch.float32)
    logp.requires_grad_()
    adv.requires_grad_()
    res = ak.future_kl_weights(logp, logp_old, adv, mask, backend=backend)
    assert not res.weights.requires_grad and not res.advantages.requires_grad


def test_non_contiguous(backend, gen):
    _batch, mask, logp, logp_old, adv = random_inputs(gen, 4, 11, torch.float32)
    nc = lambda x: x.t().contiguous().t()
    a = ak.future_kl_weights(logp, logp_old, adv, mask, backend=backend)
    b = ak.future_kl_weights(nc(logp), nc(logp_old), nc(adv), nc(mask), backend=backend)
    assert not nc(logp).is_contiguous()
    torch.testing.assert_close(a.weights, b.weights)
    torch.testing.assert_close(a.advantages, b.advantages)
