"""What every response must contain: checked on every response of every load test and benchmark.

A status code says the server answered, not that it answered right. `Checker.check` holds each
response to the pipeline's contract, read from the spec (`kiln.registry`), never from the
server under test:

- every output the spec declares is there, with its dtype and shape ([1, *dims]);
- classifiers (`image_classifier`, `image_classifier_int8`, `digits_reader`): scores finite, in
  [0, 1], descending, summing to at most 1; class indices distinct and in range; each label is
  the spec's label (the classify step's labels file) of its class index; with a reference answer,
  the same top-1 class and at least k-1 of its top-k classes (the reference runs other batch sizes,
  whose rounding may swap two near-tied classes at the bottom of the top k);
- `text_embedder`: finite, unit L2 norm; with a reference answer, cosine >= 0.999 to it;
- `fraud_scorer`: score finite in [0, 1]; decision == (score >= the threshold: the spec's
  kiln_threshold parameters, which name the decision document the build published into the local
  model repository); with a reference answer, the score within 1e-5 and the same decision;
- always: the same input gets the same answer every time, whichever dynamic batch it joined
  (top-k equal, cosine >= 0.9999, score within 1e-5): a batcher that mixed up requests fails here.

A failed check raises `ContentError` naming the input, the output and expected vs. given; load
generators report it as that request's failure.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln import tensors

SCORE_SUM_TOLERANCE = 1e-4
"""Top-k softmax scores sum to at most 1 (plus float rounding)."""
NORM_TOLERANCE = 1e-3
"""An L2-normalized FP32 embedding's norm is 1 within this."""
REFERENCE_COSINE = 0.999
"""Served text embeddings against the PyTorch reference (issue 4's yardstick)."""
REPEAT_COSINE = 0.9999
"""The same text embedded twice, in different dynamic batches."""
SCORE_TOLERANCE = 1e-5
"""Served fraud scores against the PyTorch reference and against themselves (issue 4's)."""
NUMPY_TYPES = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}


class ContentError(AssertionError):
    """A response does not hold what the pipeline's contract says it must."""


@dataclass(frozen=True)
class OutputContract:
    """One output of a served model: its dtype and per-item dims (-1: any size)."""

    name: str
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class Contract:
    """What a served model answers, from its spec.

    Attributes:
        model: The served model.
        outputs: Its outputs.
        labels: A classifier's labels, in class order (empty otherwise).
        threshold: fraud_scorer's decision threshold (None otherwise).
    """

    model: str
    outputs: tuple[OutputContract, ...]
    labels: tuple[str, ...] = ()
    threshold: float | None = None


def served(name: str) -> Any:
    """The spec of served model `name`: a model, a served variant of a built model (resnet50_int8),
    or an ensemble.

    Raises:
        KeyError: no spec serves `name`.
    """
    from kiln import registry
    from kiln.spec import served_specs

    for spec in served_specs(registry.specs()):
        if spec.name == name:
            return spec
    raise KeyError(f"no served model named {name!r} in the spec")


def _step_spec(ensemble: Any, backend: str) -> Any | None:
    for step in getattr(ensemble, "steps", ()):
        spec = served(step.model)
        if getattr(spec, "backend", None) == backend:
            return spec
    return None


def contract(model: str, repository: Any = None) -> Contract:
    """The contract of served model `model`, read from the spec (and, for a threshold the build
    derived, from the decision document it published into `repository`, by default
    `kiln.paths.model_repository()`).

    Raises:
        KeyError: no spec declares `model`.
        FileNotFoundError: the build has not published the decision document.
    """
    spec = served(model)
    outputs = tuple(OutputContract(t.name, t.dtype, tuple(t.dims)) for t in spec.outputs)
    labels: tuple[str, ...] = ()
    threshold = None
    classify = _step_spec(spec, "kiln_classify")
    if classify is not None:
        filename = dict(classify.parameters).get("labels_file", "labels.txt")
        text = dict(classify.files)[filename]
        labels = tuple(text.removesuffix("\n").split("\n"))
    decide = _step_spec(spec, "kiln_threshold")
    if decide is not None:
        threshold = _threshold(decide, repository)
    return Contract(model, outputs, labels, threshold)


