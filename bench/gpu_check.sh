#!/usr/bin/env bash
# The prepared GPU check (one call on a lent H200, well under 10 minutes): build the CUDA module, run the GPU
# tests against the torch reference (CUDA and compiled Triton), check and time every CUDA kernel at real sizes
# ([16384, 151936] bf16 logits; packed sequences up to T = 8192), then bench/gpu_bench.py: every backend vs
# torch eager, torch.compile and Liger-Kernel (bring its wheel in .wheels/), as a table in $OUT/gpu.md.
#
#   bash bench/gpu_check.sh            writes $OUT/gpu_check.log (OUT defaults to bench/results)
#
# The GPU machine has torch and nvcc but no network: if pybind11 or pytest are missing there, put their wheels
# in .wheels/ first (`pip download pybind11 pytest -d .wheels`) and carry that folder along.
set -uo pipefail
unset TRITON_INTERPRET  # compiled Triton on the GPU
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
log="$OUT/gpu_check.log"
exec > >(tee "$log") 2>&1

echo "# appo_kernels GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
nvcc --version | tail -1

if [ -d .wheels ]; then pip install -q --no-index --find-links .wheels pybind11 pytest liger-kernel || true; fi
status=0
step() { echo; echo "== $1"; shift; "$@" || { echo "!! failed: $*"; status=1; }; }

step "build (CPU + CUDA modules)" env APPO_KERNELS_BUILD_CUDA=1 APPO_KERNELS_BUILD_NATIVE=1 \
  pip install -q --no-build-isolation --no-deps -e .
step "Triton kernels compile for this GPU's toolchain (registers / spills)" python .ci/check_triton.py
step "GPU tests vs the torch reference" python -m pytest tests/test_gpu.py -q -x
step "CUDA kernels at real sizes (split path, graphs) + timings vs the bandwidth floor" bash -c \
  'nvcc -O3 -std=c++17 -arch=sm_90 -Xcompiler -fPIC -shared csrc/cuda/*.cu -o /tmp/libappo_cuda.so &&
   python csrc/cuda/check_kernels.py --lib /tmp/libappo_cuda.so --large --bench'
step "every backend vs torch eager / torch.compile / Liger: time, bandwidth vs a copy, peak memory" \
  python bench/gpu_bench.py --out "$OUT/gpu.md"
echo
echo "gpu_check: $([ $status -eq 0 ] && echo all steps passed || echo SOME STEPS FAILED) (log: $log)"
exit $status
