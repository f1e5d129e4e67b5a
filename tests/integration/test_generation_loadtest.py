"""The generation load generator against the session's tritonserver (loopback only, a few seconds).

A short seeded Poisson run of `loadtests.generation` over gRPC streaming and over HTTP
`generate_stream`: every request must succeed within the contract, and every figure must be sane
(TTFT inside E2E, TPOT and ITL positive and below E2E, tokens/s and goodput consistent with the
counts). Then the runner's command line with the smoke profile (exit 0, its JSON report) and an
impossible gate (exit 1, naming the gate): the gates can fail. Timing targets are not asserted here
(the machine is shared); `make loadtest` and `make bench` measure them.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import paths, tensors
from kiln.server import TritonServer

if str(paths.ROOT) not in sys.path:  # loadtests/ is run from the repository root, not installed
    sys.path.insert(0, str(paths.ROOT))
from loadtests import generation as load  # noqa: E402

RUN_TIMEOUT_S = 120
WORKLOAD = load.Workload(rate=4.0, requests=12, prompt_words=(4, 16), max_tokens=(4, 24), prompts=4, seed=3)
"""About 3 s of arrivals; four prompts, so greedy repeats are compared."""


@pytest.fixture(scope="module")
def generator(server: TritonServer) -> TritonServer:
    if tensors.TEXT_GENERATOR not in server.models():
        pytest.fail(
            f"{tensors.TEXT_GENERATOR} is not served by the session's server (models: "
            f"{', '.join(server.models())}); run `make build-engines`",
            pytrace=False,
        )
    return server


def check_sane(records: list[load.RequestRecord], summary: dict) -> None:
    assert summary["failed"] == 0, summary["errors"]
    assert summary["completed"] == summary["requests"] == WORKLOAD.requests
    assert summary["consistency_pairs"] > 0
    for r in records:
        assert r.finish_reason in ("stop", "length")
        assert 1 <= r.output_tokens <= r.max_tokens
        assert r.prompt_tokens > 0
        assert 0 < r.ttft <= r.e2e < load.REQUEST_TIMEOUT_S
        if r.tpot is not None:
            assert 0 < r.tpot < r.e2e
        assert all(0 <= gap < r.e2e for gap in r.itls())
    ttft, e2e = summary["ttft_ms"], summary["e2e_ms"]
    assert 0 < ttft["p50"] <= ttft["p95"] <= ttft["p99"] <= e2e["p99"]
    assert summary["itl_ms"]["p50"] > 0 and summary["tpot_ms"]["p50"] > 0
    last_arrival = max(r.arrival for r in records) - min(r.arrival for r in records)
    assert summary["duration_s"] > last_arrival
    assert summary["output_tokens_per_s"] == pytest.approx(summary["output_tokens"] / summary["duration_s"])
    assert summary["output_tokens"] == sum(r.output_tokens for r in records)
    assert summary["goodput"] <= summary["request_throughput"]


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_a_short_poisson_run_succeeds_with_sane_figures(generator: TritonServer, transport: str) -> None:
    target: load.Target = (
        load.GrpcStream(generator.grpc_url) if transport == "grpc" else load.HttpSse(generator.http_url)
    )
    records = asyncio.run(load.run_open(target, load.plan(WORKLOAD)))
    summary = load.summarize(records, load.GoodputSLO(ttft_ms=60_000.0, tpot_ms=60_000.0))
    check_sane(records, summary)
    assert summary["good_requests"] == WORKLOAD.requests


def run_cli(server: TritonServer, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "loadtests.generation", "--profile", "smoke",
        "--grpc-url", server.grpc_url, "--requests", "6", "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=paths.ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_the_command_line_passes_its_gates_and_fails_an_impossible_one(
    generator: TritonServer, tmp_path: Path
) -> None:
    done = run_cli(generator, tmp_path / "ok")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SLO: PASS" in done.stdout
    report = json.loads((tmp_path / "ok" / f"{tensors.TEXT_GENERATOR}-poisson_slo.json").read_text())
    assert report["passed"] and report["summary"]["completed"] == 6 and report["summary"]["failed"] == 0
    missed = run_cli(generator, tmp_path / "missed", "--gate", "p95_ttft_ms=0.001")
    assert missed.returncode == 1, missed.stdout + missed.stderr
    assert "MISS  p95 TTFT" in missed.stdout and "SLO: MISS: p95 TTFT" in missed.stdout
