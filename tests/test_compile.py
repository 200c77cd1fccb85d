"""torch.compile(fullgraph=True) over the public ops: every kernel is a torch.library custom op with a fake
implementation, so the whole APPO step traces as one graph (no graph breaks) and gives the eager results."""
import pytest
import torch

import appo_kernels as ak


def appo_step(logits, tokens, logp_old, mask, group_ids, rewards, parent, split, tree_mask, backend):
    scores = ak.branching_score(logits, tokens, logp_old, mask, topk=2, backend=backend)
    adv = ak.procedure_advantages(rewards, group_ids, parent, split, tree_mask, num_groups=2,
                                  branch_score=scores.score.amax(dim=1).clamp(min=0).repeat(2),
                                  branch_strength_scaling=True, backend=backend)
    st = ak.token_stats(logits.repeat(2, 1, 1), tokens.repeat(2, 1), backend=backend)
    fkl = ak.future_kl_weights(st.logp.detach(), logp_old.repeat(2, 1), adv.advantages, adv.loss_mask,
                               backend=backend)
    out = ak.policy_loss(st.logp, logp_old.repeat(2, 1), fkl.advantages, adv.loss_mask)
    return scores.score, scores.candidate, adv.advantages, out.loss


def _inputs():
    g = torch.Generator().manual_seed(0)
    b, t, v = 4, 12, 33
    logits = torch.randn(b, t, v, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    logp_old = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1) - 0.05 * torch.rand(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    group_ids = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    parent = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3])
    split = torch.tensor([0, 0, 0, 0, 3, 5, 2, 7])
    rewards = torch.rand(8, generator=g)
    return logits, tokens, logp_old, mask, group_ids, rewards, parent, split, mask.repeat(2, 1)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_appo_step_compiles_fullgraph_and_matches_eager(backend):
    torch._dynamo.reset()
    args = _inputs()
    eager = appo_step(*args, backend)
    compiled = torch.compile(appo_step, fullgraph=True)(*args, backend)
    for a, b in zip(eager, compiled):
        if a.dtype == torch.bool:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_inplace_backward_compiles_and_matches_eager(backend):
    torch._dynamo.reset()

    def loss(x, tokens):
        st = ak.token_stats(x * 2, tokens, topk=2, inplace_backward=True, backend=backend)
        return (st.logp + 0.5 * st.entropy).sum()

    g = torch.Generator().manual_seed(2)
    x, tokens = torch.randn(3, 5, 33, generator=g, requires_grad=True), torch.randint(0, 33, (3, 5), generator=g)
    loss(x, tokens).backward()
    eager, x.grad = x.grad, None
    torch.compile(loss, fullgraph=True)(x, tokens).backward()
    torch.testing.assert_close(x.grad, eager, atol=1e-6, rtol=1e-6)


def test_fake_tensors_give_shapes_without_running_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        logits = torch.empty(5, 7, 40)
        tokens = torch.zeros(5, 7, dtype=torch.long)
        st = ak.token_stats(logits, tokens, topk=3)
        fv = ak.future_values(torch.empty(5, 7), torch.empty(5, 7))
    assert st.topk_ids.shape == (5, 7, 3) and st.logp.dtype == torch.float32
    assert fv.omega.shape == (5, 7)


def _op_cases(backend):
    from appo_kernels import backends
    from appo_kernels.backends._interface import empty_row_stats
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 50, generator=g)
    tokens = torch.randint(0, 50, (6,), generator=g)
    tokens[2] = -100
    cu = torch.tensor([0, 5, 5, 30, 41])
    x = torch.randn(41, generator=g)
    ops = torch.ops.appo_kernels
    cpu = torch.device("cpu")
    cases = []
    if backends.runs(backend, "token_stats", cpu, torch.float32):
        for entropy_topk in (False, True):
            fwd = (logits, tokens, 0.7, 3, -100, entropy_topk, backend)
            st = empty_row_stats(6, 3, entropy_topk, logits)
            ops.token_stats_fwd_out(*fwd, *st)
            cases.append((ops.token_stats_fwd_out, (*fwd, *empty_row_stats(6, 3, entropy_topk, logits))))
            bwd = (tokens, st.lse, st.entropy, st.topk_set, st.c, torch.randn(6, generator=g),
                   torch.randn(6, generator=g), 0.7, -100, entropy_topk, backend)
            cases.append((ops.token_stats_bwd_out, (logits, *bwd, torch.empty_like(logits))))
            cases.append((ops.token_stats_bwd_inplace, (logits.clone(), *bwd)))
    if backends.runs(backend, "reverse_discounted_scan", cpu, torch.float32):
        cases.append((ops.reverse_scan_out, (x, cu, 0.9, backend, torch.empty_like(x))))
    if backends.runs(backend, "branching_score", cpu, torch.float32):
        eligible = torch.rand(41, generator=g) > 0.3
        for omega in (x.exp(), None):
            cases.append((ops.branching_score_out, (x.abs(), omega, eligible, cu, backend, torch.empty_like(x),
                                                    torch.zeros(41, dtype=torch.bool))))
    if backends.runs(backend, "linear_token_stats", cpu, torch.float32):
        h, w, b = torch.randn(6, 8, generator=g), torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
        fwd = (h, w, b, tokens, 1.0, 2, -100, False, [4, 16], backend)
        st = empty_row_stats(6, 2, False, h)
        ops.linear_token_stats_fwd_out(*fwd, *st)
        cases.append((ops.linear_token_stats_fwd_out, (*fwd, *empty_row_stats(6, 2, False, h))))
        bwd = (h, w, b, tokens, st.lse, st.entropy, st.topk_set, st.c, torch.randn(6, generator=g),
               torch.randn(6, generator=g), 1.0, -100, False, [4, 16], backend)
        cases.append((ops.linear_token_stats_bwd_out, (*bwd, torch.empty_like(h), torch.empty_like(w),
                                                       torch.empty_like(b))))
    return cases


def test_custom_ops_pass_opcheck(backend):
    # schema, fake implementation vs real outputs (shapes, dtypes, strides), and tracing, for each op
    cases = _op_cases(backend)
    assert cases
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
