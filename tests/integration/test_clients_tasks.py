"""The task clients against kiln's served pipelines, over HTTP and gRPC, sync and asyncio.

Each task client's answers must equal what the pipeline returns to tritonclient called directly
(the expected values never come from the SDK), whatever the input form (encoded bytes, file
paths, numpy arrays; records or feature arrays), split into requests of the pipeline's
max_batch_size in input order; and a bad item (a corrupt image, an empty text, a record missing a
feature) gets its own error naming the item while the other items get their results.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import tritonclient.http as httpclient
from PIL import Image

from kiln import paths, tensors
from kiln.clients import (
    AsyncDigitsReader,
    AsyncFraudScorer,
    AsyncImageClassifier,
    AsyncTextEmbedder,
    Classification,
    Client,
    DigitsReader,
    FraudScorer,
    ImageClassifier,
    InvalidInputError,
    KilnError,
    TextEmbedder,
    shm,
)
from kiln.models.digits.build import load_split
from kiln.registry import by_name
from kiln.server import TritonServer

PROTOCOLS = ("http", "grpc")
GREY_LEVELS = 255
DIGITS_CHECKED = 120
MIN_DIGITS_ACCURACY = 0.9
"""The served digits CNN reaches about 0.97 on the held-out split; a broken encoding (wrong
polarity, scaling, channel order) falls far below this."""


def require(*models: str) -> None:
    """Skips when a pipeline is not in the model repository at all (never otherwise)."""
    missing = [m for m in models if not (paths.model_repository() / m / "config.pbtxt").is_file()]
    if missing:
        pytest.skip(f"pipeline(s) {', '.join(missing)} not in the model repository {paths.model_repository()}")


def urls(server: TritonServer) -> dict[str, str]:
    return {"http": f"http://{server.http_url}", "grpc": f"grpc://{server.grpc_url}"}


def raw(server: TritonServer, model: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The expected answer: one request through tritonclient's HTTP client, called directly."""
    with httpclient.InferenceServerClient(server.http_url) as client:
        tensors_in = []
        for name, array in inputs.items():
            datatype = "BYTES" if array.dtype == object else "FP32"
            tensor = httpclient.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors_in.append(tensor)
        result = client.infer(model, tensors_in)
        return {o["name"]: result.as_numpy(o["name"]) for o in result.get_response()["outputs"]}


def column(values: Sequence[bytes]) -> np.ndarray:
    out = np.empty((len(values), 1), dtype=object)
    out[:, 0] = list(values)
    return out


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def assert_same_classes(got: Sequence[Classification], expected: dict[str, np.ndarray]) -> None:
    assert len(got) == len(expected[tensors.LABELS])
    for i, item in enumerate(got):
        assert item.labels == tuple(v.decode() for v in expected[tensors.LABELS][i]), i
        assert item.class_indices == tuple(int(v) for v in expected[tensors.CLASS_INDICES][i]), i
        np.testing.assert_allclose(item.scores, expected[tensors.SCORES][i], rtol=1e-5, atol=1e-6)
        assert item.latency_s > 0


