"""The RL algorithms, one object each (`algorithm(name)`): how it spends one step's rollout budget, the per-token
advantages it trains on, and what its loss does with them.

- GRPO: `rollouts_per_prompt` full rollouts per prompt; one advantage per rollout (group-normalised reward).
- ARPO (SPEC 9): half the budget as full rollouts; after each tool result, fork a copy of the prefix with
  probability clamp(0.5 + 0.2 * dH, 0, 1), dH = entropy of the next (up to 20) generated tokens minus the
  rollout's initial entropy, until the budget is spent (what is left goes to more full rollouts); plain
  GRPO advantages over all rollouts of the prompt, branches trained on what they generated.
- APPO (SPEC 2-7): half the budget as initial rollouts, scored with `appo_kernels.branching_score`
  (Omega from `omega_source`), forks at `appo_kernels.select_branch_points`, turned into branches by
  `appo_kernels.fork_requests` ("resample": keep token t; "topk": replace it by another top-k token),
  per-token advantages from `appo_kernels.procedure_advantages` (dual-group, prefix credit, branch-strength
  scaling); the loss adds future-KL weighting. "appo-entropy" is the entropy-only ablation (score without
  Omega).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from torch import Tensor

import appo_kernels as ak

from . import seeding
from .policy import GEN, PROMPT, TOOL, Rollout, generate, pad_batch, start_rollout, token_logits
from .seeding import derive_seed
from .tasks import Episode, Task, score_response
from .tokenizer import CharTokenizer

OMEGA_SOURCES = ("prev_policy", "reference", "behavior")
ARPO_WINDOW = 20


@dataclass
class StepBatch:
    """All rollouts of one step, padded: `tokens`, `kinds` `[R, T]`; `group`, `parent`, `split` `[R]`."""
    tasks: list[Task]
    rows: list[Rollout]
    tokens: Tensor
    attention: Tensor
    kinds: Tensor
    group: Tensor
    parent: Tensor
    split: Tensor
    episodes: list[Episode]
    rewards: Tensor
    scores: ak.BranchingScores | None = None      # APPO: the initial rows' scores (first rows of the batch)
    branch_score: Tensor | None = None           # APPO: BS_b per row (0 on initial rows)
    forks: list[tuple[int, int]] = field(default_factory=list)   # (rollout, position) of every branch
    substituted: bool = False      # APPO topk: each branch's token at split + 1 replaced its parent's

    @property
    def gen_mask(self) -> Tensor:
        return self.kinds == GEN

    @property
    def is_branch(self) -> Tensor:
        return self.parent >= 0


def _on(x: Tensor | None, device: torch.device) -> Tensor | None:
    return None if x is None else x.to(device)


def _to_cpu(result):
    """A NamedTuple of tensors (token_stats, branching_score) computed on a GPU, moved to the CPU (differentiable)."""
    if all(not isinstance(x, Tensor) or x.device.type == "cpu" for x in result):
        return result
    return type(result)(*(x.cpu() if isinstance(x, Tensor) else x for x in result))


def policy_token_stats(model: torch.nn.Module, tokens: Tensor, attention: Tensor, mask: Tensor, backend: str):
    """`appo_kernels.token_stats` of `model`'s logits on the masked tokens (0 elsewhere): logp, entropy `[R, T]`
    (computed where the model is, returned on the CPU)."""
    logits = token_logits(model, tokens, attention)
    return _to_cpu(ak.token_stats(logits, _on(tokens, logits.device), mask=_on(mask, logits.device), backend=backend))


def prompt_rows(tasks: list[Task], counts: int | dict[int, int], tok: CharTokenizer, budget: int, key: tuple,
                groups: list[int] | None = None) -> list[Rollout]:
    """Fresh rows for the prompts `groups` (default: all): `counts` rows each (an int, or one per group), row j
    of prompt g sampling from the stream (*key, g, j)."""
    rows = []
    for g in range(len(tasks)) if groups is None else groups:
        ids = tok.prompt_ids(tasks[g])
        n = counts if isinstance(counts, int) else counts[g]
        rows += [start_rollout(g, ids, [PROMPT] * len(ids), len(ids), tasks, tok, budget, seed=derive_seed(*key, g, j))
                 for j in range(n)]
    return rows


def fork(rows: list[Rollout], parent: int, position: int, tasks: list[Task], tok: CharTokenizer, budget: int,
         seed: int, token: int | None = None) -> Rollout:
    """A branch of `rows[parent]` that keeps its tokens 0..position (tool results included) and samples the
    rest; with `token`, it keeps 0..position-1 and places `token` (as generated) at `position` instead. The
    prefix's tool calls count against the branch's budget."""
    p = rows[parent]
    if token is None:
        return start_rollout(p.task, p.tokens[:position + 1], p.kinds[:position + 1], p.prompt_len, tasks, tok,
                             budget, parent=parent, split=position, seed=seed)
    return start_rollout(p.task, p.tokens[:position] + [token], p.kinds[:position] + [GEN], p.prompt_len, tasks,
                         tok, budget, parent=parent, split=position - 1, seed=seed)


def _finish(tasks, rows, tok, **extra) -> StepBatch:
    tokens, attention, kinds = pad_batch(rows, tok.pad_id)
    episodes = [tok.score(tasks[r.task], r.tokens, r.kinds, r.prompt_len) for r in rows]
    return StepBatch(tasks, rows, tokens, attention, kinds,
                     group=torch.tensor([r.task for r in rows]), parent=torch.tensor([r.parent for r in rows]),
                     split=torch.tensor([r.split for r in rows]), episodes=episodes,
                     rewards=torch.tensor([e.reward for e in episodes], dtype=torch.float32), **extra)


def branch_eligible(tokens: Tensor, kinds: Tensor, tok: CharTokenizer, max_new: int,
                    after_answer: bool = True) -> Tensor:
    """Generated tokens that leave room to generate: not <eos>, not the last token of the length budget; with
    `after_answer=False` also none after the first <ans> (the answer's value and its sign-off)."""
    gen = kinds == GEN
    eligible = gen & ~torch.isin(tokens, torch.tensor(tok.stop_ids)) & (gen.cumsum(1) < max_new)
    if not after_answer:
        if getattr(tok, "ans_id", None) is None:
            raise ValueError("forks_after_answer: False needs a task with an answer token (<ans>)")
        ans = (tokens == tok.ans_id) & gen
        eligible &= (ans.cumsum(1) - ans.long()) == 0
    return eligible


def appo_scores(cfg, logits: Tensor, tokens: Tensor, attention: Tensor, gen_mask: Tensor, eligible: Tensor,
                logp_old: Tensor | None) -> ak.BranchingScores:
    """APPO's Branching Score of the initial rollouts `[R, T]` (+ `cfg.branch_topk` top-k ids for "topk"
    branches): `branching_score` (Omega over k >= t, SPEC 2), or with `cfg.omega_own_term=False` Omega over
    the tokens after t only: `score_tokens` fed the log-ratios shifted by one (r'[t] = r[t + 1], summed over
    every real position), whose scan F'[t] = sum_{k >= t} r'[k] is sum_{k > t} r[k] (gamma = 1)."""
    topk = cfg.branch_topk if cfg.branch_mode == "topk" else 0
    if logits.device != tokens.device:           # the model on a GPU: score there, hand the scores to the CPU
        dev = logits.device
        return _to_cpu(appo_scores(cfg, logits, tokens.to(dev), attention.to(dev), gen_mask.to(dev),
                                   eligible.to(dev), _on(logp_old, dev)))
    if logp_old is None or cfg.omega_own_term:
        return ak.branching_score(logits, tokens, logp_old, gen_mask, eligible=eligible, temperature=cfg.temperature,
                                  topk=topk, backend=cfg.backend)
    st = ak.token_stats(logits, tokens, mask=gen_mask, temperature=cfg.temperature, topk=topk, backend=cfg.backend)
    ratio = torch.where(gen_mask, st.logp - logp_old, 0.0)
    later = torch.cat([ratio[:, 1:], ratio.new_zeros(len(ratio), 1)], 1)
    sc = ak.score_tokens(st.entropy, later, torch.zeros_like(later), attention.bool(), eligible=eligible & gen_mask,
                         backend=cfg.backend)
    return sc._replace(omega=torch.where(gen_mask, sc.omega, 0.0), logp=st.logp, topk_ids=st.topk_ids,
                       topk_logp=st.topk_logp)


def _sampling(cfg) -> dict:
    """`generate`'s settings for a run's rollouts."""
    return {"max_new": cfg.max_new_tokens, "budget": cfg.tool_budget, "temperature": cfg.temperature}


def _initial_rollouts(cfg, model, tasks: list[Task], tok: CharTokenizer, key: tuple,
                      groups: list[int] | None) -> tuple[list[Rollout], int]:
    """A tree algorithm's initial rollouts (half of each prompt's budget) and the branches left per prompt."""
    initial_per_prompt = cfg.rollouts_per_prompt // 2
    rows = prompt_rows(tasks, initial_per_prompt, tok, cfg.tool_budget, (*key, "init"), groups)
    return generate(model, rows, tasks, tok, **_sampling(cfg)), cfg.rollouts_per_prompt - initial_per_prompt


class Algorithm(ABC):
    """One RL algorithm as the trainer runs it: how a step's rollout budget is spent (`collect`), the per-token
    advantages it trains on (`advantages`) and what the loss does with them (`loss_advantages`)."""
    name: str

    @abstractmethod
    def collect(self, cfg, model, tasks: list[Task], tok: CharTokenizer, key: tuple, groups: list[int] | None = None,
                omega_model=None) -> StepBatch:
        """One step's rollouts at `cfg.rollouts_per_prompt` per prompt, for the prompts `groups` (default: all; a
        data-parallel rank passes the ones it owns). Every random choice is keyed by (*key, what, prompt, slot),
        so a prompt's rollouts do not depend on which rank or batch runs it. `omega_model`: see `APPO`."""

    @abstractmethod
    def advantages(self, cfg, batch: StepBatch) -> tuple[Tensor, Tensor]:
        """Per-token advantages and loss mask `[R, T]`."""

    def loss_advantages(self, cfg, logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """The advantages the policy loss takes on one mini-batch (`logp` detached): unchanged."""
        return advantages


class GRPO(Algorithm):
    """Full rollouts only; one advantage per rollout."""
    name = "grpo"

    def collect(self, cfg, model, tasks, tok, key, groups=None, omega_model=None) -> StepBatch:
        rows = prompt_rows(tasks, cfg.rollouts_per_prompt, tok, cfg.tool_budget, (*key, "init"), groups)
        return _finish(tasks, generate(model, rows, tasks, tok, **_sampling(cfg)), tok)

    def advantages(self, cfg, batch: StepBatch) -> tuple[Tensor, Tensor]:
        """The rollout's group-normalised reward on every token it generated; a branch only on its own tokens."""
        gen = batch.gen_mask
        a_hat = ak.group_advantages(batch.rewards, batch.group, num_groups=len(batch.tasks))
        pos = torch.arange(gen.shape[1])
        loss_mask = gen & (pos[None, :] > batch.split[:, None])
        return torch.where(loss_mask, a_hat[:, None], 0.0), loss_mask


class ARPO(GRPO):
    """Entropy-triggered forks after tool results (SPEC 9); GRPO's advantages."""
    name = "arpo"

    def collect(self, cfg, model, tasks, tok, key, groups=None, omega_model=None) -> StepBatch:
        groups = list(range(len(tasks))) if groups is None else groups
        rows, branches_per_prompt = _initial_rollouts(cfg, model, tasks, tok, key, groups)
        tokens, attention, kinds = pad_batch(rows, tok.pad_id)
        with torch.no_grad():
            logits = token_logits(model, tokens, attention)
            entropy = ak.token_stats(logits, _on(tokens, logits.device), mask=_on(kinds == GEN, logits.device),
                                     backend=cfg.backend).entropy.cpu()
        forks = _arpo_forks(rows, kinds, entropy, branches_per_prompt, key)
        slot = dict.fromkeys(groups, 0)
        extra = []
        for i, t in forks:
            g = rows[i].task
            extra.append(fork(rows, i, t, tasks, tok, cfg.tool_budget, derive_seed(*key, "branch", g, slot[g])))
            slot[g] += 1
        unspent = {g: branches_per_prompt - slot[g] for g in groups}
        extra += prompt_rows(tasks, unspent, tok, cfg.tool_budget, (*key, "extra"), groups)
        rows += generate(model, extra, tasks, tok, **_sampling(cfg))
        return _finish(tasks, rows, tok, forks=forks)


def _arpo_forks(rows: list[Rollout], kinds: Tensor, entropy: Tensor, budget: int,
                key: tuple) -> list[tuple[int, int]]:
    """ARPO's entropy-triggered forks after tool results, at most `budget` per prompt (SPEC 9); the coin
    flips of prompt g come from the stream (*key, "arpo", g)."""
    per_task: dict[int, list[tuple[int, int, float]]] = {}
    for i, r in enumerate(rows):
        cands = per_task.setdefault(r.task, [])
        gen_pos = torch.nonzero(kinds[i] == GEN).flatten()
        if not len(gen_pos):
            continue
        h0 = entropy[i, gen_pos[:ARPO_WINDOW]].mean()
        ends = [t for t in range(len(r.tokens)) if r.kinds[t] == TOOL and t + 1 < len(r.tokens)
                and r.kinds[t + 1] == GEN]
        for t in ends:
            after = gen_pos[gen_pos > t][:ARPO_WINDOW]
            dh = float(entropy[i, after].mean() - h0)
            cands.append((i, t, min(max(0.5 + 0.2 * dh, 0.0), 1.0)))
    forks = []
    for g, cands in per_task.items():
        coins = seeding.rng(*key, "arpo", g)
        coins.shuffle(cands)
        taken = 0
        for i, t, p in cands:
            if taken < budget and coins.random() < p:
                forks.append((i, t))
                taken += 1
    return forks


class APPO(Algorithm):
    """Forks at the best Branching Scores, procedure advantages, future-KL weighting (SPEC 2-7)."""
    name = "appo"

    def omega_logp_old(self, cfg, logits: Tensor, tokens: Tensor, attention: Tensor, gen_mask: Tensor,
                       omega_model) -> Tensor | None:
        """logp_old of Omega: the sampler's own (`cfg.omega_source` "behavior"), else `omega_model`'s (the
        previous policy or the reference), else None (the first step under "prev_policy": no Omega yet)."""
        if cfg.omega_source == "behavior":
            return ak.token_stats(logits, _on(tokens, logits.device), mask=_on(gen_mask, logits.device),
                                  backend=cfg.backend).logp.cpu()
        if omega_model is not None:
            return policy_token_stats(omega_model, tokens, attention, gen_mask, cfg.backend).logp
        return None

    def collect(self, cfg, model, tasks, tok, key, groups=None, omega_model=None) -> StepBatch:
        rows, branches_per_prompt = _initial_rollouts(cfg, model, tasks, tok, key, groups)
        tokens, attention, kinds = pad_batch(rows, tok.pad_id)
        gen_mask = kinds == GEN
        eligible = branch_eligible(tokens, kinds, tok, cfg.max_new_tokens, cfg.forks_after_answer)
        with torch.no_grad():
            logits = token_logits(model, tokens, attention)
            logp_old = self.omega_logp_old(cfg, logits, tokens, attention, gen_mask, omega_model)
            scores = appo_scores(cfg, logits, tokens, attention, gen_mask, eligible, logp_old)
        group = torch.tensor([r.task for r in rows])
        bp = ak.select_branch_points(scores.score, scores.candidate, group, branches_per_prompt,
                                     num_groups=len(tasks))
        topk = cfg.branch_mode == "topk"
        requests = ak.fork_requests(bp, tokens, mode=cfg.branch_mode, topk_ids=scores.topk_ids,
                                    topk_logp=scores.topk_logp, choice=cfg.topk_choice,
                                    generator=seeding.generator(*key, "topk")).tolist()
        branches = [fork(rows, q.rollout, q.position, tasks, tok, cfg.tool_budget,
                         derive_seed(*key, "branch", q.group, q.slot), token=q.token if topk else None)
                    for q in requests]
        # the branches follow the initial rows, whose BS_b is 0
        branch_score = torch.tensor([0.0] * len(rows) + [q.score for q in requests], dtype=torch.float32)
        rows += generate(model, branches, tasks, tok, **_sampling(cfg))
        return _finish(tasks, rows, tok, scores=scores, branch_score=branch_score,
                       forks=[(q.rollout, q.position) for q in requests], substituted=topk)

    def advantages(self, cfg, batch: StepBatch) -> tuple[Tensor, Tensor]:
        """`appo_kernels.procedure_advantages`; a topk branch's substituted token is out of the loss unless
        `cfg.train_substituted`."""
        gen = batch.gen_mask
        # split -1: a topk branch forked at the first generated token shares none of its parent's (no credit)
        out = ak.procedure_advantages(batch.rewards, batch.group, batch.parent, batch.split, gen,
                                      branch_score=batch.branch_score,
                                      branch_strength_scaling=cfg.branch_strength_scaling,
                                      train_branches=cfg.train_branches, num_groups=len(batch.tasks),
                                      backend=cfg.backend)
        adv = out.advantages
        if not cfg.prefix_credit:   # the ablation: each token keeps its own rollout's A_hat (times M on initial rows)
            own = out.group_advantages[:, None] * torch.where(batch.is_branch[:, None], 1.0, out.multiplier)
            adv = torch.where(out.loss_mask, own, 0.0)
        if not batch.substituted or cfg.train_substituted:
            return adv, out.loss_mask
        # A topk branch's token at split + 1 was put there, not sampled from the policy: out of the loss.
        pos = torch.arange(gen.shape[1])
        substituted = batch.is_branch[:, None] & (pos[None, :] == batch.split[:, None] + 1)
        return torch.where(substituted, 0.0, adv), out.loss_mask & ~substituted

    def loss_advantages(self, cfg, logp: Tensor, logp_old: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """Weighted by future KL (`appo_kernels.future_kl_weights`) unless `cfg.future_kl` is off."""
        if not cfg.future_kl:
            return advantages
        return ak.future_kl_weights(logp, logp_old, advantages, mask, backend=cfg.backend).advantages


class APPOEntropy(APPO):
    """APPO with the Branching Score of entropy alone (no Omega): the ablation."""
    name = "appo-entropy"

    def omega_logp_old(self, cfg, logits, tokens, attention, gen_mask, omega_model) -> None:
        return None


_BY_NAME = {a.name: a for a in (APPO(), GRPO(), ARPO(), APPOEntropy())}
ALGORITHMS = tuple(_BY_NAME)


def algorithm(name: str) -> Algorithm:
    """The algorithm called `name` (one of `ALGORITHMS`)."""
    return _BY_NAME[name]


def advantages(algo: str, cfg, batch: StepBatch) -> tuple[Tensor, Tensor]:
    """`algorithm(algo).advantages(cfg, batch)`, for callers that hold the name (tests/test_compare.py)."""
    return algorithm(algo).advantages(cfg, batch)
