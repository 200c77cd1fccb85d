"""linear_token_stats (docs/api.md `linear_token_stats`): token_stats of hidden @ weight.T + bias, computed
in chunks.  Values vs the float64 oracle, chunking, layouts, gradients w.r.t. hidden, weight and bias."""

import oracle
import pytest
import torch
from helpers import FLOAT_DTYPES, LOW_DTYPES, assert_close, f64, out_dtype

import appo_kernels as ak


def make_inputs(gen, N, H, V, dtype, bias=True):
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) * (2.0 / H ** 0.5)).to(dtype)
    b = (torch.randn(V, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    return hidden, weight, b


def make_tokens(gen, N, V, ignore=()):
    tokens = torch.randint(0, V, (N,), generator=gen)
    tokens[0] = 0
    tokens[-1] = V - 1
    for i in ignore:
        tokens[i] = -100
    return tokens


def lin_tol(dtype):
    # the logits themselves are a matmul of low-precision inputs; a kernel may round them to the input
    # dtype before the statistics (as a bf16 GEMM does), so the tolerance follows that dtype's precision
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.float16: (5e-3, 5e-3),
            torch.bfloat16: (3e-2, 3e-2)}[dtype]


def oracle_stats(hidden, weight, bias, tokens, **kw):
    H = hidden.shape[-1]
    logits = oracle.linear_logits(f64(hidden.reshape(-1, H)), f64(weight), None if bias is None else f64(bias))
    return oracle.token_stats(logits, tokens.reshape(-1).tolist(), **kw)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode,k,tau", [("exact", 0, 1.0), ("exact", 3, 0.8), ("topk", 4, 1.0)])
def test_matches_oracle(backend, gen, dtype, bias, mode, k, tau):
    N, H, V = 19, 16, 97
    hidden, weight, b = make_inputs(gen, N, H, V, dtype, bias)
    tokens = make_tokens(gen, N, V, ignore=(4,))
    res = ak.linear_token_stats(hidden, weight, tokens, bias=b, temperature=tau, topk=k, entropy=mode,
                                backend=backend)
    ref = oracle_stats(hidden, weight, b, tokens, temperature=tau, topk=k, entropy=mode)
    atol, rtol = lin_tol(dtype)
    for name in ("logp", "entropy", "lse"):
        out = getattr(res, name)
        assert out.dtype == out_dtype(dtype) and out.shape == (N,)
        assert_close(out, ref[name], atol, rtol, name)
    assert res.topk_ids.shape == (N, k) and res.topk_ids.dtype == torch.int64
    if k and dtype in (torch.float32, torch.float64):
        # low-precision logits may legitimately reorder near-ties, so ids are compared where exact
        assert res.topk_ids.tolist() == ref["topk_ids"]
    if k:
        assert_close(res.topk_logp, ref["topk_logp"], atol, rtol, "topk_logp")


# chunk_size is a (rows, vocabulary) pair; sizes that divide neither N nor V exercise the ragged tails
@pytest.mark.parametrize("chunk_size", [(1, 1), (7, 13), (64, 64), (5, 1000)])
def test_chunking_does_not_change_results(backend, gen, chunk_size):
    N, H, V = 23, 8, 101
    hidden, weight, b = make_inputs(gen, N, H, V, torch.float64)
    tokens = make_tokens(gen, N, V, ignore=(2,))
    res = ak.linear_token_stats(hidden, weight, tokens, bias=b, topk=3, chunk_size=chunk_size, backend=backend)
    logits = hidden @ weight.t() + b
    ref = ak.token_stats(logits, tokens, topk=3, backend=backend)
    for name in ("logp", "entropy", "lse", "topk_logp"):
        torch.testing.assert_close(getattr(res, name), getattr(ref, name), atol=1e-10, rtol=1e-10)
    assert torch.equal(res.topk_ids, ref.topk_ids)


def test_3d_hidden_and_non_contiguous(backend, gen):
    B, T, H, V = 2, 5, 6, 41
    hidden, weight, b = make_inputs(gen, B * T, H, V, torch.float32)
    hidden3 = hidden.reshape(T, B, H).transpose(0, 1)  # [B, T, H], non-contiguous
    weight_nc = weight.t().contiguous().t()  # [V, H] with transposed strides
    assert not hidden3.is_contiguous() and not weight_nc.is_contiguous()
    tokens = torch.randint(0, V, (B, T), generator=gen)
    res = ak.linear_token_stats(hidden3, weight_nc, tokens, bias=b, topk=2, backend=backend)
    assert res.logp.shape == (B, T) and res.topk_ids.shape == (B, T, 2)
    ref = oracle_stats(hidden3, weight, b, tokens, topk=2)
    assert_close(res.logp, ref["logp"], 2e-5, 2e-5)
    assert_close(res.entropy, ref["entropy"], 2e-5, 2e-5)
    assert res.topk_ids.reshape(-1, 2).tolist() == ref["topk_ids"]


def test_empty_rows(backend, gen):
    hidden = torch.zeros(0, 4, requires_grad=True)
    weight = torch.randn(9, 4, generator=gen, requires_grad=True)
    res = ak.linear_token_stats(hidden, weight, torch.zeros(0, dtype=torch.int64), topk=2, backend=backend)
    assert res.logp.shape == (0,) and res.topk_ids.shape == (0, 2)
    (res.logp.sum() + res.entropy.sum()).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


# ----------------------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["logp", "entropy", "both"])
@pytest.mark.parametrize("mode,k", [("exact", 0), ("topk", 3)])
@pytest.mark.parametrize("tau,ignore", [(1.0, ()), (0.7, (1, 3))], ids=["plain", "tau-ignored"])
def test_gradcheck(backend, gen, target, mode, k, tau, ignore):
    N, H, V = 5, 4, 7
    hidden, weight, b = make_inputs(gen, N, H, V, torch.float64)
    hidden.requires_grad_()
    weight.requires_grad_()
    b.requires_grad_()
    tokens = make_tokens(gen, N, V, ignore=ignore)
    w1 = torch.randn(N, generator=gen, dtype=torch.float64)
    w2 = torch.randn(N, generator=gen, dtype=torch.float64)

    def fn(h, w, bb):
        r = ak.linear_token_stats(h, w, tokens, bias=bb, temperature=tau, topk=k, entropy=mode,
                                  chunk_size=(2, 3), backend=backend)
        if target == "logp":
            return r.logp
        if target == "entropy":
            return r.entropy
        return (r.logp * w1 + r.entropy * w2).sum()

    assert torch.autograd.gradcheck(fn, (hidden, weight, b), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_no_bias(backend, gen):
    N, H, V = 4, 3, 6
    hidden, weight, _ = make_inputs(gen, N, H, V, torch.float64, bias=False)
    hidden.requires_grad_()
    weight.requires_grad_()
    tokens = make_tokens(gen, N, V)

    def fn(h, w):
        r = ak.linear_token_stats(h, w, tokens, backend=backend)
        return r.logp, r.entropy

    assert torch.autograd.gradcheck(fn, (hidden, weight), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("mode,k", [("exact", 0), ("topk", 3)])
def test_grad_vs_torch_reference(backend, gen, dtype, mode, k):
    from test_token_stats import torch_reference

    N, H, V = 12, 16, 67
    hidden, weight, b = make_inputs(gen, N, H, V, dtype)
    tokens = make_tokens(gen, N, V, ignore=(6,))
    w1 = torch.randn(N, generator=gen)
    w2 = torch.randn(N, generator=gen)
    tau = 0.9

    h, w, bb = (x.clone().requires_grad_() for x in (hidden, weight, b))
    r = ak.linear_token_stats(h, w, tokens, bias=bb, temperature=tau, topk=k, entropy=mode, chunk_size=(5, 16),
                              backend=backend)
    (r.logp * w1 + r.entropy * w2).sum().backward()

    h64, w64, b64 = (x.to(torch.float64).requires_grad_() for x in (hidden, weight, b))
    lp, ent = torch_reference(h64 @ w64.t() + b64, tokens, tau, k, mode)
    (lp * w1.double() + ent * w2.double()).sum().backward()

    atol, rtol = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-2, 2e-2), torch.bfloat16: (6e-2, 6e-2)}[dtype]
    for name, got, exp in (("hidden", h.grad, h64.grad), ("weight", w.grad, w64.grad), ("bias", bb.grad, b64.grad)):
        assert got.dtype == dtype and got.shape == exp.shape, name
        assert_close(got, exp, atol, rtol, f"grad {name}")
    assert h.grad[6].abs().max().item() == 0  # ignored row: no gradient into its hidden state
