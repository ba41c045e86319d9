"""Finding 2: the data channel is encrypted, keyed and bound to the peer's identity.

Before: a plain relay passed the PSK handshake, every byte after it was plaintext, and chunk
checksums and the object digest were unkeyed xxh3, so an on-path rewriter could change a chunk,
fix both, and the destination committed it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dwcp_agent import wire
from dwcp_agent.cli import api_call, follow
from dwcp_agent.demo import LocalAgent
from dwcp_agent.migration.server import DataServer
from tests.security.security_support import CA_DIRNAME, PSK, FrameRewriter, Relay, attacker_context, open_raw

IMAGE_BYTES = 4 << 20


def _migrate(source: LocalAgent, to_port: int, dest_path: Path, image: Path) -> dict[str, Any]:
    started = api_call(source.url, "POST", "/api/v3/migrations",
                       {"source": str(image), "to": f"127.0.0.1:{to_port}", "dest_path": str(dest_path),
                        "vm_id": "vm-" + os.urandom(3).hex()})
    return follow(source.url, started["id"], show_progress=False)


def _image(agent: LocalAgent) -> Path:
    image = agent.images / "secret.img"
    image.write_bytes(os.urandom(IMAGE_BYTES))
    return image


def test_recording_relay_sees_no_plaintext_of_the_image(agents: Callable[..., LocalAgent]) -> None:
    env = {"COMPRESSION_ALGO": "none", "STREAM_COUNT": "2"}
    source, dest = agents("source", env), agents("destination", env)
    image = _image(source)
    relay = Relay(dest.data_port)
    try:
        final = _migrate(source, relay.port, dest.images / "copy.img", image)
    finally:
        relay.stop()
    assert final["state"] == "completed", final.get("error")
    assert (dest.images / "copy.img").read_bytes() == image.read_bytes()
    data, recorded = image.read_bytes(), bytes(relay.recorded)
    assert len(recorded) > IMAGE_BYTES  # the image did go through the relay
    leaked = [off for off in range(0, IMAGE_BYTES, IMAGE_BYTES // 64) if data[off:off + 32] in recorded]
    assert leaked == [], f"{len(leaked)} of 64 sampled image slices readable on the wire"


def test_on_path_rewriter_causes_refusal_never_a_commit(agents: Callable[..., LocalAgent]) -> None:
    env = {"COMPRESSION_ALGO": "none", "STREAM_COUNT": "1"}
    source = agents("source", env, retry_limit=1)
    dest = agents("destination", env)
    image = _image(source)
    target = dest.images / "copy.img"
    rewriter = FrameRewriter()
    relay = Relay(dest.data_port, rewriter)
    try:
        final = _migrate(source, relay.port, target, image)
    finally:
        relay.stop()
    assert not (target.exists() and target.read_bytes() != image.read_bytes()), (
        f"destination committed a rewritten image (state {final['state']}, chunk rewritten "
        f"{rewriter.rewrote_chunk}, digest rewritten {rewriter.rewrote_commit})")
    assert final["state"] == "failed"
    assert image.read_bytes()[:16] != FrameRewriter.EVIL


def test_reflected_connection_is_refused(agents: Callable[..., LocalAgent]) -> None:
    """The source's connection is relayed back to its own data port: it must not migrate to itself."""
    agent = agents("lonely", {"COMPRESSION_ALGO": "none"}, retry_limit=0)
    image = _image(agent)
    relay = Relay(agent.data_port)
    try:
        final = _migrate(agent, relay.port, agent.images / "reflected.img", image)
    finally:
        relay.stop()
    assert final["state"] == "failed"
    assert not (agent.images / "reflected.img").exists()


def test_cluster_member_cannot_claim_another_nodes_name(tmp_path: Path,
                                                        data_server: Callable[..., DataServer]) -> None:
    """Even with the PSK and a genuine certificate for 'mallory', a peer cannot pose as 'source'."""
    server = data_server()
    sock = open_raw(server.port, attacker_context(tmp_path / CA_DIRNAME, "mallory"))
    try:
        with pytest.raises(wire.HandshakeError) as refused:
            wire.client_handshake(sock, PSK, "source", "control")
    finally:
        sock.close()
    assert refused.value.error_type == "identity"
