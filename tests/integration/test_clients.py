"""The generic SDK clients against real tritonservers, over HTTP and gRPC, sync and asyncio.

Uses the session `server` (the digits and resnet50 models) for health, metadata, inference,
splitting, shared memory and the errors a running server gives; and servers of its own on the
tiny add_one repository (plus a model that fails inside ONNX Runtime) for a model that is not
ready, a failure inside a model, a stopped server, and a restart on the same ports that the
client's retries ride out. Expected values come from tritonclient called directly, never from the
SDK itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from kiln import tensors
from kiln.clients import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidInputError,
    ModelNotFoundError,
    ModelNotReadyError,
    RetryPolicy,
    ServerError,
    ServerUnavailableError,
    shm,
)
from kiln.registry import by_name
from kiln.server import TritonServer, pick_free_ports

DIGITS = "digits"
RESNET50 = "resnet50"
PROTOCOLS = ("http", "grpc")
RETRY_LOG = "kiln.clients"


def urls(server: TritonServer) -> dict[str, str]:
    return {"http": f"http://{server.http_url}", "grpc": f"grpc://{server.grpc_url}"}


def raw_infer(server: TritonServer, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
    """The expected answer: tritonclient's HTTP client, called directly."""
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensor = httpclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        return client.infer(model, [tensor]).as_numpy(output)


def success_count(server: TritonServer, model: str) -> int:
    """Requests the model answered successfully so far (Triton's statistics)."""
    with httpclient.InferenceServerClient(server.http_url) as client:
        stats = client.get_inference_statistics(model)["model_stats"][0]
    return int(stats["inference_stats"]["success"]["count"])


def requests_since(server: TritonServer, model: str, before: int, expected: int) -> int:
    """Requests answered since `before`, waiting briefly for Triton's statistics to catch up
    (they are updated after the response is sent)."""
    deadline = time.monotonic() + 2.0
    while True:
        count = success_count(server, model) - before
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def segments() -> set[str]:
    """This process's shared-memory segments in /dev/shm."""
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.REGION_PREFIX}{os.getpid()}_*")}


def registered_regions(server: TritonServer) -> list[str]:
    with httpclient.InferenceServerClient(server.http_url) as client:
        return [r["name"] for r in client.get_system_shared_memory_status()]


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).random((150, 1, 8, 8), dtype=np.float32)


# --- health and metadata -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata(server: TritonServer, protocol: str) -> None:
    with Client(urls(server)[protocol]) as client:
        assert client.is_live() and client.is_ready()
        assert client.is_model_ready(DIGITS)
        assert not client.is_model_ready("no_such_model")
        client.wait_until_ready([DIGITS], timeout=5)
        assert client.server_metadata()["name"] == "triton"
        assert client.models()[DIGITS] == "READY"
        with httpclient.InferenceServerClient(server.http_url) as raw:
            assert client.model_metadata(DIGITS) == raw.get_model_metadata(DIGITS)
            expected_config = raw.get_model_config(DIGITS)
        config = client.model_config(DIGITS)
        for key in ("name", "max_batch_size", "input", "output"):
            assert _strip(config[key]) == _strip(expected_config[key]), key
        info = client.model_info(DIGITS)
        spec = by_name(DIGITS)
        assert info.max_batch_size == spec.max_batch_size
        assert info.input(tensors.DIGITS_PIXELS).shape == (-1, *spec.inputs[0].dims)
        assert info.output(tensors.DIGITS_LOGITS).datatype == "FP32"


def _strip(value):
    """Config entries as comparable dicts (gRPC's JSON leaves out fields at their defaults)."""
    if isinstance(value, list):
        return {i: _strip(v) for i, v in enumerate(value)}
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v not in (False, "", 0, [], {}, "FORMAT_NONE")}
    return value


def test_async_health_and_metadata(server: TritonServer) -> None:
    async def check(url: str) -> None:
        async with AsyncClient(url) as client:
            assert await client.is_live() and await client.is_ready()
            assert await client.is_model_ready(DIGITS)
            assert not await client.is_model_ready("no_such_model")
            await client.wait_until_ready([DIGITS], timeout=5)
            assert (await client.models())[DIGITS] == "READY"
            assert (await client.model_info(DIGITS)).max_batch_size == by_name(DIGITS).max_batch_size
            assert (await client.model_metadata(DIGITS))["inputs"][0]["shape"] == [-1, 1, 8, 8]

    for url in urls(server).values():
        asyncio.run(check(url))


