"""A 1 TiB sparse image holding 4 GiB of data (issue 16, item 4) on loopback, source and destination
in their own processes: it migrates, verifies, keeps its holes, and neither side's peak RSS
(VmHWM from /proc/<pid>/status) goes over the index budget plus a fixed overhead.

Source and destination live on tmpfs (/dev/shm), so only the 4 GiB of data is allocated there
(about 7 GiB of RAM while the test runs: the source's data and the destination's non-zero pages);
without that much free shared memory the test skips and says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_sparse import same_content

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40
BUDGET = 256 * MiB      # index_budget_bytes default
OVERHEAD = 256 * MiB    # interpreter, libraries, chunk buffers in flight, codec scratch
DATA, REGIONS = 4 * GiB, 16

RECEIVER = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from datapath_support import Receiver
r = Receiver(Path(sys.argv[2]))
print(r.port, flush=True)
sys.stdin.readline()
r.stop()
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1], flush=True)
"""

SENDER = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from datapath_support import PSK, make_config
from dwcp_agent.migration.model import MigrationRequest
from dwcp_agent.migration.sender import SendSession
from dwcp_agent.telemetry.metrics import Metrics
tmp = Path(sys.argv[2])
request = MigrationRequest("m-tib", "vm-tib", tmp / "src" / "tib.img", "127.0.0.1", int(sys.argv[3]),
                           str(tmp / "dst" / "tib.img"))
result = SendSession(make_config(tmp, encode_threads=2), Metrics(), PSK, request).run()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(result.logical_bytes, result.wire_bytes, hwm, flush=True)
"""


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private directory on tmpfs with room for the data (removed after the test)."""
    shm = Path("/dev/shm")
    st = os.statvfs(shm) if shm.is_dir() else None
    if st is None or st.f_bavail * st.f_frsize < DATA * 2 + 2 * GiB:
        pytest.skip(f"/dev/shm needs {(DATA * 2 + 2 * GiB) >> 30} GiB free for 4 GiB of data on both sides")
    path = Path(tempfile.mkdtemp(prefix=f"dwcp-tib-{os.getpid()}-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _write_source(source: Path) -> None:
    """4 GiB in 16 regions of 256 MiB spread over the terabyte. Each MiB: half a page pattern
    repeated in its region (found again by dedupe), a quarter zeros, a quarter random."""
    fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, TiB)
        for i in range(REGIONS):
            offset = i * (TiB // REGIONS) + 7 * MiB
            block = hashlib.shake_256(b"tib%d" % i).digest(MiB // 2) + bytes(MiB // 4)
            noise = np.random.default_rng(i)  # seeded PCG64: twice as fast as os.urandom
            for _ in range(DATA // REGIONS // (16 * MiB)):
                parts = [part for _ in range(16) for part in (block, noise.bytes(MiB // 4))]
                offset += os.pwritev(fd, parts, offset)
    finally:
        os.close(fd)


def test_one_tebibyte_sparse_image_migrates_in_flat_memory(shm_dir: Path) -> None:
    (shm_dir / "src").mkdir()
    (shm_dir / "dst").mkdir()
    source = shm_dir / "src" / "tib.img"
    started = time.monotonic()
    _write_source(source)
    written = time.monotonic()
    data = DATA
    here = str(Path(__file__).parent)
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, here, str(shm_dir)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None and receiver.stdin is not None
        port = receiver.stdout.readline().strip()
        if not port:
            pytest.fail("receiver process did not start")
        sender = subprocess.run([sys.executable, "-c", SENDER, here, str(shm_dir), port], capture_output=True,
                                text=True, timeout=600)
        assert sender.returncode == 0, sender.stderr[-2000:]
        receiver.stdin.write("\n")
        receiver.stdin.flush()
        receiver_hwm = int(receiver.stdout.readline()) * 1024
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait(timeout=10)
    migrated = time.monotonic()
    logical, wire_bytes, sender_hwm = map(int, sender.stdout.split()[-3:])
    sender_hwm *= 1024
    dest = shm_dir / "dst" / "tib.img"
    assert logical == TiB
    assert wire_bytes < data, f"{wire_bytes} wire bytes for {data} bytes of data: holes or zeros were sent"
    assert dest.stat().st_blocks * 512 < 2 * data, "the destination must keep the holes"
    assert same_content(source, dest)
    print(f"1 TiB / {data >> 20} MiB data: source VmHWM {sender_hwm >> 20} MiB, "
          f"destination VmHWM {receiver_hwm >> 20} MiB, wire {wire_bytes >> 20} MiB; "
          f"{written - started:.1f} s to write, {migrated - written:.1f} s to migrate, "
          f"{time.monotonic() - migrated:.1f} s to compare")
    assert sender_hwm < BUDGET + OVERHEAD, f"source peak RSS {sender_hwm >> 20} MiB"
    assert receiver_hwm < BUDGET + OVERHEAD, f"destination peak RSS {receiver_hwm >> 20} MiB"
