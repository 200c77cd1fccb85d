"""Multi-turn tool tasks with verifiable rewards: a key-value store and a calculator, in two families.

"easy" (the default): 2-3 calls. A task is a short prompt ("ax+13?" or "ax*bo?"); the values behind the keys
live only in the environment, so the policy has to call `kv KEY` to read them and `calc A op B` to combine them
(a ~0.3M-parameter model cannot multiply in its head). The reference solution:

    ax*bo?  <call>kv ax</call><res>47</res><call>kv bo</call><res>5</res>
            <call>calc 47*5</call><res>235</res><ans>235 q<eos>

The answer is signed with a free letter (" q"): drawn uniformly in the demonstrations and ignored by the
reward, it is the decision-irrelevant, high-entropy token (log 26 = 3.3 nats, the most uncertain position of
a response). A branch forked there can only re-sample the <eos>, so its outcome is its parent's: the budget
that entropy-only branching spends there is wasted, which is what APPO's Omega filter is meant to avoid.

"hard": 4-6 calls. The same prompts, but a key's value may name the next key, so each operand is reached
through a multi-hop chain of reads (3-5 reads in all, then calc):

    ax+13?  <call>kv ax</call><res>pm</res><call>kv pm</call><res>hd</res><call>kv hd</call><res>47</res>
            <call>calc 47+13</call><res>60</res><ans>60 q<eos>

The decisions sit in the middle of the rollout (which key to read next, which operands to pass), a wrong read
can be repaired by a later correct one (the tool budget leaves room for it), and the sign-off decoy is kept.

`decision_positions` marks the tokens of a response that decide its outcome (the tool name, the key read,
the operands and operator of a calc, the answer's value), for the `decision_forks` metric.

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
TASK_VERSION = 3                 # part of the warm-start cache key: bump when tasks or traces change
TASKS = ("easy", "hard")
# Per family: the tool-call budget and the generation limit (room for one repaired mistake in "hard").
LIMITS = {"easy": {"tool_budget": 3, "max_new_tokens": 64}, "hard": {"tool_budget": 8, "max_new_tokens": 96}}
_CALL_RE = re.compile(r"^(kv ([a-z]{2})|calc (-?\d{1,6})([-+*])(-?\d{1,6}))$")


@dataclass
class Task:
    """One episode: the prompt text, the hidden key-value table and the gold answer. `chains` holds, per key
    of the prompt, the keys read in order to reach its number (one key each in the easy family)."""
    prompt: str
    table: dict[str, str]
    answer: str
    keys: tuple[str, ...]
    op: str
    operand: int | None = None           # the constant of "ax+13?" (None for two-key tasks)
    chains: tuple[tuple[str, ...], ...] = ()
    family: str = "easy"

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


def _value(rng: random.Random, op: str) -> int:
    return rng.randint(1, 99) if op != "*" else rng.randint(1, 30)


def _operands(rng: random.Random, op: str, keys: tuple[str, ...],
              values: list[int]) -> tuple[int, int, int | None, str]:
    """(a, b, the constant operand or None, prompt) of a task over `keys` whose numbers are `values`."""
    if len(keys) == 2:
        return values[0], values[1], None, f"{keys[0]}{op}{keys[1]}?"
    operand = rng.randint(1, 99) if op != "*" else rng.randint(2, 9)
    return values[0], operand, operand, f"{keys[0]}{op}{operand}?"


def _result(a: int, op: str, b: int) -> str:
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


def make_task(rng: random.Random, family: str = "easy", distractors: int = 3) -> Task:
    """A task of `family`: "easy" = half "KEY op N?" (2 calls: kv, calc), half "KEY op KEY?" (3 calls);
    "hard" = the same prompts with 3-5 chained reads in all (each value names the next key until a number)."""
    if family == "hard":
        return _make_hard_task(rng, distractors + 1)
    if family != "easy":
        raise ValueError(f"family: expected one of {TASKS}, got {family!r}")
    taken: set[str] = set()
    op = rng.choice(OPS)
    two_keys = rng.random() < 0.5
    keys = (_key(rng, taken), _key(rng, taken)) if two_keys else (_key(rng, taken),)
    values = [_value(rng, op) for _ in keys]
    table = {k: str(v) for k, v in zip(keys, values)}
    for _ in range(distractors):
        table[_key(rng, taken)] = str(rng.randint(1, 99))
    a, b, operand, prompt = _operands(rng, op, keys, values)
    return Task(prompt, table, _result(a, op, b), keys, op, operand, tuple((k,) for k in keys))


def _make_hard_task(rng: random.Random, distractors: int) -> Task:
    taken: set[str] = set()
    op = rng.choice(OPS)
    reads = rng.randint(3, 5)
    lengths = (reads,) if rng.random() < 0.5 else (split := rng.randint(1, reads - 1), reads - split)
    chains = tuple(tuple(_key(rng, taken) for _ in range(n)) for n in lengths)
    values = [_value(rng, op) for _ in chains]
    table = {}
    for chain, value in zip(chains, values):
        table |= dict(zip(chain, chain[1:] + (str(value),)))
    # Distractors: short chains of their own, so that a miscopied key can lead somewhere plausible.
    for _ in range(distractors):
        first, second = _key(rng, taken), _key(rng, taken)
        table[first], table[second] = second, str(rng.randint(1, 99))
    a, b, operand, prompt = _operands(rng, op, tuple(c[0] for c in chains), values)
    return Task(prompt, table, _result(a, op, b), tuple(c[0] for c in chains), op, operand, chains, "hard")


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


def _read(parts: list[str], task: Task, key: str) -> str:
    got = task.tool(f"kv {key}")
    parts.append(_call(f"kv {key}") + f"{RES}{got}{END_RES}")
    return got


def _wrong_key(task: Task, rng: random.Random) -> str:
    """A miscopied key: random letters (easy: usually "none"), or a distractor's key (hard: a plausible value)."""
    if task.family == "easy":
        return "".join(rng.choice(string.ascii_lowercase) for _ in range(2))
    on_chains = {k for chain in task.chains for k in chain}
    return rng.choice(sorted(k for k in task.table if k not in on_chains))


