"""Typed task clients for kiln's pipelines: what services call every day.

- `ImageClassifier` / `AsyncImageClassifier`: the image_classifier pipeline (ResNet-50; or
  image_classifier_int8 with `model=`): image bytes, file paths or uint8 arrays in, one
  `Classification` (top-5 labels, scores, class indices) per image out.
- `DigitsReader` / `AsyncDigitsReader`: the digits_reader pipeline, the same in and out (top-3 of
  the labels "0".."9").
- `TextEmbedder` / `AsyncTextEmbedder`: the text_embedder pipeline: strings in, `Embeddings` (an
  N x D float32 array, rows L2-normalized) out.
- `FraudScorer` / `AsyncFraudScorer`: the fraud_scorer pipeline: records (dicts of named features)
  or an N x F array of feature values in, one `FraudScore` (score, decision) per transaction out.

Each takes a URL (and then owns a `Client`/`AsyncClient` made with the given options) or an
existing client (borrowed, not closed). Large calls are split into requests of the pipeline's
max_batch_size and sent concurrently, results in input order. When a request of several items
fails with an error one item can cause (a corrupt image, an empty text, a record missing a
feature), its items are resent one by one, so the error names the item and, with
`return_exceptions=True`, every other item still gets its result.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Union

import numpy as np

from kiln import tensors
from kiln.clients.client import DEFAULT, DEFAULT_URL, AsyncClient, Client, Part, raise_first_failure
from kiln.clients.errors import InvalidInputError, KilnError
from kiln.clients.images import ImageInput, image_bytes
from kiln.clients.models import ModelInfo, validate_inputs
from kiln.clients.results import Classification, Embeddings, FraudScore

Record = Mapping[str, float]
"""One transaction: feature name -> value in raw units (the pipeline standardizes them)."""
Records = Union[Sequence[Record], np.ndarray]  # noqa: UP007 - a runtime alias on Python 3.10
"""Several transactions: a sequence of records, or an N x F array of feature values in the
pipeline's feature order."""


# --- pure helpers: encoding requests, decoding results -------------------------------------------


def _label(error: KilnError, item: int, total: int) -> KilnError:
    """A copy of `error` naming `item` (for return_exceptions results)."""
    if total == 1:
        return error
    copy = error.for_items(range(item, item + 1), total)
    copy.message = f"item {item} of {total}: {error.message}"
    copy.args = (copy.message,)
    if isinstance(copy, InvalidInputError):
        copy.item = item
    return copy


def _bytes_column(values: Sequence[bytes]) -> np.ndarray:
    column = np.empty((len(values), 1), dtype=np.object_)
    for i, value in enumerate(values):
        column[i, 0] = value
    return column


def encode_images(images: Iterable[ImageInput]) -> tuple[list[bytes | None], dict[int, InvalidInputError]]:
    """Each image's encoded bytes, and an InvalidInputError for each image that has none."""
    encoded: list[bytes | None] = []
    errors: dict[int, InvalidInputError] = {}
    for i, image in enumerate(images):
        try:
            encoded.append(image_bytes(image))
        except (ValueError, OSError) as error:
            encoded.append(None)
            errors[i] = InvalidInputError(
                f"image {i}: {error}", input_name=tensors.IMAGE, item=i, given=type(image).__name__
            )
    return encoded, errors


def _image_request(
    images: Iterable[ImageInput], return_exceptions: bool
) -> tuple[list[Any], list[int], dict[str, np.ndarray] | None]:
    """What a classify_batch call sends: the result list (undecodable images already holding
    their InvalidInputError), the positions of the images sent, and the IMAGE column (None when
    no image is left to send). Without return_exceptions the first bad image is raised."""
    encoded, errors = encode_images(images)
    if errors and not return_exceptions:
        raise next(iter(errors.values()))
    results: list[Any] = [None] * len(encoded)
    for i, error in errors.items():
        results[i] = error
    positions = [i for i in range(len(encoded)) if i not in errors]
    if not positions:
        return results, positions, None
    return results, positions, {tensors.IMAGE: _bytes_column([encoded[i] for i in positions])}


def _collect_classifications(
    parts: Sequence[Part], positions: Sequence[int], results: list[Any], return_exceptions: bool
) -> None:
    """Fills `results` at `positions` from the requests' parts (raising the first failure unless
    return_exceptions)."""
    if not return_exceptions:
        raise_first_failure(parts, len(results))
    collect(parts, positions, results, classification, len(results))