def test_wait_until_ready_gives_up_at_its_deadline(server: TritonServer) -> None:
    with Client(urls(server)["grpc"]) as client:
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match=r"models no_such_model at grpc://.* not ready after 0.5 s"):
            client.wait_until_ready(["no_such_model"], timeout=0.5)
        assert time.monotonic() - start < 5


# --- inference -----------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_returns_what_triton_returns(server: TritonServer, protocol: str, pixels: np.ndarray) -> None:
    expected = raw_infer(server, DIGITS, tensors.DIGITS_PIXELS, pixels[:5], tensors.DIGITS_LOGITS)
    with Client(urls(server)[protocol]) as client:
        result = client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:5]}, request_id="req-42")
    np.testing.assert_array_equal(result[tensors.DIGITS_LOGITS], expected)
    assert result.request_id == "req-42" and result.model == DIGITS and result.model_version == "1"
    assert 0 < result.latency_s < 10


def test_async_infer_returns_what_triton_returns(server: TritonServer, pixels: np.ndarray) -> None:
    expected = raw_infer(server, DIGITS, tensors.DIGITS_PIXELS, pixels[:5], tensors.DIGITS_LOGITS)

    async def run(url: str) -> None:
        async with AsyncClient(url) as client:
            result = await client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:5]}, request_id="a-1")
            np.testing.assert_array_equal(result[tensors.DIGITS_LOGITS], expected)
            assert result.request_id == "a-1" and result.latency_s > 0
            many = await asyncio.gather(
                *(client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[i : i + 1]}) for i in range(5))
            )
            np.testing.assert_allclose(
                np.concatenate([r[tensors.DIGITS_LOGITS] for r in many]), expected, rtol=1e-5, atol=1e-5
            )

    for url in urls(server).values():
        asyncio.run(run(url))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_infer_batch_splits_by_max_batch_size_and_keeps_order(
    server: TritonServer, protocol: str, pixels: np.ndarray
) -> None:
    max_batch = by_name(DIGITS).max_batch_size
    expected = np.concatenate([
        raw_infer(server, DIGITS, tensors.DIGITS_PIXELS, pixels[i : i + max_batch], tensors.DIGITS_LOGITS)
        for i in range(0, len(pixels), max_batch)
    ])
    with Client(urls(server)[protocol], concurrency=3) as client:
        client.model_info(DIGITS)
        before = success_count(server, DIGITS)
        result = client.infer_batch(DIGITS, {tensors.DIGITS_PIXELS: pixels}, request_id="big")
        assert requests_since(server, DIGITS, before, -(-len(pixels) // max_batch)) == 3
        np.testing.assert_array_equal(result[tensors.DIGITS_LOGITS], expected)
        small = client.infer_batch(DIGITS, {tensors.DIGITS_PIXELS: pixels[:20]}, batch_size=7)
        np.testing.assert_allclose(small[tensors.DIGITS_LOGITS], expected[:20], rtol=1e-5, atol=1e-5)
    assert result.request_id == "big"


def test_async_infer_batch(server: TritonServer, pixels: np.ndarray) -> None:
    expected = raw_infer(server, DIGITS, tensors.DIGITS_PIXELS, pixels[:64], tensors.DIGITS_LOGITS)

    async def run(url: str) -> None:
        async with AsyncClient(url, concurrency=2) as client:
            result = await client.infer_batch(DIGITS, {tensors.DIGITS_PIXELS: pixels}, batch_size=16)
            assert result[tensors.DIGITS_LOGITS].shape == (len(pixels), 10)
            np.testing.assert_allclose(result[tensors.DIGITS_LOGITS][:64], expected, rtol=1e-5, atol=1e-5)

    for url in urls(server).values():
        asyncio.run(run(url))


def test_a_failed_chunk_names_its_items(server: TritonServer, pixels: np.ndarray) -> None:
    bad = pixels[:100].copy()
    bad[70, 0, 2, 2] = np.nan
    with Client(urls(server)["http"]) as client:
        with pytest.raises(InvalidInputError) as caught:
            client.infer_batch(DIGITS, {tensors.DIGITS_PIXELS: bad}, batch_size=32)
    assert caught.value.items == range(64, 96)
    assert str(caught.value).startswith("items 64..95 of 100: model 'digits' at http://")
    assert "input 'pixels' contains NaN or infinity (1 of 2048 values)" in str(caught.value)


# --- shared memory -------------------------------------------------------------------------------

needs_shm = pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory at /dev/shm here")


@needs_shm
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_memory_round_trip(server: TritonServer, protocol: str, pixels: np.ndarray) -> None:
    before = segments()
    images = np.random.default_rng(1).random((2, 3, 224, 224), dtype=np.float32)
    expected_logits = raw_infer(server, RESNET50, tensors.RESNET50_IMAGES, images, tensors.RESNET50_LOGITS)
    expected_digits = raw_infer(server, DIGITS, tensors.DIGITS_PIXELS, pixels[:64], tensors.DIGITS_LOGITS)
    with Client(urls(server)[protocol], shared_memory=True) as client:
        for _ in range(3):
            result = client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:64]})
            np.testing.assert_array_equal(result[tensors.DIGITS_LOGITS], expected_digits)
        assert len(segments() - before) == 1, "one region, reused across calls"
        big = client.infer(RESNET50, {tensors.RESNET50_IMAGES: images})
        np.testing.assert_allclose(big[tensors.RESNET50_LOGITS], expected_logits, rtol=1e-4, atol=1e-4)
        mine = segments() - before
        assert len(mine) == 2 and set(registered_regions(server)) >= mine
        plain = client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:2]}, shared_memory=False)
        # A batch of 2 against the reference's batch of 64: ONNX Runtime may pick other kernels
        # for another batch size on some CPUs, so equal to float32 rounding, not bit for bit.
        np.testing.assert_allclose(plain[tensors.DIGITS_LOGITS], expected_digits[:2], rtol=1e-5, atol=1e-5)
    assert segments() == before, "close() must remove every segment"
    assert not set(registered_regions(server)) & mine, "close() must unregister every region"


