"""Online bandwidth prediction: a small ensemble that follows whichever member is right lately.

In the spirit of the Network Weather Service: no single forecaster wins on every path. Last value
reacts at once to a rate change, means smooth noise, Holt follows ramps, AR(p) catches
oscillation. Each member predicts every next interval; the ensemble reports the member with the
lowest mean relative error over the last few intervals, with an interval of confidence drawn
from that member's recent errors. When every member misses by a lot the path has changed, and
the error record restarts: lagging members (means, AR) cannot win on their pre-change record.
`dwcp_v3_prediction_accuracy` is 1 - MAPE of the ensemble. Values are plain floats (bytes/s in
the agent); nothing here reads a clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from dwcp_agent.telemetry.metrics import Metrics

__all__ = [
    "AR", "EWMA", "Holt", "LastValue", "LevelMean", "Member", "Prediction", "Predictor", "SlidingMedian",
    "default_members", "mape",
]


class Member(Protocol):
    """One forecaster: learns from `update`, forecasts the next value with `forecast`."""

    name: str

    def update(self, value: float) -> None: ...

    def forecast(self) -> float | None: ...


class LastValue:
    """The next interval looks like this one."""

    name = "last"

    def __init__(self) -> None:
        self._last: float | None = None

    def update(self, value: float) -> None:
        self._last = value

    def forecast(self) -> float | None:
        return self._last


class EWMA:
    """Exponentially weighted mean: smooths noise, lags a step change by ~1/alpha intervals."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.name = f"ewma{alpha:g}"
        self._mean: float | None = None

    def update(self, value: float) -> None:
        self._mean = value if self._mean is None else self.alpha * value + (1 - self.alpha) * self._mean

    def forecast(self) -> float | None:
        return self._mean


class Holt:
    """Holt's linear trend: level plus slope, for ramps (slow start, a link filling up)."""

    def __init__(self, alpha: float = 0.5, beta: float = 0.2) -> None:
        self.alpha, self.beta = alpha, beta
        self.name = "holt"
        self._level: float | None = None
        self._trend = 0.0

    def update(self, value: float) -> None:
        if self._level is None:
            self._level = value
            return
        prev = self._level
        self._level = self.alpha * value + (1 - self.alpha) * (prev + self._trend)
        self._trend = self.beta * (self._level - prev) + (1 - self.beta) * self._trend

    def forecast(self) -> float | None:
        if self._level is None:
            return None
        return max(0.0, self._level + self._trend)


class AR:
    """Autoregressive AR(p) with intercept, refitted by least squares over a sliding window."""

    def __init__(self, p: int = 3, window: int = 40) -> None:
        self.p, self.window = p, window
        self.name = f"ar{p}"
        self._hist: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> None:
        self._hist.append(value)

    def forecast(self) -> float | None:
        h = np.asarray(self._hist, dtype=float)
        n = len(h) - self.p
        if n < 2 * (self.p + 1):
            return None
        scale = float(np.mean(h)) or 1.0
        x = h / scale
        rows = np.column_stack([np.ones(n)] + [x[self.p - i - 1:len(x) - i - 1] for i in range(self.p)])
        coef, *_ = np.linalg.lstsq(rows, x[self.p:], rcond=None)
        nxt = coef[0] + float(np.dot(coef[1:], x[::-1][: self.p]))
        # An ill-conditioned fit can explode; keep the forecast within what the window has seen.
        lo, hi = float(np.min(x)), float(np.max(x))
        return float(np.clip(nxt, lo * 0.5, hi * 1.5)) * scale


class SlidingMedian:
    """Median of the last `k` values: ignores single dips (BBR ProbeRTT, a stalled stream)."""

    def __init__(self, k: int = 5) -> None:
        self.name = f"median{k}"
        self._hist: deque[float] = deque(maxlen=k)

    def update(self, value: float) -> None:
        self._hist.append(value)

    def forecast(self) -> float | None:
        return float(np.median(self._hist)) if self._hist else None


class LevelMean:
    """Mean of the current level, restarted at a level shift.

    A value far from the level (beyond `k` standard deviations and `rel` of the mean) starts a
    new level at once, so a rate change costs one interval like last-value; if the next value
    comes back to the old level, the excursion was a blip and the old level is restored.
    """

    def __init__(self, k: float = 4.0, rel: float = 0.10, cap: int = 60) -> None:
        self.k, self.rel, self.cap = k, rel, cap
        self.name = "level"
        self._level: list[float] = []
        self._saved: list[float] | None = None

    def _far(self, level: Sequence[float], value: float) -> bool:
        mean = sum(level) / len(level)
        std = float(np.std(level)) if len(level) > 2 else 0.0
        return abs(value - mean) > max(self.k * std, self.rel * abs(mean))

    def update(self, value: float) -> None:
        if self._saved is not None:
            if not self._far(self._saved, value):
                self._level, self._saved = self._saved, None
            else:
                self._saved = None
                if self._far(self._level, value):
                    self._level = []
        elif self._level and self._far(self._level, value):
            self._saved, self._level = self._level, []
        self._level.append(value)
        del self._level[: -self.cap]

    def forecast(self) -> float | None:
        return sum(self._level) / len(self._level) if self._level else None


