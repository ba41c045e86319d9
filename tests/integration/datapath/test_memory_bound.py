"""Memory in flight is bounded by configuration, not by the image: a 384 MiB migration in one
process (sender and receiver both) must not grow the process anywhere near the image size."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MiB = 1 << 20

SCRIPT = r"""
import os, resource, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from datapath_support import Receiver, run_migration
tmp = Path(sys.argv[2])
source = tmp / "src" / "big.img"
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
receiver = Receiver(tmp)
result = run_migration(tmp, receiver, source, compression_algo="none", stream_count=4,
                       max_inflight_bytes="8MiB", encode_threads=2)
receiver.stop()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) * 1024, result.logical_bytes)
"""


def test_peak_memory_stays_far_below_the_image_size(tmp_path: Path) -> None:
    size = 384 * MiB
    (tmp_path / "src").mkdir()
    with open(tmp_path / "src" / "big.img", "wb") as f:
        for _ in range(size // (16 * MiB)):
            f.write(os.urandom(16 * MiB))
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(Path(__file__).parent), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=True)
    growth, moved = map(int, out.stdout.split()[-2:])
    assert moved == size
    # 8 MiB in flight (plus per-stream receive buffers and codec scratch): far below 384 MiB.
    assert growth < 96 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB while moving {size / MiB:.0f} MiB"
