"""The receiver's journal: durable records, identity checks, torn tails, exclusive lock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dwcp_agent.migration.journal import Identity, Journal, JournalBusy, pack_have, unpack_have

ID = Identity(size=10 << 20, chunk_size=1 << 20, vm_id="vm-1")


def _data(tmp_path: Path) -> int:
    return os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT, 0o600)


def test_records_survive_reopen_and_pending_ones_do_not(tmp_path: Path) -> None:
    fd = _data(tmp_path)
    j = Journal(tmp_path / "j", ID)
    j.add(0, 111)
    j.add(5, 555)
    assert j.flush(fd) == 2
    j.add(7, 777)  # never flushed: a crash loses it, and the chunk is sent again
    assert j.known() == {0: 111, 5: 555, 7: 777}
    j.close()
    again = Journal(tmp_path / "j", ID)
    assert again.resumed and again.have == {0: 111, 5: 555}
    again.close()
    os.close(fd)


def test_another_identity_resets_the_journal(tmp_path: Path) -> None:
    fd = _data(tmp_path)
    j = Journal(tmp_path / "j", ID)
    j.add(1, 1)
    j.flush(fd)
    j.close()
    other = Journal(tmp_path / "j", Identity(ID.size * 2, ID.chunk_size, ID.vm_id))
    assert not other.resumed and other.have == {}
    other.close()
    os.close(fd)


def test_torn_or_corrupt_tail_is_ignored(tmp_path: Path) -> None:
    fd = _data(tmp_path)
    j = Journal(tmp_path / "j", ID)
    for i in range(3):
        j.add(i, i * 10)
    j.flush(fd)
    j.close()
    with open(tmp_path / "j", "ab") as f:
        f.write(b"\x01\x02\x03")  # a record cut short by a crash
    reopened = Journal(tmp_path / "j", ID)
    assert reopened.have == {0: 0, 1: 10, 2: 20}
    reopened.close()
    raw = bytearray((tmp_path / "j").read_bytes())
    raw[-5 - 3] ^= 0xFF  # corrupt the last whole record
    (tmp_path / "j").write_bytes(bytes(raw))
    damaged = Journal(tmp_path / "j", ID)
    assert damaged.have == {0: 0, 1: 10}
    damaged.close()
    os.close(fd)


def test_second_writer_is_refused(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", ID)
    with pytest.raises(JournalBusy, match="busy"):
        Journal(tmp_path / "j", ID)
    j.close()


def test_have_map_wire_form_round_trips_and_rejects_partial_pairs() -> None:
    have = {3: 2**64 - 1, 0: 7}
    assert unpack_have(pack_have(have)) == have
    with pytest.raises(ValueError, match="not whole"):
        unpack_have(b"\0" * 17)
