"""A character-level tokenizer built in code: no files, no downloads, the same ids on every machine."""
from __future__ import annotations

from collections.abc import Iterable

# Special tokens are single ids; everything else is one character.
PAD, BOS, EOS, ANS = "<pad>", "<bos>", "<eos>", "<ans>"
CALL, END_CALL, RES, END_RES = "<call>", "</call>", "<res>", "</res>"
SPECIALS = (PAD, BOS, EOS, CALL, END_CALL, RES, END_RES, ANS)    # ids 0..7, in this order
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-*:?"


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
