"""kiln_threshold's logic: a probability -> the score and the decision at a threshold.

The threshold is either a literal (`threshold`) or, for a threshold that depends on trained
weights, the value a build chose and published as a JSON document beside another repository model
(`threshold_model` names the model, `threshold_file` the document, `DECISION_FILE` by default; see
`DecisionThreshold`). Exactly one of the two is given. A threshold tuned by hand to one machine's
trained weights does not hold on another CPU (their weights differ in the last digits), so kiln's
own pipelines take the published one.

Input: FP32 [batch, 1], a probability in [0, 1] (e.g. `kiln.tensors.FRAUD_PROBABILITY`).
Outputs: FP32 [batch, 1], the score (the probability, unchanged), and BOOL [batch, 1], the
decision `score >= threshold`. The tensor names are the model config's: its one input, its FP32
output (the score) and its BOOL output (the decision).

A request whose probability is NaN, infinite or outside [0, 1] fails alone with a message naming
the input and the item (it is not a probability, so no decision would mean anything); the rest of
the dynamic batch is decided in one vectorized comparison.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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
DECISION_FILE = "decision.json"
"""Where a build publishes the threshold it chose (beside the model that scores)."""
DECISION_FORMAT = 1
"""Bumped when the layout of the decision document changes."""


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
        "threshold", "float", None,
        "a fixed threshold: decision = score >= threshold (or give threshold_model instead)",
        minimum=PROBABILITY_RANGE[0], maximum=PROBABILITY_RANGE[1],
    ),
    Param(
        "threshold_model", "name", "",
        "repository model whose newest version folder holds the decision document the build "
        "published (e.g. fraud); instead of threshold",
    ),
    Param(
        "threshold_file", "name", DECISION_FILE,
        "the decision document there: the threshold the build chose and the rule that chose it",
    ),
)


@dataclass(frozen=True)
class ThresholdParams:
    """kiln_threshold's `parameters`, parsed (see THRESHOLD_PARAMS)."""

    threshold: float | None
    threshold_model: str
    threshold_file: str


class ThresholdSourceError(ValueError):
    """The parameters give no threshold, or two, or the published document is unusable."""


@dataclass(frozen=True)
class DecisionThreshold:
    """A threshold a build chose from held-out data, as published in `DECISION_FILE`.

    The document (JSON) holds `format`, `threshold`, `rule` (the stated rule, in words) and
    whatever evidence the build recorded beside them (`evidence`: e.g. recall and precision on
    the held-out split). The serving side reads only the format, the threshold and the rule.

    Attributes:
        threshold: The decision threshold, in [0, 1].
        rule: How the build chose it, in words.
        evidence: What the build measured at that threshold (JSON-able).
    """

    threshold: float
    rule: str
    evidence: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        """The published document."""
        return {
            "format": DECISION_FORMAT,
            "threshold": self.threshold,
            "rule": self.rule,
            "evidence": dict(self.evidence),
        }

    @classmethod
    def from_json(cls, document: Any, where: str = DECISION_FILE) -> DecisionThreshold:
        """Reads a decision document.

        Raises:
            ThresholdSourceError: not a JSON object of this format, or the threshold is not a
                number in [0, 1]; the message names `where`.
        """
        if not isinstance(document, Mapping) or document.get("format") != DECISION_FORMAT:
            got = document.get("format") if isinstance(document, Mapping) else type(document).__name__
            raise ThresholdSourceError(
                f"{where}: not a decision document of format {DECISION_FORMAT} (format {got!r})"
            )
        value = document.get("threshold")
        low, high = PROBABILITY_RANGE
        if (
            isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not low <= value <= high
        ):
            raise ThresholdSourceError(
                f"{where}: 'threshold' must be a number in {low:g}..{high:g}, got {value!r}"
            )
        return cls(float(value), str(document.get("rule", "")), dict(document.get("evidence") or {}))

    @classmethod
    def read(cls, path: Path) -> DecisionThreshold:
        """Reads the document at `path`.

        Raises:
            FileNotFoundError: no file there (run `kiln build`).
            ThresholdSourceError: the file is not valid JSON or not a decision document.
        """
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ThresholdSourceError(f"{path}: not a readable JSON document ({error})") from error
        return cls.from_json(document, str(path))


def resolve_threshold(params: ThresholdParams, artifact: Any) -> float:
    """The threshold `params` give: the literal one, or the one published beside another model.

    Args:
        params: kiln_threshold's parsed parameters.
        artifact: `(model, file name) -> Path` of a file in another repository model's newest
            version folder (`LoadContext.artifact`).

    Raises:
        ThresholdSourceError: neither or both of `threshold` and `threshold_model` are given, or
            the published document is unusable.
        FileNotFoundError: the document is not published (`LoadContext.artifact`'s message says
            to run the build).
    """
    if (params.threshold is None) == (not params.threshold_model):
        given = "both" if params.threshold is not None else "neither"
        raise ThresholdSourceError(
            f"give exactly one of parameter 'threshold' (a fixed threshold) and 'threshold_model' "
            f"(the model whose build published '{params.threshold_file}'); {given} given"
        )
    if params.threshold is not None:
        return float(params.threshold)
    return DecisionThreshold.read(artifact(params.threshold_model, params.threshold_file)).threshold


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
        outside = (array < low) | (array > high)
        if outside.any():  # flatnonzero only on failure: this runs once per request
            first = int(np.flatnonzero(outside)[0])
            raise RequestError(
                f"input '{self.probability}' item {first // array.shape[1]} is "
                f"{float(array.flat[first]):g}; a probability lies in {low:g}..{high:g}"
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
        ParamError: a parameter is unknown or not allowed (a threshold outside 0..1).
        ModelLoadError: neither or both of `threshold` and `threshold_model`, the published
            decision document is missing or malformed, or the config is not one FP32 [1] input,
            one FP32 [1] and one BOOL [1] output.
    """
    name = context.model_name
    params = parse_params(name, context.parameters, THRESHOLD_PARAMS, ThresholdParams)
    try:
        threshold = resolve_threshold(params, context.artifact)
    except ThresholdSourceError as error:
        raise ModelLoadError(f"model '{name}': {error}") from error
    except (FileNotFoundError, ValueError) as error:  # LoadContext.artifact names the model
        raise ModelLoadError(str(error)) from error
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
        threshold,
        probability=inputs[0]["name"],
        score=by_type[SCORE_TYPE]["name"],
        decision=by_type[DECISION_TYPE]["name"],
    )
