"""Crash tests only: hold an agent at a named point of the handover so a test can kill it there.

LIVE_MIGRATION_TEST_HOLD=<point>:<seconds>; points: before-commit, after-commit (source agent),
before-cont (destination agent, Commit received, VM not yet running).
"""

from __future__ import annotations

import asyncio
import logging
import os

__all__ = ["TEST_HOLD_ENV", "hold_for_test", "hold_seconds"]

log = logging.getLogger("dwcp_agent.live")
TEST_HOLD_ENV = "LIVE_MIGRATION_TEST_HOLD"


def hold_seconds(point: str) -> float:
    """How long the test asks to hold at `point` (0: not at all)."""
    name, _, seconds = os.environ.get(TEST_HOLD_ENV, "").partition(":")
    return float(seconds) if name == point and seconds else 0.0


async def hold_for_test(point: str) -> None:
    seconds = hold_seconds(point)
    if seconds:
        log.warning("test hold: %s for %s s (%s)", point, seconds, TEST_HOLD_ENV)
        await asyncio.sleep(seconds)
