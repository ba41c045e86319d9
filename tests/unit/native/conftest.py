"""The socket pair + partial file the native stream tests drive; sized by the test module's SIZE."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

Link = tuple[socket.socket, socket.socket, int, Path]


@pytest.fixture
def link(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Link]:
    sender, receiver = socket.socketpair()
    path = tmp_path / "partial"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, request.module.SIZE)
    yield sender, receiver, fd, path
    os.close(fd)
    sender.close()
    receiver.close()
