"""The policy: a tiny transformers causal LM built from a config, and batched multi-turn generation with a
KV cache and the tool loop.

Generation is a hand-written loop over `model(..., cache=...)`: each row feeds its pending tokens (its prompt
or branch prefix at first, then one sampled token, or a tool result) as a left-padded chunk; padding inside
the sequence is masked out and positions count real tokens only, so every row sees exactly what it would see
alone. Finished rows are dropped from the cache as the batch thins out.

What a tool call, a tool result, a prompt and the end of a response are is asked of the tokenizer object (its
tool protocol: `stop_ids`, `prompt_ids`, `call_ended`, `calls_made`, `tool_result`, `score`): `CharTokenizer`
for the bundled tiny model, `hf_policy.ChatTokenizer` for a Hugging Face causal LM and its chat template.
The model may sit on a GPU (bf16 autocast there); the bookkeeping and the sampling streams stay on the CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .tasks import Task
from .tokenizer import GEN, PROMPT, TOOL, CharTokenizer  # noqa: F401  (token kinds: only GEN is trained)


@dataclass
class PolicyConfig:
    """Shape of the tiny Qwen2-style policy (about 0.3M parameters at the defaults)."""
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    max_positions: int = 192


def build_policy(tokenizer: CharTokenizer, cfg: PolicyConfig, seed: int) -> torch.nn.Module:
    """A randomly initialised Qwen2ForCausalLM (no download), deterministic for a seed."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    config = Qwen2Config(vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
                         intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                         num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                         max_position_embeddings=cfg.max_positions, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
                         eos_token_id=tokenizer.eos_id, attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


@dataclass
class Rollout:
    """One response: the full token sequence (prompt first) with the kind of every token.

    For a branch, `parent` is the index of the initial rollout it was forked from (in the same batch) and
    `split` the last position it shares with it; both are -1 for an initial rollout."""
    task: int
    tokens: list[int]
    kinds: list[int]
    prompt_len: int
    calls: int = 0
    truncated: bool = False
    parent: int = -1
    split: int = -1
    seed: int = 0                      # this row's own sampling stream (see seeding.py)
    pending: list[int] = field(default_factory=list, repr=False)

    @property
    def num_generated(self) -> int:
        return sum(k == GEN for k in self.kinds)


def autocast(model: torch.nn.Module):
    """bf16 autocast for a model on a CUDA device; nothing on the CPU."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _append_tool_result(r: Rollout, tasks: list[Task], tok: CharTokenizer, budget: int) -> None:
    """After a closed call (e.g. a sampled </call>): run the call (within the budget) and queue its result
    (<res>result</res>, or the chat template's tool turn) as tool tokens."""
    r.calls += 1
    ids = tok.tool_result(r.tokens, r.kinds, tasks[r.task], r.calls <= budget)
    r.tokens += ids
    r.kinds += [TOOL] * len(ids)
    r.pending += ids


def start_rollout(task: int, tokens: list[int], kinds: list[int], prompt_len: int, tasks: list[Task],
                  tok: CharTokenizer, budget: int, *, parent: int = -1, split: int = -1, seed: int = 0) -> Rollout:
    """A row that continues `tokens` (a prompt, or a branch prefix whose tool results are reused), sampled
    from its own random stream `seed`."""
    r = Rollout(task, list(tokens), list(kinds), prompt_len, parent=parent, split=split, seed=seed,
                pending=list(tokens))
    r.calls = tok.calls_made(tokens, kinds)
    if tok.call_ended(tokens, kinds):
        r.calls -= 1                      # counted again by the tool run below
        _append_tool_result(r, tasks, tok, budget)
    return r


def _finished(r: Rollout, tok: CharTokenizer, max_new: int) -> bool:
    return (r.kinds[-1] == GEN and r.tokens[-1] in tok.stop_ids) or r.num_generated >= max_new


@torch.no_grad()
def generate(model: torch.nn.Module, rows: list[Rollout], tasks: list[Task], tok: CharTokenizer, *,
             max_new: int, budget: int, temperature: float = 1.0, greedy: bool = False) -> list[Rollout]:
    """Sample every row to <eos> or `max_new` generated tokens, running tool calls as they are emitted.

    Rows are modified in place and returned. Each row draws from its own stream (`Rollout.seed`, inverse-CDF
    sampling), so what a row samples does not depend on which other rows share its batch."""
    from transformers import DynamicCache
    model.eval()
    device = next(model.parameters()).device
    slots = [i for i, r in enumerate(rows) if not _finished(r, tok, max_new)]   # rows in cache order
    streams = {i: torch.Generator().manual_seed(rows[i].seed) for i in slots}
    live = [True] * len(slots)
    cache = DynamicCache(config=model.config)
    attn = torch.zeros(len(slots), 0, dtype=torch.long)
    while any(live):
        width = max(len(rows[i].pending) for i in slots)
        ids = torch.full((len(slots), width), tok.pad_id, dtype=torch.long)
        chunk = torch.zeros(len(slots), width, dtype=torch.long)
        for b, i in enumerate(slots):
            p = rows[i].pending          # empty for a finished row still in the cache: one masked pad
            if p:
                ids[b, width - len(p):] = torch.tensor(p)
                chunk[b, width - len(p):] = 1
        attn = torch.cat([attn, chunk], 1)
        pos = (attn.cumsum(1) - 1).clamp(min=0)[:, -width:]
        with autocast(model):
            logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                           cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float().cpu()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            cdf = torch.softmax(logits / temperature, -1).cumsum(-1)
            u = torch.stack([torch.rand((), generator=streams[i]) for i in slots]) * cdf[:, -1]
            nxt = torch.searchsorted(cdf, u[:, None]).clamp(max=cdf.shape[1] - 1)[:, 0]
        for b, i in enumerate(slots):
            if not live[b]:
                continue
            r, t = rows[i], int(nxt[b])
            r.tokens.append(t)
            r.kinds.append(GEN)
            r.pending = [t]
            if tok.call_ended(r.tokens, r.kinds):
                _append_tool_result(r, tasks, tok, budget)
            if _finished(r, tok, max_new):
                r.truncated = t not in tok.stop_ids
                r.pending, live[b] = [], False
        if sum(live) <= 0.75 * len(slots):      # drop finished rows from the cache as the batch thins out
            keep = torch.tensor([b for b in range(len(slots)) if live[b]], dtype=torch.long)
            cache.batch_select_indices(keep.to(device))
            attn = attn[keep]
            slots = [slots[b] for b in keep.tolist()]
            live = [True] * len(slots)
    return rows


def pad_batch(rows: list[Rollout], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded `tokens [R, T]` int64, `attention [R, T]` int64 and `kinds [R, T]` int64 (-1 on padding)."""
    width = max(len(r.tokens) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    kinds = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r.tokens)] = torch.tensor(r.tokens)
        kinds[i, :len(r.kinds)] = torch.tensor(r.kinds)
    return tokens, (kinds >= 0).long(), kinds


def token_logits(model: torch.nn.Module, tokens: Tensor, attention: Tensor) -> Tensor:
    """`[R, T, V]` logits aligned with the tokens: row t holds the logits that predicted token t (row 0,
    the <bos>, is zeros), on the model's device. Differentiable when called under grad."""
    device = next(model.parameters()).device
    with autocast(model):
        logits = model(input_ids=tokens.to(device), attention_mask=attention.to(device)).logits
    return torch.cat([logits.new_zeros(logits.shape[0], 1, logits.shape[2]), logits[:, :-1]], 1)
