#!/usr/bin/env python3
"""Build csrc/cuda/*.cu for the CPU SIMT emulator (emu.h) into build/libappo_cuda_emu.so.

    python3 build.py [--if-stale] [--asan]     (--asan: AddressSanitizer build, libappo_cuda_emu_asan.so)

Kernel launches `k<<<grid, block, smem, stream>>>(args)` are rewritten to `emu_launch(k, grid, block, args)`;
everything else compiles unchanged against the stand-in headers in include/.
"""
import pathlib
import re
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
CUDA = HERE.parent
BUILD = HERE / "build"
LAUNCH = re.compile(r"(\w[\w:]*(?:<[^<>;]*>)?)\s*<<<([^,]+),\s*([^,]+),\s*([^,]+),\s*([^>]+)>>>\s*\(")


def main() -> int:
    BUILD.mkdir(exist_ok=True)
    sources = [str(HERE / "emu.cpp")]
    for cu in sorted(CUDA.glob("*.cu")):
        text = LAUNCH.sub(lambda m: f"emu_launch({m.group(1)}, {m.group(2)}, {m.group(3)}, ", cu.read_text())
        if "<<<" in text:
            print(f"{cu.name}: a launch was not rewritten", file=sys.stderr)
            return 1
        out = BUILD / (cu.stem + ".emu.cpp")
        out.write_text(f'#line 1 "{cu}"\n' + text)
        sources.append(str(out))
    asan = "--asan" in sys.argv
    lib = BUILD / ("libappo_cuda_emu_asan.so" if asan else "libappo_cuda_emu.so")
    inputs = [*CUDA.glob("*.cu"), *CUDA.glob("*.h"), *CUDA.glob("*.cuh"), *HERE.glob("*.h"), *HERE.glob("*.cpp"),
              *(HERE / "include").glob("*.h"), pathlib.Path(__file__)]
    if "--if-stale" in sys.argv and lib.exists() and lib.stat().st_mtime > max(p.stat().st_mtime for p in inputs):
        return 0
    flags = ["-O1", "-fsanitize=address", "-fno-omit-frame-pointer"] if asan else ["-O2"]
    cmd = ["g++", "-std=c++20", *flags, "-g", "-fPIC", "-shared", "-Wall", "-Wno-unused-function",
           "-Wno-unknown-pragmas", "-fno-strict-aliasing", f"-I{HERE / 'include'}", f"-I{CUDA}",
           "-o", str(lib), *sources]
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
