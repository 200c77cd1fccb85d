"""Build entry point: the pure-Python package plus the native extensions in csrc/.

- `appo_kernels._C` (C++17 + OpenMP CPU kernels, pybind11): built whenever a C++ compiler is present.
- `appo_kernels._C_cuda` (raw CUDA kernels + pybind11): built when nvcc and a GPU driver are present.

A failed native build is a warning, not an error: the torch backend keeps working. Environment:
- APPO_KERNELS_BUILD_NATIVE=1 makes a failed CPU build an error, =0 skips it.
- APPO_KERNELS_BUILD_CUDA=1 builds the CUDA module even without a GPU driver (and makes failure an error),
  =0 skips it.
- APPO_KERNELS_CPU_ARCH: the -march of the CPU kernels. Default "native": the kernels are built for the CPU
  that runs `pip install` (AVX-512 makes the vocabulary pass 5x faster than AVX2 here). Set e.g. "x86-64-v3"
  for a build that must run on other machines, or "none" for the compiler's default.
- APPO_KERNELS_CUDA_ARCHS: compute capabilities to build for (default "80;90"; PTX of the last is embedded).
- APPO_KERNELS_SANITIZE: e.g. "address,undefined" builds the CPU kernels with those sanitizers (-O1, no
  recovery), for .ci/sanitize.sh; the module then needs libasan preloaded (LD_PRELOAD) to import.

No torch at build time: the kernels take raw pointers, so pip never installs a torch wheel into the isolated
build environment (where an unpinned torch would be the multi-GB CUDA build).
"""
import ctypes.util
import glob
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    return None if value == "" else value not in ("0", "false", "no", "off")


def _cpu_arch_flags():
    arch = os.environ.get("APPO_KERNELS_CPU_ARCH", "native").strip() or "native"
    return [] if arch == "none" else [f"-march={arch}"]


def _sanitizer_flags():
    sanitize = os.environ.get("APPO_KERNELS_SANITIZE", "").strip()
    if not sanitize:
        return [], []
    flags = [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
    return flags, [f"-fsanitize={sanitize}"]


def _cuda_home():
    """The CUDA toolkit root: CUDA_HOME / CUDA_PATH, /usr/local/cuda, or the one above `nvcc` on PATH."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


def _gpu_driver_present():
    return (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
            or ctypes.util.find_library("cuda") is not None)


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc first; a failed build is reported and skipped unless it was forced."""

    def build_extension(self, ext):
        forced = _flag("APPO_KERNELS_BUILD_CUDA" if ext.name.endswith("_cuda") else "APPO_KERNELS_BUILD_NATIVE")
        try:
            if getattr(ext, "cuda_sources", None):
                ext.extra_objects = [self._nvcc(src) for src in ext.cuda_sources]
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure
            if forced:
                raise
            sys.stderr.write(
                f"\nappo_kernels: could not build the native extension {ext.name} ({err}).\n"
                "appo_kernels still works with the torch backend; install a C++17 compiler with OpenMP "
                "(and nvcc for CUDA) and reinstall to get backend='native'.\n\n")

    def _nvcc(self, src):
        archs = [a.strip() for a in os.environ.get("APPO_KERNELS_CUDA_ARCHS", "80;90").split(";") if a.strip()]
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        obj = os.path.join(self.build_temp, "cuda", os.path.basename(src) + ".o")
        os.makedirs(os.path.dirname(obj), exist_ok=True)
        cmd = [os.path.join(_cuda_home(), "bin", "nvcc"), "-c", src, "-o", obj, "-O3", "-std=c++17",
               "-Xcompiler", "-fPIC", "-Icsrc", *gencode]
        print(" ".join(cmd))
        subprocess.check_call(cmd)
        return obj


def _extensions():
    if _flag("APPO_KERNELS_BUILD_NATIVE") is False:
        return []
    try:
        import pybind11
    except ImportError:
        if _flag("APPO_KERNELS_BUILD_NATIVE"):  # asked for explicitly: a silent skip would hide the failure
            raise RuntimeError("APPO_KERNELS_BUILD_NATIVE=1 but pybind11 is not installed (pip install pybind11)")
        sys.stderr.write("appo_kernels: pybind11 is not installed; skipping the native extensions\n")
        return []
    san_compile, san_link = _sanitizer_flags()
    exts = [Extension(
        "appo_kernels._C",
        sources=["csrc/bindings_cpu.cpp", "csrc/cpu/token_stats.cpp", "csrc/cpu/sequence.cpp"],
        depends=sorted(glob.glob("csrc/cpu/*.h")),   # so that an edited header rebuilds in place
        include_dirs=[pybind11.get_include(), "csrc"],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                            *_cpu_arch_flags(), *san_compile],
        extra_link_args=["-fopenmp", *san_link],
    )]
    cuda = _cuda_home()
    want_cuda = _flag("APPO_KERNELS_BUILD_CUDA")
    if want_cuda or (want_cuda is None and cuda and _gpu_driver_present()):
        if not cuda:
            raise RuntimeError("APPO_KERNELS_BUILD_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        lib = os.path.join(cuda, "lib64")
        ext = Extension(
            "appo_kernels._C_cuda",
            sources=["csrc/bindings_cuda.cpp"],
            include_dirs=[pybind11.get_include(), "csrc", os.path.join(cuda, "include")],
            library_dirs=[lib],
            runtime_library_dirs=[lib],
            libraries=["cudart"],
            language="c++",
            extra_compile_args=["-O3", "-std=c++17"],
        )
        ext.cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        exts.append(ext)
    return exts


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
