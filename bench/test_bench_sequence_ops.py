"""pytest-benchmark micro-benchmarks of the sequence ops: ours (every backend) vs the authors' dense / per-rollout
approach. Small sizes (a smoke check); bench/run.py has the full ones (B=16..64, T up to 8192).

Every benchmark checks its output against the eager reference (allclose) once, so a broken op cannot be
benchmarked silently.
"""
import pytest
import torch

import appo_kernels as ak
from _common import (SEQ_GAMMA, check_future_kl, check_future_values, check_policy_loss, check_procedure,
                     check_scores, dense_future_values, eager_future_kl_weights, eager_policy_loss_fwd_bwd,
                     eager_procedure_advantages, eager_score_tokens, make_seq_batch, make_tree,
                     ours_future_kl_weights, ours_future_values, ours_policy_loss_fwd_bwd,
                     ours_procedure_advantages, ours_score_tokens, timed_backends)

B, T = 16, 1024
OURS = [f"ours[{b}]" for b in timed_backends()]


@pytest.fixture(scope="module")
def batch():
    d = make_seq_batch(B, T, seed=2)
    return d, make_tree(B, T, d["lengths"], seed=2)


def backend_of(contender):
    return contender[5:-1]


def _group(benchmark, op, contender):
    benchmark.group = f"{op} B={B} T={T}"
    benchmark.extra_info["contender"] = contender


def future_values_ref(d):
    return dense_future_values(d["logp"], d["logp_old"], d["mask"], SEQ_GAMMA)


@pytest.mark.parametrize("contender", OURS + ["dense"])
def test_future_values(benchmark, batch, contender):
    d, _ = batch
    _group(benchmark, "future_values", contender)
    omega_ref, gain_ref = future_values_ref(d)
    if contender == "dense":
        omega, gain = benchmark(future_values_ref, d)
        torch.testing.assert_close(omega, omega_ref)
        # the dense contender against ours (the scan), so both directions are covered
        check_future_values(ours_future_values(d, ak.available_backends()[0]), omega, gain, "ours vs dense")
        return
    out = benchmark(ours_future_values, d, backend_of(contender))
    check_future_values(out, omega_ref, gain_ref, contender)


def score_ref(d):
    return eager_score_tokens(d["entropy"], d["logp"], d["logp_old"], d["mask"], d["eligible"], SEQ_GAMMA)


@pytest.mark.parametrize("contender", OURS + ["eager"])
def test_score_tokens(benchmark, batch, contender):
    d, _ = batch
    _group(benchmark, "score_tokens", contender)
    if contender == "eager":
        score, cand, _ = benchmark(score_ref, d)
        check_scores(ours_score_tokens(d, ak.available_backends()[0]), score, cand, "ours vs eager")
        return
    score, cand, _ = score_ref(d)
    check_scores(benchmark(ours_score_tokens, d, backend_of(contender)), score, cand, contender)


def procedure_ref(d, tree):
    return eager_procedure_advantages(tree["rewards"], tree["group_ids"], tree["parent"], tree["split"], d["mask"],
                                      tree["branch_score"])


@pytest.mark.parametrize("contender", OURS + ["eager"])
def test_procedure_advantages(benchmark, batch, contender):
    d, tree = batch
    _group(benchmark, "procedure_advantages", contender)
    if contender == "eager":
        adv, lm, ahat = benchmark(procedure_ref, d, tree)
        check_procedure(ours_procedure_advantages(d, tree, ak.available_backends()[0]), adv, lm, ahat,
                        "ours vs eager")
        return
    adv, lm, ahat = procedure_ref(d, tree)
    check_procedure(benchmark(ours_procedure_advantages, d, tree, backend_of(contender)), adv, lm, ahat, contender)


def future_kl_ref(d):
    return eager_future_kl_weights(d["logp"], d["logp_old"], d["advantages"], d["mask"])


@pytest.mark.parametrize("contender", OURS + ["dense"])
def test_future_kl_weights(benchmark, batch, contender):
    d, _ = batch
    _group(benchmark, "future_kl_weights", contender)
    if contender == "dense":
        w, a = benchmark(future_kl_ref, d)
        check_future_kl(ours_future_kl_weights(d, ak.available_backends()[0]), w, a, "ours vs dense")
        return
    w, a = future_kl_ref(d)
    check_future_kl(benchmark(ours_future_kl_weights, d, backend_of(contender)), w, a, contender)


@pytest.mark.parametrize("contender", ["ours", "eager"])
def test_policy_loss_forward_backward(benchmark, batch, contender):
    d, _ = batch
    _group(benchmark, "policy_loss fwd+bwd", contender)
    leaf = d["logp"].clone().requires_grad_(True)
    ref = tuple(t.clone() for t in eager_policy_loss_fwd_bwd(d, leaf))
    fn = ours_policy_loss_fwd_bwd if contender == "ours" else eager_policy_loss_fwd_bwd
    check_policy_loss(benchmark(fn, d, leaf), ref, contender)
