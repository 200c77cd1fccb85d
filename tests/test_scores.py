"""score_tokens and branching_score (method §3, docs/api.md): z-scores, scores, candidates vs the oracle."""

import math

import oracle
import pytest
import torch
from helpers import (
    FLOAT_DTYPES,
    LAYOUTS,
    SeqBatch,
    assert_close,
    f64,
    make_lengths,
    make_mask,
    out_dtype,
    pack,
    rows,
    seq_logps,
    tol,
)

import appo_kernels as ak

INF = float("inf")


def random_scoring_inputs(gen, B, T, dtype, *, eligible=True):
    lengths = make_lengths(gen, B, T, allow_empty=True)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    entropy = (torch.rand(B, T, generator=gen, dtype=torch.float64) * 3).to(dtype)
    logp, logp_old = seq_logps(gen, lengths, T, dtype, delta_scale=0.02)
    elig = (torch.rand(B, T, generator=gen) < 0.8) if eligible else None
    return batch, mask, entropy, logp, logp_old, elig


def check_scores(score, candidate, ref, dtype, margin=None, score_tol=1e-4):
    """score exact on -inf pattern and close elsewhere; candidate equal wherever the oracle's z-scores are
    clear of 0 by `margin` (a z-score within rounding of 0 may go either way)."""
    atol, rtol = tol(dtype)
    atol, rtol = max(atol, 1e-10), max(rtol, 1e-10)
    if dtype != torch.float64:
        atol, rtol = max(atol, score_tol), max(rtol, score_tol)
    assert_close(score, ref["score"], atol, rtol, "score")
    if margin is None:
        margin = 1e-8 if dtype == torch.float64 else 1e-3
    got = candidate.tolist()
    checked = eligible = 0
    for b, row in enumerate(ref["candidate"]):
        for t, exp in enumerate(row):
            zh = ref["z_entropy"][b][t]
            zo = None if ref["z_omega"][b] is None else ref["z_omega"][b][t]
            if zh is None:
                assert got[b][t] is False, (b, t)
                continue
            eligible += 1
            if abs(zh) < margin or (zo is not None and abs(zo) < margin):
                continue
            assert got[b][t] == exp, (b, t, zh, zo)
            checked += 1
    assert checked >= 0.5 * eligible, (checked, eligible)  # most eligible positions were actually compared
    return checked


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_omega", [True, False], ids=["omega", "entropy_only"])
@pytest.mark.parametrize("with_eligible", [True, False], ids=["eligible", "no_eligible"])
def test_score_tokens_matches_oracle(backend, gen, dtype, layout, with_omega, with_eligible):
    B, T = 6, 19
    batch, mask, entropy, logp, logp_old, elig = random_scoring_inputs(gen, B, T, dtype, eligible=with_eligible)
    gamma, eps = (0.95, 0.2) if layout == "padded" else (1.0, 0.15)
    lpo_in = logp_old if with_omega else None
    ent_a, lp_a, lpo_a, m_a, el_a, cu = batch.args(layout, entropy, logp, lpo_in, mask, elig)
    res = ak.score_tokens(ent_a, lp_a, lpo_a, m_a, cu_seqlens=cu, eligible=el_a, gamma=gamma, clip_eps=eps,
                          backend=backend)
    ref = oracle.score_tokens(rows(entropy), rows(logp), rows(logp_old) if with_omega else None, rows(mask),
                              rows(elig) if with_eligible else None, gamma, eps)
    score = batch.to_padded(res.score, layout, fill=-INF)
    cand = batch.to_padded(res.candidate, layout, fill=False)
    assert res.score.dtype == out_dtype(dtype)
    assert res.candidate.dtype == torch.bool
    assert check_scores(score, cand, ref, dtype) >= 5
    atol, rtol = tol(dtype)
    assert res.entropy.dtype == out_dtype(dtype)
    assert_close(batch.to_padded(res.entropy, layout), ref["entropy"], atol, rtol, "entropy")
    assert_close(batch.to_padded(res.logp, layout), ref["logp"], atol, rtol, "logp")
    if with_omega:
        assert_close(batch.to_padded(res.omega, layout), ref["omega"], atol, rtol, "omega")
    else:
        assert res.omega is None


