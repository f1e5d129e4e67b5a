"""Unit tests of the client SDK's pure parts: no server (see tests/integration/test_clients*.py).

URL parsing, input preparation and validation against a model config, error translation,
retry backoff, result assembly of split calls, the PNG encoder, task-client encoding, and the
shared-memory regions (real /dev/shm segments, created and removed).
"""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from kiln import tensors
from kiln.clients import (
    DeadlineExceededError,
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    RetryPolicy,
    ServerError,
    ServerUnavailableError,
    shm,
    tasks,
)
from kiln.clients import client as client_module
from kiln.clients.client import Part, chunk_ranges, parse_url, prepare_inputs, raise_first_failure
from kiln.clients.errors import PermissionDeniedError, classify_status, translate
from kiln.clients.images import encode_png, image_bytes
from kiln.clients.models import ModelInfo, normalize_config, validate_inputs
from kiln.clients.results import InferResult

DIGITS_CONFIG = {
    "name": "digits",
    "backend": "kiln_onnx",
    "max_batch_size": 64,
    "input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": [1, 8, 8]}],
    "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [10]}],
}
FRAUD_SCORER_CONFIG = {
    "name": "fraud_scorer",
    "platform": "ensemble",
    "max_batch_size": 256,
    "input": [
        {"name": tensors.RECORD, "data_type": "TYPE_STRING", "dims": [1], "optional": True},
        {"name": tensors.FEATURE_VALUES, "data_type": "TYPE_FP32", "dims": [16], "optional": True},
    ],
    "output": [
        {"name": tensors.SCORE, "data_type": "TYPE_FP32", "dims": [1]},
        {"name": tensors.DECISION, "data_type": "TYPE_BOOL", "dims": [1]},
    ],
}


@pytest.fixture
def digits() -> ModelInfo:
    return ModelInfo.from_config(DIGITS_CONFIG)


# --- URLs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "protocol", "expected"),
    [
        ("http://localhost:8000", None, ("http", "localhost:8000")),
        ("grpc://10.0.0.2:8001", None, ("grpc", "10.0.0.2:8001")),
        ("GRPC://h:1/", None, ("grpc", "h:1")),
        ("localhost:8001", "grpc", ("grpc", "localhost:8001")),
        ("localhost:8000", None, ("http", "localhost:8000")),
        ("http://[::1]:8000", "http", ("http", "[::1]:8000")),
    ],
)
def test_parse_url(url: str, protocol: str | None, expected: tuple[str, str]) -> None:
    assert parse_url(url, protocol) == expected


