"""Linearizability checking of recorded client histories (Wing & Gong search with Lowe's memoization).

A history is a list of operations with invocation and response times. An operation whose outcome
is unknown (the client timed out) gets `ret = inf` and `output = UNKNOWN`: it may have taken effect
at any point after its invocation, or never. The checker searches for a total order consistent with
real time in which the sequential model produces every recorded output; configurations already
explored (set of linearized operations, model state) are cached, which is what makes the search
practical. Histories are checked per key (P-compositionality), so each search stays small.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["UNKNOWN", "CheckResult", "Model", "Operation", "check", "check_per_key", "lease_model"]

S = TypeVar("S", bound=Hashable)


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN: Any = _Unknown()


@dataclass(frozen=True)
class Operation:
    """One client operation: `key` partitions the history, `ret` is inf when the outcome is unknown."""

    key: str
    input: Any
    output: Any
    call: float
    ret: float = math.inf


@dataclass(frozen=True)
class Model(Generic[S]):
    """Sequential specification: `step(state, input) -> (output, new_state)`."""

    init: Callable[[], S]
    step: Callable[[S, Any], tuple[Any, S]]


@dataclass
class CheckResult:
    """Outcome; when not linearizable, `key` and `ops` show the offending sub-history."""

    ok: bool
    key: str = ""
    ops: list[Operation] | None = None
    explored: int = 0


class _Node:
    __slots__ = ("is_call", "match", "next", "op", "prev")

    def __init__(self, op: int, is_call: bool) -> None:
        self.op = op
        self.is_call = is_call
        self.match: _Node | None = None
        self.prev: _Node | None = None
        self.next: _Node | None = None


def check(ops: list[Operation], model: Model[Any], max_steps: int = 2_000_000) -> CheckResult:
    """Check one key's history. Raises RuntimeError when the search exceeds `max_steps`."""
    events: list[tuple[float, int, int]] = []
    for i, op in enumerate(ops):
        events.append((op.call, 0, i))
        events.append((op.ret, 1, i))
    events.sort(key=lambda e: (e[0], -e[1] if e[0] == math.inf else e[1], e[2]))
    head = _Node(-1, False)
    tail = head
    calls: dict[int, _Node] = {}
    for _t, kind, i in events:
        node = _Node(i, kind == 0)
        if kind == 0:
            calls[i] = node
        else:
            calls[i].match = node
        node.prev, tail.next = tail, node
        tail = node

    def lift(call: _Node) -> None:
        for n in (call, call.match):
            if n is None:
                continue
            assert n.prev is not None
            n.prev.next = n.next
            if n.next is not None:
                n.next.prev = n.prev

    def unlift(call: _Node) -> None:
        for n in (call.match, call):
            if n is None:
                continue
            assert n.prev is not None
            n.prev.next = n
            if n.next is not None:
                n.next.prev = n

    state: Any = model.init()
    done = 0  # bitset of linearized operations
    cache: set[tuple[int, Any]] = {(0, state)}
    stack: list[tuple[_Node, Any]] = []
    entry = head.next
    steps = 0
    while head.next is not None:
        steps += 1
        if steps > max_steps:
            raise RuntimeError(f"linearizability search exceeded {max_steps} steps")
        if entry is None:
            return CheckResult(False, ops[0].key if ops else "", ops, steps)
        if entry.is_call:
            op = ops[entry.op]
            output, new_state = model.step(state, op.input)
            if op.output is UNKNOWN or output == op.output:
                key = (done | (1 << entry.op), new_state)
                if key not in cache:
                    cache.add(key)
                    stack.append((entry, state))
                    state, done = new_state, key[0]
                    lift(entry)
                    entry = head.next
                    continue
            entry = entry.next
        else:
            if not stack:
                return CheckResult(False, ops[0].key if ops else "", ops, steps)
            call, state = stack.pop()
            done &= ~(1 << call.op)
            unlift(call)
            entry = call.next
    return CheckResult(True, explored=steps)


def check_per_key(ops: Iterable[Operation], model: Model[Any]) -> CheckResult:
    """Partition by key and check each part; the first failing key is reported."""
    parts: dict[str, list[Operation]] = {}
    for op in ops:
        parts.setdefault(op.key, []).append(op)
    explored = 0
    for key in sorted(parts):
        result = check(parts[key], model)
        explored += result.explored
        if not result.ok:
            result.key = key
            return result
    return CheckResult(True, explored=explored)


def lease_model() -> Model[tuple[Any, ...]]:
    """The registry's per-VM semantics (claim, lease with fencing token, transfer, read) for
    histories whose leases never expire during the run (tests and the nemesis suite use ttl 1 h)."""
    def step(state: tuple[Any, ...], op: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        owner, holder, token, last = state
        kind = op[0]
        if kind == "claim":
            if owner is not None and owner != op[1]:
                return ("owned",), state
            return ("ok", op[1]), (op[1], holder, token, last)
        if kind == "lease":
            if holder is not None and holder != op[1]:
                return ("leased",), state
            if holder == op[1]:
                return ("ok", token), state
            return ("ok", last + 1), (owner, op[1], last + 1, last + 1)
        if kind == "transfer":
            _, src, dst, tok = op
            if holder is None or tok != token:
                return ("stale token",), state
            if owner is not None and owner != src:
                return ("not the owner",), state
            return ("ok", dst), (dst, None, 0, last)
        return ("ok", owner), state
    return Model(init=lambda: (None, None, 0, 0), step=step)
