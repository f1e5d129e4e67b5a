"""The kiln_classify backend's logic: logits -> softmax probabilities -> top-k labels, scores, indices.

One vectorized pass over the whole dynamic batch: the requests' logits are concatenated, the k
largest are selected per row (`argpartition`, then sorted, ties to the lower class index), and
their softmax probabilities computed stably (the row's maximum subtracted before `exp`, in
float64, then rounded to float32). Selecting on the logits, not on the probabilities, keeps the
order exact even where probabilities underflow to the same float.

The labels come from a text file in the model's folder (one label per line, written by
`kiln generate` from the spec's `files`); at load their count must equal the model's classes.
A request with non-finite logits, another dtype or another shape fails alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln import tensors
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param, parse_params

CLASSIFY_PARAMS: tuple[Param, ...] = (
    Param("top_k", "int", 5, "classes returned per item, most likely first", minimum=1),
    Param(
        "labels_file", "name", "labels.txt", "file in the model folder: one label per line, in class order"
    ),
    Param(
        "apply_softmax", "bool", True,
        "scores are softmax probabilities; false returns the raw inputs (already probabilities)",
    ),
)
"""kiln_classify's `parameters` (config.pbtxt)."""

INPUT_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}
OUTPUTS = {
    tensors.LABELS: ("TYPE_STRING", "TYPE_BYTES"),
    tensors.SCORES: ("TYPE_FP32",),
    tensors.CLASS_INDICES: ("TYPE_INT64",),
}
"""kiln_classify's outputs and their Triton types (BYTES is "TYPE_STRING" in Triton's JSON)."""


@dataclass(frozen=True)
class ClassifyParams:
    """kiln_classify's `parameters`, parsed (see CLASSIFY_PARAMS)."""

    top_k: int
    labels_file: str
    apply_softmax: bool


class ClassifyLoadError(ModelLoadError):
    """The config, the parameters and the labels disagree; the message names the model."""


def read_labels(model: str, path: Path, classes: int) -> tuple[str, ...]:
    """The labels in `path` (UTF-8, one per line, a trailing newline optional).

    Raises:
        ClassifyLoadError: the file is missing, not UTF-8, holds an empty label, or another
            number of labels than `classes`.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ClassifyLoadError(f"model '{model}': labels file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ClassifyLoadError(f"model '{model}': labels file {path} is not UTF-8 ({error})") from None
    labels = tuple(text.removesuffix("\n").split("\n")) if text else ()
    if len(labels) != classes:
        raise ClassifyLoadError(
            f"model '{model}': labels file {path} has {len(labels)} label(s) but the input has "
            f"{classes} classes (one label per line, in class order)"
        )
    empty = [i for i, label in enumerate(labels) if not label.strip()]
    if empty:
        raise ClassifyLoadError(
            f"model '{model}': labels file {path} has an empty label on line(s) "
            f"{', '.join(str(i + 1) for i in empty[:5])}"
        )
    return labels


def top_k(logits: np.ndarray, k: int, apply_softmax: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The k largest classes of each row, most likely first (ties: the lower index first).

    Args:
        logits: float [N, C].
        k: 1..C.
        apply_softmax: Return softmax probabilities as scores (else the inputs themselves).

    Returns:
        (indices int64 [N, k], scores float32 [N, k]).
    """
    values = np.asarray(logits, dtype=np.float64)
    rows = np.arange(values.shape[0])[:, None]
    if k < values.shape[1]:
        candidates = np.argpartition(-values, k - 1, axis=1)[:, :k]
    else:
        candidates = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    # Sort the k candidates by value descending, then by index ascending (deterministic ties).
    order = np.lexsort((candidates, -values[rows, candidates]), axis=1)
    indices = np.take_along_axis(candidates, order, axis=1).astype(np.int64)
    chosen = values[rows, indices]
    if not apply_softmax:
        return indices, chosen.astype(np.float32)
    peak = values.max(axis=1, keepdims=True)
    total = np.exp(values - peak).sum(axis=1, keepdims=True)
    return indices, (np.exp(chosen - peak) / total).astype(np.float32)