@pytest.mark.parametrize(
    ("url", "protocol", "message"),
    [
        ("https://h:8000", None, "unsupported URL scheme 'https'"),
        ("http://h:8000", "grpc", "says http but protocol='grpc'"),
        ("h:8000", "tcp", "protocol must be one of http, grpc, got 'tcp'"),
        ("http://h:8000/v2", None, "must be scheme://host:port, with no path"),
        ("http://", None, "no host in URL"),
    ],
)
def test_parse_url_rejects(url: str, protocol: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_url(url, protocol)


# --- inputs and validation -----------------------------------------------------------------------


def test_prepare_inputs_turns_strings_into_utf8_bytes_objects() -> None:
    arrays = prepare_inputs({"text": [["héllo"], ["wörld"]], "raw": np.array([[b"\x00\xff"]])})
    assert arrays["text"].dtype == object and arrays["text"].shape == (2, 1)
    assert arrays["text"][0, 0] == "héllo".encode()
    assert arrays["raw"][0, 0] == b"\x00\xff"


def test_prepare_inputs_names_the_input_and_item_that_is_not_text() -> None:
    with pytest.raises(InvalidInputError) as caught:
        prepare_inputs({"text": np.array([["ok"], [3]], dtype=object)})
    assert str(caught.value) == "input 'text': item 1 must be str or bytes for a BYTES tensor, given int"
    assert caught.value.input_name == "text" and caught.value.item == 1


def test_prepare_inputs_needs_a_mapping() -> None:
    with pytest.raises(InvalidInputError, match="inputs must be a mapping of input name -> array, given list"):
        prepare_inputs([np.zeros(3)])


def test_valid_inputs_pass(digits: ModelInfo) -> None:
    validate_inputs(digits, {"pixels": np.zeros((3, 1, 8, 8), np.float32)})
    validate_inputs(digits, {"pixels": np.zeros((200, 1, 8, 8), np.float32)}, split=True)


@pytest.mark.parametrize(
    ("inputs", "message", "name", "expected", "given"),
    [
        (
            {"pixels": np.zeros((1, 1, 8, 8), np.float64)},
            "input 'pixels' of model 'digits': expected dtype FP32, given FP64 (numpy float64)",
            "pixels", "FP32", "FP64",
        ),
        (
            {"pixels": np.zeros((1, 8, 8), np.float32)},
            "input 'pixels' of model 'digits': expected shape [-1, 1, 8, 8] (-1: any size; the first "
            "dim is the batch), given [1, 8, 8]",
            "pixels", "[-1, 1, 8, 8]", "[1, 8, 8]",
        ),
        (
            {"pixels": np.zeros((2, 1, 8, 9), np.float32)},
            "input 'pixels' of model 'digits': expected shape [-1, 1, 8, 8] (-1: any size; the first "
            "dim is the batch), given [2, 1, 8, 9]",
            "pixels", "[-1, 1, 8, 8]", "[2, 1, 8, 9]",
        ),
        (
            {},
            "model 'digits' needs input 'pixels' (FP32 [-1, 1, 8, 8]), which is missing; given: no inputs",
            "pixels", "FP32 [-1, 1, 8, 8]", None,
        ),
        (
            {"pixels": np.zeros((1, 1, 8, 8), np.float32), "extra": np.zeros(1)},
            "model 'digits' has no input 'extra'; its inputs: pixels (FP32 [-1, 1, 8, 8])",
            "extra", "pixels (FP32 [-1, 1, 8, 8])", "extra",
        ),
        (
            {"pixels": np.zeros((65, 1, 8, 8), np.float32)},
            "input 'pixels' of model 'digits': a batch of 65 exceeds the model's max_batch_size 64; "
            "use infer_batch() to split it",
            "pixels", "<= 64", "65",
        ),
    ],
    ids=["dtype", "rank", "dim", "missing", "extra", "batch"],
)
def test_invalid_inputs_name_input_expected_and_given(
    digits: ModelInfo, inputs: dict, message: str, name: str, expected: str, given: str | None
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_inputs(digits, inputs)
    error = caught.value
    assert str(error) == message
    assert (error.input_name, error.expected, error.given, error.model) == (name, expected, given, "digits")


def test_optional_inputs_may_be_left_out_and_batch_sizes_must_agree() -> None:
    info = ModelInfo.from_config(FRAUD_SCORER_CONFIG)
    assert [t.optional for t in info.inputs] == [True, True]
    assert info.input(tensors.RECORD).datatype == "BYTES"
    validate_inputs(info, {tensors.FEATURE_VALUES: np.zeros((3, 16), np.float32)})
    validate_inputs(info, {tensors.RECORD: np.array([[b"{}"]], dtype=object)})
    with pytest.raises(InvalidInputError, match="have different batch sizes: 'record': 1, 'feature_values': 2"):
        validate_inputs(
            info,
            {tensors.RECORD: np.array([[b"{}"]], dtype=object), tensors.FEATURE_VALUES: np.zeros((2, 16), np.float32)},
        )


def test_grpc_config_json_normalizes_to_the_http_form() -> None:
    grpc_json = {"config": {**DIGITS_CONFIG, "input": [{"name": "pixels", "data_type": "TYPE_FP32", "dims": ["1", "8", "8"]}],
                            "output": [{"name": "logits", "data_type": "TYPE_FP32", "dims": ["10"]}]}}
    assert normalize_config(grpc_json) == DIGITS_CONFIG
    info = ModelInfo.from_config(normalize_config(grpc_json))
    assert info.input("pixels").shape == (-1, 1, 8, 8)
    assert info.output("logits").item_byte_size(batched=True) == 40
    unbatched = ModelInfo.from_config({**DIGITS_CONFIG, "max_batch_size": 0, "output": [
        {"name": "y", "data_type": "TYPE_FP32", "dims": [-1]}, {"name": "z", "data_type": "TYPE_INT8", "dims": [3, 2]}]})
    assert unbatched.output("y").shape == (-1,) and unbatched.output("y").item_byte_size(batched=False) is None
    assert unbatched.output("z").item_byte_size(batched=False) == 6
    with pytest.raises(KeyError, match="model 'digits' has no output 'probs'; its outputs: logits"):
        info.output("probs")


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message", "expected"),
    [
        ("400", "unexpected shape for input 'pixels'", InvalidInputError),
        ("StatusCode.INVALID_ARGUMENT", "inference input 'x' data-type is 'FP64'", InvalidInputError),
        ("404", "Request for unknown model: 'nope' is not found", ModelNotFoundError),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'nope' is not found", ModelNotFoundError),
        ("404", "Request for unknown model: 'resnet50' has no available versions", ModelNotReadyError),
        ("StatusCode.NOT_FOUND", "Request for unknown model: 'r' has no available versions", ModelNotReadyError),
        ("503", "Server not ready", ServerUnavailableError),
        ("StatusCode.UNAVAILABLE", "failed to connect to all addresses", ServerUnavailableError),
        ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceededError),
        ("400", "Request timeout expired", DeadlineExceededError),
        ("500", "input 'pixels' contains NaN", ServerError),
        ("StatusCode.INTERNAL", "boom", ServerError),
        ("404", "Unable to find shared memory region: 'kiln_client_1'", ServerError),
        (None, "something", ServerError),
        ("403", "This API is restricted, expecting header 'kiln-repository-key'", PermissionDeniedError),
        # gRPC reports a restricted protocol as UNAVAILABLE: it must not be retried as an outage.
        ("StatusCode.UNAVAILABLE", "This protocol is restricted, expecting header 'kiln-repository-key'",
         PermissionDeniedError),
    ],
)
def test_status_classification(status: str | None, message: str, expected: type) -> None:
    assert classify_status(status, message) is expected


