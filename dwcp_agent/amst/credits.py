"""Slot and credit bookkeeping of an RDMA stream, as two pure state machines (no verbs, no threads).

The destination owns a ring of `slots` registered slots. The source may write a frame into a slot
only while it holds that slot's credit; the destination returns credits with its ACKs (an ACK for
sequence n returns the slot of every frame up to n). Keeping this logic free of I/O lets the tests
drive every interleaving of writes, completions and ACKs directly, and lets both sides check the
other: a write into a slot whose credit was not returned is caught by `SlotRing`, an ACK for a
frame never written by `CreditWindow`.
"""

from __future__ import annotations

import collections
import enum

from dwcp_agent import wire

__all__ = ["CreditError", "CreditWindow", "SlotRing"]


class CreditError(OSError):
    """Slot or credit protocol violated (by the peer or by us); the stream cannot be trusted."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.error_type = error_type


class CreditWindow:
    """Source side: which destination slots may be written now.

    A slot is writable again only when both happened: the destination returned its credit (an
    ACK covering the frame that used it) and our own write completion for it was polled (until
    then the local staging copy may still be read by the device)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("an RDMA ring needs at least one slot")
        self.slots = slots
        self._free: collections.deque[int] = collections.deque(range(slots))
        self._unacked: collections.deque[tuple[int, int]] = collections.deque()  # (sequence, slot)
        self._writing: collections.deque[int] = collections.deque()  # posted, completion not polled, in order
        self._acked_writing: set[int] = set()  # credit back, completion still missing
        self._last_seq = -1

    def acquire(self, sequence: int) -> int | None:
        """A slot for frame `sequence`, or None while no slot is writable."""
        if sequence <= self._last_seq:
            raise CreditError(f"frame sequence {sequence} after {self._last_seq}", "sequence")
        if not self._free:
            return None
        slot = self._free.popleft()
        self._last_seq = sequence
        self._unacked.append((sequence, slot))
        self._writing.append(slot)
        return slot

    def credit(self, acked_sequence: int) -> int:
        """The destination acknowledged every frame up to `acked_sequence`; returns slots credited."""
        if acked_sequence > self._last_seq:
            raise CreditError(f"ACK for frame {acked_sequence}, only {self._last_seq + 1} written", "bad_ack")
        returned = 0
        while self._unacked and self._unacked[0][0] <= acked_sequence:
            _, slot = self._unacked.popleft()
            returned += 1
            if slot in self._writing:
                self._acked_writing.add(slot)
            else:
                self._free.append(slot)
        return returned

    def completed(self, slot: int) -> None:
        """Our RDMA write into `slot` completed successfully."""
        if not self._writing:
            raise CreditError(f"write completion for slot {slot}, which has no write outstanding", "completion")
        if self._writing[0] != slot:
            # One QP completes its work requests in posting order: a different slot first means
            # the completion of slot self._writing[0] was lost.
            raise CreditError(f"write completion for slot {slot} while slot {self._writing[0]}, posted "
                              "earlier, never completed", "completion_order")
        self._writing.popleft()
        if slot in self._acked_writing:
            self._acked_writing.discard(slot)
            self._free.append(slot)

    @property
    def available(self) -> int:
        """Slots writable right now (credit back and completion polled)."""
        return len(self._free)

    @property
    def waiting_for_completion(self) -> bool:
        """Credits are back but the matching completions are not: poll the CQ, not the ACKs."""
        return not self._free and bool(self._acked_writing)

    @property
    def in_flight(self) -> int:
        return len(self._unacked)


class _Slot(enum.Enum):
    FREE = 0  # receive posted, credit with the source
    LANDED = 1  # a frame arrived, waiting for its turn
    DELIVERED = 2  # handed to the session, not yet acknowledged


class SlotRing:
    """Destination side: frames landed in slots, delivered strictly in sequence order.

    Completions of one QP arrive in posting order, but nothing here relies on it: a frame that
    lands early waits in its slot until every earlier sequence was delivered. Any write into a
    slot that is not FREE, or with a sequence the credits could not have allowed, is an error."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._state = [_Slot.FREE] * slots
        self._by_seq: dict[int, tuple[int, wire.FrameHeader]] = {}
        self.next_seq = 0
        self.current: tuple[int, wire.FrameHeader] | None = None

    def landed(self, slot: int, header: wire.FrameHeader) -> None:
        """An RDMA write with immediate `slot` completed; `header` is what the slot holds."""
        if not 0 <= slot < self.slots:
            raise CreditError(f"immediate names slot {slot}; the ring has {self.slots}", "bad_slot")
        if self._state[slot] is not _Slot.FREE:
            raise CreditError(f"slot {slot} was overwritten while {self._state[slot].name.lower()} "
                              "(the source wrote without its credit)", "slot_overrun")
        seq = header.sequence
        if seq < self.next_seq or seq >= self.next_seq + self.slots or seq in self._by_seq:
            raise CreditError(f"frame {seq} outside the credit window [{self.next_seq}, "
                              f"{self.next_seq + self.slots})", "credit_window")
        self._state[slot] = _Slot.LANDED
        self._by_seq[seq] = (slot, header)

    def deliver(self) -> tuple[int, wire.FrameHeader] | None:
        """The next frame in sequence order, if it has landed."""
        if self.current is not None:
            raise CreditError("previous frame not acknowledged before the next was read", "order")
        item = self._by_seq.pop(self.next_seq, None)
        if item is not None:
            self._state[item[0]] = _Slot.DELIVERED
            self.current = item
        return item

    def release(self) -> int:
        """The delivered frame was consumed: its slot is FREE again (repost, then return the credit)."""
        if self.current is None:
            raise CreditError("acknowledgement without a delivered frame", "order")
        slot = self.current[0]
        self._state[slot] = _Slot.FREE
        self.current = None
        self.next_seq += 1
        return slot

    @property
    def landed_count(self) -> int:
        return len(self._by_seq)
