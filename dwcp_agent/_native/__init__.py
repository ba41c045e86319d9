"""Compiled Cython kernels built from native/*.pyx by setup.py."""