def test_translate_keeps_the_server_message_and_context() -> None:
    raw = InferenceServerException("Request for unknown model: 'nope' is not found", status="404")
    error = translate(raw, what="infer", model="nope", url="http://h:8000", request_id="r-1")
    assert isinstance(error, ModelNotFoundError) and isinstance(error, LookupError)
    assert error.server_message == "Request for unknown model: 'nope' is not found"
    assert error.status == "404" and error.request_id == "r-1" and error.url == "http://h:8000"
    assert str(error).startswith("model 'nope' at http://h:8000: Request for unknown model: 'nope' is not found")


def test_translate_connection_errors_and_timeouts() -> None:
    refused = translate(ConnectionRefusedError(111, "Connection refused"), what="is_live", url="http://h:1")
    assert isinstance(refused, ServerUnavailableError) and isinstance(refused, ConnectionError)
    assert "is_live at http://h:1: cannot reach the server" in str(refused)
    timeout = translate(TimeoutError(), what="infer", model="m", url="grpc://h:2", timeout=0.5)
    assert isinstance(timeout, DeadlineExceededError) and isinstance(timeout, TimeoutError)
    assert str(timeout) == "model 'm' at grpc://h:2: no answer within the timeout of 0.5 s"


def test_shared_memory_errors_get_a_hint() -> None:
    raw = InferenceServerException("Unable to open shared memory region 'x'", status="400")
    error = translate(raw, what="infer", model="m", url="http://h:1", shared_memory=True)
    assert isinstance(error, ServerError)
    assert "needs the server on the same host" in str(error)


