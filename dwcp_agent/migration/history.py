"""Ended migrations survive an agent restart: one JSON line each in state_dir, bounded by count and age.

`dwcp-agent status` after a restart (or a crash) still lists what this agent moved and how it
ended. The file is append-only while the agent runs and compacted (atomically replaced) when it
grows past twice the bound, so it never holds more than 2 x `max_entries` lines.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["MigrationHistory"]

log = logging.getLogger("dwcp_agent.migration")


class MigrationHistory:
    """The last `max_entries` ended migrations younger than `max_age_s`, kept in a JSON-lines file."""

    def __init__(self, path: Path, max_entries: int = 1000, max_age_s: float = 7 * 86400.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._records: deque[dict[str, Any]] = deque()
        self._lines = 0
        self._load()

    def _fresh(self, record: dict[str, Any], now: float) -> bool:
        ended = record.get("finished") or record.get("started") or 0.0
        return isinstance(ended, int | float) and now - ended <= self.max_age_s

    def _load(self) -> None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("migration history %s not read: %s", self.path, exc.strerror)
            return
        now = self._clock()
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write: the others are still good
            if isinstance(record, dict) and isinstance(record.get("id"), str) and self._fresh(record, now):
                self._records.append(record)
        while len(self._records) > self.max_entries:
            self._records.popleft()
        self._compact()

    def add(self, record: dict[str, Any]) -> None:
        """Remember one ended migration (its API record, with `finished` set)."""
        with self._lock:
            self._records.append(record)
            self._prune()
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(record, separators=(",", ":")) + "\n")
                self._lines += 1
                if self._lines > 2 * self.max_entries:
                    self._compact()
            except OSError as exc:
                log.warning("migration history %s not written: %s", self.path, exc.strerror)

    def records(self) -> list[dict[str, Any]]:
        """Remembered migrations, oldest first (entries past `max_age_s` drop out)."""
        with self._lock:
            self._prune()
            return list(self._records)

    def get(self, migration_id: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.records()) if r.get("id") == migration_id), None)

    def _prune(self) -> None:
        now = self._clock()
        while self._records and (len(self._records) > self.max_entries or not self._fresh(self._records[0], now)):
            self._records.popleft()

    def _compact(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in self._records))
            os.replace(tmp, self.path)
            self._lines = len(self._records)
        except OSError as exc:
            log.warning("migration history %s not compacted: %s", self.path, exc.strerror)