def encode_texts(texts: Sequence[str]) -> np.ndarray:
    """The TEXT column (UTF-8 bytes); InvalidInputError naming an item that is not a str."""
    values = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(
                f"text {i}: expected str, given {type(text).__name__}",
                input_name=tensors.TEXT, item=i, expected="str", given=type(text).__name__,
            )
        values.append(text.encode("utf-8"))
    return _bytes_column(values)


def encode_record(record: Any, item: int) -> bytes:
    """One record as the JSON the RECORD input takes; InvalidInputError naming the item."""
    if not isinstance(record, Mapping):
        raise InvalidInputError(
            f"record {item}: expected a mapping of feature name -> number, given {type(record).__name__}",
            input_name=tensors.RECORD, item=item, given=type(record).__name__,
        )
    for name, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise InvalidInputError(
                f"record {item}: feature '{name}' must be a number, given {type(value).__name__}",
                input_name=tensors.RECORD, item=item, given=type(value).__name__,
            )
        if not math.isfinite(float(value)):
            raise InvalidInputError(
                f"record {item}: feature '{name}' must be finite, given {float(value)}",
                input_name=tensors.RECORD, item=item, given=str(float(value)),
            )
    return json.dumps({str(k): float(v) for k, v in record.items()}).encode("utf-8")


def fraud_inputs(records: Records) -> dict[str, np.ndarray]:
    """The fraud_scorer request for records (RECORD) or a feature array (FEATURE_VALUES)."""
    if isinstance(records, np.ndarray):
        if records.dtype.kind not in "fiu":
            raise InvalidInputError(
                f"feature values must be numbers, given numpy {records.dtype}",
                input_name=tensors.FEATURE_VALUES, given=str(records.dtype),
            )
        values = records.astype(np.float32, copy=False)
        return {tensors.FEATURE_VALUES: values[None] if values.ndim == 1 else values}
    if isinstance(records, Mapping):
        records = [records]
    return {tensors.RECORD: _bytes_column([encode_record(r, i) for i, r in enumerate(records)])}


def classification(result: Any, row: int) -> Classification:
    """Row `row` of an image pipeline's result as a Classification."""
    labels = result[tensors.LABELS][row]
    return Classification(
        labels=tuple(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in labels),
        scores=tuple(float(v) for v in result[tensors.SCORES][row]),
        class_indices=tuple(int(v) for v in result[tensors.CLASS_INDICES][row]),
        latency_s=result.latency_s,
        request_id=result.request_id,
    )


def fraud_score(result: Any, row: int) -> FraudScore:
    """Row `row` of a fraud_scorer result as a FraudScore."""
    return FraudScore(
        score=float(np.asarray(result[tensors.SCORE][row]).reshape(-1)[0]),
        decision=bool(np.asarray(result[tensors.DECISION][row]).reshape(-1)[0]),
        latency_s=result.latency_s,
        request_id=result.request_id,
    )


def collect(parts: Sequence[Part], positions: Sequence[int], results: list[Any], decode: Any,
            total: int) -> None:
    """Fills `results` (indexed by original item) from the parts of a split call.

    Args:
        parts: The parts, with item ranges indexing `positions`.
        positions: The original index of each item sent.
        results: The list to fill: a decoded result or a labeled error per item.
        decode: (InferResult, row) -> the item's typed result.
        total: Items in the call (for error labels).
    """
    for part in parts:
        for row, sent in enumerate(part.items):
            original = positions[sent]
            if isinstance(part.result, KilnError):
                results[original] = _label(part.result, original, total)
            else:
                results[original] = decode(part.result, row)


def _check_options(client: Any, options: Mapping[str, Any]) -> None:
    if options and not isinstance(client, str):
        raise TypeError(
            f"client options ({', '.join(options)}) apply only when a URL is given, not an existing client"
        )


# --- sync task clients -----------------------------------------------------------------------------


class _Task:
    """A sync task client: owns a Client made from a URL, or borrows one."""

    MODEL = ""

    def __init__(
        self, client: Client | str = DEFAULT_URL, *, model: str | None = None, **options: Any
    ) -> None:
        _check_options(client, options)
        self._owns = isinstance(client, str)
        self.client: Client = Client(client, **options) if isinstance(client, str) else client
        self.model = model or self.MODEL

    def __enter__(self) -> _Task:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the client if this task client made it (a borrowed one stays open)."""
        if self._owns:
            self.client.close()

    def info(self) -> ModelInfo:
        """The pipeline's tensors and max_batch_size."""
        return self.client.model_info(self.model)

    def _run(self, arrays: Mapping[str, np.ndarray], request_id: str | None, timeout: Any) -> list[Part]:
        info = self.info()
        validate_inputs(info, arrays, split=True)
        return self.client._run_parts(
            self.model, arrays, None, info, version="", request_id=request_id, timeout=timeout,
            shared_memory=None, chunk=None, isolate=True,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client.url!r}, model={self.model!r})"


