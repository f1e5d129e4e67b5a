"""The kiln_detect backend's logic: a YOLO-style raw detection head -> boxes on the original image.

Per item, the model's head holds, for each of its candidates, 4 box values (cx, cy, w, h in the
model input's pixels) and one score per class: [4 + classes, candidates] (YOLOv8's layout,
`layout: attributes_first`) or [candidates, 4 + classes] (`layout: candidates_first`). The step

1. takes each candidate's best class (argmax; ties to the lower class index) and its score, as the
   head gives it (YOLOv8's exported scores are already sigmoid probabilities),
2. keeps the candidates whose score is >= `score_threshold` and, with `classes`, whose best class
   is one of those (a candidate whose best class is filtered out is dropped, not demoted to its
   second-best class),
3. runs greedy non-maximum suppression in the model's pixels: highest score first (ties: the lower
   candidate index), dropping every box whose IoU with a kept box is > `iou_threshold`, per class
   (boxes of different classes never suppress each other; `class_agnostic` makes it one NMS across
   classes), stopping at `max_detections`,
4. maps the kept boxes to the original image with the transform kiln_image output for it
   (FP32 [6] = scale_x, scale_y, pad_x, pad_y, width, height: `x = (x_model - pad_x) / scale_x`,
   `y = (y_model - pad_y) / scale_y`) and clips them to 0..width, 0..height.

Outputs, per item, padded to `max_detections` rows: boxes FP32 [max_detections, 4] (x1, y1, x2,
y2 in the original image's pixels), scores FP32 [max_detections], classes INT64 [max_detections]
(-1 in the padding), labels BYTES [max_detections] (from `labels_file`; empty in the padding),
count INT32 [1] (how many rows are real), most confident first. The config's tensors are told
apart by type and shape, so their names are the pipeline's (see `kiln.pipelines`).

The decoding (argmax, thresholds, the class filter) runs once over the whole dynamic batch; the
NMS loop runs per item, each pass one vectorized IoU of the next kept box against the remaining
ones (at most `max_detections` passes). A request with a malformed head or transform fails alone,
the message naming the input and the item.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from kiln.serving.classify import ClassifyLoadError, read_labels
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param, ParamError, parse_params

LAYOUTS = ("attributes_first", "candidates_first")
"""attributes_first: a head item is [4 + classes, candidates] (YOLOv8); candidates_first: its
transpose, [candidates, 4 + classes]."""
LAYOUT_SHAPES = {
    "attributes_first": "[4 + classes, candidates]",
    "candidates_first": "[candidates, 4 + classes]",
}
BOX_VALUES = 4
"""cx, cy, w, h: the first attributes of a candidate; its class scores follow."""
TRANSFORM_FIELDS = ("scale_x", "scale_y", "pad_x", "pad_y", "width", "height")
"""The transform input's values per item (what kiln_image outputs; see `kiln.serving.image`)."""
TRANSFORM_SIZE = len(TRANSFORM_FIELDS)
PADDING_CLASS = -1
"""The class of a padding row (beyond `count`)."""

DETECT_PARAMS: tuple[Param, ...] = (
    Param(
        "layout", "str", "attributes_first",
        "the head's item layout: attributes_first is [4 + classes, candidates] (YOLOv8), "
        "candidates_first is [candidates, 4 + classes]", choices=LAYOUTS,
    ),
    Param(
        "score_threshold", "float", 0.25,
        "a candidate is kept when its best class score is >= this (0..1)", minimum=0.0,
    ),
    Param(
        "iou_threshold", "float", 0.45,
        "NMS drops a box whose IoU with a more confident kept box is > this (0..1)", minimum=0.0,
    ),
    Param("max_detections", "int", 100, "detections returned per item (the outputs' rows)", minimum=1),
    Param(
        "classes", "floats", (),
        "class indices to keep (comma-separated; unset keeps every class)",
    ),
    Param(
        "class_agnostic", "bool", False,
        "one NMS across all classes (false: per class, boxes of different classes never suppress "
        "each other)",
    ),
    Param(
        "labels_file", "name", "labels.txt", "file in the model folder: one label per line, in class order"
    ),
)
"""kiln_detect's `parameters` (config.pbtxt); see the module docstring."""