def test_for_items_copies_the_class_and_names_the_range() -> None:
    error = InvalidInputError("bad", input_name="x", model="m")
    copy = error.for_items(range(16, 32), 40)
    assert type(copy) is InvalidInputError and copy.input_name == "x"
    assert str(copy) == "items 16..31 of 40: bad" and copy.items == range(16, 32)
    assert str(error) == "bad" and error.items is None


# --- retries -------------------------------------------------------------------------------------


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(max_attempts=10, initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0, jitter=0.5)
    rng = random.Random(0)
    waits = [policy.backoff(n, rng) for n in range(1, 8)]
    bases = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    for wait, base in zip(waits, bases, strict=True):
        assert base * 0.5 <= wait <= base
    assert len({round(w, 6) for w in waits[4:]}) == 3, "jitter should spread capped waits"
    no_jitter = RetryPolicy(jitter=0.0)
    assert [no_jitter.backoff(n) for n in (1, 2, 3)] == pytest.approx([0.1, 0.2, 0.4])


def test_only_retryable_errors_are_retried_within_attempts_and_deadline() -> None:
    policy = RetryPolicy(max_attempts=3, deadline_s=1.0)
    unavailable, not_ready = ServerUnavailableError("down"), ModelNotReadyError("loading")
    assert policy.should_retry(unavailable, 1, 0.0, 0.1)
    assert policy.should_retry(not_ready, 2, 0.0, 0.1)
    assert not policy.should_retry(unavailable, 3, 0.0, 0.1), "attempts exhausted"
    assert not policy.should_retry(unavailable, 1, 0.95, 0.1), "past the deadline"
    for error in (InvalidInputError("x"), ModelNotFoundError("x"), DeadlineExceededError("x"), ServerError("x")):
        assert not policy.should_retry(error, 1, 0.0, 0.1)
    assert not RetryPolicy.disabled().should_retry(unavailable, 1, 0.0, 0.0)
    assert list(RetryPolicy.disabled().waits()) == []


def test_retry_policy_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="max_attempts must be >= 1, got 0; jitter must be in"):
        RetryPolicy(max_attempts=0, jitter=2.0)


# --- split calls ---------------------------------------------------------------------------------


def test_chunk_ranges_cover_everything_in_order() -> None:
    assert chunk_ranges(40, 16) == [range(0, 16), range(16, 32), range(32, 40)]
    assert chunk_ranges(3, 16) == [range(0, 3)]
    with pytest.raises(ValueError):
        chunk_ranges(3, 0)


def _result(rows: list[int]) -> InferResult:
    return InferResult("m", {"y": np.array(rows)}, 0.01, "r")


def test_first_failure_names_the_range_or_the_item() -> None:
    down = ServerUnavailableError("down")
    parts = [Part(range(0, 16), _result(list(range(16)))), Part(range(16, 32), down), Part(range(32, 40), down)]
    with pytest.raises(ServerUnavailableError, match=r"^items 16\.\.31 of 40: down$") as caught:
        raise_first_failure(parts, 40)
    assert caught.value.items == range(16, 32)
    single = [Part(range(0, 1), _result([0])), Part(range(1, 2), InvalidInputError("corrupt", input_name="image"))]
    with pytest.raises(InvalidInputError, match=r"^item 1 of 2: corrupt$") as caught:
        raise_first_failure(single, 2)
    assert caught.value.item == 1
    raise_first_failure([Part(range(0, 2), _result([0, 1]))], 2)  # nothing failed


