"""future_values (method §2, docs/api.md `future_values`): omega and gain vs the oracle, padded and packed."""

import math

import oracle
import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    LAYOUTS,
    SeqBatch,
    assert_close,
    make_lengths,
    make_mask,
    mask_as,
    out_dtype,
    rows,
    seq_logps,
    tol,
)

import appo_kernels as ak


def run(batch, layout, logp, logp_old, mask, backend, **kw):
    lp, lpo, m, cu = batch.args(layout, logp, logp_old, mask)
    res = ak.future_values(lp, lpo, m, cu_seqlens=cu, backend=backend, **kw)
    return batch.to_padded(res.omega, layout), batch.to_padded(res.gain, layout), res


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("gamma,clip_eps", [(1.0, 0.2), (0.9, 0.5), (0.5, 0.0)])
def test_matches_oracle(backend, gen, dtype, layout, gamma, clip_eps):
    B, T = 6, 17
    lengths = make_lengths(gen, B, T, allow_empty=True)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, dtype, delta_scale=0.1)
    omega, gain, res = run(batch, layout, logp, logp_old, mask, backend, gamma=gamma, clip_eps=clip_eps)
    assert res.omega.dtype == out_dtype(dtype) and res.gain.dtype == out_dtype(dtype)
    exp_o, exp_g = oracle.future_values(rows(logp), rows(logp_old), rows(mask), gamma, clip_eps)
    atol, rtol = tol(dtype)
    # padding holds garbage in the inputs and must come out as 0 (masked-out), like tool spans
    assert_close(omega, exp_o, atol, rtol, "omega")
    assert_close(gain, exp_g, atol, rtol, "gain")


def test_padded_equals_packed(backend, gen):
    B, T = 5, 23
    lengths = make_lengths(gen, B, T, allow_empty=True)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, torch.float32)
    o_pad, g_pad, _ = run(batch, "padded", logp, logp_old, mask, backend, gamma=0.97)
    o_pk, g_pk, _ = run(batch, "packed", logp, logp_old, mask, backend, gamma=0.97)
    torch.testing.assert_close(o_pk, o_pad * batch.real())
    torch.testing.assert_close(g_pk, g_pad * batch.real(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "int64", "int32", "uint8", "float32"])
def test_mask_encodings(backend, gen, kind):
    B, T = 4, 11
    lengths = make_lengths(gen, B, T)
    mask = make_mask(gen, lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, torch.float64)
    res = ak.future_values(logp, logp_old, mask_as(mask, kind), backend=backend)
    exp_o, exp_g = oracle.future_values(rows(logp), rows(logp_old), rows(mask))
    assert_close(res.omega, exp_o, 1e-10, 1e-10)
    assert_close(res.gain, exp_g, 1e-10, 1e-10)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mask_none_means_all_ones(backend, gen, layout):
    B, T = 3, 9
    lengths = [T] * B
    batch = SeqBatch(lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, torch.float64)
    lp, lpo, cu = batch.args(layout, logp, logp_old)
    res = ak.future_values(lp, lpo, None, cu_seqlens=cu, gamma=0.8, backend=backend)
    exp_o, exp_g = oracle.future_values(rows(logp), rows(logp_old), [[1] * T] * B, 0.8)
    assert_close(batch.to_padded(res.omega, layout), exp_o, 1e-10, 1e-10)
    assert_close(batch.to_padded(res.gain, layout), exp_g, 1e-10, 1e-10)


