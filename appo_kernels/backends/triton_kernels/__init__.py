"""Triton kernels of the triton backend (token statistics, sequence ops); the backend module wires them in."""