def test_expand_replaces_isolated_parts_in_order() -> None:
    bad = InvalidInputError("one of these is bad")
    parts = [Part(range(0, 2), _result([0, 1])), Part(range(2, 5), bad)]
    jobs = client_module.isolation_jobs(parts, "req")
    assert jobs == [(range(2, 3), "req-item2"), (range(3, 4), "req-item3"), (range(4, 5), "req-item4")]
    singles = [Part(range(2, 3), _result([2])), Part(range(3, 4), InvalidInputError("bad")), Part(range(4, 5), _result([4]))]
    expanded = client_module.expand(parts, singles)
    assert [p.items for p in expanded] == [range(0, 2), range(2, 3), range(3, 4), range(4, 5)]
    assert client_module.plan_jobs([range(0, 2)], "id") == [(range(0, 2), "id")]
    assert client_module.plan_jobs([range(0, 2), range(2, 3)], "id") == [(range(0, 2), "id-0"), (range(2, 3), "id-1")]


def test_collect_puts_results_and_labeled_errors_at_the_original_positions() -> None:
    result = InferResult("m", {"y": np.array([10, 30])}, 0.01, None)
    parts = [Part(range(0, 2), result), Part(range(2, 3), ServerError("boom"))]
    out: list = [InvalidInputError("unreadable"), None, None, None]
    tasks.collect(parts, [1, 3, 2], out, lambda r, row: int(r["y"][row]), 4)
    assert out[1:3] == [10, out[2]] and out[3] == 30
    assert isinstance(out[2], ServerError) and str(out[2]) == "item 2 of 4: boom"


# --- images --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (6, 9, 3), (4, 3, 4)])
def test_png_encoding_round_trips_through_pillow(shape: tuple[int, ...]) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_png(array))))
    np.testing.assert_array_equal(decoded, array.reshape(decoded.shape))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((4, 4), np.float32), "an image array must be uint8 (0-255), given float32"),
        (np.zeros((4, 4, 2), np.uint8), "H x W x C with C in 1, 3, 4; given shape [4, 4, 2]"),
        (np.zeros((0, 4), np.uint8), "an image must be 1..65535 pixels on each side, given 4 x 0"),
    ],
)
def test_png_encoding_rejects_what_it_cannot_encode(array: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        encode_png(array)


def test_image_inputs_from_bytes_paths_and_arrays(tmp_path) -> None:
    path = tmp_path / "x.png"
    png = encode_png(np.full((3, 3), 7, np.uint8))
    path.write_bytes(png)
    assert image_bytes(png) == png == image_bytes(str(path)) == image_bytes(path) == image_bytes(bytearray(png))
    encoded, errors = tasks.encode_images([png, tmp_path / "missing.png", b"", 5])
    assert encoded[0] == png and encoded[1:] == [None, None, None]
    assert sorted(errors) == [1, 2, 3]
    assert "image 1: [Errno 2] No such file or directory" in str(errors[1])
    assert str(errors[2]) == "image 2: the image is empty (0 bytes)"
    assert str(errors[3]) == "image 3: an image must be encoded bytes, a file path or a uint8 numpy array, given int"
    assert all(e.item == i and e.input_name == tensors.IMAGE for i, e in errors.items())


# --- task encoding -------------------------------------------------------------------------------


def test_records_become_json_and_arrays_feature_values() -> None:
    record_inputs = tasks.fraud_inputs([{"amount": 12.5, "hour": 3}, {"amount": np.float32(1.0)}])
    column = record_inputs[tensors.RECORD]
    assert column.shape == (2, 1) and json.loads(column[0, 0]) == {"amount": 12.5, "hour": 3.0}
    values = tasks.fraud_inputs(np.arange(16))
    assert values[tensors.FEATURE_VALUES].shape == (1, 16) and values[tensors.FEATURE_VALUES].dtype == np.float32
    assert tasks.fraud_inputs({"amount": 1})[tensors.RECORD].shape == (1, 1)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([{"amount": 1.0}, {"amount": "12"}], "record 1: feature 'amount' must be a number, given str"),
        ([{"amount": float("nan")}], "record 0: feature 'amount' must be finite, given nan"),
        ([{"flag": True}], "record 0: feature 'flag' must be a number, given bool"),
        ([[1.0, 2.0]], "record 0: expected a mapping of feature name -> number, given list"),
        (np.array([["a"]]), "feature values must be numbers, given numpy <U1"),
    ],
)
def test_bad_records_name_the_record_and_feature(records, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message.replace("(", r"\(")):
        tasks.fraud_inputs(records)


