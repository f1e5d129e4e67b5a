"""Property-based fuzzing of the preprocessing steps' pure logic (issue 7, item 1).

Generated inputs (random bytes, mutated real JPEG and PNG files, crafted image headers, random
unicode and byte texts, random JSON records and value rows, odd request shapes) go through
`Step.run` of kiln_image, kiln_text and kiln_tabular, each inside a dynamic batch between two good
requests, built from the served specs' own parameters. For every generated request:

- the step returns one result per request and never raises;
- the fuzzed request's result is either outputs of the contract's shape and dtype, or an exception
  that is a `ValueError` (the adapter answers INVALID_ARG) with a message;
- the good requests of the same batch get exactly the outputs they get alone.

The examples are bounded (CI time) and derandomized, so a run is reproducible; set
KILN_FUZZ_EXAMPLES to fuzz longer and KILN_FUZZ_RANDOM=1 to draw new examples on each run.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from kiln import paths, tensors
from kiln.models.digits import pipeline as digits_pipeline
from kiln.models.resnet50 import pipeline as resnet50_pipeline
from kiln.models.text_encoder import pipeline as text_pipelines
from kiln.repository import config_dict
from kiln.serving.image import ImagePreprocessor, from_config
from kiln.serving.params import parse_params
from kiln.serving.tabular import FeatureStandardizer, TabularStep
from kiln.serving.text import TEXT_PARAMS, TextParams, TextTokenizer

EXAMPLES = int(os.environ.get("KILN_FUZZ_EXAMPLES", "60"))
"""Examples per property (each runs a batch of three requests)."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a shared 2-core machine: timing is not the property under test
    derandomize=os.environ.get("KILN_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_MUTATIONS = 8
MAX_RANDOM_BYTES = 2048
SEED_SIZES = ((40, 30), (17, 64))
"""(width, height) of the real files that are mutated."""
FEATURES = ("amount", "hour", "distance_km", "v1")
"""A small feature set: the step's logic does not depend on which features there are."""
MEANS = (50.0, 12.0, 8.0, 0.0)
STDS = (30.0, 7.0, 5.0, 1.0)
GOOD_TEXT = "a good sentence about serving models"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- the steps, as served ----------------------------------------------------------------------


def image_step(spec) -> ImagePreprocessor:
    return from_config(spec.name, config_dict(spec), dict(spec.parameters))


@pytest.fixture(scope="module", params=["resnet50", "digits"])
def image(request) -> ImagePreprocessor:
    spec = {
        "resnet50": resnet50_pipeline.RESNET50_PREPROCESS_SPEC,
        "digits": digits_pipeline.DIGITS_PREPROCESS_SPEC,
    }[request.param]
    return image_step(spec)


@pytest.fixture(scope="module")
def text() -> TextTokenizer:
    """kiln_text with the spec's parameters and the build's tokenizer (the published file when
    the repository is built, else trained here exactly as the build trains it)."""
    spec = text_pipelines.TOKENIZER_SPEC
    params = parse_params(spec.name, dict(spec.parameters), TEXT_PARAMS, TextParams)
    published = paths.model_repository() / params.tokenizer_model / "1" / params.tokenizer_file
    if published.is_file():
        return TextTokenizer.from_file(published, params, spec.name)
    from kiln.models.text_encoder import build as text_encoder
    from kiln.registry import by_name

    tokenizer = text_encoder.train_tokenizer(by_name(params.tokenizer_model).build.source)
    return TextTokenizer(tokenizer, params, spec.name)


@pytest.fixture(scope="module")
def tabular() -> TabularStep:
    stats = FeatureStandardizer(FEATURES, np.asarray(MEANS), np.asarray(STDS))
    return TabularStep(
        stats, records_input=tensors.RECORD, values_input=tensors.FEATURE_VALUES, output="features"
    )


# --- helpers ------------------------------------------------------------------------------------


def column(items: Sequence[Any]) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=object)
    array[:, 0] = list(items)
    return array


def encoded(pixels: np.ndarray, kind: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, kind, **options)
    return buffer.getvalue()


def seed_files() -> list[bytes]:
    """Real files to mutate: baseline and progressive JPEG, grey/RGB/RGBA/palette PNG."""
    rng = np.random.default_rng(0)
    files = []
    for width, height in SEED_SIZES:
        rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        files.append(encoded(rgb, "JPEG", quality=80))
        files.append(encoded(rgb, "JPEG", quality=60, progressive=True))
        files.append(encoded(rgb[:, :, 0], "PNG"))
        files.append(encoded(np.dstack([rgb, rgb[:, :, :1]]), "PNG"))
        palette = Image.fromarray(rgb).convert("P")
        buffer = io.BytesIO()
        palette.save(buffer, "PNG")
        files.append(buffer.getvalue())
    return files


