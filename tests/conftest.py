"""Shared fixtures: real sockets on loopback, a data server, images, helper processes."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# tools/ (the WAN test bed) is shared by tests and benchmarks but is not part of the package.
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))