def _threshold(spec: Any, repository: Any) -> float:
    """The threshold a kiln_threshold spec serves: its literal one or the published one."""
    from pathlib import Path

    from kiln import paths
    from kiln.serving.adapter import find_artifact
    from kiln.serving.params import parse_params
    from kiln.serving.threshold import THRESHOLD_PARAMS, ThresholdParams, resolve_threshold

    root = Path(repository) if repository is not None else paths.model_repository()
    params = parse_params(spec.name, dict(spec.parameters), THRESHOLD_PARAMS, ThresholdParams)
    return resolve_threshold(
        params, lambda model, name: find_artifact(root, model, name, for_model=spec.name)
    )


class Checker:
    """Checks the responses of one served model (thread-safe; see the module docstring).

    Attributes:
        contract: What the model answers.
        passed: Responses that passed every check.
        failed: Responses that failed one.
    """

    def __init__(self, contract_: Contract) -> None:
        self.contract = contract_
        self.passed = 0
        self.failed = 0
        self._seen: dict[str, dict[str, np.ndarray]] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_model(cls, model: str) -> Checker:
        """A checker with `model`'s contract from the spec."""
        return cls(contract(model))

    def check(self, item: Any, outputs: Mapping[str, np.ndarray]) -> None:
        """Checks one response to `item` (a `loadtests.inputs.Item`); counts it.

        Raises:
            ContentError: the first problem found, naming the input and the output.
        """
        try:
            self._structure(outputs)
            model = self.contract.model
            if self.contract.labels:
                self._classifier(outputs, item.expected)
            elif model == tensors.TEXT_EMBEDDER:
                self._embedding(outputs, item.expected)
            elif self.contract.threshold is not None:
                self._fraud(outputs, item.expected)
            self._repeatable(item.name, outputs)
        except ContentError as error:
            with self._lock:
                self.failed += 1
            raise ContentError(f"{self.contract.model}, input {item.name}: {error}") from None
        with self._lock:
            self.passed += 1

    # --- the checks ---

    def _structure(self, outputs: Mapping[str, np.ndarray]) -> None:
        for out in self.contract.outputs:
            if out.name not in outputs or outputs[out.name] is None:
                raise ContentError(f"output {out.name!r} is missing (got {sorted(outputs)})")
            array = np.asarray(outputs[out.name])
            want = np.dtype(NUMPY_TYPES[out.dtype])
            if array.dtype != want and not (want == np.object_ and array.dtype.kind in "SO"):
                raise ContentError(f"output {out.name!r}: dtype {array.dtype}, expected {want} ({out.dtype})")
            shape = (1, *out.dims)
            if array.ndim != len(shape) or any(
                d not in (-1, a) for d, a in zip(shape, array.shape, strict=True)
            ):
                raise ContentError(f"output {out.name!r}: shape {list(array.shape)}, expected {list(shape)}")

    def _classifier(
        self, outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray] | None
    ) -> None:
        scores = np.asarray(outputs[tensors.SCORES])[0]
        indices = np.asarray(outputs[tensors.CLASS_INDICES])[0]
        labels = [_text(v) for v in np.asarray(outputs[tensors.LABELS])[0]]
        if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
            raise ContentError(f"scores {scores.tolist()} are not probabilities in [0, 1]")
        if np.any(np.diff(scores) > 0):
            raise ContentError(f"scores {scores.tolist()} are not in descending order")
        if scores.sum() > 1 + SCORE_SUM_TOLERANCE:
            raise ContentError(f"scores {scores.tolist()} sum to {scores.sum():.6f} > 1")
        classes = len(self.contract.labels)
        if indices.min() < 0 or indices.max() >= classes or len(set(indices.tolist())) != len(indices):
            raise ContentError(
                f"class indices {indices.tolist()} are not distinct classes in 0..{classes - 1}"
            )
        want_labels = [self.contract.labels[i] for i in indices]
        if labels != want_labels:
            raise ContentError(
                f"labels {labels} are not the labels of classes {indices.tolist()}: {want_labels}"
            )
        if expected is not None and tensors.CLASS_INDICES in expected:
            reference = np.asarray(expected[tensors.CLASS_INDICES])[0]
            shared = len(set(reference.tolist()) & set(indices.tolist()))
            if indices[0] != reference[0] or shared < len(reference) - 1:
                raise ContentError(
                    f"top-{len(indices)} classes {indices.tolist()}, the reference's {reference.tolist()} "
                    "(top-1 must match and at most one class may differ)"
                )

    def _embedding(
        self, outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray] | None
    ) -> None:
        embedding = np.asarray(outputs[tensors.EMBEDDING], dtype=np.float64)[0]
        if not np.all(np.isfinite(embedding)):
            raise ContentError("embedding holds NaN or infinity")
        norm = float(np.linalg.norm(embedding))
        if abs(norm - 1) > NORM_TOLERANCE:
            raise ContentError(f"embedding norm {norm:.6f}, expected 1 (L2-normalized)")
        if expected is not None and tensors.EMBEDDING in expected:
            cosine = _cosine(embedding, np.asarray(expected[tensors.EMBEDDING])[0])
            if cosine < REFERENCE_COSINE:
                raise ContentError(f"cosine to the reference embedding {cosine:.6f} < {REFERENCE_COSINE}")

    def _fraud(self, outputs: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray] | None) -> None:
        score = np.float32(np.asarray(outputs[tensors.SCORE])[0, 0])
        decision = bool(np.asarray(outputs[tensors.DECISION])[0, 0])
        if not np.isfinite(score) or not 0 <= score <= 1:
            raise ContentError(f"score {score} is not a probability in [0, 1]")
        threshold = np.float32(self.contract.threshold)
        if decision != bool(score >= threshold):
            raise ContentError(f"decision {decision} for score {score:.6f} at threshold {threshold}")
        if expected is not None and tensors.SCORE in expected:
            want = float(np.asarray(expected[tensors.SCORE])[0, 0])
            if abs(float(score) - want) > SCORE_TOLERANCE:
                raise ContentError(
                    f"score {score:.7f}, the reference's {want:.7f} (tolerance {SCORE_TOLERANCE})"
                )
            want_decision = bool(np.asarray(expected[tensors.DECISION])[0, 0])
            if decision != want_decision and abs(want - float(threshold)) > SCORE_TOLERANCE:
                raise ContentError(f"decision {decision}, the reference's {want_decision}")

    def _repeatable(self, key: str, outputs: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            first = self._seen.get(key)
            if first is None:  # the first answer to this input: the one later answers must repeat
                self._seen[key] = {k: np.array(v, copy=True) for k, v in outputs.items()}
                return
        if self.contract.labels:
            a, b = first[tensors.CLASS_INDICES][0], np.asarray(outputs[tensors.CLASS_INDICES])[0]
            shared = len(set(a.tolist()) & set(b.tolist()))
            if a[0] != b[0] or shared < len(a) - 1:
                raise ContentError(
                    f"classes {b.tolist()} differ from this input's earlier answer {a.tolist()}"
                )
        elif self.contract.model == tensors.TEXT_EMBEDDER:
            cosine = _cosine(first[tensors.EMBEDDING][0], np.asarray(outputs[tensors.EMBEDDING])[0])
            if cosine < REPEAT_COSINE:
                raise ContentError(
                    f"embedding differs from this input's earlier answer (cosine {cosine:.6f})"
                )
        elif self.contract.threshold is not None:
            a, b = float(first[tensors.SCORE][0, 0]), float(np.asarray(outputs[tensors.SCORE])[0, 0])
            if abs(a - b) > SCORE_TOLERANCE:
                raise ContentError(f"score {b:.7f} differs from this input's earlier answer {a:.7f}")


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