def default_members() -> list[Member]:
    """The ensemble the agent runs: last value, EWMA, Holt, AR(3), a sliding median, level mean."""
    return [LastValue(), EWMA(0.3), Holt(), AR(3), SlidingMedian(5), LevelMean()]


def mape(predicted: Sequence[float], actual: Sequence[float]) -> float:
    """Mean absolute percentage error (a fraction), skipping intervals whose actual value is 0."""
    errs = [abs(p - a) / abs(a) for p, a in zip(predicted, actual, strict=True) if a]
    return sum(errs) / len(errs) if errs else 0.0


@dataclass(frozen=True)
class Prediction:
    """Next interval's value, its interval of confidence, and the member that produced it."""

    value: float
    low: float
    high: float
    member: str


class Predictor:
    """Online ensemble over `members`; `observe` each interval's measured value, then `predict`."""

    def __init__(self, members: Sequence[Member] | None = None, error_window: int = 8,
                 mape_window: int = 30, confidence: float = 0.9, shift: float = 0.25, min_history: int = 3,
                 metrics: Metrics | None = None) -> None:
        self.members = list(members) if members is not None else default_members()
        self.shift, self.min_history = shift, min_history
        self.confidence = confidence
        self.metrics = metrics
        self._errors: dict[str, deque[float]] = {m.name: deque(maxlen=error_window) for m in self.members}
        self._pending: dict[str, float] = {}
        self._last_prediction: Prediction | None = None
        self._scored: deque[float] = deque(maxlen=mape_window)
        self.observed = 0

    def observe(self, value: float) -> None:
        """Score every member's forecast of this interval against `value`, then learn from it."""
        if value > 0:
            errs = {name: abs(forecast - value) / value for name, forecast in self._pending.items()}
            if errs and min(errs.values()) > self.shift:
                # Every member missed by a lot: the path changed. Errors from before the change say
                # nothing about who will be right after it, so selection starts over (last value
                # first, until others have a few intervals of record).
                for hist in self._errors.values():
                    hist.clear()
            else:
                for name, err in errs.items():
                    self._errors[name].append(err)
            if self._last_prediction is not None:
                self._scored.append(abs(self._last_prediction.value - value) / value)
                if self.metrics is not None:
                    self.metrics.prediction_accuracy.set(self.accuracy)
        for member in self.members:
            member.update(value)
        self._pending = {}
        for member in self.members:
            nxt = member.forecast()
            if nxt is not None and math.isfinite(nxt):
                self._pending[member.name] = nxt
        self.observed += 1
        self._last_prediction = self._choose()

    def _choose(self) -> Prediction | None:
        if not self._pending:
            return None
        best_name, best_err = "", math.inf
        for member in self.members:  # declaration order breaks ties: last value first
            if member.name not in self._pending:
                continue
            recent = self._errors[member.name]
            err = sum(recent) / len(recent) if len(recent) >= self.min_history else math.inf
            if err < best_err or not best_name:
                best_name, best_err = member.name, err
        value = self._pending[best_name]
        errs = sorted(self._errors[best_name])
        spread = errs[min(len(errs) - 1, int(self.confidence * len(errs)))] if errs else 0.5
        spread = max(spread, 0.01)
        return Prediction(value, max(0.0, value * (1 - spread)), value * (1 + spread), best_name)

    def predict(self) -> Prediction | None:
        """Forecast of the next interval (None before the first observation)."""
        return self._last_prediction

    @property
    def mape(self) -> float:
        """MAPE of the ensemble over the sliding window (0 before anything was scored)."""
        return sum(self._scored) / len(self._scored) if self._scored else 0.0

    @property
    def accuracy(self) -> float:
        """1 - MAPE, floored at 0: what dwcp_v3_prediction_accuracy exports."""
        return max(0.0, 1.0 - self.mape)

    def member_errors(self) -> dict[str, float]:
        """Recent mean relative error of each member (for logs and the benchmark)."""
        return {n: (sum(e) / len(e) if e else math.nan) for n, e in self._errors.items()}