# --- images ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    """Photographs of different sizes and color modes: RGB 512x512, grey 512x512, RGB 451x300."""
    return [skimage.data.astronaut(), skimage.data.camera(), skimage.data.chelsea()]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Held-out test digits as uint8 images (scikit-learn's levels v/16 -> round(v * 255)), labels."""
    split = load_split(by_name("digits").build.source)
    images = np.rint(split.x_test[:DIGITS_CHECKED, 0] * GREY_LEVELS).astype(np.uint8)
    return images, split.y_test[:DIGITS_CHECKED]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_image_classifier_takes_bytes_paths_and_arrays(
    server: TritonServer, protocol: str, photos: list[np.ndarray], tmp_path: Path
) -> None:
    require(tensors.IMAGE_CLASSIFIER)
    files = [jpeg(photos[0]), png(photos[1]), png(photos[2])]
    expected = raw(server, tensors.IMAGE_CLASSIFIER, {tensors.IMAGE: column(files)})
    path = tmp_path / "camera.png"
    path.write_bytes(files[1])
    with ImageClassifier(urls(server)[protocol]) as classifier:
        got = classifier.classify_batch([files[0], path, photos[2]], request_id="img")
        single = classifier.classify(str(path))
        assert classifier.classify_batch([]) == []
    assert_same_classes(got, expected)
    assert single.labels == got[1].labels and single.label == got[1].labels[0]
    assert len(got[0].labels) == 5 and got[0].request_id == "img"
    assert list(got[0].scores) == sorted(got[0].scores, reverse=True)


def test_image_clients_split_large_calls_in_order(server: TritonServer, digits) -> None:
    require(tensors.DIGITS_READER)
    images, _ = digits
    max_batch = by_name(tensors.DIGITS_READER).max_batch_size
    files = [png(images[i % len(images)]) for i in range(2 * max_batch + 10)]
    expected = {
        name: np.concatenate([
            raw(server, tensors.DIGITS_READER, {tensors.IMAGE: column(files[i : i + max_batch])})[name]
            for i in range(0, len(files), max_batch)
        ])
        for name in (tensors.LABELS, tensors.SCORES, tensors.CLASS_INDICES)
    }
    with DigitsReader(urls(server)["grpc"], concurrency=2) as reader:
        assert reader.info().max_batch_size == max_batch
        got = reader.classify_batch(files, request_id="split")
    assert_same_classes(got, expected)
    assert [c.request_id for c in got] == ["split-0"] * max_batch + ["split-1"] * max_batch + ["split-2"] * 10


def test_image_classifier_int8_pipeline(server: TritonServer, photos: list[np.ndarray]) -> None:
    require(tensors.IMAGE_CLASSIFIER_INT8)
    files = [jpeg(photos[0])]
    expected = raw(server, tensors.IMAGE_CLASSIFIER_INT8, {tensors.IMAGE: column(files)})
    with ImageClassifier(urls(server)["http"], model=tensors.IMAGE_CLASSIFIER_INT8) as classifier:
        assert_same_classes(classifier.classify_batch(files), expected)


def test_async_image_classifier(server: TritonServer, photos: list[np.ndarray]) -> None:
    require(tensors.IMAGE_CLASSIFIER)
    files = [jpeg(photos[0]), png(photos[1])]
    expected = raw(server, tensors.IMAGE_CLASSIFIER, {tensors.IMAGE: column(files)})

    async def run(url: str) -> None:
        async with AsyncImageClassifier(url) as classifier:
            got = await classifier.classify_batch(files)
            assert_same_classes(got, expected)
            one = await classifier.classify(files[1])
            assert one.labels == got[1].labels

    for url in urls(server).values():
        asyncio.run(run(url))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_digits_reader_reads_digits(server: TritonServer, protocol: str, digits) -> None:
    require(tensors.DIGITS_READER)
    images, labels = digits
    expected = raw(server, tensors.DIGITS_READER, {tensors.IMAGE: column([png(i) for i in images[:64]])})
    with DigitsReader(urls(server)[protocol]) as reader:
        got = reader.classify_batch(list(images))  # numpy arrays: encoded by the SDK
    assert_same_classes(got[:64], expected)
    accuracy = np.mean([int(c.label) == y for c, y in zip(got, labels, strict=True)])
    assert accuracy >= MIN_DIGITS_ACCURACY
    assert all(len(c.labels) == 3 and set(c.labels) <= set("0123456789") for c in got)


def test_async_digits_reader(server: TritonServer, digits) -> None:
    require(tensors.DIGITS_READER)
    images, labels = digits

    async def run(url: str) -> list[Classification]:
        async with AsyncDigitsReader(url) as reader:
            return await reader.classify_batch(list(images[:70]))

    by_protocol = [asyncio.run(run(url)) for url in urls(server).values()]
    assert [c.labels for c in by_protocol[0]] == [c.labels for c in by_protocol[1]]
    assert np.mean([int(c.label) == y for c, y in zip(by_protocol[0], labels[:70], strict=True)]) >= MIN_DIGITS_ACCURACY


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_corrupt_image_fails_alone(server: TritonServer, protocol: str, digits) -> None:
    require(tensors.DIGITS_READER)
    images, _ = digits
    batch: list = [png(images[0]), png(images[1]), b"this is not an image", png(images[3]), b""]
    with DigitsReader(urls(server)[protocol]) as reader:
        results = reader.classify_batch(batch, return_exceptions=True)
        good = reader.classify_batch([batch[i] for i in (0, 1, 3)])
        assert [type(r).__name__ for r in results] == [
            "Classification", "Classification", "InvalidInputError", "Classification", "InvalidInputError",
        ]
        assert [results[i].labels for i in (0, 1, 3)] == [g.labels for g in good]
        assert results[2].item == 2 and str(results[2]).startswith("item 2 of 5: model 'digits_reader'")
        assert "could not be decoded" in results[2].server_message
        assert str(results[4]) == "image 4: the image is empty (0 bytes)", "caught before sending"
        with pytest.raises(InvalidInputError) as caught:
            reader.classify_batch(batch[:4])
    assert caught.value.item == 2 and "could not be decoded" in str(caught.value)


@pytest.mark.skipif(not shm.available(), reason="no POSIX shared memory at /dev/shm here")
def test_task_clients_over_shared_memory(server: TritonServer, digits) -> None:
    require(tensors.DIGITS_READER, tensors.TEXT_EMBEDDER)
    before = {p.name for p in shm.SHM_DIR.glob(f"{shm.REGION_PREFIX}{os.getpid()}_*")}
    images, _ = digits
    with Client(urls(server)["http"], shared_memory=True) as client:
        with DigitsReader(client) as reader, TextEmbedder(client) as embedder:
            got = reader.classify_batch(list(images[:20]))
            vectors = embedder.embed(["shared memory", "works"]).vectors
        assert client._closed is False, "a borrowed client stays open"
    expected = raw(server, tensors.DIGITS_READER, {tensors.IMAGE: column([png(i) for i in images[:20]])})
    assert_same_classes(got, expected)
    plain = raw(server, tensors.TEXT_EMBEDDER, {tensors.TEXT: column([b"shared memory", b"works"])})
    np.testing.assert_allclose(vectors, plain[tensors.EMBEDDING], rtol=1e-5, atol=1e-6)
    assert {p.name for p in shm.SHM_DIR.glob(f"{shm.REGION_PREFIX}{os.getpid()}_*")} == before


# --- text --------------------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A fraud alert was raised on a card transaction.",
    "Kiln serves models on Triton.",
    "ü, é and 漢字 are UTF-8 too",
]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_text_embedder(server: TritonServer, protocol: str) -> None:
    require(tensors.TEXT_EMBEDDER)
    max_batch = by_name(tensors.TEXT_EMBEDDER).max_batch_size
    texts = [f"{TEXTS[i % len(TEXTS)]} #{i}" for i in range(max_batch + 5)]
    expected = np.concatenate([
        raw(server, tensors.TEXT_EMBEDDER, {tensors.TEXT: column([t.encode() for t in texts[i : i + max_batch]])})[
            tensors.EMBEDDING
        ]
        for i in range(0, len(texts), max_batch)
    ])
    with TextEmbedder(urls(server)[protocol]) as embedder:
        embeddings = embedder.embed(texts, request_id="txt")
        one = embedder.embed(texts[3])
        none = embedder.embed([])
    assert embeddings.vectors.dtype == np.float32 and embeddings.vectors.shape == expected.shape
    assert len(embeddings) == len(texts) and embeddings.dim == expected.shape[1]
    np.testing.assert_allclose(embeddings.vectors, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(embeddings.vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one.vectors[0], expected[3], rtol=1e-5, atol=1e-6)
    assert embeddings.request_id == "txt" and embeddings.latency_s > 0
    assert none.vectors.shape == (0, expected.shape[1])


def test_async_text_embedder(server: TritonServer) -> None:
    require(tensors.TEXT_EMBEDDER)
    expected = raw(server, tensors.TEXT_EMBEDDER, {tensors.TEXT: column([t.encode() for t in TEXTS])})[
        tensors.EMBEDDING
    ]

    async def run(url: str) -> None:
        async with AsyncTextEmbedder(url) as embedder:
            got = await embedder.embed(TEXTS)
            np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)

    for url in urls(server).values():
        asyncio.run(run(url))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_empty_text_is_named(server: TritonServer, protocol: str) -> None:
    require(tensors.TEXT_EMBEDDER)
    with TextEmbedder(urls(server)[protocol]) as embedder:
        with pytest.raises(InvalidInputError) as caught:
            embedder.embed(["fine", "also fine", "", "fine again"])
        assert embedder.embed(["fine"]).vectors.shape[0] == 1, "the client keeps working"
    assert str(caught.value).startswith("item 2 of 4: model 'text_embedder'")
    assert caught.value.item == 2 and "empty" in caught.value.server_message


