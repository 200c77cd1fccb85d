"""Contenders, inputs, timing and checks shared by the harness (bench/run.py) and the pytest-benchmark files.

Contenders:
- ours      `appo_kernels` public API, one per backend in `timed_backends()`.
- eager     plain torch as a user would write it (log_softmax -> gather, -(p * logp).sum, torch.topk).
- compiled  `torch.compile` of that same eager function (compiled once, outside any timing).
- read      `x.sum()` of the same tensor: the cost of reading the logits once (the memory floor).
- dense     the authors' O(T^2) approach for the sequence ops: per rollout, an upper-triangular [T, T] decay
            matrix U[t, k] = gamma^(k - t) times the per-token vector, in a Python loop over rollouts.

Every eager reference here is written from docs/method.md / docs/api.md independently of appo_kernels' code.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import appo_kernels as ak

def timed_backends() -> List[str]:
    """The available backends worth timing: the Triton interpreter (TRITON_INTERPRET=1, how the tests run Triton
    on a CPU) is a test tool whose times mean nothing, and tests/ checks its results against the oracle."""
    from appo_kernels.backends.triton_kernels import interpreting
    return [b for b in ak.available_backends() if not (b == "triton" and interpreting())]


# ----------------------------------------------------------------------------------------------------------
# machine / versions
# ----------------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> str:
    """1/5/15-minute load averages: anything else running on the machine makes every timing noisier."""
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


PRIME_BYTES = 30 << 20


def prime_allocator() -> str:
    """Allocate, touch and free one 30 MiB block, once, before any timing; returns a line for the report.

    glibc's malloc serves blocks above its mmap threshold (128 KiB at start) with fresh mmap pages, which are
    page-faulted and zeroed on every use, and raises the threshold (up to 32 MiB) the first time such a block
    is freed. So the same op can run 2-3x faster or slower depending on what the process freed before: the
    torch reference backend's few-MiB temporaries measured 4.2 ms vs 1.7 ms (future_values, B=16, T=1024) in
    a fresh process vs after one 30 MiB free. Priming puts every run in the state of a long-running trainer
    (which has long since freed large buffers), whatever order the cases run in.
    """
    x = torch.empty(PRIME_BYTES // 4, dtype=torch.float32)
    x.fill_(1.0)
    del x
    return (f"- allocator: one {PRIME_BYTES >> 20} MiB block allocated and freed before timing (raises glibc's "
            "mmap threshold as in a long-running process; see bench/README.md)")


class OtherLoad:
    """CPU time used by *other* processes while a block runs, in average busy cores.

    From /proc/stat (all CPUs' busy time) minus this process's own CPU time. On a small machine a second
    process competing for the cores wrecks torch's multi-threaded ops (threads wait on a descheduled peer), so
    every case records this next to its timings; a value near 0 means the timings are clean.
    """

    @staticmethod
    def _busy() -> float:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)    # idle + iowait
        guest = sum(vals[8:10]) if len(vals) > 9 else 0       # already counted in user / nice
        return (sum(vals) - idle - guest) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        others = (self._busy() - self.busy0) - (self._own() - self.own0)
        self.cores = max(0.0, others) / self.wall if self.wall > 0 else float("nan")
        return False


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> Tuple[str, bool]:
    """(HEAD's commit, whether tracked files differ from it); ("unknown", False) outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return head, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def machine(device: torch.device) -> Dict[str, object]:
    """The machine, versions and commit: the fields every data row carries."""
    commit, dirty = git_commit()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "liger_kernel": _version("liger-kernel"),
        "appo_kernels": ak.__version__,
        "backends": ak.available_backends(),
        "platform": platform.platform(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


# ----------------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------------


CPU = torch.device("cpu")
_L2_FLUSH: Dict[torch.device, torch.Tensor] = {}


def time_once(fn: Callable[[], object], device: torch.device = CPU) -> float:
    """Seconds of one call: perf_counter on CPU; on CUDA, events around the call after overwriting a 256 MiB
    buffer (so a small input is not served from the last call's L2 cache, as triton.testing.do_bench does)."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 << 20, dtype=torch.int8, device=device)
    _L2_FLUSH[device].zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def measure(contenders: Sequence[Tuple[str, Callable[[], object], int]], warmup: int = 1,
            device: torch.device = CPU) -> Dict[str, List[float]]:
    """Time each (name, fn, repeats) `repeats` times after `warmup` untimed calls.

    Repeats are interleaved round-robin (a, b, c, a, b, c, ...) so that slow drifts of a noisy machine
    (frequency, other tenants) hit every contender alike, and the i-th repeats of two contenders ran side by
    side (the renderer's ratios pair them). Returns name -> list of seconds.
    """
    for _, fn, _ in contenders:
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name, _, _ in contenders}
    for rep in range(max(r for _, _, r in contenders)):
        for name, fn, reps in contenders:
            if rep < reps:
                times[name].append(time_once(fn, device))
    return times


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak device memory of one call of fn() above what was allocated before it, in MiB (CUDA only)."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


# ----------------------------------------------------------------------------------------------------------
# token_stats contenders
# ----------------------------------------------------------------------------------------------------------


def make_logits(n: int, v: int, dtype: torch.dtype, seed: int = 0,
                device: torch.device = CPU) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logits [n, v] with a realistic spread (std 3, so the softmax is peaked but not one-hot) and tokens
    sampled from that softmax (so logp is not uniformly tiny), generated on `device`."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = (3.0 * torch.randn(n, v, generator=g, device=device)).to(dtype)
    probs = torch.softmax(x.float(), dim=-1)
    tokens = torch.multinomial(probs, 1, generator=g).squeeze(1)
    return x, tokens


def eager_token_stats(logits: torch.Tensor, tokens: torch.Tensor, k: int = 0, temperature: float = 1.0):
    """token_stats as a user writes it in plain torch: (logp, entropy, topk_ids, topk_logp), fp32."""
    s = logits.float()
    if temperature != 1.0:
        s = s / temperature
    lp = torch.log_softmax(s, dim=-1)
    logp = lp.gather(-1, tokens[:, None]).squeeze(-1)
    entropy = -(lp.exp() * lp).sum(-1)
    if k:
        topk_logp, topk_ids = torch.topk(lp, k, dim=-1)
    else:
        topk_logp, topk_ids = lp.new_empty(lp.shape[0], 0), tokens.new_empty(lp.shape[0], 0)
    return logp, entropy, topk_ids, topk_logp


def ours_token_stats(logits, tokens, k: int = 0, temperature: float = 1.0, backend: str = "torch"):
    st = ak.token_stats(logits, tokens, temperature=temperature, topk=k, backend=backend)
    return st.logp, st.entropy, st.topk_ids, st.topk_logp


def fwd_bwd(stats_fn: Callable, logits: torch.Tensor, tokens: torch.Tensor, k: int = 0) -> torch.Tensor:
    """Forward + backward of logp.sum() + entropy.sum() w.r.t. the (leaf, requires_grad) logits; returns
    the gradient."""
    logits.grad = None
    logp, entropy, _, _ = stats_fn(logits, tokens, k)
    (logp.sum() + entropy.sum()).backward()
    return logits.grad


def read_floor(x: torch.Tensor):
    return x.sum()


def read_write_floor(x: torch.Tensor):
    """Read the logits once (x.sum(), the forward) then read them again and write a same-size tensor
    (x.clone(), the backward that writes d logits): the least memory traffic of a recomputing fwd + bwd."""
    x = x.detach()
    return x.sum(), x.clone()


def compile_fn(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def check_token_stats(got, ref, logits: torch.Tensor, k: int, what: str,
                      log_probs: Optional[torch.Tensor] = None) -> None:
    """Compare (logp, entropy, topk_ids, topk_logp) with the eager reference `ref`.

    Top-k ids are compared through the log-probs they pick (bf16 logits have ties, which torch.topk may
    order either way); the top-k log-probs themselves must match. `log_probs`: log_softmax of the logits in
    fp32, when the caller has it already.
    """
    logp, ent, ids, top_lp = got
    r_logp, r_ent, _, r_top_lp = ref
    close = dict(atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(logp.float(), r_logp.float(), **close, msg=lambda m: f"{what} logp: {m}")
    torch.testing.assert_close(ent.float(), r_ent.float(), **close, msg=lambda m: f"{what} entropy: {m}")
    assert ids.shape == r_top_lp.shape == top_lp.shape, f"{what}: top-k shapes {ids.shape} {r_top_lp.shape}"
    if k:
        torch.testing.assert_close(top_lp.float(), r_top_lp.float(), **close,
                                   msg=lambda m: f"{what} topk_logp: {m}")
        lp = log_probs if log_probs is not None else torch.log_softmax(logits.detach().float(), -1)
        picked = lp.gather(-1, ids.long())
        torch.testing.assert_close(picked, r_top_lp.float(), **close, msg=lambda m: f"{what} topk_ids: {m}")


def check_grad(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert got is not None and got.shape == ref.shape and got.dtype == ref.dtype, f"{what}: grad {got}"
    tol = dict(atol=1e-5, rtol=1e-4) if got.dtype == torch.float32 else dict(atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(got.float(), ref.float(), **tol, msg=lambda m: f"{what} grad: {m}")


# ----------------------------------------------------------------------------------------------------------
# sequence-op inputs
# ----------------------------------------------------------------------------------------------------------


def make_seq_batch(B: int, T: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A padded [B, T] batch: varied lengths (rollout 0 full), a tool-output span (mask 0) inside each rollout,
    logp of sampled tokens, logp_old / logp_ref close to it, entropies, advantages, eligibility."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g)
    lengths[0] = T
    t = torch.arange(T)
    mask = t[None, :] < lengths[:, None]
    start = (torch.rand(B, generator=g) * lengths * 0.6).long()
    span = (torch.rand(B, generator=g) * 0.1 * T).long() + 1
    mask &= ~((t[None, :] >= start[:, None]) & (t[None, :] < (start + span)[:, None]))
    logp = -torch.rand(B, T, generator=g).pow(3) * 4.0
    logp_old = logp + 0.05 * torch.randn(B, T, generator=g)
    logp_ref = logp + 0.1 * torch.randn(B, T, generator=g)
    entropy = torch.rand(B, T, generator=g) * 3.0
    advantages = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    eligible = torch.rand(B, T, generator=g) < 0.9
    return dict(mask=mask, logp=logp, logp_old=logp_old, logp_ref=logp_ref, entropy=entropy,
                advantages=advantages, eligible=eligible, lengths=lengths)


def make_tree(B: int, T: int, lengths: torch.Tensor, group_size: int = 8, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Rollout trees for procedure_advantages: groups of `group_size` rows, the first half initial rollouts and
    the second half branches forked from a random initial rollout of the group at a split inside it."""
    assert B % group_size == 0 and group_size >= 2
    g = torch.Generator().manual_seed(seed + 1)
    group_ids = torch.arange(B) // group_size
    half = group_size // 2
    parent = torch.full((B,), -1, dtype=torch.int64)
    split = torch.zeros(B, dtype=torch.int64)
    for i in range(B):
        if i % group_size >= half:
            p = (i // group_size) * group_size + int(torch.randint(0, half, (1,), generator=g))
            parent[i] = p
            split[i] = int(torch.randint(0, int(lengths[p]), (1,), generator=g))
    rewards = torch.rand(B, generator=g).round()
    branch_score = torch.randn(B, generator=g)
    return dict(rewards=rewards, group_ids=group_ids, parent=parent, split=split, branch_score=branch_score,
                num_groups=B // group_size)


# ----------------------------------------------------------------------------------------------------------
# the authors' dense approach (O(T^2) matrix, Python loop over rollouts)
# ----------------------------------------------------------------------------------------------------------


def decay_matrix(T: int, gamma: float, dtype=torch.float32, device: torch.device = CPU) -> torch.Tensor:
    """U[t, k] = gamma^(k - t) for k >= t, else 0 ([T, T])."""
    idx = torch.arange(T, dtype=dtype, device=device)
    dist = idx[None, :] - idx[:, None]
    return torch.triu(torch.pow(gamma, dist.clamp(min=0)))


def dense_future_values(logp, logp_old, mask, gamma: float = 1.0, clip_eps: float = 0.2):
    """method §2 the authors' way: U built inside the call (once, shared by the rollouts: cheaper than once per
    rollout, so the ratio against ours is a lower bound), then per rollout r = mask * (logp - logp_old),
    F = U @ r, omega = clip(exp(clip(F, -20, 20)), 1 - eps, 1 + eps). Returns (omega, gain), 0 where masked."""
    B, T = logp.shape
    U = decay_matrix(T, gamma, device=logp.device)
    omega = torch.zeros(B, T, device=logp.device)
    gain = torch.zeros(B, T, device=logp.device)
    for b in range(B):
        m = mask[b].float()
        r = m * (logp[b].float() - logp_old[b].float())
        F = U @ r
        omega[b] = torch.exp(F.clamp(-20, 20)).clamp(1 - clip_eps, 1 + clip_eps) * m
        gain[b] = F * m
    return omega, gain


def _zscore(x: torch.Tensor, include: torch.Tensor) -> torch.Tensor:
    vals = x[include].double()
    if vals.numel() == 0:
        return torch.zeros_like(x, dtype=torch.float64)
    mean = vals.mean()
    std = vals.std(unbiased=False)
    return (x.double() - mean) / (std + 1e-6)


def eager_score_tokens(entropy, logp, logp_old, mask, eligible, gamma: float = 1.0, clip_eps: float = 0.2):
    """method §3 per rollout: Z(entropy) * Z(omega) over eligible & mask positions; -inf elsewhere."""
    omega, _ = dense_future_values(logp, logp_old, mask, gamma, clip_eps)
    B, T = entropy.shape
    score = torch.full((B, T), float("-inf"), device=entropy.device)
    candidate = torch.zeros(B, T, dtype=torch.bool, device=entropy.device)
    for b in range(B):
        el = eligible[b] & mask[b]
        zh, zo = _zscore(entropy[b], el), _zscore(omega[b], el)
        score[b] = torch.where(el, zh * zo, torch.tensor(float("-inf"), dtype=torch.float64)).float()
        candidate[b] = el & (zh > 0) & (zo > 0)
    return score, candidate, omega


def eager_future_kl_weights(logp, logp_old, advantages, mask, gamma: float = 2 ** (-1 / 64),
                            clip_ratio_c: float = 3.0, clip_eps: float = 0.2, coef: float = 1.0,
                            ratio_threshold: float = 6.0):
    """method §6 (high_only) with the dense U, per rollout. Returns (weights, advantages_out)."""
    B, T = logp.shape
    U = decay_matrix(T, gamma, device=logp.device)
    weights = torch.zeros(B, T, device=logp.device)
    adv_out = torch.zeros(B, T, device=logp.device)
    for b in range(B):
        m = mask[b].float()
        delta = (logp[b].float() - logp_old[b].float()).clamp(-20, 20)
        keep = (delta <= math.log(clip_ratio_c)).float()
        f = torch.exp(U @ (keep * m * delta)).clamp(1.0, 1 + clip_eps)
        a = advantages[b].float()
        f = torch.where((a < 0) & (torch.exp(delta) > ratio_threshold), f.clamp(1 - clip_eps, 1.0), f)
        weights[b] = f * m
        adv_out[b] = a * (1 + coef * f) * m
    return weights, adv_out


def eager_policy_loss(logp, logp_old, advantages, mask, logp_ref, eps_low=0.2, eps_high=0.28,
                      clip_ratio_c=3.0, kl_coef=0.001):
    """method §7, token-mean, k3 KL: the loss (differentiable in logp)."""
    a = advantages.float()
    ratio = torch.exp((logp - logp_old).clamp(-20, 20))
    pg = torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps_low, 1 + eps_high))
    pg = torch.where(a < 0, torch.minimum(pg, -a * clip_ratio_c), pg)
    d = (logp_ref - logp).clamp(-20, 20)
    tok = pg + kl_coef * (torch.exp(d) - d - 1)
    m = mask.float()
    return (tok * m).sum() / m.sum().clamp(min=1)


def eager_procedure_advantages(rewards, group_ids, parent, split, mask, branch_score, decay: float = 0.9,
                               train_branches: bool = True):
    """method §5 with a Python loop over rollouts (vectorised over t), branch-strength scaling on.
    Returns (advantages [R, T], loss_mask [R, T], group_advantages [R])."""
    R, T = mask.shape
    is_branch = parent >= 0
    a_hat = torch.zeros(R, dtype=torch.float64)
    r64 = rewards.double()
    for key in set(zip(group_ids.tolist(), is_branch.tolist())):
        sel = (group_ids == key[0]) & (is_branch == key[1])
        vals = r64[sel]
        a_hat[sel] = (vals - vals.mean()) / (vals.std(unbiased=False) + 1e-6)
    t = torch.arange(T)
    adv = torch.zeros(R, T, dtype=torch.float64)
    loss_mask = torch.zeros(R, T, dtype=torch.bool)
    for i in range(R):
        if is_branch[i]:
            if train_branches:
                cont = mask[i] & (t > split[i])
                adv[i] = torch.where(cont, a_hat[i], torch.zeros((), dtype=torch.float64))
                loss_mask[i] = cont
            continue
        kids = torch.nonzero(parent == i).flatten()
        base = torch.full((T,), float(a_hat[i]), dtype=torch.float64)
        mult = torch.ones(T, dtype=torch.float64)
        if kids.numel():
            s = split[kids]
            sharing = (s[:, None] >= t[None, :]).double()                       # [K, T]
            cnt = sharing.sum(0)
            base = base + torch.where(cnt > 0, (sharing * a_hat[kids][:, None]).sum(0) / cnt.clamp(min=1), 0.0)
            bs = branch_score[kids].double()
            top = bs.max()
            w = bs.clamp(min=0) / top if top > 0 else torch.zeros_like(bs)
            boost = w[:, None] * torch.pow(decay, (s[:, None] - t[None, :]).clamp(min=0).double()) * sharing
            mult = 1 + boost.sum(0) / kids.numel()
        adv[i] = torch.where(mask[i], base * mult, torch.zeros((), dtype=torch.float64))
        loss_mask[i] = mask[i]
    return adv.float(), loss_mask, a_hat.float()


# ----------------------------------------------------------------------------------------------------------
# ours, sequence ops (the same arguments the eager references above use)
# ----------------------------------------------------------------------------------------------------------

SEQ_GAMMA = 0.995   # Omega discount for the benchmarks (SPEC default is 1; < 1 exercises the decay powers)


def ours_future_values(d, backend: str):
    return ak.future_values(d["logp"], d["logp_old"], d["mask"], gamma=SEQ_GAMMA, backend=backend)


def ours_score_tokens(d, backend: str):
    return ak.score_tokens(d["entropy"], d["logp"], d["logp_old"], d["mask"], eligible=d["eligible"],
                           gamma=SEQ_GAMMA, backend=backend)


def ours_procedure_advantages(d, tree, backend: str):
    return ak.procedure_advantages(tree["rewards"], tree["group_ids"], tree["parent"], tree["split"], d["mask"],
                                   branch_score=tree["branch_score"], branch_strength_scaling=True,
                                   train_branches=True, num_groups=tree["num_groups"], backend=backend)


def ours_future_kl_weights(d, backend: str):
    return ak.future_kl_weights(d["logp"], d["logp_old"], d["advantages"], d["mask"], backend=backend)


def ours_policy_loss_fwd_bwd(d, logp_leaf: torch.Tensor):
    logp_leaf.grad = None
    out = ak.policy_loss(logp_leaf, d["logp_old"], d["advantages"], d["mask"], logp_ref=d["logp_ref"])
    out.loss.backward()
    return out.loss.detach(), logp_leaf.grad


def eager_policy_loss_fwd_bwd(d, logp_leaf: torch.Tensor):
    logp_leaf.grad = None
    loss = eager_policy_loss(logp_leaf, d["logp_old"], d["advantages"], d["mask"], d["logp_ref"])
    loss.backward()
    return loss.detach(), logp_leaf.grad


# ----------------------------------------------------------------------------------------------------------
# correctness checks of ours against the eager references (sequence ops)
# ----------------------------------------------------------------------------------------------------------


def check_future_values(got, omega_ref, gain_ref, what: str) -> None:
    torch.testing.assert_close(got.omega, omega_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} omega: {m}")
    torch.testing.assert_close(got.gain, gain_ref, atol=2e-4, rtol=1e-4, msg=lambda m: f"{what} gain: {m}")


def check_scores(got, score_ref, cand_ref, what: str) -> None:
    fin = torch.isfinite(score_ref)
    assert torch.equal(torch.isfinite(got.score), fin), f"{what}: eligible positions differ"
    torch.testing.assert_close(got.score[fin], score_ref[fin], atol=1e-3, rtol=1e-3,
                               msg=lambda m: f"{what} score: {m}")
    # Omega from the dense matmul and from the scan differ by rounding, which may flip a z-score sign at 0.
    agree = (got.candidate == cand_ref).float().mean().item()
    assert agree > 0.999, f"{what}: candidate agreement {agree:.5f}"


def check_future_kl(got, w_ref, adv_ref, what: str) -> None:
    torch.testing.assert_close(got.weights, w_ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} weights: {m}")
    torch.testing.assert_close(got.advantages, adv_ref, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{what} advantages: {m}")


def check_procedure(got, adv_ref, lm_ref, ahat_ref, what: str) -> None:
    torch.testing.assert_close(got.group_advantages, ahat_ref, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{what} group_advantages: {m}")
    assert torch.equal(got.loss_mask, lm_ref), f"{what}: loss_mask differs"
    torch.testing.assert_close(got.advantages, adv_ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what} advantages: {m}")


def check_policy_loss(got, ref, what: str) -> None:
    (loss, grad), (r_loss, r_grad) = got, ref
    torch.testing.assert_close(loss, r_loss, atol=1e-6, rtol=1e-5, msg=lambda m: f"{what} loss: {m}")
    torch.testing.assert_close(grad, r_grad, atol=1e-9, rtol=1e-4, msg=lambda m: f"{what} grad: {m}")

