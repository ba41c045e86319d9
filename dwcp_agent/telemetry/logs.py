"""JSON-lines logs on stdout, with the fields the ops guide's LogQL queries filter on.

Use the stdlib logger with `extra=`: `log.info("migration done", extra={"component": "migration",
"migration_id": mid, "migration_status": "completed", "duration_ms": 812})`. The active
OpenTelemetry span, when there is one, fills `trace_id` and `span_id`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


def _span_ids() -> tuple[str | None, str | None]:
    try:
        from opentelemetry import trace
    except ImportError:  # tracing is optional for log formatting
        return None, None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None, None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; unknown `extra` keys are kept, never dropped."""

    def __init__(self, node_id: str = "") -> None:
        super().__init__()
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
            "logger": record.name,
        }
        if self.node_id:
            line["node_id"] = self.node_id
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                line[key] = value
        line.setdefault("component", record.name.split(".")[1] if record.name.count(".") else "agent")
        trace_id, span_id = _span_ids()
        if trace_id and "trace_id" not in line:
            line["trace_id"], line["span_id"] = trace_id, span_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, separators=(",", ":"))


def setup_logging(level: str = "info", node_id: str = "", stream: TextIO | None = None) -> None:
    """Send every `dwcp_agent.*` logger to `stream` (stdout) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter(node_id))
    root = logging.getLogger("dwcp_agent")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