# --- fraud -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transactions() -> tuple[list[dict[str, float]], np.ndarray]:
    """Held-out-like transactions as records and as feature rows, from the build's feature list."""
    stats = json.loads((paths.model_repository() / "fraud" / "1" / "features.json").read_text())
    names, mean, std = stats["features"], np.array(stats["mean"]), np.array(stats["std"])
    rows = (mean + std * np.random.default_rng(3).normal(size=(300, len(names)))).astype(np.float32)
    rows[:5] = mean + std * 4  # far from the mean: likely flagged
    records = [{n: float(v) for n, v in zip(names, row, strict=True)} for row in rows]
    return records, rows


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_fraud_scorer_records_and_feature_arrays(server: TritonServer, protocol: str, transactions) -> None:
    require(tensors.FRAUD_SCORER)
    records, rows = transactions
    max_batch = by_name(tensors.FRAUD_SCORER).max_batch_size
    expected = {
        name: np.concatenate([
            raw(server, tensors.FRAUD_SCORER, {tensors.FEATURE_VALUES: rows[i : i + max_batch]})[name]
            for i in range(0, len(rows), max_batch)
        ])
        for name in (tensors.SCORE, tensors.DECISION)
    }
    with FraudScorer(urls(server)[protocol]) as scorer:
        from_records = scorer.score_batch(records)
        from_rows = scorer.score_batch(rows)
        one = scorer.score(records[0])
        assert scorer.score_batch([]) == []
    for got in (from_records, from_rows):
        np.testing.assert_allclose([s.score for s in got], expected[tensors.SCORE][:, 0], rtol=1e-5, atol=1e-6)
        assert [s.decision for s in got] == expected[tensors.DECISION][:, 0].tolist()
    assert one.score == pytest.approx(from_records[0].score, abs=1e-6)
    assert 0 < sum(s.decision for s in from_rows) < len(rows), "both decisions should occur"


