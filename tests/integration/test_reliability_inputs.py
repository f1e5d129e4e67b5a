"""Bad input across every pipeline and both protocols, on the session tritonserver (issue 7, item 1).

One cheap matrix: each pipeline (image_classifier, image_classifier_int8, digits_reader,
text_embedder, fraud_scorer) x each kind of bad input that applies to it x HTTP and gRPC. Every
bad request must be refused as the client's fault (HTTP 400 / gRPC INVALID_ARGUMENT) with a
message naming the problem, while a good request sent at the same moment is answered. After the
whole matrix, tritonserver and every backend stub process are the same processes as before (same
PIDs, none died) and every pipeline still answers.

The depth per pipeline (errors inside a forced dynamic batch, failure metrics, the reference
answers) lives in test_digits.py and test_*_pipeline*.py; this file checks breadth and survival.

Two rows show Triton's own limits rather than kiln's (docs/operations.md):
- "64 MiB body": Triton 2.51 has no request-size limit of its own; it reads the whole body, then
  refuses the batch size. The per-item limits (max_image_bytes, max_text_bytes, max_record_bytes
  in the preprocessing steps' parameters) are the size limits kiln sets on the server.
- "no input" on fraud_scorer, whose two inputs are both optional: Triton's ensemble scheduler
  answers "request has 0 inputs" before kiln_tabular could say "send exactly one of ...".
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from kiln import paths, tensors
from kiln.server import TritonServer
from kiln.serving.tabular import DEFAULT_MAX_RECORD_BYTES

PROTOCOLS = ("http", "grpc")
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}
IMAGE_PIPELINES = (tensors.IMAGE_CLASSIFIER, tensors.IMAGE_CLASSIFIER_INT8, tensors.DIGITS_READER)
PIPELINES = (*IMAGE_PIPELINES, tensors.TEXT_EMBEDDER, tensors.FRAUD_SCORER)
ONE_MB = 1 << 20
HUGE_BODY = 64 << 20
"""Bytes of FP32 feature rows in the "64 MiB body" row (far above any batch the model takes)."""
FRAUD_FEATURES = 16
BOMB_SIDE = 30_000
"""A 30000x30000 PNG: 900 megapixels (about 110 MB of 1-bit rows) in about 100 kB."""
BOMB_ROWS_PER_BLOCK = 1000
ZERO_HEIGHT = 16
PHOTO_SIZE = (48, 64)
"""height, width of the generated photo-like JPEG every image pipeline decodes."""
GOOD_TEXT = "a clear sentence about serving models"
STATS_FILE = "features.json"


# --- inputs -------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_file(width: int, height: int, idat: bytes, bit_depth: int = 8) -> bytes:
    """A grey PNG with this IHDR and IDAT stream (valid chunks and CRCs)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit PNG of side x side black pixels: a decompression bomb. One block of rows is
    deflated once (ending in a full flush, so blocks are independent) and repeated."""
    block = bytes(1 + (side + 7) // 8) * BOMB_ROWS_PER_BLOCK  # per row: filter byte, packed bits
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    unit = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    blocks = side // BOMB_ROWS_PER_BLOCK
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    stream = b"\x78\xda" + unit * blocks + deflate.flush() + struct.pack(">I", checksum)
    return png_file(side, side, stream, bit_depth=1)


def zero_width_png() -> bytes:
    """A PNG whose header says 0 pixels wide (otherwise well-formed)."""
    return png_file(0, ZERO_HEIGHT, zlib.compress(b""))


def photo_jpeg() -> bytes:
    pixels = np.random.default_rng(7).integers(0, 256, (*PHOTO_SIZE, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def digit_png() -> bytes:
    pixels = np.zeros((8, 8), np.uint8)
    pixels[1:7, 3:5] = 255  # a "1"
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def good_record() -> dict[str, float]:
    """A transaction at the training mean of every feature (names from the build's statistics)."""
    stats = json.loads((paths.model_repository() / "fraud" / "1" / STATS_FILE).read_text())
    return dict(zip(stats["features"], stats["mean"], strict=True))


def column(items: list[bytes]) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=object)
    array[:, 0] = items
    return array


Tensor = tuple[str, np.ndarray, str]
"""(input name, array, Triton datatype) as sent."""


