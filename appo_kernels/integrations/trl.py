"""TRL: APPO as a `GRPOTrainer` subclass.

    from appo_kernels.integrations.trl import APPOConfig, APPOTrainer
    args = APPOConfig(output_dir="out", num_generations=16, appo_num_initial=8)
    trainer = APPOTrainer(model="Qwen/Qwen2.5-0.5B-Instruct", reward_funcs=my_reward, args=args,
                          train_dataset=dataset)
    trainer.train()

What changes against GRPO (see docs/trl.md; "method §n" is a section of docs/method.md):

- Rollouts go through TRL's rollout hook (`rollout_func`), driving TRL's own generation backend
  (`transformers.generate` or vLLM): per prompt, `appo_num_initial` initial rollouts are sampled; each is
  scored with `appo_kernels.branching_score` on the trainer's logits (Omega from `appo_omega_source`); the
  group's fork points come from `appo_kernels.select_branch_points` and become branches through
  `appo_kernels.fork_requests` (one host copy); the other `num_generations - appo_num_initial` rows are
  branches: with `appo_branch_mode="resample"` they keep the parent's completion up to and including the fork
  token t and sample a fresh continuation; with `"topk"` (contrastive) they keep tokens 0..t-1, put an
  alternative from the policy's top-k at t, and sample from t + 1 (that substituted token is left out of the
  loss). A group with no usable fork point fills its slots with fresh rollouts.
- Advantages are per token, `[B, T]`, from `appo_kernels.procedure_advantages` (dual-group normalisation,
  prefix credit from the branches that share each token, optional branch-strength scaling); branch rows leave
  the loss unless `appo_train_branches`.
- The loss (`appo_loss=True`) is method §6-§7: future-KL advantage weighting
  (`appo_kernels.future_kl_weights`) and the clip-higher / dual-clip surrogate with a k3 KL to the reference
  (`appo_kernels.policy_loss`), normalised like TRL's "dapo" (token mean over the whole generation batch). With
  `appo_loss=False`, TRL's own `loss_type` consumes the per-token advantages instead.

With TRL's `tools=`, the rollout hook runs the whole tool loop itself (generate a turn, parse its tool calls,
run them, append the results, continue) for initial rollouts and branches, so forks can fall in any turn;
tool-result tokens are context only (no score, no fork, no loss), a branch reuses its prefix's tool results, and
TRL's own tool pass is replaced by the hook's results (`_tool_call_loop`).

With TRL's `environment_factory=`, TRL creates and resets one environment per row as GRPOTrainer does and the
same tool loop calls that row's environment methods. A branch's row has its own environment, reset by TRL from
the same example as its parent's; before the branch continues, the hook replays the prefix's calls to the
environment's methods on it, in order, and requires each replayed result to equal the recorded one (the
environment must be deterministic; a difference raises). Rewards receive `environments` as in TRL.

Not supported (a clear error, not a silent fallback): async tools or environment methods,
multimodal prompts or tool results, a user `rollout_func`, `scale_rewards="batch"`,
`multi_objective_aggregation="normalize_then_sum"`, a completion for which every reward function returns None
(None from only some of them adds 0, as in TRL), and, with `appo_loss=True`, the GRPO loss options it does not
implement (sequence-level importance sampling, entropy masks / bonuses, off-policy masks, two-sided `delta`
clipping).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .. import (branching_score, fork_requests, future_kl_weights, policy_loss, procedure_advantages,
                select_branch_points, token_stats)
from ..branch_points import FORK_MODES, TOPK_CHOICES, ForkRequest

# The adapter overrides and calls private GRPOTrainer methods, which TRL changes between minor releases: it is
# tested with these releases only, and importing it checks the installed TRL against them (`check_trl`).
TESTED_TRL = ">=1.16,<1.17"
TESTED_TRL_RELEASES = ("1.16.0",)
# Overridden: TRL calls them with exactly these parameters.
_OVERRIDDEN = {
    "GRPOTrainer._calculate_rewards": ("self", "inputs", "prompts", "completions", "completion_ids_list"),
    "GRPOTrainer._generate_and_score_completions": ("self", "inputs"),
    "GRPOTrainer._compute_loss": ("self", "model", "inputs"),
    "GRPOTrainer._tool_call_loop": ("self", "prompts", "prompt_ids", "completion_ids", "completions", "logprobs",
                                    "images", "multimodal_fields")}
# Called: the adapter passes these leading parameters; any later ones must have defaults.
_CALLED = {
    "GRPOTrainer._tokenize_prompts": ("self", "prompts"),
    "GRPOTrainer._generate_single_turn": ("self", "prompt_ids", "images", "multimodal_fields", "num_generations"),
    "GRPOTrainer._get_per_token_logps_and_entropies": ("self", "model", "input_ids", "attention_mask",
                                                       "logits_to_keep"),
    "GRPOTrainer._get_tool_suffix_ids": ("self", "tool_messages"),
    "chat_template_utils.parse_response": ("tokenizer", "ids", "prefix", "tools")}
_INIT_KEYWORDS = ("rollout_func", "tools", "environment_factory")
# GRPOConfig fields APPOConfig reads or re-defaults (a re-default of a field TRL dropped would be a dead setting).
_CONFIG_FIELDS = ("num_generations", "per_device_train_batch_size", "steps_per_generation", "use_vllm", "beta",
                  "epsilon_high", "scale_rewards", "multi_objective_aggregation", "importance_sampling_level",
                  "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "off_policy_mask_threshold",
                  "delta")
# Set by GRPOTrainer.__init__ and read by the adapter: checked when an APPOTrainer is built.
_ATTRIBUTES = ("_metrics", "_logs", "_tokenizer", "tools", "environment_factories", "eos_token_ids", "ref_model",
               "reward_weights", "num_generations_eval", "max_tool_calling_iterations")
# With `environment_factory`: set by GRPOTrainer.__init__ (checked on construction) and by
# GRPOTrainer._generate_and_score_completions before the rollout hook (checked in the hook), per row of the batch
# (`_sync_tool_dicts` only when there are tools).
_ENVIRONMENT_ATTRIBUTES = ("environments", "_env_tools")
_BATCH_ATTRIBUTES = ("environments", "_batch_environments", "_sync_tool_dicts")
INSTALL_HINT = (f"in a clone of the appo_kernels repository, pip install \".[trl]\" (or pip install "
                f"\"trl{TESTED_TRL}\"); see docs/trl.md")


def _untested(version: str, problems: list[str]) -> str:
    return (f"appo_kernels.integrations.trl is tested with trl{TESTED_TRL} (releases "
            f"{', '.join(TESTED_TRL_RELEASES)}) and relies on GRPOTrainer's private hooks; the installed trl {version} "
            f"does not match: {'; '.join(problems)}. Install a tested release: {INSTALL_HINT}")


def check_trl(trl) -> None:
    """Raise ImportError, naming the tested releases, unless `trl`'s version is in `TESTED_TRL` and GRPOTrainer /
    GRPOConfig have every hook, parameter and field the adapter relies on."""
    from packaging.specifiers import SpecifierSet

    problems = []
    if trl.__version__ not in SpecifierSet(TESTED_TRL, prereleases=True):
        problems.append(f"version {trl.__version__} is outside {TESTED_TRL}")
    for name, expected in (_OVERRIDDEN | _CALLED).items():
        owner, attr = name.rsplit(".", 1)
        fn = getattr(trl.GRPOTrainer if owner == "GRPOTrainer" else importlib.import_module(f"trl.{owner}"), attr, None)
        if not callable(fn):
            problems.append(f"{name} is missing")
            continue
        params = inspect.signature(fn).parameters
        names = tuple(params)
        if name in _OVERRIDDEN:
            fits = names == expected
        else:
            fits = names[:len(expected)] == expected and all(
                p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                for p in list(params.values())[len(expected):])
        if not fits:
            problems.append(f"{name}({', '.join(names)}) is not ({', '.join(expected)}"
                            f"{'' if name in _OVERRIDDEN else ', <optional ...>'})")
    init = inspect.signature(trl.GRPOTrainer.__init__).parameters
    problems += [f"GRPOTrainer.__init__ has no `{k}` parameter" for k in _INIT_KEYWORDS if k not in init]
    fields = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    problems += [f"GRPOConfig has no field `{k}`" for k in _CONFIG_FIELDS if k not in fields]
    if problems:
        raise ImportError(_untested(trl.__version__, problems))


def _check_attributes(trainer) -> None:
    """The attributes GRPOTrainer.__init__ sets that the adapter reads (only an instance has them)."""
    problems = [f"GRPOTrainer.__init__ sets no `{name}`" for name in _ATTRIBUTES if not hasattr(trainer, name)]
    if getattr(trainer, "environment_factories", None) is not None:
        problems += [f"GRPOTrainer.__init__ sets no `{name}` with environment_factory"
                     for name in _ENVIRONMENT_ATTRIBUTES if not hasattr(trainer, name)]
    if not problems and not ({"train", "eval"} <= trainer._metrics.keys() and "advantages" in trainer._logs):
        problems.append("GRPOTrainer._metrics has no 'train' and 'eval' or _logs no 'advantages'")
    if problems:
        raise RuntimeError(_untested(_trl.__version__, problems))


def _import_trl():
    try:
        trl = importlib.import_module("trl")
    except ImportError as err:
        raise ImportError(f"trl is needed for appo_kernels.integrations.trl and is not installed: "
                          f"{INSTALL_HINT}") from err
    check_trl(trl)
    return trl


_trl = _import_trl()
_parse_response = importlib.import_module("trl.chat_template_utils").parse_response

OMEGA_SOURCES = ("prev_policy", "reference", "behavior", "none")


@dataclass
class APPOConfig(_trl.GRPOConfig):
    """`trl.GRPOConfig` plus APPO's settings. Defaults follow method §5-§8: half of `num_generations` are
    initial rollouts, clip-higher `epsilon_high = 0.28`, dual clip c = 3, KL coefficient `beta = 0.001` (TRL then
    loads a reference model; set `beta=0.0` to skip it)."""

    appo_num_initial: int | None = field(default=None, metadata={
        "help": "Initial rollouts per prompt; the other num_generations - appo_num_initial are branches. "
                "None: num_generations // 2."})
    appo_omega_source: str = field(default="prev_policy", metadata={
        "help": "What logp_old in Omega (method §2) is: 'prev_policy' (a copy of the policy from the previous "
                "generation round, one extra model in memory; entropy-only on the first round), 'reference' "
                "(TRL's reference model, needs beta > 0), 'behavior' (the sampler's log-probs, needs use_vllm), "
                "or 'none' (the entropy-only ablation)."})
    appo_branch_strength_scaling: bool = field(default=True, metadata={
        "help": "Scale advantages before each fork by its Branching Score (method §5, M)."})
    appo_branch_mode: str = field(default="resample", metadata={
        "help": "How a branch forks at token t (method §4): 'resample' keeps tokens 0..t and samples from t + 1; "
                "'topk' (contrastive) keeps tokens 0..t-1, replaces token t by another of the policy's top "
                "appo_branch_topk tokens there (appo_topk_choice), and samples from t + 1. The substituted token "
                "was not sampled from the policy and is left out of the loss."})
    appo_topk_choice: str = field(default="best", metadata={
        "help": "With appo_branch_mode='topk': 'best' takes the most likely top-k token other than token t, "
                "'sample' draws one from the top-k probabilities renormalised without it (torch's global RNG, "
                "which TRL seeds)."})
    appo_branch_topk: int = field(default=4, metadata={
        "help": "With appo_branch_mode='topk': k (>= 2) of the top-k the alternatives come from, computed by "
                "branching_score in the scoring pass."})
    appo_train_branches: bool = field(default=False, metadata={
        "help": "Train branch continuations with their own group advantage (method §5 option)."})
    appo_loss: bool = field(default=True, metadata={
        "help": "Use APPO's loss (future-KL weighting + dual clip, method §6-§7) instead of TRL's loss_type."})
    appo_future_kl: bool = field(default=True, metadata={
        "help": "With appo_loss: weight advantages by the future KL (method §6)."})
    appo_clip_ratio_c: float = field(default=3.0, metadata={"help": "Dual-clip constant c (> 1)."})
    appo_score_batch_size: int | None = field(default=None, metadata={
        "help": "Rollouts per forward pass when scoring (each pass holds [rows, T, V] logits); None: "
                "per_device_train_batch_size."})
    appo_backend: str = field(default="auto", metadata={"help": "appo_kernels backend for every op."})
    epsilon_high: float | None = field(default=0.28, metadata={
        "help": "Upper clip epsilon (clip-higher, method §7)."})
    beta: float = field(default=0.001, metadata={
        "help": "KL(pi || pi_ref) coefficient, k3 estimator (method §7); 0.0 loads no reference model."})

    def __post_init__(self):
        # APPO's checks first: they read only fields as given, and GRPOConfig's own checks would otherwise answer
        # first for a setting APPO refuses anyway.
        self._check_appo()
        super().__post_init__()

    def _check_appo(self) -> None:
        if self.appo_omega_source not in OMEGA_SOURCES:
            raise ValueError(f"appo_omega_source: expected one of {OMEGA_SOURCES}, got {self.appo_omega_source!r}")
        if self.appo_branch_mode not in FORK_MODES:
            raise ValueError(f"appo_branch_mode: expected one of {FORK_MODES}, got {self.appo_branch_mode!r}")
        if self.appo_topk_choice not in TOPK_CHOICES:
            raise ValueError(f"appo_topk_choice: expected one of {TOPK_CHOICES}, got {self.appo_topk_choice!r}")
        k = self.appo_branch_topk
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 2):
            raise ValueError(f"appo_branch_topk: expected an int >= 2 (the parent's token and at least one "
                             f"alternative), got {k!r}")
        if not self.num_generations >= 3:
            raise ValueError(f"num_generations: APPO needs at least 3 rollouts per prompt; with {self.num_generations} "
                             f"every (prompt, initial/branch) group holds at most one rollout, so every dual-group "
                             f"advantage is 0 (method §5)")
        n_init = self.appo_num_initial
        if n_init is not None and not (isinstance(n_init, int) and 1 <= n_init < self.num_generations):
            raise ValueError(f"appo_num_initial: expected an int in [1, num_generations - 1 = "
                             f"{self.num_generations - 1}], got {n_init!r}")
        if self.appo_omega_source == "behavior" and not self.use_vllm:
            raise ValueError("appo_omega_source: 'behavior' needs the sampler's log-probs, which TRL only returns "
                             "with use_vllm=True (transformers.generate returns none); use 'prev_policy'")
        if self.appo_omega_source == "reference" and self.beta == 0.0:
            raise ValueError("appo_omega_source: 'reference' needs TRL's reference model, which it loads only when "
                             "beta > 0; got beta=0.0")
        if self.scale_rewards not in ("group", "none", True, False):     # GRPOConfig maps True / False to these
            raise ValueError(f"scale_rewards: APPO normalises within (prompt, initial/branch) groups, so 'group' "
                             f"or 'none' (method §5); got {self.scale_rewards!r}")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"multi_objective_aggregation: APPO needs one scalar reward per completion, so "
                             f"'sum_then_normalize'; got {self.multi_objective_aggregation!r}")
        if self.appo_score_batch_size is not None and not (isinstance(self.appo_score_batch_size, int)
                                                           and self.appo_score_batch_size >= 1):
            raise ValueError(f"appo_score_batch_size: expected a positive int or None, got "
                             f"{self.appo_score_batch_size!r}")
        if not self.appo_clip_ratio_c > 1.0:
            raise ValueError(f"appo_clip_ratio_c: expected a dual-clip constant > 1, got {self.appo_clip_ratio_c}")
        if self.appo_loss:
            unsupported = {"importance_sampling_level": (self.importance_sampling_level, "token"),
                           "top_entropy_quantile": (self.top_entropy_quantile, 1.0),
                           "entropy_coef": (self.entropy_coef, 0.0),
                           "use_adaptive_entropy": (self.use_adaptive_entropy, False),
                           "off_policy_mask_threshold": (self.off_policy_mask_threshold, None),
                           "delta": (self.delta, None)}
            for name, (value, default) in unsupported.items():
                if value != default:
                    raise ValueError(f"{name}: not implemented by APPO's loss (appo_loss=True), which expects "
                                     f"{default!r}; got {value!r}. Set appo_loss=False to use TRL's loss_type.")

    @property
    def num_initial(self) -> int:
        return self.appo_num_initial or self.num_generations // 2


def _pad_rows(rows: list[list], value) -> Tensor:
    """Right-pad lists of numbers into a `[R, max(1, longest)]` tensor."""
    width = max([1] + [len(r) for r in rows])
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


class _Turn(NamedTuple):
    start: int          # where an assistant turn starts in the completion
    messages: int       # completion messages before it
    calls: int          # tool calls before it
    failures: int       # failed tool calls before it


@dataclass
class _Rollout:
    """A completion being built: its token ids, which of them the policy sampled (1) and which a tool returned
    (0), the sampler's log-probs (None when the backend returns none; 0 on tool tokens), TRL's completion
    messages (assistant turns and tool results) and where each assistant turn starts."""
    ids: list[int] = field(default_factory=list)
    model: list[int] = field(default_factory=list)
    logprobs: list[float] | None = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    turns: list[_Turn] = field(default_factory=lambda: [_Turn(0, 0, 0, 0)])

    def extend(self, ids: list[int], model: int, logprobs: list[float] | None) -> None:
        self.ids += ids
        self.model += [model] * len(ids)
        self.logprobs = None if logprobs is None or self.logprobs is None else self.logprobs + list(logprobs)

    def fork(self, request: ForkRequest) -> _Rollout:
        """A branch's start (`fork_requests`): tokens 0..t-1, earlier tool results included (reused, not run
        again; with environments, `APPOTrainer._replay` then brings the branch's environment to their state),
        then the request's token at t, and the turns before the one that holds t (which the branch finishes).
        The token at t is the parent's own (mode "resample": its sampler log-prob is kept) or a substitute (mode
        "topk": not sampled, so no sampler log-prob; NaN, which TRL's importance sampling treats as
        unavailable)."""
        t = request.position
        turns = [turn for turn in self.turns if turn.start <= t]
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprobs[:t] + [self.logprobs[t] if request.split == t else float("nan")]
        return _Rollout(self.ids[:t] + [request.token], self.model[:t + 1], logprobs,
                        self.messages[:turns[-1].messages], turns)


class _Scores(NamedTuple):
    """The initial rollouts' Branching Score and candidates `[R, T]`, and top-k ids / log-probs `[R, T, k]`
    (k = 0 in resample mode)."""
    score: Tensor
    candidate: Tensor
    topk_ids: Tensor
    topk_logp: Tensor


class _Tools(NamedTuple):
    """A row's tools: the schema its prompt was rendered with (and its turns are parsed with), the functions its
    calls run by name, and its environment (None without `environment_factory`)."""
    schema: list
    functions: dict
    environment: object


def _run_call(call: dict, functions: dict) -> tuple[dict, bool]:
    """Run one parsed tool call as TRL's `_tool_call_loop` does: the tool message the model reads (a failing
    call's is `{"error": ...}`) and whether it failed."""
    if call["type"] != "function":
        return {"role": "tool", "name": call.get("name", "unknown"),
                "content": str({"error": f"Unsupported tool call type: {call['type']}"})}, True
    name = call["function"]["name"]
    try:
        if name not in functions:
            raise ValueError(f"Tool {name} not found.")
        result, failed = functions[name](**call["function"]["arguments"]), False
    except Exception as err:                        # the model's call failed: the model reads the error
        result, failed = {"error": str(err)}, True
    if isinstance(result, list):
        raise NotImplementedError(f"tools: {name} returned a list of content blocks (a multimodal tool result), "
                                  f"which APPOTrainer does not support; return a string")
    return {"role": "tool", "name": name, "content": str(result)}, failed


