"""What the task clients share: encoding requests and decoding results, per pipeline (no I/O).

The task clients themselves are written once, for asyncio (`kiln.clients._async_tasks`), and the
blocking ones generated from them (`kiln.clients._sync_tasks`, by `scripts/unasync.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import numpy as np

from kiln import tensors
from kiln.clients._core import Part, raise_first_failure
from kiln.clients.errors import InvalidInputError, KilnError
from kiln.clients.images import ImageInput, image_bytes
from kiln.clients.results import Classification, FraudScore

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