@dataclass(frozen=True)
class Case:
    """One bad request: what it sends and a fragment its error message must contain."""

    inputs: list[Tensor]
    expected: str


@dataclass(frozen=True)
class Contract:
    """What the matrix needs to know of a served pipeline (read from the server's configs)."""

    max_batch_size: int
    item_limit: int
    """The preprocessing step's per-item byte limit (max_image_bytes, ...)."""
    good: list[Tensor]


def _step_parameter(server: TritonServer, pipeline: str, key: str, default: int) -> int:
    """A parameter of the pipeline's first step (its preprocessing), from the served configs: the
    ensemble's first step, or the first of a fused model's `steps` (its step models are served
    too, and the fused model loads each from its folder)."""
    with httpclient.InferenceServerClient(server.http_url) as client:
        config = client.get_model_config(pipeline)
        if "ensemble_scheduling" in config:
            step = config["ensemble_scheduling"]["step"][0]["model_name"]
        else:
            step = json.loads(config["parameters"]["steps"]["string_value"])[0]["model"]
        config = client.get_model_config(step)
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return int(value) if value else default


@pytest.fixture(scope="module")
def contracts(server: TritonServer) -> dict[str, Contract]:
    """The contract of each served pipeline (all of them, unless KILN_TEST_MODELS serves fewer)."""
    out = {}
    served = [p for p in PIPELINES if server.models().get(p) == "READY"]
    with httpclient.InferenceServerClient(server.http_url) as client:
        batch = {p: int(client.get_model_config(p)["max_batch_size"]) for p in served}
    photo = column([photo_jpeg()])
    for pipeline in (p for p in IMAGE_PIPELINES if p in served):
        image = column([digit_png()]) if pipeline == tensors.DIGITS_READER else photo
        out[pipeline] = Contract(
            batch[pipeline], _step_parameter(server, pipeline, "max_image_bytes", 0),
            [(tensors.IMAGE, image, "BYTES")],
        )
    if tensors.TEXT_EMBEDDER in served:
        out[tensors.TEXT_EMBEDDER] = Contract(
            batch[tensors.TEXT_EMBEDDER], _step_parameter(server, tensors.TEXT_EMBEDDER, "max_text_bytes", 0),
            [(tensors.TEXT, column([GOOD_TEXT.encode()]), "BYTES")],
        )
    if tensors.FRAUD_SCORER in served:
        out[tensors.FRAUD_SCORER] = Contract(
            batch[tensors.FRAUD_SCORER],
            _step_parameter(server, tensors.FRAUD_SCORER, "max_record_bytes", DEFAULT_MAX_RECORD_BYTES),
            [(tensors.RECORD, column([json.dumps(good_record()).encode()]), "BYTES")],
        )
    assert all(c.item_limit > 0 for c in out.values()), out
    return out


def contract_of(contracts: dict[str, Contract], pipeline: str) -> Contract:
    if pipeline not in contracts:
        pytest.skip(f"{pipeline} is not served by this session's server (KILN_TEST_MODELS)")
    return contracts[pipeline]


