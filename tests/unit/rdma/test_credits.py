"""CreditWindow and SlotRing as pure state machines, driven through seeded random schedules.

The simulation plays source and destination against each other with every interleaving of
writes landing (in any order: the ring must not rely on arrival order), write completions, frames
consumed and ACKs arriving late. A failing schedule prints its seed.
"""

from __future__ import annotations

import os
import random

import pytest

from dwcp_agent import wire
from dwcp_agent.amst.credits import CreditError, CreditWindow, SlotRing

SCHEDULES = int(os.environ.get("DWCP_SIM_SCHEDULES", "300"))


def header(seq: int) -> wire.FrameHeader:
    return wire.FrameHeader(3, wire.FrameType.DATA, 0, 0, 1, 0, seq, 0, 0, 0, 0)


def simulate(seed: int, window_cls: type[CreditWindow] = CreditWindow, frames: int = 40, slots: int = 3) -> list[int]:
    """Run one schedule; returns the sequence order the destination consumed. Raises CreditError."""
    rng = random.Random(seed)
    window, ring = window_cls(slots), SlotRing(slots)
    slot_content: dict[int, int] = {}  # destination memory: which frame each slot holds now
    in_network: list[tuple[int, int]] = []  # writes not landed yet, may land in any order
    completions: list[int] = []  # write completions not polled yet (in posting order, per QP)
    acks: list[int] = []  # ACKs on the way back
    consumed: list[int] = []
    sent = 0
    while len(consumed) < frames:
        action = rng.randrange(5)
        if action == 0 and sent < frames:
            slot = window.acquire(sent)
            if slot is not None:
                in_network.append((slot, sent))
                completions.append(slot)
                sent += 1
        elif action == 1 and in_network:
            slot, seq = in_network.pop(rng.randrange(len(in_network)))
            ring.landed(slot, header(seq))  # checks the slot is FREE before memory is overwritten
            slot_content[slot] = seq
        elif action == 2 and completions:
            window.completed(completions.pop(0))
        elif action == 3:
            item = ring.deliver()
            if item is not None:
                slot, h = item
                assert slot_content[slot] == h.sequence, f"seed {seed}: slot {slot} overwritten"
                consumed.append(h.sequence)
                ring.release()
                acks.append(h.sequence)
        elif action == 4 and acks:
            window.credit(acks.pop(0))
    return consumed


def test_every_schedule_delivers_all_frames_in_order_without_overwriting_a_slot() -> None:
    for seed in range(SCHEDULES):
        try:
            assert simulate(seed) == list(range(40))
        except (CreditError, AssertionError) as exc:
            pytest.fail(f"seed {seed}: {exc}")


class EagerWindow(CreditWindow):
    def credit(self, acked_sequence: int) -> int:
        return super().credit(min(acked_sequence + 1, self._last_seq))


def test_a_credit_bug_is_caught_by_the_ring_in_some_schedule() -> None:
    caught = 0
    for seed in range(SCHEDULES):
        try:
            simulate(seed, EagerWindow)
        except CreditError as exc:
            assert exc.error_type in ("slot_overrun", "credit_window"), exc
            caught += 1
    assert caught > 0, "no schedule detected credits returned too early"


def test_frames_landing_out_of_order_wait_for_their_turn() -> None:
    ring = SlotRing(3)
    ring.landed(2, header(2))
    ring.landed(0, header(1))
    assert ring.deliver() is None
    ring.landed(1, header(0))
    order = []
    while (item := ring.deliver()) is not None:
        order.append(item[1].sequence)
        ring.release()
    assert order == [0, 1, 2]


@pytest.mark.parametrize(("slot", "seq", "kind"), [(3, 0, "bad_slot"), (0, 3, "credit_window"),
                                                   (-1, 0, "bad_slot")])
def test_ring_refuses_impossible_writes(slot: int, seq: int, kind: str) -> None:
    with pytest.raises(CreditError) as info:
        SlotRing(3).landed(slot, header(seq))
    assert info.value.error_type == kind


def test_ring_refuses_a_write_into_a_delivered_slot() -> None:
    ring = SlotRing(2)
    ring.landed(0, header(0))
    assert ring.deliver() is not None
    with pytest.raises(CreditError, match="overwritten") as info:
        ring.landed(0, header(1))
    assert info.value.error_type == "slot_overrun"


def test_window_waits_for_both_the_credit_and_the_completion() -> None:
    w = CreditWindow(1)
    assert w.acquire(0) == 0
    assert w.acquire(1) is None
    w.credit(0)
    assert w.waiting_for_completion and w.acquire(1) is None
    w.completed(0)
    assert w.acquire(1) == 0


def test_window_refuses_acks_and_completions_it_never_caused() -> None:
    w = CreditWindow(2)
    w.acquire(0)
    with pytest.raises(CreditError) as info:
        w.credit(1)
    assert info.value.error_type == "bad_ack"
    w.acquire(1)
    with pytest.raises(CreditError) as info:
        w.completed(1)
    assert info.value.error_type == "completion_order"
