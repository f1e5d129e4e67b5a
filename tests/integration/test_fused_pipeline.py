"""fraud_scorer in the fused form on a real tritonserver, side by side with its ensemble form.

One temporary repository generated from the fraud specs (the built fraud model linked in) serves:
`fraud_scorer` in the fused form (one kiln_fused model), `fraud_scorer_ensemble` (the same spec in
the ensemble form, under another name), the step models (still generated and served on their
own), and `fraud_scorer_slow`, the fused form whose one batcher waits up to 2 s for 8 items so
that requests sent together share one execute(). Over HTTP and gRPC: the fused answers equal the
ensemble's and match the in-process PyTorch reference (`kiln.models.fraud.reference`) to 1e-5,
for RECORD and FEATURE_VALUES requests (both optional inputs); bad requests get exactly the
ensemble form's messages and status; a bad record in a shared batch fails alone; each step is
counted under its own name with the label `pipeline`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import paths, tensors
from kiln.models.fraud import pipeline as fraud_pipelines
from kiln.models.fraud import reference as reference_pipeline
from kiln.registry import by_name
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.serving.fused import FLUSH_INTERVAL_S
from kiln.spec import DynamicBatching, Fused, Variant

FUSED = tensors.FRAUD_SCORER
ENSEMBLE = f"{FUSED}_ensemble"
SLOW = f"{FUSED}_slow"
MAX_BATCH = fraud_pipelines.MAX_BATCH_SIZE
PROTOCOLS = ("http", "grpc")
SCORE_ATOL = 1e-5
REQUEST_SIZES = (1, 7, 64, MAX_BATCH)
INVALID_ARG = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
BATCH_ITEMS = 8
BATCH_WAIT_US = 2_000_000
METRICS_WAIT_S = 10.0
"""The per-step counters are pushed once a second (`kiln.serving.fused.FLUSH_INTERVAL_S`)."""


def specs() -> list[Any]:
    fraud = by_name("fraud")
    fraud = dataclasses.replace(fraud, build=dataclasses.replace(fraud.build, variants=(Variant("fp32"),)))
    scorer = fraud_pipelines.FRAUD_SCORER
    return [
        fraud,
        fraud_pipelines.FEATURES_SPEC,
        fraud_pipelines.THRESHOLD_SPEC,
        dataclasses.replace(scorer, name=FUSED, form="fused"),
        dataclasses.replace(scorer, name=ENSEMBLE, form="ensemble"),
        dataclasses.replace(
            scorer, name=SLOW, form="fused",
            fused=Fused(DynamicBatching(preferred_batch_sizes=(BATCH_ITEMS,), max_queue_delay_us=BATCH_WAIT_US)),
        ),
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    built = paths.model_repository() / "fraud" / "1"
    if not (built / "model.onnx").is_file():
        pytest.fail(f"the fraud model is not built ({built} holds no model.onnx); run `make build-engines` first")
    repository = tmp_path_factory.mktemp("fused_fraud")
    generate(specs(), repository, backends=paths.available_backends())
    (repository / "fraud" / "1").mkdir()
    for path in built.iterdir():
        if path.is_file():
            (repository / "fraud" / "1" / path.name).symlink_to(path.resolve())
    log = tmp_path_factory.mktemp("fused_log") / "tritonserver.log"
    with TritonServer(
        repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, log_file=log
    ) as running:
        yield running


@pytest.fixture(scope="module")
def published() -> Any:
    return reference_pipeline.published_threshold()


@pytest.fixture(scope="module")
def reference(published) -> reference_pipeline.TorchReference:
    return reference_pipeline.TorchReference.load(threshold=published.threshold)


@pytest.fixture(scope="module")
def held_out(reference) -> list[dict[str, float]]:
    """The first 256 held-out records and the flagged ones among the first 3000."""
    items = list(reference_pipeline.records(3000))
    flagged = np.flatnonzero(reference.score(items).decisions[:, 0])
    return items[:256] + [items[i] for i in flagged if i >= 256]


@pytest.fixture(params=PROTOCOLS)
def protocol(request) -> str:
    return request.param


def client_of(server: TritonServer, protocol: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


@pytest.fixture
def client(server: TritonServer, protocol: str) -> Iterator[Any]:
    client = client_of(server, protocol)
    yield client
    client.close()


def module_of(client: Any) -> Any:
    return httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient


def record_input(module: Any, items: Sequence[dict[str, float] | bytes]) -> Any:
    data = np.empty((len(items), 1), dtype=object)
    data[:, 0] = [i if isinstance(i, bytes) else reference_pipeline.encode(i) for i in items]
    tensor = module.InferInput(tensors.RECORD, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def values_input(module: Any, values: np.ndarray) -> Any:
    tensor = module.InferInput(tensors.FEATURE_VALUES, list(values.shape), "FP32")
    tensor.set_data_from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return tensor


def infer(client: Any, model: str, inputs: list) -> tuple[np.ndarray, np.ndarray]:
    module = module_of(client)
    outputs = [module.InferRequestedOutput(tensors.SCORE), module.InferRequestedOutput(tensors.DECISION)]
    result = client.infer(model, inputs, outputs=outputs)
    return result.as_numpy(tensors.SCORE), result.as_numpy(tensors.DECISION)


def chunks(count: int) -> Iterator[slice]:
    start, k = 0, 0
    while start < count:
        size = REQUEST_SIZES[k % len(REQUEST_SIZES)]
        yield slice(start, min(start + size, count))
        start, k = start + size, k + 1


def assert_matches_reference(
    scores: np.ndarray, decisions: np.ndarray, expected: reference_pipeline.Scored, threshold: float
) -> None:
    assert scores.dtype == np.float32 and decisions.dtype == np.bool_
    assert scores.shape == decisions.shape == expected.scores.shape
    np.testing.assert_allclose(scores, expected.scores, rtol=0, atol=SCORE_ATOL)
    assert np.array_equal(decisions, scores >= np.float32(threshold))
    clear = np.abs(expected.scores - threshold) > SCORE_ATOL
    assert np.array_equal(decisions[clear], expected.decisions[clear])


def config_of(client: Any, model: str) -> dict[str, Any]:
    config = client.get_model_config(model)
    if not isinstance(config, dict):
        from google.protobuf.json_format import MessageToDict

        config = MessageToDict(config.config, preserving_proto_field_name=True)
    return config


def test_the_fused_model_has_the_pipelines_name_and_contract(client) -> None:
    fused, ensemble = config_of(client, FUSED), config_of(client, ENSEMBLE)
    assert fused["backend"] == "kiln_fused" and ensemble["platform"] == "ensemble"
    def contract(tensors: list) -> list:
        return [(t["name"], t["data_type"], [int(d) for d in t["dims"]], bool(t.get("optional"))) for t in tensors]

    for key in ("input", "output"):
        assert contract(fused[key]) == contract(ensemble[key])
    assert int(fused["max_batch_size"]) == int(ensemble["max_batch_size"]) == MAX_BATCH
    assert all(t.get("optional") for t in fused["input"])
    # The steps stay servable on their own.
    for step in (fraud_pipelines.FEATURES_MODEL, "fraud", fraud_pipelines.THRESHOLD_MODEL):
        assert client.is_model_ready(step), step


def test_records_equal_the_ensembles_and_match_the_reference(client, held_out, reference, published) -> None:
    module = module_of(client)
    fused = [infer(client, FUSED, [record_input(module, held_out[s])]) for s in chunks(len(held_out))]
    ensemble = [infer(client, ENSEMBLE, [record_input(module, held_out[s])]) for s in chunks(len(held_out))]
    scores, decisions = (np.concatenate([p[i] for p in fused]) for i in (0, 1))
    assert np.array_equal(scores, np.concatenate([p[0] for p in ensemble]))
    assert np.array_equal(decisions, np.concatenate([p[1] for p in ensemble]))
    expected = reference.score(held_out)
    assert expected.decisions.any() and not expected.decisions.all()
    assert_matches_reference(scores, decisions, expected, published.threshold)


def test_feature_values_equal_the_ensembles_and_match_the_reference(client, held_out, reference, published) -> None:
    module = module_of(client)
    names = reference.stats.names
    values = np.array([[r[n] for n in names] for r in held_out], dtype=np.float32)
    fused = [infer(client, FUSED, [values_input(module, values[s])]) for s in chunks(len(values))]
    ensemble = [infer(client, ENSEMBLE, [values_input(module, values[s])]) for s in chunks(len(values))]
    scores, decisions = (np.concatenate([p[i] for p in fused]) for i in (0, 1))
    assert np.array_equal(scores, np.concatenate([p[0] for p in ensemble]))
    assert np.array_equal(decisions, np.concatenate([p[1] for p in ensemble]))
    assert_matches_reference(scores, decisions, reference.score_values(values), published.threshold)


def _without(record: dict[str, float], name: str) -> bytes:
    return json.dumps({k: v for k, v in record.items() if k != name}).encode()


def _with(record: dict[str, float], **changes: Any) -> bytes:
    return json.dumps({**record, **changes}).encode()


def _values(record: dict[str, float], **changes: float) -> np.ndarray:
    return np.array([[{**record, **changes}[n] for n in record]], dtype=np.float32)


BAD_REQUESTS = [
    ("missing-feature", lambda m, r: [record_input(m, [r[0], _without(r[1], "hour")])]),
    ("nan", lambda m, r: [record_input(m, [_with(r[0], merchant_risk=float("nan"))])]),
    ("unknown-feature", lambda m, r: [record_input(m, [_with(r[0], country=1.0)])]),
    ("string", lambda m, r: [record_input(m, [_with(r[0], amount="12")])]),
    ("not-json", lambda m, r: [record_input(m, [b"amount=12"])]),
    ("both-inputs", lambda m, r: [record_input(m, r[:1]), values_input(m, _values(r[0]))]),
    ("infinite-value", lambda m, r: [values_input(m, _values(r[0], hour=float("inf")))]),
]


@pytest.mark.parametrize("make", [c[1] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_a_bad_request_gets_the_ensemble_forms_message(client, protocol, held_out, make) -> None:
    module = module_of(client)
    caught = {}
    for model in (FUSED, ENSEMBLE):
        with pytest.raises(InferenceServerException) as error:
            infer(client, model, make(module, held_out))
        caught[model] = error.value
    fused, ensemble = caught[FUSED], caught[ENSEMBLE]
    assert fused.message() == ensemble.message().replace(f"in ensemble '{ENSEMBLE}', ", f"in ensemble '{FUSED}', ")
    assert fused.message().startswith(f"in ensemble '{FUSED}', ")
    assert str(fused.status()) == str(ensemble.status()) == INVALID_ARG[protocol]


def test_a_request_with_neither_input_is_refused_by_triton(client, protocol) -> None:
    """Both inputs are optional, so a request may send none: Triton refuses it before any kiln code
    runs, in both forms, with the same words; only the ensemble form's carries the ensemble's
    prefix (measured: "in ensemble '<name>', [request id: <id_unknown>] out of bounds index 0:
    request has 0 inputs" vs the same without the prefix)."""
    messages = {}
    for model in (FUSED, ENSEMBLE):
        with pytest.raises(InferenceServerException) as error:
            client.infer(model, [])
        messages[model] = error.value.message()
        assert str(error.value.status()) == INVALID_ARG[protocol], (model, error.value.message())
    assert "request has 0 inputs" in messages[FUSED]
    assert messages[ENSEMBLE] == f"in ensemble '{ENSEMBLE}', " + messages[FUSED]


def _batch_stats(client: Any, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model)
    if not isinstance(stats, dict):
        from google.protobuf.json_format import MessageToDict

        stats = MessageToDict(stats, preserving_proto_field_name=True)
    entry = stats["model_stats"][0]
    return int(entry.get("execution_count", 0)), int(entry.get("inference_count", 0))


def test_bad_records_in_a_shared_batch_fail_alone(server, protocol, held_out, reference, published) -> None:
    module = httpclient if protocol == "http" else grpcclient
    requests = [
        [record_input(module, held_out[0:1])],
        [record_input(module, [_without(held_out[1], "account_age_days")])],
        [record_input(module, held_out[2:5])],
        [record_input(module, [_with(held_out[5], distance_km=float("inf"))])],
        [record_input(module, held_out[6:7])],
        [record_input(module, held_out[7:8])],
    ]
    assert sum(r[0].shape()[0] for r in requests) == BATCH_ITEMS

    def send(inputs: list) -> Any:
        client = client_of(server, protocol)
        try:
            return infer(client, SLOW, inputs)
        except InferenceServerException as error:
            return error
        finally:
            client.close()

    stats_client = client_of(server, protocol)
    before = _batch_stats(stats_client, SLOW)
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        results = list(pool.map(send, requests))
    after = _batch_stats(stats_client, SLOW)
    stats_client.close()

    assert after == (before[0] + 1, before[1] + BATCH_ITEMS), "the requests did not share one batch"
    assert isinstance(results[1], InferenceServerException)
    assert results[1].message().startswith(
        f"in ensemble '{SLOW}', input 'record' item 0: missing feature(s) 'account_age_days'"
    ), results[1].message()
    assert str(results[1].status()) == INVALID_ARG[protocol]
    assert isinstance(results[3], InferenceServerException)
    assert results[3].message() == (
        f"in ensemble '{SLOW}', input 'record' item 0: feature 'distance_km' must be a finite number, got Infinity"
    ), results[3].message()
    expected = reference.score(held_out[:8])
    for index, rows in ((0, slice(0, 1)), (2, slice(2, 5)), (4, slice(6, 7)), (5, slice(7, 8))):
        scores, decisions = results[index]  # an exception here would be a good request failing
        part = reference_pipeline.Scored(expected.scores[rows], expected.decisions[rows])
        assert_matches_reference(scores, decisions, part, published.threshold)


def test_each_step_is_counted_under_its_own_name_with_the_pipeline_label(server, held_out) -> None:
    time.sleep(FLUSH_INTERVAL_S + 0.5)  # the earlier tests' counts are pushed by now
    client = client_of(server, "grpc")
    try:
        module = grpcclient
        before = {
            step: server.metric("kiln_step_requests_total", model=step, pipeline=FUSED)
            for step in (fraud_pipelines.FEATURES_MODEL, "fraud", fraud_pipelines.THRESHOLD_MODEL)
        }
        failures_before = server.metric(
            "kiln_step_failures_total", model=fraud_pipelines.FEATURES_MODEL, pipeline=FUSED,
            reason="missing_feature",
        )
        for _ in range(3):
            infer(client, FUSED, [record_input(module, held_out[:2])])
        with pytest.raises(InferenceServerException):
            infer(client, FUSED, [record_input(module, [_without(held_out[0], "hour")])])
    finally:
        client.close()
    deadline = time.monotonic() + METRICS_WAIT_S
    while True:
        now = {step: server.metric("kiln_step_requests_total", model=step, pipeline=FUSED) for step in before}
        failures = server.metric(
            "kiln_step_failures_total", model=fraud_pipelines.FEATURES_MODEL, pipeline=FUSED,
            reason="missing_feature",
        )
        done = now[fraud_pipelines.FEATURES_MODEL] - before[fraud_pipelines.FEATURES_MODEL] >= 4
        if (done and failures > failures_before) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert now[fraud_pipelines.FEATURES_MODEL] - before[fraud_pipelines.FEATURES_MODEL] == 4
    assert now["fraud"] - before["fraud"] == 3
    assert now[fraud_pipelines.THRESHOLD_MODEL] - before[fraud_pipelines.THRESHOLD_MODEL] == 3
    assert failures == failures_before + 1
    assert server.metric("kiln_step_duration_us_total", model="fraud", pipeline=FUSED) > 0
    # The fused model as a whole, counted by the adapter, beside its steps.
    assert server.metric("kiln_step_requests_total", model=FUSED) >= 4


def test_the_models_own_counts_arrive_within_the_interval_and_failures_at_once(server, held_out) -> None:
    # The adapter counts in memory (no round trip to the server per batch) and a thread pushes
    # the sums within FLUSH_INTERVAL_S; a batch with a failed request is pushed before its error
    # leaves, with every count before it (kiln.serving.adapter.StepCounters).
    time.sleep(FLUSH_INTERVAL_S + 0.5)  # the earlier tests' counts are pushed by now
    requests_before = server.metric("kiln_step_requests_total", model=FUSED)
    batches_before = server.metric("kiln_step_batches_total", model=FUSED)
    failures_before = server.metric("kiln_step_failures_total", model=FUSED, reason="missing_feature")
    client = client_of(server, "grpc")
    try:
        for _ in range(3):
            infer(client, FUSED, [record_input(grpcclient, held_out[:2])])
        with pytest.raises(InferenceServerException):
            infer(client, FUSED, [record_input(grpcclient, [_without(held_out[0], "hour")])])
        # No waiting: the failure and the three requests before it are on /metrics already.
        assert server.metric("kiln_step_failures_total", model=FUSED, reason="missing_feature") == failures_before + 1
        assert server.metric("kiln_step_requests_total", model=FUSED) == requests_before + 4
        assert server.metric("kiln_step_batches_total", model=FUSED) == batches_before + 4
        for _ in range(2):
            infer(client, FUSED, [record_input(grpcclient, held_out[:1])])
    finally:
        client.close()
    deadline = time.monotonic() + METRICS_WAIT_S
    while server.metric("kiln_step_requests_total", model=FUSED) < requests_before + 6 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("kiln_step_requests_total", model=FUSED) == requests_before + 6
    assert server.metric("kiln_step_batches_total", model=FUSED) == batches_before + 6
