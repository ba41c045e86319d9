"""The compiled kernels are imported in one place, which checks their constants against Python's."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import dwcp_agent
from dwcp_agent import kernels
from dwcp_agent._native import delta, index, pagemap, pages, stream

PACKAGE = Path(dwcp_agent.__file__).resolve().parent
NATIVE = PACKAGE.parent / "native"


def test_only_the_kernels_module_imports_native() -> None:
    importers = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("dwcp_agent._native") for n in names):
                importers.append(path.relative_to(PACKAGE).as_posix())
    assert importers == ["kernels.py"]


def test_a_constant_that_differs_from_python_fails_the_import() -> None:
    kernels.check_constants(pages, stream, delta, index, pagemap)
    wrong_stream = SimpleNamespace(**{k: getattr(stream, k) for k in dir(stream) if k.isupper()})
    wrong_stream.HEADER_SIZE = 64
    with pytest.raises(ImportError, match=r"make native.*stream.HEADER_SIZE is 64, Python says 56"):
        kernels.check_constants(pages, wrong_stream, delta, index, pagemap)  # type: ignore[arg-type]


def test_the_page_map_writer_is_checked_too() -> None:
    wrong_pagemap = SimpleNamespace(PAGE_SIZE=8192)
    with pytest.raises(ImportError, match=r"pagemap.PAGE_SIZE is 8192, Python says 4096"):
        kernels.check_constants(pages, stream, delta, index, wrong_pagemap)  # type: ignore[arg-type]


def test_kernel_libraries_are_named_in_setup_py_only() -> None:
    """setup.py's LIBRARIES is the one place a kernel's link libraries are set: a `# distutils:`
    line in a .pyx would be a second one."""
    assert sorted(NATIVE.glob("*.pyx")), NATIVE
    for pyx in NATIVE.glob("*.pyx"):
        assert "# distutils:" not in pyx.read_text(), pyx.name


def test_missing_kernels_say_to_run_make_native() -> None:
    code = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("dwcp_agent._native."):
            raise ImportError(f"No module named {name!r}")
sys.meta_path.insert(0, Missing())
try:
    import dwcp_agent.kernels
except ImportError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "run `make native`" in out.stdout
