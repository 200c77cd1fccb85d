"""The training loop: supervised warm start, then RL with one of the algorithms, with evaluation,
checkpoints that resume exactly, metrics (JSONL + CSV) and rollout samples for the report."""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import appo_kernels as ak
from appo_kernels.backends import resolve as resolve_backend
from appo_kernels.branch_points import FORK_MODES, TOPK_CHOICES

from . import algorithms, seeding
from .algorithms import ALGORITHMS, OMEGA_SOURCES, StepBatch
from .policy import GEN, PROMPT, TOOL, PolicyConfig, build_policy, generate
from .tasks import LIMITS, TASK_VERSION, TASKS, decision_positions, demonstrations, make_task
from .tokenizer import CharTokenizer

EVAL_SEED = 10_007          # the held-out evaluation prompts are the same for every run


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults: the README's main job (warm start + APPO, < 10 min on 2 cores)."""
    algo: str = "appo"
    seed: int = 0
    out_dir: str = "runs/appo"
    task: str | None = None          # the task family: tasks.py's "easy" (default) or "hard"; with `model`,
                                     # chat_tasks.py's "arith" (default)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # supervised warm start on imperfect demonstrations
    sft_examples: int = 6000
    sft_steps: int = 700
    sft_batch: int = 64
    sft_lr: float = 3e-3
    mistake_rate: float = 0.35
    # rollouts (SPEC 8, scaled down): rollouts_per_prompt = initial + branches for the tree algorithms
    prompts_per_step: int = 8
    rollouts_per_prompt: int = 16
    max_new_tokens: int | None = None   # None: the family's (tasks.LIMITS: 64 easy, 96 hard)
    tool_budget: int | None = None      # None: the family's (3 easy, 8 hard)
    temperature: float = 1.0
    token_budget: int = 300_000      # generated tokens of RL (the equal budget of a comparison)
    max_steps: int | None = None
    # update (SPEC 7): 1 epoch, mini-batches of prompts, AdamW, grad-clip
    minibatch_prompts: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    kl_coef: float = 0.001
    # APPO (SPEC 2-6)
    omega_source: str = "prev_policy"
    branch_strength_scaling: bool = True
    # SPEC 5's option, on here: at an equal budget of generated tokens, leaving branch continuations out of the
    # loss discards half of APPO's samples (measured: docs/trainer.md).
    train_branches: bool = True
    future_kl: bool = True
    # APPO's branches (SPEC 4; docs/trainer.md): "resample" keeps token t and samples from t + 1; "topk" (the
    # contrastive branch) replaces token t by the best ("best") or a sampled ("sample") other top-k token
    branch_mode: str = "resample"
    topk_choice: str = "best"
    branch_topk: int = 4
    train_substituted: bool = False      # train a topk branch's substituted token (not sampled from the policy)
    # switches whose defaults are the paper's (docs/trainer.md)
    omega_own_term: bool = True          # Omega sums the log-ratios of k >= t (False: k > t only)
    forks_after_answer: bool = True      # False: no fork point after the first <ans> token
    prefix_credit: bool = True           # False: A_hat_i * M alone, no mean over the branches sharing token t
    # evaluation, samples, backend
    eval_every: int = 20
    eval_prompts: int = 512
    eval_samples: int = 1
    sample_groups: int = 2
    backend: str = "auto"
    sft_cache: str | None = None   # where the warm-start weights are kept (shared by a comparison's runs)
    # a Hugging Face causal LM instead of the tiny model (hf_policy.py): a folder, a .gguf file or a preset
    # ("smollm2"); it is the starting policy (no warm start) and runs the chat tasks (chat_tasks.py)
    model: str | None = None
    device: str | None = None      # cpu, cuda, cuda:N or auto; None: cpu for the tiny model, auto with `model`

    def __post_init__(self):
        if isinstance(self.policy, dict):
            self.policy = PolicyConfig(**self.policy)
        if self.algo not in ALGORITHMS:
            raise ValueError(f"algo: expected one of {ALGORITHMS}, got {self.algo!r}")
        if self.model is None:
            tasks, limits = TASKS, LIMITS
            self.task, self.device = self.task or "easy", self.device or "cpu"
        else:
            from .chat_tasks import CHAT_LIMITS, CHAT_TASKS
            tasks, limits = CHAT_TASKS, CHAT_LIMITS
            self.task, self.device = self.task or "arith", self.device or "auto"
            if not self.forks_after_answer:
                raise ValueError("forks_after_answer: only the tiny model's tasks have an <ans> token; "
                                 "with `model` it must stay True")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise ValueError(f"device: expected cpu, cuda, cuda:N or auto, got {self.device!r}")
        if self.task not in tasks:
            raise ValueError(f"task: expected one of {tasks}{' with model' if self.model else ''}, got "
                             f"{self.task!r}")
        for name, value in limits[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.branch_mode not in FORK_MODES:
            raise ValueError(f"branch_mode: expected one of {FORK_MODES}, got {self.branch_mode!r}")
        if self.topk_choice not in TOPK_CHOICES:
            raise ValueError(f"topk_choice: expected one of {TOPK_CHOICES}, got {self.topk_choice!r}")
        if self.branch_topk < 2:
            raise ValueError(f"branch_topk: expected >= 2 (an alternative to the sampled token), got "
                             f"{self.branch_topk}")
        if self.omega_source not in OMEGA_SOURCES:
            raise ValueError(f"omega_source: expected one of {OMEGA_SOURCES}, got {self.omega_source!r}")
        if self.rollouts_per_prompt < 2 or self.rollouts_per_prompt % 2:
            raise ValueError(f"rollouts_per_prompt: expected an even number >= 2 (half initial, half branches "
                             f"for the tree algorithms), got {self.rollouts_per_prompt}")
        if self.prompts_per_step % self.minibatch_prompts:
            raise ValueError(f"minibatch_prompts: expected a divisor of prompts_per_step="
                             f"{self.prompts_per_step}, got {self.minibatch_prompts}")

    def sft_key(self) -> dict:
        """What the warm start depends on (a cached warm start is reused only when all of it matches)."""
        return {k: getattr(self, k) for k in ("task", "seed", "sft_examples", "sft_steps", "sft_batch", "sft_lr",
                                              "mistake_rate", "max_new_tokens")} | {"policy": asdict(self.policy),
                                                                       "tasks": TASK_VERSION}


def resolve_device(name: str) -> torch.device:
    """The torch device of `--device`: auto = cuda when a GPU is visible, else cpu; under torchrun on GPUs each
    rank takes cuda:LOCAL_RANK. Raises ValueError naming `device` when CUDA is asked for and absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device: {name} asked for, but torch sees no CUDA device (torch {torch.__version__})")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return torch.device(name)


def new_task(cfg: TrainConfig, rng: random.Random):
    """One task of the run's family: tasks.py for the tiny model, chat_tasks.py with `cfg.model`."""
    if cfg.model is not None:
        from .chat_tasks import make_task as make_chat_task
        return make_chat_task(rng, cfg.task)
    return make_task(rng, cfg.task)


def world() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed job this process is in; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: dict[str, float]) -> dict[str, float]:
    """Each named value summed over the ranks (float64; the values themselves in a single process)."""
    if world()[1] == 1:
        return dict(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


def _shard(n: int) -> list[int]:
    """The items of 0..n-1 this rank owns (round robin)."""
    rank, size = world()
    return list(range(rank, n, size))


def _encode_demo(tok: CharTokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    ids = [tok.bos_id] + tok.encode(prompt)
    kinds = [PROMPT] * len(ids)
    in_tool = False
    for t in tok.encode(response):
        in_tool = in_tool or t == tok.res_id
        ids.append(t)
        kinds.append(TOOL if in_tool else GEN)
        in_tool = in_tool and t != tok.end_res_id
    return ids, kinds


def warm_start(cfg: TrainConfig, tok: CharTokenizer, progress: bool = True) -> dict:
    """Supervised warm start on imperfect demonstrations (loss on generated tokens only; tool output and the
    prompt masked out), via `appo_kernels.token_stats`. Cached in `cfg.sft_cache` (or out_dir/sft.pt)."""
    from tqdm.auto import tqdm
    path = Path(cfg.sft_cache or Path(cfg.out_dir) / "sft.pt")
    rank, size = world()
    if size > 1 and rank > 0:                  # rank 0 trains (or loads) the warm start; the others load it
        dist.barrier()
        return torch.load(path, weights_only=False)["model"]
    state = _cached_warm_start(path, cfg) or _train_warm_start(cfg, tok, progress, path, tqdm)
    if size > 1:
        dist.barrier()
    return state


def _cached_warm_start(path: Path, cfg: TrainConfig) -> dict | None:
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["key"] == cfg.sft_key():
            return saved["model"]
    return None


def _train_warm_start(cfg: TrainConfig, tok: CharTokenizer, progress: bool, path: Path, tqdm) -> dict:
    model = build_policy(tok, cfg.policy, cfg.seed)
    demos = [_encode_demo(tok, t.prompt, r) for t, r in demonstrations(cfg.sft_examples, cfg.seed, cfg.mistake_rate,
                                                                       cfg.task)]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / cfg.sft_steps)))
    gen = seeding.generator(cfg.seed, "sft")
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="warm start (SFT)", disable=not progress, dynamic_ncols=True,
               mininterval=1.0)
    for step in bar:
        idx = torch.randint(len(demos), (cfg.sft_batch,), generator=gen).tolist()
        width = max(len(demos[i][0]) for i in idx)
        tokens = torch.full((len(idx), width), tok.pad_id, dtype=torch.long)
        kinds = torch.full((len(idx), width), -1, dtype=torch.long)
        for b, i in enumerate(idx):
            tokens[b, :len(demos[i][0])] = torch.tensor(demos[i][0])
            kinds[b, :len(demos[i][1])] = torch.tensor(demos[i][1])
        logp = algorithms.policy_token_stats(model, tokens, (kinds >= 0).long(), kinds == GEN, cfg.backend).logp
        loss = -logp.sum() / (kinds == GEN).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    state = model.state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save({"key": cfg.sft_key(), "model": state}, path)
    return state


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, tok: CharTokenizer) -> dict:
    """Sampled (temperature 1) success, reward and tool calls on the fixed held-out prompts (sharded over the
    ranks of a data-parallel run; every prompt and sample keeps its own random stream)."""
    rng = random.Random(EVAL_SEED)
    tasks = [new_task(cfg, rng) for _ in range(cfg.eval_prompts)]
    rows = algorithms.prompt_rows(tasks, cfg.eval_samples, tok, cfg.tool_budget, (EVAL_SEED, cfg.seed, "eval"),
                                  _shard(len(tasks)))
    generate(model, rows, tasks, tok, max_new=cfg.max_new_tokens, budget=cfg.tool_budget,
             temperature=cfg.temperature)
    eps = [tok.score(tasks[r.task], r.tokens, r.kinds, r.prompt_len) for r in rows]
    total = all_sum({"rows": len(eps), "success": sum(e.success for e in eps), "reward": sum(e.reward for e in eps),
                     "tool_calls": sum(r.calls for r in rows), "format": sum(e.well_formed for e in eps)})
    return {f"eval_{k}": total[k] / total["rows"] for k in ("success", "reward", "tool_calls", "format")}


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _ratio(part: float, whole: float) -> float | None:
    """part / whole; None when whole is 0 (nothing to measure: no forks, no scored token)."""
    return part / whole if whole else None


