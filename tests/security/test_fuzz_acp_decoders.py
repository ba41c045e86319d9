"""Hypothesis fuzzing of every ACP decoder a peer's bytes reach: envelopes, PBFT bodies, Raft
configuration changes, registry commands, handshake frames, and evidence. Whatever the input, a
decoder returns a value or raises one of the errors its caller handles; nothing else escapes.
DWCP_FUZZ_EXAMPLES sets the examples per decoder (default 400)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from dwcp_agent.acp.byzantine import signed_statement, verify_evidence
from dwcp_agent.acp.messages import (
    ConfChange,
    Envelope,
    EpochFetch,
    EpochState,
    PbftWire,
    RaftMsg,
    RaftType,
    decode_envelope,
    decode_pbft,
    encode,
)
from dwcp_agent.acp.raft.raft import decode_conf
from dwcp_agent.acp.registry import ClaimVm, Command, decode_command, encode_command
from dwcp_agent.acp.runtime.transport import _Hello, _Proof
from tests.security.acp_support import ring

EXAMPLES = int(os.environ.get("DWCP_FUZZ_EXAMPLES", "400"))
HANDLED = (msgspec.DecodeError, msgspec.ValidationError, ValueError, UnicodeDecodeError)

SEEDS = [
    encode(Envelope(3, "a", "b", RaftMsg(RaftType.APP, "a", "b", 7, 1, 2))),
    encode(Envelope(1, "a", "b", EpochState(2, "pbft", b"\x80"))),
    encode(Envelope(0, "a", "b", EpochFetch(9))),
    encode(Envelope(0, "a", "b", PbftWire(5, b"\x93\x01\x02\x03", b"t" * 16))),
    msgspec.msgpack.encode(ConfChange("learner", "n", "127.0.0.1:1", b"k" * 32)),
    encode_command(Command("c", 1, ClaimVm("vm", "h"))),
    msgspec.msgpack.encode(_Hello(1, "a", b"n" * 16, b"k" * 32, b"p" * 32, b"s" * 64)),
    msgspec.msgpack.encode(_Proof(b"p" * 32, b"s" * 64)),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid encoding bent by byte stores, truncation and extension, or plain random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["store", "cut", "extend"]))
        if kind == "store" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        else:
            data += draw(st.binary(max_size=16))
    return bytes(data)


def _survives(decoder: Callable[[bytes], Any], data: bytes) -> None:
    with contextlib.suppress(HANDLED):
        decoder(data)


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "envelope": decode_envelope,
    "pbft": decode_pbft,
    "conf": decode_conf,
    "command": decode_command,
    "hello": lambda b: msgspec.msgpack.decode(b, type=_Hello),
    "proof": lambda b: msgspec.msgpack.decode(b, type=_Proof),
}


@settings(max_examples=EXAMPLES, deadline=None)
@given(name=st.sampled_from(sorted(DECODERS)), data=mutated())
def test_fuzz_acp_decoders_raise_only_handled_errors(name: str, data: bytes) -> None:
    _survives(DECODERS[name], data)


KEYS = ring("p")


@settings(max_examples=EXAMPLES, deadline=None)
@given(items=st.lists(mutated(), max_size=3))
def test_fuzz_evidence_is_never_accepted_unless_signed(items: list[bytes]) -> None:
    assert not verify_evidence(KEYS.verify, "p", tuple(items))  # random bytes never carry p's signature
    good = (signed_statement("p", b"one", KEYS.sign(b"one")), signed_statement("p", b"two", KEYS.sign(b"two")))
    assert verify_evidence(KEYS.verify, "p", good)
