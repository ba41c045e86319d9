"""The handover line: one extra connection per live migration that outlives either agent.

The ACP commit decides where the VM lives, but the message that tells the destination (Commit on
the tunnel) and the one that tells the source (Running) travel after it, and either agent may die
in between. So the source agent opens one more connection next to the data connections (stream
`OUTCOME_STREAM`), and each side gives a copy of its end to its guard process (guard.py): the
line stays open while a guard lives, whatever happened to its agent. Two words travel on it, each
authenticated with the pre-shared key, the session and the migration id:

- source -> destination `commit`, written right after ACP recorded the destination as the
  owner. A destination whose agent died (or whose tunnel broke) after its QEMU loaded the whole
  VM `cont`s it on that word, and kills it on the line closing without it;
- destination -> source `running`, written once the VM runs at the destination. The source then
  quits its paused QEMU (its agent, or its guard if the agent died after the commit).

Never both run: the source is resumed only before the ACP commit and the destination `cont`s
only after `commit`, which is written only after the ACP commit.
"""

from __future__ import annotations

import hmac
import socket
import time

__all__ = ["COMMIT", "OUTCOME_STREAM", "RUNNING", "OutcomeLine"]

OUTCOME_STREAM = 0xFFFF  # the handshake's stream number of the handover line (data streams are 1..N)
COMMIT = b"commit"
RUNNING = b"running"
_LABEL = b"dwcp-live-outcome-v1"
_MAX_LINE = 256


class OutcomeLine:
    """One end of the handover line (a blocking socket shared with a guard process)."""

    def __init__(self, sock: socket.socket, psk: bytes, session: int, migration_id: str) -> None:
        self.sock = sock
        self.secret = hmac.digest(psk, _LABEL, "sha256")
        self.context = session.to_bytes(8, "big") + migration_id.encode()
        self._buffer = b""

    @classmethod
    def from_secret(cls, sock: socket.socket, secret: bytes, context: bytes) -> OutcomeLine:
        """A guard's end: it gets the derived secret and context, never the key itself."""
        line = cls.__new__(cls)
        line.sock, line.secret, line.context, line._buffer = sock, secret, context, b""
        return line

    def _mac(self, word: bytes) -> bytes:
        return hmac.digest(self.secret, self.context + b"\0" + word, "sha256").hex().encode()

    def say(self, word: bytes) -> None:
        """Write `word` (OSError if the line is gone)."""
        self.sock.settimeout(5.0)
        self.sock.sendall(word + b" " + self._mac(word) + b"\n")

    def wait_for(self, word: bytes, timeout: float) -> bool:
        """Whether the peer said `word` within `timeout`; False on the line closing first. Lines
        that do not verify are ignored."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                line, _, self._buffer = self._buffer.partition(b"\n")
                said, _, mac = line.partition(b" ")
                if said == word and hmac.compare_digest(mac, self._mac(word)):
                    return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(_MAX_LINE)
            except OSError:  # TimeoutError included: both mean the word did not come
                return False
            if not data:
                return False
            self._buffer = (self._buffer + data)[-4 * _MAX_LINE:]

    def close(self) -> None:
        self.sock.close()
