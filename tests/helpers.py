"""Shared helpers for the appo_kernels tests: tolerances, comparisons, random padded/packed batches."""

import torch

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOW_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["padded", "packed"]


# ----------------------------------------------------------------------------------------------------------
# tolerances
# ----------------------------------------------------------------------------------------------------------


def tol(dtype, kind="logp"):
    """(atol, rtol) for comparing a library output computed from `dtype` inputs against the float64 oracle
    (which sees the same, upcast, input values)."""
    if dtype == torch.float64:
        return 1e-10, 1e-10
    if dtype == torch.float32:
        return 1e-5, 1e-5
    # bf16 / fp16 inputs: one rounding of a 16-bit logit moves logp by ~1e-3 (entropy sums V such terms)
    return {"logp": (1e-3, 1e-3), "entropy": (5e-3, 5e-3), "grad": (2e-2, 2e-2)}.get(kind, (1e-3, 1e-3))


def out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(actual, expected, atol, rtol, msg=""):
    """Compare a library tensor with an oracle value (nested lists / tensor) in float64; inf must match inf,
    NaN must match NaN."""
    actual = actual.detach().to(torch.float64).cpu()
    if not torch.is_tensor(expected):
        expected = torch.tensor(expected, dtype=torch.float64)
    expected = expected.to(torch.float64).reshape(actual.shape)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, equal_nan=True,
                               msg=(lambda m: f"{msg}: {m}") if msg else None)


def f64(t):
    """Tensor -> nested python lists of float64 (upcasting the actual low-precision values)."""
    return t.detach().to(torch.float64).cpu().tolist()


# ----------------------------------------------------------------------------------------------------------
# random padded / packed batches
# ----------------------------------------------------------------------------------------------------------


def make_lengths(gen, B, T, *, allow_empty=False):
    """B rollout lengths in [1, T] (one of them exactly T, one of them 1 when B >= 3, one 0 if allow_empty)."""
    lengths = torch.randint(2, T + 1, (B,), generator=gen).tolist()
    lengths[0] = T
    if B >= 3:
        lengths[1] = 1
    if allow_empty and B >= 4:
        lengths[2] = 0
    return lengths


def make_mask(gen, lengths, T, *, tool_spans=True, dtype=torch.bool):
    """[B, T] mask: 1 on generated tokens, 0 on padding (t >= length) and on a tool-output span strictly
    inside each rollout long enough to hold one (mask 0 in the middle)."""
    B = len(lengths)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        mask[b, :L] = True
        if tool_spans and L >= 5:
            start = int(torch.randint(1, L - 3, (1,), generator=gen))
            stop = int(torch.randint(start + 1, L - 1, (1,), generator=gen))
            mask[b, start:stop] = False
    return mask.to(dtype)


def cu_seqlens(lengths, dtype=torch.int64):
    cu = [0]
    for L in lengths:
        cu.append(cu[-1] + L)
    return torch.tensor(cu, dtype=dtype)


def pack(x, lengths):
    """padded [B, T, ...] -> packed [N, ...] (real tokens only)."""
    return torch.cat([x[b, :L] for b, L in enumerate(lengths)], dim=0)


def unpack(x, lengths, T, fill=0):
    """packed [N, ...] -> padded [B, T, ...] with `fill` in padding."""
    out = torch.full((len(lengths), T) + tuple(x.shape[1:]), fill, dtype=x.dtype)
    off = 0
    for b, L in enumerate(lengths):
        out[b, :L] = x[off:off + L]
        off += L
    return out


def rows(x, lengths=None):
    """padded [B, T] tensor -> per-rollout python lists (float64 values / bools / ints), trimmed to lengths
    when given."""
    vals = x.detach().cpu()
    if vals.is_floating_point():
        vals = vals.to(torch.float64)
    out = vals.tolist()
    if lengths is not None:
        out = [r[:L] for r, L in zip(out, lengths)]
    return out


class SeqBatch:
    """Per-token tensors of a batch of rollouts, held padded [B, T]; `.args(layout, *tensors)` gives the same
    tensors in the requested layout plus the cu_seqlens to pass."""

    def __init__(self, lengths, T):
        self.lengths = list(lengths)
        self.T = T
        self.B = len(lengths)

    def args(self, layout, *tensors, cu_dtype=torch.int64):
        if layout == "padded":
            return tuple(tensors) + (None,)
        return tuple(None if t is None else pack(t, self.lengths) for t in tensors) + (
            cu_seqlens(self.lengths, cu_dtype),)

    def to_padded(self, out, layout, fill=0):
        """A library per-token output in `layout` -> padded [B, T] (fill in padding) for comparison."""
        if layout == "padded":
            return out
        return unpack(out, self.lengths, self.T, fill)

    def real(self):
        """[B, T] bool: positions that exist in the rollouts (t < length)."""
        m = torch.zeros(self.B, self.T, dtype=torch.bool)
        for b, L in enumerate(self.lengths):
            m[b, :L] = True
        return m


