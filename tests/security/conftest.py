"""A real single-node agent process on loopback, shared by the admin API security tests."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest

from dwcp_agent.demo import LocalAgent


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAgent]:
    root = tmp_path_factory.mktemp("sec-api")
    psk = root / "psk"
    psk.write_text(secrets.token_hex(32))
    node = LocalAgent("guarded", root, psk)
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop(timeout=5)
