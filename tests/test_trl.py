"""The TRL adapter end to end on CPU: a tiny Qwen2 built from a config (no download) trained for a few steps by
APPOTrainer; the rollout tree, the per-token advantages and the loss are checked against the float64 oracle."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import oracle
from transformers import AutoTokenizer
from helpers import run_docs_example
from appo_kernels.branch_points import ForkRequest
from appo_kernels.integrations.trl import APPOConfig, APPOTrainer, _num_groups, _Rollout

CHARS = "abcdefghij +=?"
PROMPTS = ["a+b=", "c+d=", "e+f=", "g+h="]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved character tokenizer (ids: <pad> 0, <eos> 1) and a randomly initialised 2-layer Qwen2."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    path = tmp_path_factory.mktemp("tiny-qwen2")
    vocab = {"<pad>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))      # no merges: one token per character
    backend.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def a_fraction(completions, **_):
    return [c.count("a") / max(len(c), 1) for c in completions]


class Recorder(APPOTrainer):
    """Keeps what the reward function saw, each generation batch, each round's scores of the initial rollouts
    (with the top-k a topk branch picks from), and each loss with its inputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches, self.losses, self.scores = [], [], []

    def _score_initial(self, *args):
        scores = super()._score_initial(*args)
        self.scores.append(scores)
        return scores

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        tree = {k: [x[k] for x in inputs] for k in ("appo_parent", "appo_split", "appo_branch_score")}
        tree["table"] = list(self._logs["advantages"])[-len(inputs):]      # TRL's completions table column
        self.batches.append((tree, {k: v.clone() if torch.is_tensor(v) else v for k, v in out.items()}))
        return out

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        with torch.no_grad():                        # the policy's own log-probs, independently of TRL
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
            attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
            width = inputs["completion_ids"].shape[1]
            logits = model(input_ids=ids, attention_mask=attention).logits[:, -width - 1:-1].double()
            logp = torch.log_softmax(logits / self.temperature, -1).gather(
                -1, inputs["completion_ids"][..., None])[..., 0]
        self.losses.append((loss.detach().double(), logp, {k: v for k, v in inputs.items()}))
        return loss