def image_cases(contract: Contract) -> dict[str, Case]:
    photo = photo_jpeg()
    pipeline_hint = "could not be decoded: "
    return {
        "wrong dtype": Case(
            [(tensors.IMAGE, np.zeros((1, 1), np.float32), "FP32")],
            f"inference input '{tensors.IMAGE}' data-type is 'FP32', but model",
        ),
        "wrong shape": Case(
            [(tensors.IMAGE, column([photo]).reshape(1, 1, 1), "BYTES")],
            f"unexpected shape for input '{tensors.IMAGE}'",
        ),
        "missing input": Case([], f"missing required input(s) ['{tensors.IMAGE}']"),
        "extra input": Case(
            [(tensors.IMAGE, column([photo]), "BYTES"), ("bogus", column([b"x"]), "BYTES")],
            "Got input(s) ['bogus','image']",
        ),
        "empty batch": Case(
            [(tensors.IMAGE, np.empty((0, 1), dtype=object), "BYTES")],
            f"expected 1 string elements for inference input '{tensors.IMAGE}'",
        ),
        "batch above max": Case(
            [(tensors.IMAGE, column([photo] * (contract.max_batch_size + 1)), "BYTES")],
            f"inference request batch-size must be <= {contract.max_batch_size}",
        ),
        "random bytes": Case(
            [(tensors.IMAGE, column([np.random.default_rng(3).bytes(3000)]), "BYTES")],
            f"image 0 of the request {pipeline_hint}it is not a JPEG or PNG file",
        ),
        "truncated JPEG": Case(
            [(tensors.IMAGE, column([photo[: len(photo) // 3]]), "BYTES")],
            f"image 0 of the request {pipeline_hint}",
        ),
        "PNG bomb": Case(
            [(tensors.IMAGE, column([bomb_png()]), "BYTES")],
            f"image 0 of the request is too large: its PNG header says {BOMB_SIDE}x{BOMB_SIDE} = "
            f"{BOMB_SIDE**2} pixels, over max_pixels",
        ),
        "zero pixels": Case(
            [(tensors.IMAGE, column([zero_width_png()]), "BYTES")],
            f"image 0 of the request {pipeline_hint}its PNG header says 0x{ZERO_HEIGHT}: no pixels",
        ),
        "1 MB string": Case(
            [(tensors.IMAGE, column([b"x" * ONE_MB]), "BYTES")],
            f"image 0 of the request {pipeline_hint}it is not a JPEG or PNG file",
        ),
        "item over size limit": Case(
            [(tensors.IMAGE, column([photo + bytes(contract.item_limit + 1 - len(photo))]), "BYTES")],
            f"the payload is {contract.item_limit + 1} bytes, over max_image_bytes {contract.item_limit}",
        ),
    }


def text_cases(contract: Contract) -> dict[str, Case]:
    good = GOOD_TEXT.encode()
    over = (b"word " * (contract.item_limit // 5 + 1))[: contract.item_limit + 1]
    where = f"input '{tensors.TEXT}' item 0"
    return {
        "wrong dtype": Case(
            [(tensors.TEXT, np.zeros((1, 1), np.int32), "INT32")],
            f"inference input '{tensors.TEXT}' data-type is 'INT32', but model",
        ),
        "wrong shape": Case(
            [(tensors.TEXT, column([good, good]).reshape(1, 2), "BYTES")],
            f"unexpected shape for input '{tensors.TEXT}'",
        ),
        "missing input": Case([], f"missing required input(s) ['{tensors.TEXT}']"),
        "extra input": Case(
            [(tensors.TEXT, column([good]), "BYTES"), ("bogus", column([b"x"]), "BYTES")],
            "Got input(s) ['bogus','text']",
        ),
        "empty batch": Case(
            [(tensors.TEXT, np.empty((0, 1), dtype=object), "BYTES")],
            f"expected 1 string elements for inference input '{tensors.TEXT}'",
        ),
        "batch above max": Case(
            [(tensors.TEXT, column([good] * (contract.max_batch_size + 1)), "BYTES")],
            f"inference request batch-size must be <= {contract.max_batch_size}",
        ),
        "invalid UTF-8": Case(
            [(tensors.TEXT, column([b"caf\xc3 \xff"]), "BYTES")],
            f"{where} is not valid UTF-8: invalid continuation byte at byte 3 (0xc3) of 6",
        ),
        "empty text": Case([(tensors.TEXT, column([b"  "]), "BYTES")], f"{where} is only whitespace"),
        "1 MB string": Case(
            [(tensors.TEXT, column([b"a" * ONE_MB]), "BYTES")],
            f"{where} is too long: {ONE_MB} bytes of UTF-8, over the limit of {contract.item_limit}",
        ),
        "item over size limit": Case(
            [(tensors.TEXT, column([over]), "BYTES")],
            f"{where} is too long: {contract.item_limit + 1} bytes of UTF-8, over the limit",
        ),
    }


def fraud_cases(contract: Contract) -> dict[str, Case]:
    # Long by design: one flat table of cases, each a request and its expected message, read as a list.
    record = good_record()
    first = next(iter(record))
    encoded = json.dumps(record).encode()
    values = np.asarray([list(record.values())], dtype=np.float32)
    where = f"input '{tensors.RECORD}' item 0"
    padded = encoded[:-1] + b" " * (contract.item_limit + 1 - len(encoded)) + b"}"
    return {
        "wrong dtype": Case(
            [(tensors.FEATURE_VALUES, values.astype(np.float64), "FP64")],
            f"inference input '{tensors.FEATURE_VALUES}' data-type is 'FP64', but model",
        ),
        "wrong shape": Case(
            [(tensors.FEATURE_VALUES, values[:, :-1], "FP32")],
            f"Expected [-1,{FRAUD_FEATURES}], got [1,{FRAUD_FEATURES - 1}]",
        ),
        "no input": Case([], "request has 0 inputs"),
        "both inputs": Case(
            [(tensors.RECORD, column([encoded]), "BYTES"), (tensors.FEATURE_VALUES, values, "FP32")],
            f"send exactly one of the inputs '{tensors.RECORD}' and '{tensors.FEATURE_VALUES}', got both",
        ),
        "extra input": Case(
            [(tensors.RECORD, column([encoded]), "BYTES"), ("bogus", column([b"x"]), "BYTES")],
            "unexpected inference input 'bogus'",
        ),
        "empty batch": Case(
            [(tensors.FEATURE_VALUES, np.zeros((0, FRAUD_FEATURES), np.float32), "FP32")],
            f"input byte size mismatch for input '{tensors.FEATURE_VALUES}'",
        ),
        "batch above max": Case(
            [(tensors.FEATURE_VALUES, np.repeat(values, contract.max_batch_size + 1, axis=0), "FP32")],
            f"inference request batch-size must be <= {contract.max_batch_size}",
        ),
        "64 MiB body": Case(
            [(tensors.FEATURE_VALUES, np.zeros((HUGE_BODY // (4 * FRAUD_FEATURES), FRAUD_FEATURES), np.float32),
              "FP32")],
            f"inference request batch-size must be <= {contract.max_batch_size}",
        ),
        "NaN value": Case(
            [(tensors.FEATURE_VALUES, np.where(np.arange(FRAUD_FEATURES) == 2, np.float32(np.nan), values),
              "FP32")],
            f"input '{tensors.FEATURE_VALUES}' item 0: feature '{list(record)[2]}' (column 2) must be a "
            "finite number, got nan",
        ),
        "infinite value": Case(
            [(tensors.FEATURE_VALUES, np.full_like(values, np.inf), "FP32")],
            f"input '{tensors.FEATURE_VALUES}' item 0: feature '{first}' (column 0) must be a finite "
            "number, got inf",
        ),
        "NaN in a record": Case(
            [(tensors.RECORD, column([json.dumps({**record, first: float("nan")}).encode()]), "BYTES")],
            f"{where}: feature '{first}' must be a finite number, got NaN",
        ),
        "Infinity in a record": Case(
            [(tensors.RECORD, column([json.dumps({**record, first: float("inf")}).encode()]), "BYTES")],
            f"{where}: feature '{first}' must be a finite number, got Infinity",
        ),
        "invalid UTF-8": Case(
            [(tensors.RECORD, column([b"{\xff}"]), "BYTES")], f"{where}: not UTF-8 text"
        ),
        "not JSON": Case(
            [(tensors.RECORD, column([b"amount=3"]), "BYTES")], f"{where}: not valid JSON"
        ),
        "1 MB string": Case(
            [(tensors.RECORD, column([b" " * ONE_MB]), "BYTES")],
            f"{where}: the record is {ONE_MB} bytes, over the limit of {contract.item_limit}",
        ),
        "item over size limit": Case(
            [(tensors.RECORD, column([padded]), "BYTES")],
            f"{where}: the record is {contract.item_limit + 1} bytes, over the limit of {contract.item_limit}",
        ),
    }


MAKERS: dict[str, Callable[[Contract], dict[str, Case]]] = {
    **{p: image_cases for p in IMAGE_PIPELINES},
    tensors.TEXT_EMBEDDER: text_cases,
    tensors.FRAUD_SCORER: fraud_cases,
}
COMMON_CASES = (
    "wrong dtype", "wrong shape", "extra input", "empty batch", "batch above max", "1 MB string",
    "item over size limit",
)
IMAGE_CASES = (
    *COMMON_CASES, "missing input", "random bytes", "truncated JPEG", "PNG bomb", "zero pixels",
)
CASE_NAMES = {
    **{p: IMAGE_CASES for p in IMAGE_PIPELINES},
    tensors.TEXT_EMBEDDER: (*COMMON_CASES, "missing input", "invalid UTF-8", "empty text"),
    tensors.FRAUD_SCORER: (
        *COMMON_CASES, "no input", "both inputs", "64 MiB body", "NaN value", "infinite value",
        "NaN in a record", "Infinity in a record", "invalid UTF-8", "not JSON",
    ),
}
"""The rows of the matrix per pipeline (the makers build them; a test checks both agree)."""
MATRIX = [(pipeline, name) for pipeline, names in CASE_NAMES.items() for name in names]


# --- sending ------------------------------------------------------------------------------------


def make_client(server: TritonServer, protocol: str) -> Any:
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def send(server: TritonServer, protocol: str, pipeline: str, inputs: list[Tensor]) -> Any:
    """The result, or the InferenceServerException the server answered with."""
    module = httpclient if protocol == "http" else grpcclient
    client = make_client(server, protocol)
    try:
        tensors_ = []
        for name, array, datatype in inputs:
            tensor = module.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors_.append(tensor)
        return client.infer(pipeline, tensors_)
    except InferenceServerException as error:
        return error
    finally:
        client.close()


def first_output(pipeline: str) -> str:
    return {tensors.TEXT_EMBEDDER: tensors.EMBEDDING, tensors.FRAUD_SCORER: tensors.SCORE}.get(
        pipeline, tensors.SCORES
    )


def assert_answered(result: Any, pipeline: str, items: int = 1) -> None:
    assert not isinstance(result, Exception), f"{pipeline}: a good request failed: {result}"
    output = result.as_numpy(first_output(pipeline))
    assert output.shape[0] == items and np.isfinite(output).all()


@dataclass(frozen=True)
class Processes:
    server: int
    stubs: frozenset[tuple[int, str]]


def processes(server: TritonServer) -> Processes:
    stubs = server.backend_processes()
    assert all(p.alive for p in stubs), [p.describe() for p in stubs if not p.alive]
    return Processes(server.pid, frozenset((p.pid, p.instance) for p in stubs))


@pytest.fixture(scope="module")
def cases(contracts) -> dict[str, dict[str, Case]]:
    """Every bad request of the matrix, built once."""
    return {pipeline: MAKERS[pipeline](contract) for pipeline, contract in contracts.items()}


def test_the_matrix_lists_every_case(cases) -> None:
    assert cases, "no pipeline is served"
    assert {p: tuple(sorted(c)) for p, c in cases.items()} == {
        p: tuple(sorted(names)) for p, names in CASE_NAMES.items() if p in cases
    }


@pytest.fixture(scope="module")
def before(server: TritonServer, contracts) -> Iterator[Processes]:
    """The processes before the matrix (and a good answer from every pipeline)."""
    for pipeline, contract in contracts.items():
        assert_answered(send(server, "grpc", pipeline, contract.good), pipeline)
    snapshot = processes(server)
    assert snapshot.stubs, "no backend stub processes found"
    yield snapshot


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("pipeline", "case"), MATRIX)
def test_bad_input_is_refused_with_its_reason(
    server: TritonServer, contracts, cases, before, pipeline: str, case: str, protocol: str
) -> None:
    contract = contract_of(contracts, pipeline)
    bad = cases[pipeline][case]
    with ThreadPoolExecutor(max_workers=2) as pool:  # a good request at the same moment
        good = pool.submit(send, server, protocol, pipeline, contract.good)
        result = pool.submit(send, server, protocol, pipeline, bad.inputs).result()
        good_result = good.result()
    assert isinstance(result, InferenceServerException), f"{pipeline} {case}: accepted"
    assert result.status() == INVALID[protocol], (result.status(), result.message())
    assert bad.expected in result.message(), result.message()
    assert_answered(good_result, pipeline)


def test_after_the_matrix_the_same_processes_serve(server: TritonServer, contracts, before) -> None:
    after = processes(server)
    assert after.server == before.server and server.running
    assert after.stubs == before.stubs, {"gone": before.stubs - after.stubs, "new": after.stubs - before.stubs}
    assert server.crashed_backends() == []
    for pipeline, contract in contracts.items():
        for protocol in PROTOCOLS:
            assert_answered(send(server, protocol, pipeline, contract.good), pipeline)
        batch = [(n, np.repeat(a, contract.max_batch_size, axis=0), d) for n, a, d in contract.good]
        assert_answered(send(server, "grpc", pipeline, batch), pipeline, contract.max_batch_size)
