"""Per-output gates: what an output means decides how a variant is measured against FP32.

A single number over a whole model can hide a broken output: a cosine over a detector's
`[4 + classes, anchors]` tensor stays at 0.9995 when every class score of an INT8 variant is 0
(the box coordinates, 0-320, swamp the 0-1 scores), and an argmax over ten landmark regressions
flips on a 0.00067 difference. So each output gets a kind, declared in the spec
(`BuildSpec.outputs`, a `kiln.spec.OutputCheck` each) or inferred by `infer_kind`'s stated rule,
and the kind picks the metric:

- `class_scores`, `probabilities`: top-1 agreement with FP32 (items whose two highest FP32
  scores tie are not counted); columns: the last axis (one per class).
- `regression`: 1 - the worst column's max abs error over that column's FP32 range; columns: the
  per-item axis with the fewest entries (ties: the last).
- `embedding`: mean cosine similarity per item (over the last axis); columns: the last axis.
- `detections`: recall of FP32's boxes: each box above the score threshold matched by one of the
  same class at IoU >= `iou`; columns: the channel axis (4 box values cx, cy, w, h, then class
  scores), the smaller per-item axis unless declared.

Two checks hold for every output of every model and every variant, whatever its metric and
budget (`liveness`): a value that is NaN or infinite where FP32's is finite refuses the variant,
and so does a column that FP32 varies in but the variant holds constant (its range under
`DEAD_RANGE` of FP32's: zeroed or saturated). Every refusal names the output, the metric or
check, the value and the budget.

A model whose own metric is agreement with FP32 (a user's `CheckpointSource`/`OnnxFileSource`
without labels) is scored by these metrics, the lowest across outputs; for a model with a labelled
metric (digits' test accuracy), declared `OutputCheck`s add their gates, and liveness holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.build.check import BuildError
from kiln.spec import ModelSpec, OutputCheck, TensorSpec

KINDS = ("class_scores", "probabilities", "regression", "embedding", "detections")
CLASS_NAMES = re.compile(r"logit|score|class|prob", re.IGNORECASE)
EMBEDDING_NAMES = re.compile(r"embed|hidden|feature|pool", re.IGNORECASE)
INFERENCE_RULE = (
    "a 1-D output of k > 1 values whose name says logits/scores/class/prob is class_scores; "
    "a name saying embed/hidden/feature/pool is embedding; anything else is regression "
    "(declare BuildSpec.outputs to say otherwise)"
)
"""`infer_kind`'s rule, as the build log and docs state it."""
DEAD_RANGE = 0.01
"""A variant's column whose range (max - min over the held-out items) is under this share of
FP32's is dead: zeroed or saturated."""
LIVE_EPSILON = 1e-6
"""FP32's column varies when its range exceeds this times max(1, its largest magnitude)."""
RANGE_FLOOR = 0.01
"""regression: a column's error is measured against max(its FP32 range, this x its magnitude)."""
GATE_STAGE = "gate"


class OutputGateError(BuildError):
    """A variant refused by a per-output gate; the message names the output, the metric or check,
    the value and the budget."""

    def __init__(self, model: str, variant: str, output: str, message: str) -> None:
        self.variant = variant
        self.output = output
        super().__init__(model, GATE_STAGE, f"variant {variant}: output {output!r}: {message}")


@dataclass(frozen=True)
class ResolvedOutput:
    """One output with its kind and where that came from.

    Attributes:
        tensor: The output's spec.
        check: The declared OutputCheck, or one made by `infer_kind`.
        declared: Whether the spec declared it.
    """

    tensor: TensorSpec
    check: OutputCheck
    declared: bool

    def describe(self) -> str:
        """"'landmarks' (10,) regression (inferred)" for the build log."""
        how = "declared" if self.declared else "inferred"
        return f"{self.tensor.name!r} {tuple(self.tensor.dims)} {self.check.kind} ({how})"


def infer_kind(tensor: TensorSpec) -> str:
    """The kind of an output nobody declared (`INFERENCE_RULE`)."""
    if len(tensor.dims) == 1 and tensor.dims[0] > 1 and CLASS_NAMES.search(tensor.name):
        return "class_scores"
    if EMBEDDING_NAMES.search(tensor.name):
        return "embedding"
    return "regression"


