"""Optional frameworks stay optional: `import appo_kernels` imports none of them, and a missing one names the
pip extra that provides it (issue 6, item 5). Runs without any framework installed."""
import subprocess
import sys

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_importing_appo_kernels_imports_no_framework():
    out = _run("import sys, appo_kernels, appo_kernels.integrations; "
               "bad = [m for m in sys.modules if m.split('.')[0] in ('verl', 'trl', 'ray', 'accelerate')]; "
               "assert not bad, bad")
    assert out.returncode == 0, out.stderr


def test_a_missing_framework_names_the_extra():
    from appo_kernels.integrations import require
    with pytest.raises(ImportError, match=r"pip install -e '\.\[verl\]'"):
        require("verl_that_is_not_installed.core", "verl")


@pytest.mark.parametrize("framework", ["trl", "verl"])
def test_each_adapter_names_its_extra_when_the_framework_is_missing(framework):
    # sys.modules[name] = None makes `import name` fail as if it were not installed
    code = (f"import sys; sys.modules[{framework!r}] = None\n"
            f"try:\n    import appo_kernels.integrations.{framework} as a; a.register() if hasattr(a, 'register') else None\n"
            f"except ImportError as e:\n    print(e)\nelse:\n    raise SystemExit('no ImportError')")
    out = _run(code)
    assert out.returncode == 0, out.stderr
    assert f"pip install -e '.[{framework}]'" in out.stdout or f'pip install ".[{framework}]"' in out.stdout
    assert "appo-kernels[" not in out.stdout          # not on PyPI: the hint points at the install from a clone
