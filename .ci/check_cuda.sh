#!/usr/bin/env bash
# Compile-check the CUDA kernels: every csrc/cuda/*.cu with `nvcc -cubin` for sm_80 and sm_90 (-O3, C++17,
# -Xptxas -v), failing on any compile error, and print registers / spills / shared memory per kernel.
# No GPU or CUDA driver is needed. Exits 0 with a message when nvcc is not installed.
#
#   .ci/check_cuda.sh            compile check (0.5-3.5 s per file and architecture, two jobs at a time)
#   .ci/check_cuda.sh --emu      also run the kernels in the CPU SIMT emulator against the torch reference,
#                                plainly and under AddressSanitizer (csrc/cuda/check_kernels.py; needs python3,
#                                g++ and torch; about 20 s with the two emulator builds)
# Environment: NVCC (compiler, default: nvcc on PATH or /usr/local/cuda/bin/nvcc), CUDA_ARCHS (default
# "80 90"), APPO_CUDA_WERROR=1 (treat compiler warnings as errors).
set -euo pipefail
cd "$(dirname "$0")/.."

run_emu=0
for arg in "$@"; do
  case "$arg" in
    --emu) run_emu=1 ;;
    *) echo "usage: $0 [--emu]" >&2; exit 2 ;;
  esac
done

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [ -z "$NVCC" ]; then
  echo "check_cuda: nvcc is not installed; skipping the CUDA compile check (nothing was checked)."
  exit 0
fi

ARCHS="${CUDA_ARCHS:-80 90}"
shopt -s nullglob
sources=(csrc/cuda/*.cu)
if [ "${#sources[@]}" -eq 0 ]; then
  echo "check_cuda: no csrc/cuda/*.cu files" >&2
  exit 1
fi

echo "check_cuda: $("$NVCC" --version | grep -E '^Cuda compilation tools' || echo "$NVCC")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
extra=()
if [ "${APPO_CUDA_WERROR:-0}" = "1" ]; then extra+=(-Werror all-warnings); fi

# One job per (file, architecture), two at a time.
jobs=()
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    jobs+=("$src:$arch")
  done
done
start=$(date +%s.%N)
printf '%s\n' "${jobs[@]}" | xargs -P "${CHECK_CUDA_JOBS:-2}" -I{} bash -c '
  src="${1%%:*}"; arch="${1##*:}"; base="$(basename "$src" .cu)"; log="$2/$base.sm_$arch.log"
  t0=$(date +%s.%N)
  if "$3" -cubin -arch="sm_$arch" -std=c++17 -O3 -Xptxas -v "${@:4}" "$src" -o "$2/$base.sm_$arch.cubin" >"$log" 2>&1; then
    echo ok >"$log.status"
  else
    echo FAIL >"$log.status"
  fi
  t1=$(date +%s.%N)
  awk -v a="$t0" -v b="$t1" "BEGIN { printf \"%.1f\n\", b - a }" >"$log.time"
' _ {} "$work" "$NVCC" "${extra[@]}"

failed=0
for src in "${sources[@]}"; do
  for arch in $ARCHS; do
    base="$(basename "$src" .cu)"
    log="$work/$base.sm_$arch.log"
    status="$(cat "$log.status" 2>/dev/null || echo FAIL)"
    echo
    echo "== $src  sm_$arch  $status  ($(cat "$log.time" 2>/dev/null || echo '?') s)"
    if [ "$status" != ok ]; then
      failed=1
      cat "$log"
      continue
    fi
    # Warnings (anything that is not ptxas info) are shown as they are.
    grep -v -E '^ptxas info|^    [0-9]+ bytes stack frame' "$log" || true
    # One line per kernel: registers, spills, stack, shared memory.
    awk '
      /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); name = substr($0, RSTART + 1, RLENGTH - 2) }
      /bytes stack frame/ { stack = $1; spill_st = $5; spill_ld = $9 }
      /Used [0-9]+ registers/ {
        regs = $5; smem = 0
        if (match($0, /[0-9]+ bytes smem/)) { smem = substr($0, RSTART, RLENGTH); sub(/ bytes smem/, "", smem) }
        print name "\t" regs "\t" spill_st "\t" spill_ld "\t" stack "\t" smem
      }' "$log" | while IFS=$'\t' read -r name regs sst sld stack smem; do
        pretty="$(echo "$name" | c++filt 2>/dev/null || echo "$name")"
        pretty="$(echo "$pretty" | sed -E 's/appo_cuda::\(anonymous namespace\):://g; s/\(.*\)$//; s/^void //')"
        printf '   %-44s regs %3s  spill st/ld %s/%s B  stack %s B  smem %s B\n' "$pretty" "$regs" "$sst" "$sld" "$stack" "$smem"
      done
  done
done
end=$(date +%s.%N)
echo
if [ "$failed" -ne 0 ]; then
  echo "check_cuda: FAILED"
  exit 1
fi
wall="$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')"
echo "check_cuda: all ${#sources[@]} files compiled for sm_${ARCHS// /, sm_} (${wall} s wall)"

if [ "$run_emu" -eq 1 ]; then
  echo
  echo "check_cuda: emulator logic tests (csrc/cuda/emu)"
  python3 csrc/cuda/check_kernels.py -q
  python3 csrc/cuda/check_kernels.py -q --asan
fi
