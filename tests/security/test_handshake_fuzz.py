"""Hypothesis fuzzing of the data-port handshake and the ACP handshake decoders.

Whatever an unauthenticated peer sends, the server side ends with a WireError (or the peer's
close), within the pre-auth bounds, and never with any other exception.
"""

from __future__ import annotations

import contextlib
import socket
import threading

import msgspec
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dwcp_agent import wire
from dwcp_agent.acp.runtime import transport
from tests.security.security_support import PSK

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _serve(data: bytes) -> BaseException | wire.PeerInfo:
    a, b = socket.socketpair()
    a.settimeout(2)
    b.settimeout(2)
    drain = threading.Thread(target=lambda: _drain(b), daemon=True)
    try:
        b.sendall(data)
        b.shutdown(socket.SHUT_WR)
        drain.start()
        try:
            return wire.server_handshake(a, PSK, "receiver")
        except (wire.WireError, OSError) as exc:
            return exc
    finally:
        a.close()
        drain.join(2)
        b.close()


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash_the_data_handshake(data: bytes) -> None:
    outcome = _serve(data)
    assert isinstance(outcome, wire.WireError | OSError)


_hello_fields = st.fixed_dictionaries({
    "type": st.just("hello"),
    "versions": st.lists(st.integers(-2**63, 2**64 - 1), max_size=40),
    "node_id": st.text(max_size=400),
    "nonce": st.binary(max_size=80),
    "role": st.sampled_from(["control", "data", "", "x" * 40]),
    "session": st.integers(0, 2**64 - 1),
    "stream": st.integers(0, 2**16),
    "trace": st.dictionaries(st.text(max_size=80), st.text(max_size=80), max_size=12),
    "capabilities": st.lists(st.text(max_size=80), max_size=20),
})


@FUZZ
@given(_hello_fields, st.binary(max_size=64))
def test_structured_hellos_are_refused_cleanly(fields: dict[str, object], tail: bytes) -> None:
    """A well-formed frame around any Hello: a refusal (no key proof follows), never a crash."""
    payload = msgspec.msgpack.encode(fields)
    header = wire.pack_header(wire.FrameType.CONTROL, 0, 0, 0, 0, 0, 0, len(payload), len(payload),
                              xxhash.xxh3_64_intdigest(payload))
    outcome = _serve(header + payload + tail)
    assert isinstance(outcome, wire.WireError | OSError)


@FUZZ
@given(st.binary(max_size=2048))
def test_acp_hello_and_proof_decoders_reject_garbage_cleanly(data: bytes) -> None:
    for kind in (transport._Hello, transport._Proof):
        with contextlib.suppress(msgspec.DecodeError):  # anything else escaping fails the test
            msgspec.msgpack.decode(data, type=kind)
