"""Memory: token_stats forward + backward on [4096, 32000] fp32 must not hold a second [N, V] float tensor
beyond the gradient itself (method §1: save only per-row statistics, recompute p in backward).

Measured in a fresh subprocess with the peak resident set size (ru_maxrss): the baseline is taken after
creating and touching the logits and warming up on a tiny input; the growth through forward + backward must
stay below 1.5 * N * V * 4 bytes (the gradient is 1.0 of that).  A control in the same style runs the plain
eager torch approach (log_softmax + gather + entropy) and must exceed the threshold, proving the probe can
fail.  The same is done for linear_token_stats, whose growth must stay below 0.5 * N * V * 4 (it never
holds [N, V] at all; its gradients are [N, H] and [V, H]).
"""

import os
import subprocess
import sys

import pytest
import torch

from appo_kernels import backends

N, V, H = 4096, 32000, 64
NV4 = N * V * 4

SCRIPT = r"""
import resource, sys
import torch
torch.set_num_threads(2)
import appo_kernels as ak

mode, backend = sys.argv[1], sys.argv[2]
N, V, H = {N}, {V}, {H}

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

def eager(logits, tokens):
    lsm = torch.log_softmax(logits, dim=-1)
    logp = lsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    ent = -(lsm.exp() * lsm).sum(-1)
    return logp, ent

def run(inputs, tokens):
    if mode == "library":
        r = ak.token_stats(inputs[0], tokens, backend=backend)
        logp, ent = r.logp, r.entropy
    elif mode == "inplace":     # the gradient written over the logits (a view: inplace_backward refuses leaves)
        r = ak.token_stats(inputs[0].view_as(inputs[0]), tokens, inplace_backward=True, backend=backend)
        logp, ent = r.logp, r.entropy
    elif mode == "eager":
        logp, ent = eager(inputs[0], tokens)
    elif mode == "linear_library":
        r = ak.linear_token_stats(inputs[0], inputs[1], tokens, backend=backend)
        logp, ent = r.logp, r.entropy
    else:  # linear_eager: materialise the logits, then the eager statistics
        logp, ent = eager(inputs[0] @ inputs[1].t(), tokens)
    (logp.sum() + 0.5 * ent.sum()).backward()

g = torch.Generator().manual_seed(0)
linear = mode.startswith("linear")
# warm-up on a tiny input (first-call allocations, lazy imports, thread pools)
if linear:
    small = [torch.randn(8, H, requires_grad=True), torch.randn(64, H, requires_grad=True)]
else:
    small = [torch.randn(8, 64, requires_grad=True)]
run(small, torch.randint(0, 64, (8,)))

if linear:
    inputs = [torch.randn(N, H, generator=g).requires_grad_(), (torch.randn(V, H, generator=g) * 0.1).requires_grad_()]
else:
    inputs = [torch.randn(N, V, generator=g).requires_grad_()]
for x in inputs:
    x.data.mul_(1.0)  # touch every page
tokens = torch.randint(0, V, (N,), generator=g)
base = peak()
run(inputs, tokens)
growth = peak() - base
assert all(x.grad is not None for x in inputs)
print("GROWTH", growth)
"""


def skip_interpreted(backend):
    # Under TRITON_INTERPRET=1 the kernels run as numpy on the CPU: the resident set measures the interpreter,
    # not the compiled kernel (whose peak memory bench/run.py measures on a GPU).
    if backend == "triton":
        pytest.skip("the Triton interpreter's memory is not the kernel's; measured on GPU by bench/run.py")


def measure(mode, backend="torch"):
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(N=N, V=V, H=H), mode, backend],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("GROWTH")][-1]
    return int(line.split()[1])


@pytest.mark.slow
def test_token_stats_holds_no_second_nv_tensor(backend):
    skip_interpreted(backend)
    growth = measure("library", backend)
    assert growth < 1.5 * NV4, (
        f"token_stats fwd+bwd grew the peak RSS by {growth / 2**20:.0f} MiB; limit 1.5 * N*V*4 = "
        f"{1.5 * NV4 / 2**20:.0f} MiB (the gradient alone is {NV4 / 2**20:.0f} MiB)")


@pytest.mark.slow
def test_control_eager_torch_exceeds_threshold():
    growth = measure("eager")
    assert growth > 1.5 * NV4, (
        f"the probe cannot tell: eager log_softmax + entropy grew only {growth / 2**20:.0f} MiB")


@pytest.mark.slow
def test_linear_token_stats_never_holds_nv(backend):
    skip_interpreted(backend)
    if not backends.runs(backend, "linear_token_stats", torch.device("cpu"), torch.float32):
        pytest.skip(f"{backend} does not implement linear_token_stats")
    growth = measure("linear_library", backend)
    assert growth < 0.5 * NV4, (
        f"linear_token_stats fwd+bwd grew the peak RSS by {growth / 2**20:.0f} MiB; limit 0.5 * N*V*4 = "
        f"{0.5 * NV4 / 2**20:.0f} MiB")


@pytest.mark.slow
def test_control_linear_materialised_exceeds_threshold():
    growth = measure("linear_eager")
    assert growth > 0.5 * NV4, f"the probe cannot tell: materialised logits grew only {growth / 2**20:.0f} MiB"


@pytest.mark.slow
def test_inplace_backward_allocates_no_gradient_buffer():
    # the torch backend writes the gradient over the logits tile by tile: no [N, V] allocation at all
    growth = measure("inplace", "torch")
    assert growth < 0.5 * NV4, (
        f"token_stats with inplace_backward grew the peak RSS by {growth / 2**20:.0f} MiB; limit 0.5 * N*V*4 = "
        f"{0.5 * NV4 / 2**20:.0f} MiB")
