"""The task clients for asyncio: `AsyncImageClassifier`, `AsyncDigitsReader`, `AsyncTextEmbedder`,
`AsyncFraudScorer` (see `kiln.clients.tasks`).

Each method is one declared task (`kiln.clients._task_core`: CLASSIFY, EMBED, SCORE, each an
encoding and a decoding) run by the one driver, `_perform`: encode -> the client's
`_infer_parts` -> decode.

This module is the source of both sets of task clients: `scripts/unasync.py` writes
`kiln.clients._sync_tasks` (the blocking `ImageClassifier`, ... ) from it; a test fails when the
written file differs. Edit this file, then run `.venv/bin/python scripts/unasync.py`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from kiln import tensors
from kiln.clients._async_client import AsyncClient
from kiln.clients._core import DEFAULT, DEFAULT_URL
from kiln.clients._task_core import (
    CLASSIFY,
    EMBED,
    SCORE,
    Answer,
    R,
    Record,
    Records,
    Task,
    _check_options,
    is_url_or_urls,
)
from kiln.clients.images import ImageInput
from kiln.clients.models import ModelInfo
from kiln.clients.results import Classification, Embeddings, FraudScore

__all__ = ["AsyncDigitsReader", "AsyncFraudScorer", "AsyncImageClassifier", "AsyncTextEmbedder"]


class _AsyncTask:
    """A task client: owns a client made from a URL, or borrows an existing one (not closed)."""

    MODEL = ""

    def __init__(
        self, client: AsyncClient | str | Sequence[str] = DEFAULT_URL, *, model: str | None = None,
        **options: Any,
    ) -> None:
        _check_options(client, options)
        self._owns = is_url_or_urls(client)
        self.client: AsyncClient = AsyncClient(client, **options) if self._owns else client
        self.model = model or self.MODEL

    async def __aenter__(self) -> _AsyncTask:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the client if this task client made it (a borrowed one stays open)."""
        if self._owns:
            await self.client.close()

    async def info(self) -> ModelInfo:
        """The pipeline's tensors and max_batch_size."""
        return await self.client.model_info(self.model)

    async def _perform(
        self, task: Task[R], inputs: Any, request_id: str | None, timeout: Any,
        return_exceptions: bool = False,
    ) -> R:
        """Runs any task: encode -> the client's split call (if anything is to be sent) -> decode."""
        start = time.perf_counter()
        call = task.encode(inputs, return_exceptions)
        info, parts = None, []
        if call.inputs is not None:
            info, parts = await self.client._infer_parts(
                self.model, call.inputs, request_id=request_id, timeout=timeout
            )
        elif call.needs_info:
            info = await self.info()
        return task.decode(call, Answer(parts, info, time.perf_counter() - start, request_id))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.client.url!r}, model={self.model!r})"


class AsyncImageClassifier(_AsyncTask):
    """Classifies images with the image_classifier pipeline (the 5 most likely classes).

    Args:
        client: A URL ("http://host:8000", "grpc://host:8001") or an existing `AsyncClient`.
        model: The pipeline (default image_classifier; e.g. image_classifier_int8).
        **options: `AsyncClient` options when a URL is given (timeout, retry, shared_memory, ...).

    Example:
        >>> async with AsyncImageClassifier("http://localhost:8000") as classifier:
        ...     result = await classifier.classify("cat.jpg")
        ...     print(result.labels)
    """

    MODEL = tensors.IMAGE_CLASSIFIER

    async def classify(
        self, image: ImageInput, *, request_id: str | None = None, timeout: Any = DEFAULT
    ) -> Classification:
        """Classifies one image (encoded bytes, a file path, or a uint8 array)."""
        results = await self.classify_batch([image], request_id=request_id, timeout=timeout)
        return results[0]

    async def classify_batch(
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
        return await self._perform(CLASSIFY, images, request_id, timeout, return_exceptions)


class AsyncDigitsReader(AsyncImageClassifier):
    """Reads handwritten digits with the digits_reader pipeline (top-3 of "0".."9").

    Takes images like `ImageClassifier`: a PNG/JPEG of a digit, a path, or a uint8 array, drawn
    like scikit-learn's digits (light strokes on black; a digit's grey levels v in 0..16 become
    round(v * 255 / 16)).
    """

    MODEL = tensors.DIGITS_READER


class AsyncTextEmbedder(_AsyncTask):
    """Embeds texts with the text_embedder pipeline (mean-pooled, L2-normalized).

    Example:
        >>> async with AsyncTextEmbedder("grpc://localhost:8001") as embedder:
        ...     embeddings = await embedder.embed(["a cat", "a dog"])
        ...     embeddings.vectors.shape   # (2, 256) float32
    """

    MODEL = tensors.TEXT_EMBEDDER

    async def embed(
        self, texts: str | Sequence[str], *, request_id: str | None = None, timeout: Any = DEFAULT
    ) -> Embeddings:
        """Embeds one text or many (split into requests of the pipeline's max_batch_size).

        Returns:
            `Embeddings` whose `vectors` is an N x D float32 array, row i for text i.

        Raises:
            KilnError: The first failure, naming the text (e.g. an empty or over-long text).
        """
        return await self._perform(EMBED, texts, request_id, timeout)


class AsyncFraudScorer(_AsyncTask):
    """Scores transactions with the fraud_scorer pipeline: probability and decision.

    Example:
        >>> async with AsyncFraudScorer("http://localhost:8000") as scorer:
        ...     verdict = await scorer.score({"amount": 25.0, "hour": 13, ...})
        ...     verdict.decision
    """

    MODEL = tensors.FRAUD_SCORER

    async def score(
        self, record: Record | np.ndarray, *, request_id: str | None = None, timeout: Any = DEFAULT
    ) -> FraudScore:
        """Scores one transaction (a record, or a 1-D array of feature values)."""
        records = record if isinstance(record, np.ndarray) else [record]
        results = await self.score_batch(records, request_id=request_id, timeout=timeout)
        return results[0]

    async def score_batch(
        self, records: Records, *, request_id: str | None = None, timeout: Any = DEFAULT,
        return_exceptions: bool = False,
    ) -> list[Any]:
        """Scores many transactions: records (dicts) or an N x F array of feature values.

        Returns:
            One `FraudScore` per transaction, in order (or a KilnError where one failed, with
            return_exceptions).
        """
        return await self._perform(SCORE, records, request_id, timeout, return_exceptions)
