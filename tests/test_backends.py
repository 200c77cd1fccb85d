"""Backend selection: what "auto" picks, what an explicit backend refuses, and that native is really built."""
import shutil

import pytest
import torch

import appo_kernels as ak
from appo_kernels import backends


def test_native_is_built_where_a_compiler_exists():
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler on this machine: the native backend is optional")
    assert "native" in ak.available_backends(), "setup.py should have built appo_kernels._C"


def test_auto_prefers_native_on_cpu_and_falls_back_by_dtype():
    if "native" not in ak.available_backends():
        pytest.skip("native backend not built")
    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, "token_stats", torch.float32).NAME == "native"
    assert backends.resolve("auto", cpu, "token_stats", torch.float64).NAME == "torch"
    assert backends.resolve("auto", cpu, "linear_token_stats", torch.float32).NAME == "torch"


@pytest.mark.parametrize("call", [
    lambda: ak.token_stats(torch.randn(3, 5, dtype=torch.float64), torch.zeros(3, dtype=torch.long),
                           backend="native"),
    lambda: ak.linear_token_stats(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                  backend="native"),
], ids=["float64-logits", "linear"])
def test_explicit_native_refuses_what_it_does_not_run(call):
    if "native" not in ak.available_backends():
        pytest.skip("native backend not built")
    with pytest.raises(ValueError, match="backend: 'native' does not run"):
        call()


def test_auto_results_equal_torch_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 1001, generator=g) * 4
    tokens = torch.randint(0, 1001, (37,), generator=g)
    auto = ak.token_stats(logits, tokens, topk=4)
    ref = ak.token_stats(logits, tokens, topk=4, backend="torch")
    for name in ("logp", "entropy", "lse", "topk_logp"):
        torch.testing.assert_close(getattr(auto, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
    assert torch.equal(auto.topk_ids, ref.topk_ids)


def test_every_backend_implements_the_written_interface():
    """Each backend defines every primitive it runs somewhere, with the parameters of backends.Backend."""
    import inspect

    from appo_kernels.backends import _interface, native, torch_ref, triton_backend
    protocol = {name: inspect.signature(fn) for name, fn in vars(_interface.Backend).items()
                if inspect.isfunction(fn)}
    primitives = {"token_stats": ("token_stats_forward", "token_stats_backward"),
                  "linear_token_stats": ("linear_token_stats_forward", "linear_token_stats_backward"),
                  "reverse_discounted_scan": ("reverse_discounted_scan",),
                  "branching_score": ("branching_score",)}
    devices = (torch.device("cpu"), torch.device("cuda"))
    for module in (native, triton_backend, torch_ref):
        for name in ("available", "unavailable_reason", "unsupported"):
            assert callable(getattr(module, name)), (module.NAME, name)
        runs = {op for op in _interface.OPS for d in devices if module.unsupported(op, d) is None}
        if module is triton_backend and not triton_backend.installed():
            continue
        for op in runs:
            for fn_name in primitives[op]:
                want = [p for p in protocol[fn_name].parameters if p != "self"]
                got = list(inspect.signature(getattr(module, fn_name)).parameters)
                assert got[:len(want)] == want, (module.NAME, fn_name, got, want)
