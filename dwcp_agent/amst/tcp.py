"""TCP sockets for AMST streams: connect/listen with the configured buffers and congestion control."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

log = logging.getLogger("dwcp_agent.amst")

# SO_MAX_PACING_RATE from <asm-generic/socket.h>; Python's socket module does not export it.
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
# Unsent bytes a data socket may queue. Without a cap the kernel buffers megabytes per stream that
# have not left the host: memory outside our in-flight bound, and data lost (to send again) when a
# connection breaks. Data already on the wire is not limited by this, only the unsent backlog.
NOTSENT_LOWAT_BYTES = 256 * 1024


def available_congestion_controls() -> list[str]:
    """Congestion control algorithms this kernel offers (empty if unknown)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_available_congestion_control").read_text().split()
    except OSError:
        return []


def tune_socket(sock: socket.socket, buffer_bytes: int = 0, congestion: str = "", pacing_rate: int = 0) -> None:
    """Apply stream options; an unavailable congestion control is an error naming the choices."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
    if congestion:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError as exc:
            choices = " ".join(available_congestion_controls()) or "unknown"
            raise ValueError(f"tcp_congestion {congestion!r} is not available (kernel offers: {choices})") from exc
    if pacing_rate:
        sock.setsockopt(socket.SOL_SOCKET, SO_MAX_PACING_RATE, pacing_rate)


def connect(host: str, port: int, timeout: float, buffer_bytes: int = 0, congestion: str = "",
            pacing_rate: int = 0) -> socket.socket:
    """Open a tuned stream to a peer agent; buffers are set before connect so the window scales."""
    last: OSError | None = None
    for family, stype, proto, _, addr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = socket.socket(family, stype, proto)
        try:
            tune_socket(sock, buffer_bytes, congestion, pacing_rate)
            sock.settimeout(timeout)
            sock.connect(addr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise ConnectionError(f"cannot connect to {host}:{port}: {last}")


def listen(host: str, port: int, buffer_bytes: int = 0, backlog: int = 128) -> socket.socket:
    """A listening socket; accepted streams inherit its buffer sizes."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if buffer_bytes:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_bytes)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_bytes)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock
