"""group_advantages and procedure_advantages (method §5, docs/api.md).

Hand-built trees with the answers worked out in comments, then random trees against the oracle, padded and
packed.
"""

import oracle
import pytest
import torch
from helpers import FLOAT_DTYPES, LAYOUTS, SeqBatch, assert_close, make_mask, out_dtype, rows

import appo_kernels as ak

E = 1e-6  # the epsilon added to the std


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# group_advantages
# ----------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_worked():
    # rewards [1, 0, 3, 5, 2, 2], groups [0, 0, 0, 1, 1, 1], branch flags [F, F, T, F, F, T]
    #   (group 0, initial) {1, 0}: mean 0.5, std 0.5 -> +-0.5 / (0.5 + 1e-6)
    #   (group 0, branch)  {3}:    mean 3, std 0     -> 0
    #   (group 1, initial) {5, 2}: mean 3.5, std 1.5 -> +-1.5 / (1.5 + 1e-6)
    #   (group 1, branch)  {2}:                      -> 0
    rewards = t64([1, 0, 3, 5, 2, 2])
    gid = torch.tensor([0, 0, 0, 1, 1, 1])
    br = torch.tensor([False, False, True, False, False, True])
    a = ak.group_advantages(rewards, gid, br)
    exp = [0.5 / (0.5 + E), -0.5 / (0.5 + E), 0.0, 1.5 / (1.5 + E), -1.5 / (1.5 + E), 0.0]
    assert_close(a, exp, 1e-12, 1e-12)
    assert a.dtype == torch.float64 and a.shape == (6,)
    # without the division: r - mean
    a = ak.group_advantages(rewards, gid, br, scale_by_std=False)
    assert_close(a, [0.5, -0.5, 0.0, 1.5, -1.5, 0.0], 1e-12, 1e-12)
    # is_branch=None: every rollout is initial; group 0 {1, 0, 3} mean 4/3, group 1 {5, 2, 2} mean 3
    a = ak.group_advantages(rewards, gid, None, scale_by_std=False)
    assert_close(a, [1 - 4 / 3, -4 / 3, 3 - 4 / 3, 2.0, -1.0, -1.0], 1e-12, 1e-12)
    assert_close(ak.group_advantages(rewards, gid), oracle.group_advantages(rewards.tolist(), gid.tolist()),
                 1e-12, 1e-12)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("scale_by_std", [True, False])
def test_group_advantages_matches_oracle(gen, dtype, scale_by_std):
    R, G = 23, 5
    rewards = torch.randn(R, generator=gen, dtype=torch.float64).to(dtype)
    gid = torch.randint(0, G, (R,), generator=gen)
    br = torch.rand(R, generator=gen) < 0.5
    a = ak.group_advantages(rewards, gid, br, num_groups=G + 2, scale_by_std=scale_by_std)
    exp = oracle.group_advantages(rows(rewards), gid.tolist(), br.tolist(), scale_by_std)
    assert a.dtype == out_dtype(dtype)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    assert_close(a, exp, atol, atol)


# ----------------------------------------------------------------------------------------------------------
# procedure_advantages: tree A (one group, T = 5)
#   row 0: initial, reward 1      row 2: branch of row 0, split s = 1, reward 1
#   row 1: initial, reward 0      row 3: branch of row 0, split s = 3, reward 0
# With scale_by_std=False: A_hat = [0.5, -0.5, 0.5, -0.5] (initial {1, 0} mean 0.5; branches {1, 0} mean 0.5)
# Row 0, C(0, t) = branches with s_b >= t:
#   t = 0, 1: {2, 3}, mean A_hat = 0        -> A = 0.5
#   t = 2, 3: {3},    mean A_hat = -0.5     -> A = 0
#   t = 4:    {}                            -> A = 0.5
# Row 1 has no branches: A = -0.5 everywhere.  Branch rows: 0, loss mask False.
# ----------------------------------------------------------------------------------------------------------

TREE_A = {"rewards": [1.0, 0.0, 1.0, 0.0], "group_ids": [0, 0, 0, 0], "parent": [-1, -1, 0, 0], "split": [0, 0, 1, 3]}
T_A = 5


