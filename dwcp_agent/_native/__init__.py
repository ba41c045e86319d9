"""Compiled Cython kernels built from native/*.pyx by setup.py."""

# The modules other packages use; the rest are internal to _native/.
__all__ = ["delta", "index", "pages", "stream"]
