"""Mode detection on real shaped namespaces: the right name first, no flapping on a stable path.

Traffic is bulk TCP from a to b; PBA's LinkMeter reads TCP_INFO from the senders every 0.5 s
(as the agent does during a migration) and feeds the ModeDetector. Expected names follow the
ops-guide rule on each profile's nominal numbers: metro (5 ms, 10 Gbit) meets the datacenter
rule; `regional` (20 ms, 10 Gbit, no loss) is the hybrid case.

How fast the detector names a mode is counted in samples, not wall seconds: on a loaded host the
0.5 s ticks stretch, and the detector decides on the time inside its samples anyway. A host too
busy to push the 10 Gbit/s profiles past 0.9 Gbit/s measures a path the rule calls internet, and
that is then the expected name.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import wanbed

from dwcp_agent.pba.mode import DATACENTER, HYBRID, INTERNET, ModeDetector
from dwcp_agent.pba.probe import LinkMeter, LinkSample
from dwcp_agent.telemetry.metrics import Metrics

pytestmark = pytest.mark.system

Bed = Callable[[wanbed.Profile | str], wanbed.WanBed]
REGIONAL = wanbed.Profile("regional", 0.020, 0.0, 10_000_000_000)
INTERVAL_S = 0.5
# The first decision needs `first_s` (1 s) of agreeing samples inside a 3 s window: ten 0.5 s
# samples (the ops guide's "within 5 s" on an idle host) is the bound, whatever the wall clock.
FIRST_DECISION_SAMPLES = 10
HELD_SAMPLES = 4  # after the first decision, watch this many more before stopping


def watch(bed: wanbed.WanBed, seconds: float, detector: ModeDetector, streams: int = 4,
          until_held: bool = False, samples: list[LinkSample] | None = None) -> list[tuple[float, str | None]]:
    """Run bulk flows for at most `seconds`; (elapsed, mode) after every interval.

    `until_held`: stop early once a mode is named and HELD_SAMPLES more samples have followed.
    `samples`: the measurements fed to the detector are appended here.
    """
    seen: list[tuple[float, str | None]] = []
    with wanbed.BulkFlows(bed, streams=streams, congestion="bbr", send_buffer=64 << 20) as flows:
        meter = LinkMeter()
        keyed = list(enumerate(flows.socks))
        t0 = time.monotonic()
        meter.sample_sockets(keyed, t0)
        while (now := time.monotonic()) - t0 < seconds:
            named = [i for i, (_, m) in enumerate(seen) if m is not None]
            if until_held and named and len(seen) - named[0] > HELD_SAMPLES:
                break
            time.sleep(max(0.0, INTERVAL_S - (time.monotonic() - now)))
            sample = meter.sample_sockets(keyed, time.monotonic())
            if sample is not None:
                detector.update(sample)
                if samples is not None:
                    samples.append(sample)
                seen.append((sample.t - t0, detector.mode))
    return seen


@pytest.mark.parametrize(("profile", "expected"), [
    ("datacenter", DATACENTER),
    ("metro", DATACENTER),
    (REGIONAL, HYBRID),
    ("internet", INTERNET),
    ("bad-internet", INTERNET),
])
def test_detector_names_the_profile_within_ten_samples(wan_bed: Bed, profile: wanbed.Profile | str,
                                                        expected: str) -> None:
    bed = wan_bed(profile)
    metrics = Metrics()
    detector = ModeDetector(metrics=metrics)
    samples: list[LinkSample] = []
    # Wall-clock bound generous for a loaded host; the speed assertion is in samples.
    seen = watch(bed, 60.0, detector, until_held=True, samples=samples)
    first = next(((i, m) for i, (_, m) in enumerate(seen) if m is not None), None)
    assert first is not None, f"no mode after 60 s: {seen}"
    th = detector.th
    best = max((x.capacity_bps for x in samples if x.acked_bytes >= detector.min_busy_bytes), default=0.0)
    if expected != INTERNET and best < th.dc_min_bps * (1 - th.bw_tolerance):
        # This host could not drive the 10 Gbit/s profile past the 1 Gbit/s rule (a loaded 2-core
        # machine, TSO/GRO off): by the rule on what was measured, the path reads as internet.
        expected = INTERNET
    assert first[1] == expected, (bed.profile.name, f"best capacity {best * 8e-9:.2f} Gbit/s", first, seen)
    assert first[0] < FIRST_DECISION_SAMPLES, (bed.profile.name, first, seen)
    assert seen[-1][1] == expected
    assert metrics.current_mode.labels(expected)._value.get() == 1


def test_no_switch_in_a_minute_on_a_stable_lossy_path(wan_bed: Bed) -> None:
    bed = wan_bed("internet")
    detector = ModeDetector()
    seen = watch(bed, 62.0, detector, streams=2)
    modes = [m for _, m in seen if m is not None]
    assert modes and set(modes) == {INTERNET}
    assert detector.switches == 0
