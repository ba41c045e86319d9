"""Make the distribution's pyverbs importable from this venv, and nothing else from dist-packages.

Debian ships pyverbs (rdma-core) only as python3-pyverbs under /usr/lib/python3/dist-packages.
Exposing all system site-packages would let unrelated system modules shadow the venv's pins, so
we symlink just the pyverbs package into the venv's site-packages.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

SYSTEM_DIRS = (Path("/usr/lib/python3/dist-packages"), Path("/usr/lib/python3/site-packages"))


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    target = site / "pyverbs"
    for base in SYSTEM_DIRS:
        source = base / "pyverbs"
        if source.is_dir():
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(source)
            print(f"pyverbs: linked {source} -> {target}")
            return 0
    print("pyverbs: python3-pyverbs is not installed; RDMA discovery will report it missing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
