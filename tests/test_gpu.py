"""The compiled GPU kernels (native CUDA and Triton) against the torch reference, on a GPU (skipped without one).

Run on a GPU machine after building the CUDA module (`APPO_KERNELS_BUILD_CUDA=1 pip install -e .`), e.g. by
`bash bench/gpu_check.sh`. Sizes include a real vocabulary; the torch backend runs on the same GPU. These are
correctness tests only: the timings, bandwidth and peak memory at real sizes are the benchmark harness's
(`python bench/run.py --device cuda`, run by the same script).
"""
import pytest
import torch

import appo_kernels as ak
from appo_kernels import backends

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")


@pytest.fixture(params=["native", "triton"])
def gpu_backend(request):
    """The compiled GPU backends; on a GPU machine both must be there (CUDA module built, triton installed)."""
    if not backends.runs(request.param, "token_stats", CUDA, torch.float32):
        pytest.fail(f"a CUDA device is present but backend {request.param!r} cannot run on it (build the CUDA "
                    "module with APPO_KERNELS_BUILD_CUDA=1 pip install -e ., and install triton)")
    return request.param


TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1e-4, rtol=1e-4),
       torch.float16: dict(atol=1e-4, rtol=1e-4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n, vocab", [(1, 151936), (7, 32000), (263, 1001), (4096, 32000)])
@pytest.mark.parametrize("topk, entropy", [(0, "exact"), (10, "exact"), (10, "topk"), (64, "topk")])
def test_token_stats_cuda_matches_torch(gpu_backend, dtype, n, vocab, topk, entropy):
    g = torch.Generator(device=CUDA).manual_seed(n * 7 + vocab)
    logits = (torch.randn(n, vocab, device=CUDA, generator=g) * 3).to(dtype)
    logits[:, ::97] = float("-inf")
    tokens = torch.randint(0, vocab, (n,), device=CUDA, generator=g)
    tokens[tokens % 97 == 0] += 1
    tokens[::5] = -100
    x_ref = logits.clone().requires_grad_()
    x_cuda = logits.clone().requires_grad_()
    ref = ak.token_stats(x_ref, tokens, topk=topk, entropy=entropy, temperature=0.8, backend="torch")
    out = ak.token_stats(x_cuda, tokens, topk=topk, entropy=entropy, temperature=0.8, backend=gpu_backend)
    for name in ("logp", "entropy", "lse", "topk_logp"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **TOL[dtype], msg=name)
    # ids may differ only where low-precision logits tie: compare the log-probs the ids select instead
    kept = tokens != -100
    selected = (logits.float() / 0.8).log_softmax(-1).gather(1, out.topk_ids)
    torch.testing.assert_close(selected[kept], ref.topk_logp[kept], **TOL[dtype])
    (ref.logp.sum() + 0.5 * ref.entropy.sum()).backward()
    (out.logp.sum() + 0.5 * out.entropy.sum()).backward()
    torch.testing.assert_close(x_cuda.grad.float(), x_ref.grad.float(), atol=2e-2 if dtype != torch.float32 else 1e-5,
                               rtol=2e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("lengths", [[8192] * 16, [1, 0, 5000, 300, 8192, 17]])
def test_sequence_ops_cuda_match_torch(gpu_backend, lengths):
    g = torch.Generator(device=CUDA).manual_seed(len(lengths))
    n = sum(lengths)
    cu = torch.tensor([0] + lengths, device=CUDA).cumsum(0)
    logp = torch.randn(n, device=CUDA, generator=g) * 0.3 - 1
    logp_old = logp + torch.randn(n, device=CUDA, generator=g) * 0.05
    entropy = torch.rand(n, device=CUDA, generator=g) * 4
    mask = torch.rand(n, device=CUDA, generator=g) > 0.2
    for gamma in (1.0, 0.995):
        a = ak.future_values(logp, logp_old, mask, cu_seqlens=cu, gamma=gamma, backend=gpu_backend)
        b = ak.future_values(logp, logp_old, mask, cu_seqlens=cu, gamma=gamma, backend="torch")
        torch.testing.assert_close(a.gain, b.gain, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.omega, b.omega, atol=1e-5, rtol=1e-5)
    a = ak.score_tokens(entropy, logp, logp_old, mask, cu_seqlens=cu, backend=gpu_backend)
    b = ak.score_tokens(entropy, logp, logp_old, mask, cu_seqlens=cu, backend="torch")
    torch.testing.assert_close(a.score, b.score, atol=1e-4, rtol=1e-4)
    clear = b.score.abs() > 1e-3  # candidates may differ only where a z-score is ~0
    assert torch.equal(a.candidate[clear], b.candidate[clear])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_token_stats_triton_cuda_matches_torch(dtype):
    if not backends.runs("triton", "linear_token_stats", CUDA, dtype):
        pytest.fail("a CUDA device is present but the triton backend cannot run linear_token_stats on it")
    g = torch.Generator(device=CUDA).manual_seed(3)
    n, h, v = 777, 512, 32000
    hidden = (torch.randn(n, h, device=CUDA, generator=g)).to(dtype)
    weight = (torch.randn(v, h, device=CUDA, generator=g) * 0.05).to(dtype)
    bias = (torch.randn(v, device=CUDA, generator=g) * 0.1).to(dtype)
    tokens = torch.randint(0, v, (n,), device=CUDA, generator=g)
    tokens[::7] = -100
    grads = {}
    for backend in ("torch", "triton"):
        params = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        st = ak.linear_token_stats(params[0], params[1], tokens, bias=params[2], topk=5, backend=backend)
        (st.logp.sum() + 0.5 * st.entropy.sum()).backward()
        grads[backend] = (st, [p.grad.float() for p in params])
    (ref, ref_g), (out, out_g) = grads["torch"], grads["triton"]
    tol = dict(atol=2e-3, rtol=2e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for name in ("logp", "entropy", "lse"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), **tol, msg=name)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, atol=tol["atol"] * b.abs().max().item(), rtol=tol["rtol"])


def test_token_stats_inplace_backward_cuda(gpu_backend):
    g = torch.Generator(device=CUDA).manual_seed(3)
    logits = (torch.randn(512, 151936, device=CUDA, generator=g) * 3).to(torch.bfloat16)
    tokens = torch.randint(0, 151936, (512,), device=CUDA, generator=g)
    results = []
    for inplace in (False, True):
        x = logits.clone().requires_grad_()
        st = ak.token_stats(x.view_as(x), tokens, inplace_backward=inplace, backend=gpu_backend)
        loss = st.logp.sum() + 0.5 * st.entropy.sum()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss.backward()
        torch.cuda.synchronize()
        results.append((x.grad.clone(), torch.cuda.max_memory_allocated() - base))
    (ref, peak_ref), (got, peak_inplace) = results
    assert torch.equal(got, ref)
    if gpu_backend == "triton":     # the gradient reuses the logits' memory: no [N, V] buffer in the backward
        assert peak_inplace < peak_ref - logits.numel() * logits.element_size() // 2, (peak_inplace, peak_ref)
