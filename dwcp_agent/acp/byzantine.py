"""Byzantine behaviour detection: evidence per peer, a decaying score, quarantine and reinstatement.

Pure like the protocols: time is the tick count the caller drives. Protocol code calls `report`
with a reason when it holds evidence (two signed pre-prepares with different digests for one view
and sequence, a bad authenticator, a replayed frame, a malformed message, an invalid view change,
a flood). Each reason weighs differently; a peer whose score crosses the threshold is quarantined
(every message from it is dropped) until an operator reinstates it. Scores halve every
`half_life_ticks`, so rare benign glitches (a duplicated datagram) never add up to a quarantine.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["REASONS", "WEIGHTS", "ByzantineDetector", "Detection"]

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


@dataclass(frozen=True)
class Detection:
    """One piece of evidence against `peer`; `quarantined` tells whether it tipped the peer over."""

    peer: str
    reason: str
    score: float
    quarantined: bool
    detail: str = ""


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
        self.events: list[Detection] = []
        self._counts: dict[str, int] = {}
        self._ticks = 0
        self._nonces: dict[str, tuple[int, set[int]]] = {}

    def report(self, peer: str, reason: str, detail: str = "") -> Detection:
        """Record evidence; returns the detection (also queued for `drain`)."""
        if peer == self.node_id:
            return Detection(peer, reason, 0.0, False, detail)  # own messages echoed back: not evidence
        score = self.scores.get(peer, 0.0) + WEIGHTS[reason]
        self.scores[peer] = score
        tipped = score >= self.threshold and peer not in self.quarantined
        if tipped:
            self.quarantined.add(peer)
        event = Detection(peer, reason, score, tipped, detail)
        self.events.append(event)
        return event

    def is_quarantined(self, peer: str) -> bool:
        """Messages from a quarantined peer are dropped unread."""
        return peer in self.quarantined

    def reinstate(self, peer: str) -> None:
        """Operator decision: clear the quarantine and the score."""
        self.quarantined.discard(peer)
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
