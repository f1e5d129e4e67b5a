"""Check stage: an exported artifact must compute what the PyTorch model computes.

The exported model runs the way `kiln_onnx` serves it (`OnnxModel.load` with the spec's config and
parameters, so the server's load check runs here too) on held-out inputs, in batches of the
model's `max_batch_size` (which also exercises the symbolic batch dim), and every output element
must satisfy |candidate - reference| <= atol + rtol * |reference| (the spec's `Tolerance`).

`compare` and `assert_close` are generic over named output tensors: the FP16/INT8 variants and
TensorRT engines are compared with the same helpers, against the same reference outputs. A
variant (FP16, INT8) is gated by `check_budget` on its held-out metric instead: it may lose at
most its `Variant.max_metric_drop` against the FP32 reference model.

Only numpy is imported at module level: `BuildError` lives here and the CLI imports it without
the build extra.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.spec import ModelSpec, Tolerance

if TYPE_CHECKING:
    import torch

    from kiln.serving.onnx import OnnxModel

LATENCY_WARMUP_RUNS = 5
"""Untimed runs before the latency measurement (first runs allocate and pick kernels)."""
LATENCY_RUNS = 25
"""Timed single-item runs; the reported latency is their median."""
UNBATCHED_CHUNK = 1
"""Items per run for a model without a batch dim (max_batch_size 0)."""
BUDGET_STAGE = "budget"
"""The stage named in a `BudgetError`."""
METRIC_EPSILON = 1e-9
"""Float slack of the budget gate, so a drop exactly equal to the budget passes."""
KILN_ONNX = "kiln_onnx"
"""The backend whose loader (`kiln.serving.onnx.OnnxModel.load`) the check runs artifacts through."""


class BuildError(RuntimeError):
    """A build stage failed; the message names the model and the stage.

    Attributes:
        model: The model's name.
        stage: The stage that failed ("train", "export", "check", "publish", ...).
    """

    def __init__(self, model: str, stage: str, message: str) -> None:
        self.model = model
        self.stage = stage
        super().__init__(f"model '{model}', stage '{stage}': {message}")


class CheckError(BuildError):
    """An artifact's outputs differ from the reference's beyond the spec's tolerance."""

    def __init__(self, model: str, message: str, stage: str = "check") -> None:
        super().__init__(model, stage, message)


class BudgetError(BuildError):
    """A variant's held-out metric is further below the FP32 model's than its `max_metric_drop`.

    Attributes:
        variant: The variant's precision, e.g. "int8".
        metric: The metric's name.
        value: The variant's metric.
        reference: The FP32 reference model's metric.
        drop: `reference - value`.
        budget: The variant's `max_metric_drop`.
    """

    def __init__(
        self,
        model: str,
        variant: str,
        metric: str,
        value: float,
        reference: float,
        budget: float,
        *,
        reference_name: str = "FP32 PyTorch",
        detail: str = "",
    ) -> None:
        self.variant = variant
        self.metric = metric
        self.value = value
        self.reference = reference
        self.drop = reference - value
        self.budget = budget
        super().__init__(
            model,
            BUDGET_STAGE,
            f"variant {variant}: {metric} {value:.4f} is {self.drop:.4f} below the {reference_name} "
            f"model's {reference:.4f}, more than its budget max_metric_drop {budget:g}"
            + (f"; {detail}" if detail else ""),
        )


def check_budget(
    model: str,
    variant: str,
    metric: str,
    value: float,
    reference: float,
    budget: float,
    *,
    reference_name: str = "FP32 PyTorch",
    detail: str = "",
) -> float:
    """Gates a variant on its accuracy budget: `value >= reference - budget` (higher is better).

    Returns:
        The drop, `reference - value` (negative when the variant scores higher).

    Raises:
        BudgetError: the drop exceeds `budget` (beyond `METRIC_EPSILON` of float rounding).
    """
    drop = reference - value
    if not drop <= budget + METRIC_EPSILON:  # a NaN metric fails too
        raise BudgetError(
            model, variant, metric, value, reference, budget,
            reference_name=reference_name, detail=detail,
        )
    return drop


