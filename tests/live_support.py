"""Helpers for live-migration tests: the cached guest, our QEMU processes, heartbeat checks.

Shared by tests/integration/live and tests/system (tools/ must be on sys.path; conftest.py puts
it there).
"""

from __future__ import annotations

import pytest
from guest.build import Guest, GuestBuildError, build_guest, unsupported_reason
from guest.vm import kill_qemus_under, qemu_pids_under

__all__ = ["kill_qemus_under", "qemu_pids_under", "require_guest"]


def require_guest() -> Guest:
    """The test guest, or skip with the reason it cannot be built or booted here."""
    reason = unsupported_reason()
    if reason:
        pytest.skip(reason)
    try:
        return build_guest()
    except GuestBuildError as exc:
        pytest.skip(f"cannot build the test guest here: {exc}")
