"""Load shapes (steady, step ramp, spike) and the per-phase measurement of a run.

A shape is a list of `Phase`s (users held for a time). `loadtests.common.KilnShape`, the one
locust shape class every suite uses, plays the phases of the shape `--load-shape` names, with the
users and lengths of the pipeline's `loadtests.slo.Load` (or `--shape-users` / `--shape-seconds`),
and records when each phase really started (`TIMELINE`). This module does not import locust (whose
import monkey-patches the process), so runners and tests can use it. `measure()` cuts the run's
requests into phase windows (each less its first `settle_s`, the ramp) and `evaluate()` applies
the gates the way the shape calls for (see `loadtests.slo`):

- steady: one phase; every gate over its window.
- step: phases of increasing users; the knee is the step with the highest throughput whose p99
  and failure ratio meet the gates; it must exist and meet p95 and min_rps.
- spike: base, peak, base; failure ratio over the run; p95 and p99 over both base windows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from loadtests import slo


@dataclass(frozen=True)
class Phase:
    """Users held for a time."""

    label: str
    users: int
    seconds: float


@dataclass
class PhaseRecord:
    """A phase as it ran: wall-clock start and end (time.time())."""

    label: str
    users: int
    start: float
    end: float


TIMELINE: list[PhaseRecord] = []
"""The phases of the current run, filled in by `record_phase` (one run per process)."""


def record_phase(phase: Phase | None, now: float) -> None:
    """Notes in `TIMELINE` that the run is in `phase` at `now` (None: the run ended)."""
    if TIMELINE:
        TIMELINE[-1].end = now
    if phase is not None and (not TIMELINE or TIMELINE[-1].label != phase.label):
        TIMELINE.append(PhaseRecord(phase.label, phase.users, now, now))


def phases(
    shape: str, load: slo.Load, users: tuple[int, ...] = (), seconds: tuple[float, ...] = ()
) -> list[Phase]:
    """The phases of `shape` under `load`, with `users` / `seconds` overriding the load's.

    Raises:
        ValueError: an unknown shape, or overrides of the wrong length.
    """
    if shape == "steady":
        u = _one(users, load.users, "steady", "users")
        s = _one(seconds, load.duration_s, "steady", "seconds")
        return [Phase("steady", u, s)]
    if shape == "step":
        steps = users or load.step_users
        length = _one(seconds, load.step_s, "step", "seconds")
        return [Phase(f"step {i + 1} ({u} users)", u, length) for i, u in enumerate(steps)]
    if shape == "spike":
        base, peak = users or load.spike_users
        before, during, after = seconds or load.spike_s
        return [
            Phase("before spike", base, before),
            Phase("spike", peak, during),
            Phase("after spike", base, after),
        ]
    raise ValueError(f"shape must be one of {', '.join(slo.SHAPES)}, got {shape!r}")


def _one(values: tuple[Any, ...], default: Any, shape: str, what: str) -> Any:
    if not values:
        return default
    if len(values) != 1:
        raise ValueError(f"the {shape} shape takes one {what} value, got {list(values)}")
    return values[0]


def parse_list(text: str, kind: type = float) -> tuple[Any, ...]:
    """ "1,2,4" -> (1, 2, 4) (empty text: ())."""
    return tuple(kind(part) for part in text.split(",") if part.strip())


@dataclass
class WindowStats:
    """The requests completed in one window."""

    label: str
    users: int
    start: float
    end: float
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    failure_ratio: float | None

    def measured(self) -> dict[str, float | None]:
        """The values the gates are checked against, by gate name."""
        return {
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_failure_ratio": self.failure_ratio,
            "min_rps": self.rps,
        }


def stats(
    label: str, users: int, start: float, end: float, times: np.ndarray, latencies: np.ndarray, ok: np.ndarray
) -> WindowStats:
    """Statistics of the requests that completed in [start, end) (times: completion times)."""
    inside = (times >= start) & (times < end)
    lat = latencies[inside]
    good = ok[inside]
    length = max(end - start, 1e-9)
    count = int(inside.sum())

    def pct(q: float) -> float | None:
        return float(np.percentile(lat, q, method="higher")) if count else None

    return WindowStats(
        label=label,
        users=users,
        start=start,
        end=end,
        requests=count,
        failures=int(count - good.sum()),
        rps=float(good.sum() / length),
        p50_ms=pct(50),
        p95_ms=pct(95),
        p99_ms=pct(99),
        failure_ratio=float((count - good.sum()) / count) if count else None,
    )


def measure(
    timeline: list[PhaseRecord], settle_s: float, times: np.ndarray, latencies: np.ndarray, ok: np.ndarray
) -> list[WindowStats]:
    """One `WindowStats` per phase: [start + settle, end), the settle capped at a third of the phase."""
    windows = []
    for record in timeline:
        settle = min(settle_s, (record.end - record.start) / 3)
        windows.append(
            stats(record.label, record.users, record.start + settle, record.end, times, latencies, ok)
        )
    return windows


@dataclass
class Evaluation:
    """A run held to its gates."""

    shape: str
    windows: list[WindowStats]
    verdicts: list[slo.Verdict]
    knee: WindowStats | None = None
    overall: WindowStats | None = None

    @property
    def passed(self) -> bool:
        """Every gate met."""
        return all(v.passed for v in self.verdicts)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "shape": self.shape,
            "passed": self.passed,
            "windows": [asdict(w) for w in self.windows],
            "knee": asdict(self.knee) if self.knee else None,
            "overall": asdict(self.overall) if self.overall else None,
            "verdicts": [
                {
                    "gate": v.gate,
                    "limit": v.limit,
                    "measured": v.measured,
                    "passed": v.passed,
                    "text": v.describe(),
                }
                for v in self.verdicts
            ],
        }


def evaluate(shape: str, gates: slo.Gates, windows: list[WindowStats], overall: WindowStats) -> Evaluation:
    """Applies `gates` to a run of `shape` (see the module docstring)."""
    if shape == "steady":
        window = windows[0] if windows else overall
        return Evaluation(shape, windows, slo.check(gates, window.measured()), overall=overall)
    if shape == "step":
        fit = [
            w
            for w in windows
            if w.requests
            and w.p99_ms is not None
            and w.p99_ms <= gates.p99_ms
            and (w.failure_ratio or 0.0) <= gates.max_failure_ratio
        ]
        knee = max(fit, key=lambda w: w.rps) if fit else None
        verdicts = slo.check(gates, {"max_failure_ratio": overall.failure_ratio}, ("max_failure_ratio",))
        if knee is None:
            p99s = [w.p99_ms for w in windows if w.p99_ms is not None]
            verdicts += slo.check(gates, {"p99_ms": min(p99s) if p99s else None}, ("p99_ms",))
        else:
            verdicts += slo.check(gates, knee.measured(), ("p99_ms", "p95_ms", "min_rps"))
        return Evaluation(shape, windows, verdicts, knee=knee, overall=overall)
    if shape == "spike":
        base = [w for w in windows if w.label != "spike"]
        p95 = max((w.p95_ms for w in base if w.p95_ms is not None), default=None)
        p99 = max((w.p99_ms for w in base if w.p99_ms is not None), default=None)
        verdicts = slo.check(gates, {"max_failure_ratio": overall.failure_ratio}, ("max_failure_ratio",))
        verdicts += slo.check(gates, {"p95_ms": p95, "p99_ms": p99}, ("p95_ms", "p99_ms"))
        return Evaluation(shape, windows, verdicts, overall=overall)
    raise ValueError(f"shape must be one of {', '.join(slo.SHAPES)}, got {shape!r}")
