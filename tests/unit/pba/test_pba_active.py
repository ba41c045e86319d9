"""The active probe over real loopback connections, blocking and asyncio flavours."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from dwcp_agent.pba.active import ProbeError, run_probe, run_probe_async, serve_probe, serve_probe_async


def test_blocking_probe_measures_rtt_and_a_bounded_burst() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[BaseException] = []

    def peer() -> None:
        conn, _ = listener.accept()
        with conn:
            try:
                serve_probe(conn)
            except BaseException as exc:  # surfaced in the assertion below
                errors.append(exc)

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    with socket.create_connection(listener.getsockname()) as sock:
        result = run_probe(sock, pings=3, burst_bytes=1 << 20)
    t.join(5)
    listener.close()
    assert not errors
    assert 0 < result.rtt_min_s <= result.rtt_median_s < 1.0
    assert result.burst_bytes == 1 << 20
    assert result.bandwidth_bps > 0


def test_asyncio_probe_against_asyncio_peer() -> None:
    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await serve_probe_async(reader, writer)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        result = await run_probe_async(reader, writer, pings=2, burst_bytes=256 * 1024)
        writer.close()
        server.close()
        await server.wait_closed()
        assert result.rtt_min_s > 0 and result.bandwidth_bps > 0

    asyncio.run(main())


def test_probe_refuses_a_peer_that_speaks_something_else() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(b"HTTP/1.1 400 Bad\r\n\r\n")
        with pytest.raises(ProbeError):
            serve_probe(a)
