"""Shared fixtures: real sockets on loopback, a data server, images, helper processes."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dwcp_agent.client import TOKEN_ENV

ROOT = Path(__file__).resolve().parent.parent
# tools/ (the WAN test bed) is shared by tests and benchmarks but is not part of the package.
if str(ROOT / "tools") not in sys.path:
    sys.path.insert(0, str(ROOT / "tools"))


@pytest.fixture(autouse=True, scope="session")
def admin_token_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One admin token for the session: agents started by tests read it through their
    environment (DWCP_ADMIN_TOKEN_FILE is the config key admin_token_file), `api_call` sends it."""
    path = tmp_path_factory.mktemp("admin") / "admin.token"
    path.write_text(secrets.token_urlsafe(32))
    path.chmod(0o600)
    before = os.environ.get(TOKEN_ENV)
    os.environ[TOKEN_ENV] = str(path)
    yield path
    if before is None:
        os.environ.pop(TOKEN_ENV, None)
    else:
        os.environ[TOKEN_ENV] = before
