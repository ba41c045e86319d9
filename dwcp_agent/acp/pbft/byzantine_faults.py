"""Test-only Byzantine behaviours of a PBFT replica: what it sends is rewritten on the way out.

The replica itself runs the honest code; a `FaultyReplica` sits between it and the network and
re-authenticates every frame it alters with the replica's own keys, so the lie reaches the others
exactly as a real faulty member's would. The simulation uses it directly; a real agent only with
both ACP_TEST_BYZANTINE=<behaviour> and ACP_TEST_HOOKS=byzantine-replica-for-tests in its
environment (`from_environment`), and refuses to start on the first without the second. The value
`@<file>` makes the behaviour whatever that file holds (re-read every 0.2 s, empty = honest), so a
test can turn the replica that became primary into a liar once the cluster is up.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import msgspec

from dwcp_agent.acp.auth import KeyRing
from dwcp_agent.acp.messages import (
    Checkpoint,
    Envelope,
    PbftMessage,
    PbftWire,
    Prepare,
    PrePrepare,
    Reply,
    ViewChange,
    decode_pbft,
    encode,
)
from dwcp_agent.acp.pbft.certs import batch_digest, pp_header
from dwcp_agent.acp.registry import Result

__all__ = ["BEHAVIOURS", "HOOK_ENV", "HOOK_UNLOCK", "FaultyReplica", "from_environment"]

BEHAVIOURS = ("equivocate", "forge", "unsigned", "wrong_result", "silent", "selective", "replay", "garbage")
HOOK_ENV = "ACP_TEST_BYZANTINE"
HOOK_UNLOCK = "ACP_TEST_HOOKS"
UNLOCK_VALUE = "byzantine-replica-for-tests"
_LIE = msgspec.msgpack.Encoder(order="sorted").encode(Result(True, "mallory"))


class FaultyReplica:
    """Rewrites one replica's outgoing envelopes according to `behaviour` (see BEHAVIOURS):

    equivocate: as primary, half of the backups get a pre-prepare for a different batch;
    forge / unsigned: signatures on pre-prepares, prepares, checkpoints, view changes replaced by
    random bytes / left empty; wrong_result: every reply claims the owner is "mallory";
    silent: sends nothing; selective: talks to one peer only; replay: re-sends old frames;
    garbage: adds undecodable frames (with and without a valid authenticator).
    """

    def __init__(self, node_id: str, behaviour: str, keys: KeyRing, replicas: list[str],
                 rng: random.Random | None = None, source: Path | None = None) -> None:
        if behaviour not in BEHAVIOURS and not (source is not None and behaviour == ""):
            raise ValueError(f"unknown Byzantine behaviour {behaviour!r}; one of {', '.join(BEHAVIOURS)}")
        self.source = source
        self._read_at = -1.0
        self.id = node_id
        self.replicas = sorted(replicas)
        self.favourite = next((r for r in self.replicas if r != node_id), "")
        self.behaviour = behaviour
        self.keys = keys
        self.rng = rng or random.Random()
        self.sent: list[Envelope] = []

    def out(self, env: Envelope) -> list[Envelope]:
        """What actually leaves for `env.to` instead of `env`."""
        self._refresh()
        b = self.behaviour
        if not b:
            return [env]
        if b == "silent":
            return []
        body = env.body
        if b == "selective":
            return [env] if env.to == self.favourite else []
        if b == "replay":
            self.sent.append(env)
            del self.sent[:-256]
            if len(self.sent) > 5 and self.rng.random() < 0.3:
                return [env, self.sent[self.rng.randrange(len(self.sent) - 1)]]
            return [env]
        if not isinstance(body, PbftWire):
            return [env]
        if b == "garbage":
            return self._garbage(env, body)
        msg = decode_pbft(body.body)
        forged = self._rewrite(env, msg)
        if forged is None:
            return [env]
        raw = encode(forged)
        mac = self.keys.mac(env.to, body.nonce.to_bytes(8, "big") + raw)
        return [Envelope(env.epoch, env.frm, env.to, PbftWire(body.nonce, raw, mac))]

    def _rewrite(self, env: Envelope, msg: PbftMessage) -> PbftMessage | None:
        b = self.behaviour
        if b == "equivocate" and isinstance(msg, PrePrepare) and msg.batch and self._odd_one(env.to):
            batch = msg.batch[:-1]
            digest = batch_digest(batch)
            return PrePrepare(msg.view, msg.seq, digest, batch, self.keys.sign(pp_header(msg.view, msg.seq, digest)))
        if b in ("forge", "unsigned") and isinstance(msg, PrePrepare | Prepare | Checkpoint | ViewChange):
            sig = self.rng.randbytes(64) if b == "forge" else b""
            return msgspec.structs.replace(msg, sig=sig)
        if b == "wrong_result" and isinstance(msg, Reply):
            return Reply(msg.seq, [(client, ts, _LIE) for client, ts, _ in msg.results], msg.replica)
        return None

    def _refresh(self) -> None:
        if self.source is None or time.monotonic() - self._read_at < 0.2:
            return
        self._read_at = time.monotonic()
        try:
            wanted = self.source.read_text().strip()
        except OSError:
            wanted = ""
        self.behaviour = wanted if wanted in BEHAVIOURS else ""

    def _odd_one(self, peer: str) -> bool:
        return peer in self.replicas and self.replicas.index(peer) % 2 == 0

    def _garbage(self, env: Envelope, body: PbftWire) -> list[Envelope]:
        if self.rng.random() >= 0.3:
            return [env]
        junk = self.rng.randbytes(self.rng.randint(1, 40))
        if self.rng.random() < 0.5:
            return [env, Envelope(env.epoch, env.frm, env.to, PbftWire(body.nonce + 7, junk, junk[:16]))]
        nonce = body.nonce + 1_000_000 + self.rng.randint(0, 1 << 20)
        mac = self.keys.mac(env.to, nonce.to_bytes(8, "big") + junk)
        return [env, Envelope(env.epoch, env.frm, env.to, PbftWire(nonce, junk, mac))]


def from_environment(node_id: str, keys: KeyRing, replicas: list[str],
                     environ: dict[str, str] | None = None) -> FaultyReplica | None:
    """The behaviour a test asked for, or None. Raises ValueError when the hook is not unlocked."""
    env = os.environ if environ is None else environ
    behaviour = env.get(HOOK_ENV, "")
    if not behaviour:
        return None
    if env.get(HOOK_UNLOCK) != UNLOCK_VALUE:
        raise ValueError(f"{HOOK_ENV} makes this replica lie on purpose; it is refused outside tests "
                         f"(set {HOOK_UNLOCK}={UNLOCK_VALUE} in a test to allow it)")
    if behaviour.startswith("@"):
        return FaultyReplica(node_id, "", keys, replicas, source=Path(behaviour[1:]))
    return FaultyReplica(node_id, behaviour, keys, replicas)
