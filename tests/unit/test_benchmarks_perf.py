"""perf_analyzer's output as the benchmark reads it (`benchmarks.perf.parse_output`), and the
input files it writes for it. No perf_analyzer run: its stdout is given as text."""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from benchmarks import perf

SETTINGS = """\
*** Measurement Settings ***
  Batch size: 1
  Service Kind: TRITON
  Using "time_windows" mode for stabilization
  Stabilizing using average latency and throughput
  Measurement window: 2000 msec
  Using synchronous calls for inference

"""
ENSEMBLE_BLOCK = """\
Request concurrency: 32
  Client:
    Request count: 4873
    Throughput: 811.987 infer/sec
    p50 latency: 38211 usec
    p90 latency: 45002 usec
    p95 latency: 47118 usec
    p99 latency: 52990 usec
    Avg gRPC time: 39170 usec ((un)marshal request/response 12 usec + response wait 39158 usec)
  Server:
    Inference count: 4873
    Execution count: 4873
    Successful request count: 4873
    Avg request latency: 37000 usec (overhead 120 usec + queue 20000 usec + compute 16880 usec)

  Composing models:
  fraud_features, version: 1
      Inference count: 4880
      Execution count: 305
      Successful request count: 4880
      Avg request latency: 12000 usec (overhead 10 usec + queue 6000 usec + compute input 200 usec + compute infer 5700 usec + compute output 90 usec)

  fraud, version: 1
      Inference count: 4880
      Execution count: 160
      Successful request count: 4880
      Avg request latency: 25000 usec (overhead 20 usec + queue 14000 usec + compute input 300 usec + compute infer 10500 usec + compute output 180 usec)

"""
SUMMARY = """\
Inferences/Second vs. Client p95 Batch Latency
Concurrency: 32, throughput: 811.987 infer/sec, latency 47118 usec
"""


def _parse(text: str, mode: str = "concurrency") -> perf.PerfResult:
    result = perf.PerfResult("fraud_scorer", mode, 32)
    perf.parse_output("fraud_scorer", text, result)
    return result


def test_client_figures_come_from_the_measurement_block() -> None:
    result = _parse(SETTINGS + ENSEMBLE_BLOCK + SUMMARY)
    assert result.throughput == pytest.approx(811.987)
    assert (result.p50_ms, result.p90_ms, result.p95_ms, result.p99_ms) == pytest.approx(
        (38.211, 45.002, 47.118, 52.990)
    )


def test_the_ensembles_server_time_and_each_step_in_it() -> None:
    result = _parse(SETTINGS + ENSEMBLE_BLOCK + SUMMARY)
    assert result.server == perf.StepTime(
        model="fraud_scorer", total_us=37000, queue_us=20000, compute_input_us=None,
        compute_infer_us=16880, compute_output_us=None, overhead_us=120, inferences=4873, executions=4873,
    )  # fmt: skip
    assert [s.model for s in result.composing] == ["fraud_features", "fraud"]
    features, model = result.composing
    assert (features.total_us, features.queue_us, features.overhead_us) == (12000, 6000, 10)
    assert (features.compute_input_us, features.compute_infer_us, features.compute_output_us) == (
        200,
        5700,
        90,
    )
    assert (model.total_us, model.compute_infer_us) == (25000, 10500)


def test_the_average_batch_is_inferences_per_execution() -> None:
    result = _parse(SETTINGS + ENSEMBLE_BLOCK + SUMMARY)
    features, model = result.composing
    assert features.average_batch == pytest.approx(4880 / 305)
    assert model.average_batch == pytest.approx(30.5)
    assert result.server is not None and result.server.average_batch == 1.0
    assert (
        perf.StepTime("m", 1, 0, None, None, None, 0, inferences=None, executions=None).average_batch is None
    )
    assert perf.StepTime("m", 1, 0, None, None, None, 0, inferences=10, executions=0).average_batch is None


def test_the_last_complete_block_is_the_measurement() -> None:
    earlier = ENSEMBLE_BLOCK.replace("811.987", "500.5").replace("52990", "99000")
    unfinished = "Request concurrency: 32\n  Client: \n    Request count: 12\n"
    result = _parse(SETTINGS + earlier + ENSEMBLE_BLOCK + unfinished)
    assert result.throughput == pytest.approx(811.987)
    assert result.p99_ms == pytest.approx(52.99)


def test_a_request_rate_block_without_composing_models() -> None:
    block = ENSEMBLE_BLOCK.split("\n  Composing models:")[0].replace(
        "Request concurrency: 32", "Request Rate: 800"
    )
    result = _parse(SETTINGS + block + "\n", mode="rate")
    assert result.throughput == pytest.approx(811.987)
    assert result.server is not None and result.server.total_us == 37000
    assert result.composing == []


def test_output_without_a_measurement_leaves_the_result_empty() -> None:
    result = _parse(SETTINGS + "Failed to obtain stable measurement within 4 measurement windows\n")
    assert (result.throughput, result.p99_ms, result.server, result.composing) == (None, None, None, [])


def test_exactly_one_of_concurrency_and_rate() -> None:
    with pytest.raises(ValueError, match="exactly one of concurrency and rate"):
        perf.run("m", "127.0.0.1:1", "in.json")
    with pytest.raises(ValueError, match="exactly one of concurrency and rate"):
        perf.run("m", "127.0.0.1:1", "in.json", concurrency=4, rate=10.0)


def test_input_file_entries(tmp_path: Path) -> None:
    path = perf.input_file(
        [
            {
                "amount": np.array([[1.5, 2.0, 3.0]], dtype=np.float32),
                "text": np.array([["a ticket"]], dtype=object),
                "image": np.array([[b"\xff\xd8\xff"]], dtype=object),
            }
        ],
        tmp_path / "sub" / "in.json",
    )
    (entry,) = json.loads(path.read_text())["data"]
    assert entry["amount"] == {"content": [1.5, 2.0, 3.0], "shape": [3]}  # batch dim removed
    assert entry["text"] == {"content": ["a ticket"], "shape": [1]}
    wire = base64.b64decode(entry["image"]["b64"])  # not UTF-8: the serialized BYTES tensor
    assert wire == struct.pack("<I", 3) + b"\xff\xd8\xff"
    assert entry["image"]["shape"] == [1]