class Classifier:
    """Top-k classification of a dynamic batch of logits (see the module doc)."""

    def __init__(
        self, labels: Sequence[str], params: ClassifyParams, input_name: str, input_dtype: Any = np.float32
    ) -> None:
        self.params = params
        self.input_name = input_name
        self.input_dtype = np.dtype(input_dtype)
        self.classes = len(labels)
        self.labels = np.array([label.encode("utf-8") for label in labels], dtype=object)

    def _check(self, inputs: Mapping[str, np.ndarray | None]) -> np.ndarray:
        array = inputs.get(self.input_name)
        if array is None:
            raise RequestError(f"missing input '{self.input_name}'")
        if array.dtype != self.input_dtype:
            raise RequestError(
                f"input '{self.input_name}' has dtype {array.dtype}; expected {self.input_dtype}"
            )
        if array.ndim != 2 or array.shape[1] != self.classes or array.shape[0] == 0:
            raise RequestError(
                f"input '{self.input_name}' has shape {list(array.shape)}; expected [-1, {self.classes}]"
            )
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            error = RequestError(
                f"input '{self.input_name}' item(s) {', '.join(str(i) for i in bad[:5])} hold NaN or "
                "infinity; the model's output cannot be ranked"
            )
            error.reason = "non_finite"  # type: ignore[attr-defined]
            raise error
        return array

    def classify(self, logits: np.ndarray) -> dict[str, np.ndarray]:
        """Logits [N, C] -> LABELS (object of bytes), SCORES (float32), CLASS_INDICES (int64), each
        [N, k]."""
        indices, scores = top_k(logits, self.params.top_k, self.params.apply_softmax)
        return {tensors.LABELS: self.labels[indices], tensors.SCORES: scores, tensors.CLASS_INDICES: indices}

    def run(
        self, requests: Sequence[Mapping[str, np.ndarray | None]]
    ) -> list[dict[str, np.ndarray] | Exception]:
        """A dynamic batch in one vectorized pass; a malformed request fails alone."""
        results: list[dict[str, np.ndarray] | Exception] = []
        arrays: list[np.ndarray] = []
        for request in requests:
            try:
                arrays.append(self._check(request))
                results.append({})
            except RequestError as error:
                results.append(error)
        if not arrays:
            return results
        outputs = self.classify(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        sizes = iter(array.shape[0] for array in arrays)
        offset = 0
        for i, result in enumerate(results):
            if isinstance(result, Exception):
                continue
            size = next(sizes)
            results[i] = {name: array[offset : offset + size] for name, array in outputs.items()}
            offset += size
        return results


def check_config(model: str, config: Mapping[str, Any], params: ClassifyParams) -> tuple[str, int, np.dtype]:
    """The config must declare one FP32/FP16 input [C] and the outputs LABELS, SCORES and
    CLASS_INDICES, each [top_k], with top_k <= C.

    Returns:
        The input's name, its classes C and its numpy dtype.

    Raises:
        ClassifyLoadError: naming the tensor and what was expected and given.
    """
    inputs = list(config.get("input", ()))
    if (
        len(inputs) != 1
        or inputs[0].get("data_type") not in INPUT_TYPES
        or len(inputs[0].get("dims", ())) != 1
    ):
        got = ", ".join(_describe(t) for t in inputs)
        raise ClassifyLoadError(
            f"model '{model}': kiln_classify needs exactly one input of {' or '.join(INPUT_TYPES)} "
            f"dims [classes], got {got or 'none'}"
        )
    classes = int(inputs[0]["dims"][0])
    if classes < 1:
        raise ClassifyLoadError(
            f"model '{model}': input '{inputs[0]['name']}' needs a fixed number of classes, got {classes}"
        )
    if params.top_k > classes:
        raise ClassifyLoadError(
            f"model '{model}': parameter 'top_k' is {params.top_k}, more than the input's {classes} classes"
        )
    declared = {t.get("name"): t for t in config.get("output", ())}
    for name, types in OUTPUTS.items():
        tensor = declared.get(name)
        dims = None if tensor is None else [int(d) for d in tensor.get("dims", ())]
        if tensor is None or tensor.get("data_type") not in types or dims != [params.top_k]:
            got = "absent" if tensor is None else _describe(tensor)
            raise ClassifyLoadError(
                f"model '{model}': output '{name}' must be {types[0]} dims [{params.top_k}] (top_k), "
                f"got {got}"
            )
    extra = sorted(set(declared) - set(OUTPUTS))
    if extra:
        raise ClassifyLoadError(
            f"model '{model}': kiln_classify produces {', '.join(OUTPUTS)}; config.pbtxt also "
            f"declares {extra}"
        )
    return inputs[0]["name"], classes, np.dtype(INPUT_TYPES[inputs[0]["data_type"]])


def _describe(tensor: Mapping[str, Any]) -> str:
    return f"{tensor.get('name')} {tensor.get('data_type')} {list(tensor.get('dims', ()))}"


def load(context: Any) -> Classifier:
    """The adapter's hook (`kiln.serving.adapter.python_model`): parameters, config, labels."""
    params = parse_params(context.model_name, context.parameters, CLASSIFY_PARAMS, ClassifyParams)
    name, classes, dtype = check_config(context.model_name, context.config, params)
    try:
        path = context.model_file(params.labels_file)
    except FileNotFoundError as error:
        raise ClassifyLoadError(str(error)) from None
    return Classifier(read_labels(context.model_name, path, classes), params, name, dtype)
