"""What a kiln step adds to Triton's floor: no metrics round trip on the success path, and no
count lost.

Each increment of a Triton custom metric is a round trip from the stub to the server (about
0.1 ms here, docs/performance.md), so the adapter (`kiln.serving.adapter.python_model`) counts in
memory and a thread pushes the sums (`CounterBuffer`); a batch with a failed request is pushed at
once, and finalize pushes what is left. These tests run the adapter's real `TritonPythonModel`
with a stand-in for the stub's `triton_python_backend_utils` module (which exists only inside
Triton's stub process) that records every increment; the real server's behaviour is tested in
tests/integration/test_fused_pipeline.py and test_digits.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiln.serving.adapter import CounterBuffer, LoadContext, python_model
from kiln.serving.batch import RequestError

MODEL = "a_step"
LABELS = (("model", MODEL),)


class FakeTriton(types.ModuleType):
    """The parts of triton_python_backend_utils the adapter uses; each metric increment is
    recorded (a round trip to the server in the real stub)."""

    def __init__(self) -> None:
        super().__init__("triton_python_backend_utils")
        self.values: dict[tuple[str, tuple], float] = {}
        self.increments = 0
        fake = self

        class TritonError(Exception):
            INVALID_ARG = "INVALID_ARG"

            def __init__(self, message: str, code: str = "INTERNAL") -> None:
                super().__init__(message)
                self.code = code

        class Family:
            COUNTER = "counter"

            def __init__(self, name: str, description: str, kind: str) -> None:
                self.name = name

            def Metric(self, labels: dict) -> Any:  # noqa: N802 (pb_utils' name)
                key = (self.name, tuple(sorted(labels.items())))

                class Metric:
                    def increment(self, value: float) -> None:
                        fake.increments += 1
                        fake.values[key] = fake.values.get(key, 0.0) + value

                return Metric()

        class InferenceResponse:
            def __init__(self, output_tensors: Sequence[Any] = (), error: Any = None) -> None:
                self.outputs = {t.name: t.array for t in output_tensors}
                self.error = error

        class Tensor:
            def __init__(self, name: str, array: np.ndarray) -> None:
                self.name, self.array = name, array

        self.TritonError = TritonError
        self.MetricFamily = Family
        self.InferenceResponse = InferenceResponse
        self.Tensor = Tensor

    @staticmethod
    def get_input_tensor_by_name(request: dict, name: str) -> Any:
        array = request.get(name)
        return None if array is None else types.SimpleNamespace(as_numpy=lambda: array)

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)


class Doubler:
    """A step: doubles `x`; a negative value fails its own request (reason "negative")."""

    def __init__(self) -> None:
        self.closed = False

    def run(self, requests: Sequence[dict]) -> list[Any]:
        results: list[Any] = []
        for request in requests:
            x = request["x"]
            if (x < 0).any():
                error = RequestError("input 'x' is negative")
                error.reason = "negative"  # type: ignore[attr-defined]
                results.append(error)
            else:
                results.append({"y": x * 2})
        return results

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> FakeTriton:
    fake = FakeTriton()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    return fake


def served(tmp_path: Path, step: Doubler) -> Any:
    """An initialized TritonPythonModel running `step`."""
    (tmp_path / MODEL / "1").mkdir(parents=True)
    model = python_model(lambda context: step)()
    model.initialize({
        "model_config": json.dumps({"name": MODEL, "input": [{"name": "x"}]}),
        "model_repository": str(tmp_path / MODEL),
        "model_name": MODEL,
        "model_version": "1",
    })
    return model


def good(value: float = 1.0) -> dict:
    return {"x": np.full((1, 2), value, np.float32)}


def test_a_batch_that_succeeds_sends_nothing_to_the_server(pb_utils: FakeTriton, tmp_path: Path) -> None:
    model = served(tmp_path, Doubler())
    for _ in range(5):
        responses = model.execute([good(1.0), good(2.0)])
        assert [r.outputs["y"].tolist() for r in responses] == [[[2.0, 2.0]], [[4.0, 4.0]]]
    assert pb_utils.increments == 0  # no round trip on the request path
    model.metrics.buffer.flush()
    assert pb_utils.get("kiln_step_requests_total", model=MODEL) == 10
    assert pb_utils.get("kiln_step_batches_total", model=MODEL) == 5
    assert pb_utils.get("kiln_step_duration_us_total", model=MODEL) > 0
    assert pb_utils.increments == 3  # one per series, whatever the number of batches
    model.finalize()


def test_a_failed_request_is_on_the_metrics_before_its_error_leaves(pb_utils: FakeTriton, tmp_path: Path) -> None:
    model = served(tmp_path, Doubler())
    model.execute([good()])
    responses = model.execute([good(), good(-1.0)])
    assert responses[0].error is None and responses[0].outputs["y"].tolist() == [[2.0, 2.0]]
    assert str(responses[1].error) == "input 'x' is negative"
    assert responses[1].error.code == "INVALID_ARG"
    # Pushed at once, with every count before it: exact when the client sees the error.
    assert pb_utils.get("kiln_step_failures_total", model=MODEL, reason="negative") == 1
    assert pb_utils.get("kiln_step_requests_total", model=MODEL) == 3
    assert pb_utils.get("kiln_step_batches_total", model=MODEL) == 2
    model.finalize()


def test_finalize_pushes_what_is_left_and_closes_the_step(pb_utils: FakeTriton, tmp_path: Path) -> None:
    step = Doubler()
    model = served(tmp_path, step)
    model.execute([good()] * 3)
    assert pb_utils.increments == 0
    thread = model.metrics.buffer._thread
    assert thread is not None and thread.is_alive()
    model.finalize()
    assert pb_utils.get("kiln_step_requests_total", model=MODEL) == 3
    assert step.closed
    assert not thread.is_alive()


def test_a_step_that_raises_fails_its_batch_and_is_counted(pb_utils: FakeTriton, tmp_path: Path) -> None:
    class Broken(Doubler):
        def run(self, requests: Sequence[dict]) -> list[Any]:
            raise MemoryError("out of memory")

    model = served(tmp_path, Broken())
    responses = model.execute([good(), good()])
    assert [str(r.error) for r in responses] == ["step failed on a batch of 2: out of memory"] * 2
    assert pb_utils.get("kiln_step_failures_total", model=MODEL, reason="internal") == 2
    model.finalize()


def wait_for_requests(pb_utils: FakeTriton, count: int, timeout_s: float = 5.0) -> None:
    """Until the pushed kiln_step_requests_total reaches `count` (the buffer's thread pushes it), or
    `timeout_s`; the caller asserts the count."""
    deadline = time.monotonic() + timeout_s
    while pb_utils.get("kiln_step_requests_total", model=MODEL) < count and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_thread_pushes_within_the_interval_and_sums(pb_utils: FakeTriton) -> None:
    buffer = CounterBuffer(pb_utils, MODEL, interval=0.01)
    for _ in range(100):
        buffer.add([("kiln_step_requests_total", LABELS, 1)])
    wait_for_requests(pb_utils, 100)
    buffer.close()
    assert pb_utils.get("kiln_step_requests_total", model=MODEL) == 100


def test_no_count_is_lost_while_batches_and_pushes_interleave(pb_utils: FakeTriton) -> None:
    buffer = CounterBuffer(pb_utils, MODEL, interval=0.001)
    adders = [
        threading.Thread(target=lambda: [buffer.add([("kiln_step_requests_total", LABELS, 1)]) for _ in range(5000)])
        for _ in range(4)
    ]
    for adder in adders:
        adder.start()
    for adder in adders:
        adder.join()
    buffer.close()
    assert pb_utils.get("kiln_step_requests_total", model=MODEL) == 20_000


def test_a_failing_push_does_not_stop_the_thread(pb_utils: FakeTriton) -> None:
    buffer = CounterBuffer(pb_utils, MODEL, interval=0.01)
    buffer.add([("kiln_step_unknown_total", LABELS, 1)])  # no such family: that push raises
    time.sleep(0.05)
    buffer.add([("kiln_step_requests_total", LABELS, 2)])
    wait_for_requests(pb_utils, 2)
    buffer.close()
    assert pb_utils.get("kiln_step_requests_total", model=MODEL) == 2


def test_without_the_metrics_api_nothing_is_counted_and_no_thread_runs() -> None:
    buffer = CounterBuffer(object(), MODEL)
    buffer.add([("kiln_step_requests_total", LABELS, 1)])
    assert not buffer.enabled and buffer._thread is None
    buffer.close()


def test_the_context_names_the_model(pb_utils: FakeTriton, tmp_path: Path) -> None:
    seen: list[LoadContext] = []
    (tmp_path / MODEL / "1").mkdir(parents=True)
    model = python_model(lambda context: seen.append(context) or Doubler())()
    model.initialize({
        "model_config": json.dumps({"name": MODEL, "input": [{"name": "x"}]}),
        "model_repository": str(tmp_path / MODEL), "model_name": MODEL, "model_version": "1",
    })
    assert seen[0].model_name == MODEL and seen[0].version_dir == tmp_path / MODEL / "1"
    model.finalize()
