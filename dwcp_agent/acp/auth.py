"""Message authentication for ACP: per-pair HMAC keys and per-node Ed25519 signatures.

HMACs authenticate point-to-point PBFT traffic cheaply (about a microsecond); Ed25519 signatures
are used where the protocol needs a proof a third replica can check (pre-prepare headers,
prepares, checkpoints, view changes, new views, client requests). Each node's signing key is its
own (generated once into the state directory). Members' public keys are pinned: from
configuration (`acp_peer_keys`) or committed in the registry when an admin adds a member; the
transport only checks that a peer proves possession of its pinned key, and never changes it.
Per-pair MAC keys are derived from the cluster secret, so they stop outsiders; the signatures are
what stops a member from speaking for another member.
"""

from __future__ import annotations

import hashlib
import hmac
import random
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = ["MAC_LEN", "KeyConflict", "KeyRing", "load_or_create_key", "parse_peer_keys", "public_key_hex"]

MAC_LEN = 16


def _pair_label(a: str, b: str) -> bytes:
    lo, hi = sorted((a, b))
    return f"acp-pair|{lo}|{hi}".encode()


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """This node's signing key, created (mode 0600) on first start."""
    if path.exists():
        return Ed25519PrivateKey.from_private_bytes(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                      serialization.NoEncryption()))
    tmp.chmod(0o600)
    tmp.replace(path)
    return key


class KeyConflict(ValueError):
    """A connection or command tried to change a member's pinned signing key."""


def public_key_hex(state_dir: Path) -> str:
    """This node's public signing key (created on first use), as `acp_peer_keys` wants it."""
    return public_bytes(load_or_create_key(Path(state_dir) / "acp" / "node.key")).hex()


def parse_peer_keys(entries: list[str]) -> dict[str, bytes]:
    """['a=<64 hex digits>', ...] -> {'a': 32-byte Ed25519 public key}."""
    out: dict[str, bytes] = {}
    for item in entries:
        node, sep, text = item.partition("=")
        try:
            key = bytes.fromhex(text.strip())
        except ValueError:
            key = b""
        if not sep or not node.strip() or len(key) != 32:
            raise ValueError(f"acp_peer_keys entry {item!r} is not id=<64 hex digits>")
        out[node.strip()] = key
    return out


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """Raw 32-byte public key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class KeyRing:
    """One node's view of the keys: its own signing key, peers' public keys, pair MAC keys."""

    def __init__(self, node_id: str, signing_key: Ed25519PrivateKey, pair_keys: dict[str, bytes] | None = None,
                 cluster_secret: bytes = b"") -> None:
        self.node_id = node_id
        self._key = signing_key
        self.public_key = public_bytes(signing_key)
        self._pair = dict(pair_keys or {})
        self._secret = cluster_secret
        self._peers: dict[str, Ed25519PublicKey] = {node_id: signing_key.public_key()}
        self._raw: dict[str, bytes] = {node_id: self.public_key}
        self._verified: dict[bytes, bool] = {}

    @classmethod
    def simulated(cls, ids: list[str], rng: random.Random, fast: bool = False) -> dict[str, KeyRing]:
        """Independent random pair keys and signing keys for a simulated cluster (deterministic per rng).

        `fast` swaps Ed25519 for HMAC signatures checked against a shared table of node secrets: each
        ring can still only sign as itself, and thousands of schedules run in seconds.
        """
        if fast:
            return _SimKeyRing.cluster(ids, rng)
        keys = {i: Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)) for i in ids}
        pairs = {(a, b): rng.randbytes(32) for a in ids for b in ids if a < b}
        rings: dict[str, KeyRing] = {}
        for i in ids:
            mine = {(b if a == i else a): k for (a, b), k in pairs.items() if i in (a, b)}
            mine[i] = rng.randbytes(32)
            rings[i] = cls(i, keys[i], mine)
        for ring in rings.values():
            for j in ids:
                ring.add_peer(j, rings[j].public_key)
        return rings

    def add_peer(self, peer: str, public_key: bytes) -> None:
        """Pin a member's public key (from configuration, or committed in the registry by an admin).
        A pinned key is never replaced: a different one raises KeyConflict."""
        pinned = self._raw.get(peer)
        if pinned is not None:
            if not hmac.compare_digest(pinned, public_key):
                raise KeyConflict(f"{peer} already has a different pinned signing key")
            return
        self._peers[peer] = Ed25519PublicKey.from_public_bytes(public_key)
        self._raw[peer] = bytes(public_key)

    def pinned(self, peer: str) -> bytes | None:
        """The raw public key pinned for `peer`, if any."""
        return self._raw.get(peer)

    def knows(self, peer: str) -> bool:
        """True when the peer's public key is known."""
        return peer in self._peers

    def _pair_key(self, peer: str) -> bytes:
        key = self._pair.get(peer)
        if key is None:
            key = hmac.digest(self._secret, _pair_label(self.node_id, peer), "sha256")
            self._pair[peer] = key
        return key

    def mac(self, peer: str, data: bytes) -> bytes:
        """Authenticator of `data` for the pair (self, peer)."""
        return hmac.digest(self._pair_key(peer), data, "sha256")[:MAC_LEN]

    def check_mac(self, peer: str, data: bytes, tag: bytes) -> bool:
        """Constant-time check of a peer's authenticator."""
        return hmac.compare_digest(self.mac(peer, data), tag)

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature by this node."""
        return self._key.sign(data)

    def verify(self, signer: str, data: bytes, sig: bytes) -> bool:
        """Check `signer`'s signature; unknown signers fail. Results are cached by content."""
        memo = hashlib.sha256(signer.encode() + b"\0" + data + sig).digest()
        cached = self._verified.get(memo)
        if cached is not None:
            return cached
        key = self._peers.get(signer)
        ok = False
        if key is not None and len(sig) == 64:
            try:
                key.verify(sig, data)
                ok = True
            except InvalidSignature:
                ok = False
        if len(self._verified) > 65536:
            self._verified.clear()
        self._verified[memo] = ok
        return ok


class _SimKeyRing(KeyRing):
    """Simulation-only signatures: HMAC under the signer's secret, verified through a shared table."""

    def __init__(self, node_id: str, signing_key: Ed25519PrivateKey, pair_keys: dict[str, bytes],
                 secrets: dict[str, bytes]) -> None:
        super().__init__(node_id, signing_key, pair_keys)
        self._secrets = secrets

    @classmethod
    def cluster(cls, ids: list[str], rng: random.Random) -> dict[str, KeyRing]:
        secrets = {i: rng.randbytes(32) for i in ids}
        dummy = Ed25519PrivateKey.from_private_bytes(bytes(32))
        pairs = {(a, b): rng.randbytes(32) for a in ids for b in ids if a < b}
        rings: dict[str, KeyRing] = {}
        for i in ids:
            mine = {(b if a == i else a): k for (a, b), k in pairs.items() if i in (a, b)}
            rings[i] = cls(i, dummy, mine, secrets)
        return rings

    def knows(self, peer: str) -> bool:
        return peer in self._secrets

    def sign(self, data: bytes) -> bytes:
        return hmac.digest(self._secrets[self.node_id], data, "sha256") * 2

    def verify(self, signer: str, data: bytes, sig: bytes) -> bool:
        secret = self._secrets.get(signer)
        return secret is not None and hmac.compare_digest(hmac.digest(secret, data, "sha256") * 2, sig)
