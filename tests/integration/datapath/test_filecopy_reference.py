"""benchmarks/reference/filecopy.c, the C copy bench_datapath quotes agents against: each variant
(plain, --seal, --reserve, both) must deliver the source byte for byte, or its figure means nothing."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[3] / "benchmarks" / "reference" / "filecopy.c"


@pytest.fixture(scope="module")
def filecopy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("filecopy") / "filecopy"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(SOURCE), "-lxxhash", "-lpthread", "-lIPSec_MB"],
                   check=True, capture_output=True, timeout=120)
    return binary


@pytest.mark.parametrize("options", [(), ("--seal",), ("--reserve",), ("--seal", "--reserve")])
def test_copy_is_byte_identical(filecopy: Path, tmp_path: Path, options: tuple[str, ...]) -> None:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = os.urandom(5 * (1 << 20) + 12345)  # a short last chunk
    src.write_bytes(data)
    run = subprocess.run([str(filecopy), *options, str(src), str(dst), "3", str(1 << 20)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) > 0
    assert dst.read_bytes() == data


def test_unknown_option_is_a_usage_error(filecopy: Path, tmp_path: Path) -> None:
    run = subprocess.run([str(filecopy), "--encrypt", "a", "b", "4", "65536"], capture_output=True, text=True,
                         timeout=10)
    assert run.returncode == 2
    assert "usage" in run.stderr


def test_pinned_sides_report_their_own_cpu_time(filecopy: Path, tmp_path: Path) -> None:
    """`--pin S,R` is bench_pipeline's per-side reference: each side's CPU seconds must be its own
    (both > 0, neither the whole run's), and the copy still exact."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = os.urandom(32 << 20)
    src.write_bytes(data)
    cpus = sorted(os.sched_getaffinity(0))
    run = subprocess.run([str(filecopy), "--pin", f"{cpus[0]},{cpus[-1]}", str(src), str(dst), "1", str(1 << 20)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    rate, send_cpu, recv_cpu = (float(field) for field in run.stdout.split())
    assert rate > 0 and send_cpu > 0 and recv_cpu > 0
    assert dst.read_bytes() == data


def test_pin_needs_two_cpus(filecopy: Path, tmp_path: Path) -> None:
    run = subprocess.run([str(filecopy), "--pin", "0", "a", "b", "1", "65536"], capture_output=True, text=True,
                         timeout=10)
    assert run.returncode == 2
    assert "usage" in run.stderr