def backend_in_use(requested: str) -> str:
    """The appo_kernels backend that runs the trainer's ops (CPU, float32): `requested`, or what "auto" picks
    (the compiled native backend when it is importable, else torch). Raises ValueError naming `backend` for one
    that cannot run here."""
    return resolve_backend(requested, torch.device("cpu"), "token_stats", torch.float32).NAME


def summarize(records: list[dict]) -> dict:
    """A run's summary from its metrics records (`Trainer.summary`; `appo-train report` rebuilds it from
    metrics.jsonl): held-out success, reward, tool calls and format rate before RL and at the last evaluation,
    RL steps, generated tokens, RL wall time (the steps' own times), the mean shares of post-answer and decision
    forks, and the appo_kernels backend of the last step."""
    first, last = records[0], records[-1]
    last_eval = next(r for r in reversed(records) if "eval_success" in r)
    return {"algo": last["algo"], "seed": last["seed"], "steps": last["step"], "gen_tokens": last["gen_tokens"],
            "rl_minutes": round(sum(r.get("time_s", 0.0) for r in records) / 60, 2),
            "success_before": first["eval_success"], "success": last_eval["eval_success"],
            "reward_before": first["eval_reward"], "reward": last_eval["eval_reward"],
            "tool_calls": last_eval["eval_tool_calls"], "format": last_eval["eval_format"],
            "post_answer_forks": _mean(r.get("post_answer_forks") for r in records),
            "decision_forks": _mean(r.get("decision_forks") for r in records), "backend": last["backend"]}


