#!/usr/bin/env bash
# The native CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer: builds appo_kernels._C with
# -fsanitize=address,undefined into a scratch copy of the package and runs, against it,
#   - the native tests of the ops (token statistics, sequence ops, the hostile inputs of tests/test_reliability.py,
#     whose out-of-range cases with value checks off run in subprocesses that inherit the sanitizer),
#   - a randomized sweep native vs torch (tests/test_native_sweep.py, APPO_SWEEP_CASES per op; default 1000).
# Any read or write out of bounds, or undefined behaviour, aborts the run with the sanitizer's report (pytest
# captures sys-level output only, so the report written to fd 2 is shown). About 5 minutes on 2 cores.
# Needs the environment of the README's test command (torch, pytest) and g++.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# the build needs pybind11, which the editable install took only into its isolated build environment
python -m pip install -q "pybind11>=2.12"
APPO_KERNELS_SANITIZE=address,undefined APPO_KERNELS_BUILD_NATIVE=1 APPO_KERNELS_BUILD_CUDA=0 \
  python setup.py -q build_ext --build-lib "$work/lib" --build-temp "$work/tmp" >/dev/null
# The sanitized module beside a copy of the Python package; run from $work so that this copy is the one imported.
cp -r appo_kernels "$work/appo_kernels"
rm -f "$work"/appo_kernels/_C*.so
cp "$work"/lib/appo_kernels/_C*.so "$work/appo_kernels/"

# libasan first; libstdc++ too, so that ASan's __cxa_throw interceptor finds it (python does not link it, and
# torch throws C++ exceptions that become Python errors)
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libstdc++.so)"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export APPO_SWEEP_CASES="${APPO_SWEEP_CASES:-1000}"
cd "$work"
python - <<'PY'
import appo_kernels._C as c
assert c.__file__.startswith(__import__("os").getcwd()), c.__file__
print("sanitize: testing", c.__file__)
PY
python -m pytest -q -p no:cacheprovider --capture=sys --rootdir "$repo" -c "$repo/pyproject.toml" \
  "$repo/tests/test_native_sweep.py" \
  "$repo/tests/test_reliability.py" \
  "$repo/tests/test_token_stats.py" "$repo/tests/test_future_values.py" "$repo/tests/test_scores.py" \
  "$repo/tests/test_advantages.py" "$repo/tests/test_future_kl.py" \
  -k "native or sweep or nearest or policy_loss" -m "not slow"
