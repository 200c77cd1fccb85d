"""pytest setup for the micro-benchmarks: make bench/_common importable and share compiled contenders."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import prime_allocator  # noqa: E402

# Same allocator state as bench/run.py (see _common.prime_allocator), whatever the order of the benchmarks.
prime_allocator()

# dynamo keys its cache on the code object: the eager function is recompiled per dtype / top-k / grad mode.
for _attr in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _attr):
        setattr(torch._dynamo.config, _attr, 64)


@pytest.fixture(scope="session")
def compiled_cache():
    """key -> torch.compile'd function, compiled (first call) once per session, outside any benchmark."""
    return {}
