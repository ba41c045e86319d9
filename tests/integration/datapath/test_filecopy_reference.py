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