@dataclass(frozen=True)
class DetectParams:
    """kiln_detect's `parameters`, parsed (see DETECT_PARAMS); `classes` as sorted int indices."""

    layout: str
    score_threshold: float
    iou_threshold: float
    max_detections: int
    classes: tuple[int, ...]
    class_agnostic: bool
    labels_file: str


def detect_params(model: str, raw: Mapping[str, str]) -> DetectParams:
    """Parses and cross-checks kiln_detect's `parameters`.

    Raises:
        ParamError: a key is unknown, a value is out of its range (a threshold above 1, a class
            that is not an integer >= 0), naming the model, the key and the value.
    """
    params = parse_params(model, raw, DETECT_PARAMS, DetectParams)
    for name in ("score_threshold", "iou_threshold"):
        if getattr(params, name) > 1:
            raise ParamError(f"model '{model}': parameter '{name}' must be in 0..1, got {raw.get(name)!r}")
    if any(c < 0 or c != int(c) for c in params.classes):
        raise ParamError(
            f"model '{model}': parameter 'classes' must be class indices (integers >= 0), "
            f"got {raw.get('classes')!r}"
        )
    return dataclasses.replace(params, classes=tuple(sorted({int(c) for c in params.classes})))


class DetectInputError(RequestError):
    """A request's head or transform is malformed; the message names the input and the item.

    Attributes:
        reason: The failure metric's label: "non_finite" or "invalid_input".
    """

    def __init__(self, message: str, reason: str = "invalid_input") -> None:
        super().__init__(message)
        self.reason = reason


class DetectLoadError(ModelLoadError):
    """The config, the parameters and the labels disagree; the message names the model."""


def nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    classes: np.ndarray | None,
    iou_threshold: float,
    limit: int,
) -> np.ndarray:
    """Greedy non-maximum suppression.

    Args:
        boxes: float [n, 4]: x1, y1, x2, y2.
        scores: float [n].
        classes: int [n] for per-class NMS (boxes of different classes never suppress each
            other), or None for one NMS across all boxes.
        iou_threshold: A box whose IoU with a kept box is > this is dropped.
        limit: Keep at most this many.

    Returns:
        int64 indices of the kept boxes, highest score first (ties: the lower index first).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, BOX_VALUES)
    count = boxes.shape[0]
    if count == 0:
        return np.empty(0, dtype=np.int64)
    if classes is not None:
        # Shift each class into its own region, so boxes of two classes never overlap: the span of
        # every coordinate, plus 1, apart (negative coordinates included).
        span = float(boxes.max() - boxes.min()) + 1.0
        boxes = boxes + (np.asarray(classes, dtype=np.float64) * span)[:, None]
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    x1, y1, x2, y2 = boxes[order].T
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    kept: list[int] = []
    remaining = np.arange(count)
    while remaining.size and len(kept) < limit:
        first, rest = remaining[0], remaining[1:]
        kept.append(int(first))
        width = np.clip(np.minimum(x2[first], x2[rest]) - np.maximum(x1[first], x1[rest]), 0, None)
        height = np.clip(np.minimum(y2[first], y2[rest]) - np.maximum(y1[first], y1[rest]), 0, None)
        inter = width * height
        union = areas[first] + areas[rest] - inter
        iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
        remaining = rest[iou <= iou_threshold]
    return order[np.asarray(kept, dtype=np.int64)].astype(np.int64)


def to_corners(cxcywh: np.ndarray) -> np.ndarray:
    """float [n, 4] cx, cy, w, h -> float64 [n, 4] x1, y1, x2, y2."""
    values = np.asarray(cxcywh, dtype=np.float64)
    half = values[:, 2:4] / 2
    return np.concatenate([values[:, 0:2] - half, values[:, 0:2] + half], axis=1)


def to_original(boxes: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Boxes x1, y1, x2, y2 in the model input's pixels -> the original image's, clipped to it.

    Args:
        boxes: float [n, 4].
        transform: [6]: scale_x, scale_y, pad_x, pad_y, width, height (see the module doc).
    """
    scale_x, scale_y, pad_x, pad_y, width, height = (float(v) for v in transform)
    out = np.asarray(boxes, dtype=np.float64).copy()
    out[:, 0::2] = np.clip((out[:, 0::2] - pad_x) / scale_x, 0.0, width)
    out[:, 1::2] = np.clip((out[:, 1::2] - pad_y) / scale_y, 0.0, height)
    return out


