"""TCP sockets for AMST streams: connect/listen with the configured buffers and congestion control."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

log = logging.getLogger("dwcp_agent.amst")

# Socket options Python's socket module does not export (values from <asm-generic/socket.h>, <linux/tcp.h>).
SO_MAX_PACING_RATE = getattr(socket, "SO_MAX_PACING_RATE", 47)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
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


def default_congestion_control() -> str:
    """The kernel's default congestion control in this network namespace ('' if unknown)."""
    try:
        return Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        return ""


def tune_socket(sock: socket.socket, buffer_bytes: int = 0, congestion: str = "", pacing_rate: int = 0,
                receive_buffer: int = 0) -> None:
    """Set a stream's send buffer, congestion control, pacing and unsent cap; works on live sockets.

    Only SO_SNDBUF follows `buffer_bytes`: the receive window scale is fixed at connect time, so a
    receiver is better served by kernel autotuning (or `receive_buffer` before connect/listen).
    Sizes above net.core.[rw]mem_max use the *BUFFORCE options where the process may (CAP_NET_ADMIN).
    An unavailable congestion control is a ValueError naming what the kernel offers.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, NOTSENT_LOWAT_BYTES)
    for size, force, plain in ((buffer_bytes, SO_SNDBUFFORCE, socket.SO_SNDBUF),
                               (receive_buffer, SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        if size:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, size)
    if congestion:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, congestion.encode())
        except OSError as exc:
            offered = " ".join(available_congestion_controls()) or "unknown"
            raise ValueError(f"tcp_congestion {congestion!r} is not available (kernel offers: {offered})") from exc
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
