"""Build entry point.

Pure Python today; the native C++/CUDA extensions (csrc/) are added here, built only when their toolchains are
present, so that `pip install .` always succeeds and the torch backend always works.
"""
from setuptools import setup

setup()
