"""Multi-turn tool tasks with verifiable rewards: a key-value store and a calculator, chained 2-3 calls deep.

A task is a short prompt ("ax+13?" or "ax*bo?"); the values behind the keys live only in the environment, so
the policy has to call `kv KEY` to read them and `calc A op B` to combine them (a ~0.3M-parameter model cannot
multiply in its head). The reference solution:

    ax*bo?  <call>kv ax</call><res>47</res><call>kv bo</call><res>5</res>
            <call>calc 47*5</call><res>235</res><ans>235 q<eos>

The answer is signed with a free letter (" q"): drawn uniformly in the demonstrations and ignored by the
reward, it is the decision-irrelevant, high-entropy token (log 26 = 3.3 nats, the most uncertain position of
a response). A branch forked there can only re-sample the <eos>, so its outcome is its parent's: the budget
that entropy-only branching spends there is wasted, which is what APPO's Omega filter is meant to avoid.

Reward (SPEC 8): -1 for a malformed response (no single final `<ans>...<eos>`, a call that does not parse,
or no answer within the length limit); otherwise the token-F1 (here: characters) of the answer against the
gold answer, plus 0.1 when both tools were used. Success means the answer is exactly right.
"""
from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import dataclass, field

from .tokenizer import ANS, CALL, END_CALL, END_RES, EOS, RES

OPS = "+-*"
TASK_VERSION = 2                 # part of the warm-start cache key: bump when tasks or traces change
_CALL_RE = re.compile(r"^(kv ([a-z]{2})|calc (-?\d{1,6})([-+*])(-?\d{1,6}))$")


@dataclass
class Task:
    """One episode: the prompt text, the hidden key-value table and the gold answer."""
    prompt: str
    table: dict[str, str]
    answer: str
    keys: tuple[str, ...]
    op: str
    operand: int | None = None           # the constant of "ax+13?" (None for two-key tasks)

    def tool(self, call: str) -> str:
        """Run one call (the text between <call> and </call>); 'err' for anything that does not parse."""
        m = _CALL_RE.match(call)
        if not m:
            return "err"
        if m.group(2):
            return self.table.get(m.group(2), "none")
        a, op, b = int(m.group(3)), m.group(4), int(m.group(5))
        return str(a + b if op == "+" else a - b if op == "-" else a * b)


def _key(rng: random.Random, taken: set[str]) -> str:
    while True:
        k = "".join(rng.choice(string.ascii_lowercase) for _ in range(2))
        if k not in taken:
            taken.add(k)
            return k


def make_task(rng: random.Random, distractors: int = 3) -> Task:
    """Half "KEY op N?" (2 calls: kv, calc), half "KEY op KEY?" (3 calls: kv, kv, calc)."""
    taken: set[str] = set()
    op = rng.choice(OPS)
    two_keys = rng.random() < 0.5
    keys = (_key(rng, taken), _key(rng, taken)) if two_keys else (_key(rng, taken),)
    values = [rng.randint(1, 99) if op != "*" else rng.randint(1, 30) for _ in keys]
    table = {k: str(v) for k, v in zip(keys, values)}
    for _ in range(distractors):
        table[_key(rng, taken)] = str(rng.randint(1, 99))
    if two_keys:
        a, b, operand, prompt = values[0], values[1], None, f"{keys[0]}{op}{keys[1]}?"
    else:
        operand = rng.randint(1, 99) if op != "*" else rng.randint(2, 9)
        a, b, prompt = values[0], operand, f"{keys[0]}{op}{operand}?"
    answer = str(a + b if op == "+" else a - b if op == "-" else a * b)
    return Task(prompt, table, answer, keys, op, operand)


@dataclass
class Episode:
    """What a finished response did: parsed calls, the answer, the reward (SPEC 8) and whether it succeeded."""
    calls: list[tuple[str, str]] = field(default_factory=list)
    answer: str | None = None
    well_formed: bool = False
    reward: float = -1.0
    success: bool = False


def char_f1(pred: str, gold: str) -> float:
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


_SEG_RE = re.compile(re.escape(CALL) + "(.*?)" + re.escape(END_CALL) + re.escape(RES) + "(.*?)" + re.escape(END_RES))


def score_response(task: Task, response: str) -> Episode:
    """Parse a response (the text after the prompt, tool outputs included) and reward it."""
    ep = Episode()
    pos = 0
    for m in _SEG_RE.finditer(response):
        if m.start() != pos:
            return ep
        ep.calls.append((m.group(1), m.group(2)))
        pos = m.end()
    rest = response[pos:]
    if not (rest.startswith(ANS) and rest.endswith(EOS)):
        return ep
    answer = rest[len(ANS):-len(EOS)].split(" ")[0]        # drop the free sign-off letter
    if not answer or any(t in answer for t in (ANS, EOS, CALL, RES)) or \
            any(not _CALL_RE.match(c) for c, _ in ep.calls):
        return ep
    ep.answer, ep.well_formed = answer, True
    used = {"kv" if _CALL_RE.match(c).group(2) else "calc" for c, _ in ep.calls}
    ep.reward = char_f1(answer, task.answer) + (0.1 if used == {"kv", "calc"} else 0.0)
    ep.success = answer == task.answer
    return ep


def _call(body: str) -> str:
    return f"{CALL}{body}{END_CALL}"


def _signed(rng: random.Random, answer: str) -> str:
    return f"{ANS}{answer} {rng.choice(string.ascii_lowercase)}{EOS}"


def _near(rng: random.Random, value: str) -> str:
    return str(int(value) + rng.choice([-10, -2, -1, 1, 2, 10]))


def solution_trace(task: Task, rng: random.Random, mistake: str | None = None) -> str:
    """A demonstration response (tool outputs included), optionally with one deliberate mistake:
    "key" (reads a wrong key), "copy" (miscopies a value into calc), "guess" (skips calc and guesses),
    "answer" (miscopies the result). Mistaken traces stay well-formed, so SFT teaches the format reliably
    and RL has real decisions to improve."""
    parts, values = [], []
    for i, k in enumerate(task.keys):
        key = k
        if mistake == "key" and i == len(task.keys) - 1:
            key = "".join(rng.choice(string.ascii_lowercase) for _ in range(2))
        got = task.tool(f"kv {key}")
        parts.append(_call(f"kv {key}") + f"{RES}{got}{END_RES}")
        values.append(got if got.lstrip("-").isdigit() else str(rng.randint(1, 99)))
    a = values[0]
    b = values[1] if len(values) > 1 else str(task.operand)
    if mistake == "copy":
        a = _near(rng, a)
    if mistake == "guess":
        return "".join(parts) + _signed(rng, _near(rng, task.answer))
    expr = f"calc {a}{task.op}{b}"
    result = task.tool(expr)
    parts.append(_call(expr) + f"{RES}{result}{END_RES}")
    answer = _near(rng, result) if mistake == "answer" else result
    return "".join(parts) + _signed(rng, answer)


MISTAKES = ("key", "copy", "guess", "answer")


def demonstrations(n: int, seed: int, mistake_rate: float) -> list[tuple[Task, str]]:
    """n (task, response) pairs; a `mistake_rate` share of them carry one mistake of a random kind."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = make_task(rng)
        mistake = rng.choice(MISTAKES) if rng.random() < mistake_rate else None
        out.append((task, solution_trace(task, rng, mistake)))
    return out