def _num_groups(prompts: list, group_size: int, environments: bool = False) -> int:
    """Rows come as blocks of `group_size` copies of one prompt (TRL's RepeatSampler); APPO forks within a
    block, so each block must be whole on this process."""
    if len(prompts) % group_size or any(prompts[i] != prompts[i - i % group_size] for i in range(len(prompts))):
        raise ValueError(f"prompts: APPO needs each process's generation batch to hold whole groups of "
                         f"num_generations={group_size} copies of a prompt; got {len(prompts)} rows that do not. "
                         f"Make per_device_train_batch_size * steps_per_generation a multiple of num_generations." +
                         (" With environment_factory, a prompt includes its environment's reset() observation, "
                          "which must be the same for every row of a group (reset() must be deterministic given the "
                          "example): a branch continues its parent's conversation." if environments else ""))
    return len(prompts) // group_size


class APPOTrainer(_trl.GRPOTrainer):
    """`trl.GRPOTrainer` running APPO: branched rollouts, per-token procedure advantages and APPO's loss.

    Takes GRPOTrainer's arguments with `args` an `APPOConfig`. Extra fields the rollout hook returns reach the
    reward functions as keyword arguments, one value per completion: `appo_parent` (row of the parent in the
    process's batch, -1 for an initial rollout), `appo_split` (last completion position shared with the
    parent: the fork token t in mode "resample", t - 1 in mode "topk", so -1 for a topk branch forked at the
    first completion token) and `appo_branch_score` (the fork token's Branching Score).
    """

    def __init__(self, model, reward_funcs, args: APPOConfig | None = None, *pos, rollout_func=None, **kwargs):
        if rollout_func is not None:
            raise ValueError("rollout_func: APPOTrainer generates through its own rollout hook (initial rollouts, "
                             "then branches); it cannot take another one")
        given = inspect.signature(_trl.GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *pos, **kwargs)
        # before GRPOTrainer's own checks of the tools (chat template, transformers version)
        for tool in given.arguments.get("tools") or []:
            if inspect.iscoroutinefunction(tool):
                raise NotImplementedError(f"tools: {tool.__name__} is async; APPOTrainer's tool loop runs "
                                          f"synchronous tools only")
        args = APPOConfig() if args is None else args
        if not isinstance(args, APPOConfig):
            raise TypeError(f"args: expected an APPOConfig, got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *pos, **kwargs)
        _check_attributes(self)
        for tools in (self._env_tools if self.environment_factories is not None else {}).values():
            for tool in tools:                      # an environment's methods: known once TRL has probed one
                if inspect.iscoroutinefunction(tool):
                    raise NotImplementedError(f"environment_factory: {tool.__qualname__} is async; APPOTrainer's "
                                              f"tool loop runs synchronous tools only")
        sharded = getattr(self, "is_fsdp_enabled", False) or (
            getattr(self, "is_deepspeed_enabled", False)
            and getattr(self.accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3)
        if args.appo_omega_source == "prev_policy" and sharded:
            raise NotImplementedError("appo_omega_source: 'prev_policy' keeps a deep copy of the policy, which "
                                      "sharded parameters (FSDP, DeepSpeed ZeRO-3) do not allow; use 'reference' "
                                      "or 'none'")
        if args.appo_omega_source == "reference" and self.ref_model is None:
            raise ValueError("appo_omega_source: 'reference' needs a separate reference model (PEFT adapters "
                             "share weights with the policy); use 'prev_policy'")
        self.rollout_func = self.appo_rollout       # TRL's rollout hook; set here to skip its experimental warning
        self._appo_tools = {tool.__name__: tool for tool in self.tools}   # without environments: every row's
        self._appo_rollouts = None                  # the hook's rollouts, for `_tool_call_loop`
        self._prev_policy = None
        self._rewards_per_func = None

    # ---------------------------------------------------------------------------------------------------------
    # Rollouts: initial, scored, forked
    # ---------------------------------------------------------------------------------------------------------

    def appo_rollout(self, prompts: list, trainer=None) -> dict:
        """TRL's `rollout_func(prompts, trainer)`: one completion per row of `prompts` (blocks of
        `num_generations` copies of a prompt), returned as token-id lists with the APPO tree as extra fields.
        With `tools`, every rollout runs the whole tool loop here (`_roll`), so forks can fall in any turn; with
        `environment_factory`, row r's tool calls go to TRL's environment for row r (`_row_tools`), which a branch
        first brings to its prefix's state (`_replay`)."""
        if self.environment_factories is not None:
            missing = [name for name in _BATCH_ATTRIBUTES
                       if not hasattr(self, name) and (self.tools or name != "_sync_tool_dicts")]
            if missing:
                raise RuntimeError(_untested(_trl.__version__, [f"GRPOTrainer._generate_and_score_completions sets "
                                                                f"no `{name}` with environment_factory"
                                                                for name in missing]))
        prompt_ids, images, multimodal = self._tokenize_prompts(prompts)
        if images is not None or multimodal:
            raise NotImplementedError("prompts: multimodal prompts are not supported by APPOTrainer")
        if self.tools and not _trl.is_conversational({"prompt": prompts[0]}):
            raise ValueError("prompts: with tools, APPOTrainer needs conversational prompts (lists of messages), "
                             "whose chat template renders the tools and parses the tool calls")
        prompt_ids = [list(p) for p in prompt_ids]
        rows = len(prompt_ids)
        tools = [self._row_tools(r) for r in range(rows)]
        parent, split, strength = [-1] * rows, [0] * rows, [0.0] * rows
        if not self.model.training:                 # evaluation: plain sampling, every rollout initial
            done = self._roll(prompt_ids, [_Rollout() for _ in range(rows)], self.num_generations_eval, tools)
            return self._rollout_output(prompt_ids, done, parent, split, strength)

        size, n_init = self.num_generations, self.args.num_initial
        groups = _num_groups(prompts, size, environments=self.environment_factories is not None)
        initial = [g * size + j for g in range(groups) for j in range(n_init)]
        init = self._roll([prompt_ids[r] for r in initial], [_Rollout() for _ in initial], 1,
                          [tools[r] for r in initial])
        tokens = _pad_rows([r.ids for r in init], self._tokenizer.pad_token_id)
        scores = self._score_initial([prompt_ids[r] for r in initial], init, tokens)
        group = torch.arange(len(initial)) // n_init
        bp = select_branch_points(scores.score, scores.candidate, group, size - n_init, num_groups=groups,
                                  max_len=self.max_completion_length)
        requests = fork_requests(bp, tokens, mode=self.args.appo_branch_mode, topk_ids=scores.topk_ids,
                                 topk_logp=scores.topk_logp, choice=self.args.appo_topk_choice).tolist()

        done = [None] * rows
        for k, r in enumerate(initial):
            done[r] = init[k]
        slots = [g * size + j for g in range(groups) for j in range(n_init, size)]
        heads = {r: _Rollout() for r in slots}      # a slot without a fork point: a fresh rollout
        for q in requests:
            r = q.group * size + n_init + q.slot
            parent[r], split[r], strength[r] = initial[q.rollout], q.split, q.score
            heads[r] = init[q.rollout].fork(q)
            self._replay(heads[r], tools[r], r, initial[q.rollout])
        for r, rollout in zip(slots, self._roll([prompt_ids[r] for r in slots], [heads[r] for r in slots], 1,
                                                [tools[r] for r in slots])):
            done[r] = rollout
        self._log_rollout_metrics(bp)
        return self._rollout_output(prompt_ids, done, parent, split, strength)

    def _rollout_output(self, prompt_ids, done: list[_Rollout], parent, split, strength) -> dict:
        if self.tools:                              # handed to `_tool_call_loop`, which TRL calls next
            self._appo_rollouts = done
        return {"prompt_ids": prompt_ids, "completion_ids": [r.ids for r in done],
                "logprobs": None if done[0].logprobs is None else [r.logprobs for r in done],
                "appo_parent": parent, "appo_split": split, "appo_branch_score": strength}

    def _roll(self, prompt_ids: list[list[int]], rollouts: list[_Rollout], num_generations: int,
              tools: list[_Tools]) -> list[_Rollout]:
        """Continue each rollout (empty, or a branch's head) to its end with TRL's generation backend: with
        `tools`, turn by turn as TRL's tool loop does (parse the turn with the chat template's response parser,
        run its tool calls, append the results as tool tokens, generate the next turn), within
        `max_tool_calling_iterations` tool rounds counted from the start of the completion, so a branch's prefix
        spends the budget too. `num_generations` is for the first call only (TRL's vLLM server mode groups
        identical prompts); later turns differ per row. A head that ends its turn already (a topk branch whose
        substituted token is an end-of-turn id) goes on only to run that turn's tool calls. `tools`: each
        rollout's row's tools (`_row_tools`)."""
        limit = self.max_completion_length
        active = [i for i, r in enumerate(rollouts)
                  if self._goes_on(prompt_ids[i], r, tools[i],
                                   turn_done=bool(r.ids) and r.ids[-1] in self.eos_token_ids)]
        while active:
            new_ids, new_logps = self._generate_single_turn([prompt_ids[i] + rollouts[i].ids for i in active],
                                                            None, {}, num_generations)
            num_generations = 1
            for n, i in enumerate(active):
                keep = limit - len(rollouts[i].ids)   # the first `keep` samples are what max_len would give
                rollouts[i].extend(list(new_ids[n][:keep]), 1, None if new_logps is None else new_logps[n][:keep])
            active = [i for i in active if self._goes_on(prompt_ids[i], rollouts[i], tools[i], turn_done=True)]
        return rollouts

    def _goes_on(self, prompt_ids: list[int], rollout: _Rollout, tools: _Tools, turn_done: bool) -> bool:
        """Whether `_roll` generates again for a rollout: room left, and its last turn open or (with tools)
        followed by that turn's tool results (`_take_turn`, which also records a done turn's message)."""
        if turn_done and not (self.tools and self._take_turn(prompt_ids, rollout, tools)):
            return False
        return len(rollout.ids) < self.max_completion_length

    def _row_tools(self, row: int) -> _Tools:
        """The tools of a row of the batch, as GRPOTrainer has them: `tools=` for every row or, with
        `environment_factory`, the row's environment's schema (`_env_tools`), its functions (the standalone tools
        and the bound methods of TRL's environment instance for that row, `_sync_tool_dicts`) and the instance."""
        if self.environment_factories is None:
            return _Tools(self.tools, self._appo_tools, None)
        return _Tools(self._env_tools[self._batch_environments[row]], self._sync_tool_dicts[row] if self.tools else {},
                      self.environments[row])

    def _take_turn(self, prompt_ids: list[int], rollout: _Rollout, tools: _Tools) -> bool:
        """Parse the rollout's last assistant turn; if it calls tools within the budget and the results fit, run
        them and append the results (tool tokens). True when the rollout goes on to another turn."""
        start = rollout.turns[-1].start
        message = _parse_response(self._tokenizer, rollout.ids[start:], prefix=prompt_ids + rollout.ids[:start],
                                  tools=tools.schema)
        rollout.messages.append(message)
        calls = message.get("tool_calls")
        if not calls or len(rollout.turns) > self.max_tool_calling_iterations:
            return False
        results = [_run_call(call, tools.functions) for call in calls]
        suffix = list(self._get_tool_suffix_ids([result for result, _ in results]))
        total = len(rollout.ids) + len(suffix)
        if total > self.max_completion_length or len(prompt_ids) + total >= self.model.config.max_position_embeddings:
            return False                            # as TRL: results that do not fit end the rollout unrun
        rollout.extend(suffix, 0, [0.0] * len(suffix))
        rollout.messages += [result for result, _ in results]
        previous = rollout.turns[-1]
        rollout.turns.append(_Turn(len(rollout.ids), len(rollout.messages), previous.calls + len(calls),
                                   previous.failures + sum(failed for _, failed in results)))
        return True

    def _replay(self, head: _Rollout, tools: _Tools, row: int, parent: int) -> None:
        """With `environment_factory`: bring a branch's environment (TRL's instance for its row, reset from the
        same example as its parent's) to the state its prefix left the parent's in, by calling again, in order,
        each call of the prefix that went to an environment method. Each replayed result must equal the one the
        prefix recorded (the model read it; the branch keeps those tokens), else the environment is not
        deterministic and the branch would continue from a state its prefix does not show: a RuntimeError. Calls to
        standalone tools (and failed lookups) are not run again; their recorded results are the branch's."""
        if tools.environment is None:
            return
        messages = head.messages
        for i, message in enumerate(messages):
            for j, call in enumerate(message.get("tool_calls") or ()):     # its results: messages i + 1 ...
                function = tools.functions.get(call["function"]["name"]) if call["type"] == "function" else None
                if getattr(function, "__self__", None) is not tools.environment:
                    continue
                recorded = messages[i + 1 + j]
                replayed, _ = _run_call(call, tools.functions)
                if replayed != recorded:
                    raise RuntimeError(
                        f"environment_factory: a branch (row {row}) replays its prefix's tool calls on its own "
                        f"environment to reach the state its parent (row {parent}) had at the fork, but "
                        f"{call['function']['name']}(**{call['function']['arguments']!r}) returned "
                        f"{replayed['content']!r} where the parent got {recorded['content']!r}. APPOTrainer needs "
                        f"environments whose reset() and methods are deterministic: the same example and the same "
                        f"calls in the same order give the same results")

    def _tool_call_loop(self, prompts, prompt_ids, completion_ids, completions, logprobs, images, multimodal_fields):
        """TRL's tool loop, which it runs after the rollout hook: the hook already ran every tool call (in every
        turn of initial rollouts and branches), so this hands TRL its results instead of running a second pass."""
        done, self._appo_rollouts = self._appo_rollouts, None
        if done is None or [r.ids for r in done] != [list(c) for c in completion_ids]:
            raise RuntimeError("_tool_call_loop: expected the tool results of APPOTrainer's own rollout hook for "
                               "these completions")
        return ([r.model for r in done], [r.messages for r in done], completion_ids, logprobs,
                sum(r.turns[-1].calls for r in done), sum(r.turns[-1].failures for r in done), [[] for _ in done])

    def _completion_logits(self, model, prompt_ids: list[list[int]], tokens: Tensor, lengths: Tensor) -> Tensor:
        """`[R, T, V]` logits that predict each completion token (left-padded prompts, right-padded
        completions, the same inputs TRL's loss forward sees)."""
        device = self.accelerator.device
        pad = self._tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        left = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
        left_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
        comp_mask = (torch.arange(tokens.shape[1])[None] < lengths[:, None]).long()
        ids = torch.cat([left, torch.where(comp_mask.bool(), tokens, pad)], 1).to(device)
        attention = torch.cat([left_mask, comp_mask], 1).to(device)
        with torch.no_grad(), self.accelerator.autocast():
            return model(input_ids=ids, attention_mask=attention, logits_to_keep=tokens.shape[1] + 1).logits[:, :-1]

    def _score_initial(self, prompt_ids: list[list[int]], rollouts: list[_Rollout], tokens: Tensor) -> _Scores:
        """Branching Score and candidates `[R, T]` (CPU) of the initial rollouts (`tokens`, their padded ids) over
        the policy's own tokens (tool results are context, not scored), with the top-k the topk branch mode
        picks from, in row chunks of `appo_score_batch_size` (the score is per rollout, so chunking changes
        nothing)."""
        source = self.args.appo_omega_source
        policy = self.accelerator.unwrap_model(self.model)
        old_model = {"prev_policy": self._prev_policy, "reference": self.ref_model}.get(source)
        topk = self.args.appo_branch_topk if self.args.appo_branch_mode == "topk" else 0
        lengths = torch.tensor([len(r.ids) for r in rollouts])
        mask = _pad_rows([r.model for r in rollouts], 0).bool()
        eligible = mask & ~torch.isin(tokens, torch.tensor(self.eos_token_ids))
        behavior = None if rollouts[0].logprobs is None else _pad_rows([r.logprobs for r in rollouts], 0.0).float()
        parts, omega_sum, with_omega = [], 0.0, False
        chunk = self.args.appo_score_batch_size or self.args.per_device_train_batch_size
        dev = self.accelerator.device
        for lo in range(0, len(rollouts), chunk):
            sl = slice(lo, lo + chunk)
            logits = self._completion_logits(policy, prompt_ids[sl], tokens[sl], lengths[sl])
            tok, m = tokens[sl].to(dev), mask[sl].to(dev)
            logp_old = None
            if source == "behavior":
                logp_old = behavior[sl].to(dev)
            elif old_model is not None:
                old_logits = self._completion_logits(old_model, prompt_ids[sl], tokens[sl], lengths[sl])
                logp_old = token_stats(old_logits, tok, mask=m, temperature=self.temperature,
                                       backend=self.args.appo_backend).logp
            bs = branching_score(logits, tok, logp_old, m, eligible=eligible[sl].to(dev),
                                 temperature=self.temperature, topk=topk, backend=self.args.appo_backend)
            parts.append((bs.score.float(), bs.candidate, bs.topk_ids, bs.topk_logp))
            if bs.omega is not None:
                omega_sum, with_omega = omega_sum + float((bs.omega * m).sum()), True
        if with_omega:
            self._metrics["train"]["appo/omega_mean"].append(omega_sum / max(int(mask.sum()), 1))
        if source == "prev_policy":                 # this round's policy is the next round's previous one
            if self._prev_policy is None:
                self._prev_policy = copy.deepcopy(policy).requires_grad_(False)
                # accelerate's mixed-precision `forward` wrapper is an instance attribute closing over the
                # original model: a copy keeping it would run the live policy. Use the class's forward.
                self._prev_policy.__dict__.pop("forward", None)
            else:
                self._prev_policy.load_state_dict(policy.state_dict())
        return _Scores(*(torch.cat(part).cpu() for part in zip(*parts)))

    def _log_rollout_metrics(self, bp) -> None:
        metrics = self._metrics["train"]
        metrics["appo/forked_fraction"].append(float(bp.valid.float().mean()))
        metrics["appo/fork_candidate_fraction"].append(float((bp.candidate & bp.valid).float().sum()
                                                             / bp.valid.float().sum().clamp(min=1)))
        if bool(bp.valid.any()):
            metrics["appo/fork_position_mean"].append(float(bp.position[bp.valid].float().mean()))

    # ---------------------------------------------------------------------------------------------------------
    # Advantages: per token, from the tree
    # ---------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # Kept for `_generate_and_score_completions`, which needs the raw rewards, not GRPO's normalised ones.
        self._rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        return self._rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """GRPO's batch with `advantages` replaced by APPO's per-token `[B, T]` ones and `tool_mask` (which
        TRL's loss multiplies into its mask) narrowed to APPO's loss mask."""
        output = super()._generate_and_score_completions(inputs)
        per_func, self._rewards_per_func = self._rewards_per_func, None
        unscored = int(torch.isnan(per_func).all(dim=1).sum())
        if unscored:
            # TRL would leave such a completion out of its group's baseline; APPO's tree needs every reward.
            raise ValueError(f"reward_funcs: every reward function returned None for {unscored} completion(s); APPO "
                             f"needs a reward for every completion: at least one function must return a number (None "
                             f"from only some of them adds 0 to the weighted sum, as in TRL)")
        rewards = (per_func * self.reward_weights.to(per_func.device)).nansum(dim=1)
        rows = len(inputs)
        rank = self.accelerator.process_index
        rewards = rewards[rank * rows:(rank + 1) * rows]
        device = rewards.device
        train = self.model.training
        size = self.num_generations if train else self.num_generations_eval
        mask = output["completion_mask"].bool()
        if "tool_mask" in output:
            mask &= output["tool_mask"].bool()
        tree = {key: torch.tensor([x[key] for x in inputs], device=device)
                for key in ("appo_parent", "appo_split", "appo_branch_score")}
        if self.args.appo_branch_mode == "topk":
            # A topk branch's token at split + 1 was put there by the fork rule, not sampled from the policy:
            # like a tool result, it is context for its continuation and carries no advantage and no loss.
            position = torch.arange(mask.shape[1], device=device)
            mask &= ~((tree["appo_parent"] >= 0)[:, None] & (position == tree["appo_split"][:, None] + 1))
        # A topk branch forked at the first completion token has split -1: it shares no completion token with
        # its parent, so it gives the parent's completion no credit (procedure_advantages' convention).
        adv = procedure_advantages(rewards.float(), torch.arange(rows, device=device) // size, tree["appo_parent"],
                                   tree["appo_split"], mask, branch_score=tree["appo_branch_score"].float(),
                                   scale_by_std=self.scale_rewards == "group",
                                   branch_strength_scaling=self.args.appo_branch_strength_scaling,
                                   train_branches=self.args.appo_train_branches, num_groups=rows // size,
                                   backend=self.args.appo_backend)
        advantages, loss_mask, multiplier = adv.advantages, adv.loss_mask, adv.multiplier
        output["advantages"] = advantages
        output["tool_mask"] = loss_mask.long()
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        # TRL's completions table logged GRPO's sequence advantages: show APPO's, as the mean over loss tokens.
        per_row = (advantages * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)
        logged = self._logs["advantages"]
        for _ in range(min(len(logged), rows * self.accelerator.num_processes)):
            logged.pop()
        logged.extend(self.accelerator.gather(per_row).tolist())
        if train:
            initial = loss_mask & (tree["appo_parent"] < 0)[:, None]
            self._metrics["train"]["appo/multiplier_mean"].append(
                float(multiplier[initial].mean()) if bool(initial.any()) else 1.0)
        return output

    # ---------------------------------------------------------------------------------------------------------
    # Loss: method §6-§7
    # ---------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        if not self.args.appo_loss:
            return super()._compute_loss(model, inputs)
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        logps, _, _ = self._get_per_token_logps_and_entropies(
            model, torch.cat([inputs["prompt_ids"], completion_ids], 1),
            torch.cat([inputs["prompt_mask"], completion_mask], 1), completion_ids.size(1))
        mask = completion_mask.bool() & inputs["tool_mask"].bool()
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old
        adv = inputs["advantages"]
        if "importance_sampling_ratio" in inputs:
            # vLLM's correction, folded into the advantage: exact, the surrogate is linear in A and weights >= 0.
            adv = adv * inputs["importance_sampling_ratio"]
        c = self.args.appo_clip_ratio_c
        if self.args.appo_future_kl:
            adv = future_kl_weights(logps.detach(), old, adv, mask, clip_ratio_c=c,
                                    backend=self.args.appo_backend).advantages
        mode = "train" if self.model.training else "eval"
        # TRL's "dapo" normaliser: the generation batch's loss tokens, per process and accumulation step.
        count = inputs["num_items_in_batch"].clamp(min=1) / self.accelerator.num_processes
        if mode == "train":
            count = count * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        out = policy_loss(logps, old, adv, mask, logp_ref=inputs.get("ref_per_token_logps"),
                          eps_low=self.epsilon_low, eps_high=self.epsilon_high, clip_ratio_c=c, kl_coef=self.beta,
                          token_count=float(count))
        gather = self.accelerator.gather
        metrics = self._metrics[mode]
        metrics["appo/pg_loss"].append(gather(out.pg_loss.detach()).mean().item())
        metrics["clip_ratio/region_mean"].append(gather(out.clip_fraction).mean().item())
        metrics["appo/dual_clip_fraction"].append(gather(out.dual_clip_fraction).mean().item())
        if self.beta != 0.0:
            metrics["kl"].append(gather(out.kl).mean().item())
        return out.loss
