"""Target 6's capacity search (`benchmarks.capacity`), driven by deterministic latency curves.

No server: `Search.run` takes the measurement as a callable, so each curve below is a function of
the offered rate, and the tests check which rates the search probes and what it reports.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from benchmarks import capacity, loadgen, perf, report
from benchmarks import run as bench_run
from benchmarks.capacity import Bracket, Probe, Search, Verification

P99_LIMIT_MS = 10.0
MIN_DELIVERED = 0.97


def _run(p99_ms: float | None, throughput: float, failures: int = 0) -> loadgen.Run:
    return loadgen.Run(
        throughput=throughput,
        requests=int(throughput),
        failures=failures,
        p50_ms=None if p99_ms is None else p99_ms / 2,
        p95_ms=p99_ms,
        p99_ms=p99_ms,
        mean_ms=p99_ms,
        window_s=1.0,
        generator_cpu=0.1,
        server_cpu=0.5,
        offered_rate=None,
    )


class Curve:
    """A fake measurement: p99 = latency(rate), the whole rate delivered; records the rates asked."""

    def __init__(self, latency: Any) -> None:
        self.latency = latency
        self.rates: list[float] = []

    def __call__(self, rate: float) -> loadgen.Run:
        self.rates.append(rate)
        return _run(self.latency(rate), rate)


def _held(rate: float, run: loadgen.Run) -> bool:
    return capacity.rate_held(run, rate, P99_LIMIT_MS, MIN_DELIVERED)


def _linear(capacity_rate: float) -> Curve:
    """p99 grows linearly with the rate and reaches the limit exactly at `capacity_rate`."""
    return Curve(lambda rate: P99_LIMIT_MS * rate / capacity_rate)


SEARCH = Search(start=100.0, bisections=3, min_rate=10.0, max_rate=100_000.0)


# --- monotone curves ----------------------------------------------------------------------------


def test_a_monotone_curve_is_doubled_then_bisected() -> None:
    curve = _linear(1000.0)
    bracket = SEARCH.run(curve, _held)
    assert curve.rates == [100.0, 200.0, 400.0, 800.0, 1600.0, 1200.0, 1000.0, 1100.0]
    assert (bracket.low, bracket.high) == (1000.0, 1100.0)
    assert [p.held for p in bracket.probes] == [True, True, True, True, False, False, True, False]
    assert bracket.found
    assert bracket.describe() == "capacity between 1000/s (held) and 1100/s (not held)"


@pytest.mark.parametrize("true_capacity", [130.0, 777.0, 5000.0, 31_999.0])
@pytest.mark.parametrize("bisections", [0, 1, 4])
def test_the_bracket_holds_the_true_capacity_and_narrows_by_half_per_bisection(
    true_capacity: float, bisections: int
) -> None:
    search = Search(start=100.0, bisections=bisections, min_rate=10.0, max_rate=100_000.0)
    bracket = search.run(_linear(true_capacity), _held)
    assert bracket.high is not None
    assert bracket.low <= true_capacity < bracket.high
    # Doubling leaves [r, 2r], r = half the first rate that missed; each bisection halves it.
    first_miss = next(p.rate for p in bracket.probes if not p.held)
    assert bracket.high - bracket.low == pytest.approx(first_miss / 2 / 2**bisections)
    assert len(bracket.probes) == len({p.rate for p in bracket.probes})  # no rate measured twice


def test_a_start_rate_that_fails_is_halved_until_one_holds() -> None:
    curve = _linear(30.0)
    bracket = SEARCH.run(curve, _held)
    assert curve.rates[:3] == [100.0, 50.0, 25.0]
    assert bracket.low <= 30.0 < bracket.high
    assert (bracket.low, bracket.high) == (28.125, 31.25)  # [25, 50] bisected 3 times


def test_each_probe_is_reported_as_made() -> None:
    seen: list[Probe] = []
    bracket = SEARCH.run(_linear(300.0), _held, on_probe=seen.append)
    assert seen == bracket.probes
    assert all(isinstance(p.result, loadgen.Run) for p in seen)


# --- the target met everywhere, or nowhere -------------------------------------------------------


def test_a_target_met_everywhere_stops_at_the_upper_bound() -> None:
    curve = Curve(lambda rate: 1.0)
    bracket = SEARCH.run(curve, _held)
    assert curve.rates == [100.0 * 2**k for k in range(10)]  # 51,200 doubled is over 100,000
    assert max(curve.rates) <= SEARCH.max_rate
    assert (bracket.low, bracket.high) == (51_200.0, None)
    assert bracket.describe() == "every rate probed held, up to 51200/s (the search's bound)"
    assert bracket.verification_rates() == [51_200.0, 25_600.0]


def test_a_target_met_nowhere_reports_zero_and_says_so() -> None:
    curve = Curve(lambda rate: 50.0)
    bracket = SEARCH.run(curve, _held)
    assert curve.rates == [100.0, 50.0, 25.0, 12.5]  # 6.25 is under the lower bound
    assert min(curve.rates) >= SEARCH.min_rate
    assert (bracket.low, bracket.high) == (0.0, 12.5)
    assert not bracket.found
    assert bracket.verification_rates() == []
    assert bracket.describe() == "no rate held (lowest probed 12/s): capacity 0/s"
    assert capacity.verify(bracket.verification_rates(), _unexpected, P99_LIMIT_MS) == Verification(
        0.0, {}, False
    )


def _unexpected(rate: float) -> dict[str, Any]:
    raise AssertionError(f"nothing should be verified, got {rate}")


def test_a_start_rate_under_the_lower_bound_is_probed_once() -> None:
    curve = Curve(lambda rate: 50.0)
    bracket = Search(start=15.0, bisections=3, min_rate=10.0, max_rate=1000.0).run(curve, _held)
    assert curve.rates == [15.0]
    assert (bracket.low, bracket.high) == (0.0, 15.0)


def test_a_start_rate_over_half_the_upper_bound_is_not_doubled() -> None:
    curve = Curve(lambda rate: 1.0)
    bracket = Search(start=600.0, bisections=3, min_rate=10.0, max_rate=1000.0).run(curve, _held)
    assert curve.rates == [600.0]
    assert (bracket.low, bracket.high) == (600.0, None)


# --- noisy, non-monotone points -----------------------------------------------------------------


def test_noisy_points_keep_the_bracket_between_a_held_and_a_missed_rate() -> None:
    # Fine up to 700/s but for a spike at 200/s.
    p99 = {100.0: 3.0, 200.0: 12.0}
    curve = Curve(lambda rate: p99.get(rate, 4.0 if rate <= 700 else 30.0))
    bracket = SEARCH.run(curve, _held)
    # The spike at 200/s ends the doubling: the search never sees the good rates above it.
    assert curve.rates == [100.0, 200.0, 150.0, 175.0, 187.5]
    assert (bracket.low, bracket.high) == (187.5, 200.0)
    held = {p.rate for p in bracket.probes if p.held}
    missed = {p.rate for p in bracket.probes if not p.held}
    assert bracket.low in held and bracket.high in missed


def test_every_bisection_stays_inside_the_bracket_it_splits() -> None:
    outcomes = iter([True, True, False, True, False, False, True])  # the "measurements", in order
    curve = Curve(lambda rate: 1.0 if next(outcomes) else 99.0)
    bracket = Search(start=100.0, bisections=4, min_rate=10.0, max_rate=10_000.0).run(curve, _held)
    assert curve.rates == [100.0, 200.0, 400.0, 300.0, 350.0, 325.0, 312.5]
    low, high = 200.0, 400.0
    for probe in bracket.probes[3:]:
        assert low < probe.rate < high
        low, high = (probe.rate, high) if probe.held else (low, probe.rate)
    assert (bracket.low, bracket.high) == (low, high) == (312.5, 325.0)


# --- what holds -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run", "held"),
    [
        (_run(10.0, 100.0), True),  # p99 exactly at the limit
        (_run(10.01, 100.0), False),
        (_run(None, 100.0), False),  # nothing completed in the window
        (_run(1.0, 100.0, failures=1), False),
        (_run(1.0, 97.0), True),  # 97% of the rate delivered
        (_run(1.0, 96.0), True),  # one request short of 97% in a 1 s window: a whole request less
        (_run(1.0, 95.9), False),  # a silent backlog
    ],
)
def test_a_rate_holds_with_p99_in_limit_no_failure_and_the_rate_delivered(
    run: loadgen.Run, held: bool
) -> None:
    assert capacity.rate_held(run, 100.0, P99_LIMIT_MS, MIN_DELIVERED) is held


def test_a_low_rate_in_a_short_window_is_judged_in_whole_requests() -> None:
    # 12.5/s over 1.5 s schedules 18.75 requests; 18 completed is the whole rate, not a backlog.
    run = dataclasses.replace(_run(5.0, 12.0), window_s=1.5)
    assert capacity.rate_held(run, 12.5, P99_LIMIT_MS, MIN_DELIVERED) is True
    assert (
        capacity.rate_held(dataclasses.replace(run, throughput=10.0), 12.5, P99_LIMIT_MS, MIN_DELIVERED)
        is False
    )


@pytest.mark.parametrize(
    ("median", "held"),
    [
        ({"p99_ms": 9.0, "failures": 0}, True),
        ({"p99_ms": 10.0, "failures": 0}, True),
        ({"p99_ms": 11.0, "failures": 0}, False),
        ({"p99_ms": 9.0, "failures": 2}, False),
        ({"p99_ms": None, "failures": 0}, False),
        ({}, False),  # every repeat failed: no medians
    ],
)
def test_a_median_verifies_a_rate(median: dict[str, Any], held: bool) -> None:
    assert capacity.median_held(median, P99_LIMIT_MS) is held


# --- verification ---------------------------------------------------------------------------------


def test_verification_rates_fall_back_to_the_next_lower_held_rate() -> None:
    probes = [Probe(r, h, None) for r, h in ((100, True), (200, True), (400, False), (300, True))]
    assert Bracket(300.0, 350.0, probes).verification_rates() == [300.0, 200.0]


def test_verification_rates_fall_back_to_a_share_of_the_capacity_without_a_lower_held_rate() -> None:
    probes = [Probe(100.0, True, None), Probe(200.0, False, None)]
    assert Bracket(100.0, 200.0, probes).verification_rates() == [100.0, 80.0]


def test_verify_stops_at_the_first_rate_whose_median_holds() -> None:
    medians = {400.0: {"p99_ms": 12.0, "failures": 0}, 300.0: {"p99_ms": 8.0, "failures": 0}}
    asked: list[float] = []

    def median_at(rate: float) -> dict[str, Any]:
        asked.append(rate)
        return medians[rate]

    outcome = capacity.verify([400.0, 300.0, 200.0], median_at, P99_LIMIT_MS)
    assert asked == [400.0, 300.0]
    assert outcome == Verification(300.0, medians[300.0], True)


def test_verify_reports_the_last_rate_tried_when_none_holds() -> None:
    outcome = capacity.verify([400.0, 320.0], lambda rate: {"p99_ms": 50.0, "failures": 0}, P99_LIMIT_MS)
    assert (outcome.rate, outcome.verified) == (320.0, False)


# --- wired into the benchmark -------------------------------------------------------------------


class _FakeBench(bench_run.Bench):
    """A Bench whose server, request mix and perf_analyzer are fakes: perf_analyzer's p99 at a
    rate comes from `pa_latency(model, rate)`, its send rate from `pa_sent(model, rate)`."""

    def __init__(self, settings: bench_run.Settings, tmp_path: Path, pa_latency: Any, pa_sent: Any) -> None:
        super().__init__(argparse.Namespace(no_reference=True), settings, tmp_path)
        self.main = bench_run.Endpoint("kiln", "127.0.0.1:1", "127.0.0.1:2")
        self.lines: list[str] = []
        self.pa_calls: list[tuple[str, float]] = []
        self.pa_latency, self.pa_sent = pa_latency, pa_sent

    def log(self, text: str) -> None:
        self.lines.append(text)

    def corpus(self, model: str) -> Any:
        self.mixes[model] = SimpleNamespace(model=model)
        self.checkers[model] = None  # type: ignore[assignment]
        return SimpleNamespace(items=[])

    def input_file(self, model: str) -> Path:
        return Path("unused.json")

    def pa(self, comparison: int, id_: str, model: str, input_file: Path, **kwargs: Any) -> perf.PerfResult:
        rate = kwargs["rate"]
        self.pa_calls.append((model, rate))
        sent = self.pa_sent(model, rate)
        result = perf.PerfResult(
            model, "rate", rate, throughput=min(rate, sent), p50_ms=1.0, p99_ms=self.pa_latency(model, rate),
            send_rate=sent, delayed_share=0.0 if sent >= rate else 0.2,
        )  # fmt: skip
        self.perf.append({"id": id_, "comparison": comparison, "cell": None, **result.to_json()})
        return result


def _bench(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    latency: Any,
    pa_latency: Any = lambda model, rate: 5.0,
    pa_sent: Any = lambda model, rate: rate,
) -> _FakeBench:
    """`latency(rate, seed)`: the Python generator's p99 against fraud_scorer (the floor holds up
    to 3200/s for it)."""

    def run_open(
        target: Any, corpus: Any, checker: Any, rate: float, *args: Any, seed: int = 0
    ) -> loadgen.Run:
        if target.mix.model == bench_run.FLOOR:
            return _run(5.0 if rate <= 3200 else 50.0, rate)
        return _run(latency(rate, seed), rate)

    monkeypatch.setattr(loadgen, "run_open", run_open)
    monkeypatch.setattr(loadgen, "TritonGrpc", lambda url, mix: SimpleNamespace(mix=mix))
    settings = bench_run.Settings(repeats=3, capacity_start=100.0, capacity_bisections=2)
    return _FakeBench(settings, tmp_path, pa_latency, pa_sent)


def _rates(bench: _FakeBench, model: str) -> list[float]:
    return [rate for m, rate in bench.pa_calls if m == model]


def test_the_capacity_is_a_ratio_to_the_floors_searched_the_same_way(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # perf_analyzer: the floor holds p99 <= 10 ms up to 2000/s, fraud_scorer up to 1000/s.
    limits = {bench_run.FLOOR: 2000.0, "fraud_scorer": 1000.0}
    bench = _bench(
        monkeypatch, tmp_path, lambda rate, seed: rate / 100.0,
        pa_latency=lambda model, rate: 10.0 * rate / limits[model],
    )  # fmt: skip
    bench.capacity_search()
    found = bench.capacity["perf_analyzer"]
    assert found["floor"]["rate"] == 2000.0
    assert found["model"]["rate"] == 1000.0
    assert _rates(bench, bench_run.FLOOR) == [100, 200, 400, 800, 1600, 3200, 2400, 2000]
    assert _rates(bench, "fraud_scorer") == [100, 200, 400, 800, 1600, 1200, 1000]
    assert [p["held"] for p in found["model"]["probes"]] == [True] * 4 + [False, False, True]
    target = bench.targets[6]
    assert target["ratio"] == pytest.approx(0.5)
    assert target["passed"] is False
    assert report.verdict(target) == "**MISS**"
    assert "0.50x < 0.6x: MISS by 17%" in target["measured"]
    assert "Where the time goes: at 1600/s:" in target["measured"]


def test_the_python_generator_is_a_cross_check_with_its_own_ceiling(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = _bench(monkeypatch, tmp_path, lambda rate, seed: rate / 100.0)  # p99 10 ms at 1000/s
    bench.capacity_search()
    python = bench.capacity["python"]
    assert python["rate"] == 1000.0
    assert python["bracket"] == [1000.0, 1200.0]
    assert python["verified"] is True
    assert [p["rate"] for p in python["probes"]] == [100, 200, 400, 800, 1600, 1200, 1000]
    assert bench.cells["6/fraud_scorer-open-1000"]["median"]["repeats"] == 3
    assert bench.capacity["python_ceiling"]["rate"] == 3200.0
    assert "its own ceiling against the floor: 3200/s" in bench.targets[6]["measured"]
    assert bench.targets[6]["passed"] is True  # perf_analyzer: every rate held for both, ratio 1.0


def test_a_rate_the_generator_cannot_offer_is_said_so_not_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # perf_analyzer cannot send more than 1500/s: the floor's figure is its ceiling, a lower bound.
    bench = _bench(
        monkeypatch, tmp_path, lambda rate, seed: 1.0, pa_sent=lambda model, rate: min(rate, 1500.0)
    )
    bench.capacity_search()
    floor_found = bench.capacity["perf_analyzer"]["floor"]
    assert floor_found["rate"] == 1400.0
    assert floor_found["limited"] is True
    assert "could not offer the rate" in floor_found["note"]
    assert [(p["rate"], p["held"], p["generator_limited"]) for p in floor_found["probes"]][-3:] == [
        (1600.0, False, True),
        (1200.0, True, False),
        (1400.0, True, False),
    ]


def test_no_rate_held_is_measured_and_says_where(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bench = _bench(
        monkeypatch, tmp_path, lambda rate, seed: 50.0,
        pa_latency=lambda model, rate: 50.0 if model == "fraud_scorer" else 1.0,
    )  # fmt: skip
    bench.capacity_search()
    model = bench.capacity["perf_analyzer"]["model"]
    assert model["rate"] == 0.0
    assert model["note"].startswith("no rate held down to 12/s (the server missed the limit there)")
    assert bench.capacity["python"]["rate"] == 0.0
    assert bench.capacity["python"]["cells"] == []
    assert bench.targets[6]["ratio"] == 0.0
    assert bench.targets[6]["passed"] is False


def test_the_python_cross_check_falls_back_when_the_repeats_miss(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The search's probes (seed 0) hold up to 1000/s; the repeats (seeds 0-2) hold only under 900/s.
    bench = _bench(
        monkeypatch, tmp_path, lambda rate, seed: rate / 100.0 if seed == 0 or rate < 900 else 99.0
    )
    bench.capacity_search()
    python = bench.capacity["python"]
    assert python["bracket"] == [1000.0, 1200.0]
    assert python["rate"] == 800.0  # the next lower rate that held in the search
    assert python["verified"] is True
    assert list(bench.cells) == ["6/fraud_scorer-open-1000", "6/fraud_scorer-open-800"]
