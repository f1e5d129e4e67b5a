"""kiln_threshold's logic: a probability -> the score and the decision at the spec's threshold.

Input: FP32 [batch, 1], a probability in [0, 1] (e.g. `kiln.tensors.FRAUD_PROBABILITY`).
Outputs: FP32 [batch, 1], the score (the probability, unchanged), and BOOL [batch, 1], the
decision `score >= threshold`. The tensor names are the model config's: its one input, its FP32
output (the score) and its BOOL output (the decision).

A request whose probability is NaN, infinite or outside [0, 1] fails alone with a message naming
the input and the item (it is not a probability, so no decision would mean anything); the rest of
the dynamic batch is decided in one vectorized comparison.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.serving.adapter import Inputs, LoadContext, Outputs
from kiln.serving.batch import RequestError, TensorContract, validate_request
from kiln.serving.onnx import ModelLoadError
from kiln.serving.params import Param, ParamError, parse_params

FP32 = np.dtype(np.float32)
BOOL = np.dtype(np.bool_)
SCORE_TYPE = "TYPE_FP32"
DECISION_TYPE = "TYPE_BOOL"
PROBABILITY_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class BoundedParam(Param):
    """A "float" or "int" parameter with an upper bound as well (`Param` has only `minimum`).

    Attributes:
        maximum: Largest allowed value; None for no upper bound.
    """

    maximum: float | None = None

    def describe(self) -> str:
        """What the value must be, in words, for error messages."""
        if self.maximum is None or self.minimum is None:
            return super().describe()
        return f"a finite number in {self.minimum:g}..{self.maximum:g}"

    def parse(self, model: str, text: str) -> Any:
        """Parses `text` like `Param.parse`, then checks the upper bound."""
        value = super().parse(model, text)
        if self.maximum is not None and value > self.maximum:
            raise ParamError(
                f"model '{model}': parameter '{self.name}' must be {self.describe()}, got {text!r}"
            )
        return value


THRESHOLD_PARAMS: tuple[Param, ...] = (
    BoundedParam(
        "threshold", "float", 0.5,
        "decision = score >= threshold; declare it in the spec, with how it was chosen",
        minimum=PROBABILITY_RANGE[0], maximum=PROBABILITY_RANGE[1],
    ),
)


@dataclass(frozen=True)
class ThresholdParams:
    """kiln_threshold's `parameters`, parsed (see THRESHOLD_PARAMS)."""

    threshold: float


def decide(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The decisions for `scores`: score >= threshold, as BOOL of the same shape."""
    return np.asarray(scores) >= np.float32(threshold)


class ThresholdStep:
    """Decides a dynamic batch of probabilities at one threshold.

    Attributes:
        threshold: The decision threshold, in [0, 1].
        probability: Name of the FP32 [1] probability input.
        score: Name of the FP32 [1] score output.
        decision: Name of the BOOL [1] decision output.
    """

    def __init__(self, threshold: float, *, probability: str, score: str, decision: str) -> None:
        low, high = PROBABILITY_RANGE
        if not low <= threshold <= high:
            raise ValueError(f"threshold must be in {low:g}..{high:g}, got {threshold!r}")
        self.threshold = float(threshold)
        self.probability = probability
        self.score = score
        self.decision = decision
        self._contract = TensorContract(probability, FP32, (1,))

    def _probabilities(self, request: Inputs) -> np.ndarray:
        validate_request(request, [self._contract], batched=True, reject_non_finite=True)
        array: np.ndarray = request[self.probability]  # type: ignore[assignment]
        low, high = PROBABILITY_RANGE
        outside = np.flatnonzero((array < low) | (array > high))
        if outside.size:
            item = int(outside[0]) // array.shape[1]
            raise RequestError(
                f"input '{self.probability}' item {item} is {float(array.flat[outside[0]]):g}; a "
                f"probability lies in {low:g}..{high:g}"
            )
        return array

    def run(self, requests: Sequence[Inputs]) -> list[Outputs | Exception]:
        """One result per request: its score and decision, or the error of its bad input."""
        results: list[Outputs | Exception] = [RequestError("not run")] * len(requests)
        arrays: list[np.ndarray] = []
        members: list[tuple[int, int]] = []
        for index, request in enumerate(requests):
            try:
                array = self._probabilities(request)
            except RequestError as error:
                results[index] = error
                continue
            arrays.append(array)
            members.append((index, len(array)))
        if not arrays:
            return results
        scores = np.ascontiguousarray(arrays[0] if len(arrays) == 1 else np.concatenate(arrays), FP32)
        decisions = decide(scores, self.threshold)
        offset = 0
        for index, size in members:
            block = slice(offset, offset + size)
            results[index] = {self.score: scores[block], self.decision: decisions[block]}
            offset += size
        return results


def _described(tensors: Sequence[Mapping[str, Any]]) -> str:
    return ", ".join(
        f"{t.get('name')} {t.get('data_type')} {[int(d) for d in t.get('dims', ())]}" for t in tensors
    )


def load(context: LoadContext) -> ThresholdStep:
    """Builds the step from a model's config and its `threshold` parameter.

    Raises:
        ParamError: the threshold is missing from 0..1 or not a number.
        ModelLoadError: the config is not one FP32 [1] input, one FP32 [1] and one BOOL [1] output.
    """
    name = context.model_name
    params = parse_params(name, context.parameters, THRESHOLD_PARAMS, ThresholdParams)
    inputs = list(context.config.get("input") or ())
    outputs = list(context.config.get("output") or ())

    def dims(tensor: Mapping[str, Any]) -> list[int]:
        return [int(d) for d in tensor.get("dims", ())]

    if len(inputs) != 1 or inputs[0].get("data_type") != SCORE_TYPE or dims(inputs[0]) != [1]:
        raise ModelLoadError(
            f"model '{name}': kiln_threshold takes one FP32 [1] input (a probability); the config "
            f"declares {_described(inputs) or 'none'}"
        )
    by_type = {t.get("data_type"): t for t in outputs}
    if (
        len(outputs) != 2 or set(by_type) != {SCORE_TYPE, DECISION_TYPE}
        or any(dims(t) != [1] for t in outputs)
    ):
        raise ModelLoadError(
            f"model '{name}': kiln_threshold has two outputs, FP32 [1] (the score) and BOOL [1] "
            f"(the decision); the config declares {_described(outputs) or 'none'}"
        )
    if int(context.config.get("max_batch_size", 0)) < 1:
        raise ModelLoadError(f"model '{name}': kiln_threshold needs max_batch_size >= 1")
    return ThresholdStep(
        params.threshold,
        probability=inputs[0]["name"],
        score=by_type[SCORE_TYPE]["name"],
        decision=by_type[DECISION_TYPE]["name"],
    )
