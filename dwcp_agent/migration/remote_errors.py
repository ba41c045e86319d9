"""What the source says about a destination that failed the handshake, without echoing it.

Before the handshake completes the other end is unauthenticated: whatever it sent (a banner, a
Refuse reason, a node name) must not come back in an API error or a log line, or the agent
becomes a port scanner and a reflector. Errors name the kind of failure, in our own words.
"""

from __future__ import annotations

from dwcp_agent import wire

_OWN_WORDS = {
    "auth": "authentication failed: the pre-shared keys differ",
    "version": "no protocol version in common with this agent",
    "bad_header": "the peer is not a DWCP agent (unexpected bytes instead of a DWCP frame)",
    "bad_length": "the peer sent an oversized frame; not a DWCP agent",
    "checksum": "the peer's frames fail their checksums",
    "malformed": "the peer sent a malformed handshake message",
    "unexpected_message": "the peer answered out of protocol",
    "unexpected_frame": "the peer answered out of protocol",
    "disconnected": "the peer closed the connection during the handshake",
    "handshake": "the handshake was refused",
}


def describe_handshake_failure(error: wire.WireError) -> str:
    """A fixed sentence for the failure kind (`error.error_type`), never the peer's bytes."""
    return _OWN_WORDS.get(error.error_type, f"handshake failed ({_safe_label(error.error_type)})")


def _safe_label(label: str) -> str:
    """An error_type may come from the peer (a Refuse): keep it short and plain."""
    clean = "".join(c for c in label[:32] if c.isalnum() or c == "_")
    return clean or "unknown"


def handshake_error_type(error: wire.WireError) -> str:
    """The metric label for a handshake failure: one of ours, whatever the peer claimed."""
    return error.error_type if error.error_type in _OWN_WORDS else "handshake"