def test_score_tokens_padded_equals_packed(backend, gen):
    B, T = 5, 21
    batch, mask, entropy, logp, logp_old, elig = random_scoring_inputs(gen, B, T, torch.float32)
    outs = {}
    for layout in ("padded", "packed"):
        e, lp, lpo, m, el, cu = batch.args(layout, entropy, logp, logp_old, mask, elig)
        r = ak.score_tokens(e, lp, lpo, m, cu_seqlens=cu, eligible=el, backend=backend)
        outs[layout] = (batch.to_padded(r.score, layout, -INF), batch.to_padded(r.candidate, layout, False),
                        batch.to_padded(r.omega, layout))
    torch.testing.assert_close(outs["packed"][0], outs["padded"][0], atol=1e-6, rtol=1e-6)
    assert torch.equal(outs["packed"][1], outs["padded"][1])
    torch.testing.assert_close(outs["packed"][2], outs["padded"][2])


def test_hand_worked_candidates(backend):
    # One rollout of 4 tokens, gamma = 1, logp_old = 0 and logp = d chosen so that F[t] = log(omega[t]) with
    # omega = [1.05, 0.9, 1.1, 0.95]:  d[3] = ln .95, d[2] = ln 1.1 - ln .95, d[1] = ln .9 - ln 1.1,
    # d[0] = ln 1.05 - ln .9.
    #   omega: mean 1.0, deviations [.05, -.1, .1, -.05], population std sqrt(.025 / 4) = 0.0790569
    #          Z(omega) = [0.632456, -1.264911, 1.264911, -0.632456]
    #   entropy [1, 2, 3, 4]: mean 2.5, std sqrt(1.25) = 1.118034
    #          Z(H) = [-1.341641, -0.447214, 0.447214, 1.341641]
    #   score = Z(H) * Z(omega) = [-0.848528, 0.565685, 0.565685, -0.848528]
    #   (the + 1e-6 on the std of omega, 0.079, moves these in the 5th digit: tolerance 1e-4)
    #   candidate: only t = 2 (both positive); t = 1 has a positive score from two negatives and must NOT
    #   be a candidate.
    omega = [1.05, 0.9, 1.1, 0.95]
    F = [math.log(o) for o in omega]
    d = [F[0] - F[1], F[1] - F[2], F[2] - F[3], F[3]]
    logp = torch.tensor([d], dtype=torch.float64)
    res = ak.score_tokens(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64), logp,
                          torch.zeros(1, 4, dtype=torch.float64), None, backend=backend)
    assert_close(res.omega, [omega], 1e-12, 1e-12)
    assert res.score.flatten().tolist() == pytest.approx([-0.848528, 0.565685, 0.565685, -0.848528], abs=1e-4)
    assert res.candidate.flatten().tolist() == [False, False, True, False]
    # entropy-only ablation: score = Z(H), candidates are the above-mean entropies
    res2 = ak.score_tokens(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64), backend=backend)
    assert res2.score.flatten().tolist() == pytest.approx([-1.341641, -0.447214, 0.447214, 1.341641], abs=1e-5)
    assert res2.candidate.flatten().tolist() == [False, False, True, True]
    assert res2.omega is None


def test_degenerate_omega_behavior_policy(backend, gen):
    # logp_old == logp (the 'behavior' choice in an exact synchronous loop): omega = 1 everywhere, so
    # Z(omega) = 0, every eligible score is 0 and nothing is a candidate
    B, T = 3, 10
    lengths = [10, 7, 4]
    mask = make_mask(gen, lengths, T)
    entropy = torch.rand(B, T, generator=gen)
    logp = -torch.rand(B, T, generator=gen)
    res = ak.score_tokens(entropy, logp, logp.clone(), mask, backend=backend)
    assert torch.equal(res.score[mask], torch.zeros(int(mask.sum())))
    assert not res.candidate.any()
    assert torch.equal(res.score[~mask], torch.full((int((~mask).sum()),), -INF))