def train(model_dir, tmp_path, trainer_cls=Recorder, reward=a_fraction, steps=2, **config):
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=12, max_steps=steps, logging_steps=1, report_to="none", use_cpu=True,
                    seed=0, save_strategy="no", learning_rate=1e-2, disable_tqdm=True)
    trainer = trainer_cls(model=model_dir, reward_funcs=reward, args=APPOConfig(**(settings | config)),
                          train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    trainer.train()
    return trainer


def _rows(mask_row):
    return [bool(v) for v in mask_row]


def test_branches_fork_from_their_parents_and_get_procedure_advantages(model_dir, tmp_path):
    trainer = train(model_dir, tmp_path, appo_score_batch_size=3)      # chunks that cut across groups
    forked = varied = 0
    for tree, out in trainer.batches:
        parent, split = tree["appo_parent"], tree["appo_split"]
        assert len(parent) == 8 and _num_groups([0] * 4 + [1] * 4, 4) == 2
        ids, cmask = out["completion_ids"], out["completion_mask"].bool()
        for r, p in enumerate(parent):
            if r % 4 < 2:
                assert p == -1                                   # the first half of each group is initial
            elif p >= 0:
                forked += 1
                assert p // 4 == r // 4 and parent[p] == -1      # forked from an initial rollout of its group
                s = split[r]
                assert torch.equal(ids[r, :s + 1], ids[p, :s + 1])       # the shared prefix, fork token included
                assert int(ids[p, s]) not in trainer.eos_token_ids
                assert s + 1 < int(cmask[r].sum()) <= trainer.max_completion_length   # then a fresh continuation
        # per-token advantages: the float64 oracle on the rewards the reward function returned
        texts = trainer.processing_class.batch_decode(ids, skip_special_tokens=True)
        rewards = a_fraction([t for t in texts])
        expected = oracle.procedure_advantages(rewards, [r // 4 for r in range(8)], parent, split,
                                               [_rows(m) for m in cmask], branch_score=tree["appo_branch_score"],
                                               branch_strength_scaling=True)
        assert out["advantages"].shape == ids.shape
        torch.testing.assert_close(out["advantages"].double(), torch.tensor(expected["advantages"],
                                   dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert torch.equal(out["tool_mask"].bool(), torch.tensor(expected["loss_mask"]))
        assert int(out["num_items_in_batch"]) == sum(map(sum, expected["loss_mask"]))
        table = [sum(a for a, m in zip(row, lm) if m) / max(sum(lm), 1)       # TRL's completions table
                 for row, lm in zip(expected["advantages"], expected["loss_mask"])]
        assert tree["table"] == pytest.approx(table, abs=1e-5)
        varied += sum(len(set(a for a, m in zip(row, lm) if m)) > 1
                      for row, lm in zip(expected["advantages"], expected["loss_mask"]))
    assert forked and varied, "no branch was forked or no advantage varied along a rollout: the test checks nothing"


def without_substituted(tree, mask_rows):
    """The adapter's choice for a topk branch's substituted token (at split + 1): not trained, so out of the
    mask the oracle's advantages are computed on (as a tool token is)."""
    return [[bool(m) and not (p >= 0 and t == s + 1) for t, m in enumerate(row)]
            for row, p, s in zip(mask_rows, tree["appo_parent"], tree["appo_split"])]


def check_topk_forks(trainer, choice, size=4, num_initial=2) -> list[int]:
    """Each branch of a topk round holds its parent's tokens 0..t-1, at t an alternative from the top-k of the
    scoring pass (the most likely one other than the parent's token for "best", one of the others for
    "sample"), then a continuation sampled from t + 1 unless that token ended the completion. Returns the fork
    positions t."""
    positions = []
    assert len(trainer.scores) == len(trainer.batches)
    for (tree, out), scores in zip(trainer.batches, trainer.scores):
        ids, lengths = out["completion_ids"], out["completion_mask"].sum(1)
        for r, p in enumerate(tree["appo_parent"]):
            if p < 0:
                continue
            t = tree["appo_split"][r] + 1
            positions.append(t)
            assert torch.equal(ids[r, :t], ids[p, :t])                 # the shared prefix, up to t - 1
            top = scores.topk_ids[p // size * num_initial + p % size, t].tolist()
            others = [v for v in top if v != int(ids[p, t])]
            token = int(ids[r, t])
            assert len(top) == trainer.args.appo_branch_topk and token != int(ids[p, t]) and token in others
            if choice == "best":
                assert token == others[0]
            if token in trainer.eos_token_ids:
                assert int(lengths[r]) == t + 1                        # the substitute ended the completion
            else:
                assert int(lengths[r]) > t + 1                         # then a fresh continuation
    return positions


class FirstTokenRecorder(Recorder):
    """Scores the first completion token of each group's first initial rollout above everything else (where it
    is eligible) and makes the second's ineligible (it would come next: the first token's entropy is the same
    in every rollout of a prompt, and often the highest), so that each group forks once at t = 0 and once
    later."""

    def _score_initial(self, *args):
        scores = super()._score_initial(*args)
        score, candidate = scores.score.clone(), scores.candidate.clone()
        first = torch.isfinite(score[::2, 0])
        score[::2, 0] = torch.where(first, score[torch.isfinite(score)].max() + 1, score[::2, 0])
        candidate[::2, 0] |= first
        score[1::2, 0] = float("-inf")
        return scores._replace(score=score, candidate=candidate)


@pytest.mark.parametrize("choice", ["best", "sample"])
def test_topk_branches_replace_the_fork_token_and_do_not_train_it(model_dir, tmp_path, choice):
    trainer = train(model_dir, tmp_path, trainer_cls=FirstTokenRecorder, appo_branch_mode="topk",
                    appo_topk_choice=choice, appo_train_branches=True, num_iterations=2, beta=0.05)
    positions = check_topk_forks(trainer, choice)
    assert 0 in positions and max(positions) > 0, "no fork at t = 0 or none later: the test checks less"
    for tree, out in trainer.batches:
        parent, split = tree["appo_parent"], tree["appo_split"]
        cmask = out["completion_mask"].bool()
        loss_mask = out["tool_mask"].bool()
        for r, p in enumerate(parent):
            if p >= 0:     # the substituted token is not trained; the continuation after it is (train_branches)
                t = split[r] + 1
                assert not loss_mask[r, t] and out["advantages"][r, t] == 0
                assert torch.equal(loss_mask[r, t + 1:], cmask[r, t + 1:])
        # the step's advantages: the float64 oracle, split = t - 1 (-1 at t = 0: no completion token shared)
        texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
        expected = oracle.procedure_advantages(a_fraction(texts), [r // 4 for r in range(8)], parent, split,
                                               without_substituted(tree, cmask.tolist()),
                                               branch_score=tree["appo_branch_score"], branch_strength_scaling=True,
                                               train_branches=True)
        torch.testing.assert_close(out["advantages"].double(), torch.tensor(expected["advantages"],
                                   dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert torch.equal(loss_mask, torch.tensor(expected["loss_mask"]))
    check_losses(trainer)


def test_a_fork_keeps_the_parents_sampler_log_probs_up_to_its_token():
    parent = _Rollout()
    parent.extend([5, 6, 7], 1, [-0.1, -0.2, -0.3])
    resample = parent.fork(ForkRequest(group=0, slot=0, rollout=0, position=1, token=6, split=1, score=1.0))
    assert resample.ids == [5, 6] and resample.logprobs == [-0.1, -0.2]
    topk = parent.fork(ForkRequest(group=0, slot=0, rollout=0, position=1, token=9, split=0, score=1.0))
    # the substitute was not sampled: no sampler log-prob (NaN, which TRL's importance sampling leaves out)
    assert topk.ids == [5, 9] and topk.model == [1, 1] and topk.logprobs[0] == -0.1 and math.isnan(topk.logprobs[1])


def test_a_substitute_that_ends_the_completion_is_not_continued(model_dir, tmp_path):
    trainer = train(model_dir, tmp_path, steps=0, appo_branch_mode="topk")
    head, fresh = _Rollout(), _Rollout()
    head.extend([2, 3, 1], 1, None)                  # a branch whose substituted token is <eos>
    done = trainer._roll([[4, 5], [4, 5]], [head, fresh], 1, [trainer._row_tools(0)] * 2)
    assert done[0].ids == [2, 3, 1] and len(done[1].ids) > 0


def check_losses(trainer, accumulation=1, kl_coef=0.05) -> list[tuple[float, int]]:
    """Each loss TRL back-propagated equals the oracle's method §6-§7 loss on the Recorder's independent log-probs
    (future-KL weighting, dual clip, k3 KL); returns (loss, loss tokens) per micro-batch."""
    per_pass = []
    for loss, logp, inputs in trainer.losses:
        mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
        old = inputs["old_per_token_logps"].double()
        rows = [_rows(m) for m in mask]
        _, weighted = oracle.future_kl_weights(logp.tolist(), old.tolist(), inputs["advantages"].double().tolist(),
                                               rows)
        # TRL's "dapo" normaliser: the generation batch's loss tokens per accumulation step
        count = float(inputs["num_items_in_batch"]) * accumulation / trainer.args.steps_per_generation
        expected = oracle.policy_loss(logp.tolist(), old.tolist(), weighted, rows,
                                      logp_ref=inputs["ref_per_token_logps"].double().tolist(), kl_coef=kl_coef,
                                      token_count=count)["loss"]
        assert loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-6)
        per_pass.append((loss.item(), int(mask.sum())))
    # the last pass re-reads its batch after an update: ratios differ from 1, so clipping and weights act
    assert not torch.equal(trainer.losses[-1][1], trainer.losses[-1][2]["old_per_token_logps"].double())
    return per_pass


@pytest.mark.parametrize("accumulation", [1, 2])
def test_appo_loss_is_the_oracle_on_the_advantages_it_received(model_dir, tmp_path, accumulation):
    # num_iterations=2: the second pass over a batch sees ratios != 1, so clipping and future-KL weights act.
    # accumulation=2: one generation batch of 16 rows feeds two micro-batches per optimizer step.
    trainer = train(model_dir, tmp_path, num_iterations=2, beta=0.05, gradient_accumulation_steps=accumulation)
    assert len(trainer.losses) == 2 * accumulation
    per_pass = check_losses(trainer, accumulation)
    if accumulation == 2:       # the micro-batches of one pass add up to a token mean over the generation batch
        assert per_pass[0][1] + per_pass[1][1] == int(trainer.losses[0][2]["num_items_in_batch"])


def test_trl_loss_takes_the_per_token_advantages(model_dir, tmp_path):
    trainer = train(model_dir, tmp_path, appo_loss=False, beta=0.0, loss_type="dapo", steps=1)
    loss, _, inputs = trainer.losses[0]
    mask = (inputs["completion_mask"] * inputs["tool_mask"]).double()
    # first pass: ratio 1, so dapo's loss is -sum(A * mask) / (loss tokens of the generation batch)
    expected = -(inputs["advantages"].double() * mask).sum() / inputs["num_items_in_batch"].double()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert bool((inputs["advantages"] * mask).abs().sum() > 0)


def test_omega_uses_the_previous_rounds_policy(model_dir, tmp_path):
    trainer = train(model_dir, tmp_path, steps=2)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert "appo/omega_mean" not in logged[0] and "appo/omega_mean" in logged[1]   # round 1 is entropy-only
    ids = torch.tensor([[2, 3, 4, 5, 6]])
    policy = trainer.accelerator.unwrap_model(trainer.model)
    with torch.no_grad():
        now, prev = policy(input_ids=ids).logits, trainer._prev_policy(input_ids=ids).logits
    assert not torch.allclose(now, prev)          # a real snapshot, not the live policy behind a copied wrapper
    for a, b in zip(policy.parameters(), trainer._prev_policy.parameters()):
        assert a.data_ptr() != b.data_ptr()


def test_evaluation_samples_plain_rollouts(model_dir, tmp_path):
    trainer = train(model_dir, tmp_path, steps=1)
    trainer.batches.clear()
    metrics = trainer.evaluate(datasets.Dataset.from_dict({"prompt": PROMPTS[:2]}))
    assert all(p == -1 for tree, _ in trainer.batches for p in tree["appo_parent"])   # no forks in evaluation
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))


def test_two_processes_each_fork_and_score_their_own_groups(model_dir, tmp_path):
    # torchrun, 2 CPU processes (gloo): each rank's generation batch holds whole groups; its advantages come
    # from its own slice of TRL's gathered rewards, and the loss normaliser counts both ranks' loss tokens.
    worker = os.path.join(os.path.dirname(__file__), "trl_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          worker, model_dir, str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1"}, check=False)
    assert run.returncode == 0, run.stderr[-4000:]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ranks = [[json.loads(line) for line in open(tmp_path / f"rank{r}.jsonl")] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for first, second in zip(*ranks):
        assert not set(first["prompts"]) & set(second["prompts"])          # the ranks hold different prompts
        loss_tokens = 0
        for rec in (first, second):
            assert any(p >= 0 for p in rec["appo_parent"])
            texts = tokenizer.batch_decode(rec["ids"], skip_special_tokens=True)
            expected = oracle.procedure_advantages(a_fraction(texts), [r // 4 for r in range(8)], rec["appo_parent"],
                                                   rec["appo_split"], [_rows(m) for m in rec["mask"]],
                                                   branch_score=rec["appo_branch_score"], branch_strength_scaling=True)
            torch.testing.assert_close(torch.tensor(rec["advantages"], dtype=torch.float64),
                                       torch.tensor(expected["advantages"], dtype=torch.float64), rtol=1e-5, atol=1e-5)
            loss_tokens += sum(map(sum, expected["loss_mask"]))
        assert first["items"] == second["items"] == loss_tokens


@pytest.mark.parametrize("bad, match", [
    (dict(appo_omega_source="prev"), "appo_omega_source: expected one of"),
    (dict(appo_branch_mode="contrastive"), r"appo_branch_mode: expected one of \('resample', 'topk'\)"),
    (dict(appo_topk_choice="first"), r"appo_topk_choice: expected one of \('best', 'sample'\)"),
    (dict(appo_branch_topk=1), "appo_branch_topk: expected an int >= 2"),
    (dict(appo_branch_topk=True), "appo_branch_topk: expected an int >= 2"),
    (dict(appo_omega_source="behavior"), "use_vllm"),
    (dict(appo_omega_source="reference", beta=0.0), "beta > 0"),
    (dict(appo_num_initial=4), r"appo_num_initial: expected an int in \[1, num_generations - 1 = 3\]"),
    (dict(scale_rewards="batch"), "scale_rewards"),
    (dict(multi_objective_aggregation="normalize_then_sum"), "sum_then_normalize"),
    (dict(appo_clip_ratio_c=1.0), "appo_clip_ratio_c"),
    (dict(appo_score_batch_size=0), "appo_score_batch_size: expected a positive int"),
    (dict(num_generations=2, per_device_train_batch_size=4), "every dual-group advantage is 0"),
    # APPO's checks answer before GRPOConfig's: TRL would refuse num_generations=1 ("at least 2 generations") and a
    # generation batch of 6 rows for groups of 4 ("must be divisible by num_generations") with its own messages.
    (dict(num_generations=1, per_device_train_batch_size=4), "num_generations: APPO needs at least 3"),
    (dict(appo_clip_ratio_c=1.0, per_device_train_batch_size=6), "appo_clip_ratio_c"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level: not implemented by APPO's loss"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile"),
])
def test_config_errors_name_the_setting(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        APPOConfig(output_dir=str(tmp_path), **(dict(num_generations=4, per_device_train_batch_size=8) | bad),
                   use_cpu=True)


def test_scale_rewards_takes_trls_booleans(tmp_path):
    for given, meant in ((True, "group"), (False, "none")):
        args = APPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8, use_cpu=True,
                          scale_rewards=given)
        assert args.scale_rewards == meant


def test_trainer_errors(model_dir, tmp_path):
    from trl import GRPOConfig
    ds = datasets.Dataset.from_dict({"prompt": PROMPTS})
    with pytest.raises(ValueError, match="rollout_func: APPOTrainer generates through its own rollout hook"):
        APPOTrainer(model=model_dir, reward_funcs=a_fraction, train_dataset=ds, rollout_func=lambda p, t: {})
    # the tiny model's tokenizer has no chat template: TRL's own check ("does not support tool calling") would
    # answer first if APPOTrainer did not check its tools before calling GRPOTrainer.__init__

    async def lookup(key: str) -> str:
        """Look a key up.

        Args:
            key: The key.
        """
        return key

    with pytest.raises(NotImplementedError, match="tools: lookup is async"):      # tools passed positionally
        APPOTrainer(model_dir, a_fraction, None, ds, None, None, None, None, (None, None), None, None, [lookup])
    with pytest.raises(TypeError, match="args: expected an APPOConfig, got GRPOConfig"):
        APPOTrainer(model=model_dir, reward_funcs=a_fraction, train_dataset=ds,
                    args=GRPOConfig(output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                                    use_cpu=True))
    with pytest.raises(ValueError, match="whole groups of num_generations=4"):
        _num_groups(["p", "p", "p", "q", "q", "q", "q", "p"], 4)


def _length_on_even_rows(completions, **_):
    return [len(c) / 12 if i % 2 == 0 else None for i, c in enumerate(completions)]


def test_a_reward_of_none_adds_nothing_unless_every_function_returns_it(model_dir, tmp_path):
    # None from one of two reward functions: that completion's reward is the other function's (TRL's nansum)
    trainer = train(model_dir, tmp_path, reward=[a_fraction, _length_on_even_rows], steps=1)
    tree, out = trainer.batches[0]
    texts = trainer.processing_class.batch_decode(out["completion_ids"], skip_special_tokens=True)
    rewards = [a + (b or 0.0) for a, b in zip(a_fraction(texts), _length_on_even_rows(texts))]
    expected = oracle.procedure_advantages(rewards, [r // 4 for r in range(8)], tree["appo_parent"],
                                           tree["appo_split"], [_rows(m) for m in out["completion_mask"]],
                                           branch_score=tree["appo_branch_score"], branch_strength_scaling=True)
    torch.testing.assert_close(out["advantages"].double(), torch.tensor(expected["advantages"], dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    # None from every function for some completions (the odd rows here): an error, not a silent 0
    with pytest.raises(ValueError, match=r"every reward function returned None for 4 completion\(s\); APPO needs a "
                                         r"reward for every completion"):
        train(model_dir, tmp_path, reward=[_length_on_even_rows, _length_on_even_rows], steps=1)


def test_the_docs_example_runs():
    out = run_docs_example("trl.md")
    assert out.returncode == 0, out.stderr[-3000:]
    for mode in ("resample", "topk"):
        assert any(line.startswith(mode) and "appo/forked_fraction" in line for line in out.stdout.splitlines())