class ImageClassifier(_Task):
    """Classifies images with the image_classifier pipeline (the 5 most likely classes).

    Args:
        client: A URL ("http://host:8000", "grpc://host:8001") or an existing `Client`.
        model: The pipeline (default image_classifier; e.g. image_classifier_int8).
        **options: `Client` options when a URL is given (timeout, retry, shared_memory, ...).

    Example:
        >>> with ImageClassifier("http://localhost:8000") as classifier:
        ...     print(classifier.classify("cat.jpg").labels)
    """

    MODEL = tensors.IMAGE_CLASSIFIER

    def classify(
        self, image: ImageInput, *, request_id: str | None = None, timeout: Any = DEFAULT
    ) -> Classification:
        """Classifies one image (encoded bytes, a file path, or a uint8 array)."""
        return self.classify_batch([image], request_id=request_id, timeout=timeout)[0]

    def classify_batch(
        self,
        images: Iterable[ImageInput],
        *,
        request_id: str | None = None,
        timeout: Any = DEFAULT,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Classifies many images, split into requests of the pipeline's max_batch_size.

        Args:
            images: Encoded bytes, file paths or uint8 arrays.
            request_id: Passed to Triton (suffixed per request when the call is split).
            timeout: Seconds per request (default: the client's).
            return_exceptions: Put each failed image's error in its place in the list instead of
                raising the first.

        Returns:
            One `Classification` per image, in order (or a KilnError where one failed).

        Raises:
            KilnError: Without return_exceptions, the first failure, naming the image.
        """
        results, positions, arrays = _image_request(images, return_exceptions)
        if arrays is not None:
            parts = self._run(arrays, request_id, timeout)
            _collect_classifications(parts, positions, results, return_exceptions)
        return results


class DigitsReader(ImageClassifier):
    """Reads handwritten digits with the digits_reader pipeline (top-3 of "0".."9").

    Takes images like `ImageClassifier`: a PNG/JPEG of a digit, a path, or a uint8 array, drawn
    like scikit-learn's digits (light strokes on black; a digit's grey levels v in 0..16 become
    round(v * 255 / 16)).
    """

    MODEL = tensors.DIGITS_READER


class TextEmbedder(_Task):
    """Embeds texts with the text_embedder pipeline (mean-pooled, L2-normalized).

    Example:
        >>> with TextEmbedder("grpc://localhost:8001") as embedder:
        ...     vectors = embedder.embed(["a cat", "a dog"]).vectors   # (2, 256) float32
    """

    MODEL = tensors.TEXT_EMBEDDER

    def embed(self, texts: str | Sequence[str], *, request_id: str | None = None,
              timeout: Any = DEFAULT) -> Embeddings:
        """Embeds one text or many (split into requests of the pipeline's max_batch_size).

        Returns:
            `Embeddings` whose `vectors` is an N x D float32 array, row i for text i.

        Raises:
            KilnError: The first failure, naming the text (e.g. an empty or over-long text).
        """
        start = time.perf_counter()
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            dim = self.info().output(tensors.EMBEDDING).shape[-1]
            return Embeddings(np.zeros((0, dim), np.float32), time.perf_counter() - start, request_id)
        parts = self._run({tensors.TEXT: encode_texts(items)}, request_id, timeout)
        raise_first_failure(parts, len(items))
        vectors = np.concatenate([p.result[tensors.EMBEDDING] for p in parts]).astype(np.float32, copy=False)
        return Embeddings(vectors, time.perf_counter() - start, request_id)


class FraudScorer(_Task):
    """Scores transactions with the fraud_scorer pipeline: probability and decision.

    Example:
        >>> with FraudScorer("http://localhost:8000") as scorer:
        ...     scorer.score({"amount": 25.0, "hour": 13, ...}).decision
    """

    MODEL = tensors.FRAUD_SCORER

    def score(self, record: Record | np.ndarray, *, request_id: str | None = None,
              timeout: Any = DEFAULT) -> FraudScore:
        """Scores one transaction (a record, or a 1-D array of feature values)."""
        records = record if isinstance(record, np.ndarray) else [record]
        return self.score_batch(records, request_id=request_id, timeout=timeout)[0]

    def score_batch(self, records: Records, *, request_id: str | None = None, timeout: Any = DEFAULT,
                    return_exceptions: bool = False) -> list[Any]:
        """Scores many transactions: records (dicts) or an N x F array of feature values.

        Returns:
            One `FraudScore` per transaction, in order (or a KilnError where one failed, with
            return_exceptions).
        """
        arrays = fraud_inputs(records)
        total = len(next(iter(arrays.values())))
        if total == 0:
            return []
        parts = self._run(arrays, request_id, timeout)
        if not return_exceptions:
            raise_first_failure(parts, total)
        results: list[Any] = [None] * total
        collect(parts, range(total), results, fraud_score, total)
        return results


# --- asyncio task clients --------------------------------------------------------------------------


class _AsyncTask:
    """An asyncio task client: owns an AsyncClient made from a URL, or borrows one."""

    MODEL = ""

    def __init__(self, client: AsyncClient | str = DEFAULT_URL, *, model: str | None = None,
                 **options: Any) -> None:
        _check_options(client, options)
        self._owns = isinstance(client, str)
        self.client: AsyncClient = AsyncClient(client, **options) if isinstance(client, str) else client
        self.model = model or self.MODEL

    async def __aenter__(self) -> _AsyncTask:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the client if this task client made it."""
        if self._owns:
            await self.client.close()

    async def info(self) -> ModelInfo:
        """The pipeline's tensors and max_batch_size."""
        return await self.client.model_info(self.model)

    async def _run(
        self, arrays: Mapping[str, np.ndarray], request_id: str | None, timeout: Any
    ) -> list[Part]:
        info = await self.info()
        validate_inputs(info, arrays, split=True)
        return await self.client._run_parts(
            self.model, arrays, None, info, version="", request_id=request_id, timeout=timeout,
            shared_memory=None, chunk=None, isolate=True,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client.url!r}, model={self.model!r})"


class AsyncImageClassifier(_AsyncTask):
    """The asyncio twin of `ImageClassifier` (same arguments and methods, as coroutines)."""

    MODEL = tensors.IMAGE_CLASSIFIER

    async def classify(self, image: ImageInput, *, request_id: str | None = None,
                       timeout: Any = DEFAULT) -> Classification:
        """Classifies one image."""
        return (await self.classify_batch([image], request_id=request_id, timeout=timeout))[0]

    async def classify_batch(
        self,
        images: Iterable[ImageInput],
        *,
        request_id: str | None = None,
        timeout: Any = DEFAULT,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Classifies many images; see `ImageClassifier.classify_batch`."""
        results, positions, arrays = _image_request(images, return_exceptions)
        if arrays is not None:
            parts = await self._run(arrays, request_id, timeout)
            _collect_classifications(parts, positions, results, return_exceptions)
        return results


class AsyncDigitsReader(AsyncImageClassifier):
    """The asyncio twin of `DigitsReader`."""

    MODEL = tensors.DIGITS_READER


class AsyncTextEmbedder(_AsyncTask):
    """The asyncio twin of `TextEmbedder`."""

    MODEL = tensors.TEXT_EMBEDDER

    async def embed(self, texts: str | Sequence[str], *, request_id: str | None = None,
                    timeout: Any = DEFAULT) -> Embeddings:
        """Embeds one text or many; see `TextEmbedder.embed`."""
        start = time.perf_counter()
        items = [texts] if isinstance(texts, str) else list(texts)
        if not items:
            dim = (await self.info()).output(tensors.EMBEDDING).shape[-1]
            return Embeddings(np.zeros((0, dim), np.float32), time.perf_counter() - start, request_id)
        parts = await self._run({tensors.TEXT: encode_texts(items)}, request_id, timeout)
        raise_first_failure(parts, len(items))
        vectors = np.concatenate([p.result[tensors.EMBEDDING] for p in parts]).astype(np.float32, copy=False)
        return Embeddings(vectors, time.perf_counter() - start, request_id)


class AsyncFraudScorer(_AsyncTask):
    """The asyncio twin of `FraudScorer`."""

    MODEL = tensors.FRAUD_SCORER

    async def score(self, record: Record | np.ndarray, *, request_id: str | None = None,
                    timeout: Any = DEFAULT) -> FraudScore:
        """Scores one transaction."""
        records = record if isinstance(record, np.ndarray) else [record]
        return (await self.score_batch(records, request_id=request_id, timeout=timeout))[0]

    async def score_batch(self, records: Records, *, request_id: str | None = None, timeout: Any = DEFAULT,
                          return_exceptions: bool = False) -> list[Any]:
        """Scores many transactions; see `FraudScorer.score_batch`."""
        arrays = fraud_inputs(records)
        total = len(next(iter(arrays.values())))
        if total == 0:
            return []
        parts = await self._run(arrays, request_id, timeout)
        if not return_exceptions:
            raise_first_failure(parts, total)
        results: list[Any] = [None] * total
        collect(parts, range(total), results, fraud_score, total)
        return results