def test_single_and_no_eligible_positions(backend):
    # rollout 0: one eligible position -> its z-scores are 0 / (0 + 1e-6) = 0: score 0, not a candidate;
    # rollout 1: no eligible position -> all -inf, no candidates
    entropy = torch.tensor([[2.0, 5.0, 1.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[0, 1, 0], [0, 0, 0]], dtype=torch.bool)
    res = ak.score_tokens(entropy, None, None, mask, backend=backend)
    assert res.score.tolist() == [[-INF, 0.0, -INF], [-INF, -INF, -INF]]
    assert res.candidate.tolist() == [[False, False, False], [False, False, False]]
    assert res.entropy.tolist() == [[0.0, 5.0, 0.0], [0.0, 0.0, 0.0]]


def test_eligible_excludes_from_statistics(backend):
    # the z-score uses only eligible positions: with position 3 (entropy 100) ineligible, the statistics of
    # [1, 2, 3] give Z = [-1.224744, 0, 1.224744] (std sqrt(2/3)); position 3 scores -inf
    entropy = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=torch.float64)
    elig = torch.tensor([[True, True, True, False]])
    res = ak.score_tokens(entropy, eligible=elig, backend=backend)
    assert res.score[0, :3].tolist() == pytest.approx([-1.224744, 0.0, 1.224744], abs=1e-5)
    assert res.score[0, 3].item() == -INF
    assert res.candidate.tolist() == [[False, False, True, False]]
    assert res.entropy.tolist() == [[1.0, 2.0, 3.0, 100.0]]  # returned as given where mask == 1