def _trajectory(config: dict) -> dict:
    """The settings that decide a run's trajectory: a checkpoint resumes only under the same ones (where it is
    kept and when it stops may change, so a finished run can be extended to a larger budget)."""
    return {k: v for k, v in config.items() if k not in ("out_dir", "token_budget", "max_steps", "sft_cache")}


def _all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients over the ranks in one flat all-reduce (a rank without rows contributes zeros)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """One run: `Trainer(cfg).run()` warm-starts (or loads the cached warm start), resumes from
    out_dir/checkpoint.pt when present, and trains until the token budget (or max_steps) is spent."""

    def __init__(self, cfg: TrainConfig, progress: bool = True):
        self.rank, self.world_size = world()
        if self.world_size > min(cfg.prompts_per_step, cfg.eval_prompts):
            raise ValueError(f"prompts_per_step: expected at least one prompt per rank ({self.world_size} ranks), "
                             f"got prompts_per_step={cfg.prompts_per_step}, eval_prompts={cfg.eval_prompts}")
        self.cfg, self.progress = cfg, progress and self.rank == 0
        self.algorithm = algorithms.algorithm(cfg.algo)
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (self.out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        self.backend = backend_in_use(cfg.backend)
        self.device = resolve_device(cfg.device)
        if cfg.model is None:
            self.tok = CharTokenizer()
            sft = warm_start(cfg, self.tok, self.progress)
            self.model = build_policy(self.tok, cfg.policy, cfg.seed)
            self.model.load_state_dict(sft)
        else:                                  # a pretrained (instruct) model is its own starting policy
            from .hf_policy import load_policy
            self.model, self.tok = load_policy(cfg.model)
        self.model.to(self.device)
        self.ref = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.prev: torch.nn.Module | None = None        # the policy before the last update (Omega)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step, self.gen_tokens = 0, 0
        self.records: list[dict] = []
        self._resume()

    # --- checkpoints -------------------------------------------------------------------------------------
    def _resume(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            return
        ck = torch.load(path, weights_only=False, map_location=self.device)
        held = {"model": None, "device": "cpu"} | ck["config"]      # checkpoints from before these settings
        if _trajectory(held) != _trajectory(asdict(self.cfg)):
            raise ValueError(f"out_dir: {self.out} holds a checkpoint of a different configuration; use another "
                             f"--out or delete {path}")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        if ck["prev"] is not None:
            self.prev = copy.deepcopy(self.model).eval().requires_grad_(False)
            self.prev.load_state_dict(ck["prev"])
        self.step, self.gen_tokens, self.records = ck["step"], ck["gen_tokens"], ck["records"]
        self._write_metrics()

    def _checkpoint(self) -> None:
        if self.rank > 0:                      # every rank holds the same state; rank 0 keeps it
            return
        _atomic_save({"config": asdict(self.cfg), "model": self.model.state_dict(),
                      "optimizer": self.opt.state_dict(),
                      "prev": None if self.prev is None else self.prev.state_dict(),
                      "step": self.step, "gen_tokens": self.gen_tokens, "records": self.records},
                     self.out / "checkpoint.pt")

    def _write_metrics(self) -> None:
        if self.rank > 0:
            return
        with open(self.out / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        keys = list(dict.fromkeys(k for r in self.records for k in r))
        with open(self.out / "metrics.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(self.records)

    # --- the loop ----------------------------------------------------------------------------------------
    def done(self) -> bool:
        cfg = self.cfg
        return self.gen_tokens >= cfg.token_budget or (cfg.max_steps is not None and self.step >= cfg.max_steps)

    def run(self) -> dict:
        from tqdm.auto import tqdm
        cfg = self.cfg
        bar = tqdm(total=cfg.token_budget, initial=min(self.gen_tokens, cfg.token_budget), unit="tok",
                   desc=f"RL {cfg.algo}", disable=not self.progress, dynamic_ncols=True, mininterval=1.0)
        if not self.records:
            self.records.append({"algo": cfg.algo, "seed": cfg.seed, "step": 0, "gen_tokens": 0,
                                 **self._eval_only(), "backend": self.backend})
            self._write_metrics()
        last_eval = next(r["eval_success"] for r in reversed(self.records) if "eval_success" in r)
        while not self.done():
            t0 = time.perf_counter()
            record, batch, adv = self.train_step()
            if self.step % cfg.eval_every == 0 or self.done():
                record |= evaluate(self.model, cfg, self.tok)
                self._save_samples(batch, adv)
            record["time_s"] = round(time.perf_counter() - t0, 3)      # the step, with its evaluation
            last_eval = record.get("eval_success", last_eval)
            self.records.append(record)
            self._write_metrics()
            self._checkpoint()
            bar.update(min(self.gen_tokens, cfg.token_budget) - bar.n)
            bar.set_postfix(step=self.step, reward=f"{record['reward']:.3f}", success=f"{record['success']:.2f}",
                            eval=f"{last_eval:.2f}")
        bar.close()
        return self.summary()

    def _eval_only(self) -> dict:
        out = evaluate(self.model, self.cfg, self.tok)
        return {"reward": out["eval_reward"], "success": out["eval_success"], "tool_calls": out["eval_tool_calls"],
                "entropy": None, **out}

    def train_step(self) -> tuple[dict, StepBatch, torch.Tensor]:
        """Sample, score, branch and update once. In a data-parallel run every rank draws the same prompts,
        generates, scores and branches only the ones it owns, and the update sums the gradients over ranks:
        the result is the single-process one for the same seed (up to float rounding)."""
        cfg, step = self.cfg, self.step
        rng = seeding.rng(cfg.seed, step, "tasks")
        tasks = [new_task(cfg, rng) for _ in range(cfg.prompts_per_step)]
        omega_model = {"prev_policy": self.prev, "reference": self.ref, "behavior": None}[cfg.omega_source]
        batch = self.algorithm.collect(cfg, self.model, tasks, self.tok, (cfg.seed, step), _shard(len(tasks)),
                                       omega_model)
        adv, loss_mask = self.algorithm.advantages(cfg, batch)
        with torch.no_grad():
            self.model.eval()
            behaviour = algorithms.policy_token_stats(self.model, batch.tokens, batch.attention, batch.gen_mask,
                                                      cfg.backend)
            logp_ref = algorithms.policy_token_stats(self.ref, batch.tokens, batch.attention, loss_mask,
                                                     cfg.backend).logp
        self.prev = copy.deepcopy(self.model).eval().requires_grad_(False)
        losses = self._update(batch, adv, loss_mask, behaviour.logp, logp_ref,
                              seeding.generator(cfg.seed, step, "minibatches"))
        self.step += 1
        initial = batch.gen_mask & ~batch.is_branch[:, None]
        sc = batch.scores
        total = all_sum({
            "rows": len(batch.rows),
            "new_tokens": sum(r.num_generated - (0 if r.parent < 0 else sum(k == GEN for k in r.kinds[:r.split + 1]))
                              for r in batch.rows),
            "reward": float(batch.rewards.sum()), "success": sum(e.success for e in batch.episodes),
            "tool_calls": sum(r.calls for r in batch.rows), "format": sum(e.well_formed for e in batch.episodes),
            "entropy": float(behaviour.entropy[initial].sum()), "entropy_tokens": int(initial.sum()),
            "branches": int(batch.is_branch.sum()), "candidates": 0 if sc is None else int(sc.candidate.sum()),
            "eligible": 0 if sc is None else int(torch.isfinite(sc.score).sum()), "forks": len(batch.forks),
            **(self._fork_places(batch) if cfg.model is None else {})})
        self.gen_tokens += int(total["new_tokens"])
        rows = total["rows"]
        record = {"algo": cfg.algo, "seed": cfg.seed, "step": self.step, "gen_tokens": self.gen_tokens,
                  "reward": total["reward"] / rows, "success": total["success"] / rows,
                  "tool_calls": total["tool_calls"] / rows,
                  "entropy": _ratio(total["entropy"], total["entropy_tokens"]),    # over the initial rollouts
                  "format": total["format"] / rows, "branches": int(total["branches"]),
                  "candidate_share": _ratio(total["candidates"], total["eligible"]),
                  # the tiny model's tasks only (the sign-off decoy, tasks.decision_positions); None otherwise
                  "post_answer_forks": _ratio(total.get("post_answer_forks", 0), total["forks"] * (cfg.model is None)),
                  "decision_forks": _ratio(total.get("decision_forks", 0), total["forks"] * (cfg.model is None)),
                  "ranks": self.world_size,
                  "backend": self.backend, **losses}
        return record, batch, adv

    def _update(self, batch: StepBatch, adv, loss_mask, logp_old, logp_ref, gen) -> dict:
        """One PPO epoch over mini-batches of prompts. Each rank computes its rows' share of the mini-batch's
        token-mean loss (divided by the token count over all ranks); the gradients are summed over ranks,
        so the step equals the single-process one. Rows without trainable tokens are skipped."""
        cfg = self.cfg
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        order = torch.randperm(len(batch.tasks), generator=gen)
        sums = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
        n = 0
        for start in range(0, len(order), cfg.minibatch_prompts):
            groups = order[start:start + cfg.minibatch_prompts]
            rows = torch.nonzero(torch.isin(batch.group, groups) & loss_mask.any(1)).flatten()
            local_tokens = int(loss_mask[rows].sum())
            tokens = all_sum({"tokens": local_tokens})["tokens"]
            if not tokens:
                continue
            self.opt.zero_grad(set_to_none=True)
            local = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}      # kl, clip_fraction: token sums
            if len(rows):
                width = int(batch.attention[rows].sum(1).max())
                tok, att, lm = batch.tokens[rows, :width], batch.attention[rows, :width], loss_mask[rows, :width]
                lp_old, a = logp_old[rows, :width], adv[rows, :width]
                logp = algorithms.policy_token_stats(self.model, tok, att, lm, cfg.backend).logp
                a = self.algorithm.loss_advantages(cfg, logp.detach(), lp_old, a, lm)
                out = ak.policy_loss(logp, lp_old, a, lm, logp_ref=logp_ref[rows, :width], kl_coef=cfg.kl_coef,
                                     token_count=tokens)
                out.loss.backward()
                local = {"loss": out.loss.item(), "kl": out.kl.item() * local_tokens,
                         "clip_fraction": out.clip_fraction.item() * local_tokens}
            if self.world_size > 1:
                _all_reduce_grads(params)
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            self.opt.step()
            total = all_sum(local)
            sums["loss"] += total["loss"]
            sums["kl"] += total["kl"] / tokens
            sums["clip_fraction"] += total["clip_fraction"] / tokens
            n += 1
        return {k: v / max(n, 1) for k, v in sums.items()}

    def _fork_places(self, batch: StepBatch) -> dict[str, int]:
        """How many forks sit after the answer was complete ("post_answer_forks": on the sign-off decoy or the
        space before it; a branch from there can only re-sample what does not matter) and on a token that decides
        the outcome ("decision_forks": `tasks.decision_positions`, a tool name, a key, an operand or operator, the
        answer's value)."""
        space = self.tok.encode(" ")[0]
        wasted = decisive = 0
        decisions: dict[int, set[int]] = {}
        for i, t in batch.forks:
            r = batch.rows[i]
            toks = r.tokens
            ans = max((j for j, x in enumerate(toks) if x == self.tok.ans_id), default=None)
            sign = next((j for j in range(ans, len(toks)) if toks[j] == space), None) if ans is not None else None
            wasted += sign is not None and t >= sign
            if i not in decisions:
                decisions[i] = decision_positions([self.tok.token_text(x) for x in toks[r.prompt_len:]])
            decisive += t - r.prompt_len in decisions[i]
        return {"post_answer_forks": wasted, "decision_forks": decisive}

    # --- report material ---------------------------------------------------------------------------------
    def _save_samples(self, batch: StepBatch, adv: torch.Tensor) -> None:
        """The first `sample_groups` prompts of this step, token by token, for the HTML report."""
        if self.rank > 0:
            return
        shown = set(sorted({r.task for r in batch.rows})[:self.cfg.sample_groups])
        sc = batch.scores
        n_scored = 0 if sc is None else sc.score.shape[0]
        chosen = set(batch.forks)
        out = []
        kind_name = {PROMPT: "prompt", GEN: "gen", TOOL: "tool"}
        for i, r in enumerate(batch.rows):
            if r.task not in shown:
                continue
            ep = batch.episodes[i]
            toks = []
            for t, (tid, k) in enumerate(zip(r.tokens, r.kinds)):
                scored = i < n_scored and k == GEN
                s = float(sc.score[i, t]) if scored else None
                toks.append({"text": self.tok.token_text(tid), "kind": kind_name[k],
                             "score": s if s is None or math.isfinite(s) else None,
                             "entropy": float(sc.entropy[i, t]) if scored else None,
                             "omega": float(sc.omega[i, t]) if scored and sc.omega is not None else None,
                             "advantage": float(adv[i, t]) if k == GEN else None,
                             "candidate": bool(sc.candidate[i, t]) if scored else False,
                             "branch_point": (i, t) in chosen})
            out.append({"algo": self.cfg.algo, "step": self.step, "group": r.task, "index": i,
                        "is_branch": r.parent >= 0, "parent": r.parent, "split": r.split, "reward": ep.reward,
                        "success": ep.success, "answer": ep.answer or "", "gold": batch.tasks[r.task].answer,
                        "prompt": batch.tasks[r.task].prompt, "tokens": toks,
                        "tool_calls": [{"call": c, "result": res} for c, res in ep.calls]})
        (self.out / "samples.json").write_text(json.dumps(out))

    def summary(self) -> dict:
        return summarize(self.records)
