"""Model updates without downtime, on a real tritonserver in explicit model-control mode (issue 7,
item 2).

A temporary repository holds `adder`, a kiln_onnx model whose version folders are told apart by
their answer (version v computes y = x + v), with its config generated from a `ModelSpec` and its
version policy (kiln.spec.VersionPolicy), and `queued`, the same model behind a dynamic batcher
that holds requests up to 2 s (so that requests are surely in flight when it is unloaded).

- A new version is published (its folder written aside, then renamed into place) and loaded
  through the repository API while client threads (kiln.clients, HTTP and gRPC, retries off so
  that nothing is hidden) send requests without pause: no request fails, every answer matches the
  version that reports it, every request sent after the load returned is answered by the new
  version, and the same client objects see the switch.
- A version policy pins the previous version back (a rollback) under the same load, again with
  no failed request; with the "all" policy both versions are served and a client picks one.
- Unloading a model with requests in flight lets them finish: all succeed, a request sent after
  the unload is told the model has no available version.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from kiln import paths
from kiln.clients import Client, ModelNotReadyError, RetryPolicy
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.spec import DynamicBatching, ModelSpec, TensorSpec, VersionPolicy

ADDER = "adder"
QUEUED = "queued"
INPUT, OUTPUT = "x", "y"
FEATURES = 4
MAX_BATCH = 8
ONNX_OPSET = 13
ONNX_IR_VERSION = 8
STEP_DELAY_US = 2000
HOLD_US = 2_000_000
"""`queued` waits this long for a full batch: requests sent together stay in flight."""
IN_FLIGHT = 5
SENDERS_PER_CLIENT = 2
WARM_S = 1.0
"""Load before and after each switch (at least; then until each client has MIN_ANSWERS)."""
MIN_ANSWERS = 5
SETTLE_TIMEOUT_S = 30.0
NEVER_RETRY = RetryPolicy.disabled()


def write_adder_onnx(path: Path, constant: float) -> None:
    """An ONNX model y = x + constant (float32 [batch, FEATURES])."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, FEATURES])
    y = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, [None, FEATURES])
    add = helper.make_tensor("constant", TensorProto.FLOAT, [1], [constant])
    graph = helper.make_graph([helper.make_node("Add", [INPUT, "constant"], [OUTPUT])], "adder", [x], [y],
                              initializer=[add])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


def spec(name: str, policy: VersionPolicy | None, batching: DynamicBatching) -> ModelSpec:
    return ModelSpec(
        name=name,
        backend="kiln_onnx",
        inputs=(TensorSpec(INPUT, "FP32", (FEATURES,)),),
        outputs=(TensorSpec(OUTPUT, "FP32", (FEATURES,)),),
        max_batch_size=MAX_BATCH,
        dynamic_batching=batching,
        version_policy=policy,
    )


ADDER_SPEC = spec(ADDER, VersionPolicy.latest(1), DynamicBatching(max_queue_delay_us=STEP_DELAY_US))
QUEUED_SPEC = spec(QUEUED, None, DynamicBatching(preferred_batch_sizes=(MAX_BATCH,), max_queue_delay_us=HOLD_US))


def publish(repository: Path, model: str, version: int) -> None:
    """Writes version `version` aside, then renames it into place, so Triton never reads a half
    written folder (a name that is not a number is not a version to it)."""
    staging = repository / model / f"staging-{version}"
    write_adder_onnx(staging / "model.onnx", float(version))
    os.rename(staging, repository / model / str(version))


def regenerate(repository: Path, *specs: ModelSpec) -> None:
    generate(list(specs), repository, backends=paths.available_backends())


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("updates")
    regenerate(root, ADDER_SPEC, QUEUED_SPEC)
    for model in (ADDER, QUEUED):
        write_adder_onnx(root / model / "1" / "model.onnx", 1.0)
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(
        repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT,
        model_control_mode="explicit", load_models=[ADDER, QUEUED],
        log_file=tmp_path_factory.mktemp("updates-log") / "tritonserver.log",
    ) as running:
        yield running


class Answer(NamedTuple):
    sent: float
    done: float
    version: str | None
    added: float | None
    error: Exception | None


