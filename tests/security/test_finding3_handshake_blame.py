"""Finding 3: anyone, without the key, could make members quarantine each other: a failed ACP
handshake was blamed on the name the caller claimed, and quarantine needed no evidence and never
ended. Now failures count against the source address and are rate-limited; quarantine needs
signed evidence, is reported with it, and is lifted by an admin."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

import msgspec

from dwcp_agent.acp.auth import public_key_hex
from dwcp_agent.acp.byzantine import ByzantineDetector, verify_evidence
from dwcp_agent.acp.runtime.service import ConsensusService
from dwcp_agent.acp.runtime.transport import VERSION, HandshakeFailures
from dwcp_agent.acp.testing.simulation import SimConfig, _Sim
from dwcp_agent.config import load_config
from dwcp_agent.demo import free_port
from dwcp_agent.telemetry.metrics import Metrics

_LEN = struct.Struct(">I")


async def _bad_handshake(port: int, claimed: str, public_key: bytes) -> bool:
    """One handshake claiming `claimed` without the cluster key; True when the listener answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        hello = msgspec.msgpack.encode([VERSION, claimed, os.urandom(16), public_key, b"", b""])
        writer.write(_LEN.pack(len(hello)) + hello)
        await writer.drain()
        try:
            (length,) = _LEN.unpack(await asyncio.wait_for(reader.readexactly(4), 2.0))
            await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            return False
        proof = msgspec.msgpack.encode([os.urandom(32), os.urandom(64)])
        writer.write(_LEN.pack(len(proof)) + proof)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 2.0)
        return True
    finally:
        writer.close()


def test_failed_handshakes_are_counted_per_address_and_never_quarantine_the_claimed_name(tmp_path: Path) -> None:
    victim_key = public_key_hex(tmp_path / "victim")
    port = free_port()
    config = load_config(environ={}, overrides={
        "node_id": "honest", "listen_host": "127.0.0.1", "acp_port": port, "psk": "k" * 32,
        "acp_peers": [f"honest=127.0.0.1:{port}", f"victim=127.0.0.1:{free_port()}"],
        "acp_peer_keys": [f"victim={victim_key}"],
        # The attacker below speaks the ACP handshake in the clear: this test is about blame,
        # the TLS layer in front of it is tests/unit/security (sec-chan).
        "insecure_datacenter_plaintext": True})

    async def scenario() -> tuple[list[bool], ConsensusService]:
        svc = ConsensusService(config, Metrics(), tmp_path / "honest", tick_s=0.01, fsync=False)
        await svc.start()
        try:
            answered = [await _bad_handshake(port, "victim", bytes.fromhex(victim_key)) for _ in range(48)]
            for _ in range(20):
                await asyncio.sleep(0.01)
            return answered, svc
        finally:
            await svc.stop()

    answered, svc = asyncio.run(scenario())
    assert svc.node is not None
    detector = svc.node.replica.detector
    assert not detector.quarantined and "victim" not in detector.scores  # nobody blamed by name
    limit = HandshakeFailures().limit
    assert all(answered[:limit]) and not any(answered[limit:])  # then the address is refused at accept
    refused = svc.metrics.registry.get_sample_value("dwcp_v3_acp_refused_connections_total", {"reason": "invalid_mac"})
    assert refused == limit


def test_failure_window_expires() -> None:
    now = [0.0]
    failures = HandshakeFailures(limit=3, window_s=10, clock=lambda: now[0])
    for _ in range(3):
        failures.record("10.0.0.1")
    assert failures.blocked("10.0.0.1") and not failures.blocked("10.0.0.2")
    now[0] = 10.5
    assert not failures.blocked("10.0.0.1")


def test_hearsay_decays_and_never_quarantines() -> None:
    det = ByzantineDetector("me", half_life_ticks=10)
    for reason in ("invalid_mac", "malformed", "replay", "flooding", "invalid_signature", "equivocation") * 10:
        assert not det.report("victim", reason).quarantined
    assert not det.is_quarantined("victim") and det.suspected() == ["victim"]
    for _ in range(300):
        det.tick()
    assert det.suspected() == [] and det.scores.get("victim", 0) < 1


def test_equivocation_quarantines_with_evidence_anyone_can_check_and_reinstate_lifts_it() -> None:
    sim = _Sim(SimConfig(protocol="pbft", nodes=4, seed=7, byzantine={"n1": "equivocate"}, drop=0.0,
                         crash_rate=0.0, partition_rate=0.0, real_signatures=True))
    report = sim.run()
    assert not report.violations
    holders = {node: r.detector.proofs["n1"] for node, r in sim.replicas.items()
               if r is not None and "n1" in r.detector.proofs}
    assert holders, "no honest replica quarantined the equivocating primary"
    for node, proof in holders.items():
        assert proof.reason == "equivocation" and len(proof.evidence) == 2
        # Any other member re-checks the evidence with its own pinned keys.
        checker = sim.keys["n4" if node != "n4" else "n3"]
        assert verify_evidence(checker.verify, "n1", proof.evidence)
        assert not verify_evidence(checker.verify, "n2", proof.evidence)  # not n2's signatures
    forged = (proof.evidence[0], proof.evidence[0])
    assert not verify_evidence(checker.verify, "n1", forged)  # the same statement twice is no conflict
    quarantined_on = [r for r in sim.replicas.values() if r is not None and r.detector.is_quarantined("n1")]
    for r in quarantined_on:
        r.detector.reinstate("n1")
        assert not r.detector.is_quarantined("n1") and "n1" not in r.detector.proofs
    # Honest replicas are never quarantined by anyone.
    for r in sim.replicas.values():
        if r is not None:
            assert r.detector.quarantined <= {"n1"}