def solution_trace(task: Task, rng: random.Random, mistake: str | None = None) -> str:
    """A demonstration response (tool outputs included), optionally with one deliberate mistake:
    "key" (reads a wrong key and goes on from what it returned), "repair" (hard family: reads a wrong key,
    then the right one), "copy" (miscopies a value into calc), "guess" (skips calc and guesses), "answer"
    (miscopies the result). The wrong read is the last one (easy) or a random one (hard). Mistaken traces
    stay well-formed, so SFT teaches the format reliably and RL has real decisions to improve."""
    parts, values = [], []
    reads = sum(len(chain) for chain in task.chains)
    wrong_at = -1
    if mistake in ("key", "repair"):
        wrong_at = reads - 1 if task.family == "easy" else rng.randrange(reads)
    r = 0
    for chain in task.chains:
        got = ""
        for key in chain:
            if r == wrong_at:
                wrong_at = -1
                got = _read(parts, task, _wrong_key(task, rng))
                if mistake == "key":                        # not repaired: follow wherever it leads
                    while got in task.table:
                        got = _read(parts, task, got)
                    break
            got = _read(parts, task, key)
            r += 1
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


MISTAKES = {"easy": ("key", "copy", "guess", "answer"), "hard": ("key", "repair", "copy", "guess", "answer")}


def demonstrations(n: int, seed: int, mistake_rate: float, family: str = "easy") -> list[tuple[Task, str]]:
    """n (task, response) pairs of `family`; a `mistake_rate` share of them carry one mistake of a random kind."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        task = make_task(rng, family)
        mistake = rng.choice(MISTAKES[family]) if rng.random() < mistake_rate else None
        out.append((task, solution_trace(task, rng, mistake)))
    return out


def decision_positions(pieces: list[str]) -> set[int]:
    """Indices of the tokens of a response (`pieces`: their texts, special tokens whole, tool results included)
    that decide its outcome: the first letter of each call's tool name, the key a `kv` reads, the operands and
    operator of a `calc`, and the characters of the final answer's value (not the free sign-off letter)."""
    out: set[int] = set()
    body: list[int] | None = None           # indices inside the current <call> ... </call>
    answer = False
    for i, piece in enumerate(pieces):
        if piece == CALL:
            body = []
        elif piece == END_CALL and body is not None:
            text = "".join(pieces[j] for j in body)
            skip = 3 if text.startswith("kv ") else 5 if text.startswith("calc ") else len(text)
            out |= set(body[:1]) | set(body[skip:])
            body = None
        elif body is not None:
            body.append(i)
        elif piece == ANS:
            answer = True
        elif answer:
            if piece in (" ", EOS):
                answer = False
            else:
                out.add(i)
    return out
