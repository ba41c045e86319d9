"""Fixtures that run real agent processes on loopback and stop them afterwards, whatever happens."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dwcp_agent.demo import LocalAgent

StartAgent = Callable[..., LocalAgent]


@pytest.fixture
def start_agent(tmp_path: Path) -> Iterator[StartAgent]:
    psk = tmp_path / "psk"
    psk.write_text(secrets.token_hex(32))
    agents: list[LocalAgent] = []

    def start(name: str, wait: bool = True, env: dict[str, str] | None = None, **settings: object) -> LocalAgent:
        agent = LocalAgent(name, tmp_path, psk, env, {k: str(v) for k, v in settings.items()})
        agents.append(agent)
        if wait:
            agent.wait_ready()
        return agent

    yield start
    for agent in agents:
        agent.stop(timeout=5)