ROLES = ("boxes", "scores", "classes", "labels", "count")
"""kiln_detect's outputs, by what they hold (the config's names are the pipeline's)."""


class DetectTensors(NamedTuple):
    """The tensor names a kiln_detect config declares, and the head's geometry."""

    head: str
    head_dtype: np.dtype
    transform: str
    classes: int
    candidates: int
    """-1 when the config leaves the candidates' count variable."""
    outputs: Mapping[str, str]
    """Role (ROLES) -> the output's name."""


class Detector:
    """Decoding, NMS and mapping back of a dynamic batch of detection heads (see the module doc)."""

    def __init__(self, labels: Sequence[str], params: DetectParams, tensors: DetectTensors) -> None:
        if len(labels) != tensors.classes:
            raise ValueError(f"{len(labels)} labels for {tensors.classes} classes")
        self.params = params
        self.tensors = tensors
        self.labels = np.array([label.encode("utf-8") for label in labels], dtype=object)
        self.attributes = BOX_VALUES + tensors.classes
        self.filter = np.asarray(params.classes, dtype=np.int64) if params.classes else None

    # -- one request's inputs -------------------------------------------------------------------
    def _item_shape(self) -> list[int]:
        candidates = self.tensors.candidates
        if self.params.layout == "attributes_first":
            return [self.attributes, candidates]
        return [candidates, self.attributes]

    def check(self, inputs: Mapping[str, np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        """One request's head and transform, checked.

        Raises:
            DetectInputError: an input is missing, of another dtype or shape, the two disagree on
                the items, or an item holds NaN or infinity or an unusable transform.
        """
        name, transform_name = self.tensors.head, self.tensors.transform
        head, transform = inputs.get(name), inputs.get(transform_name)
        for tensor, array in ((name, head), (transform_name, transform)):
            if array is None:
                raise DetectInputError(f"missing input '{tensor}'")
        assert head is not None and transform is not None
        if head.dtype != self.tensors.head_dtype:
            raise DetectInputError(
                f"input '{name}' has dtype {head.dtype}; expected {self.tensors.head_dtype}"
            )
        item = self._item_shape()
        if head.ndim != 3 or head.shape[0] == 0 or any(
            want not in (-1, got) for want, got in zip(item, head.shape[1:], strict=True)
        ):
            raise DetectInputError(
                f"input '{name}' has shape {list(head.shape)}; expected {[-1, *item]} (per item: "
                f"{BOX_VALUES} box values cx, cy, w, h and {self.tensors.classes} class scores for "
                f"each candidate, layout {self.params.layout})"
            )
        if transform.dtype != np.float32 or transform.shape != (head.shape[0], TRANSFORM_SIZE):
            raise DetectInputError(
                f"input '{transform_name}' has shape {list(transform.shape)} and dtype "
                f"{transform.dtype}; expected [{head.shape[0]}, {TRANSFORM_SIZE}] float32 (one "
                f"transform per item of '{name}')"
            )
        finite = np.isfinite(head.reshape(head.shape[0], -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise DetectInputError(
                f"input '{name}' item(s) {', '.join(str(i) for i in bad[:5])} hold NaN or infinity; "
                "the model's output cannot be decoded",
                reason="non_finite",
            )
        usable = (
            np.isfinite(transform).all(axis=1)
            & (transform[:, 0] > 0) & (transform[:, 1] > 0)
            & (transform[:, 4] >= 1) & (transform[:, 5] >= 1)
        )
        if not usable.all():
            bad = int(np.flatnonzero(~usable)[0])
            raise DetectInputError(
                f"input '{transform_name}' item {bad} is not an image transform "
                f"({', '.join(TRANSFORM_FIELDS)}): the scales must be > 0 and the width and height "
                f">= 1, got {[float(v) for v in transform[bad]]}"
            )
        return head, transform

    # -- the work -------------------------------------------------------------------------------
    def detect(self, heads: np.ndarray, transforms: np.ndarray) -> dict[str, np.ndarray]:
        """Heads [n, ...] (the configured layout) and transforms [n, 6] -> each role's output
        (boxes float32 [n, M, 4], scores float32 [n, M], classes int64 [n, M], labels object
        [n, M], count int32 [n, 1]; M = max_detections)."""
        params, limit = self.params, self.params.max_detections
        values = np.asarray(heads, dtype=np.float32)
        if params.layout == "attributes_first":
            values = values.transpose(0, 2, 1)  # [n, candidates, attributes]
        count = values.shape[0]
        scores = values[:, :, BOX_VALUES:]
        best_class = scores.argmax(axis=2)
        best = np.take_along_axis(scores, best_class[:, :, None], axis=2)[:, :, 0]
        keep = best >= np.float32(params.score_threshold)
        if self.filter is not None:
            keep &= np.isin(best_class, self.filter)

        boxes = np.zeros((count, limit, BOX_VALUES), dtype=np.float32)
        out_scores = np.zeros((count, limit), dtype=np.float32)
        classes = np.full((count, limit), PADDING_CLASS, dtype=np.int64)
        labels = np.full((count, limit), b"", dtype=object)
        found = np.zeros((count, 1), dtype=np.int32)
        for i in range(count):
            candidates = np.flatnonzero(keep[i])
            if candidates.size == 0:
                continue
            corners = to_corners(values[i, candidates, :BOX_VALUES])
            kinds = best_class[i, candidates]
            chosen = nms(
                corners, best[i, candidates], None if params.class_agnostic else kinds,
                params.iou_threshold, limit,
            )
            n = chosen.size
            boxes[i, :n] = to_original(corners[chosen], transforms[i])
            out_scores[i, :n] = best[i, candidates[chosen]]
            classes[i, :n] = kinds[chosen]
            labels[i, :n] = self.labels[kinds[chosen]]
            found[i, 0] = n
        by_role = {"boxes": boxes, "scores": out_scores, "classes": classes, "labels": labels, "count": found}
        return {self.tensors.outputs[role]: by_role[role] for role in ROLES}

    def run(
        self, requests: Sequence[Mapping[str, np.ndarray | None]]
    ) -> list[dict[str, np.ndarray] | Exception]:
        """A dynamic batch: requests of the same head shape decoded together; a malformed request
        fails alone."""
        results: list[dict[str, np.ndarray] | Exception] = [ValueError("not run")] * len(requests)
        groups: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for r, request in enumerate(requests):
            try:
                head, transform = self.check(request)
            except DetectInputError as error:
                results[r] = error
                continue
            groups.setdefault(head.shape[1:], []).append((r, head, transform))
        for members in groups.values():
            heads = np.concatenate([head for _, head, _ in members])
            transforms = np.concatenate([transform for _, _, transform in members])
            outputs = self.detect(heads, transforms)
            offset = 0
            for r, head, _ in members:
                size = head.shape[0]
                results[r] = {name: array[offset : offset + size] for name, array in outputs.items()}
                offset += size
        return results


HEAD_TYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}
BYTES_TYPES = ("TYPE_STRING", "TYPE_BYTES")
"""Triton's JSON names BYTES "TYPE_STRING"."""


def _output_contract(limit: int) -> dict[str, tuple[tuple[str, ...], list[int]]]:
    return {
        "boxes": (("TYPE_FP32",), [limit, BOX_VALUES]),
        "scores": (("TYPE_FP32",), [limit]),
        "classes": (("TYPE_INT64",), [limit]),
        "labels": (BYTES_TYPES, [limit]),
        "count": (("TYPE_INT32",), [1]),
    }


def _describe(tensor: Mapping[str, Any]) -> str:
    return f"{tensor.get('name')} {tensor.get('data_type')} {list(tensor.get('dims', ()))}"


def check_config(model: str, config: Mapping[str, Any], params: DetectParams) -> DetectTensors:
    """The config must declare two inputs, the head (FP32/FP16, two dims in the configured layout,
    a fixed attributes dim 4 + classes >= 5) and the transform (FP32 [6]), and the five outputs
    (told apart by type and shape): boxes FP32 [M, 4], scores FP32 [M], classes INT64 [M], labels
    BYTES [M], count INT32 [1], M = max_detections. Every class of `classes` must exist.

    Raises:
        DetectLoadError: naming the tensor and what was expected and given.
    """
    inputs = list(config.get("input", ()))
    heads = [t for t in inputs if len(t.get("dims", ())) == 2 and t.get("data_type") in HEAD_TYPES]
    transforms = [
        t for t in inputs
        if t.get("data_type") == "TYPE_FP32" and [int(d) for d in t.get("dims", ())] == [TRANSFORM_SIZE]
    ]
    if len(inputs) != 2 or len(heads) != 1 or len(transforms) != 1:
        got = ", ".join(_describe(t) for t in inputs)
        raise DetectLoadError(
            f"model '{model}': kiln_detect needs two inputs, the head ({' or '.join(HEAD_TYPES)}, two "
            f"dims) and the transform (TYPE_FP32 dims [{TRANSFORM_SIZE}]), got {got or 'none'}"
        )
    head = heads[0]
    dims = [int(d) for d in head["dims"]]
    attributes, candidates = dims if params.layout == "attributes_first" else dims[::-1]
    if attributes < BOX_VALUES + 1 or candidates == 0 or candidates < -1:
        shape = LAYOUT_SHAPES[params.layout]
        raise DetectLoadError(
            f"model '{model}': input '{head['name']}' has dims {dims}; layout {params.layout} needs "
            f"{shape} with a fixed 4 + classes of at least 5"
        )
    classes = attributes - BOX_VALUES
    unknown = [c for c in params.classes if c >= classes]
    if unknown:
        raise DetectLoadError(
            f"model '{model}': parameter 'classes' names class(es) {', '.join(map(str, unknown))}, "
            f"but the head has {classes} classes (0..{classes - 1})"
        )
    contract = _output_contract(params.max_detections)
    found: dict[str, str] = {}
    for tensor in config.get("output", ()):
        dims_given = [int(d) for d in tensor.get("dims", ())]
        role = next(
            (r for r, (types, want) in contract.items()
             if tensor.get("data_type") in types and dims_given == want),
            None,
        )
        if role is None:
            raise DetectLoadError(
                f"model '{model}': output {_describe(tensor)} is none of kiln_detect's outputs "
                f"(max_detections {params.max_detections}): {_contract_text(contract)}"
            )
        if role in found:
            raise DetectLoadError(
                f"model '{model}': outputs '{found[role]}' and '{tensor['name']}' are both kiln_detect's "
                f"{role} output; declare each output once"
            )
        found[role] = tensor["name"]
    missing = [r for r in ROLES if r not in found]
    if missing:
        raise DetectLoadError(
            f"model '{model}': config.pbtxt declares no output for {', '.join(missing)}; kiln_detect "
            f"needs {_contract_text(contract)} (max_detections {params.max_detections}; any names)"
        )
    return DetectTensors(
        head["name"], np.dtype(HEAD_TYPES[head["data_type"]]), transforms[0]["name"], classes,
        candidates, found,
    )


def _contract_text(contract: Mapping[str, tuple[tuple[str, ...], list[int]]]) -> str:
    return ", ".join(f"{role} {types[0]} {dims}" for role, (types, dims) in contract.items())


def load(context: Any) -> Detector:
    """The adapter's hook (`kiln.serving.adapter.python_model`): parameters, config, labels."""
    params = detect_params(context.model_name, context.parameters)
    names = check_config(context.model_name, context.config, params)
    try:
        path = context.model_file(params.labels_file)
        labels = read_labels(context.model_name, path, names.classes)
    except (FileNotFoundError, ClassifyLoadError) as error:
        raise DetectLoadError(str(error)) from None
    return Detector(labels, params, names)