def seq_logps(gen, lengths, T, dtype, *, delta_scale=0.3, garbage=50.0):
    """Random padded logp / logp_old [B, T] (logp_old = logp + noise), with `garbage` in the padding so an
    op that reads padding gets visibly wrong results."""
    B = len(lengths)
    logp = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 3
    logp_old = logp + torch.randn(B, T, generator=gen, dtype=torch.float64) * delta_scale
    real = torch.zeros(B, T, dtype=torch.bool)
    for b, L in enumerate(lengths):
        real[b, :L] = True
    logp = logp.masked_fill(~real, garbage)
    logp_old = logp_old.masked_fill(~real, -garbage)
    return logp.to(dtype), logp_old.to(dtype)


def mask_as(mask, kind):
    """A bool mask in one of the accepted encodings: bool, integer 0/1 or float 0/1."""
    return {"bool": mask.bool(), "int64": mask.long(), "int32": mask.int(), "uint8": mask.to(torch.uint8),
            "float32": mask.float()}[kind]


# ----------------------------------------------------------------------------------------------------------
# docs
# ----------------------------------------------------------------------------------------------------------

def run_docs_example(page: str, timeout: int = 600):
    """Run the last ```python block of docs/<page> in a fresh interpreter; returns the CompletedProcess."""
    import re
    import subprocess
    import sys
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "docs" / page).read_text()
    example = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)[-1]
    return subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=timeout,
                          check=False)


# ----------------------------------------------------------------------------------------------------------
# the documented support table (docs/api.md, "Backends"): what a backend may refuse with BackendUnsupported
# ----------------------------------------------------------------------------------------------------------

_LOW = ("float32", "bfloat16", "float16")
_SEQ = ("float32", "float64")
# (backend, device type) -> op -> (input dtypes it runs, largest topk or None); written from the docs, not from
# the backends, so that a backend refusing what the docs promise fails the test instead of skipping it.
DOCUMENTED_SUPPORT = {
    ("native", "cpu"): {"token_stats": (_LOW, None), "reverse_discounted_scan": (_SEQ, None),
                        "branching_score": (_SEQ, None)},
    ("native", "cuda"): {"token_stats": (_LOW, 64), "reverse_discounted_scan": (("float32",), None),
                         "branching_score": (("float32",), None)},
    ("triton", "cuda"): {"token_stats": (_LOW, 64), "linear_token_stats": (_LOW, None),
                         "reverse_discounted_scan": (_SEQ, None), "branching_score": (_SEQ, None)},
}
DOCUMENTED_SUPPORT[("triton", "cpu")] = DOCUMENTED_SUPPORT[("triton", "cuda")]   # under the interpreter


def documented_unsupported(backend: str, op: str, device_type: str, dtype, topk: int = 0) -> bool:
    """Whether docs/api.md's table says `backend` does not run `op` for these inputs (torch runs everything)."""
    if backend == "torch":
        return False
    ops = DOCUMENTED_SUPPORT.get((backend, device_type), {})
    if op not in ops:
        return True
    dtypes, max_topk = ops[op]
    dtype_name = str(dtype).replace("torch.", "") if dtype is not None else None
    return (dtype_name is not None and dtype_name not in dtypes) or (max_topk is not None and topk > max_topk)


def support_table_markdown() -> str:
    """DOCUMENTED_SUPPORT as the Markdown table docs/api.md carries (tests/test_project.py keeps them equal)."""
    ops = ("token_stats", "linear_token_stats", "reverse_discounted_scan", "branching_score")
    lines = ["| backend | device | " + " | ".join(f"`{op}`" for op in ops) + " |",
             "|---|---|" + "---|" * len(ops)]
    for (backend, device), table in DOCUMENTED_SUPPORT.items():
        cells = []
        for op in ops:
            if op not in table:
                cells.append("no")
                continue
            dtypes, max_topk = table[op]
            cells.append(", ".join(dtypes) + (f"; topk <= {max_topk}" if max_topk is not None else ""))
        where = "cpu (Triton interpreter)" if (backend, device) == ("triton", "cpu") else device
        lines.append(f"| {backend} | {where} | " + " | ".join(cells) + " |")
    lines.append("| torch | any | " + " | ".join(["float16, bfloat16, float32, float64"] * len(ops)) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# a character-level Hugging Face tokenizer with chat special tokens (the TRL and real-model tests)
# ----------------------------------------------------------------------------------------------------------


def char_chat_tokenizer(specials, **roles):
    """A `PreTrainedTokenizerFast` over the printable characters (one token each, ids after `specials`, which
    take ids 0, 1, ... in order); `roles` names the special tokens' roles (bos_token=, eos_token=, ...)."""
    import string

    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast
    vocab = {s: i for i, s in enumerate(specials)}
    for c in sorted(set(string.printable) - set("\t\r\x0b\x0c")):
        vocab[c] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