def test_hand_worked(backend):
    # deltas d = logp - logp_old = [0.01, 0.02, 5 (tool output, mask 0), 0.03], gamma = 0.5:
    #   F[3] = 0.03
    #   F[2] is masked out -> 0 in both outputs (5 never counts)
    #   F[1] = 0.02 + 0.5 * 0 + 0.25 * 0.03 = 0.0275
    #   F[0] = 0.01 + 0.5 * 0.02 + 0.25 * 0 + 0.125 * 0.03 = 0.02375
    # omega = exp(F) (inside [0.8, 1.2]); a second rollout [0.5, 0.5] with gamma 0.5 has F = [0.75, 0.5]
    # whose exp is above 1.2 -> omega = 1.2 for both.
    logp = torch.tensor([[0.01, 0.02, 5.0, 0.03], [0.5, 0.5, 0.0, 0.0]], dtype=torch.float64)
    logp_old = torch.zeros(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    res = ak.future_values(logp, logp_old, mask, gamma=0.5, backend=backend)
    exp_gain = [[0.02375, 0.0275, 0.0, 0.03], [0.75, 0.5, 0.0, 0.0]]
    exp_omega = [[math.exp(0.02375), math.exp(0.0275), 0.0, math.exp(0.03)], [1.2, 1.2, 0.0, 0.0]]
    assert_close(res.gain, exp_gain, 1e-12, 1e-12)
    assert_close(res.omega, exp_omega, 1e-12, 1e-12)
    # the oracle agrees with the hand computation
    o, g = oracle.future_values(logp.tolist(), logp_old.tolist(), mask.tolist(), 0.5)
    assert_close(torch.tensor(g, dtype=torch.float64), exp_gain, 1e-12, 1e-12)
    assert_close(torch.tensor(o, dtype=torch.float64), exp_omega, 1e-12, 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_huge_gains_saturate_without_nan(backend, gen, layout):
    # |F| far beyond 20: omega saturates at 1 +- clip_eps (exp is taken of clip(F, -20, 20)); gain is F itself
    B, T = 3, 8
    lengths = [T, 5, 7]
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T, tool_spans=False)
    sign = torch.tensor([1.0, -1.0, 1.0]).unsqueeze(1)
    logp = sign * 400.0 * torch.ones(B, T)
    logp_old = torch.zeros(B, T)
    lp, lpo, m, cu = batch.args(layout, logp, logp_old, mask)
    res = ak.future_values(lp, lpo, m, cu_seqlens=cu, clip_eps=0.3, backend=backend)
    omega = batch.to_padded(res.omega, layout)
    gain = batch.to_padded(res.gain, layout)
    assert torch.isfinite(omega).all() and torch.isfinite(gain).all()
    exp_o, exp_g = oracle.future_values(rows(logp), rows(logp_old), rows(mask), 1.0, 0.3)
    assert_close(omega, exp_o, 1e-6, 1e-6)
    assert_close(gain, exp_g, 1e-3, 1e-6)


def test_non_contiguous(backend, gen):
    B, T = 4, 10
    lengths = make_lengths(gen, B, T)
    mask = make_mask(gen, lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, torch.float32)
    lp_nc = logp.t().contiguous().t()
    lpo_nc = torch.stack([logp_old, logp_old], dim=-1)[..., 0]
    m_nc = mask.t().contiguous().t()
    assert not lp_nc.is_contiguous() and not lpo_nc.is_contiguous()
    a = ak.future_values(lp_nc, lpo_nc, m_nc, gamma=0.9, backend=backend)
    b = ak.future_values(logp, logp_old, mask, gamma=0.9, backend=backend)
    torch.testing.assert_close(a.omega, b.omega)
    torch.testing.assert_close(a.gain, b.gain)


def test_cu_seqlens_int32(backend, gen):
    B, T = 4, 9
    lengths = make_lengths(gen, B, T, allow_empty=True)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logp, logp_old = seq_logps(gen, lengths, T, torch.float64)
    lp, lpo, m, cu = batch.args("packed", logp, logp_old, mask)
    a = ak.future_values(lp, lpo, m, cu_seqlens=cu.to(torch.int32), backend=backend)
    b = ak.future_values(lp, lpo, m, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(a.omega, b.omega)
    torch.testing.assert_close(a.gain, b.gain)


def test_single_rollout_row(backend, gen):
    # [1, T] is the way to pass a single rollout without cu_seqlens
    T = 12
    logp, logp_old = seq_logps(gen, [T], T, torch.float64)
    res = ak.future_values(logp, logp_old, None, gamma=0.9, backend=backend)
    exp_o, exp_g = oracle.future_values(rows(logp), rows(logp_old), [[1] * T], 0.9)
    assert res.omega.shape == (1, T)
    assert_close(res.omega, exp_o, 1e-10, 1e-10)
    assert_close(res.gain, exp_g, 1e-10, 1e-10)
