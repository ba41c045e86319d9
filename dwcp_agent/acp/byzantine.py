"""Byzantine behaviour detection: suspicion per peer, and quarantine on signed evidence only.

Pure like the protocols: time is the tick count the caller drives. Protocol code calls `report`
with a reason. Without `evidence` a report is hearsay: a bad authenticator, a malformed or
replayed frame or a flood may come from anyone who can reach the port or replay a link, so it
only raises a suspicion score that halves every `half_life_ticks` and is counted and logged.
A peer is quarantined (every message from it dropped) only when the report carries evidence a
third party can check: messages signed by that peer which contradict each other, e.g. two
pre-prepares for one view and sequence with different digests. The evidence is kept and
reported with the quarantine, which lasts until an operator reinstates the peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

__all__ = ["REASONS", "WEIGHTS", "ByzantineDetector", "Detection", "signed_statement", "verify_evidence"]

WEIGHTS: dict[str, float] = {
    "equivocation": 100.0,
    "invalid_view_change": 60.0,
    "invalid_signature": 40.0,
    "invalid_mac": 15.0,
    "malformed": 15.0,
    "flooding": 25.0,
    "replay": 5.0,
    "wrong_result": 40.0,  # a reply whose result differs from the one f+1 replicas agree on
}
REASONS = tuple(WEIGHTS)
MAX_PENDING_EVENTS = 1024  # detections kept between two drains; hearsay beyond it is scored, not queued


def signed_statement(signer: str, data: bytes, sig: bytes) -> bytes:
    """One item of evidence: what `signer` signed and its signature (msgpack [signer, data, sig])."""
    return msgspec.msgpack.encode((signer, data, sig))


def verify_evidence(verify: Callable[[str, bytes, bytes], bool], peer: str, evidence: tuple[bytes, ...]) -> bool:
    """True when every item is a statement signed by `peer` (checked with `verify`, e.g. KeyRing.verify)
    and the statements differ: what an operator or another replica re-checks before believing it."""
    statements = []
    for item in evidence:
        try:
            signer, data, sig = msgspec.msgpack.decode(item, type=tuple[str, bytes, bytes])
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        if signer != peer or not verify(signer, data, sig):
            return False
        statements.append(data)
    return bool(statements) and len(set(statements)) == len(statements)


@dataclass(frozen=True)
class Detection:
    """One report against `peer`; `evidence` holds the signed messages proving it (empty: hearsay);
    `quarantined` tells whether it put the peer in quarantine."""

    peer: str
    reason: str
    score: float
    quarantined: bool
    detail: str = ""
    evidence: tuple[bytes, ...] = ()


class ByzantineDetector:
    """Scores, flood counting, anti-replay windows and the quarantine set of one replica."""

    def __init__(self, node_id: str, *, threshold: float = 100.0, half_life_ticks: int = 200,
                 flood_limit: int = 20000, flood_window_ticks: int = 10, replay_window: int = 4096) -> None:
        self.node_id = node_id
        self.threshold = threshold
        self.half_life = half_life_ticks
        self.flood_limit = flood_limit
        self.flood_window = flood_window_ticks
        self.replay_window = replay_window
        self.scores: dict[str, float] = {}
        self.quarantined: set[str] = set()
        self.proofs: dict[str, Detection] = {}  # quarantined peer -> the report that carried the evidence
        self.events: list[Detection] = []
        self._counts: dict[str, int] = {}
        self._ticks = 0
        self._nonces: dict[str, tuple[int, set[int]]] = {}

    def report(self, peer: str, reason: str, detail: str = "", evidence: tuple[bytes, ...] = ()) -> Detection:
        """Record a report; returns the detection (also queued for `drain`). Only a report with
        `evidence` (signed messages of `peer`, checked by the caller) quarantines."""
        if peer == self.node_id:
            return Detection(peer, reason, 0.0, False, detail)  # own messages echoed back: not evidence
        score = self.scores.get(peer, 0.0) + WEIGHTS[reason]
        self.scores[peer] = score
        tipped = bool(evidence) and peer not in self.quarantined
        event = Detection(peer, reason, score, tipped, detail, tuple(evidence))
        if tipped:
            self.quarantined.add(peer)
            self.proofs[peer] = event
        if len(self.events) < MAX_PENDING_EVENTS or tipped:  # a flood of hearsay cannot grow memory
            self.events.append(event)
        return event

    def suspected(self) -> list[str]:
        """Peers whose (decaying, evidence-free) suspicion score is over the threshold: for alerts only."""
        return sorted(p for p, s in self.scores.items() if s >= self.threshold and p not in self.quarantined)

    def is_quarantined(self, peer: str) -> bool:
        """Messages from a quarantined peer are dropped unread."""
        return peer in self.quarantined

    def reinstate(self, peer: str) -> None:
        """Operator decision: clear the quarantine and the score."""
        self.quarantined.discard(peer)
        self.proofs.pop(peer, None)
        self.scores.pop(peer, None)

    def admit(self, peer: str) -> bool:
        """Count one message from `peer`; False (and a flooding report once per window) over the limit."""
        count = self._counts.get(peer, 0) + 1
        self._counts[peer] = count
        if count == self.flood_limit + 1:
            self.report(peer, "flooding", f"more than {self.flood_limit} messages in {self.flood_window} ticks")
        return count <= self.flood_limit

    def fresh(self, peer: str, nonce: int) -> bool:
        """Anti-replay window over a sender's per-link nonces; a repeat is reported as a replay."""
        high, seen = self._nonces.get(peer, (0, set()))
        if nonce in seen or nonce <= high - self.replay_window:
            self.report(peer, "replay", f"nonce {nonce}")
            return False
        seen.add(nonce)
        if nonce > high:
            high = nonce
            if len(seen) > 2 * self.replay_window:
                seen = {n for n in seen if n > high - self.replay_window}
        self._nonces[peer] = (high, seen)
        return True

    def tick(self) -> None:
        """Advance time: reset flood windows, decay scores."""
        self._ticks += 1
        if self._ticks % self.flood_window == 0:
            self._counts.clear()
        if self.scores:
            factor = 0.5 ** (1.0 / self.half_life)
            self.scores = {p: s * factor for p, s in self.scores.items() if s * factor > 0.01 or p in self.quarantined}

    def drain(self) -> list[Detection]:
        """Detections since the last call (the caller counts and logs them)."""
        events, self.events = self.events, []
        return events