@needs_shm
def test_async_shared_memory_round_trip(server: TritonServer, pixels: np.ndarray) -> None:
    before = segments()
    expected = raw_infer(server, DIGITS, tensors.DIGITS_PIXELS, pixels[:64], tensors.DIGITS_LOGITS)

    async def run(url: str) -> None:
        async with AsyncClient(url, shared_memory=True) as client:
            results = await asyncio.gather(
                *(client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[i : i + 16]}) for i in range(0, 64, 16))
            )
            # The dynamic batcher may merge these into batches of 16..64: equal to float32
            # rounding to the one batch of 64 (bit-identical only where the kernels are).
            np.testing.assert_allclose(
                np.concatenate([r[tensors.DIGITS_LOGITS] for r in results]), expected,
                rtol=1e-5, atol=1e-5,
            )
            assert 1 <= len(segments() - before) <= 4

    for url in urls(server).values():
        asyncio.run(run(url))
    assert segments() == before
    assert not [r for r in registered_regions(server) if r.startswith(f"{shm.REGION_PREFIX}{os.getpid()}_")]


@needs_shm
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_shared_memory_is_cleaned_up_after_errors(server: TritonServer, protocol: str, pixels: np.ndarray) -> None:
    before = segments()
    bad = pixels[:4].copy()
    bad[1, 0, 0, 0] = np.inf
    with Client(urls(server)[protocol], shared_memory=True) as client:
        with pytest.raises(InvalidInputError, match="contains NaN or infinity"):
            client.infer(DIGITS, {tensors.DIGITS_PIXELS: bad})
        assert segments() == before, "a region a failed call used is removed at once"
        # The server may still be reading a timed-out request's region: it is retired, not
        # reused, and unregistered as soon as the server lets go (at the latest on close()).
        with pytest.raises(DeadlineExceededError):
            client.infer(RESNET50, {tensors.RESNET50_IMAGES: np.zeros((4, 3, 224, 224), np.float32)}, timeout=0.001)
        ok = client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:4]})
        assert ok[tensors.DIGITS_LOGITS].shape == (4, 10)
        assert len(segments() - before) in (1, 2)
    assert segments() == before
    assert not [r for r in registered_regions(server) if r.startswith(f"{shm.REGION_PREFIX}{os.getpid()}_")]


# --- errors from a running server ------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_errors_from_a_running_server(server: TritonServer, protocol: str, pixels: np.ndarray) -> None:
    url = urls(server)[protocol]
    with Client(url) as client:
        with pytest.raises(ModelNotFoundError) as caught:
            client.infer("no_such_model", {tensors.DIGITS_PIXELS: pixels[:1]})
        assert caught.value.server_message == "Request for unknown model: 'no_such_model' is not found"
        assert str(caught.value).startswith(f"model 'no_such_model' at {url}: Request for unknown model")

        with pytest.raises(DeadlineExceededError) as caught:
            client.infer(RESNET50, {tensors.RESNET50_IMAGES: np.zeros((4, 3, 224, 224), np.float32)}, timeout=0.001)
        assert "no answer within the timeout of 0.001 s" in str(caught.value)

        with pytest.raises(InvalidInputError) as caught:  # validated here, never sent
            client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:1].astype(np.float64)})
        assert caught.value.status is None and caught.value.input_name == tensors.DIGITS_PIXELS

        with pytest.raises(InvalidInputError) as caught:  # sent unvalidated: the server's own words
            client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:1, 0]}, validate=False)
        assert caught.value.status in ("400", "StatusCode.INVALID_ARGUMENT")
        assert "unexpected shape for input 'pixels' for model 'digits'. Expected [-1,1,8,8], got [1,8,8]" in str(
            caught.value
        )

        bad = pixels[:2].copy()
        bad[0, 0, 1, 1] = np.nan
        with pytest.raises(InvalidInputError, match=r"input 'pixels' contains NaN or infinity \(1 of 128 values\)"):
            client.infer(DIGITS, {tensors.DIGITS_PIXELS: bad})
        # The client (and the server) keep working after every error.
        assert client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:1]})[tensors.DIGITS_LOGITS].shape == (1, 10)


