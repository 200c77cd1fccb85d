"""The project's promises outside the ops: the README's commands, CI and the demo."""
import importlib.util
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


def _bench(name):
    """bench/NAME.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_reports_and_readme_tables_are_rendered_from_the_committed_data():
    # nobody copies numbers by hand: bench/results/*.md and the README's bench blocks are what
    # `python bench/render.py` makes of bench/results/*.jsonl
    for path, text in _bench("render").render_all().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} differs from the data: run python bench/render.py"


ROW_KEYS = {"case", "family", "op", "contender", "backend", "shape", "dtype", "k", "metric", "unit", "median", "q1",
            "q3", "min", "max", "n_repeats", "date", "device", "device_name", "torch", "triton", "git_commit",
            "load_avg_start", "load_avg_end", "other_load_cores", "command"}


def test_benchmark_harness_quick_mode_writes_data_the_renderer_reads(tmp_path):
    # the harness itself (CPU suite, and the GPU suite's code on the CPU) at tiny sizes, then the renderer
    run, render = _bench("run"), _bench("render")
    for suite in ("cpu", "gpu"):
        assert run.main(["--quick", "--no-compile", "--suite", suite, "--device", "cpu",
                         "--data", str(tmp_path / f"{suite}.jsonl")]) == 0
        rows = render.load(tmp_path / f"{suite}.jsonl")
        families = {r["family"] for r in rows}
        assert {"token_stats_fwd", "token_stats_fwd_bwd", "future_values", "seq_ops"} <= families, families
        for r in rows:
            assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
            assert r["min"] <= r["q1"] <= r["median"] <= r["q3"] <= r["max"] and r["min"] > 0, r
            assert len(r["samples"]) == r["n_repeats"] >= 2, r
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    out = render.render_all(tmp_path, tmp_path / "README.md")
    cpu, gpu, readme = out[tmp_path / "cpu.md"], out[tmp_path / "gpu.md"], out[tmp_path / "README.md"]
    assert "| [64, 512] | bf16 |" in cpu and "forward / exp bound" in cpu and "dense / ours" in cpu
    assert "time / one read (copy / 2)" in gpu and "| branching_score ours[" in gpu
    assert "measured" in readme.split("<!-- bench:gpu begin")[1]


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
