"""Target 6's capacity search, apart from any server: the highest rate a measurement holds.

`Search.run(measure, held)` probes rates: doubling up from the start rate while each holds (or
halving down while none does), within the search's bounds, then bisecting the bracket between
the highest rate that held and the lowest that did not. `measure(rate)` is any callable returning
a result (the benchmark's runs `benchmarks.loadgen.run_open` against tritonserver; the unit tests
pass deterministic curves); `held(rate, result)` says whether the rate held.

`Bracket.verification_rates()` then names the rates to verify with the cell's repeats, highest
first, and `verify` keeps the first whose median holds (`median_held`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

FALLBACK_SHARE = 0.8
"""The rate verified after the capacity when no lower probe held: this share of the capacity."""


def rate_held(run: Any, rate: float, p99_limit_ms: float, min_delivered: float) -> bool:
    """A probe at `rate` held: nothing failed, p99 within the limit, and at least `min_delivered`
    of the rate completed (no silent backlog), less one request when the run says its window
    (`window_s`): a window of 1.5 s at 12.5/s schedules 18.75 requests, and 18 complete. `run`
    has failures, p99_ms and throughput."""
    window = getattr(run, "window_s", None) or 0.0
    slack = 1.0 / window if window > 0 else 0.0
    return (
        run.failures == 0
        and run.p99_ms is not None
        and run.p99_ms <= p99_limit_ms
        and run.throughput >= min_delivered * rate - slack
    )


def median_held(median: Mapping[str, Any], p99_limit_ms: float) -> bool:
    """The repeats' medians (`benchmarks.run.medians`) verify a rate: p99 within the limit and no
    failure."""
    return bool(
        median.get("p99_ms") is not None and median["p99_ms"] <= p99_limit_ms and median.get("failures") == 0
    )


@dataclass(frozen=True)
class Probe:
    """One measured rate: whether it held, and the measurement."""

    rate: float
    held: bool
    result: Any


@dataclass
class Bracket:
    """The search's outcome.

    Attributes:
        low: The highest rate that held; 0.0 when none did.
        high: The lowest rate above `low` that did not hold; None when every rate probed held.
        probes: Every probe, in the order measured.
    """

    low: float = 0.0
    high: float | None = None
    probes: list[Probe] = field(default_factory=list)

    @property
    def found(self) -> bool:
        """Whether any rate held."""
        return self.low > 0

    def verification_rates(self) -> list[float]:
        """The rates to verify, in order: the capacity, then the next lower rate that held (or
        `FALLBACK_SHARE` of the capacity when none did); none when no rate held."""
        if not self.found:
            return []
        lower = sorted((p.rate for p in self.probes if p.held and p.rate < self.low), reverse=True)
        return [self.low, *(lower[:1] or [self.low * FALLBACK_SHARE])]

    def describe(self) -> str:
        """One line: the bracket, or that no rate held (down to the lowest probed)."""
        if not self.found:
            lowest = min((p.rate for p in self.probes), default=0.0)
            return f"no rate held (lowest probed {lowest:.0f}/s): capacity 0/s"
        if self.high is None:
            return f"every rate probed held, up to {self.low:.0f}/s (the search's bound)"
        return f"capacity between {self.low:.0f}/s (held) and {self.high:.0f}/s (not held)"


@dataclass(frozen=True)
class Search:
    """Doubling (or halving) from `start` within [min_rate, max_rate], then `bisections` steps."""

    start: float
    bisections: int
    min_rate: float
    max_rate: float

    def run(
        self,
        measure: Callable[[float], Any],
        held: Callable[[float, Any], bool],
        on_probe: Callable[[Probe], None] | None = None,
    ) -> Bracket:
        """Probes rates with `measure`, judged by `held`; `on_probe` sees each probe as made."""
        bracket = Bracket()

        def probe(rate: float) -> bool:
            result = measure(rate)
            made = Probe(rate, held(rate, result), result)
            bracket.probes.append(made)
            if on_probe is not None:
                on_probe(made)
            return made.held

        rate = self.start
        if probe(rate):
            bracket.low = rate
            while bracket.high is None and rate * 2 <= self.max_rate:
                rate *= 2
                if probe(rate):
                    bracket.low = rate
                else:
                    bracket.high = rate
        else:
            bracket.high = rate
            while not bracket.low and rate / 2 >= self.min_rate:
                rate /= 2
                if probe(rate):
                    bracket.low = rate
                else:
                    bracket.high = rate
        for _ in range(self.bisections if bracket.low and bracket.high else 0):
            mid = (bracket.low + bracket.high) / 2  # type: ignore[operator]
            if probe(mid):
                bracket.low = mid
            else:
                bracket.high = mid
        return bracket


@dataclass(frozen=True)
class Verification:
    """The rate reported: the first verified candidate, else the last one tried (0.0: none)."""

    rate: float = 0.0
    median: Mapping[str, Any] = field(default_factory=dict)
    verified: bool = False


def verify(
    rates: Sequence[float], median_at: Callable[[float], Mapping[str, Any]], p99_limit_ms: float
) -> Verification:
    """Measures the candidate `rates` in order (`median_at(rate)`: the repeats' medians) and
    stops at the first whose median holds."""
    outcome = Verification()
    for rate in rates:
        median = median_at(rate)
        outcome = Verification(rate, median, median_held(median, p99_limit_ms))
        if outcome.verified:
            break
    return outcome


GENERATOR_MAX_DELAYED = 0.01
"""perf_analyzer kept up with a rate when it sent at most this share of the requests late."""


def perf_rate_held(result: Any, rate: float, p99_limit_ms: float, min_delivered: float) -> bool:
    """A perf_analyzer probe (`benchmarks.perf.PerfResult`, rate mode) held `rate`: a figure, p99
    within the limit, at least `min_delivered` of the rate completed, and the generator itself
    kept up (else the probe measured perf_analyzer, not the server: `generator_limited`)."""
    return (
        result.error is None
        and result.throughput is not None
        and result.p99_ms is not None
        and result.p99_ms <= p99_limit_ms
        and result.throughput >= min_delivered * rate
        and not generator_limited(result, rate, min_delivered, p99_limit_ms)
    )


def generator_limited(result: Any, rate: float, min_delivered: float, p99_limit_ms: float) -> bool:
    """Whether the generator, not the server, failed the rate: its own send rate fell short of
    `min_delivered` of the rate, or it sent more than GENERATOR_MAX_DELAYED of the requests late
    while the p99 was within the limit (a p99 that hides late sends cannot be trusted; a p99 over
    the limit is the server's miss either way: late sends only shorten the measured latency).
    A loadgen `Run` has neither figure: never."""
    delayed = getattr(result, "delayed_share", None)
    send_rate = getattr(result, "send_rate", None)
    p99 = getattr(result, "p99_ms", None)
    server_missed = p99 is not None and p99 > p99_limit_ms
    return bool(
        (send_rate is not None and send_rate < min_delivered * rate)
        or (delayed is not None and delayed > GENERATOR_MAX_DELAYED and not server_missed)
    )


@dataclass(frozen=True)
class Capacity:
    """One capacity search's outcome, stated so that a 0 is never "unmeasured".

    Attributes:
        model: The model searched.
        generator: "perf_analyzer" or "loadgen" (the Python open-loop generator).
        rate: The highest rate that held (0.0: none did, see `note`).
        high: The lowest rate above it that did not hold; None when every rate probed held.
        limited: Whether the rate that did not hold failed because of the generator (it could not
            offer that rate), not the server: then `rate` is a lower bound of the server's capacity.
        probes: Every probe: rate, held, generator_limited and the measurement's figures.
        note: One line saying what the figure means.
    """

    model: str
    generator: str
    rate: float
    high: float | None
    limited: bool
    probes: tuple[dict[str, Any], ...]
    note: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def summarize(
    model: str,
    generator: str,
    bracket: Bracket,
    limited: Callable[[Probe], bool],
    to_json: Callable[[Any], dict[str, Any]],
) -> Capacity:
    """The `Capacity` of a finished search; `limited(probe)` says whether a probe failed because of
    the generator, `to_json(result)` turns a probe's measurement into figures."""
    probes = tuple(
        {"rate": p.rate, "held": p.held, "generator_limited": not p.held and limited(p), **to_json(p.result)}
        for p in bracket.probes
    )
    failed_at = next((p for p in bracket.probes if p.rate == bracket.high and not p.held), None)
    by_generator = failed_at is not None and limited(failed_at)
    if not bracket.found:
        lowest = min((p.rate for p in bracket.probes), default=0.0)
        cause = "the generator could not offer it" if by_generator else "the server missed the limit there"
        note = f"no rate held down to {lowest:.0f}/s ({cause}): measured, not 0 for want of a measurement"
    elif bracket.high is None:
        note = f"every rate probed held up to {bracket.low:.0f}/s (the search's bound): a lower bound"
    elif by_generator:
        note = (
            f"{bracket.low:.0f}/s held; at {bracket.high:.0f}/s {generator} could not offer the rate "
            "(the generator's ceiling, not the server's): a lower bound of the capacity"
        )
    else:
        note = f"{bracket.low:.0f}/s held; {bracket.high:.0f}/s did not (the server missed the limit)"
    return Capacity(model, generator, bracket.low, bracket.high, by_generator, probes, note)