def run_tree(tree, mask_rows, layout="padded", dtype=torch.float64, **kw):
    lengths = [len(r) for r in mask_rows]
    T = max(lengths)
    batch = SeqBatch(lengths, T)
    mask = torch.zeros(len(mask_rows), T, dtype=torch.bool)
    for i, r in enumerate(mask_rows):
        mask[i, :len(r)] = torch.tensor(r, dtype=torch.bool)
    m, cu = batch.args(layout, mask)
    if "branch_score" in kw and kw["branch_score"] is not None:
        kw["branch_score"] = torch.tensor(kw["branch_score"], dtype=dtype)
    res = ak.procedure_advantages(torch.tensor(tree["rewards"], dtype=dtype), torch.tensor(tree["group_ids"]),
                                  torch.tensor(tree["parent"]), torch.tensor(tree["split"]), m, cu_seqlens=cu, **kw)
    out = {"advantages": batch.to_padded(res.advantages, layout), "loss_mask": batch.to_padded(res.loss_mask, layout),
               "multiplier": batch.to_padded(res.multiplier, layout), "group_advantages": res.group_advantages}
    return out, res


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tree_a_plain(backend, layout):
    out, res = run_tree(TREE_A, [[1] * T_A] * 4, layout, scale_by_std=False, backend=backend)
    assert_close(out["advantages"], [[0.5, 0.5, 0, 0, 0.5], [-0.5] * 5, [0] * 5, [0] * 5], 1e-12, 1e-12)
    assert out["loss_mask"].tolist() == [[True] * 5, [True] * 5, [False] * 5, [False] * 5]
    assert out["loss_mask"].dtype == torch.bool
    assert_close(out["multiplier"], [[1] * 5, [1] * 5, [0] * 5, [0] * 5], 1e-12, 1e-12)
    assert_close(out["group_advantages"], [0.5, -0.5, 0.5, -0.5], 1e-12, 1e-12)
    assert res.advantages.dtype == torch.float64


