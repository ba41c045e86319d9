"""Control messages of a live migration between the source and the destination agent.

Order on the tunnel: Offer -> Accept | Refuse; then QEMU's stream; the destination reports
Received when its QEMU has loaded everything; the source answers Commit once ACP has recorded
the new owner (the destination `cont`s and answers Running) or Abort (it kills its QEMU).
With postcopy, Commit(postcopy=True) comes before the switch and the destination `cont`s as
soon as its QEMU enters postcopy.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = ["Abort", "Accept", "Commit", "Message", "Offer", "Received", "Refuse", "Running",
           "decode", "encode"]


class Offer(msgspec.Struct, tag="offer"):
    migration_id: str
    vm_id: str
    facts: dict[str, Any]
    capabilities: list[str]
    dest_qmp: str = ""


class Accept(msgspec.Struct, tag="accept"):
    facts: dict[str, Any]


class Refuse(msgspec.Struct, tag="refuse"):
    reason: str
    problem: str  # incompatible | no_qemu | busy | bad_request


class Received(msgspec.Struct, tag="received"):
    status: str


class Commit(msgspec.Struct, tag="commit"):
    fencing_token: int
    postcopy: bool = False


class Running(msgspec.Struct, tag="running"):
    pass


class Abort(msgspec.Struct, tag="abort"):
    reason: str


Message = Offer | Accept | Refuse | Received | Commit | Running | Abort
_decoder = msgspec.msgpack.Decoder(Message)
_encoder = msgspec.msgpack.Encoder()


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(data: bytes) -> Message:
    """Raises msgspec.DecodeError on anything that is not one of the messages above."""
    return _decoder.decode(data)