@dataclass(frozen=True)
class HeldOut:
    """Held-out data a source stage provides for checking, calibrating and scoring its model.

    Attributes:
        inputs: Evaluation inputs: one batch-first array per model input, in the order of
            `spec.inputs`. Never used for training or calibration.
        calibration: INT8 calibration inputs, same layout, disjoint from `inputs` (drawn from the
            training data or from other source material than the evaluation set).
        metric: The metric's name, e.g. "test accuracy" or "top-1 agreement with FP32".
        score: `score(outputs, reference)` maps a model's outputs on `inputs` (in the order of
            `spec.outputs`) to the metric; `reference` is the FP32 PyTorch model's outputs on the
            same inputs (for metrics measured against FP32; a labelled metric ignores it). The
            same function scores PyTorch, ONNX Runtime and every variant; higher is better.
        against_fp32: The metric is agreement with FP32 (no labels): every output's own metric
            then gates each variant too (`kiln.build.gates.check_variant`), not only the lowest.
    """

    inputs: tuple[np.ndarray, ...]
    calibration: tuple[np.ndarray, ...]
    metric: str
    score: Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]
    against_fp32: bool = False

    @property
    def size(self) -> int:
        """Number of held-out items."""
        return int(self.inputs[0].shape[0])


@dataclass(frozen=True)
class TensorDiff:
    """How one output tensor of a candidate differs from the reference.

    Attributes:
        name: Output tensor name.
        max_abs: Largest |candidate - reference|.
        max_rel: Largest |candidate - reference| / |reference| (inf where the reference is 0 and
            the candidate is not).
        worst_ratio: Largest |candidate - reference| / (atol + rtol * |reference|); above 1 means
            out of tolerance (inf for a NaN or where atol and rtol*|reference| are both 0).
        worst_item: Batch item holding the element with `worst_ratio`.
        violations: Elements out of tolerance.
        elements: Elements compared.
    """

    name: str
    max_abs: float
    max_rel: float
    worst_ratio: float
    worst_item: int
    violations: int
    elements: int


@dataclass(frozen=True)
class Comparison:
    """Every output tensor's difference, and the verdict under one tolerance."""

    tolerance: Tolerance
    tensors: tuple[TensorDiff, ...]

    @property
    def ok(self) -> bool:
        """All elements of all tensors are within tolerance."""
        return all(t.violations == 0 for t in self.tensors)

    @property
    def worst(self) -> TensorDiff:
        """The tensor with the largest excess over the tolerance."""
        return max(self.tensors, key=lambda t: (t.worst_ratio, t.max_abs))

    @property
    def max_abs(self) -> float:
        """Largest absolute error over all tensors."""
        return max(t.max_abs for t in self.tensors)

    @property
    def max_rel(self) -> float:
        """Largest relative error over all tensors."""
        return max(t.max_rel for t in self.tensors)