def test_texts_must_be_strings() -> None:
    assert tasks.encode_texts(["ä", ""])[:, 0].tolist() == ["ä".encode(), b""]
    with pytest.raises(InvalidInputError, match="text 1: expected str, given bytes"):
        tasks.encode_texts(["a", b"b"])


def test_task_clients_take_options_only_with_a_url() -> None:
    with pytest.raises(TypeError, match=r"client options \(timeout\) apply only when a URL is given"):
        tasks.TextEmbedder(client_module.Client("http://localhost:1"), timeout=3)


# --- shared memory -------------------------------------------------------------------------------


def _segments() -> set[str]:
    return {p.name for p in shm.SHM_DIR.glob(f"{shm.REGION_PREFIX}{os.getpid()}_*")}


@pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory at /dev/shm on this machine")
def test_regions_round_trip_and_leave_nothing_behind() -> None:
    before = _segments()
    pool = shm.RegionPool()
    info = ModelInfo.from_config(DIGITS_CONFIG)
    pixels = np.random.default_rng(1).random((3, 1, 8, 8), dtype=np.float32)
    layout = shm.plan_layout(info, {"pixels": pixels}, ["logits"], batch=3)
    assert [(p.name, p.offset, p.byte_size) for p in layout.inputs] == [("pixels", 0, 768)]
    assert [(p.name, p.offset, p.byte_size) for p in layout.outputs] == [("logits", 768, 120)]
    region = pool.create(layout.byte_size)
    assert region.byte_size == shm.MIN_REGION_BYTES and (shm.SHM_DIR / region.name).is_file()
    region.write(0, layout.inputs[0].data)
    np.testing.assert_array_equal(region.read(0, "FP32", [3, 1, 8, 8]), pixels)
    assert pool.take(1) is None, "an unregistered region is never handed out"
    region.registered = True
    pool.give_back(region)
    assert pool.take(shm.MIN_REGION_BYTES + 1) is None and pool.take(10) is region
    big = pool.create(shm.MIN_REGION_BYTES * 3)
    assert big.byte_size == shm.MIN_REGION_BYTES * 4 and len(pool) == 2
    for r in pool.drain():
        r.destroy()
    assert _segments() == before


@pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory at /dev/shm on this machine")
def test_a_forgotten_pool_removes_its_segments() -> None:
    before = _segments()
    pool = shm.RegionPool()
    pool.create(10)
    assert len(_segments() - before) == 1
    del pool
    assert _segments() == before


def test_bytes_inputs_are_serialized_into_regions() -> None:
    info = ModelInfo.from_config(FRAUD_SCORER_CONFIG)
    column = np.array([[b"ab"], [b"cde"]], dtype=object)
    layout = shm.plan_layout(info, {tensors.RECORD: column}, [tensors.SCORE, tensors.DECISION], batch=2)
    (placed,) = layout.inputs
    assert placed.byte_size == (4 + 2) + (4 + 3)
    assert bytes(placed.data) == b"\x02\x00\x00\x00ab\x03\x00\x00\x00cde"
    assert [(p.name, p.offset, p.byte_size) for p in layout.outputs] == [("score", 64, 8), ("decision", 128, 2)]


def test_kiln_error_is_the_base_of_everything() -> None:
    for cls in (InvalidInputError, ModelNotFoundError, ModelNotReadyError, ServerUnavailableError,
                DeadlineExceededError, ServerError):
        assert issubclass(cls, KilnError)
