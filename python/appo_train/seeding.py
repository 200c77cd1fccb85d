"""Seeds derived from keys, identical in every process and on every rank.

Every random choice of a run is keyed by what it is for — (seed, step, "init", prompt, slot) for a rollout,
(seed, step, "arpo", prompt) for ARPO's fork decisions — never by the order in which a process happens to
draw, so a run is the same whether its prompts are sampled in one batch, in several, or on several ranks,
and a resumed run is the same as an uninterrupted one. (Python's hash() of a str is randomised per process.)
"""
from __future__ import annotations

import random

import torch


def derive_seed(*key) -> int:
    """A 63-bit seed for `key` (any tuple of ints and strs)."""
    return random.Random(repr(key)).getrandbits(63)


def generator(*key) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*key))


def rng(*key) -> random.Random:
    return random.Random(derive_seed(*key))
