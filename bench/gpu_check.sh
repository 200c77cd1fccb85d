#!/usr/bin/env bash
# The prepared GPU check: one call on a lent GPU (planned for an H200; each step runs under a time limit, 575 s
# in all, so the script ends within 10 minutes even when a step hangs; a harness stopped at its limit still
# writes the cases it measured). It builds the CUDA module, checks that the Triton kernels compile
# for this GPU, runs the GPU tests against the torch reference (tests/test_gpu.py: small and real shapes, ties,
# -inf, split path, in-place backward), checks every CUDA kernel through its C ABI at real sizes
# (csrc/cuda/check_kernels.py --large: [16384, 151936] bf16, few-row split path, CUDA graphs, a 4M-token
# scan), then runs the benchmark harness on the GPU (bench/run.py --device cuda: every kernel checked against
# the eager reference at [16384, 151936], [8192, 151936] and [64, 151936] bf16 before it is timed against a
# device copy, x.sum(), torch eager, torch.compile and Liger-Kernel if installed, with peak memory) and
# renders bench/results/gpu.md and the README's GPU table from its data.
#
#   bash bench/gpu_check.sh         writes $OUT/gpu_check.log, $OUT/gpu.jsonl, $OUT/gpu.md (OUT: bench/results)
#
# The GPU machine has torch and nvcc but no network: if pybind11, pytest or liger-kernel are missing there,
# put their wheels in .wheels/ first (`pip download pybind11 pytest liger-kernel -d .wheels`) and carry it.
set -uo pipefail
unset TRITON_INTERPRET  # compiled Triton on the GPU
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
exec > >(tee "$log") 2>&1
export PYTHONUNBUFFERED=1

echo "# appo_kernels GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

if [ -d .wheels ]; then pip install -q --no-index --find-links .wheels pybind11 pytest liger-kernel || true; fi
status=0
t0=$(date +%s)
# step SECONDS "what" command...: run it under a time limit, report failure and go on
step() {
  local limit="$1" what="$2"; shift 2
  echo; echo "== $what (limit ${limit} s, at $(( $(date +%s) - t0 )) s)"
  timeout "$limit" "$@" || { echo "!! failed or over ${limit} s: $*"; status=1; }
}

step 120 "build (CPU + CUDA modules, sm_90 only)" env APPO_KERNELS_BUILD_CUDA=1 APPO_KERNELS_BUILD_NATIVE=1 \
  APPO_KERNELS_CUDA_ARCHS=90 \
  pip install -q --no-build-isolation --no-deps -e .
step 45 "Triton kernels compile for this GPU's toolchain (registers / spills)" python .ci/check_triton.py
step 120 "GPU tests vs the torch reference" python -m pytest tests/test_gpu.py -q -x
step 90 "CUDA kernels through their C ABI at real sizes (split path, graphs)" bash -c \
  'nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fPIC -shared csrc/cuda/*.cu -o /tmp/libappo_cuda.so &&
   python csrc/cuda/check_kernels.py --lib /tmp/libappo_cuda.so --large -q'
step 180 "benchmark harness: every kernel checked, then timed vs copy / eager / torch.compile / Liger" \
  python bench/run.py --device cuda --data "$OUT/gpu.jsonl"
if [ "$OUT" = bench/results ]; then
  step 20 "render bench/results/gpu.md and the README's GPU table" python bench/render.py
else
  step 20 "render $OUT/gpu.md" bash -c "cp README.md '$OUT/README.md' && python bench/render.py --results '$OUT' \
    --readme '$OUT/README.md'"
fi
echo
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED) in $(( $(date +%s) - t0 )) s (log: $log)"
exit $status