def _diff(name: str, candidate: np.ndarray, reference: np.ndarray, tol: Tolerance) -> TensorDiff:
    cand = np.asarray(candidate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.abs(cand - ref)
        err = np.where(np.isnan(err), np.inf, err)  # NaN on either side is never close
        mag = np.abs(ref)
        rel = np.where(mag > 0, err / mag, np.where(err > 0, np.inf, 0.0))
        bound = tol.atol + tol.rtol * mag
        ratio = np.where(bound > 0, err / bound, np.where(err > 0, np.inf, 0.0))
    if ratio.size == 0:
        return TensorDiff(name, 0.0, 0.0, 0.0, 0, 0, 0)
    flat = int(np.argmax(ratio))
    item = int(np.unravel_index(flat, ratio.shape)[0]) if ratio.ndim else 0
    return TensorDiff(
        name=name,
        max_abs=float(err.max()),
        max_rel=float(rel.max()),
        worst_ratio=float(ratio.reshape(-1)[flat]),
        worst_item=item,
        violations=int(np.count_nonzero(~(err <= bound))),
        elements=int(err.size),
    )


def compare(
    candidate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    tolerance: Tolerance,
) -> Comparison:
    """Compares named output tensors elementwise: |candidate - reference| <= atol + rtol*|reference|.

    Args:
        candidate: Outputs of the artifact under test, by tensor name.
        reference: Outputs of the reference model, by tensor name (every name must be in both).
        tolerance: The allowed difference.

    Raises:
        ValueError: a tensor is missing from `candidate` or the shapes differ.
    """
    missing = [name for name in reference if name not in candidate]
    if missing:
        raise ValueError(
            f"output(s) {', '.join(missing)} missing from the candidate "
            f"(it has: {', '.join(candidate) or 'none'})"
        )
    diffs = []
    for name, ref in reference.items():
        cand = candidate[name]
        if np.shape(cand) != np.shape(ref):
            raise ValueError(
                f"output '{name}' has shape {list(np.shape(cand))}, the reference "
                f"{list(np.shape(ref))}"
            )
        diffs.append(_diff(name, cand, ref, tolerance))
    return Comparison(tolerance, tuple(diffs))


def assert_close(
    model: str,
    candidate: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    tolerance: Tolerance,
    *,
    candidate_name: str = "ONNX Runtime",
    reference_name: str = "PyTorch",
    stage: str = "check",
) -> Comparison:
    """`compare`, raising CheckError on any element out of tolerance.

    The message names the model, the worst output tensor, its max absolute and relative error,
    the batch item of its worst element, how many elements are out of tolerance, and the
    tolerance.

    Returns:
        The comparison (all within tolerance).

    Raises:
        CheckError: an output is missing, has another shape, or differs beyond the tolerance.
    """
    try:
        result = compare(candidate, reference, tolerance)
    except ValueError as error:
        raise CheckError(model, f"{candidate_name} vs {reference_name}: {error}", stage) from None
    if not result.ok:
        worst = result.worst
        raise CheckError(
            model,
            f"{candidate_name} output '{worst.name}' differs from {reference_name} beyond the "
            f"tolerance: max abs error {worst.max_abs:.3g}, max rel error {worst.max_rel:.3g}, "
            f"worst at batch item {worst.worst_item}; {worst.violations} of {worst.elements} "
            f"elements out of tolerance atol={tolerance.atol:g}, rtol={tolerance.rtol:g} "
            f"(|{candidate_name} - {reference_name}| <= atol + rtol*|{reference_name}|)",
            stage,
        )
    return result


def run_batched(
    run: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    spec: ModelSpec,
    inputs: Sequence[np.ndarray],
) -> dict[str, np.ndarray]:
    """Runs `run` over `inputs` in chunks of `spec.max_batch_size` and concatenates the outputs.

    Args:
        run: Takes one feed (input name -> array) and returns outputs by name.
        spec: Names the inputs and outputs and gives the largest batch.
        inputs: Batch-first arrays, in the order of `spec.inputs`.

    Returns:
        Every output of `spec.outputs` over all items, by name.
    """
    names = [t.name for t in spec.inputs]
    items = int(inputs[0].shape[0])
    step = spec.max_batch_size if spec.max_batch_size > 0 else UNBATCHED_CHUNK
    parts: dict[str, list[np.ndarray]] = {t.name: [] for t in spec.outputs}
    for start in range(0, items, step):
        if spec.max_batch_size > 0:
            feed = {n: x[start : start + step] for n, x in zip(names, inputs, strict=True)}
            outputs = run(feed)
            for name in parts:
                parts[name].append(np.asarray(outputs[name]))
        else:  # no batch dim: one item per run, stacked back to batch-first
            feed = {n: x[start] for n, x in zip(names, inputs, strict=True)}
            outputs = run(feed)
            for name in parts:
                parts[name].append(np.asarray(outputs[name])[np.newaxis])
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def torch_runner(
    module: torch.nn.Module, spec: ModelSpec
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A `run` function for `run_batched` over a PyTorch module (eval mode, no grad)."""
    import torch

    module.eval()
    output_names = [t.name for t in spec.outputs]
    input_names = [t.name for t in spec.inputs]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            result = module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in input_names))
        results = result if isinstance(result, (tuple, list)) else (result,)
        return {n: r.detach().cpu().numpy() for n, r in zip(output_names, results, strict=True)}

    return run


def load_served(
    spec: ModelSpec, artifact: Path, parameters: Mapping[str, str] | None = None
) -> OnnxModel:
    """Loads `artifact` the way the `kiln_onnx` backend serves it, with its load-time checks.

    The config is the one `kiln generate` writes for `spec`; the spec's `parameters` apply (the
    ONNX Runtime thread counts of serving), with `model_filename` pointed at `artifact`.

    Raises:
        CheckError: the backend's load check fails (names, dtypes or dims differ from the spec).
    """
    from kiln.repository import config_dict
    from kiln.serving.onnx import ModelLoadError, OnnxModel
    from kiln.serving.params import ParamError

    params = dict(spec.parameters if parameters is None else parameters)
    params["model_filename"] = artifact.name
    try:
        return OnnxModel.load(spec.name, artifact.parent, config_dict(spec), params)
    except (ModelLoadError, ParamError) as error:
        raise CheckError(spec.name, f"kiln_onnx cannot load {artifact}: {error}") from None


def latency_ms(
    run: Callable[[dict[str, np.ndarray]], Any],
    spec: ModelSpec,
    inputs: Sequence[np.ndarray],
    *,
    batch: int = 1,
    warmup: int = LATENCY_WARMUP_RUNS,
    runs: int = LATENCY_RUNS,
) -> float:
    """Median wall time of one run on `batch` items, in milliseconds.

    Args:
        run: Takes one feed (input name -> array).
        spec: Names the inputs; with max_batch_size > 0 the items keep their batch dim.
        inputs: Batch-first arrays; the first `batch` items are used.
        batch: Items per run; must be 1 for a model without a batch dim, and at most the items
            in `inputs`.
        warmup: Untimed runs first.
        runs: Timed runs.

    Raises:
        ValueError: `batch` is not possible for this model or these inputs.
    """
    batched = spec.max_batch_size > 0
    items = int(inputs[0].shape[0])
    limit = min(spec.max_batch_size, items) if batched else 1
    if not 1 <= batch <= limit:
        raise ValueError(
            f"model '{spec.name}': latency batch must be in 1..{limit} (max_batch_size "
            f"{spec.max_batch_size}, {items} items given), got {batch}"
        )
    feed = {
        t.name: np.ascontiguousarray(x[:batch] if batched else x[0])
        for t, x in zip(spec.inputs, inputs, strict=True)
    }
    for _ in range(warmup):
        run(feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run(feed)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def onnx_runner(
    artifact: Path, spec: ModelSpec, *, optimized: bool = True
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A `run` function over a plain ONNX Runtime CPU session (for models not served by
    kiln_onnx; `load_served` is preferred where it applies, since it checks what serving checks).
    `optimized=False` turns every graph optimization off (no fusions, one thread): the
    independent reference an ONNX file is checked against.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
    output_names = [t.name for t in spec.outputs]

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(output_names, session.run(output_names, feed), strict=True))

    return run


def artifact_runner(
    artifact: Path, spec: ModelSpec
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """Runs `artifact` as it will be served: through kiln_onnx's loader when the spec's backend is
    kiln_onnx (its load check included), else through a plain ONNX Runtime session.

    Raises:
        CheckError: kiln_onnx's load check fails.
    """
    if spec.backend == KILN_ONNX:
        return load_served(spec, artifact).run
    return onnx_runner(artifact, spec)


def undecided_top1(logits: np.ndarray, tolerance: Tolerance) -> np.ndarray:
    """Which items' top-1 class a run within `tolerance` of `logits` may pick otherwise.

    Two runs that agree elementwise within atol + rtol*|x| (what the check stage guarantees
    between ONNX Runtime and PyTorch, or between two batch sizes or CPUs) can only rank an item's
    top two classes differently where their gap is at most both bounds summed. Everywhere else the
    top-1 class is decided, and equal predictions (and so equal accuracy, up to the undecided
    items) are guaranteed: that, not bit-equality, is what a test may assert.

    Args:
        logits: Scores [N, classes] of one run.
        tolerance: The elementwise bound between the runs compared.

    Returns:
        BOOL [N]: True where the top-1 class is not decided within the tolerance.
    """
    scores = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    if scores.shape[1] < 2:
        return np.zeros(len(scores), dtype=bool)
    second, first = np.sort(scores, axis=1)[:, -2:].T
    bound = 2 * tolerance.atol + tolerance.rtol * (np.abs(first) + np.abs(second))
    return (first - second) <= bound


def assert_same_top1(
    candidate: np.ndarray, reference: np.ndarray, tolerance: Tolerance, labels: np.ndarray | None = None
) -> int:
    """Asserts that two runs' top-1 classes agree wherever `reference` decides them (see
    `undecided_top1`) and, with `labels`, that their accuracies differ by at most the undecided
    items' share.

    Returns:
        How many items were undecided (a caller may bound it: many means the check says little).

    Raises:
        AssertionError: naming the items whose decided top-1 class differs.
    """
    undecided = undecided_top1(reference, tolerance)
    got = np.asarray(candidate).reshape(len(candidate), -1).argmax(axis=1)
    want = np.asarray(reference).reshape(len(reference), -1).argmax(axis=1)
    flipped = np.flatnonzero((got != want) & ~undecided)
    if flipped.size:
        raise AssertionError(
            f"top-1 class differs on {flipped.size} item(s) whose reference decides it within "
            f"atol={tolerance.atol:g}, rtol={tolerance.rtol:g}: items {flipped[:10].tolist()}"
        )
    if labels is not None:
        truth = np.asarray(labels).reshape(-1)
        gap = abs(float(np.mean(got == truth)) - float(np.mean(want == truth)))
        allowed = int(undecided.sum()) / len(truth)
        if gap > allowed + 1e-12:
            raise AssertionError(
                f"accuracies differ by {gap:.4f}, more than the undecided share {allowed:.4f}"
            )
    return int(undecided.sum())
