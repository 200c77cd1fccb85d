"""Adapters for other RL frameworks. Nothing here is imported by `import appo_kernels`; each adapter imports
its framework lazily and names the extra to install when it is missing."""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Import `module` or raise ImportError naming the pip extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is needed for this adapter and is not installed: "
                          f"from a clone of appo_kernels, pip install -e '.[{extra}]' (the package is not on PyPI; "
                          f"see docs/{extra}.md), or install {module.split('.')[0]} yourself") from err
