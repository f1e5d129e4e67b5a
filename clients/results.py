"""Typed results: frozen dataclasses, each with the client-side latency and the request id.

`latency_s` is measured by the client around the request (serialization, network, server, and
deserialization included). When a call is split into several requests, each item's result
carries the latency and request id of the request that held it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class InferResult:
    """The outputs of a generic `infer` call.

    Attributes:
        model: The model that answered.
        outputs: Output name -> numpy array (BYTES outputs: object arrays of `bytes`).
        latency_s: Client-side latency of the call, in seconds.
        request_id: The request id sent (echoed by the server), None when none was given.
        model_version: The version that answered ("" when the server did not say).
    """

    model: str
    outputs: Mapping[str, np.ndarray]
    latency_s: float
    request_id: str | None = None
    model_version: str = ""

    def __getitem__(self, name: str) -> np.ndarray:
        """The output called `name`."""
        try:
            return self.outputs[name]
        except KeyError:
            raise KeyError(
                f"model '{self.model}' returned no output '{name}'; it returned: "
                f"{', '.join(self.outputs) or 'nothing'}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self.outputs

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)


@dataclass(frozen=True)
class Classification:
    """The top-k classes of one image, most likely first.

    Attributes:
        labels: The class labels.
        scores: Their probabilities (softmax), descending.
        class_indices: Their class indices.
        latency_s: Client-side latency of the request that held this image, in seconds.
        request_id: That request's id, None when none was given.
    """

    labels: tuple[str, ...]
    scores: tuple[float, ...]
    class_indices: tuple[int, ...]
    latency_s: float
    request_id: str | None = None

    @property
    def label(self) -> str:
        """The most likely label."""
        return self.labels[0]

    @property
    def score(self) -> float:
        """The most likely label's probability."""
        return self.scores[0]


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Sentence embeddings: one L2-normalized row per input text, in input order.

    Attributes:
        vectors: float32 array of shape (N, D).
        latency_s: Client-side latency in seconds (the whole call, over all its requests).
        request_id: The request id sent, None when none was given.
    """

    vectors: np.ndarray
    latency_s: float
    request_id: str | None = None

    @property
    def dim(self) -> int:
        """The embedding size D."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    def __getitem__(self, index: int) -> np.ndarray:
        """The embedding of text `index`."""
        return self.vectors[index]

    def __array__(self, dtype: np.dtype | None = None) -> np.ndarray:
        return self.vectors if dtype is None else self.vectors.astype(dtype)


@dataclass(frozen=True)
class FraudScore:
    """The fraud score of one transaction.

    Attributes:
        score: The probability that the transaction is fraudulent.
        decision: Whether the score reaches the served model's threshold (flag it).
        latency_s: Client-side latency of the request that held this record, in seconds.
        request_id: That request's id, None when none was given.
    """

    score: float
    decision: bool
    latency_s: float
    request_id: str | None = None


@dataclass(frozen=True)
class Generation:
    """The text one generation request produced (`TextGenerator.generate`).

    Attributes:
        text: The generated text (the prompt not included; a stop string that ended it neither).
        finish_reason: Why it ended: "stop" (the end-of-sequence token or a stop string),
            "length" (`max_tokens` generated) or "cancelled" (the server ended the request, e.g.
            the model was unloaded meanwhile).
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
        latency_s: Client-side latency of the call, in seconds.
        request_id: The request id sent, None when none was given.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    request_id: str | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together (what OpenAI's usage calls total_tokens)."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class GenerationDelta:
    """One piece of a streamed generation (`TextGenerator.stream`).

    Attributes:
        text: The text generated since the previous delta (may be "" on the last one). Deltas
            never split a UTF-8 character, and text that may begin a stop string is held back
            until it is known not to.
        finish_reason: None until the last delta; then "stop", "length" or "cancelled" (see
            `Generation.finish_reason`).
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated so far (on the last delta: in all).
        elapsed_s: Seconds from sending the request to receiving this delta; the first delta's is
            the time to first token as the client sees it.
    """

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def final(self) -> bool:
        """Whether this is the last delta of its stream."""
        return self.finish_reason is not None
