"""The task clients' tasks, declared: how each one encodes and decodes (no I/O).

A task is a `Task`: `encode` turns the Python inputs of one call (images, texts, records) into
named tensors (an `Encoded`: the tensors, plus a result slot per item, items refused before
sending already holding their `InvalidInputError`), and `decode` turns what came back (an
`Answer`: the parts of the split call, the model's info, the latency) into the typed result. The
task clients run every task through one driver (`_AsyncTask._perform` in
`kiln.clients._async_tasks`, written once for asyncio; the blocking twin is generated from it by
`scripts/unasync.py`): encode -> the client's `_infer_parts` (validated, split by max_batch_size,
sent concurrently, failed multi-item requests resent item by item) -> decode.

A new task defines `encode` (inputs, return_exceptions) -> `Encoded` and `decode` (`Encoded`,
`Answer`) -> result here (`per_item(row_decoder)` decodes one result per item), and a task-client
method that calls `self._perform(TASK, inputs, ...)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, Union

import numpy as np

from kiln import tensors
from kiln.clients._core import Part, raise_first_failure
from kiln.clients.errors import InvalidInputError, KilnError
from kiln.clients.images import ImageInput, image_bytes
from kiln.clients.models import ModelInfo
from kiln.clients.results import Classification, Embeddings, FraudScore

R = TypeVar("R")

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


# --- the tasks: each one's encoding and decoding --------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """One task call, encoded.

    Attributes:
        inputs: Input name -> tensor, one row per item sent; None when nothing is to be sent.
        results: One slot per item of the call, in order; an item refused while encoding holds
            its InvalidInputError, the others None (decoding fills them).
        positions: The call's item index of each row sent.
        return_exceptions: Whether decoding leaves each failed item's error in its slot instead
            of raising the first.
        needs_info: Whether decoding reads the model's info even when nothing is sent.
    """

    inputs: dict[str, np.ndarray] | None
    results: list[Any]
    positions: Sequence[int]
    return_exceptions: bool = False
    needs_info: bool = False


@dataclass(frozen=True)
class Answer:
    """What came back for an `Encoded` call.

    Attributes:
        parts: The requests' parts, with item ranges indexing `Encoded.positions` (none when
            nothing was sent).
        info: The model's info (None when nothing was sent and the call did not need it).
        latency_s: Seconds since the call began (encoding included).
        request_id: The call's request id.
    """

    parts: Sequence[Part]
    info: ModelInfo | None
    latency_s: float
    request_id: str | None


@dataclass(frozen=True)
class Task(Generic[R]):
    """A task: how its Python inputs become named tensors, and what came back its typed result.

    Attributes:
        encode: (inputs, return_exceptions) -> `Encoded`; raises InvalidInputError for inputs it
            cannot send (without return_exceptions, or when the whole call is unusable).
        decode: (`Encoded`, `Answer`) -> the call's result; raises a failed request's error (item
            named) unless the call returns exceptions.
    """

    encode: Callable[[Any, bool], Encoded]
    decode: Callable[[Encoded, Answer], R]


def per_item(row: Callable[[Any, int], Any]) -> Callable[[Encoded, Answer], list[Any]]:
    """A `Task.decode` giving one result per item: `row(InferResult, row)`, or the item's error
    (raised, the first one, unless the call returns exceptions)."""

    def decode(call: Encoded, answer: Answer) -> list[Any]:
        total = len(call.results)
        if not call.return_exceptions:
            raise_first_failure(answer.parts, total)
        results = list(call.results)
        collect(answer.parts, call.positions, results, row, total)
        return results

    return decode


def encode_image_call(images: Iterable[ImageInput], return_exceptions: bool) -> Encoded:
    """The IMAGE column of the images that encode; without return_exceptions the first image that
    does not is raised, with it its error takes the image's slot."""
    encoded, errors = encode_images(images)
    if errors and not return_exceptions:
        raise next(iter(errors.values()))
    positions = [i for i in range(len(encoded)) if i not in errors]
    inputs = {tensors.IMAGE: _bytes_column([encoded[i] for i in positions])} if positions else None
    return Encoded(inputs, [errors.get(i) for i in range(len(encoded))], positions, return_exceptions)


def encode_text_call(texts: str | Sequence[str], return_exceptions: bool) -> Encoded:
    """The TEXT column of one text or many (nothing to send for none)."""
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        return Encoded(None, [], [], return_exceptions, needs_info=True)
    column = encode_texts(items)
    return Encoded({tensors.TEXT: column}, [None] * len(items), range(len(items)), return_exceptions)


def decode_embeddings(call: Encoded, answer: Answer) -> Embeddings:
    """The EMBEDDING rows of every part, in order, as `Embeddings` (0 x D for no text)."""
    if call.inputs is None:
        dim = answer.info.output(tensors.EMBEDDING).shape[-1]
        vectors = np.zeros((0, dim), np.float32)
    else:
        raise_first_failure(answer.parts, len(call.results))
        rows = [p.result[tensors.EMBEDDING] for p in answer.parts]
        vectors = np.concatenate(rows).astype(np.float32, copy=False)
    return Embeddings(vectors, answer.latency_s, answer.request_id)


def encode_record_call(records: Records, return_exceptions: bool) -> Encoded:
    """The fraud_scorer request for records or feature values (nothing to send for none)."""
    inputs = fraud_inputs(records)
    total = len(next(iter(inputs.values())))
    if total == 0:
        return Encoded(None, [], [], return_exceptions)
    return Encoded(inputs, [None] * total, range(total), return_exceptions)


CLASSIFY: Task[list[Any]] = Task(encode_image_call, per_item(classification))
"""Images -> one `Classification` per image (image_classifier, digits_reader)."""
EMBED: Task[Embeddings] = Task(encode_text_call, decode_embeddings)
"""Texts -> `Embeddings`, row i for text i (text_embedder)."""
SCORE: Task[list[Any]] = Task(encode_record_call, per_item(fraud_score))
"""Records or feature values -> one `FraudScore` per transaction (fraud_scorer)."""


def is_url_or_urls(client: Any) -> bool:
    """Whether a task client was given a URL, or a sequence of URLs (one per replica), rather
    than an existing client to borrow."""
    if isinstance(client, str):
        return True
    return (
        isinstance(client, (list, tuple)) and bool(client) and all(isinstance(url, str) for url in client)
    )


def _check_options(client: Any, options: Mapping[str, Any]) -> None:
    if options and not is_url_or_urls(client):
        raise TypeError(
            f"client options ({', '.join(options)}) apply only when a URL is given, not an existing client"
        )
