"""The project's promises outside the ops: the README's commands, CI and the demo."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"^    (pip install .+)$", text, flags=re.M)


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all('"torch==2.13.0"' in c for c in cmds), "both must pin torch so pip never pulls a CUDA build"


def test_ci_runs_the_readme_test_command():
    test_cmd = [c for c in _readme_commands() if "pytest" in c]
    assert len(test_cmd) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd[0] in [line.strip() for line in ci], "the README's test command must be what .ci/run runs"


def test_build_requirements_hold_no_torch():
    # pip builds in an isolated environment where an unpinned torch would be the multi-GB CUDA build.
    import tomllib
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(r.lower().startswith("torch") for r in requires), requires


def test_demo_runs_and_prints_branch_points():
    out = subprocess.run([sys.executable, "-m", "appo_kernels.demo", "--groups", "2", "--rollouts", "3",
                          "--branches", "2", "--length", "24", "--vocab", "50"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s+\d+\s", line)]
    assert len(rows) >= 2 * 2, out.stdout  # one row per (group, slot), then one per rollout
    assert "candidates" in out.stdout


def test_gpu_bench_script_runs_on_cpu():
    # bench/gpu_bench.py only gets a GPU a few minutes at a time: keep it runnable (small sizes, on CPU).
    out = subprocess.run([sys.executable, "bench/gpu_bench.py", "--device", "cpu", "--small", "--no-compile",
                          "--reps", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ours[torch]" in out.stdout and "future_values" in out.stdout


def test_every_package_is_installed():
    # pyproject.toml lists the packages explicitly (appo_train lives in python/): a new sub-package must be added.
    import tomllib
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "appo_kernels").rglob("__init__.py")}
    found |= {".".join(p.parent.relative_to(ROOT / "python").parts) for p in (ROOT / "python").rglob("__init__.py")}
    assert listed == found
    assert cfg["package-dir"] == {"appo_train": "python/appo_train"}


def test_api_docs_carry_the_support_table_the_tests_enforce():
    # tests/conftest.py skips a BackendUnsupported only where this table says so; the docs must say the same
    from helpers import support_table_markdown
    assert support_table_markdown() in (ROOT / "docs" / "api.md").read_text()
