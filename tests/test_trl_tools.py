"""APPOTrainer with TRL's `tools=` on CPU: the rollout hook runs the whole tool loop for initial rollouts and
branches, so forks land inside later turns. A tiny Qwen2 with Qwen2.5's chat template (which TRL recognises and
parses tool calls with) is first fitted to transcripts that call a calculator twice and then answer."""
import random

import pytest
import torch

pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import oracle  # noqa: E402
from helpers import char_chat_tokenizer  # noqa: E402
from test_trl import Recorder, _rows, check_losses, check_topk_forks, without_substituted  # noqa: E402
from appo_kernels.integrations.trl import APPOConfig, APPOTrainer, _Rollout  # noqa: E402


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def _call(a, b):
    return {"type": "function", "function": {"name": "add", "arguments": {"a": a, "b": b}}}


def _transcript(a, b, c):
    return [{"role": "user", "content": f"{a}+{b}+{c}="},
            {"role": "assistant", "content": "", "tool_calls": [_call(a, b)]},
            {"role": "tool", "name": "add", "content": str(a + b)},
            {"role": "assistant", "content": "", "tool_calls": [_call(a + b, c)]},
            {"role": "tool", "name": "add", "content": str(a + b + c)},
            {"role": "assistant", "content": str(a + b + c)}]


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """(model directory, tokenizer): one token per character, plus single tokens for the chat template's fixed
    text (as a real BPE vocabulary has it in a few), and a 2-layer Qwen2 fitted for 300 steps to 8 transcripts.
    The tokenizer is passed to the trainer as `processing_class` (reloaded from the directory, transformers
    would rebuild it as a Qwen2Tokenizer, whose byte-level pre-tokenizer this vocabulary does not cover)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl.chat_template_utils import qwen2_5_chat_template
    tok = char_chat_tokenizer(["<|endoftext|>", "<|im_end|>", "<|im_start|>"], pad_token="<|endoftext|>",
                              eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    tok.chat_template = qwen2_5_chat_template
    rendered = tok.apply_chat_template([{"role": "user", "content": "?"}], tools=[add], add_generation_prompt=True,
                                       tokenize=False)
    system = rendered[len("<|im_start|>system\n"):rendered.index("<|im_end|>")]
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", system, "user",
                    "assistant", '{"name": "add", "arguments": {"a": ', ', "b": ', "}}"])
    rng = random.Random(0)
    transcripts = [_transcript(rng.randint(0, 9), rng.randint(0, 9), rng.randint(0, 9)) for _ in range(8)]
    seqs = [tok.apply_chat_template(t, tools=[add], return_dict=False) for t in transcripts]
    starts = [len(tok.apply_chat_template(t[:1], tools=[add], add_generation_prompt=True, return_dict=False))
              for t in transcripts]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                        # small matrices: one thread is several times faster here
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256, pad_token_id=0, eos_token_id=1,
                                         bos_token_id=1, tie_word_embeddings=True))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    labels = torch.tensor([[-100] * p + s[p:] + [-100] * (width - len(s)) for s, p in zip(seqs, starts)])
    attention = (labels != -100) | (torch.arange(width)[None] < torch.tensor(starts)[:, None])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = model(input_ids=ids, attention_mask=attention.long(), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    path = tmp_path_factory.mktemp("tool-qwen2")
    model.save_pretrained(path)
    return str(path), tok


def final_answer(completions, **_):
    """1 when the completion ends with the assistant stating the calculator's last result (the tiny model has
    memorised its 8 transcripts rather than learnt to add, so this is the reward it can earn)."""
    return [float(c[-1]["role"] == "assistant" and len(c) > 1 and c[-2]["role"] == "tool"
                  and c[-1]["content"].strip() == c[-2]["content"]) for c in completions]


def answer_and_rounds(completions, **_):
    """`final_answer` plus 0.1 per tool round: partial credit, so that rewards vary within a group even in a
    round where no rollout states the result (a topk branch's substitute often breaks a call)."""
    return [a + 0.1 * _tool_rounds(c) for a, c in zip(final_answer(completions), completions)]


class ToolRecorder(Recorder):
    """Also keeps what `_tool_call_loop` handed TRL (policy-token masks, messages, counts)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tool_results = []

    def _tool_call_loop(self, *args):
        result = super()._tool_call_loop(*args)
        self.tool_results.append(result)
        return result


PROMPTS = [[{"role": "user", "content": f"{a}+{b}+{c}="}] for a, b, c in ((3, 4, 5), (1, 2, 6))]


def train_tools(tool_model, tmp_path, budget, steps, trainer_cls=ToolRecorder, reward_funcs=answer_and_rounds,
                setup=None, **config):
    """Train on PROMPTS with `setup` (the trainer's tool arguments, default `tools=[add]`, or another dataset)."""
    path, tok = tool_model
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                    max_completion_length=64, max_steps=steps, logging_steps=1, report_to="none", use_cpu=True,
                    seed=0, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
                    max_tool_calling_iterations=budget)
    trainer = trainer_cls(model=path, reward_funcs=reward_funcs, args=APPOConfig(**(settings | config)),
                          processing_class=tok, **({"train_dataset": datasets.Dataset.from_dict({"prompt": PROMPTS})}
                                                   | (setup or {"tools": [add]})))
    trainer.train()
    return trainer


def _tool_rounds(messages):
    """Tool rounds in a completion: runs of tool messages."""
    return sum(m["role"] == "tool" and (i == 0 or messages[i - 1]["role"] != "tool") for i, m in enumerate(messages))


def _tool_spans(model_row):
    """Runs of tool tokens (0) in a policy-token mask."""
    return sum(v == 0 and (i == 0 or model_row[i - 1] == 1) for i, v in enumerate(model_row))


def _check_tool_results(messages, model_row, budget):
    """Each tool message holds `add` of the call before it; one run of tool tokens per round, within budget."""
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            call = next(x for x in reversed(messages[:i]) if x["role"] == "assistant")["tool_calls"][0]
            assert m["content"] == str(add(**call["function"]["arguments"]))
    assert _tool_spans(model_row) == _tool_rounds(messages) <= budget


def check_tool_batches(trainer, tok, mode, check_row, rewards) -> int:
    """Each generation batch of a tool run: `check_row(k, r, messages, model_row)` for each row r of batch k; a
    branch's prefix (tool results included) token-identical to its parent's and its tool messages the parent's;
    forks on policy tokens; tool tokens (and a topk substitute) without loss; the advantages the float64 oracle's
    on `rewards(k, messages)`, the rewards the reward functions gave. Returns the branches forked inside a later
    turn; asserts that some were and that some advantage varied along a rollout."""
    later = varied = 0
    for k, ((tree, out), result) in enumerate(zip(trainer.batches, trainer.tool_results)):
        model_rows, messages = result[0], result[1]
        parent, split = tree["appo_parent"], tree["appo_split"]
        ids, cmask = out["completion_ids"], out["completion_mask"].bool()
        for r, p in enumerate(parent):
            check_row(k, r, messages[r], model_rows[r])
            if p < 0:
                continue
            s = split[r]
            t = s + (mode == "topk")                             # the fork token
            assert torch.equal(ids[r, :s + 1], ids[p, :s + 1]) and model_rows[r][:t + 1] == model_rows[p][:t + 1]
            assert model_rows[p][t] == 1                         # forks at the policy's own tokens only
            reused = _tool_spans(model_rows[p][:t])
            if reused:                                           # a fork inside a later turn
                later += 1
                # the prefix's tool results are reused as they were, not run again
                prefix_text = tok.decode(ids[p, :t])
                assert prefix_text.count("<tool_response>") == reused
                tools_p = [m for m in messages[p] if m["role"] == "tool"][:reused]
                assert [m for m in messages[r] if m["role"] == "tool"][:reused] == tools_p
        # tool tokens (and a topk branch's substituted token) carry no loss, and the advantages are the float64
        # oracle's on what the rewards saw
        policy = torch.tensor([row + [1] * (ids.shape[1] - len(row)) for row in model_rows]).bool() & cmask
        expected = oracle.procedure_advantages(rewards(k, messages), [r // 4 for r in range(8)], parent,
                                               split, without_substituted(tree, policy.tolist()) if mode == "topk"
                                               else [_rows(m) for m in policy],
                                               branch_score=tree["appo_branch_score"], branch_strength_scaling=True)
        torch.testing.assert_close(out["advantages"].double(), torch.tensor(expected["advantages"],
                                   dtype=torch.float64), rtol=1e-5, atol=1e-5)
        assert torch.equal(out["tool_mask"].bool(), torch.tensor(expected["loss_mask"]))
        assert not (out["tool_mask"].bool() & ~policy).any()
        varied += sum(len(set(a for a, m in zip(row, lm) if m)) > 1
                      for row, lm in zip(expected["advantages"], expected["loss_mask"]))
    assert later and varied, "no fork inside a later turn, or no advantage varied: the test checks nothing"
    return later


@pytest.mark.parametrize("mode", ["resample", "topk"])
def test_tool_rollouts_fork_in_later_turns_and_train_on_the_oracle(tool_model, tmp_path, mode):
    trainer = train_tools(tool_model, tmp_path, budget=2, steps=6, num_iterations=2, beta=0.05,
                          appo_branch_mode=mode)
    if mode == "topk":
        check_topk_forks(trainer, "best")
    check_tool_batches(trainer, tool_model[1], mode,
                       check_row=lambda k, r, messages, model_row: _check_tool_results(messages, model_row, 2),
                       rewards=lambda k, messages: answer_and_rounds(messages))
    check_losses(trainer)
    calls = [h["tools/call_frequency"] for h in trainer.state.log_history if "tools/call_frequency" in h]
    assert len(calls) == 3 and min(calls) > 0                  # TRL's tool metrics, from the hook's counts


@pytest.mark.parametrize("mode", ["resample", "topk"])
def test_the_tool_budget_counts_the_calls_in_a_branch_prefix(tool_model, tmp_path, mode):
    # budget 1: the model wants a second call in its second turn; a branch forked after the first round may not
    # make it either, since the round in its prefix counts
    trainer = train_tools(tool_model, tmp_path, budget=1, steps=2, beta=0.0, appo_branch_mode=mode)
    if mode == "topk":
        check_topk_forks(trainer, "best")
    refused = 0
    for (tree, _), result in zip(trainer.batches, trainer.tool_results):
        model_rows, messages = result[0], result[1]
        for r, p in enumerate(tree["appo_parent"]):
            _check_tool_results(messages[r], model_rows[r], budget=1)
            if p >= 0 and _tool_spans(model_rows[p][:tree["appo_split"][r] + 1]):
                refused += bool(messages[r][-1].get("tool_calls"))   # a call left unrun: the budget held
    assert refused, "no branch after a tool round asked for another call: the test checks nothing"
    # evaluation runs the same tool loop, without forks
    trainer.batches.clear()
    trainer.tool_results.clear()
    trainer.evaluate(datasets.Dataset.from_dict({"prompt": PROMPTS}))
    (tree, _), = trainer.batches
    assert all(p == -1 for p in tree["appo_parent"])
    model_rows, messages = trainer.tool_results[0][:2]
    assert sum(_tool_rounds(m) for m in messages) > 0
    for m, row in zip(messages, model_rows):
        _check_tool_results(m, row, budget=1)


def test_a_substitute_that_ends_a_turn_runs_its_tool_calls_and_goes_on(tool_model, tmp_path):
    # a topk branch whose substituted token is <|im_end|> right after a complete tool call: the turn is over,
    # its call runs, and the branch continues with the next turn
    path, tok = tool_model
    args = APPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=64, max_tool_calling_iterations=2, report_to="none", use_cpu=True,
                      appo_branch_mode="topk")
    trainer = APPOTrainer(model=path, reward_funcs=final_answer, args=args, tools=[add], processing_class=tok,
                          train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    chat = _transcript(3, 4, 5)
    prompt = tok.apply_chat_template(chat[:1], tools=[add], add_generation_prompt=True, return_dict=False)
    full = tok.apply_chat_template(chat, tools=[add], return_dict=False)
    first_turn = full[len(prompt):full.index(tok.eos_token_id, len(prompt)) + 1]
    head = _Rollout()
    head.extend(first_turn, 1, None)
    done, = trainer._roll([prompt], [head], 1, [trainer._row_tools(0)])
    assert done.ids[:len(first_turn)] == first_turn and done.messages[1] == {"role": "tool", "name": "add",
                                                                            "content": "7"}
    assert done.model[len(first_turn)] == 0 and done.model[-1] == 1    # the result, then the policy's next turn


def test_tools_errors(tool_model, tmp_path):
    def blocks(a: int, b: int) -> int:             # `add`'s schema (the prompt the model knows), a list result
        """Add two integers.

        Args:
            a: The first integer.
            b: The second integer.
        """
        return [{"type": "text", "text": str(a + b)}]

    blocks.__name__ = "add"                         # the call the model makes
    path, tok = tool_model
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_steps=1,
                    max_completion_length=64, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = APPOTrainer(model=path, reward_funcs=final_answer, args=APPOConfig(**settings), tools=[blocks],
                          processing_class=tok, train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}))
    with pytest.raises(NotImplementedError, match="tools: add returned a list of content blocks"):
        trainer.train()
    with pytest.raises(RuntimeError, match="_tool_call_loop: expected the tool results of APPOTrainer's own"):
        trainer._tool_call_loop(None, None, [[1, 2]], None, None, None, None)
    texts = datasets.Dataset.from_dict({"prompt": ["3+4+5=", "1+2+6="]})
    plain = APPOTrainer(model=path, reward_funcs=final_answer, args=APPOConfig(**settings), tools=[add],
                        processing_class=tok, train_dataset=texts)
    with pytest.raises(ValueError, match="prompts: with tools, APPOTrainer needs conversational prompts"):
        plain.train()

