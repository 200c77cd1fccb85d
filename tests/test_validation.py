"""Input validation (docs/api.md "Errors" and each op's list of rejections).

Every case asserts the exception type AND that the message names the offending argument.
"""

import pytest
import torch

import appo_kernels as ak

V = 11


def lg(n=4, v=V, dtype=torch.float32):
    return torch.randn(n, v, dtype=dtype)


def tk(n=4, v=V):
    return torch.arange(n) % v


def seq(B=2, T=5):
    return torch.randn(B, T), torch.randn(B, T)


def packed(N=7):
    return torch.randn(N), torch.randn(N), torch.tensor([0, 3, 7])


H = 6
W = torch.randn(V, H)
HID = torch.randn(4, H)

# (id, thunk, exception type, regex the message must match)
CASES = [
    # ---- token_stats ------------------------------------------------------------------------------------
    ("ts-logits-int", lambda: ak.token_stats(torch.ones(4, V, dtype=torch.int64), tk()), TypeError, "logits"),
    ("ts-tokens-float", lambda: ak.token_stats(lg(), tk().float()), TypeError, "tokens"),
    ("ts-tokens-bool", lambda: ak.token_stats(lg(), tk() > 0), TypeError, "tokens"),
    ("ts-shape-mismatch", lambda: ak.token_stats(lg(4), tk(5)), ValueError, "tokens|logits"),
    ("ts-shape-mismatch-3d", lambda: ak.token_stats(lg(6).reshape(2, 3, V), tk(6).reshape(3, 2)), ValueError,
     "tokens|logits"),
    ("ts-logits-1d", lambda: ak.token_stats(torch.randn(V), torch.tensor(1)), ValueError, "logits"),
    ("ts-token-too-large", lambda: ak.token_stats(lg(), torch.tensor([0, 1, V, 2])), ValueError, "tokens"),
    ("ts-token-negative", lambda: ak.token_stats(lg(), torch.tensor([0, -1, 3, 2])), ValueError, "tokens"),
    ("ts-token-negative-custom-ignore", lambda: ak.token_stats(lg(), torch.tensor([0, -100, 3, 2]),
                                                               ignore_index=-1), ValueError, "tokens"),
    ("ts-temperature-zero", lambda: ak.token_stats(lg(), tk(), temperature=0.0), ValueError, "temperature"),
    ("ts-temperature-negative", lambda: ak.token_stats(lg(), tk(), temperature=-1.0), ValueError, "temperature"),
    ("ts-temperature-inf", lambda: ak.token_stats(lg(), tk(), temperature=float("inf")), ValueError,
     "temperature"),
    ("ts-temperature-nan", lambda: ak.token_stats(lg(), tk(), temperature=float("nan")), ValueError,
     "temperature"),
    ("ts-topk-negative", lambda: ak.token_stats(lg(), tk(), topk=-1), ValueError, "topk"),
    ("ts-topk-too-large", lambda: ak.token_stats(lg(), tk(), topk=V + 1), ValueError, "topk"),
    ("ts-vocab-empty", lambda: ak.token_stats(torch.randn(4, 0), torch.full((4,), -100)), ValueError,
     "logits|V"),
    ("ts-entropy-unknown", lambda: ak.token_stats(lg(), tk(), entropy="shannon"), ValueError, "entropy"),
    ("ts-entropy-topk-without-k", lambda: ak.token_stats(lg(), tk(), entropy="topk"), ValueError, "topk"),
    ("ts-device-mismatch", lambda: ak.token_stats(lg(), tk().to("meta")), ValueError, "device"),
    ("ts-backend-unknown", lambda: ak.token_stats(lg(), tk(), backend="no-such-backend"), ValueError, "backend"),
    # ---- linear_token_stats -----------------------------------------------------------------------------
    ("lin-hidden-int", lambda: ak.linear_token_stats(HID.long(), W, tk()), TypeError, "hidden"),
    ("lin-weight-int", lambda: ak.linear_token_stats(HID, W.long(), tk()), TypeError, "weight"),
    ("lin-weight-hidden-size", lambda: ak.linear_token_stats(HID, torch.randn(V, H + 1), tk()), ValueError,
     "weight|hidden"),
    ("lin-weight-1d", lambda: ak.linear_token_stats(HID, torch.randn(H), tk()), ValueError, "weight"),
    ("lin-bias-shape", lambda: ak.linear_token_stats(HID, W, tk(), bias=torch.randn(V + 1)), ValueError, "bias"),
    ("lin-tokens-shape", lambda: ak.linear_token_stats(HID, W, tk(5)), ValueError, "tokens|hidden"),
    ("lin-token-range", lambda: ak.linear_token_stats(HID, W, torch.tensor([0, V, 1, 2])), ValueError, "tokens"),
    ("lin-temperature", lambda: ak.linear_token_stats(HID, W, tk(), temperature=0.0), ValueError, "temperature"),
    ("lin-topk", lambda: ak.linear_token_stats(HID, W, tk(), topk=V + 1), ValueError, "topk"),
    ("lin-backend-unknown", lambda: ak.linear_token_stats(HID, W, tk(), backend="no-such-backend"), ValueError,
     "backend"),
    # ---- future_values ----------------------------------------------------------------------------------
    ("fv-logp-old-shape", lambda: ak.future_values(torch.randn(2, 5), torch.randn(2, 6)), ValueError, "logp_old"),
    ("fv-mask-shape", lambda: ak.future_values(*seq(), torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask"),
    ("fv-mask-values", lambda: ak.future_values(*seq(), torch.full((2, 5), 2)), ValueError, "mask"),
    ("fv-mask-values-float", lambda: ak.future_values(*seq(), torch.full((2, 5), 0.5)), ValueError, "mask"),
    ("fv-logp-int", lambda: ak.future_values(torch.ones(2, 5, dtype=torch.int64), torch.randn(2, 5)), TypeError,
     "logp"),
    ("fv-1d-without-cu", lambda: ak.future_values(torch.randn(7), torch.randn(7)), ValueError, "cu_seqlens"),
    ("fv-cu-not-zero-start", lambda: ak.future_values(*packed()[:2], cu_seqlens=torch.tensor([1, 3, 7])),
     ValueError, "cu_seqlens"),
    ("fv-cu-decreasing", lambda: ak.future_values(*packed()[:2], cu_seqlens=torch.tensor([0, 5, 3, 7])),
     ValueError, "cu_seqlens"),
    ("fv-cu-wrong-end", lambda: ak.future_values(*packed()[:2], cu_seqlens=torch.tensor([0, 3, 6])), ValueError,
     "cu_seqlens"),
    ("fv-cu-beyond-end", lambda: ak.future_values(*packed()[:2], cu_seqlens=torch.tensor([0, 3, 8])), ValueError,
     "cu_seqlens"),
    ("fv-cu-float", lambda: ak.future_values(*packed()[:2], cu_seqlens=torch.tensor([0.0, 3.0, 7.0])), TypeError,
     "cu_seqlens"),
    ("fv-cu-2d", lambda: ak.future_values(*packed()[:2], cu_seqlens=torch.tensor([[0, 3, 7]])), ValueError,
     "cu_seqlens"),
    ("fv-cu-with-padded", lambda: ak.future_values(*seq(), cu_seqlens=torch.tensor([0, 3, 10])), ValueError,
     "cu_seqlens"),
    ("fv-gamma-zero", lambda: ak.future_values(*seq(), gamma=0.0), ValueError, "gamma"),
    ("fv-gamma-above-one", lambda: ak.future_values(*seq(), gamma=1.5), ValueError, "gamma"),
    ("fv-clip-eps-one", lambda: ak.future_values(*seq(), clip_eps=1.0), ValueError, "clip_eps"),
    ("fv-clip-eps-negative", lambda: ak.future_values(*seq(), clip_eps=-0.1), ValueError, "clip_eps"),
    ("fv-backend-unknown", lambda: ak.future_values(*seq(), backend="no-such-backend"), ValueError, "backend"),
    # ---- score_tokens / branching_score -----------------------------------------------------------------
    ("st-logp-shape", lambda: ak.score_tokens(torch.rand(2, 5), torch.randn(2, 4), torch.randn(2, 4)), ValueError,
     "logp"),
    ("st-logp-old-shape", lambda: ak.score_tokens(torch.rand(2, 5), torch.randn(2, 5), torch.randn(3, 5)),
     ValueError, "logp_old"),
    ("st-logp-old-without-logp", lambda: ak.score_tokens(torch.rand(2, 5), None, torch.randn(2, 5)), ValueError,
     "logp"),
    ("st-eligible-shape", lambda: ak.score_tokens(torch.rand(2, 5), eligible=torch.ones(2, 4, dtype=torch.bool)),
     ValueError, "eligible"),
    ("st-mask-values", lambda: ak.score_tokens(torch.rand(2, 5), mask=torch.full((2, 5), 3)), ValueError, "mask"),
    ("st-entropy-int", lambda: ak.score_tokens(torch.ones(2, 5, dtype=torch.int64)), TypeError, "entropy"),
    ("st-1d-without-cu", lambda: ak.score_tokens(torch.rand(7)), ValueError, "cu_seqlens"),
    ("st-cu-wrong-end", lambda: ak.score_tokens(torch.rand(7), cu_seqlens=torch.tensor([0, 2, 5])), ValueError,
     "cu_seqlens"),
    ("bs-2d-logits-without-cu", lambda: ak.branching_score(lg(7), tk(7)), ValueError, "cu_seqlens"),
    ("bs-tokens-shape", lambda: ak.branching_score(torch.randn(2, 3, V), torch.zeros(2, 4, dtype=torch.long)),
     ValueError, "tokens"),
    ("bs-token-range", lambda: ak.branching_score(torch.randn(1, 3, V), torch.tensor([[0, V + 1, 2]])), ValueError,
     "tokens"),
    ("bs-logp-old-shape", lambda: ak.branching_score(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long),
                                                     torch.randn(2, 4)), ValueError, "logp_old"),
    ("bs-temperature", lambda: ak.branching_score(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long),
                                                  temperature=-2.0), ValueError, "temperature"),
    ("bs-topk", lambda: ak.branching_score(torch.randn(2, 3, V), torch.zeros(2, 3, dtype=torch.long), topk=V + 5),
     ValueError, "topk"),
    # ---- select_branch_points ---------------------------------------------------------------------------
    ("sbp-candidate-shape", lambda: ak.select_branch_points(torch.randn(2, 5), torch.ones(2, 4, dtype=torch.bool),
                                                            torch.tensor([0, 0]), 2), ValueError, "candidate"),
    ("sbp-group-ids-length", lambda: ak.select_branch_points(torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool),
                                                             torch.tensor([0, 0, 1]), 2), ValueError, "group_ids"),
    ("sbp-group-ids-range", lambda: ak.select_branch_points(torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool),
                                                            torch.tensor([0, 3]), 2, num_groups=2), ValueError,
     "group_ids"),
    ("sbp-group-ids-negative", lambda: ak.select_branch_points(torch.randn(2, 5),
                                                               torch.ones(2, 5, dtype=torch.bool),
                                                               torch.tensor([0, -1]), 2), ValueError, "group_ids"),
    ("sbp-group-ids-float", lambda: ak.select_branch_points(torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool),
                                                            torch.tensor([0.0, 1.0]), 2), TypeError, "group_ids"),
    ("sbp-num-branches-zero", lambda: ak.select_branch_points(torch.randn(2, 5),
                                                              torch.ones(2, 5, dtype=torch.bool),
                                                              torch.tensor([0, 0]), 0), ValueError, "num_branches"),
    ("sbp-1d-without-cu", lambda: ak.select_branch_points(torch.randn(7), torch.ones(7, dtype=torch.bool),
                                                          torch.tensor([0, 0]), 2), ValueError, "cu_seqlens"),
    ("sbp-cu-decreasing", lambda: ak.select_branch_points(torch.randn(7), torch.ones(7, dtype=torch.bool),
                                                          torch.tensor([0, 0]), 2,
                                                          cu_seqlens=torch.tensor([0, 8, 7])), ValueError,
     "cu_seqlens"),
    # ---- group_advantages / procedure_advantages --------------------------------------------------------
    ("ga-group-ids-range", lambda: ak.group_advantages(torch.randn(4), torch.tensor([0, 1, 2, 3]), num_groups=3),
     ValueError, "group_ids"),
    ("ga-group-ids-negative", lambda: ak.group_advantages(torch.randn(4), torch.tensor([0, 1, -2, 0])),
     ValueError, "group_ids"),
    ("ga-group-ids-length", lambda: ak.group_advantages(torch.randn(4), torch.tensor([0, 1, 1])), ValueError,
     "group_ids|rewards"),
    ("ga-is-branch-length", lambda: ak.group_advantages(torch.randn(4), torch.tensor([0, 1, 1, 0]),
                                                        torch.tensor([True, False])), ValueError, "is_branch"),
    ("ga-rewards-int", lambda: ak.group_advantages(torch.tensor([1, 0, 1, 0]), torch.tensor([0, 0, 1, 1])),
     TypeError, "rewards"),
    ("pa-needs-branch-score", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, -1, 0]), torch.tensor([0, 0, 1]),
        torch.ones(3, 4, dtype=torch.bool), branch_strength_scaling=True), ValueError, "branch_score"),
    ("pa-parent-range", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, -1, 7]), torch.tensor([0, 0, 1]),
        torch.ones(3, 4, dtype=torch.bool)), ValueError, "parent"),
    ("pa-split-length", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, -1, 0]), torch.tensor([0, 1]),
        torch.ones(3, 4, dtype=torch.bool)), ValueError, "split"),
    ("pa-mask-rows", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, -1, 0]), torch.tensor([0, 0, 1]),
        torch.ones(4, 4, dtype=torch.bool)), ValueError, "mask|rewards"),
    ("pa-parent-other-group", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 1, 1]), torch.tensor([-1, -1, 0]), torch.tensor([0, 0, 1]),
        torch.ones(3, 4, dtype=torch.bool)), ValueError, "parent"),
    ("pa-parent-is-branch", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, 0, 1]), torch.tensor([0, 0, 1]),
        torch.ones(3, 4, dtype=torch.bool)), ValueError, "parent"),
    ("pa-mask-values", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, -1, 0]), torch.tensor([0, 0, 1]),
        torch.full((3, 4), 2)), ValueError, "mask"),
    ("pa-group-ids-range", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 5]), torch.tensor([-1, -1, -1]), torch.tensor([0, 0, 0]),
        torch.ones(3, 4, dtype=torch.bool), num_groups=2), ValueError, "group_ids"),
    ("pa-cu-wrong-count", lambda: ak.procedure_advantages(
        torch.randn(3), torch.tensor([0, 0, 0]), torch.tensor([-1, -1, 0]), torch.tensor([0, 0, 1]),
        torch.ones(9, dtype=torch.bool), cu_seqlens=torch.tensor([0, 4, 9])), ValueError, "cu_seqlens|rewards"),
    # ---- future_kl_weights ------------------------------------------------------------------------------
    ("fkl-advantages-shape", lambda: ak.future_kl_weights(*seq(), torch.randn(2, 4)), ValueError, "advantages"),
    ("fkl-logp-old-shape", lambda: ak.future_kl_weights(torch.randn(2, 5), torch.randn(2, 4), torch.randn(2, 5)),
     ValueError, "logp_old"),
    ("fkl-mask-values", lambda: ak.future_kl_weights(*seq(), torch.randn(2, 5), torch.full((2, 5), -1)),
     ValueError, "mask"),
    ("fkl-1d-without-cu", lambda: ak.future_kl_weights(torch.randn(7), torch.randn(7), torch.randn(7)),
     ValueError, "cu_seqlens"),
    ("fkl-backend-unknown", lambda: ak.future_kl_weights(*seq(), torch.randn(2, 5), backend="no-such-backend"),
     ValueError, "backend"),
    # ---- policy_loss ------------------------------------------------------------------------------------
    ("pl-aggregation", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), aggregation="sum-of-everything"),
     ValueError, "aggregation"),
    ("pl-kl-estimator", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), logp_ref=torch.randn(2, 5),
                                               kl_estimator="k4"), ValueError, "kl_estimator"),
    ("pl-logp-old-shape", lambda: ak.policy_loss(torch.randn(2, 5), torch.randn(2, 6), torch.randn(2, 5)),
     ValueError, "logp_old"),
    ("pl-advantages-shape", lambda: ak.policy_loss(*seq(), torch.randn(5, 2)), ValueError, "advantages"),
    ("pl-mask-shape", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), torch.ones(2, 6)), ValueError, "mask"),
    ("pl-mask-values", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), torch.full((2, 5), 0.3)), ValueError,
     "mask"),
    ("pl-logp-ref-shape", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), logp_ref=torch.randn(2, 4)),
     ValueError, "logp_ref"),
    ("pl-entropy-shape", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), entropy=torch.randn(2, 4),
                                                entropy_coef=0.1), ValueError, "entropy"),
    ("pl-1d-without-cu", lambda: ak.policy_loss(torch.randn(7), torch.randn(7), torch.randn(7)), ValueError,
     "cu_seqlens"),
    ("pl-cu-not-zero-start", lambda: ak.policy_loss(torch.randn(7), torch.randn(7), torch.randn(7),
                                                    cu_seqlens=torch.tensor([2, 7])), ValueError, "cu_seqlens"),
    # ---- options: types, finiteness and ranges named in the message --------------------------------------
    ("ts-ignore-index-2**63", lambda: ak.token_stats(lg(), tk(), ignore_index=2 ** 63), ValueError, "ignore_index"),
    ("ts-ignore-index-float", lambda: ak.token_stats(lg(), tk(), ignore_index=-100.0), TypeError, "ignore_index"),
    ("ts-temperature-str", lambda: ak.token_stats(lg(), tk(), temperature="1"), TypeError, "temperature"),
    ("ts-temperature-tiny", lambda: ak.token_stats(lg(), tk(), temperature=1e-39), ValueError,
     r"temperature.*>= 1e-06"),
    ("ts-temperature-bool", lambda: ak.token_stats(lg(), tk(), temperature=True), TypeError, "temperature"),
    ("ts-topk-float", lambda: ak.token_stats(lg(), tk(), topk=2.0), TypeError, "topk"),
    ("fkl-coef-str", lambda: ak.future_kl_weights(*seq(), torch.randn(2, 5), coef="x"), TypeError, "coef"),
    ("fkl-coef-nan", lambda: ak.future_kl_weights(*seq(), torch.randn(2, 5), coef=float("nan")), ValueError,
     "coef"),
    ("pl-entropy-coef-nan", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), entropy=torch.rand(2, 5),
                                                   entropy_coef=float("nan")), ValueError, "entropy_coef"),
    ("pl-entropy-coef-str", lambda: ak.policy_loss(*seq(), torch.randn(2, 5), entropy_coef="0.1"), TypeError,
     "entropy_coef"),
    ("lin-hidden-size-0", lambda: ak.linear_token_stats(torch.randn(4, 0), torch.randn(V, 0), tk()), ValueError,
     "hidden"),
    ("lin-bias-dtype", lambda: ak.linear_token_stats(HID, W, tk(), bias=torch.randn(V, dtype=torch.float64)),
     TypeError, "bias"),
    ("lin-chunk-bools", lambda: ak.linear_token_stats(HID, W, tk(), chunk_size=(True, True)), ValueError,
     "chunk_size"),
    ("ts-triton-topk-65", lambda: ak.token_stats(torch.randn(2, 80), torch.tensor([0, 1]), topk=65,
                                                 backend="triton" if "triton" in ak.available_backends() else "x"),
     ValueError, r"backend.*topk <= 64|backend"),
]


