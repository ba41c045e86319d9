"""Raw HTTP to an agent's admin port, with full control over Host, Origin and body bytes."""

from __future__ import annotations

import http.client
import json
from typing import Any

from dwcp_agent.client import read_token


def raw(port: int, method: str, path: str, body: bytes | None = None, *, token: str | None = "session",
        content_type: str | None = "application/json", host: str | None = None,
        headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request; `token="session"` sends the session's admin token, None sends none."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", host or f"127.0.0.1:{port}")
        bearer = read_token() if token == "session" else token
        if bearer:
            conn.putheader("Authorization", f"Bearer {bearer}")
        if body is not None:
            if content_type:
                conn.putheader("Content-Type", content_type)
            conn.putheader("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        try:
            return resp.status, json.loads(data) if data else None
        except ValueError:
            return resp.status, data.decode(errors="replace")
    finally:
        conn.close()


def jbody(value: Any) -> bytes:
    return json.dumps(value).encode()