def test_async_errors_from_a_running_server(server: TritonServer, pixels: np.ndarray) -> None:
    async def run(url: str) -> None:
        async with AsyncClient(url) as client:
            with pytest.raises(ModelNotFoundError):
                await client.infer("no_such_model", {tensors.DIGITS_PIXELS: pixels[:1]})
            with pytest.raises(DeadlineExceededError):
                await client.infer(
                    RESNET50, {tensors.RESNET50_IMAGES: np.zeros((4, 3, 224, 224), np.float32)}, timeout=0.001
                )
            with pytest.raises(InvalidInputError, match="unexpected shape for input 'pixels'"):
                await client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:1, 0]}, validate=False)
            result = await client.infer(DIGITS, {tensors.DIGITS_PIXELS: pixels[:1]})
            assert result[tensors.DIGITS_LOGITS].shape == (1, 10)

    for url in urls(server).values():
        asyncio.run(run(url))


# --- servers of our own: not ready, stopped, restarted ---------------------------------------------


def add_one_server(repository: Path, **options) -> TritonServer:
    """A tritonserver on the tiny repository that drains quickly on stop (1 s)."""
    options.setdefault("http_port", 0)
    options.setdefault("grpc_port", 0)
    options.setdefault("metrics_port", 0)
    return TritonServer(repository, exit_timeout=1, **options)


def add_one_inputs(add_one, rows: int = 2) -> dict[str, np.ndarray]:
    return {add_one.input: np.arange(rows * add_one.features, dtype=np.float32).reshape(rows, add_one.features)}


FAILING = "fails_at_runtime"
"""A model that loads but fails inside ONNX Runtime on a batch of 1: it reshapes [batch, 4] to
[-1, 3] (possible only when 4 * batch is a multiple of 3)."""


def write_failing_model(repository: Path) -> None:
    import onnx
    from google.protobuf import text_format
    from onnx import TensorProto, helper
    from tritonclient.grpc import model_config_pb2

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    shapes = [helper.make_tensor("to3", TensorProto.INT64, [2], [-1, 3]),
              helper.make_tensor("to4", TensorProto.INT64, [2], [-1, 4])]
    nodes = [helper.make_node("Reshape", ["x", "to3"], ["t"]), helper.make_node("Reshape", ["t", "to4"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, FAILING, [x], [y], initializer=shapes),
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repository / FAILING / "1").mkdir(parents=True)
    onnx.save(model, repository / FAILING / "1" / "model.onnx")
    config = model_config_pb2.ModelConfig(name=FAILING, backend="kiln_onnx", max_batch_size=8)
    for name, field in (("x", config.input), ("y", config.output)):
        field.add(name=name, data_type=model_config_pb2.TYPE_FP32).dims.append(4)
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    (repository / FAILING / "config.pbtxt").write_text(text_format.MessageToString(config))


def test_a_model_that_is_not_ready_and_one_that_fails(make_repository, add_one) -> None:
    repository = make_repository()
    write_failing_model(repository)
    with add_one_server(repository, model_control_mode="explicit", load_models=[add_one.name, FAILING]) as server:
        with httpclient.InferenceServerClient(server.http_url) as raw:
            raw.unload_model(add_one.name)
        for url in urls(server).values():
            with Client(url, retry=None) as client:
                assert not client.is_model_ready(add_one.name)
                with pytest.raises(ModelNotReadyError, match="has no available versions"):
                    client.infer(add_one.name, add_one_inputs(add_one), validate=False)
                with pytest.raises(ServerError) as caught:
                    client.infer(FAILING, {"x": np.ones((1, 4), np.float32)})
                assert caught.value.status in ("500", "StatusCode.INTERNAL")
                assert "The input tensor cannot be reshaped to the requested shape" in str(caught.value)
                three = client.infer(FAILING, {"x": np.ones((3, 4), np.float32)})  # 12 values: fine
                np.testing.assert_array_equal(three["y"], np.ones((3, 4), np.float32))

        async def run(url: str) -> None:
            async with AsyncClient(url, retry=None) as client:
                with pytest.raises(ModelNotReadyError, match="has no available versions"):
                    await client.infer(add_one.name, add_one_inputs(add_one), validate=False)
                with pytest.raises(ServerError, match="cannot be reshaped"):
                    await client.infer(FAILING, {"x": np.ones((1, 4), np.float32)})

        for url in urls(server).values():
            asyncio.run(run(url))


def test_a_stopped_server(make_repository, add_one, caplog) -> None:
    server = add_one_server(make_repository()).start()
    addresses = urls(server)
    with Client(addresses["http"]) as client:
        assert client.infer(add_one.name, add_one_inputs(add_one))[add_one.output][0, 0] == 1.0
    server.stop()

    caplog.set_level(logging.WARNING, logger=RETRY_LOG)
    for url in addresses.values():
        with Client(url, retry=RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)) as client:
            assert not client.is_live() and not client.is_ready()
            caplog.clear()
            with pytest.raises(ServerUnavailableError) as caught:
                client.infer(add_one.name, add_one_inputs(add_one), validate=False)
            assert str(caught.value).startswith(f"model 'add_one' at {url}: ")
            assert "onnection refused" in str(caught.value)
            retries = [r for r in caplog.records if "retrying in" in r.getMessage()]
            assert len(retries) == 2, "3 attempts: 2 retries"
            with pytest.raises(ServerUnavailableError):
                client.model_info(add_one.name)

    async def run(url: str) -> None:
        async with AsyncClient(url, retry=None) as client:
            assert not await client.is_live()
            with pytest.raises(ServerUnavailableError):
                await client.infer(add_one.name, add_one_inputs(add_one), validate=False)

    for url in addresses.values():
        asyncio.run(run(url))


