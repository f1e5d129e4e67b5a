"""The benchmark's capacity search (target 6) against a real tritonserver with a known floor.

The server serves only the identity floor model (`benchmarks.floor`: a bare Python-based model
copying its input), so whatever the search finds is the floor of this machine. Short windows;
what must hold is asserted, never a timing threshold: the search finds a positive rate, records
every step (rate, held or not, the figures, perf_analyzer's command), says what limited it, and
the Python generator's own ceiling against the floor is reported (a rate, or why there is none).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import floor
from benchmarks import run as bench_run
from kiln.server import FREE_PORT, TritonServer

SETTINGS = bench_run.Settings(
    repeats=1,
    warmup_s=0.3,
    capacity_start=200.0,
    capacity_bisections=1,
    capacity_duration_s=1.0,
    capacity_perf_ms=500,
    perf_trials=3,
)


@pytest.fixture(scope="module")
def floor_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver serving only the identity floor model."""
    root = tmp_path_factory.mktemp("floor")
    floor.write(root / "repository")
    with TritonServer(
        root / "repository", http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT,
        log_file=root / "tritonserver.log",
    ) as server:  # fmt: skip
        yield server


@pytest.fixture
def bench(floor_server: TritonServer, tmp_path: Path) -> bench_run.Bench:
    """A benchmark run whose main server is the floor server."""
    made = bench_run.Bench(argparse.Namespace(no_reference=True), SETTINGS, tmp_path)
    made.main = bench_run.Endpoint("floor", floor_server.http_url, floor_server.grpc_url, (floor_server.pid,))
    return made


def test_perf_analyzer_finds_the_floors_capacity_and_records_each_step(
    bench: bench_run.Bench, tmp_path: Path
) -> None:
    found = bench.perf_capacity(bench_run.FLOOR, floor.input_file(tmp_path / "floor.json"))
    assert found.rate > 0, found.note
    assert found.generator == "perf_analyzer"
    rates = [p["rate"] for p in found.probes]
    first = found.probes[0]
    assert first["rate"] == SETTINGS.capacity_start
    assert rates[1] == SETTINGS.capacity_start * (2 if first["held"] else 0.5)  # doubling, or halving
    assert found.rate in {p["rate"] for p in found.probes if p["held"]}
    assert all(p["rate"] < found.rate or not p["held"] for p in found.probes if p["rate"] != found.rate)
    for probe in found.probes:
        if probe["held"]:
            assert probe["p99_ms"] <= bench_run.CAPACITY_P99_MS
            assert probe["delayed_share"] is not None  # perf_analyzer's own account of keeping up
    # Every probe is a recorded perf_analyzer run with its command line.
    runs = [e for e in bench.perf if e["model"] == bench_run.FLOOR and e["mode"] == "rate"]
    assert [e["level"] for e in runs] == rates
    assert all("--request-rate-range" in e["command"] for e in runs)
    if found.high is not None:  # the rate that did not hold says whether the generator gave out
        assert ("could not offer" in found.note) is found.limited


def test_the_python_generator_reports_its_own_ceiling_against_the_floor(bench: bench_run.Bench) -> None:
    ceiling = bench.python_ceiling()
    assert ceiling.model == bench_run.FLOOR and ceiling.generator == "loadgen"
    assert ceiling.probes, "no probe recorded"
    assert ceiling.note
    assert ceiling.rate > 0, f"the generator held no rate against the floor: {ceiling.note}"
    held = [p for p in ceiling.probes if p["held"]]
    assert all(p["failures"] == 0 and p["p99_ms"] <= bench_run.CAPACITY_P99_MS for p in held)
