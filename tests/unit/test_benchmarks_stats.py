"""The benchmark's statistics: how measurements become the figures and verdicts it reports.

The load generator's window accounting and percentiles (`benchmarks.loadgen`), the medians over
repeats and the targets' ratios (`benchmarks.run`), the report's verdicts and derived columns
(`benchmarks.report`), the decode benchmark's rate (`benchmarks.image_decode`) and the shared
memory table (`benchmarks.shm`). No server, no timing: clocks are faked where one is read.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from benchmarks import image_decode, loadgen, perf, report, shm
from benchmarks import run as bench_run

# --- the load generator's accounting --------------------------------------------------------------


def test_only_completions_inside_the_window_count() -> None:
    book = loadgen._Book(10.0, 12.0)
    book.add(9.999, 0.001, None)  # warm-up
    book.add(10.0, 0.002, None)  # the window's start is in it
    book.add(11.0, 0.004, "ValueError: wrong label")
    book.add(12.0, 0.003, None)  # its end is not
    run = book.result(0.25, None)
    assert run.requests == 2
    assert run.failures == 1
    assert run.throughput == 0.5  # (2 requests - 1 failure) / 2 s
    assert run.window_s == 2.0
    assert run.mean_ms == pytest.approx(3.0)  # failed requests' latencies count too
    assert run.errors == ["ValueError: wrong label"]
    assert (run.generator_cpu, run.server_cpu, run.offered_rate) == (0.25, None, None)


def test_percentiles_take_the_higher_sample() -> None:
    book = loadgen._Book(0.0, 100.0)
    for ms in range(100, 0, -1):  # 1..100 ms, in any order
        book.add(1.0, ms / 1000, None)
    run = book.result(None, None, rate=42.0)
    # numpy's "higher" method: the sample at or above the percentile's position, never between two.
    assert (run.p50_ms, run.p95_ms, run.p99_ms) == pytest.approx((51.0, 96.0, 100.0))
    assert run.mean_ms == pytest.approx(50.5)
    assert run.offered_rate == 42.0
    assert run.throughput == 1.0


def test_a_single_slow_request_sets_the_p99_of_a_small_window() -> None:
    book = loadgen._Book(0.0, 1.0)
    for ms in [5.0] * 49 + [300.0]:
        book.add(0.5, ms / 1000, None)
    run = book.result(None, None)
    assert run.p50_ms == pytest.approx(5.0)
    assert run.p99_ms == pytest.approx(300.0)


def test_an_empty_window_has_no_latency_figures() -> None:
    run = loadgen._Book(0.0, 4.0).result(None, None)
    assert (run.requests, run.failures, run.throughput) == (0, 0, 0.0)
    assert (run.p50_ms, run.p95_ms, run.p99_ms, run.mean_ms) == (None, None, None, None)


def test_only_the_first_distinct_errors_are_kept() -> None:
    book = loadgen._Book(0.0, 1.0)
    for n in range(10):
        book.add(0.5, 0.001, f"error {n % 7}")
    run = book.result(None, None)
    assert run.failures == 10
    assert run.errors == [f"error {n}" for n in range(loadgen.ERRORS_KEPT)]


def test_cpu_shares_are_cpu_seconds_over_the_window_and_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    times = iter([(1.0, 10.0), (2.0, 13.0)])  # (own, server) CPU seconds at start and stop
    probe = loadgen.CpuProbe(pids=(1234,))
    monkeypatch.setattr(probe, "_times", lambda: next(times))
    probe.start()
    own, server = probe.stop(wall_s=2.0)
    assert own == pytest.approx(0.25)  # 1 CPU second over 2 s on 2 CPUs
    assert server == pytest.approx(0.75)


def test_without_server_pids_there_is_no_server_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loadgen.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    times = iter([(0.0, 0.0), (0.5, 0.0)])
    probe = loadgen.CpuProbe()
    monkeypatch.setattr(probe, "_times", lambda: next(times))
    probe.start()
    assert probe.stop(wall_s=1.0) == (pytest.approx(0.5), None)


# --- medians over repeats -----------------------------------------------------------------------


def _repeat(
    throughput: float, p99: float | None, requests: int = 100, failures: int = 0, **extra: Any
) -> dict:
    run = loadgen.Run(
        throughput=throughput,
        requests=requests,
        failures=failures,
        p50_ms=None if p99 is None else p99 / 2,
        p95_ms=p99,
        p99_ms=p99,
        mean_ms=p99,
        window_s=4.0,
        generator_cpu=extra.get("generator_cpu", 0.2),
        server_cpu=extra.get("server_cpu"),
    )
    return run.to_json()


def test_medians_over_an_odd_number_of_repeats() -> None:
    runs = [_repeat(100, 9.0, failures=1), _repeat(300, 5.0, failures=2), _repeat(200, 7.0, requests=50)]
    m = bench_run.medians(runs)
    assert m["repeats"] == 3
    assert m["throughput"] == 200
    assert m["p99_ms"] == 7.0
    assert (m["throughput_min"], m["throughput_max"]) == (100, 300)
    assert (m["requests"], m["failures"]) == (250, 3)  # sums, not medians


def test_medians_of_an_even_number_of_repeats_average_the_middle_two() -> None:
    m = bench_run.medians([_repeat(100, 4.0), _repeat(200, 6.0), _repeat(400, 20.0), _repeat(50, 1.0)])
    assert m["throughput"] == 150
    assert m["p99_ms"] == 5.0


def test_medians_skip_missing_figures() -> None:
    m = bench_run.medians([_repeat(10, None), _repeat(20, 8.0), _repeat(30, None)])
    assert m["p99_ms"] == 8.0  # the one repeat that had a latency figure
    assert m["server_cpu"] is None  # no repeat had one
    assert m["offered_rate"] is None


def test_no_repeats_no_medians() -> None:
    assert bench_run.medians([]) == {}


# --- the targets' ratios --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "p99", "reference_p99", "passed"),
    [
        (5.0, 20.0, 20.0, True),  # exactly the ratio, the same p99
        (6.0, 10.0, 30.0, True),
        (4.99, 10.0, 30.0, False),
        (6.0, 30.1, 30.0, False),  # faster but a worse p99
        (None, 10.0, 30.0, False),
        (6.0, None, 30.0, False),
        (6.0, 10.0, None, False),
    ],
)
def test_faster_and_no_slower(
    ratio: float | None, p99: float | None, reference_p99: float | None, passed: bool
) -> None:
    assert bench_run.faster_and_no_slower(ratio, 5.0, p99, reference_p99) is passed


def test_ratio_text() -> None:
    assert bench_run._ratio(300.0, 100.0) == "3.00x"
    assert bench_run._ratio(None, 100.0) == "-"
    assert bench_run._ratio(300.0, 0.0) == "-"  # no division by a zero throughput
    assert bench_run._ratio_value(0.905) == "0.91"
    assert bench_run._ratio_value(None) == "-"


def test_the_slowest_step_is_the_lowest_throughput_with_a_figure() -> None:
    alone = {
        "preprocess": perf.PerfResult("preprocess", "concurrency", 16, throughput=900.0),
        "model": perf.PerfResult("model", "concurrency", 16, throughput=120.0),
        "broken": perf.PerfResult("broken", "concurrency", 16, error="no measurement"),
        "postprocess": perf.PerfResult("postprocess", "concurrency", 16, throughput=4000.0),
    }
    assert bench_run.slowest_step(alone) == (120.0, "model")
    assert bench_run.slowest_step({"broken": alone["broken"]}) == (None, None)


@pytest.mark.parametrize(
    ("elements", "count", "kept"),
    [
        (30, 12, 12),  # small records: every request
        (150_528, 12, 3),  # resnet50 images: 500,000 // 150,528
        (600_000, 12, 2),  # larger than the budget: still two requests
        (0, 12, 12),  # an empty tensor counts as one element
        (150_528, 1, 2),  # the minimum even when fewer were sent (slicing keeps what there is)
    ],
)
def test_a_step_input_file_keeps_at_most_the_element_budget(elements: int, count: int, kept: int) -> None:
    requests = [{"x": np.zeros(elements, np.float32)}] * count
    assert bench_run.step_items_kept(requests) == kept


def test_only_parses_target_numbers_and_refuses_unknown_ones() -> None:
    targets = {1: "a", 2: "b", 10: "c"}
    assert report.parse_only("", targets) == {1, 2, 10}
    assert report.parse_only("2, 10,", targets) == {2, 10}
    with pytest.raises(SystemExit, match=r"--only: targets are 1-10, got '3'"):
        report.parse_only("3", targets)


@pytest.mark.parametrize("pipeline", ["text_embedder", "fraud_scorer"])
def test_target_5_measures_a_pipeline_and_its_steps_on_the_whole_mix(pipeline: str) -> None:
    """The pipeline and its steps alone get the same requests, and all of the mix: the text mix's
    costly tail (its two 128-token texts come after the 12 shortest) is in both."""
    from loadtests import inputs

    corpus = inputs.build(pipeline, reference=False)
    items = bench_run.step_input_items(corpus)
    assert [item.name for item in items] == [item.name for item in corpus.items]


def _bench_with_cells(tmp_path: Path, cells: dict[str, dict[str, Any]], **settings: Any) -> bench_run.Bench:
    bench = bench_run.Bench(argparse.Namespace(), bench_run.Settings(**settings), tmp_path)
    bench.cells = {cell_id: {"median": median} for cell_id, median in cells.items()}
    return bench


def test_serving_efficiency_takes_the_best_concurrency(tmp_path: Path) -> None:
    cells = {
        "1/reference-int8": {"throughput": 100.0},
        "1/kiln-int8-grpc-c1": {"throughput": 40.0, "generator_cpu": 0.1},
        "1/kiln-int8-grpc-c4": {"throughput": 93.0, "generator_cpu": 0.3},
        "1/kiln-int8-grpc-c16": {"throughput": 88.0, "generator_cpu": 0.5},
    }
    bench = _bench_with_cells(tmp_path, cells, image_grid=(1, 4), compare_concurrency=16)
    bench._score_serving_efficiency()
    target = bench.targets[1]
    assert target["ratio"] == pytest.approx(0.93)
    assert target["passed"] is True
    assert target["cells"] == ["1/reference-int8", "1/kiln-int8-grpc-c4"]
    assert target["generator_cpu"] == 0.3
    assert target["measured"] == "93.0 vs 100.0 images/s (kiln at concurrency 4, gRPC)"


def test_serving_efficiency_without_a_reference_figure_is_a_miss(tmp_path: Path) -> None:
    bench = _bench_with_cells(tmp_path, {"1/kiln-int8-grpc-c4": {"throughput": 93.0}}, image_grid=(4,))
    bench._score_serving_efficiency()
    assert (bench.targets[1]["ratio"], bench.targets[1]["passed"]) == (None, False)


def test_int8_against_fp32_reports_perf_analyzers_ratio_beside_its_own(tmp_path: Path) -> None:
    cells = {"1/kiln-int8-grpc-c8": {"throughput": 75.0}, "3/kiln-fp32-grpc-c8": {"throughput": 25.0}}
    bench = _bench_with_cells(tmp_path, cells, compare_concurrency=8)
    bench.perf = [{"id": "1/pa-int8-c8", "throughput": 80.0}, {"id": "3/pa-fp32-c8", "throughput": 40.0}]
    bench._score_int8_against_fp32()
    target = bench.targets[3]
    assert (target["ratio"], target["passed"]) == (3.0, True)
    assert target["extra"] == {"perf_analyzer_ratio": 2.0}
    assert target["measured"] == "at concurrency 8 (gRPC): INT8 75.0/s, FP32 25.0/s; perf_analyzer: 2.00x"


def test_settings_take_the_command_lines_overrides() -> None:
    args = bench_run.parse_args(["--quick", "--repeats", "5", "--ensembles", "fraud_scorer, text_embedder,"])
    settings = bench_run.settings_for(args)
    assert settings.repeats == 5
    assert settings.duration_s == bench_run.QUICK.duration_s
    assert settings.ensembles == ("fraud_scorer", "text_embedder")
    assert bench_run.settings_for(bench_run.parse_args([])) == bench_run.FULL


# --- the report ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "shown"),
    [
        ({"passed": True}, "**PASS**"),
        ({"passed": False}, "**MISS**"),
        ({"passed": None}, "NOT RUN"),
        ({"passed": True, "report_only": True}, "**REPORTED** (verified)"),
        ({"passed": False, "report_only": True}, "**MISS** (no rate verified)"),
        ({"passed": None, "report_only": True}, "NOT RUN"),
    ],
)
def test_verdicts(target: dict[str, Any], shown: str) -> None:
    assert report.verdict(target) == shown


def test_perf_analyzer_is_compared_with_the_same_cells_median() -> None:
    results = {
        "cells": [{"id": "1/kiln-int8-grpc-c16", "median": {"throughput": 80.0}}],
        "perf_analyzer": [
            {"id": "1/pa-int8-c16", "model": "m", "mode": "concurrency", "level": 16, "throughput": 100.0,
             "p99_ms": 250.0, "generator_cpu": 0.12, "cell": "1/kiln-int8-grpc-c16"},
            {"id": "6/pa-rate", "model": "m", "mode": "rate", "level": 812.5, "throughput": None,
             "error": "no measurement (timed out)", "p99_ms": None, "generator_cpu": None, "cell": None},
        ],
    }  # fmt: skip
    results["perf_analyzer"][0]["p50_ms"] = 20.0
    results["perf_analyzer"][0]["vs_floor"] = {"throughput": 0.05, "p50_ms": 40.0, "p99_ms": None}
    rows = report.perf_table(results).splitlines()[2:]
    assert rows[0] == (
        "| `1/pa-int8-c16` | m | c=16 | 100.0 | 20.00 | 250.00 | 0.05x / 40.00x / - | 80.0 | 1.25 | 12% |"
    )
    assert rows[1] == "| `6/pa-rate` | m | 812/s | no figure: no measurement (timed out) | - | - | - | - | - | - |"


def test_cells_show_the_median_and_the_range_of_the_repeats() -> None:
    median = bench_run.medians([_repeat(90, 12.0), _repeat(110, 10.0), _repeat(100, 11.0)])
    cell = {
        "id": "4/x-on-c32",
        "system": "x",
        "transport": "gRPC",
        "mode": "closed",
        "level": 32,
        "median": median,
        "vs_floor": {"throughput": 0.25, "p50_ms": 2.0, "p99_ms": 1.5},
    }
    row = report.cells_table([cell]).splitlines()[2]
    # throughput median [min-max] | p50 | p95 | p99 | vs floor | requests (summed) | failures | CPU shares
    assert row.split(" | ")[3:] == [
        "c=32",
        "100.0 [90.0-110.0]",
        "5.5",
        "11.0",
        "11.0",
        "0.25x / 2.00x / 1.50x",
        "300",
        "0",
        "20%",
        "- |",
    ]


def test_the_capacity_section_lists_every_search_and_probe() -> None:
    probe = {"throughput": 480.0, "p50_ms": 2.0, "p99_ms": 4.0, "generator_cpu": 0.2, "delayed_share": 0.0}
    late = {**probe, "delayed_share": 0.08}
    found = {"rate": 400.0, "note": "400/s held; 800/s did not",
             "probes": [{"rate": 400.0, "held": True, **probe}, {"rate": 800.0, "held": False, **probe}]}  # fmt: skip
    floor_found = {"rate": 3000.0, "note": "the generator's ceiling",
                   "probes": [{"rate": 6000.0, "held": False, "generator_limited": True, **late}]}  # fmt: skip
    cap = {"model": "fraud_scorer", "p99_limit_ms": 10.0, "perf_analyzer": {"floor": floor_found, "model": found}}
    text = report.capacity_section({"capacity": cap})
    assert "**perf_analyzer, the floor**: 3000/s: the generator's ceiling" in text
    assert "**perf_analyzer, fraud_scorer**: 400/s: 400/s held; 800/s did not" in text
    assert "| 6000 | 480.0 | 2.00 | 4.00 | 20% | 8% | no (the generator) |" in text
    assert "| 800 | 480.0 | 2.00 | 4.00 | 20% | 0% | no |" in text
    assert "Python generator" not in text  # no such search in these results
    assert report.capacity_section({"capacity": {}}) == "Not run.\n"


# --- other benchmarks -----------------------------------------------------------------------------


class _Clock:
    """perf_counter for `image_decode.rate`: each call of the timed function takes the next step."""

    def __init__(self, steps: list[float]) -> None:
        self.now = 0.0
        self.steps = iter(steps)

    def perf_counter(self) -> float:
        return self.now

    def work(self) -> None:
        self.now += next(self.steps)


def test_decode_rate_is_the_median_round(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first call warms up; then three rounds of at least 1 s: 4 calls of 0.25 s (4/s), 2 calls
    # of 0.5 s (2/s), 1 call of 2 s (0.5/s).
    clock = _Clock([9.0] + [0.25] * 4 + [0.5] * 2 + [2.0])
    monkeypatch.setattr(image_decode, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    assert image_decode.rate(clock.work, items=16, seconds=1.0, repeats=3) == pytest.approx(2.0 * 16)


def test_the_shared_memory_table_shows_the_speedups() -> None:
    times = {"http": 12.0, "http+shm": 4.0, "grpc": 9.0, "grpc+shm": 6.0}
    row = shm.table([("identity 4 MiB", 4.0, 4.0, times)]).splitlines()[2]
    assert row == "| identity 4 MiB | 4.00 | 4.000 | 12.0 | 4.0 | 3.00x | 9.0 | 6.0 | 1.50x |"