# ----------------------------------------------------------------------------------------------------------
# branching_score = token_stats (masked-out tokens ignored) + score_tokens
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_omega,mode,k", [(True, "exact", 0), (True, "topk", 3), (False, "exact", 2)])
def test_branching_score_matches_oracle(backend, gen, dtype, layout, with_omega, mode, k):
    B, T, V = 4, 9, 37
    lengths = make_lengths(gen, B, T)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logits = (torch.randn(B, T, V, generator=gen, dtype=torch.float64) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    # any value is accepted where mask == 0 (treated as ignored): out of range on purpose
    tokens = torch.where(mask, tokens, torch.full_like(tokens, V + 7))
    tokens[0, -1] = -3 if not mask[0, -1] else tokens[0, -1]
    elig = torch.rand(B, T, generator=gen) < 0.9
    tau = 0.8
    # oracle token statistics with masked-out tokens ignored
    flat_tokens = [int(t) if bool(mv) else -100 for t, mv in zip(tokens.flatten().tolist(), mask.flatten().tolist())]
    stats = oracle.token_stats(f64(logits.reshape(-1, V)), flat_tokens, tau, k, -100, mode)
    ent_rows = [stats["entropy"][b * T:(b + 1) * T] for b in range(B)]
    lp_rows = [stats["logp"][b * T:(b + 1) * T] for b in range(B)]
    # logp_old close to the current log-probs, so that omega is informative (not saturated)
    logp_old = (torch.tensor(lp_rows, dtype=torch.float64)
                + torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
    if layout == "padded":
        lg, tk, lpo, m, el, cu = logits, tokens, logp_old, mask, elig, None
    else:
        lg, tk, lpo, m, el, cu = batch.args(layout, logits, tokens, logp_old, mask, elig)
    res = ak.branching_score(lg, tk, lpo if with_omega else None, m, cu_seqlens=cu, eligible=el, temperature=tau,
                             topk=k, entropy=mode, backend=backend)
    ref = oracle.score_tokens(ent_rows, lp_rows, rows(logp_old) if with_omega else None, rows(mask), rows(elig))

    # the score divides by the std of omega over a rollout, which can be small for a short rollout, so the
    # fp32 rounding of logp (computed here from the logits, ~1e-6) is amplified: looser score tolerance
    check_scores(batch.to_padded(res.score, layout, -INF), batch.to_padded(res.candidate, layout, False), ref,
                 dtype, score_tol=2e-3)
    atol, rtol = tol(dtype, "entropy")
    assert_close(batch.to_padded(res.entropy, layout), ref["entropy"], atol, rtol, "entropy")
    assert_close(batch.to_padded(res.logp, layout), ref["logp"], atol, rtol, "logp")
    if with_omega:
        assert_close(batch.to_padded(res.omega, layout), ref["omega"], atol, rtol, "omega")
    else:
        assert res.omega is None
    lead = (B, T) if layout == "padded" else (sum(lengths),)
    assert res.topk_ids.shape == lead + (k,) and res.topk_logp.shape == lead + (k,)
    if k:
        exp_ids = torch.tensor(stats["topk_ids"]).reshape(B, T, k)
        exp_lp = torch.tensor(stats["topk_logp"], dtype=torch.float64).reshape(B, T, k)
        if layout == "packed":
            exp_ids, exp_lp = pack(exp_ids, lengths), pack(exp_lp, lengths)
        assert torch.equal(res.topk_ids, exp_ids)
        assert_close(res.topk_logp, exp_lp, atol, rtol, "topk_logp")
        # masked-out positions are ignored rows: ids 0 and log-probs 0
        m_lead = mask if layout == "padded" else pack(mask, lengths)
        assert (res.topk_ids[~m_lead] == 0).all() and (res.topk_logp[~m_lead] == 0).all()


def test_branching_score_equals_token_stats_then_score_tokens(backend, gen):
    B, T, V = 3, 8, 29
    lengths = [8, 5, 6]
    mask = make_mask(gen, lengths, T)
    logits = torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    _, logp_old = seq_logps(gen, lengths, T, torch.float32, delta_scale=0.05)
    res = ak.branching_score(logits, tokens, logp_old, mask, topk=2, backend=backend)
    st = ak.token_stats(logits, torch.where(mask, tokens, torch.full_like(tokens, -100)), topk=2, backend=backend)
    sc = ak.score_tokens(st.entropy, st.logp, logp_old, mask, backend=backend)
    torch.testing.assert_close(res.score, sc.score)
    assert torch.equal(res.candidate, sc.candidate)
    torch.testing.assert_close(res.omega, sc.omega)
    torch.testing.assert_close(res.topk_logp, st.topk_logp)
    assert torch.equal(res.topk_ids, st.topk_ids)


def test_branching_score_has_no_grad(backend, gen):
    logits = torch.randn(2, 5, 11, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 11, (2, 5), generator=gen)
    res = ak.branching_score(logits, tokens, backend=backend)
    assert not res.score.requires_grad and not res.entropy.requires_grad and not res.logp.requires_grad


def test_score_tokens_non_contiguous(backend, gen):
    _batch, mask, entropy, logp, logp_old, elig = random_scoring_inputs(gen, 4, 12, torch.float32)
    nc = lambda x: x.t().contiguous().t()
    a = ak.score_tokens(entropy, logp, logp_old, mask, eligible=elig, backend=backend)
    b = ak.score_tokens(nc(entropy), nc(logp), nc(logp_old), nc(mask), eligible=nc(elig), backend=backend)
    assert not nc(entropy).is_contiguous()
    torch.testing.assert_close(a.score, b.score)
    assert torch.equal(a.candidate, b.candidate)
    torch.testing.assert_close(a.omega, b.omega)


def test_branching_score_padded_equals_packed(backend, gen):
    B, T, V = 4, 10, 23
    lengths = make_lengths(gen, B, T, allow_empty=True)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    logits = torch.randn(B, T, V, generator=gen)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    st = ak.token_stats(logits, torch.where(mask, tokens, torch.full_like(tokens, -100)), backend=backend)
    logp_old = st.logp + 0.02 * torch.randn(B, T, generator=gen)
    elig = torch.rand(B, T, generator=gen) < 0.9
    outs = {}
    for layout in LAYOUTS:
        lg, tk, lpo, m, el, cu = batch.args(layout, logits, tokens, logp_old, mask, elig)
        r = ak.branching_score(lg, tk, lpo, m, cu_seqlens=cu, eligible=el, topk=2, backend=backend)
        outs[layout] = r
    pad, pk = outs["padded"], outs["packed"]
    torch.testing.assert_close(pk.score, pack(pad.score, lengths), atol=1e-6, rtol=1e-6)
    assert torch.equal(pk.candidate, pack(pad.candidate, lengths))
    torch.testing.assert_close(pk.omega, pack(pad.omega, lengths))
    torch.testing.assert_close(pk.entropy, pack(pad.entropy, lengths))
    assert torch.equal(pk.topk_ids, pack(pad.topk_ids, lengths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_constant_segments_have_no_candidates(backend, dtype):
    # A constant rollout has z = 0 exactly (0.7 * n / n is not exactly 0.7 in float64): no candidate there.
    entropy = torch.full((3, 37), 0.7, dtype=dtype)
    entropy[1] = torch.linspace(0, 1, 37, dtype=dtype)
    res = ak.score_tokens(entropy, backend=backend)
    assert not res.candidate[0].any() and not res.candidate[2].any()
    assert torch.equal(res.score[0], torch.zeros(37, dtype=res.score.dtype))
    assert res.candidate[1].any()
