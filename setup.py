"""Build entry point: the pure-Python package plus the native extensions in csrc/.

- `appo_kernels._C` (C++17 + OpenMP CPU kernels, pybind11): built whenever a C++ compiler is present.
  A failed build is a warning, not an error: the torch backend keeps working. APPO_KERNELS_BUILD_NATIVE=1 makes
  a failure an error, =0 skips the build.
- APPO_KERNELS_CPU_ARCH: the -march of the CPU kernels. Default "native": the kernels are built for the CPU
  that runs `pip install` (AVX-512 makes the vocabulary pass 5x faster than AVX2 here). Set e.g. "x86-64-v3"
  for a build that must run on other machines, or "none" for the compiler's default.

No torch at build time: the kernels take raw pointers, so pip never installs a torch wheel into the isolated
build environment (where an unpinned torch would be the multi-GB CUDA build).
"""
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name):
    value = os.environ.get(name, "").strip().lower()
    return None if value == "" else value not in ("0", "false", "no", "off")


def _cpu_arch_flags():
    arch = os.environ.get("APPO_KERNELS_CPU_ARCH", "native").strip() or "native"
    return [] if arch == "none" else [f"-march={arch}"]


class BuildExt(build_ext):
    """Builds the native extensions; a failure is reported and skipped unless the build was forced."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as err:  # noqa: BLE001 - any compiler failure
            if _flag("APPO_KERNELS_BUILD_NATIVE"):
                raise
            sys.stderr.write(
                f"\nappo_kernels: could not build the native extension {ext.name} ({err}).\n"
                "appo_kernels still works with the torch backend; install a C++17 compiler with OpenMP "
                "(e.g. g++) and reinstall to get backend='native'.\n\n")


def _extensions():
    if _flag("APPO_KERNELS_BUILD_NATIVE") is False:
        return []
    try:
        import pybind11
    except ImportError:
        sys.stderr.write("appo_kernels: pybind11 is not installed; skipping the native extension\n")
        return []
    return [Extension(
        "appo_kernels._C",
        sources=["csrc/bindings_cpu.cpp", "csrc/cpu/token_stats.cpp", "csrc/cpu/sequence.cpp"],
        include_dirs=[pybind11.get_include(), "csrc"],
        language="c++",
        extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
                            *_cpu_arch_flags()],
        extra_link_args=["-fopenmp"],
    )]


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
