"""The digits model end to end on a real tritonserver, over HTTP and gRPC.

The served model's predictions on the held-out split must equal the PyTorch model's wherever
PyTorch's top-1 class is decided within the build's tolerance (so its accuracy too, up to the
near-ties, which may go either way on another CPU); batched and
single requests must agree; malformed requests get clear errors and the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import paths, tensors
from kiln.build.check import assert_same_top1
from kiln.models.digits.build import load_split, load_trained
from kiln.registry import by_name
from kiln.repository import generate
from kiln.server import TritonServer
from kiln.spec import DynamicBatching, Variant

DIGITS = by_name("digits")
MODEL = DIGITS.name
MAX_BATCH = DIGITS.max_batch_size
PROTOCOLS = ("http", "grpc")


def make_client(server: TritonServer, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url, concurrency=8)
    return grpcclient.InferenceServerClient(server.grpc_url)


def infer(client, pixels: np.ndarray, *, name: str = tensors.DIGITS_PIXELS, model: str = MODEL):
    """Sends `pixels` as one request and returns the logits."""
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    tensor = module.InferInput(name, list(pixels.shape), _triton_dtype(pixels.dtype))
    tensor.set_data_from_numpy(pixels)
    result = client.infer(model, [tensor], outputs=[module.InferRequestedOutput(tensors.DIGITS_LOGITS)])
    return result.as_numpy(tensors.DIGITS_LOGITS)


def _triton_dtype(dtype: np.dtype) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(dtype)


@pytest.fixture(scope="module")
def split():
    return load_split(DIGITS.build.source)


@pytest.fixture(scope="module")
def reference(split) -> np.ndarray:
    """PyTorch logits of the trained checkpoint on the test split."""
    model = load_trained(DIGITS)
    with torch.no_grad():
        return model(torch.from_numpy(split.x_test)).numpy()


@pytest.fixture(params=PROTOCOLS)
def client(request, server: TritonServer) -> Iterator:
    client = make_client(server, request.param)
    yield client
    client.close()


def test_served_accuracy_equals_pytorch(client, split, reference: np.ndarray) -> None:
    chunks = [split.x_test[i : i + MAX_BATCH] for i in range(0, len(split.x_test), MAX_BATCH)]
    served = np.concatenate([infer(client, chunk) for chunk in chunks])

    served_accuracy = float(np.mean(served.argmax(axis=1) == split.y_test))
    tol = DIGITS.build.tolerance
    np.testing.assert_allclose(served, reference, atol=tol.atol, rtol=tol.rtol)
    # Equal predictions wherever PyTorch's top-1 is decided within the tolerance (a near-tie may
    # go either way on another CPU), so accuracies differ by at most the undecided share.
    undecided = assert_same_top1(served, reference, tol, labels=split.y_test)
    assert undecided <= 2, f"{undecided} near-ties: the comparison says little"
    assert served_accuracy > 0.95


def infer_concurrently(server: TritonServer, protocol: str, requests: list[np.ndarray]) -> list:
    """Sends each array as its own request, all at once, one client per sender (the HTTP client
    is gevent-based and must not be shared across threads). Errors are returned, not raised."""

    def send(pixels: np.ndarray):
        client = make_client(server, protocol)
        try:
            return infer(client, pixels)
        except InferenceServerException as error:
            return error
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_single_and_batched_requests_agree(server: TritonServer, protocol: str, split) -> None:
    images = split.x_test[:16]
    client = make_client(server, protocol)
    batched = infer(client, images)
    client.close()
    singles = [r[0] for r in infer_concurrently(server, protocol, [images[i : i + 1] for i in range(16)])]
    np.testing.assert_allclose(np.stack(singles), batched, atol=1e-5, rtol=1e-5)
    assert (np.stack(singles).argmax(1) == batched.argmax(1)).all()


@pytest.mark.parametrize(
    ("make_request", "message"),
    [
        (lambda x: {"pixels": x[:, 0]}, "unexpected shape for input 'pixels' for model 'digits'"),
        (lambda x: {"pixels": x.astype(np.float64)}, "inference input 'pixels' data-type is 'FP64', but model 'digits' expects 'FP32'"),
        (lambda x: {"pixels": np.concatenate([x] * 65)}, "batch-size must be <= 64"),
        (lambda x: {}, "expected 1 inputs but got 0 inputs for model 'digits'"),
        (lambda x: {"pixels": x, "extra": x}, "expected 1 inputs but got 2 inputs for model 'digits'. Got input(s) ['extra','pixels']"),
    ],
    ids=["wrong-shape", "wrong-dtype", "batch-over-max", "missing-input", "extra-input"],
)
def test_bad_request_gets_a_clear_error_and_the_server_keeps_serving(
    client, server: TritonServer, split, reference, make_request, message: str
) -> None:
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inputs = []
    for name, array in make_request(split.x_test[:1]).items():
        tensor = module.InferInput(name, list(array.shape), _triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as caught:
        client.infer(MODEL, inputs)
    assert message in caught.value.message()

    assert server.returncode is None, "tritonserver exited after a bad request"
    # still serving: the model's own answer (PyTorch's top class; the label could differ on a CPU
    # whose training went otherwise)
    assert infer(client, split.x_test[:1]).argmax() == reference[0].argmax()


def test_non_finite_input_is_rejected_by_the_backend(client, split) -> None:
    bad = split.x_test[:2].copy()
    bad[1, 0, 3, 3] = np.nan
    with pytest.raises(InferenceServerException) as caught:
        infer(client, bad)
    assert "input 'pixels' contains NaN or infinity (1 of 128 values)" in caught.value.message()
    # A client error, not a server fault: HTTP 400 / gRPC INVALID_ARGUMENT (was 500 / INTERNAL
    # while the backend looked TritonError up before the stub had attached it).
    assert caught.value.status() in ("400", "StatusCode.INVALID_ARGUMENT")


def test_the_onnx_step_reports_the_kiln_step_metrics(client, server: TritonServer, split) -> None:
    # kiln_onnx is served through the same adapter as the processing steps: counted the same way.
    before = server.metric("kiln_step_requests_total", model=MODEL)
    failed = server.metric("kiln_step_failures_total", model=MODEL, reason="invalid_input")
    infer(client, split.x_test[:3])
    bad = split.x_test[:1].copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(InferenceServerException):
        infer(client, bad)
    assert server.metric("kiln_step_requests_total", model=MODEL) == before + 2
    assert server.metric("kiln_step_failures_total", model=MODEL, reason="invalid_input") == failed + 1
    assert server.metric("kiln_step_duration_us_total", model=MODEL) > 0


@pytest.fixture(scope="module")
def slow_batching_server(tmp_path_factory) -> Iterator[TritonServer]:
    """A server whose digits model waits up to 2 s to fill a batch of exactly 4 requests, so
    concurrent requests are sure to share one execute()."""
    repository = tmp_path_factory.mktemp("slow_batching")
    variant = dataclasses.replace(
        DIGITS,
        dynamic_batching=DynamicBatching(preferred_batch_sizes=(4,), max_queue_delay_us=2_000_000),
        warmup=(),
        build=dataclasses.replace(DIGITS.build, variants=(Variant("fp32"),)),  # only fp32 is copied
    )
    generate([variant], repository, backends=paths.available_backends())
    shutil.copytree(paths.model_repository() / MODEL / "1", repository / MODEL / "1")
    with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as server:
        yield server


def _batch_stats(client) -> tuple[int, int]:
    stats = client.get_inference_statistics(MODEL)
    if not isinstance(stats, dict):  # gRPC returns a protobuf message
        from google.protobuf.json_format import MessageToDict

        stats = MessageToDict(stats, preserving_proto_field_name=True)
    model = stats["model_stats"][0]
    return int(model.get("execution_count", 0)), int(model.get("inference_count", 0))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_request_in_a_dynamic_batch_fails_alone(
    slow_batching_server: TritonServer, split, reference, protocol: str
) -> None:
    client = make_client(slow_batching_server, protocol)
    images = [split.x_test[i : i + 1].copy() for i in range(4)]
    images[2][0, 0, 4, 4] = np.inf
    executions, inferences = _batch_stats(client)

    results = infer_concurrently(slow_batching_server, protocol, images)

    after = _batch_stats(client)
    assert after == (executions + 1, inferences + 4), "the 4 requests did not share one batch"
    for i in (0, 1, 3):
        assert isinstance(results[i], np.ndarray), results[i]
        assert results[i].argmax() == reference[i].argmax()  # its own answer, as PyTorch's
    assert isinstance(results[2], InferenceServerException)
    assert "input 'pixels' contains NaN or infinity (1 of 64 values)" in results[2].message()
    client.close()
