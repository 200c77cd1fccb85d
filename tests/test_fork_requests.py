"""fork_requests (docs/api.md `fork_requests`): from chosen branch points to the branches to generate, in the
"resample" and the contrastive "topk" modes, padded and packed, without a host sync."""

import pytest
import torch
from helpers import cu_seqlens, pack

import appo_kernels as ak

V = 11


def _case(seed=0, lengths=(7, 5, 6, 4), groups=(0, 0, 1, 1), num_branches=3, k=4):
    """Scores, branch points and top-k from `branching_score` over random logits (padded layout)."""
    g = torch.Generator().manual_seed(seed)
    R, T = len(lengths), max(lengths)
    logits = torch.randn(R, T, V, generator=g) * 2
    tokens = torch.randint(0, V, (R, T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    sc = ak.branching_score(logits, tokens, mask=mask, topk=k)
    bp = ak.select_branch_points(sc.score, sc.candidate, torch.tensor(groups), num_branches,
                                 num_groups=max(groups) + 1)
    return tokens, mask, sc, bp


def test_resample_keeps_the_parents_token_and_splits_at_it():
    tokens, _, _, bp = _case()
    fr = ak.fork_requests(bp, tokens)
    assert torch.equal(fr.rollout, bp.rollout) and torch.equal(fr.position, bp.position)
    assert torch.equal(fr.split, bp.position) and torch.equal(fr.score, bp.score)
    assert torch.equal(fr.token, tokens[bp.rollout, bp.position])
    reqs = fr.tolist()
    assert [(q.group, q.slot) for q in reqs] == [(g, j) for g in range(2) for j in range(3)]
    for q in reqs:
        assert (q.rollout, q.position, q.token, q.split) == (int(bp.rollout[q.group, q.slot]),
                                                              int(bp.position[q.group, q.slot]),
                                                              int(tokens[q.rollout, q.position]), q.position)
        assert q.score == pytest.approx(float(bp.score[q.group, q.slot]))


def test_topk_best_substitutes_the_most_likely_other_token():
    tokens, _, sc, bp = _case()
    fr = ak.fork_requests(bp, tokens, mode="topk", topk_ids=sc.topk_ids)
    assert torch.equal(fr.split, bp.position - 1)
    for q in fr.tolist():
        parent = int(tokens[q.rollout, q.position])
        ranked = sc.topk_ids[q.rollout, q.position].tolist()
        assert q.token != parent                                          # the branch differs at t ...
        assert q.token == next(i for i in ranked if i != parent)          # ... by the best alternative
        assert q.split == q.position - 1


def test_topk_sample_draws_from_the_topk_renormalised_without_the_parents_token():
    # One fork point repeated in 4000 slots: the drawn alternatives follow the top-k probabilities without a_t.
    k, n = 4, 4000
    logits = torch.tensor([[0.0] * V, [3.0, 2.5, 2.0, 1.0, 0.5] + [-1.0] * (V - 5), [0.0] * V])[None]
    tokens = torch.tensor([[4, 1, 7]])                   # a_1 = 1, inside the top-k
    sc = ak.branching_score(logits, tokens, topk=k)
    bp = ak.BranchPoints(rollout=torch.zeros(1, n, dtype=torch.long), position=torch.ones(1, n, dtype=torch.long),
                         score=torch.zeros(1, n), candidate=torch.ones(1, n, dtype=torch.bool),
                         valid=torch.ones(1, n, dtype=torch.bool))
    fr = ak.fork_requests(bp, tokens, mode="topk", topk_ids=sc.topk_ids, topk_logp=sc.topk_logp, choice="sample",
                          generator=torch.Generator().manual_seed(0))
    assert sc.topk_ids[0, 1].tolist() == [0, 1, 2, 3]
    p = torch.softmax(torch.tensor([3.0, 2.0, 1.0]), 0)   # tokens 0, 2, 3 renormalised without 1
    freq = torch.stack([(fr.token == i).float().mean() for i in (0, 2, 3)])
    assert int((fr.token == 1).sum()) == 0
    torch.testing.assert_close(freq, p, atol=0.03, rtol=0)           # 4000 draws: sd <= 0.008
    again = ak.fork_requests(bp, tokens, mode="topk", topk_ids=sc.topk_ids, topk_logp=sc.topk_logp, choice="sample",
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.token, fr.token)                        # reproducible from the generator


def test_packed_layout_gives_the_padded_requests():
    lengths = [7, 5, 6, 4]
    tokens, _, sc, bp = _case(lengths=tuple(lengths))
    cu = cu_seqlens(lengths)
    padded = ak.fork_requests(bp, tokens, mode="topk", topk_ids=sc.topk_ids)
    packed = ak.fork_requests(bp, pack(tokens, lengths), mode="topk", topk_ids=pack(sc.topk_ids, lengths),
                              cu_seqlens=cu)
    for a, b in zip(padded, packed):
        assert torch.equal(a, b)


def test_groups_without_a_fork_point_are_invalid_and_skipped():
    tokens, mask, sc, _ = _case(groups=(0, 0, 2, 2))       # group 1 has no rollout
    bp = ak.select_branch_points(sc.score, sc.candidate, torch.tensor([0, 0, 2, 2]), 2, num_groups=3)
    fr = ak.fork_requests(bp, tokens, mode="topk", topk_ids=sc.topk_ids)
    assert fr.valid[1].tolist() == [False, False]
    assert fr.token[1].tolist() == fr.split[1].tolist() == fr.rollout[1].tolist() == [-1, -1]
    assert {q.group for q in fr.tolist()} == {0, 2}


def test_no_host_sync():
    # Under FakeTensorMode any read of a value (.item(), bool(), .tolist()) raises: the op must not do one.
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        tokens = torch.zeros(4, 6, dtype=torch.long)
        ids = torch.zeros(4, 6, 3, dtype=torch.long)
        logp = torch.zeros(4, 6, 3)
        bp = ak.BranchPoints(*(torch.zeros(2, 3, dtype=dt) for dt in (torch.long, torch.long, torch.float32,
                                                                      torch.bool, torch.bool)))
        for kw in ({}, {"mode": "topk", "topk_ids": ids},
                   {"mode": "topk", "topk_ids": ids, "topk_logp": logp, "choice": "sample"}):
            fr = ak.fork_requests(bp, tokens, **kw)
            assert fr.token.shape == (2, 3) and fr.token.dtype == torch.int64


@pytest.mark.parametrize("kwargs, error, match", [
    ({"mode": "swap"}, ValueError, r"mode: expected one of \['resample', 'topk'\], got 'swap'"),
    ({"mode": "topk"}, TypeError, r"topk_ids: expected an integer tensor for mode='topk'"),
    ({"mode": "topk", "topk_ids": "k1"}, ValueError, r"topk_ids: expected k >= 2"),
    ({"mode": "topk", "topk_ids": "float"}, TypeError, r"topk_ids: expected an integer tensor"),
    ({"mode": "topk", "topk_ids": "k4", "choice": "sample"}, TypeError, r"topk_logp: expected a float tensor"),
    ({"mode": "topk", "topk_ids": "k4", "choice": "worst"}, ValueError, r"choice: expected one of"),
    ({"tokens": "short"}, ValueError, r"branch_points: position outside its rollout"),
])
def test_errors_name_the_argument(kwargs, error, match):
    tokens, _, sc, bp = _case()
    topk = {"k1": sc.topk_ids[..., :1], "k4": sc.topk_ids, "float": sc.topk_ids.float()}
    kwargs = dict(kwargs)
    if "topk_ids" in kwargs:
        kwargs["topk_ids"] = topk[kwargs["topk_ids"]]
    if kwargs.pop("tokens", None) == "short":
        tokens = tokens[:, :2]
    with pytest.raises(error, match=match):
        ak.fork_requests(bp, tokens, **kwargs)
    with pytest.raises(TypeError, match="branch_points: expected the BranchPoints"):
        ak.fork_requests(tuple(bp), tokens)