@pytest.fixture
def restartable(make_repository) -> Iterator[dict]:
    """A server on fixed ports, and a way to restart it there; stopped at the end."""
    repository = make_repository()
    http_port, grpc_port, metrics_port = pick_free_ports("127.0.0.1", 3)
    ports = {"http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port}
    state = {"server": add_one_server(repository, **ports).start()}

    def restart(delay_s: float = 0.0) -> None:
        state["server"].stop()
        time.sleep(delay_s)
        state["server"] = add_one_server(repository, **ports).start()

    state["restart"] = restart
    yield state
    state["server"].stop()


@needs_shm
def test_retries_ride_out_a_restart_on_the_same_ports(restartable, add_one, caplog) -> None:
    caplog.set_level(logging.INFO, logger=RETRY_LOG)
    addresses = urls(restartable["server"])
    policy = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.25, deadline_s=60)
    inputs = add_one_inputs(add_one)
    expected = inputs[add_one.input] + 1
    clients = {
        "http": Client(addresses["http"], retry=policy, shared_memory=True),
        "grpc": Client(addresses["grpc"], retry=policy),
    }
    before = segments()
    try:
        for client in clients.values():
            np.testing.assert_array_equal(client.infer(add_one.name, inputs)[add_one.output], expected)

        # Requests sent while the server is down wait for it to come back.
        restartable["server"].stop()
        restarter = threading.Thread(target=lambda: restartable["restart"](0.5))
        restarter.start()
        results: dict = {}

        def call(name: str) -> None:
            try:
                results[name] = clients[name].infer(add_one.name, inputs)[add_one.output]
            except Exception as error:  # noqa: BLE001 - reported below
                results[name] = error

        callers = [threading.Thread(target=call, args=(name,)) for name in clients]
        for thread in callers:
            thread.start()
        for thread in (*callers, restarter):
            thread.join(60)
        for name in clients:
            assert isinstance(results[name], np.ndarray), f"{name}: {results[name]!r}"
            np.testing.assert_array_equal(results[name], expected)
        retried = {r.getMessage().split(":")[0] for r in caplog.records if "retrying in" in r.getMessage()}
        assert retried == {"infer"}
        assert sum("ServerUnavailableError" in r.getMessage() for r in caplog.records) >= 2

        # A restart between two calls: the new server does not know the client's shared memory;
        # the client registers it anew and the call succeeds.
        caplog.clear()
        restartable["restart"]()
        np.testing.assert_array_equal(clients["http"].infer(add_one.name, inputs)[add_one.output], expected)
        assert any("lost this client's shared memory" in r.getMessage() for r in caplog.records)
    finally:
        for client in clients.values():
            client.close()
    assert segments() == before
