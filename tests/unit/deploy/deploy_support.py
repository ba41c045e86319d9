"""Paths and tool lookups shared by the deploy-file tests (imported, not a conftest: several
conftest modules exist and would shadow each other)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"


def need_tool(name: str) -> str:
    """Path of a system tool, or skip naming the package the Makefile installs it from."""
    path = shutil.which(name)
    if path is None:
        packages = {"promtool": "prometheus", "prometheus": "prometheus", "amtool": "prometheus-alertmanager",
                    "systemd-analyze": "systemd"}
        pytest.skip(f"{name} not found (apt package {packages.get(name, name)}; `make test` installs it)")
    return path
