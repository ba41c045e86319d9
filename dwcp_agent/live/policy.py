"""Convergence policy for a live migration: a pure function of what QEMU and PBA report.

The agent polls `query-migrate` and PBA's bandwidth prediction, hands them to `ConvergencePolicy.
step()`, and carries out the returned actions through QMP. Nothing here touches QEMU, sockets or
the clock; time comes in as `elapsed_s`, so a test can replay any sequence of observations.

Policies:
- `precopy`: only the downtime limit and the bandwidth cap; pre-copy runs until it converges.
- `auto-converge`: as precopy, and when the predicted end-to-end rate (wire bandwidth x HDE
  ratio) is below the guest's dirty rate, QEMU's CPU throttling is turned up.
- `postcopy-after:<N>s` or `postcopy-after:<N>i`: as auto-converge, and when pre-copy is still
  running after N seconds (or N iterations), i.e. it has not met the downtime target in that
  bound, switch to postcopy. From then on
  the destination runs the VM: a broken link is a postcopy recovery or a lost VM, never a
  rollback to the source.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["Action", "ConvergencePolicy", "Observation", "PolicyError", "PolicySpec", "parse_policy"]

_POSTCOPY_RE = re.compile(r"^postcopy-after:(\d+(?:\.\d+)?)([si])$")
# Throttle steps QEMU's auto-converge is raised through (cpu-throttle-initial, percent).
THROTTLE_STEPS = (20, 40, 60, 80, 99)
# Headroom on the link cap: QEMU may use more than the predicted rate, so a brief
# underestimate does not starve the migration.
BANDWIDTH_HEADROOM = 1.5
# The cap is re-sent only when the prediction moved by more than this share (no QMP churn).
RECAP = 0.5


class PolicyError(ValueError):
    """The policy text is not one of precopy | auto-converge | postcopy-after:<N>s|<N>i."""


@dataclass(frozen=True)
class PolicySpec:
    """A parsed policy: whether throttling is allowed and when to go to postcopy."""

    name: str
    throttle: bool
    postcopy_after_s: float | None = None
    postcopy_after_iterations: int | None = None

    @property
    def postcopy(self) -> bool:
        return self.postcopy_after_s is not None or self.postcopy_after_iterations is not None


def parse_policy(text: str) -> PolicySpec:
    """'precopy' | 'auto-converge' | 'postcopy-after:30s' | 'postcopy-after:5i'."""
    text = text.strip()
    if text == "precopy":
        return PolicySpec(text, throttle=False)
    if text == "auto-converge":
        return PolicySpec(text, throttle=True)
    match = _POSTCOPY_RE.match(text)
    if match is None:
        raise PolicyError(f"unknown convergence policy {text!r}: use precopy, auto-converge, "
                          "postcopy-after:<N>s or postcopy-after:<N>i")
    value, unit = float(match.group(1)), match.group(2)
    if unit == "s":
        return PolicySpec(text, throttle=True, postcopy_after_s=value)
    return PolicySpec(text, throttle=True, postcopy_after_iterations=int(value))


@dataclass(frozen=True)
class Observation:
    """One poll: QEMU's query-migrate figures plus PBA's prediction and the measured HDE ratio."""

    elapsed_s: float
    status: str
    iterations: int
    remaining_bytes: int
    dirty_bytes_per_s: float
    expected_downtime_ms: float | None
    predicted_bytes_per_s: float | None
    hde_ratio: float = 1.0
    predicted_high_bytes_per_s: float | None = None  # upper end of PBA's confidence interval
    qemu_bytes_per_s: float = 0.0  # what QEMU's migration achieves now (query-migrate mbps)


@dataclass(frozen=True)
class Action:
    """One decision: `kind` is the metric label, `params` what goes to QMP, `reason` the log text."""

    kind: str  # set-downtime-limit | set-max-bandwidth | throttle | start-postcopy
    params: dict[str, int] = field(default_factory=dict)
    reason: str = ""


class ConvergencePolicy:
    """Decides, poll by poll, the QMP levers; remembers what it already did so it repeats nothing."""

    def __init__(self, spec: PolicySpec, downtime_ms: int) -> None:
        self.spec = spec
        self.downtime_ms = downtime_ms
        self.throttle_step = -1          # index into THROTTLE_STEPS, -1 = not throttled yet
        self.postcopy_started = False
        self._limit_sent = False
        self._bandwidth_sent = 0

    def step(self, obs: Observation) -> list[Action]:
        """The actions this observation calls for (possibly none)."""
        actions: list[Action] = []
        if not self._limit_sent:
            self._limit_sent = True
            actions.append(Action("set-downtime-limit", {"downtime-limit": self.downtime_ms},
                                  f"downtime target {self.downtime_ms} ms"))
        if obs.status not in ("active", "setup") or self.postcopy_started:
            return actions
        end_to_end = self._end_to_end(obs)
        if end_to_end is not None:
            # QEMU's cap counts stream bytes, which HDE shrinks before the wire: wire x ratio. It
            # follows the upper end of the prediction: a cap below what the link carries only
            # slows the migration down.
            # Nor below the pace QEMU already achieves: a noisy low sample must not choke it.
            high = max(obs.predicted_high_bytes_per_s or 0.0, obs.predicted_bytes_per_s or 0.0)
            cap = int(max(high * max(obs.hde_ratio, 1.0), obs.qemu_bytes_per_s) * BANDWIDTH_HEADROOM)
            if self._bandwidth_sent == 0 or abs(cap - self._bandwidth_sent) > RECAP * self._bandwidth_sent:
                self._bandwidth_sent = cap
                actions.append(Action("set-max-bandwidth", {"max-bandwidth": cap},
                                      f"PBA predicts {end_to_end / max(obs.hde_ratio, 1.0) / 1e6:.1f} MB/s on the wire "
                                      f"x HDE ratio {max(obs.hde_ratio, 1.0):.2f}"))
        if obs.status != "active" or obs.iterations < 1:
            return actions
        converging = self._meets_target(obs)
        if (self.spec.throttle and not converging and end_to_end is not None
                and end_to_end < obs.dirty_bytes_per_s and self.throttle_step + 1 < len(THROTTLE_STEPS)):
            self.throttle_step += 1
            pct = THROTTLE_STEPS[self.throttle_step]
            actions.append(Action("throttle", {"cpu-throttle-initial": pct, "cpu-throttle-increment": 10},
                                  f"end-to-end {end_to_end / 1e6:.1f} MB/s < dirty "
                                  f"{obs.dirty_bytes_per_s / 1e6:.1f} MB/s: throttle {pct}%"))
        # Still in pre-copy when the bound is reached means it did not converge in time, whatever
        # QEMU's (often optimistic) expected downtime says.
        if self.spec.postcopy and self._postcopy_due(obs):
            self.postcopy_started = True
            actions.append(Action("start-postcopy", {}, self._postcopy_reason(obs)))
        return actions

    def _end_to_end(self, obs: Observation) -> float | None:
        if not obs.predicted_bytes_per_s:
            return None
        return obs.predicted_bytes_per_s * max(obs.hde_ratio, 1.0)

    def _meets_target(self, obs: Observation) -> bool:
        if obs.expected_downtime_ms is None:
            return False
        return obs.expected_downtime_ms <= self.downtime_ms

    def _postcopy_due(self, obs: Observation) -> bool:
        if self.spec.postcopy_after_s is not None:
            return obs.elapsed_s >= self.spec.postcopy_after_s
        assert self.spec.postcopy_after_iterations is not None
        return obs.iterations >= self.spec.postcopy_after_iterations

    def _postcopy_reason(self, obs: Observation) -> str:
        return (f"pre-copy has not met {self.downtime_ms} ms after {obs.elapsed_s:.1f} s / "
                f"{obs.iterations} iterations (expected downtime {obs.expected_downtime_ms} ms)")
