"""A character-level tokenizer built in code: no files, no downloads, the same ids on every machine."""
from __future__ import annotations

from collections.abc import Iterable

# Special tokens are single ids; everything else is one character.
PAD, BOS, EOS, ANS = "<pad>", "<bos>", "<eos>", "<ans>"
CALL, END_CALL, RES, END_RES = "<call>", "</call>", "<res>", "</res>"
SPECIALS = (PAD, BOS, EOS, CALL, END_CALL, RES, END_RES, ANS)    # ids 0..7, in this order
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*:?"
PROMPT, GEN, TOOL = 0, 1, 2          # token kinds: only GEN tokens are scored and trained


class CharTokenizer:
    """Maps the task alphabet to ids: the special tokens first (PAD = 0), then one id per character.

    `encode` accepts text with embedded special tokens ("<call>kv ax</call>") and raises ValueError naming the
    first character outside the alphabet; `decode` inverts it.
    """

    def __init__(self) -> None:
        self.vocab: list[str] = list(SPECIALS) + list(CHARS)
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        for name in ("pad", "bos", "eos", "call", "end_call", "res", "end_res", "ans"):
            setattr(self, f"{name}_id", self.ids[globals()[name.upper()]])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text[i] == "<":
                end = text.find(">", i)
                tok = text[i:end + 1] if end >= 0 else ""
                if tok in self.ids:
                    out.append(self.ids[tok])
                    i = end + 1
                    continue
            if text[i] not in self.ids:
                raise ValueError(f"text: character {text[i]!r} at index {i} is not in the tokenizer's alphabet "
                                 f"{CHARS!r} (or a special token {SPECIALS})")
            out.append(self.ids[text[i]])
            i += 1
        return out

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def token_text(self, i: int) -> str:
        return self.vocab[int(i)]

    # --- the tool protocol the policy and the algorithms call (hf_policy.ChatTokenizer implements the same
    # for a Hugging Face model and its chat template) ---------------------------------------------------------
    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a response when generated."""
        return (self.eos_id,)

    def prompt_ids(self, task) -> list[int]:
        """A task's prompt as the policy reads it."""
        return [self.bos_id] + self.encode(task.prompt)

    def call_ended(self, tokens: list[int], kinds: list[int]) -> bool:
        """Whether the last token (generated) closes a tool call."""
        return kinds[-1] == GEN and tokens[-1] == self.end_call_id

    def calls_made(self, tokens: list[int], kinds: list[int]) -> int:
        """Tool calls in a response prefix (closed ones, the last one included)."""
        return sum(1 for t, k in zip(tokens, kinds) if k == GEN and t == self.end_call_id)

    def tool_result(self, tokens: list[int], kinds: list[int], task, allowed: bool) -> list[int]:
        """The tool tokens that follow a closed call: <res>result</res> ('err' past the budget)."""
        start = len(tokens) - 1
        while start > 0 and tokens[start] != self.call_id:
            start -= 1
        text = self.decode(tokens[start + 1:-1]) if tokens[start] == self.call_id else ""
        result = task.tool(text) if allowed else "err"
        return [self.res_id] + self.encode(result) + [self.end_res_id]

    def score(self, task, tokens: list[int], kinds: list[int], prompt_len: int):
        """The Episode (reward, success) of a finished response (tasks.score_response)."""
        from .tasks import score_response
        return score_response(task, self.decode(tokens[prompt_len:]))
