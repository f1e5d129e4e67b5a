"""The load-test suites, smoke-run against the session's tritonserver (loopback only).

Each suite runs headless through its runner (`python -m loadtests.run`, the `make loadtest` entry)
for a few seconds with the smoke profile of the model folders' `loadtest.py`: one HTTP and one gRPC user, loose
latency gates a loaded 2-core CI box meets, and zero tolerance for failed requests or wrong
answers. The runner's exit status is asserted, and so are locust's own CSV (both transports sent
requests, none failed) and the SLO report (every response's content was checked against the
in-process reference's answers). Two more runs prove the gates can fail: an impossible p99 gate,
and a request mix whose reference answers were falsified, each exits non-zero naming the gate.

Timing targets are not asserted here (the machine is shared); `make loadtest` and `make bench`
measure them.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln import paths, tensors
from kiln.server import TritonServer

if str(paths.ROOT) not in sys.path:  # loadtests/ is run from the repository root, not installed
    sys.path.insert(0, str(paths.ROOT))
from loadtests import inputs  # noqa: E402

SUITES = (tensors.IMAGE_CLASSIFIER, tensors.TEXT_EMBEDDER, tensors.FRAUD_SCORER)
RUN_TIMEOUT_S = 240
"""A smoke run lasts about 15 s; this only stops a hung one."""
SHORT_RUN = ("--shape-seconds", "3")
"""The runs that must fail need only a few requests."""


def run_suite(server: TritonServer, out: Path, model: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """`python -m loadtests.run` for one suite, steady shape, smoke profile, against `server`."""
    command = [
        sys.executable, "-m", "loadtests.run",
        "--pipeline", model, "--shape", "steady", "--profile", "smoke",
        "--http-url", server.http_url, "--grpc-url", server.grpc_url,
        "--out", str(out), *extra,
    ]  # fmt: skip
    return subprocess.run(command, cwd=paths.ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def stats_rows(out: Path, model: str) -> dict[str, dict[str, str]]:
    """locust's `<prefix>_stats.csv`, by the request name column."""
    with open(out / f"{model}-steady_stats.csv", newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def slo_report(out: Path, model: str) -> dict:
    return json.loads((out / f"{model}-steady_slo.json").read_text())


def require_served(server: TritonServer, model: str) -> None:
    state = server.models().get(model)
    if state != "READY":
        pytest.skip(f"{model} is not served by this session's server (state {state}; KILN_TEST_MODELS?)")


@pytest.mark.parametrize("model", SUITES)
def test_smoke_run_meets_its_gates_with_every_answer_checked(
    server: TritonServer, tmp_path: Path, model: str
) -> None:
    require_served(server, model)
    result = run_suite(server, tmp_path, model)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "SLO: PASS (every gate met)" in output

    rows = stats_rows(tmp_path, model)
    for transport in ("http", "grpc"):
        row = rows[f"{model} [{transport}]"]
        assert int(row["Request Count"]) > 0, f"no {transport} request was sent: {row}"
        assert int(row["Failure Count"]) == 0, row
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0

    report = slo_report(tmp_path, model)
    assert report["passed"] is True
    assert {v["gate"] for v in report["verdicts"]} == {"p95_ms", "p99_ms", "max_failure_ratio", "min_rps"}
    assert all(v["passed"] for v in report["verdicts"]), report["verdicts"]
    # Every answer was checked, against the in-process reference's answers.
    # (locust writes its CSV when the load stops; requests then in flight complete after it.)
    assert report["content_checks"] == {"passed": report["locust_requests"], "failed": 0}
    assert report["locust_requests"] >= int(total["Request Count"])
    assert re.search(r"expected answers from kiln\.[\w.]*reference", report["inputs"]), report["inputs"]


def test_a_missed_p99_gate_exits_non_zero_and_says_by_how_much(server: TritonServer, tmp_path: Path) -> None:
    require_served(server, tensors.FRAUD_SCORER)
    result = run_suite(
        server, tmp_path, tensors.FRAUD_SCORER, "--gate", "p99_ms=0.001", "--no-reference", *SHORT_RUN
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "MISS  p99 latency" in output
    assert "SLO: MISS: p99 latency over by" in output
    report = slo_report(tmp_path, tensors.FRAUD_SCORER)
    verdicts = {v["gate"]: v for v in report["verdicts"]}
    assert verdicts["p99_ms"]["passed"] is False and verdicts["p99_ms"]["measured"] > 0.001
    assert verdicts["max_failure_ratio"]["passed"] is True  # only the gate that missed is blamed


def test_a_wrong_answer_is_a_failed_request_and_fails_the_run(server: TritonServer, tmp_path: Path) -> None:
    require_served(server, tensors.FRAUD_SCORER)
    corpus = inputs.build(tensors.FRAUD_SCORER)
    first = corpus.items[0]
    assert first.expected is not None and "RECORD" in first.name
    score = first.expected[tensors.SCORE]
    # The reference's answer for one input, moved by 0.5: the served (right) answer must now fail.
    first.expected = {**first.expected, tensors.SCORE: np.where(score < 0.5, score + 0.5, score - 0.5)}
    inputs.save(corpus, tmp_path / "mix" / f"{tensors.FRAUD_SCORER}.pkl")

    result = run_suite(
        server, tmp_path / "out", tensors.FRAUD_SCORER, "--inputs", str(tmp_path / "mix"), *SHORT_RUN
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "MISS  failure ratio" in output
    rows = stats_rows(tmp_path / "out", tensors.FRAUD_SCORER)
    assert int(rows["Aggregated"]["Failure Count"]) > 0
    with open(tmp_path / "out" / f"{tensors.FRAUD_SCORER}-steady_failures.csv", newline="") as handle:
        errors = [row["Error"] for row in csv.DictReader(handle)]
    assert any("transaction #0 as RECORD" in e and "the reference's" in e for e in errors), errors
    report = slo_report(tmp_path / "out", tensors.FRAUD_SCORER)
    assert report["content_checks"]["failed"] > 0
