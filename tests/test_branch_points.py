"""select_branch_points (method §4, docs/api.md `select_branch_points`).

Hand-built cases with the answers worked out in comments, then random cases against the oracle, in padded
and packed layouts.
"""

import oracle
import pytest
import torch
from helpers import LAYOUTS, cu_seqlens, pack

import appo_kernels as ak

INF = float("inf")
NINF = -INF


def padded(score_rows, cand_rows):
    """Per-rollout python lists -> padded [R, T] score (-inf padding) and candidate (False padding)."""
    T = max(len(r) for r in score_rows)
    score = torch.full((len(score_rows), T), NINF, dtype=torch.float64)
    cand = torch.zeros(len(score_rows), T, dtype=torch.bool)
    for i, (s, c) in enumerate(zip(score_rows, cand_rows)):
        score[i, :len(s)] = torch.tensor(s, dtype=torch.float64)
        cand[i, :len(c)] = torch.tensor(c, dtype=torch.bool)
    return score, cand


def select(score_rows, cand_rows, group_ids, num_branches, layout="padded", **kw):
    score, cand = padded(score_rows, cand_rows)
    gid = torch.tensor(group_ids, dtype=torch.int64)
    if layout == "packed":
        lengths = [len(r) for r in score_rows]
        return ak.select_branch_points(pack(score, lengths), pack(cand, lengths), gid, num_branches,
                                       cu_seqlens=cu_seqlens(lengths), **kw)
    return ak.select_branch_points(score, cand, gid, num_branches, **kw)


def picks(bp, g=0):
    """(rollout, position) pairs chosen for group g."""
    return list(zip(bp.rollout[g].tolist(), bp.position[g].tolist()))


