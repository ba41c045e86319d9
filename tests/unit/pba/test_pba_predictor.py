"""The prediction ensemble on a trace recorded on the WAN bed, and on small constructed series."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest

from dwcp_agent.pba.predictor import AR, EWMA, Holt, LastValue, LevelMean, Predictor, mape
from dwcp_agent.telemetry.metrics import Metrics

TRACES = Path(__file__).parent / "traces"


def load_trace(name: str) -> list[tuple[float, float, int]]:
    """(t, measured bytes/s, tbf rate bit/s) rows recorded by benchmarks/bench_prediction.py."""
    with (TRACES / name).open() as fh:
        rows = list(csv.DictReader(fh))
    return [(float(r["t_s"]), float(r["bandwidth_bytes_per_s"]), int(r["tbf_rate_bit_per_s"])) for r in rows]


def replay(trace: list[tuple[float, float, int]], predictor: Predictor) -> list[tuple[float, float, int]]:
    """(predicted, actual, rate) for every interval after the first, predicting before observing."""
    out = []
    for _, value, rate in trace:
        p = predictor.predict()
        if p is not None:
            out.append((p.value, value, rate))
        predictor.observe(value)
    return out


@pytest.mark.parametrize("name", sorted(p.name for p in TRACES.glob("rate_change_*.csv")))
def test_ensemble_beats_last_value_on_the_recorded_rate_change_trace(name: str) -> None:
    trace = load_trace(name)
    ens = replay(trace, Predictor())
    last = replay(trace, Predictor(members=[LastValue()]))
    ens_mape = mape([p for p, _, _ in ens], [a for _, a, _ in ens])
    last_mape = mape([p for p, _, _ in last], [a for _, a, _ in last])
    assert ens_mape < last_mape, (ens_mape, last_mape)


@pytest.mark.parametrize("name", sorted(p.name for p in TRACES.glob("rate_change_*.csv")))
def test_on_stable_segments_85_percent_of_predictions_are_within_10_percent(name: str) -> None:
    trace = load_trace(name)
    ens = replay(trace, Predictor())
    stable, prev, since = [], None, 0
    for pred, actual, rate in ens:
        since = 0 if rate != prev else since + 1
        prev = rate
        if since >= 2:  # from 1 s (two 0.5 s intervals) after the rate change
            stable.append(abs(pred - actual) / actual <= 0.10)
    assert len(stable) >= 20
    assert sum(stable) / len(stable) >= 0.85


def test_recorded_trace_follows_the_tbf_rate() -> None:
    """The trace itself is sane: on each stable segment goodput is near (below) the shaped rate."""
    trace = load_trace(sorted(TRACES.glob("rate_change_*.csv"))[0].name)
    for rate in sorted({r for _, _, r in trace}):
        values = [v * 8 for _, v, r in trace if r == rate][3:]
        assert 0.6 * rate < float(np.median(values)) < 1.05 * rate


def test_constant_series_is_predicted_exactly_and_accuracy_is_exported() -> None:
    metrics = Metrics()
    p = Predictor(metrics=metrics)
    for _ in range(20):
        p.observe(100e6)
    pred = p.predict()
    assert pred is not None and pred.value == pytest.approx(100e6)
    assert pred.low <= pred.value <= pred.high
    assert p.accuracy == pytest.approx(1.0)
    assert metrics.prediction_accuracy._value.get() == pytest.approx(1.0)


def test_noisy_level_prefers_a_smoothing_member_over_last_value() -> None:
    rng = np.random.default_rng(4)
    p = Predictor()
    for v in 100e6 * (1 + 0.05 * rng.standard_normal(60)):
        p.observe(float(v))
    errs = p.member_errors()
    pred = p.predict()
    assert pred is not None and pred.member != "last"
    assert errs[pred.member] < errs["last"]


def test_ramp_is_followed_by_holt_and_oscillation_by_ar() -> None:
    holt, last = Holt(), LastValue()
    for i in range(30):
        holt.update(10.0 * i)
        last.update(10.0 * i)
    assert abs(holt.forecast() - 300.0) < abs(last.forecast() - 300.0)  # type: ignore[operator]
    ar = AR(p=2, window=40)
    series = [100 + 30 * math.sin(i * 0.7) for i in range(41)]
    for v in series[:-1]:
        ar.update(v)
    assert ar.forecast() == pytest.approx(series[-1], rel=0.02)


def test_level_mean_restarts_at_a_shift_and_ignores_a_single_dip() -> None:
    lvl = LevelMean()
    for v in (100, 102, 98, 101, 99):
        lvl.update(v)
    lvl.update(60)   # a dip...
    lvl.update(100)  # ...that did not last: old level restored
    assert lvl.forecast() == pytest.approx(100, rel=0.02)
    lvl.update(30)
    lvl.update(31)   # a real shift: the new level only
    assert lvl.forecast() == pytest.approx(30.5)


def test_ewma_and_mape_helpers() -> None:
    e = EWMA(0.5)
    e.update(10.0)
    e.update(20.0)
    assert e.forecast() == 15.0
    assert mape([110, 90, 5], [100, 100, 0]) == pytest.approx(0.1)  # zero actual skipped