def test_async_fraud_scorer(server: TritonServer, transactions) -> None:
    require(tensors.FRAUD_SCORER)
    records, rows = transactions
    expected = raw(server, tensors.FRAUD_SCORER, {tensors.FEATURE_VALUES: rows[:10]})[tensors.SCORE][:, 0]

    async def run(url: str) -> None:
        async with AsyncFraudScorer(url) as scorer:
            got = await scorer.score_batch(records[:10])
            np.testing.assert_allclose([s.score for s in got], expected, rtol=1e-5, atol=1e-6)
            assert (await scorer.score(rows[0])).score == pytest.approx(float(expected[0]), abs=1e-6)

    for url in urls(server).values():
        asyncio.run(run(url))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_record_missing_a_feature_fails_alone(server: TritonServer, protocol: str, transactions) -> None:
    require(tensors.FRAUD_SCORER)
    records, _ = transactions
    batch = [dict(r) for r in records[:6]]
    missing = next(iter(batch[4]))
    del batch[4][missing]
    with FraudScorer(urls(server)[protocol]) as scorer:
        results = scorer.score_batch(batch, return_exceptions=True)
        good = scorer.score_batch(records[:4])
    assert [type(r).__name__ for r in results] == ["FraudScore"] * 4 + ["InvalidInputError", "FraudScore"]
    assert [r.score for r in results[:4]] == pytest.approx([g.score for g in good], abs=1e-6)
    error = results[4]
    assert isinstance(error, KilnError) and error.item == 4
    assert str(error).startswith("item 4 of 6: model 'fraud_scorer'") and f"'{missing}'" in str(error)