SEEDS = seed_files()


def png_with_header(width: int, height: int, bit_depth: int, colour: int, body: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return PNG_SIGNATURE + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(body)) + chunk(b"IEND", b"")


def jpeg_with_frame(width: int, height: int, tail: bytes) -> bytes:
    frame = struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(frame) + 2) + frame + tail


@st.composite
def mutated_file(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, MAX_MUTATIONS))):
        action = draw(st.sampled_from(("flip", "truncate", "insert", "delete")))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif action == "truncate":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif data:
            del data[at : at + draw(st.integers(1, 64))]
    return bytes(data)


image_payloads = st.one_of(
    st.binary(max_size=MAX_RANDOM_BYTES),
    st.binary(max_size=MAX_RANDOM_BYTES).map(lambda b: PNG_SIGNATURE + b),
    st.binary(max_size=MAX_RANDOM_BYTES).map(lambda b: b"\xff\xd8\xff" + b),
    mutated_file(),
    st.builds(
        png_with_header,
        st.integers(0, 2**32 - 1) | st.integers(0, 64),
        st.integers(0, 2**32 - 1) | st.integers(0, 64),
        st.sampled_from((1, 2, 4, 8, 16, 3)),
        st.sampled_from((0, 2, 3, 4, 6, 5)),
        st.binary(max_size=256),
    ),
    st.builds(
        jpeg_with_frame,
        st.integers(0, 2**16 - 1) | st.integers(0, 64),
        st.integers(0, 2**16 - 1) | st.integers(0, 64),
        st.binary(max_size=256),
    ),
    st.text(max_size=64),  # a str where bytes belong
)


def run_between_good(step: Any, good: Mapping[str, np.ndarray], fuzzed: Mapping[str, Any]) -> Any:
    """Runs [good, fuzzed, good] as one dynamic batch; checks the good ones; returns the fuzzed
    request's result."""
    alone = step.run([dict(good)])
    results = step.run([dict(good), dict(fuzzed), dict(good)])
    assert isinstance(results, list) and len(results) == 3
    for result in (results[0], results[2]):
        assert isinstance(result, dict), f"a good request failed beside a fuzzed one: {result!r}"
        assert result.keys() == alone[0].keys()
        for name, array in result.items():
            np.testing.assert_array_equal(array, alone[0][name])
    return results[1]


def assert_clear_error(result: Any) -> None:
    assert isinstance(result, ValueError), f"{type(result).__name__}: {result}"
    assert str(result).strip(), "an error without a message"


# --- kiln_image ---------------------------------------------------------------------------------


@FUZZ
@given(payloads=st.lists(image_payloads, min_size=1, max_size=3))
def test_image_step_answers_or_names_the_bad_image(image: ImagePreprocessor, payloads: list[Any]) -> None:
    good = {image.input_name: column([SEEDS[0]])}
    result = run_between_good(image, good, {image.input_name: column(payloads)})
    if isinstance(result, Exception):
        assert_clear_error(result)
        assert "image " in str(result) or f"input '{image.input_name}'" in str(result)
        return
    output = result[image.output_name]
    assert output.shape == (len(payloads), image.channels, image.size, image.size)
    assert output.dtype == image.output_dtype and np.isfinite(output).all()


@FUZZ
@given(shape=st.sampled_from([(0, 1), (1, 2), (2,), (1, 1, 1)]))
def test_image_step_refuses_a_malformed_request_shape(image: ImagePreprocessor, shape: tuple[int, ...]) -> None:
    array = np.empty(shape, dtype=object)
    array.fill(SEEDS[0])
    good = {image.input_name: column([SEEDS[0]])}
    assert_clear_error(run_between_good(image, good, {image.input_name: array}))


# --- kiln_text ----------------------------------------------------------------------------------


text_items = st.one_of(
    st.text(max_size=300).map(lambda t: t.encode("utf-8")),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=50),  # str items
    st.binary(max_size=300),
    st.sampled_from(("\u200b\u200c", "\ufffd", "\x00\x01", " \t\n", "")).map(str.encode),
    st.integers(1, 6).map(lambda n: ("long words " * (n * 700)).encode()),  # around max_text_bytes
)


