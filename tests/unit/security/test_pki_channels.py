"""Cluster PKI and TLS channels: issue, verify identity, rotate without a restart, ACP over TLS."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import Envelope, EpochFetch
from dwcp_agent.acp.runtime.transport import Transport
from dwcp_agent.cli import main
from dwcp_agent.config import ConfigError, load_config
from dwcp_agent.security import channels, pki


def _node(tmp: Path, ca: Path, name: str) -> channels.ChannelSecurity:
    files = pki.NodeFiles.in_dir(tmp / f"tls-{name}")
    pki.issue_node(ca, name, files)
    return channels.ChannelSecurity(name, files)


def _tls_pair(server: channels.ChannelSecurity, client: channels.ChannelSecurity,
              expect: str = "") -> tuple[str, str]:
    """(identity the server saw, identity the client saw) over one loopback TLS connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: dict[str, object] = {}

    def accept() -> None:
        conn, _ = listener.accept()
        try:
            tls = server.wrap_server(conn)
            seen["server"] = channels.peer_identity(tls)
            tls.recv(1)
            tls.close()
        except (OSError, ssl.SSLError) as exc:
            seen["server"] = exc

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    sock = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        tls = client.wrap_client(sock, expect)
        name = channels.peer_identity(tls)
        tls.sendall(b"x")
        tls.close()
    finally:
        thread.join(5)
        listener.close()
    return str(seen["server"]), name


def test_nodes_of_one_ca_see_each_others_names(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    a, b = _node(tmp_path, ca, "node-a"), _node(tmp_path, ca, "node-b")
    assert _tls_pair(a, b, expect="node-a") == ("node-b", "node-a")


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path / "ca1")
    pki.init_ca(tmp_path / "ca2")
    a, stranger = _node(tmp_path, tmp_path / "ca1", "node-a"), _node(tmp_path, tmp_path / "ca2", "node-b")
    with pytest.raises(ssl.SSLError):
        _tls_pair(a, stranger)


def test_the_client_refuses_a_server_certified_for_another_node(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    a, b = _node(tmp_path, ca, "node-a"), _node(tmp_path, ca, "node-b")
    with pytest.raises(channels.PeerIdentityError):
        _tls_pair(a, b, expect="node-c")


def test_rotation_is_picked_up_by_the_next_connection_without_restart(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    a, b = _node(tmp_path, ca, "node-a"), _node(tmp_path, ca, "node-b")
    before = a.server_context()
    first_serial = pki.load_certs(a.files.cert)[0].serial_number if a.files else 0
    assert _tls_pair(a, b) == ("node-b", "node-a")
    pki.rotate_ca(ca)  # new CA: first every node trusts it, then nodes are re-issued one by one
    for name in ("node-a", "node-b"):
        assert main(["pki", "trust", "--ca-dir", str(ca), "--bundle", str(tmp_path / f"tls-{name}" / "ca.pem")]) == 0
    assert _tls_pair(a, b) == ("node-b", "node-a")
    assert main(["pki", "rotate", "--ca-dir", str(ca), "--node-id", "node-a",
                 "--out", str(tmp_path / "tls-node-a")]) == 0
    assert a.files is not None and pki.load_certs(a.files.cert)[0].serial_number != first_serial
    assert a.server_context() is not before  # reloaded from the changed files, same object for the process
    assert _tls_pair(a, b) == ("node-b", "node-a")  # b still on the old CA: both CAs trusted
    assert main(["pki", "issue", "--ca-dir", str(ca), "--node-id", "node-b",
                 "--out", str(tmp_path / "tls-node-b")]) == 0
    assert _tls_pair(b, a) == ("node-a", "node-b")
    for name in ("node-a", "node-b"):
        assert main(["pki", "retire", "--ca-dir", str(ca), "--bundle", str(tmp_path / f"tls-{name}" / "ca.pem")]) == 0
    assert _tls_pair(a, b) == ("node-b", "node-a")


def test_an_agent_without_certificates_refuses_to_start_unless_plaintext_is_explicit(tmp_path: Path) -> None:
    config = load_config(environ={}, overrides={"node_id": "n", "state_dir": str(tmp_path)})
    with pytest.raises(ConfigError) as missing:
        channels.from_config(config)
    assert "pki init" in str(missing.value)
    plain = channels.from_config(load_config(environ={}, overrides={
        "node_id": "n", "state_dir": str(tmp_path), "insecure_datacenter_plaintext": True}))
    assert not plain.encrypted and plain.health()["insecure_datacenter_plaintext"] is True


def test_acp_links_run_over_tls_and_refuse_an_uncertified_peer(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    pki.init_ca(ca)
    pki.init_ca(tmp_path / "rogue-ca")
    sec = {"a": _node(tmp_path, ca, "a"), "b": _node(tmp_path, ca, "b"),
           "x": _node(tmp_path, tmp_path / "rogue-ca", "x")}

    async def scenario() -> list[Envelope]:
        got: list[Envelope] = []
        ring = {n: KeyRing(n, Ed25519PrivateKey.generate()) for n in ("a", "b", "x")}
        for me, other in (("a", "b"), ("b", "a"), ("x", "b"), ("b", "x")):
            ring[me].add_peer(other, ring[other].public_key)
        b = Transport("b", b"k" * 32, ring["b"], lambda p, e: got.append(e), channels=sec["b"])
        a = Transport("a", b"k" * 32, ring["a"], lambda p, e: None, channels=sec["a"])
        x = Transport("x", b"k" * 32, ring["x"], lambda p, e: None, channels=sec["x"])  # has the PSK, not a cert
        await b.start("127.0.0.1", 0)
        for t in (a, x):
            t.set_peers({"b": f"127.0.0.1:{b.port}"})
        x.send(Envelope(0, "x", "b", EpochFetch(4)))
        a.send(Envelope(0, "a", "b", EpochFetch(3)))
        for _ in range(150):
            if got:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        for t in (a, b, x):
            await t.stop()
        return got

    assert [e.body for e in asyncio.run(scenario())] == [EpochFetch(3)]
