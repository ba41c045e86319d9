"""Make the distribution's pyverbs importable from this venv, and nothing else from dist-packages.

Debian ships pyverbs (rdma-core) only as python3-pyverbs under /usr/lib/python3/dist-packages.
Exposing all system site-packages would let unrelated system modules shadow the venv's pins, so
we symlink just the pyverbs package into the venv's site-packages. pyverbs is compiled (Cython)
for the distribution's Python: the link is only useful when the venv runs the same version, so
this checks the extension suffix and then imports it. Without pyverbs the agent still runs (TCP),
so a missing or mismatched pyverbs is reported, not fatal.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import sys
import sysconfig
from pathlib import Path

SYSTEM_DIRS = (Path("/usr/lib/python3/dist-packages"), Path("/usr/lib/python3/site-packages"))


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    target = site / "pyverbs"
    for base in SYSTEM_DIRS:
        source = base / "pyverbs"
        if not source.is_dir():
            continue
        suffixes = importlib.machinery.EXTENSION_SUFFIXES
        if not any(f.name.endswith(tuple(suffixes)) for f in source.iterdir()):
            print(f"pyverbs: {source} is built for another Python (this venv needs {suffixes[0]}); "
                  "RDMA discovery will report pyverbs missing", file=sys.stderr)
            return 0
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)
        try:
            importlib.import_module("pyverbs.device")
        except ImportError as exc:
            print(f"pyverbs: linked {source} but it does not import: {exc}", file=sys.stderr)
            return 0
        print(f"pyverbs: linked {source} -> {target}")
        return 0
    print("pyverbs: python3-pyverbs is not installed; RDMA discovery will report it missing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