@FUZZ
@given(items=st.lists(text_items, min_size=1, max_size=4))
def test_text_step_answers_or_names_the_bad_text(text: TextTokenizer, items: list[Any]) -> None:
    good = {tensors.TEXT: column([GOOD_TEXT.encode()])}
    result = run_between_good(text, good, {tensors.TEXT: column(items)})
    if isinstance(result, Exception):
        assert_clear_error(result)
        assert f"input '{tensors.TEXT}'" in str(result) or "missing input" in str(result)
        return
    ids, mask = result[tensors.TEXT_INPUT_IDS], result[tensors.TEXT_ATTENTION_MASK]
    assert ids.dtype == mask.dtype == np.int64
    assert ids.shape == mask.shape and ids.shape[0] == len(items)
    assert 3 <= ids.shape[1] <= text.params.max_length
    assert set(np.unique(mask)) <= {0, 1} and (mask.sum(axis=1) >= 3).all()


# --- kiln_tabular -------------------------------------------------------------------------------


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**400), 10**400),
    st.floats(-1e6, 1e6),
)


@st.composite
def records(draw: st.DrawFn) -> bytes | str:
    kind = draw(st.sampled_from(("exact", "keys", "json", "bytes", "text")))
    if kind == "bytes":
        return draw(st.binary(max_size=512))
    if kind == "text":
        return draw(st.text(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    names = list(FEATURES)
    if kind == "keys":
        names = draw(st.lists(st.sampled_from((*FEATURES, "amout", "extra", "")), max_size=6))
    record = {name: draw(numbers | json_scalars) for name in names}
    text = json.dumps(record) if all(
        not isinstance(v, int) or abs(v) < 10**4000 for v in record.values()
    ) else "{}"
    return text.encode() if draw(st.booleans()) else text


value_rows = st.lists(
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=len(FEATURES),
             max_size=len(FEATURES)),
    min_size=1, max_size=3,
)


def good_record() -> bytes:
    return json.dumps(dict(zip(FEATURES, MEANS, strict=True))).encode()


@FUZZ
@given(items=st.lists(records(), min_size=1, max_size=3))
def test_tabular_step_answers_or_names_the_bad_record(tabular: TabularStep, items: list[Any]) -> None:
    good = {tensors.RECORD: column([good_record()]), tensors.FEATURE_VALUES: None}
    fuzzed = {tensors.RECORD: column(items), tensors.FEATURE_VALUES: None}
    result = run_between_good(tabular, good, fuzzed)
    if isinstance(result, Exception):
        assert_clear_error(result)
        assert f"input '{tensors.RECORD}' item " in str(result)
        return
    features = result["features"]
    assert features.shape == (len(items), len(FEATURES)) and features.dtype == np.float32
    assert np.isfinite(features).all()


@FUZZ
@given(rows=value_rows, both=st.booleans(), dtype=st.sampled_from((np.float32, np.float64, np.int32)))
def test_tabular_step_answers_or_names_the_bad_values(
    tabular: TabularStep, rows: list[list[float]], both: bool, dtype: type
) -> None:
    values = np.asarray(rows, dtype=np.float32)
    if dtype is not np.float32:
        values = np.zeros(values.shape, dtype)
    good = {tensors.RECORD: None, tensors.FEATURE_VALUES: np.asarray([MEANS], np.float32)}
    fuzzed = {tensors.RECORD: column([good_record()]) if both else None, tensors.FEATURE_VALUES: values}
    result = run_between_good(tabular, good, fuzzed)
    float32_max = float(np.finfo(np.float32).max)
    expected_finite = all(
        math.isfinite(v) and abs((v - m) / s) <= float32_max
        for row in rows for v, m, s in zip(row, MEANS, STDS, strict=True)
    )
    if both or dtype is not np.float32 or not expected_finite:
        assert_clear_error(result)
        return
    assert isinstance(result, dict), result
    assert result["features"].shape == (len(rows), len(FEATURES))
    assert np.isfinite(result["features"]).all()


def test_the_seed_files_decode(image: ImagePreprocessor) -> None:
    """The mutations start from files the step accepts (else the fuzzing would test nothing)."""
    results = image.run([{image.input_name: column([seed])} for seed in SEEDS])
    assert all(isinstance(r, dict) for r in results), results


def test_a_fuzzed_request_alone_is_never_an_internal_error(tabular: TabularStep, text: TextTokenizer) -> None:
    """A missing input is the request's error too (the adapter passes None for it)."""
    assert_clear_error(text.run([{tensors.TEXT: None}])[0])
    assert_clear_error(tabular.run([{tensors.RECORD: None, tensors.FEATURE_VALUES: None}])[0])

