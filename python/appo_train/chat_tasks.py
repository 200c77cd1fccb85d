"""Tasks for a pretrained instruct model (`appo-train --model ...`): arithmetic word problems generated in code,
with a calculator and a lookup tool.

The numbers are chosen so that mental arithmetic fails a small model: 3-digit times 2-digit products, 4-digit
sums and differences. Half of the problems ("two-step") hide one operand behind the lookup tool (the price of an
item, the contents of a container), so a solution reads it first, then calculates:

    user:       A shop sells 35 lamps. Look up the price of one lamp (in cents) with the lookup tool.
                What do they cost in total, in cents?
    assistant:  <lookup>lamp</lookup>
    tool:       748
    assistant:  <calc>35*748</calc>
    tool:       26180
    assistant:  Answer: 26180

Tool calls are plain text the model writes (`<calc>EXPR</calc>`, `<lookup>NAME</lookup>`); the trainer parses
them from the generated text and injects each result as the chat template's tool turn (hf_policy.py). The prompt
is the system message that describes the tools, two worked conversations (one per kind of problem) as earlier
chat turns, then the problem.

Reward (the shape of method §8): -1 for a malformed response (no final `Answer: NUMBER` in the last assistant
turn, a tool call that does not parse, or the generation limit reached); otherwise the token F1 of the answer
against the gold answer, its tokens being the digits with their place value (a number is one token to a
word-level F1, which would give a near miss nothing; the tiny tasks' character F1 would give an anagram, 87400 for
48070, full credit), plus 0.1 when the response used the tools the problem needs
(the calculator; the lookup too on a two-step problem) -- method §8's "both tools", adapted to problems of which
half need one tool. Success means the answer is exactly right.
"""
from __future__ import annotations

import ast
import operator
import random
import re
from dataclasses import dataclass, field

from collections import Counter

from .tasks import Episode

CHAT_TASKS = ("arith",)
CHAT_LIMITS = {"arith": {"tool_budget": 3, "max_new_tokens": 128}}
TOOLS = ("calc", "lookup")
CALL_RE = re.compile(r"<(calc|lookup)>(.*?)</\1>", re.S)
CLOSE_RE = re.compile(r"</(calc|lookup)>")
ANSWER_RE = re.compile(r"Answer:\s*\$?\s*(-?[\d,]*\d(?:\.\d+)?)")

SYSTEM = ("You are a careful assistant with two tools. To calculate, write <calc>EXPRESSION</calc>. To look up a "
          "price or a quantity, write <lookup>NAME</lookup>. Each tool result comes back in the next message. "
          "Never calculate in your head. When you know the result, reply with: Answer: NUMBER")
FEW_SHOT = [
    {"role": "user", "content": "A box holds 23 pens. How many pens are in 417 boxes?"},
    {"role": "assistant", "content": "<calc>417*23</calc>"},
    {"role": "tool", "content": "9591"},
    {"role": "assistant", "content": "Answer: 9591"},
    {"role": "user", "content": "A shop sells 35 lamps. Look up the price of one lamp (in cents) with the lookup "
                                "tool. What do they cost in total, in cents?"},
    {"role": "assistant", "content": "<lookup>lamp</lookup>"},
    {"role": "tool", "content": "748"},
    {"role": "assistant", "content": "<calc>35*748</calc>"},
    {"role": "tool", "content": "26180"},
    {"role": "assistant", "content": "Answer: 26180"},
]

ITEMS = ("pencil", "mug", "notebook", "candle", "towel", "battery", "stapler", "kettle", "scarf", "basket",
         "helmet", "blanket", "ladder", "bucket", "teapot", "wallet")
CONTAINERS = (("crate", "apples"), ("carton", "eggs"), ("sack", "potatoes"), ("pallet", "bricks"),
              ("jar", "beads"), ("bag", "marbles"), ("barrel", "nails"), ("tray", "cookies"))
ONE_STEP = (
    ("*", "A farm packs {a} apples into each of {b} crates. How many apples are packed in all?"),
    ("*", "A stadium has {b} rows with {a} seats in each row. How many seats does it have?"),
    ("+", "A library had {a} books and bought {b} more. How many books does it have now?"),
    ("-", "A tank held {a} litres of water and {b} litres were drained. How many litres are left?"),
)