class Traffic:
    """Client threads sending `adder` requests without pause, through clients made once."""

    def __init__(self, server: TritonServer, version: str = "") -> None:
        self.clients = [
            Client(f"http://{server.http_url}", retry=NEVER_RETRY),
            Client(f"grpc://{server.grpc_url}", retry=NEVER_RETRY),
        ]
        self.version = version
        self.answers: dict[int, list[Answer]] = {i: [] for i in range(len(self.clients))}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, args=(i, k), daemon=True)
            for i in range(len(self.clients)) for k in range(SENDERS_PER_CLIENT)
        ]

    def _send(self, index: int, seed: int) -> None:
        client = self.clients[index]
        rng = np.random.default_rng(seed)
        while not self._stop.is_set():
            x = rng.random((1, FEATURES), dtype=np.float32)
            sent = time.monotonic()
            try:
                result = client.infer(ADDER, {INPUT: x}, version=self.version)
                added = result[OUTPUT] - x
                assert np.allclose(added, added[0, 0]), added
                answer = Answer(sent, time.monotonic(), result.model_version, float(added[0, 0]), None)
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                answer = Answer(sent, time.monotonic(), None, None, error)
            self.answers[index].append(answer)

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(SETTLE_TIMEOUT_S)
        for client in self.clients:
            client.close()

    def all(self) -> list[Answer]:
        return [a for answers in self.answers.values() for a in answers]

    def wait_for_answers(self, after: float, count: int = MIN_ANSWERS) -> None:
        """Waits until every client has `count` answers to requests sent after `after` (an
        observable state, so that a slow machine cannot leave a client without one)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while time.monotonic() < deadline:
            if all(
                sum(a.sent > after for a in list(answers)) >= count for answers in self.answers.values()
            ):
                return
            time.sleep(0.05)
        pytest.fail(f"a client got fewer than {count} answers within {SETTLE_TIMEOUT_S} s")


def switch_under_load(server: TritonServer, change) -> tuple[Traffic, float]:
    """Runs `change()` while traffic flows; returns the traffic and when `change` returned."""
    with Traffic(server) as traffic:
        time.sleep(WARM_S)
        traffic.wait_for_answers(after=0.0)
        change()
        switched = time.monotonic()
        time.sleep(WARM_S)
        traffic.wait_for_answers(after=switched)
    return traffic, switched


def check_switch(traffic: Traffic, switched: float, old: str, new: str) -> None:
    answers = traffic.all()
    failed = [a.error for a in answers if a.error is not None]
    summary = f"{len(answers)} requests, {len(failed)} failed"
    print(f"\nswitch {old} -> {new}: {summary}")
    assert not failed, f"{summary}: {failed[:3]}"
    for answer in answers:  # every answer is the arithmetic of the version that reports it
        assert answer.added == pytest.approx(float(answer.version)), answer
    assert {a.version for a in answers} <= {old, new}
    after = [a for a in answers if a.sent > switched]
    assert after and {a.version for a in after} == {new}, "a request sent after the switch got the old version"
    for index, per_client in traffic.answers.items():  # each client object saw both versions
        assert {a.version for a in per_client} == {old, new}, f"client {index}"


def served_versions(server: TritonServer, model: str) -> set[str]:
    """Versions whose stub processes run, once Triton has settled (the old stubs exit)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        versions = {p.version for p in server.backend_processes() if p.alive and p.model == model}
        if len(versions) <= 1 or time.monotonic() > deadline:
            return versions
        time.sleep(0.1)


def test_a_new_version_is_served_without_a_failed_request(server: TritonServer, repository: Path) -> None:
    with Client(f"grpc://{server.grpc_url}") as client:
        assert client.infer(ADDER, {INPUT: np.zeros((1, FEATURES), np.float32)}).model_version == "1"
    traffic, switched = switch_under_load(
        server, lambda: (publish(repository, ADDER, 2), server.load_model(ADDER))
    )
    check_switch(traffic, switched, "1", "2")
    assert served_versions(server, ADDER) == {"2"}  # latest(1): version 1 was unloaded
    assert server.crashed_backends() == []


def test_a_version_policy_pins_a_version_back_under_load(server: TritonServer, repository: Path) -> None:
    if not (repository / ADDER / "2").is_dir():
        publish(repository, ADDER, 2)
        server.load_model(ADDER)
    # "all": both versions served; the default is the highest, a client may name one.
    regenerate(repository, dataclasses.replace(ADDER_SPEC, version_policy=VersionPolicy.all()), QUEUED_SPEC)
    server.load_model(ADDER)
    with Client(f"http://{server.http_url}", retry=NEVER_RETRY) as client:
        x = np.zeros((1, FEATURES), np.float32)
        assert client.infer(ADDER, {INPUT: x}).model_version == "2"
        pinned = client.infer(ADDER, {INPUT: x}, version="1")
        assert (pinned.model_version, float(pinned[OUTPUT][0, 0])) == ("1", 1.0)
    # "specific 1": roll back to version 1 while requests flow.
    rollback = dataclasses.replace(ADDER_SPEC, version_policy=VersionPolicy.specific(1))
    traffic, switched = switch_under_load(
        server, lambda: (regenerate(repository, rollback, QUEUED_SPEC), server.load_model(ADDER))
    )
    check_switch(traffic, switched, "2", "1")
    assert served_versions(server, ADDER) == {"1"}


def test_unloading_a_model_drains_its_in_flight_requests(server: TritonServer) -> None:
    results: dict[int, object] = {}

    def call(i: int) -> None:
        with Client(f"grpc://{server.grpc_url}", retry=NEVER_RETRY) as client:
            try:
                results[i] = float(client.infer(QUEUED, {INPUT: np.full((1, FEATURES), i, np.float32)})[OUTPUT][0, 0])
            except Exception as error:  # noqa: BLE001 - asserted below
                results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(IN_FLIGHT)]
    for thread in threads:
        thread.start()
    # An observable state, not a sleep: all of them wait in the batcher's queue (it holds them
    # up to HOLD_US for a batch of MAX_BATCH, which they never fill). Triton's pending-request
    # gauge is updated as requests enter and leave the queue.
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while (queued := server.metric("nv_inference_pending_request_count", model=QUEUED)) < IN_FLIGHT and time.monotonic() < deadline:
        time.sleep(0.01)
    assert queued == IN_FLIGHT and not results, (queued, results)
    server.unload_model(QUEUED)
    with Client(f"http://{server.http_url}", retry=NEVER_RETRY) as client:
        with pytest.raises(ModelNotReadyError, match=f"'{QUEUED}' has no available versions"):
            client.infer(QUEUED, {INPUT: np.zeros((1, FEATURES), np.float32)}, validate=False)
    for thread in threads:
        thread.join(SETTLE_TIMEOUT_S)
    # Queued when the unload began, and every one answered right: the unload drained them.
    assert results == {i: i + 1.0 for i in range(IN_FLIGHT)}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while server.models()[QUEUED] != "UNAVAILABLE" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.models()[QUEUED] == "UNAVAILABLE"
    assert not [p for p in server.backend_processes() if p.model == QUEUED]
