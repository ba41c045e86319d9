"""Security test fixtures: a shared guarded agent (admin API tests), fresh agents and an in-process
data server (channel and pre-auth tests), all on loopback."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dwcp_agent.config import load_config
from dwcp_agent.demo import LocalAgent
from dwcp_agent.migration.server import DataServer
from dwcp_agent.telemetry.metrics import Metrics
from tests.security.security_support import PSK, tls_overrides


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


@pytest.fixture
def data_server(tmp_path: Path) -> Iterator[Callable[..., DataServer]]:
    servers: list[DataServer] = []

    def start(**overrides: Any) -> DataServer:
        (tmp_path / "dst").mkdir(exist_ok=True)
        config = load_config(environ={}, overrides={
            "psk": PSK.decode(), "data_port": 0, "listen_host": "127.0.0.1", "node_id": "receiver",
            "state_dir": str(tmp_path / "state"), "dest_dirs": [str(tmp_path / "dst")],
            **tls_overrides(tmp_path), **overrides})
        server = DataServer(config, Metrics(), PSK)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop(2.0)


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., LocalAgent]]:
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(32))
    started: list[LocalAgent] = []

    def start(name: str, env: dict[str, str] | None = None, **settings: object) -> LocalAgent:
        agent = LocalAgent(name, tmp_path, psk, env, {k: str(v) for k, v in settings.items()})
        started.append(agent)
        agent.wait_ready()
        return agent

    yield start
    for agent in started:
        agent.stop(timeout=5)