@dataclass
class ChatTask:
    """One word problem: the question, the gold answer, the lookup table (hidden values and distractors) and
    which tools a solution needs."""
    prompt: str                                  # the question (what the report shows)
    answer: str
    table: dict[str, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ("calc",)
    family: str = "arith"

    def messages(self) -> list[dict]:
        return [{"role": "system", "content": SYSTEM}, *FEW_SHOT, {"role": "user", "content": self.prompt}]

    def tool(self, name: str, arg: str) -> str:
        """Run one call: `calc` evaluates + - * / and parentheses on numbers; `lookup` returns the value of the
        first table entry named in its argument. 'error: ...' for anything else."""
        if name == "calc":
            return calculate(arg)
        if name == "lookup":
            query = arg.strip().lower()
            for key, value in self.table.items():
                if key in query:
                    return value
            return "not found"
        return f"error: no tool {name!r}"


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def calculate(expr: str) -> str:
    """The calculator: an arithmetic expression of numbers, + - * / and parentheses (',' inside numbers and 'x'
    for times accepted); an integer result without a decimal point; 'error: ...' when it does not parse."""
    text = expr.strip().replace(",", "").replace("x", "*").replace("×", "*")
    if not text or len(text) > 80 or not re.fullmatch(r"[\d\s.+\-*/()]+", text):
        return "error: not an expression"

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(node)
    try:
        value = ev(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return "error: not an expression"
    if abs(value) > 1e15:
        return "error: too large"
    return str(int(value)) if float(value).is_integer() else f"{value:.4f}".rstrip("0")


def normalise(number: str) -> str:
    """'26,180' and '26180.0' -> '26180'."""
    text = number.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def digit_f1(pred: str, gold: str) -> float:
    """F1 of the (place, digit) pairs of two numbers, places counted from the right (sign and any decimal point
    are characters of their own place): 18902 against 18912 scores 0.8, 87400 against 48070 scores 0.2."""
    common = sum((Counter(enumerate(reversed(pred))) & Counter(enumerate(reversed(gold)))).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(gold)
    return 2 * p * r / (p + r)


def make_task(rng: random.Random, family: str = "arith") -> ChatTask:
    """Half one-step problems (calc: a 3-digit by 2-digit product, a 4-digit sum or difference), half two-step
    (lookup a price or a container's contents, then a product)."""
    if family not in CHAT_TASKS:
        raise ValueError(f"family: expected one of {CHAT_TASKS}, got {family!r}")
    if rng.random() < 0.5:
        op, text = rng.choice(ONE_STEP)
        if op == "*":
            a, b = rng.randint(123, 987), rng.randint(13, 97)
        elif op == "+":
            a, b = rng.randint(2345, 9876), rng.randint(1234, 8765)
        else:                                     # a 4-digit difference, with borrows more often than not
            a = rng.randint(4567, 9876)
            b = rng.randint(1234, a - 1000)
        value = a * b if op == "*" else a + b if op == "+" else a - b
        return ChatTask(text.format(a=a, b=b), str(value))
    n = rng.randint(24, 98)
    if rng.random() < 0.5:
        item, *others = rng.sample(ITEMS, 4)
        price = rng.randint(101, 999)
        table = {item: str(price)} | {o: str(rng.randint(101, 999)) for o in others}
        prompt = (f"A shop sells {n} {item}s. Look up the price of one {item} (in cents) with the lookup tool. "
                  f"What do they cost in total, in cents?")
        return ChatTask(prompt, str(n * price), table, ("calc", "lookup"))
    (box, things), *others = rng.sample(CONTAINERS, 3)
    per = rng.randint(48, 480)
    table = {box: str(per)} | {b: str(rng.randint(48, 480)) for b, _ in others}
    prompt = (f"Look up how many {things} one {box} holds with the lookup tool. How many {things} are in {n} "
              f"{box}s?")
    return ChatTask(prompt, str(n * per), table, ("calc", "lookup"))


def score_turns(task: ChatTask, turns: list[tuple[str, str]], finished: bool) -> Episode:
    """Reward a response given as its turns: ("gen", text the model wrote) and ("tool", a tool result), in order;
    `finished`: it ended with the end-of-turn token (not cut by the generation limit)."""
    ep = Episode()
    results = [text for kind, text in turns if kind == "tool"]
    calls = [m for kind, text in turns if kind == "gen" for m in CALL_RE.findall(text)]
    ep.calls = [(f"{name} {arg.strip()}", res) for (name, arg), res in zip(calls, results)]
    last = turns[-1][1] if turns and turns[-1][0] == "gen" else ""
    found = ANSWER_RE.findall(last)
    if not finished or not found or len(calls) < len(results) or any(r.startswith("error") for r in results):
        return ep
    ep.answer, ep.well_formed = normalise(found[-1]), True
    used = {name for name, _ in calls}
    ep.reward = digit_f1(ep.answer, task.answer) + (0.1 if set(task.needs) <= used else 0.0)
    ep.success = ep.answer == task.answer
    return ep