@pytest.mark.parametrize("thunk,exc,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rejects(thunk, exc, match):
    with pytest.raises(exc, match=match):
        thunk()


def test_unavailable_backends_raise():
    # a backend that exists in the design but is not available here must raise, never fall back silently
    avail = set(ak.available_backends())
    assert "torch" in avail
    for name in ("triton", "cuda", "native"):
        if name in avail:
            continue
        with pytest.raises(ValueError, match="backend"):
            ak.token_stats(lg(), tk(), backend=name)


def test_ignore_index_rows_are_not_range_checked():
    # -100 (default ignore_index) is fine; so is a custom ignore_index outside [0, V)
    ak.token_stats(lg(), torch.tensor([0, -100, 3, V - 1]))
    ak.token_stats(lg(), torch.tensor([0, V + 5, 3, V - 1]), ignore_index=V + 5)


def test_cu_seqlens_int32_and_empty_rollouts_accepted():
    logp, logp_old, _ = packed()
    ak.future_values(logp, logp_old, cu_seqlens=torch.tensor([0, 3, 3, 7], dtype=torch.int32))


def test_value_checks_can_be_switched_off(value_checks_restored):
    # value checks (masks 0/1 here) are skipped when switched off; shape checks still run
    logp, logp_old = seq()
    ak.set_value_checks(False)
    ak.future_values(logp, logp_old, torch.full((2, 5), 2))  # not read for validity any more
    with pytest.raises(ValueError, match="mask"):
        ak.future_values(logp, logp_old, torch.ones(2, 4))
    ak.set_value_checks(True)
    with pytest.raises(ValueError, match="mask"):
        ak.future_values(logp, logp_old, torch.full((2, 5), 2))