def resolve(spec: ModelSpec) -> list[ResolvedOutput]:
    """Every output of `spec` with its kind: declared in `build.outputs`, else inferred."""
    declared = {c.name: c for c in (spec.build.outputs if spec.build is not None else ())}
    resolved = []
    for tensor in spec.outputs:
        check = declared.get(tensor.name)
        if check is None:
            resolved.append(ResolvedOutput(tensor, OutputCheck(tensor.name, infer_kind(tensor)), False))
        else:
            resolved.append(ResolvedOutput(tensor, check, True))
    return resolved


# --- metrics ----------------------------------------------------------------------------------


def _items(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float64).reshape(array.shape[0], -1)


def top1_agreement(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Share of items whose argmax over the last axis equals FP32's, among items whose two
    highest FP32 scores differ (a tie decides nothing); items with a non-finite value disagree."""
    cand = np.asarray(candidate, dtype=np.float64).reshape(-1, candidate.shape[-1])
    ref = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    if ref.shape[-1] < 2:
        return 1.0 if np.allclose(cand, ref, equal_nan=False) else 0.0
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decided = top2[:, 1] > top2[:, 0]
    finite = np.isfinite(cand).all(axis=-1)
    agree = (np.argmax(cand, axis=-1) == np.argmax(ref, axis=-1)) & finite
    return float(agree[decided].mean()) if decided.any() else 1.0


def cosine_per_item(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Mean over rows (every axis but the last flattened) of each row's cosine similarity; two
    all-zero rows agree, a row with a non-finite value scores 0."""
    cand = np.asarray(candidate, dtype=np.float64).reshape(-1, candidate.shape[-1])
    ref = np.asarray(reference, dtype=np.float64).reshape(-1, reference.shape[-1])
    finite = np.isfinite(cand).all(axis=1)
    cand = np.where(np.isfinite(cand), cand, 0.0)
    squares = np.sum(cand * cand, axis=1), np.sum(ref * ref, axis=1)
    norms = np.sqrt(squares[0] * squares[1])  # one square root: |a||b| of parallel rows is exact
    both_zero = (squares[0] == 0) & (squares[1] == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = np.where(norms > 0, np.sum(cand * ref, axis=1) / norms, 0.0)
    cosine = np.where(both_zero, 1.0, np.clip(cosine, -1.0, 1.0))
    cosine = np.where(np.all(cand == ref, axis=1), 1.0, cosine)  # identical: 1, not 1 - 2e-16
    return float(np.mean(np.where(finite, cosine, 0.0)))


def column_axis(check: OutputCheck, reference: np.ndarray) -> int:
    """The per-item axis (1-based in the batch-first array) holding the output's columns."""
    if reference.ndim < 2:
        return 0
    if check.column_axis is not None:
        return check.column_axis + 1
    if check.kind in ("class_scores", "probabilities", "embedding"):
        return reference.ndim - 1
    sizes = reference.shape[1:]
    smallest = min(sizes)
    return max(i for i, size in enumerate(sizes) if size == smallest) + 1


def _columns(array: np.ndarray, axis: int) -> np.ndarray:
    """[columns, values]: every value of each column, over items and the other axes."""
    if axis == 0:
        return np.asarray(array, dtype=np.float64).reshape(1, -1)
    moved = np.moveaxis(np.asarray(array, dtype=np.float64), axis, 0)
    return moved.reshape(moved.shape[0], -1)


def regression_score(candidate: np.ndarray, reference: np.ndarray, axis: int) -> tuple[float, int]:
    """(1 - the worst column's max abs error over its FP32 range, that column). The range is
    floored at `RANGE_FLOOR` of the column's largest magnitude (and at 1e-12), so a column the
    held-out items barely move is not measured against a hair."""
    cand, ref = _columns(candidate, axis), _columns(reference, axis)
    spread = ref.max(axis=1) - ref.min(axis=1)
    scale = np.maximum(spread, np.maximum(RANGE_FLOOR * np.abs(ref).max(axis=1), 1e-12))
    with np.errstate(invalid="ignore"):
        error = np.abs(cand - ref).max(axis=1) / scale
    error = np.where(np.isfinite(error), error, np.inf)
    worst = int(np.argmax(error))
    return float(1.0 - min(1.0, error[worst])), worst


def _boxes(item: np.ndarray, axis: int, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(xyxy boxes [K, 4], classes [K]) of one item's candidates scoring above `threshold`;
    `item` holds 4 box values (cx, cy, w, h) then class scores along `axis` (0 or 1)."""
    rows = item if axis == 1 else item.T
    scores = rows[:, 4:]
    if scores.shape[1] == 0:
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
    best = scores.max(axis=1)
    keep = best > threshold
    cx, cy, w, h = (rows[keep, i] for i in range(4))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    return boxes, scores[keep].argmax(axis=1)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    top_left = np.maximum(a[:, None, :2], b[None, :, :2])
    bottom_right = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=2)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(axis=1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def detection_recall(
    candidate: np.ndarray, reference: np.ndarray, axis: int, threshold: float, iou: float
) -> float:
    """Share of FP32's boxes (score above `threshold`) that the variant also finds: a box of the
    same class at IoU >= `iou`, each used once. 1.0 when FP32 finds none."""
    found = total = 0
    for cand_item, ref_item in zip(candidate, reference, strict=True):
        ref_boxes, ref_classes = _boxes(np.asarray(ref_item, np.float64), axis - 1, threshold)
        cand_boxes, cand_classes = _boxes(np.asarray(cand_item, np.float64), axis - 1, threshold)
        total += len(ref_boxes)
        if not len(ref_boxes) or not len(cand_boxes):
            continue
        overlap = _iou(ref_boxes, cand_boxes)
        overlap[ref_classes[:, None] != cand_classes[None, :]] = 0.0
        used = np.zeros(len(cand_boxes), dtype=bool)
        for row in np.argsort(-overlap.max(axis=1)):
            options = np.where(~used & (overlap[row] >= iou))[0]
            if len(options):
                used[options[np.argmax(overlap[row, options])]] = True
                found += 1
    return 1.0 if total == 0 else found / total


METRIC_NAMES = {
    "class_scores": "top-1 agreement with FP32",
    "probabilities": "top-1 agreement with FP32",
    "regression": "1 - worst column's max abs error / its FP32 range",
    "embedding": "mean cosine similarity to FP32",
    "detections": "recall of FP32's boxes",
}


def user_metric(where: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The function a spec's `OutputCheck.metric` names ("package.module:function")."""
    import importlib

    module, _, name = where.partition(":")
    try:
        function = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise LookupError(f"its metric {where!r} cannot be loaded: {error}") from error
    return function


def score(output: ResolvedOutput, candidate: np.ndarray, reference: np.ndarray) -> float:
    """The output's metric (1.0 for FP32's own outputs)."""
    check = output.check
    if check.metric is not None:
        return float(user_metric(check.metric)(candidate, reference))
    if check.kind in ("class_scores", "probabilities"):
        return top1_agreement(candidate, reference)
    if check.kind == "embedding":
        return cosine_per_item(candidate, reference)
    axis = column_axis(check, reference)
    if check.kind == "detections":
        return detection_recall(candidate, reference, axis, check.score_threshold, check.iou)
    return regression_score(candidate, reference, axis)[0]


def metric_name(output: ResolvedOutput) -> str:
    """The output's metric, as messages name it."""
    check = output.check
    if check.metric is not None:
        return f"{check.metric} (the user's metric)"
    if check.kind == "detections":
        return f"{METRIC_NAMES['detections']} (score > {check.score_threshold:g}, IoU >= {check.iou:g})"
    return METRIC_NAMES[check.kind]


# --- the gates ----------------------------------------------------------------------------------


def liveness(output: ResolvedOutput, candidate: np.ndarray, reference: np.ndarray) -> str | None:
    """Why the variant's output is broken whatever its metric (None: it is not): a value NaN or
    infinite where FP32's is finite, or a column FP32 varies in that the variant holds constant."""
    ref = np.asarray(reference, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    bad = ~np.isfinite(cand) & np.isfinite(ref)
    if bad.any():
        return f"{int(bad.sum())} of {bad.size} values are NaN or infinite where FP32's are finite"
    axis = column_axis(output.check, ref)
    ref_cols, cand_cols = _columns(ref, axis), _columns(cand, axis)
    ref_range = ref_cols.max(axis=1) - ref_cols.min(axis=1)
    cand_range = cand_cols.max(axis=1) - cand_cols.min(axis=1)
    live = ref_range > LIVE_EPSILON * np.maximum(1.0, np.abs(ref_cols).max(axis=1))
    dead = live & (cand_range < DEAD_RANGE * ref_range)
    if not dead.any():
        return None
    first = int(np.argmax(dead))
    value = float(cand_cols[first, 0])
    where = "columns" if ref_cols.shape[0] > 1 else "the output"
    listed = ", ".join(str(i) for i in np.flatnonzero(dead)[:10]) + (", ..." if dead.sum() > 10 else "")
    return (
        f"dead: {int(dead.sum())} of {ref_cols.shape[0]} {where} (per-item axis {axis - 1}: {listed}) "
        f"vary in FP32 but not in the variant (column {first}: FP32 range {ref_range[first]:.4g}, "
        f"variant range {cand_range[first]:.3g}, constant near {value:.4g}; budget: range at least "
        f"{DEAD_RANGE:g}x FP32's)"
    )


@dataclass(frozen=True)
class OutputScore:
    """One output of a variant, measured."""

    output: ResolvedOutput
    value: float
    budget: float | None


def check_variant(
    spec: ModelSpec,
    variant: str,
    candidate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    default_budget: float,
    gated: bool,
) -> list[OutputScore]:
    """Gates one variant's outputs: liveness always; each output's metric against its budget
    (`OutputCheck.max_drop`, else `default_budget`) when it is declared or when `gated` (the
    model's own metric is agreement with FP32).

    Raises:
        OutputGateError: an output failed; the message names it, the metric, value and budget.
    """
    scores = []
    for output in resolve(spec):
        name = output.tensor.name
        problem = liveness(output, candidate[name], reference[name])
        if problem is not None:
            raise OutputGateError(spec.name, variant, name, problem)
        try:
            value = score(output, candidate[name], reference[name])
        except LookupError as error:
            raise OutputGateError(spec.name, variant, name, str(error)) from error
        budget = output.check.max_drop if output.check.max_drop is not None else default_budget
        if output.declared or gated:
            if not 1.0 - value <= budget + 1e-9:
                raise OutputGateError(
                    spec.name, variant, name,
                    f"{metric_name(output)} {value:.4f}, {1.0 - value:.4f} below FP32's 1.0, more "
                    f"than its budget {budget:g} ({output.check.kind}, "
                    f"{'declared' if output.declared else 'inferred: ' + INFERENCE_RULE})",
                )
            scores.append(OutputScore(output, value, budget))
        else:
            scores.append(OutputScore(output, value, None))
    return scores


def describe(scores: Sequence[OutputScore]) -> str:
    """One line of a variant's per-output metrics for the build log."""
    parts = []
    for item in scores:
        budget = "" if item.budget is None else f" (budget {item.budget:g})"
        parts.append(f"{item.output.tensor.name!r} {metric_name(item.output)} {item.value:.4f}{budget}")
    return "; ".join(parts)


def record(scores: Sequence[OutputScore]) -> dict[str, dict[str, object]]:
    """The per-output metrics as the manifest records them."""
    return {
        item.output.tensor.name: {
            "kind": item.output.check.kind,
            "declared": item.output.declared,
            "metric": metric_name(item.output),
            "value": item.value,
            "budget": item.budget,
        }
        for item in scores
    }


def agreement(spec: ModelSpec) -> tuple[str, object]:
    """(metric name, score function) of a model scored by agreement with FP32: the lowest of its
    outputs' metrics (the `kiln.build.check.HeldOut` contract)."""
    outputs = resolve(spec)
    if len(outputs) == 1:
        name = metric_name(outputs[0])
    else:
        parts = ", ".join(f"{o.tensor.name}: {o.check.kind}" for o in outputs)
        name = f"agreement with FP32, the lowest over outputs ({parts})"

    def agreement_score(outs: Sequence[np.ndarray], refs: Sequence[np.ndarray]) -> float:
        return min(score(o, out, ref) for o, out, ref in zip(outputs, outs, refs, strict=True))

    return name, agreement_score
