"""sd_notify over a real AF_UNIX datagram socket, as systemd listens for it."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from dwcp_agent.telemetry.sdnotify import Notifier


@pytest.fixture
def systemd_socket(tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def received(sock) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_watchdog_reloading_stopping_reach_the_socket(systemd_socket):
    path, sock = systemd_socket
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving on :8080")
    assert received(sock) == ["READY=1", "STATUS=serving on :8080"]
    assert notifier.watchdog()
    assert received(sock) == ["WATCHDOG=1"]
    assert notifier.reloading()
    reload_fields = received(sock)
    assert reload_fields[0] == "RELOADING=1" and reload_fields[1].startswith("MONOTONIC_USEC=")
    assert int(reload_fields[1].split("=")[1]) > 0
    assert notifier.stopping()
    assert received(sock) == ["STOPPING=1"]


def test_abstract_namespace_socket():
    name = f"dwcp-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert received(sock) == ["READY=1"]
    finally:
        sock.close()


def test_outside_systemd_every_call_is_a_harmless_no(tmp_path):
    assert not Notifier({}).ready()
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).ready()  # socket vanished


def test_watchdog_interval_is_half_of_watchdog_sec_and_only_for_our_pid():
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 15.0
    assert Notifier({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    assert Notifier({}).watchdog_interval_s is None


def test_watchdog_loop_pings_only_while_healthy(systemd_socket):
    path, sock = systemd_socket
    notifier = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})  # ping every 10 ms
    healthy = [True]

    async def run() -> None:
        task = asyncio.create_task(notifier.run_watchdog(lambda: healthy[0]))
        await asyncio.to_thread(received, sock)
        healthy[0] = False
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(run())
    sock.setblocking(False)
    drained = 0
    try:
        while True:
            sock.recv(4096)
            drained += 1
    except BlockingIOError:
        pass
    assert drained <= 2  # at most the pings already in flight when it turned unhealthy