def test_tree_a_scaled_by_std(backend):
    # same tree, A_hat = +-0.5 / (0.5 + 1e-6) = +-a; row 0 = [a, a, 0, 0, a], row 1 = -a
    a = 0.5 / (0.5 + E)
    out, _ = run_tree(TREE_A, [[1] * T_A] * 4, backend=backend)
    assert_close(out["advantages"], [[a, a, 0, 0, a], [-a] * 5, [0] * 5, [0] * 5], 1e-12, 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tree_a_train_branches_and_tool_span(backend, layout):
    # train_branches: branch rows get A_hat[b] at t > s_b where mask == 1.
    #   row 2 (s = 1, A_hat 0.5): t = 2, 4 (t = 3 is a tool span, mask 0)
    #   row 3 (s = 3, A_hat -0.5): t = 4
    # row 0 has a tool span at t = 2: A 0, loss mask False, multiplier 0 there.
    mask_rows = [[1, 1, 0, 1, 1], [1] * 5, [1, 1, 1, 0, 1], [1] * 5]
    out, _ = run_tree(TREE_A, mask_rows, layout, scale_by_std=False, train_branches=True, backend=backend)
    assert_close(out["advantages"], [[0.5, 0.5, 0, 0, 0.5], [-0.5] * 5, [0, 0, 0.5, 0, 0.5], [0, 0, 0, 0, -0.5]],
                 1e-12, 1e-12)
    assert out["loss_mask"].tolist() == [[True, True, False, True, True], [True] * 5,
                                         [False, False, True, False, True], [False, False, False, False, True]]
    assert_close(out["multiplier"], [[1, 1, 0, 1, 1], [1] * 5, [0] * 5, [0] * 5], 1e-12, 1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tree_a_branch_strength_scaling(backend, layout):
    # branch_score: row 2 -> 2.0, row 3 -> 1.0 (initial rows hold 100, which must be ignored); decay 0.5.
    #   w_2 = 2 / 2 = 1, w_3 = 1 / 2 = 0.5
    #   M_2[t] = 1 + 1 * 0.5^(1 - t) for t <= 1:   [1.5, 2, 1, 1, 1]
    #   M_3[t] = 1 + 0.5 * 0.5^(3 - t) for t <= 3: [1.0625, 1.125, 1.25, 1.5, 1]
    #   M = mean:                                  [1.28125, 1.5625, 1.125, 1.25, 1]
    #   A row 0 = [0.5, 0.5, 0, 0, 0.5] * M = [0.640625, 0.78125, 0, 0, 0.5]
    # Row 1 has no branches: M = 1.
    out, _ = run_tree(TREE_A, [[1] * T_A] * 4, layout, scale_by_std=False, branch_strength_scaling=True,
                      branch_score=[100.0, 100.0, 2.0, 1.0], decay=0.5, backend=backend)
    assert_close(out["advantages"], [[0.640625, 0.78125, 0, 0, 0.5], [-0.5] * 5, [0] * 5, [0] * 5], 1e-12, 1e-12)
    assert_close(out["multiplier"], [[1.28125, 1.5625, 1.125, 1.25, 1], [1] * 5, [0] * 5, [0] * 5], 1e-12, 1e-12)


def test_tree_a_negative_branch_strength(backend):
    # branch_score row 2 -> -1 (clamped to 0: w_2 = 0), row 3 -> 1 (w_3 = 1/1 = 1); decay 0.5
    #   M_2 = 1 everywhere; M_3[t] = 1 + 0.5^(3 - t) for t <= 3: [1.125, 1.25, 1.5, 2, 1]
    #   M = [1.0625, 1.125, 1.25, 1.5, 1];  A row 0 = [0.53125, 0.5625, 0, 0, 0.5]
    out, _ = run_tree(TREE_A, [[1] * T_A] * 4, scale_by_std=False, branch_strength_scaling=True,
                      branch_score=[0.0, 0.0, -1.0, 1.0], decay=0.5, backend=backend)
    assert_close(out["advantages"][0], [0.53125, 0.5625, 0, 0, 0.5], 1e-12, 1e-12)
    assert_close(out["multiplier"][0], [1.0625, 1.125, 1.25, 1.5, 1], 1e-12, 1e-12)
    # all branch scores <= 0: every w is 0, M = 1, same as no scaling
    out, _ = run_tree(TREE_A, [[1] * T_A] * 4, scale_by_std=False, branch_strength_scaling=True,
                      branch_score=[5.0, 5.0, -1.0, 0.0], decay=0.5, backend=backend)
    assert_close(out["advantages"][0], [0.5, 0.5, 0, 0, 0.5], 1e-12, 1e-12)
    assert_close(out["multiplier"][0], [1] * 5, 1e-12, 1e-12)


# ----------------------------------------------------------------------------------------------------------
# tree B: two groups, rows of different lengths, a tool span, branches listed after their parents
#   row  group parent split reward  length
#   0    0     -1     -     3       4       mask [1, 1, 0, 1]
#   1    0     -1     -     1       3
#   2    1     -1     -     0       4
#   3    1     -1     -     0       4
#   4    0     0      2     5       5
#   5    0     0      0     1       2
#   6    1     2      1     2       3
# A_hat (scale_by_std, eps 1e-6):
#   (0, initial) {3, 1}: mean 2, std 1 -> A0 = 1/(1+e), A1 = -1/(1+e)
#   (1, initial) {0, 0}: std 0         -> A2 = A3 = 0
#   (0, branch)  {5, 1}: mean 3, std 2 -> A4 = 2/(2+e), A5 = -2/(2+e)
#   (1, branch)  {2}                   -> A6 = 0
# Row 0: t = 0: C = {4 (s 2), 5 (s 0)}, mean (A4 + A5)/2 = 0 -> A0;  t = 1: C = {4} -> A0 + A4;
#        t = 2: tool output -> 0;  t = 3: C = {} -> A0
# Row 1: A1 everywhere.  Rows 2, 3: 0 (but loss mask True).  Branch rows: 0.
# train_branches: row 4 t = 3, 4 -> A4; row 5 t = 1 -> A5; row 6 t = 2 -> A6 = 0 (loss mask True).
# ----------------------------------------------------------------------------------------------------------

TREE_B = {"rewards": [3.0, 1.0, 0.0, 0.0, 5.0, 1.0, 2.0], "group_ids": [0, 0, 1, 1, 0, 0, 1],
              "parent": [-1, -1, -1, -1, 0, 0, 2], "split": [0, 0, 0, 0, 2, 0, 1]}
MASK_B = [[1, 1, 0, 1], [1, 1, 1], [1] * 4, [1] * 4, [1] * 5, [1] * 2, [1] * 3]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("train_branches", [False, True])
def test_tree_b(backend, layout, train_branches):
    A0, A1, A4, A5 = 1 / (1 + E), -1 / (1 + E), 2 / (2 + E), -2 / (2 + E)
    out, _ = run_tree(TREE_B, MASK_B, layout, train_branches=train_branches, num_groups=2, backend=backend)
    exp = [[A0, A0 + A4, 0, A0, 0], [A1] * 3 + [0, 0], [0] * 5, [0] * 5, [0] * 5, [0] * 5, [0] * 5]
    exp_lm = [[1, 1, 0, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0] * 5, [0] * 5, [0] * 5]
    if train_branches:
        exp[4] = [0, 0, 0, A4, A4]
        exp[5] = [0, A5, 0, 0, 0]
        exp_lm[4] = [0, 0, 0, 1, 1]
        exp_lm[5] = [0, 1, 0, 0, 0]
        exp_lm[6] = [0, 0, 1, 0, 0]
    assert_close(out["advantages"], exp, 1e-12, 1e-12)
    assert out["loss_mask"].tolist() == [[bool(v) for v in r] for r in exp_lm]
    assert_close(out["group_advantages"], [A0, A1, 0, 0, A4, A5, 0], 1e-12, 1e-12)


def test_hand_trees_agree_with_oracle():
    # the oracle reproduces the hand-worked answers (guards the oracle used by the random tests)
    ref = oracle.procedure_advantages(TREE_A["rewards"], TREE_A["group_ids"], TREE_A["parent"], TREE_A["split"],
                                      [[1] * 5] * 4, branch_score=[100, 100, 2.0, 1.0], scale_by_std=False,
                                      branch_strength_scaling=True, decay=0.5)
    assert ref["advantages"][0] == pytest.approx([0.640625, 0.78125, 0, 0, 0.5])
    assert ref["multiplier"][0] == pytest.approx([1.28125, 1.5625, 1.125, 1.25, 1])
    ref = oracle.procedure_advantages(TREE_B["rewards"], TREE_B["group_ids"], TREE_B["parent"], TREE_B["split"],
                                      MASK_B, train_branches=True)
    A0, A4 = 1 / (1 + E), 2 / (2 + E)
    assert ref["advantages"][0] == pytest.approx([A0, A0 + A4, 0, A0], abs=1e-12)
    assert ref["advantages"][4] == pytest.approx([0, 0, 0, A4, A4], abs=1e-12)


# ----------------------------------------------------------------------------------------------------------
# random trees vs the oracle
# ----------------------------------------------------------------------------------------------------------


def random_tree(gen, G=3, n_init=3, n_branch=4, T=12):
    """Random groups of initial rollouts and branches, rows shuffled (a branch may come before its parent)."""
    spec = []  # (group, parent_local or None, split, length)
    for g in range(G):
        init_ids = []
        for _ in range(n_init):
            L = int(torch.randint(3, T + 1, (1,), generator=gen))
            init_ids.append(len(spec))
            spec.append((g, None, 0, L))
        for _ in range(n_branch):
            p = init_ids[int(torch.randint(0, n_init, (1,), generator=gen))]
            Lp = spec[p][3]
            s = int(torch.randint(-1, Lp, (1,), generator=gen))      # -1: shares no token (a fork at t = 0)
            L = min(T, s + 1 + int(torch.randint(0, T, (1,), generator=gen)))
            spec.append((g, p, s, L))
    R = len(spec)
    perm = torch.randperm(R, generator=gen).tolist()  # new position of old row i is inv[i]
    inv = [0] * R
    for new, old in enumerate(perm):
        inv[old] = new
    group_ids, parent, split, lengths = [], [], [], []
    for new, old in enumerate(perm):
        g, p, s, L = spec[old]
        group_ids.append(g)
        parent.append(-1 if p is None else inv[p])
        split.append(s if p is not None else int(torch.randint(0, 50, (1,), generator=gen)))  # ignored
        lengths.append(L)
    rewards = torch.randn(R, generator=gen, dtype=torch.float64)
    rewards[torch.rand(R, generator=gen) < 0.3] = 1.0  # some equal rewards
    bscore = torch.randn(R, generator=gen, dtype=torch.float64)
    return group_ids, parent, split, lengths, rewards, bscore


OPTS = [
    {},
    {"scale_by_std": False},
    {"train_branches": True},
    {"branch_strength_scaling": True},
    {"branch_strength_scaling": True, "decay": 0.7, "train_branches": True, "scale_by_std": False},
]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("opts", OPTS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()) or "default")
def test_procedure_matches_oracle(backend, gen, layout, dtype, opts):
    group_ids, parent, split, lengths, rewards, bscore = random_tree(gen)
    T = max(lengths)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    m, cu = batch.args(layout, mask)
    kw = dict(opts)
    if kw.get("branch_strength_scaling"):
        kw["branch_score"] = bscore.to(dtype)
    res = ak.procedure_advantages(rewards.to(dtype), torch.tensor(group_ids), torch.tensor(parent),
                                  torch.tensor(split), m, cu_seqlens=cu, num_groups=3, backend=backend, **kw)
    ref_kw = dict(opts)
    ref = oracle.procedure_advantages(rows(rewards.to(dtype)), group_ids, parent, split, rows(mask),
                                      branch_score=rows(bscore.to(dtype)), **ref_kw)
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    assert res.advantages.dtype == out_dtype(dtype)
    assert_close(batch.to_padded(res.advantages, layout), ref["advantages"], atol, atol, "advantages")
    assert_close(batch.to_padded(res.multiplier, layout), ref["multiplier"], atol, atol, "multiplier")
    assert batch.to_padded(res.loss_mask, layout).tolist() == ref["loss_mask"]
    assert_close(res.group_advantages, ref["group_advantages"], atol, atol, "group_advantages")


def test_procedure_padded_equals_packed(backend, gen):
    group_ids, parent, split, lengths, rewards, bscore = random_tree(gen, G=2)
    T = max(lengths)
    batch = SeqBatch(lengths, T)
    mask = make_mask(gen, lengths, T)
    outs = {}
    for layout in LAYOUTS:
        m, cu = batch.args(layout, mask)
        r = ak.procedure_advantages(rewards.float(), torch.tensor(group_ids), torch.tensor(parent),
                                    torch.tensor(split), m, cu_seqlens=cu, branch_score=bscore.float(),
                                    branch_strength_scaling=True, train_branches=True, backend=backend)
        outs[layout] = [batch.to_padded(x, layout) for x in (r.advantages, r.loss_mask, r.multiplier)]
    torch.testing.assert_close(outs["packed"][0], outs["padded"][0])
    assert torch.equal(outs["packed"][1], outs["padded"][1])
    torch.testing.assert_close(outs["packed"][2], outs["padded"][2])


def test_procedure_mask_none(backend):
    # docs/api.md makes `mask` a required argument of procedure_advantages, while the shared conventions say
    # "None means all ones".  Either reading is acceptable: all ones (packed tree A), or a clear error naming
    # `mask`; anything else (a crash elsewhere, a wrong result) fails.
    cu = torch.tensor([0, 5, 10, 15, 20])
    args = (t64(TREE_A["rewards"]), torch.tensor(TREE_A["group_ids"]), torch.tensor(TREE_A["parent"]),
            torch.tensor(TREE_A["split"]))
    try:
        a = ak.procedure_advantages(*args, None, cu_seqlens=cu, scale_by_std=False, backend=backend)
    except (TypeError, ValueError) as e:
        assert "mask" in str(e)
        return
    assert_close(a.advantages, [0.5, 0.5, 0, 0, 0.5] + [-0.5] * 5 + [0] * 10, 1e-12, 1e-12)


def test_procedure_non_contiguous(backend, gen):
    group_ids, parent, split, lengths, rewards, bscore = random_tree(gen, G=2)
    T = max(lengths)
    mask = make_mask(gen, lengths, T)
    R = len(lengths)
    gid, par, spl = torch.tensor(group_ids), torch.tensor(parent), torch.tensor(split)
    kw = {"branch_score": bscore, "branch_strength_scaling": True, "train_branches": True, "backend": backend}
    a = ak.procedure_advantages(rewards, gid, par, spl, mask, **kw)
    nc = lambda x: torch.stack([x, x], dim=-1)[..., 0]
    b = ak.procedure_advantages(nc(rewards), nc(gid), nc(par), nc(spl), mask.t().contiguous().t(),
                                **dict(kw, branch_score=nc(bscore)))
    assert not nc(rewards).is_contiguous() and R > 1
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)