# The running example (one group, two rollouts):
#   t:              0     1     2     3     4
#   rollout 0:    0.5   2.0   -inf  1.0   0.3      candidates at t = 1, 3
#   rollout 1:    3.0   0.1   2.0   -inf  -inf     candidate  at t = 2
# Candidate tier, score desc then rollout asc: (0,1) 2.0, (1,2) 2.0 [tie -> rollout 0 first], (0,3) 1.0.
# Other eligible positions by score: (1,0) 3.0, (0,0) 0.5, (0,4) 0.3, (1,1) 0.1.
# (1,0) has the highest score of all but is not a candidate, so it ranks after every candidate.
S0 = [0.5, 2.0, NINF, 1.0, 0.3]
C0 = [False, True, False, True, False]
S1 = [3.0, 0.1, 2.0, NINF, NINF]
C1 = [False, False, True, False, False]
FULL_ORDER = [(0, 1), (1, 2), (0, 3), (1, 0), (0, 0), (0, 4), (1, 1)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_strict_candidates_only(layout):
    # B = 2 <= 3 candidates: the two best candidates, tie on 2.0 broken towards rollout 0
    bp = select([S0, S1], [C0, C1], [0, 0], 2, layout)
    assert picks(bp) == [(0, 1), (1, 2)]
    assert bp.score.tolist() == [[2.0, 2.0]]
    assert bp.candidate.tolist() == [[True, True]]
    assert bp.valid.tolist() == [[True, True]]
    assert bp.rollout.dtype == torch.int64 and bp.position.dtype == torch.int64
    assert bp.candidate.dtype == torch.bool and bp.valid.dtype == torch.bool


@pytest.mark.parametrize("layout", LAYOUTS)
def test_fallback_fill_from_non_candidates(layout):
    # B = 5: the 3 candidates, then the best non-candidates (1,0) 3.0 and (0,0) 0.5
    bp = select([S0, S1], [C0, C1], [0, 0], 5, layout)
    assert picks(bp) == FULL_ORDER[:5]
    assert bp.score.tolist() == [[2.0, 2.0, 1.0, 3.0, 0.5]]
    assert bp.candidate.tolist() == [[True, True, True, False, False]]
    assert bp.valid.all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cyclic_fill(layout):
    # B = 10 > 7 eligible positions: slots 7, 8, 9 repeat slots 0, 1, 2
    bp = select([S0, S1], [C0, C1], [0, 0], 10, layout)
    assert picks(bp) == FULL_ORDER + FULL_ORDER[:3]
    assert bp.valid.all()
    assert bp.candidate.tolist() == [[True, True, True, False, False, False, False, True, True, True]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_len_skips_positions_without_room(layout):
    # max_len = 4 -> positions t >= 3 are skipped: (0,3) and (0,4) drop out.
    # Candidates (0,1), (1,2); then (1,0) 3.0, (0,0) 0.5, (1,1) 0.1.  B = 4.
    bp = select([S0, S1], [C0, C1], [0, 0], 4, layout, max_len=4)
    assert picks(bp) == [(0, 1), (1, 2), (1, 0), (0, 0)]
    assert bp.candidate.tolist() == [[True, True, False, False]]
    # max_len = 2 -> only t = 0 remains: (1,0) 3.0, (0,0) 0.5, then cyclic
    bp = select([S0, S1], [C0, C1], [0, 0], 3, layout, max_len=2)
    assert picks(bp) == [(1, 0), (0, 0), (1, 0)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_max_per_rollout(layout):
    # at most one per rollout: (0,1) taken, (1,2) taken, everything else is from a full rollout;
    # n = 2 < B = 3 -> slot 2 repeats slot 0
    bp = select([S0, S1], [C0, C1], [0, 0], 3, layout, max_per_rollout=1)
    assert picks(bp) == [(0, 1), (1, 2), (0, 1)]
    # two per rollout: (0,1), (1,2), (0,3) [rollout 0 now full], (1,0) [rollout 1 now full]
    bp = select([S0, S1], [C0, C1], [0, 0], 6, layout, max_per_rollout=2)
    assert picks(bp) == [(0, 1), (1, 2), (0, 3), (1, 0), (0, 1), (1, 2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_min_distance(layout):
    # one rollout, scores descending with t, all candidates.
    # min_distance = 2: t0 taken; t1 |1-0| = 1 < 2 skip; t2 taken; t3 skip; t4 taken; t5 skip.
    #   n = 3 < B = 4 -> [0, 2, 4, 0]
    s = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    c = [True] * 6
    bp = select([s], [c], [0], 4, layout, min_distance=2)
    assert bp.position.tolist() == [[0, 2, 4, 0]]
    # min_distance = 3: t0; t1, t2 too close; t3 (|3-0| = 3, not < 3) taken; t4, t5 too close to t3.
    bp = select([s], [c], [0], 4, layout, min_distance=3)
    assert bp.position.tolist() == [[0, 3, 0, 3]]
    # 0 and 1 mean no constraint
    for md in (0, 1):
        bp = select([s], [c], [0], 4, layout, min_distance=md)
        assert bp.position.tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_min_distance_is_per_rollout(layout):
    # order (0,0) 5, (1,0) 4.5, (0,1) 4, (1,1) 1; min_distance 5 only forbids positions near a chosen one of
    # the SAME rollout: (0,0) and (1,0) are both taken, (0,1), (1,1) are skipped; n = 2 -> cyclic
    bp = select([[5.0, 4.0], [4.5, 1.0]], [[True, True], [True, True]], [0, 0], 3, layout, min_distance=5)
    assert picks(bp) == [(0, 0), (1, 0), (0, 0)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tie_order(layout):
    # equal scores: rollout index first, then position.
    #   rollout 0: [0, 0, 1], rollout 1: [1, 0, 0], all candidates
    #   -> (0,2) 1, (1,0) 1 [rollout 0 before rollout 1 although its position is larger],
    #      then the zeros: (0,0), (0,1), (1,1), (1,2)
    bp = select([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[True] * 3, [True] * 3], [0, 0], 6, layout)
    assert picks(bp) == [(0, 2), (1, 0), (0, 0), (0, 1), (1, 1), (1, 2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_groups_and_invalid_groups(layout):
    # rollouts 0 and 2 form group 0 (not adjacent); rollout 1 is group 2 and has no eligible position
    # (all -inf or NaN); group 1 has no rollout at all.  num_groups = 3.
    #   group 0 pool: (0,0) 1.0 cand, (2,1) 2.0 cand, (0,1) 5.0 non-cand, (2,0) -1.0 non-cand
    #   -> candidates by score: (2,1), (0,0); then (0,1), (2,0)
    rows = [[1.0, 5.0], [NINF, float("nan")], [-1.0, 2.0]]
    cands = [[True, False], [True, True], [False, True]]
    bp = select(rows, cands, [0, 2, 0], 3, layout, num_groups=3)
    assert bp.rollout.shape == (3, 3)
    assert picks(bp, 0) == [(2, 1), (0, 0), (0, 1)]
    assert bp.valid.tolist() == [[True] * 3, [False] * 3, [False] * 3]
    for g in (1, 2):
        assert bp.rollout[g].tolist() == [-1] * 3
        assert bp.position[g].tolist() == [-1] * 3
        assert bp.score[g].tolist() == [NINF] * 3
        assert bp.candidate[g].tolist() == [False] * 3


def test_num_groups_inferred_from_group_ids():
    # G = max(group_ids) + 1 when num_groups is None
    bp = select([[1.0], [2.0]], [[True], [True]], [1, 1], 2)
    assert bp.valid.tolist() == [[False, False], [True, True]]
    assert picks(bp, 1) == [(1, 0), (0, 0)]


def test_candidate_at_ineligible_position_is_ignored():
    # candidate True where the score is -inf does not make the position eligible
    bp = select([[NINF, 1.0]], [[True, False]], [0], 2)
    assert picks(bp) == [(0, 1), (0, 1)]
    assert bp.candidate.tolist() == [[False, False]]


# ----------------------------------------------------------------------------------------------------------
# random cases vs the oracle
# ----------------------------------------------------------------------------------------------------------


def random_case(gen, R, T, discrete):
    lengths = torch.randint(0, T + 1, (R,), generator=gen).tolist()
    lengths[0] = T
    score_rows, cand_rows = [], []
    for L in lengths:
        if discrete:  # few distinct values: many ties
            s = torch.randint(-2, 3, (L,), generator=gen).double()
        else:
            s = torch.randn(L, generator=gen, dtype=torch.float64)
        s[torch.rand(L, generator=gen) < 0.25] = NINF
        c = torch.rand(L, generator=gen) < 0.3
        score_rows.append(s.tolist())
        cand_rows.append(c.tolist())
    return score_rows, cand_rows


OPTIONS = [
    {},
    {"max_len": 9},
    {"max_per_rollout": 2},
    {"min_distance": 3},
    {"max_len": 11, "max_per_rollout": 1, "min_distance": 2},
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("discrete", [False, True], ids=["continuous", "ties"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("num_branches", [1, 4, 9])
def test_matches_oracle(gen, layout, discrete, opts, num_branches):
    R, T, G = 9, 14, 4
    score_rows, cand_rows = random_case(gen, R, T, discrete)
    group_ids = torch.randint(0, G - 1, (R,), generator=gen).tolist()  # group G-1 stays empty
    bp = select(score_rows, cand_rows, group_ids, num_branches, layout, num_groups=G, **opts)
    ref = oracle.select_branch_points(score_rows, cand_rows, group_ids, num_branches, G, **opts)
    assert bp.rollout.tolist() == ref["rollout"]
    assert bp.position.tolist() == ref["position"]
    assert bp.candidate.tolist() == ref["candidate"]
    assert bp.valid.tolist() == ref["valid"]
    assert bp.score.tolist() == ref["score"]


def test_float32_scores(gen):
    # scores straight from branching_score are float32
    score_rows, cand_rows = random_case(gen, 6, 10, False)
    score, cand = padded(score_rows, cand_rows)
    bp = ak.select_branch_points(score.float(), cand, torch.tensor([0, 1, 0, 1, 0, 1]), 3)
    ref = oracle.select_branch_points([[float(torch.tensor(x).float()) for x in r] for r in score_rows], cand_rows,
                                      [0, 1, 0, 1, 0, 1], 3)
    assert bp.rollout.tolist() == ref["rollout"] and bp.position.tolist() == ref["position"]
    assert bp.score.dtype == torch.float32


def test_oracle_reproduces_hand_answers():
    # guards the oracle used by the random tests with the hand-worked answers above
    def op(*a, **kw):
        r = oracle.select_branch_points(*a, **kw)
        return list(zip(r["rollout"][0], r["position"][0]))

    assert op([S0, S1], [C0, C1], [0, 0], 10) == FULL_ORDER + FULL_ORDER[:3]
    assert op([S0, S1], [C0, C1], [0, 0], 4, max_len=4) == [(0, 1), (1, 2), (1, 0), (0, 0)]
    assert op([S0, S1], [C0, C1], [0, 0], 6, max_per_rollout=2) == [(0, 1), (1, 2), (0, 3), (1, 0), (0, 1), (1, 2)]
    assert op([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]], [[True] * 6], [0], 4, min_distance=3) == [(0, 0), (0, 3)] * 2
    assert op([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [[True] * 3] * 2, [0, 0], 6) == [(0, 2), (1, 0), (0, 0), (0, 1),
                                                                                   (1, 1), (1, 2)]
