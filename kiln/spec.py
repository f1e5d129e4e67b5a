"""The typed spec: every served model and how to build it, declared once.

Specs are Python (each model folder's `spec.py`, see `kiln.registry`), so tensor names are
Python names a type checker reads. `validate()` walks a list of specs and raises one `SpecError`
listing every problem, each naming the model, the field, what is allowed and the value given,
before anything is built or written.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeAlias

DATA_TYPES = ("BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BYTES")
"""Triton data types, without the TYPE_ prefix."""

INSTANCE_KINDS = ("CPU", "GPU", "AUTO")
WARMUP_DATA = ("zero", "random")
MAX_QUEUE_DELAY_US = 10_000_000
"""Upper bound on the dynamic batcher's queue delay (10 s): anything longer is a typo."""

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
"""Model and tensor names: one path segment, never '.' or '..', no separators."""


class SpecError(ValueError):
    """One or more specs are invalid; the message lists every problem found."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in the spec:\n"
            + "\n".join(f"  - {p}" for p in self.problems)
        )


@dataclass(frozen=True)
class TensorSpec:
    """An input or output of a model.

    Attributes:
        name: Tensor name (from `kiln.tensors`).
        dtype: A Triton data type without TYPE_, e.g. "FP32".
        dims: Per-item dims, without the batch dim; -1 for a variable size.
        optional: An input a request may leave out (Triton's `optional: true`); inputs only.
        allow_ragged_batch: Triton's `allow_ragged_batch: true`; inputs only. Requests whose
            shapes of this input differ (a -1 dim of another size) may share one dynamic batch;
            without it Triton batches only requests of equal shapes and closes the batch it is
            forming at the first request of another shape. Each request keeps its own tensor, so
            the backend must handle per-request shapes within one batch (`RAGGED_BATCH_BACKENDS`,
            kiln_onnx among them: it runs each shape of a batch as one call). Needs a batch dim,
            a dynamic batcher and a -1 dim (it has no effect otherwise); never on a pipeline's
            inputs. Not rendered for a kiln_onnx model of target "ngc" (Triton's onnxruntime
            backend would concatenate the requests into one flat tensor).
    """

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False
    allow_ragged_batch: bool = False


@dataclass(frozen=True)
class DynamicBatching:
    """Triton's dynamic batcher.

    Attributes:
        preferred_batch_sizes: Batch sizes the batcher tries to form, ascending.
        max_queue_delay_us: How long a request may wait for others to join its batch.
        preserve_ordering: Return responses in the order requests arrived.
    """

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    preserve_ordering: bool = False


@dataclass(frozen=True)
class InstanceGroup:
    """Copies of the model that run in parallel.

    Attributes:
        kind: "CPU", "GPU" or "AUTO".
        count: Instances (of each GPU named in `gpus`, for GPU).
        gpus: GPU indices, only for kind "GPU"; empty means all.
    """

    kind: str = "CPU"
    count: int = 1
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True)
class Warmup:
    """A warmup request Triton sends before it marks the model ready.

    Attributes:
        name: Shown in the server log.
        batch_size: Items in the warmup request.
        data: "zero" or "random" input data.
        count: How many times to send it.
        dims: Per-item dims of the warmup request for the inputs whose spec dims hold a -1 (input
            name -> dims, e.g. `{"input_ids": (16,)}`); when any input has a -1 dim, every such
            input must be given here, with its fixed dims as in the spec. Empty for a model whose
            inputs are all fixed: the warmup then uses the spec's dims.
    """

    name: str = "warmup"
    batch_size: int = 1
    data: str = "zero"
    count: int = 1
    dims: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: MappingProxyType({}))


VERSION_POLICIES = ("latest", "all", "specific")
"""Triton's model version policies: serve the newest N versions, every version, or listed ones."""


@dataclass(frozen=True)
class VersionPolicy:
    """Which version folders of a model Triton serves (config.pbtxt's `version_policy`).

    A request without a version goes to the highest served version; a new version folder is
    picked up when the model is loaded again (`--model-control-mode explicit` and the repository
    API's load, or `poll`), and Triton switches to it only once it is ready.

    Attributes:
        kind: "latest" (the `num_versions` highest), "all", or "specific" (`versions`).
        num_versions: How many of the newest versions to serve, for "latest".
        versions: The version numbers to serve, for "specific".
    """

    kind: str = "latest"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def latest(cls, num_versions: int = 1) -> VersionPolicy:
        """Serve the `num_versions` highest versions (Triton's default is the latest one)."""
        return cls("latest", num_versions=num_versions)

    @classmethod
    def all(cls) -> VersionPolicy:
        """Serve every version folder."""
        return cls("all")

    @classmethod
    def specific(cls, *versions: int) -> VersionPolicy:
        """Serve exactly these versions."""
        return cls("specific", versions=tuple(versions))


@dataclass(frozen=True)
class Tolerance:
    """How close an exported model's outputs must be to the reference's: |a-b| <= atol + rtol*|b|."""

    atol: float = 1e-4
    rtol: float = 1e-3


INT8_METHODS = ("minmax", "percentile", "entropy")
"""Calibration methods of ONNX Runtime's static quantizer (kiln.build.quantize)."""
INT8_TYPES = ("quint8", "qint8")


@dataclass(frozen=True)
class Int8Options:
    """A model's INT8 quantization settings (`BuildSpec.int8`); None keeps the source stage's
    choice or kiln.build.quantize's default. The build records the settings used in the manifest.

    Attributes:
        method: Calibration: "minmax", "percentile" or "entropy".
        per_channel: Per-channel weight scales.
        reduce_range: 7-bit weights (safer on CPUs without VNNI).
        activation_type: "quint8" or "qint8".
        weight_type: "quint8" or "qint8".
        op_types_to_quantize: Quantize only these operator types (empty: every type).
        exclude_op_types: Operator types kept in FP32 (e.g. "Sigmoid", "Concat" of a
            detection head).
        nodes_to_exclude: Node names kept in FP32 (e.g. the head's last Conv nodes).
        batch_size: Calibration items per run.
    """

    method: str | None = None
    per_channel: bool | None = None
    reduce_range: bool | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    op_types_to_quantize: tuple[str, ...] | None = None
    exclude_op_types: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] | None = None
    batch_size: int | None = None


OUTPUT_KINDS = ("class_scores", "probabilities", "regression", "embedding", "detections")
"""What an output means, which decides how a variant is measured against FP32 (`kiln.build.gates`)."""


@dataclass(frozen=True)
class OutputCheck:
    """What one output means, and so how each variant's is measured against FP32's.

    Undeclared outputs get a kind by a stated rule (`kiln.build.gates.infer_kind`, shown in the
    build log). Whatever the kind, a variant whose output is NaN where FP32's is finite, or holds
    constant a column FP32 varies in (zeroed or saturated), is refused.

    Attributes:
        name: The output tensor.
        kind: One of OUTPUT_KINDS: class_scores and probabilities (top-1 agreement), regression
            (worst column's max abs error over its FP32 range), embedding (cosine per item),
            detections (recall of FP32's boxes at IoU `iou`).
        max_drop: This output's budget: how far its metric may fall below FP32's 1.0; None takes
            the variant's `max_metric_drop`.
        column_axis: The per-item axis holding the output's columns (classes, coordinates,
            channels); None: the kind's rule (see `kiln.build.gates`).
        score_threshold: detections: a candidate counts when its best class score is above this.
        iou: detections: a variant's box matches FP32's at this IoU or more (same class).
        metric: The user's own metric instead of the kind's: "package.module:function", called
            as function(candidate, reference) with the variant's and FP32's outputs (batch-first
            numpy arrays), returning a number where FP32 itself scores 1.0 (higher is better).
            The liveness check holds whatever the metric.
    """

    name: str
    kind: str
    max_drop: float | None = None
    column_axis: int | None = None
    score_threshold: float = 0.25
    iou: float = 0.5
    metric: str | None = None


def source_range(low: float, high: float, *, integer: bool = True) -> dict[str, Any]:
    """Field metadata: the closed range a source setting must lie in (checked by validate()).

    `seed: int = field(default=0, metadata=source_range(0, 2**32 - 1))`
    """
    return {"range": (low, high), "integer": integer}


@dataclass(frozen=True)
class CheckpointSource:
    """A user's own PyTorch model: a factory building the module and a state_dict checkpoint.

    Attributes:
        factory: "package.module:function" returning the untrained nn.Module.
        checkpoint: Path of the state_dict file (relative paths are relative to the project root).
        held_out: Path of an .npz with the evaluation inputs (one array per spec input, named after
            it) and the calibration inputs (named "calibration/<input name>").
    """

    factory: str
    checkpoint: str
    held_out: str


@dataclass(frozen=True)
class OnnxFileSource:
    """An existing ONNX model, served and quantized as is.

    The check stage never compares the file with itself: the reference is `reference` when
    given (the outputs the model's own framework gave on the evaluation items), else the file on
    ONNX Runtime with every graph optimization off (no fused kernels), against which the served
    session (all optimizations, through kiln_onnx's loader) must agree within the tolerance.

    Attributes:
        path: Path of the .onnx file (relative paths are relative to the project root).
        held_out: Path of an .npz laid out as for CheckpointSource.
        reference: Optional path of an .npz of the expected FP32 outputs on the evaluation items
            (one array per spec output, named after it, batch-first).
    """

    path: str
    held_out: str
    reference: str | None = None


SourceSpec: TypeAlias = Any
"""A model's source settings: `CheckpointSource`, `OnnxFileSource`, or a frozen dataclass of a
model folder's own (`models/digits/spec.py`'s `DigitsCNNSource`), built by that folder's
`build.py`. Its fields may declare a range (`source_range`), checked by `validate`; a cross-field
rule goes in a `problems(self) -> list[str]` method."""
GENERIC_SOURCES = (CheckpointSource, OnnxFileSource)
"""The sources any model may use without a build hook of its own (`kiln.build.user_source`)."""

PRECISIONS = ("fp32", "fp16", "int8")
"""Artifact precisions: FP32 is the reference; FP16 converts weights and activations; INT8 is
post-training static quantization (QDQ) calibrated on `HeldOut.calibration`."""


@dataclass(frozen=True)
class Variant:
    """One artifact of a model at one precision.

    Attributes:
        precision: "fp32", "fp16" or "int8".
        max_metric_drop: The build fails when this variant's held-out metric is more than this
            below the FP32 PyTorch model's (in the metric's units: 0.005 is half a point of
            accuracy).
        serve: Publish it into the model repository, as model `<name>` for fp32 and
            `<name>_<precision>` otherwise (see `served_name`).
        optional: A variant its gates refuse is reported (the build log, the table, the
            manifest's `refused`) and not published, while the model's other variants are; a
            refused variant that is not optional fails the build. The fp32 variant is never
            optional.
    """

    precision: str
    max_metric_drop: float = 0.0
    serve: bool = True
    optional: bool = False


def served_name(model: str, precision: str) -> str:
    """The repository name of `model`'s variant at `precision`."""
    return model if precision == "fp32" else f"{model}_{precision}"


@dataclass(frozen=True)
class BuildSpec:
    """How the build pipeline produces a model's served artifact.

    Attributes:
        source: Where the PyTorch model comes from.
        opset: ONNX opset of the export.
        tolerance: Export check: ONNX Runtime against PyTorch on held-out inputs.
        min_accuracy: The build fails when the FP32 model's held-out metric is below this.
        variants: The artifacts to build; the first must be fp32 (the reference the others are
            measured against).
        outputs: What outputs mean (`OutputCheck`), for the per-output gates of every variant;
            an output not listed gets a kind by `kiln.build.gates.infer_kind`'s rule.
        int8: The INT8 variant's quantization settings (`Int8Options`); None: the source stage's
            or the defaults.
    """

    source: SourceSpec
    opset: int = 17
    tolerance: Tolerance = Tolerance()
    min_accuracy: float | None = None
    variants: tuple[Variant, ...] = (Variant("fp32"),)
    outputs: tuple[OutputCheck, ...] = ()
    int8: Int8Options | None = None


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository: its serving settings and, optionally, how to build it.

    Attributes:
        name: Model name in the repository (one folder).
        backend: Backend folder under `backends/` (e.g. "kiln_onnx").
        inputs: Input tensors.
        outputs: Output tensors.
        max_batch_size: Largest batch; 0 means the model has no batch dim.
        dynamic_batching: The dynamic batcher's settings, or None to run each request alone.
        instance_groups: Model instances.
        warmup: Warmup requests sent at load.
        parameters: The backend's `parameters` (validated against its declared keys).
        build: How `kiln build` produces the artifact; None for a model published by hand.
        description: One line for the docs.
        files: Small files `kiln generate` writes into the model's folder beside config.pbtxt
            (file name -> text), e.g. a classifier's `labels.txt`; committed with the config.
        version_policy: Which versions Triton serves; None leaves Triton's default (the latest
            version) and writes nothing into the config.
        decoupled: Triton's decoupled transaction policy: the model answers a request with any
            number of responses, sent from its own thread (a token stream), then a final flag.
            Only a backend of DECOUPLED_BACKENDS, which sends its responses itself, can serve
            one, and such a backend serves nothing else; clients reach it over gRPC streaming
            or HTTP `generate_stream`.
    """

    name: str
    backend: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    warmup: tuple[Warmup, ...] = ()
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    build: BuildSpec | None = None
    description: str = ""
    files: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    version_policy: VersionPolicy | None = None
    decoupled: bool = False


DECOUPLED_BACKENDS = frozenset({"kiln_generate"})
"""Backends that send their responses themselves, from their own thread (`kiln_generate`'s
engine streams tokens): the only ones a `decoupled` model may use, and they need it."""


@dataclass(frozen=True)
class EnsembleStep:
    """One step of an ensemble: a repository model and how its tensors connect.

    Attributes:
        model: The step's served model name (e.g. "resnet50_int8").
        inputs: The step model's input name -> the ensemble tensor fed to it (an ensemble input
            or an earlier step's output).
        outputs: The step model's output name -> the ensemble tensor it becomes (a new name, or
            one of the ensemble's outputs).
    """

    model: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]


PIPELINE_FORMS = ("ensemble", "fused")
"""How a pipeline (`EnsembleSpec`) is served: a Triton ensemble of its step models, or one fused
Python-based model (backend `kiln_fused`) running the steps' code in order in one process."""
FUSED_BACKEND = "kiln_fused"
"""The backend serving a pipeline of form "fused" (`kiln.serving.fused`)."""


@dataclass(frozen=True)
class Fused:
    """How the fused form of a pipeline is served (`EnsembleSpec.form == "fused"`): one model
    under the pipeline's name, whose one dynamic batcher and instances replace the steps' own
    (the step models are still generated and served on their own; the fused model loads each
    step from the step's folder, see `kiln.serving.fused`).

    Attributes:
        dynamic_batching: The fused model's dynamic batcher.
        instance_groups: The fused model's instances.
        step_metrics: Also count each step inside the fused model (the kiln_step_* metrics of
            the step's model, with the label `pipeline`); False counts only the fused model.
    """

    dynamic_batching: DynamicBatching = DynamicBatching()
    instance_groups: tuple[InstanceGroup, ...] = (InstanceGroup(),)
    step_metrics: bool = True


@dataclass(frozen=True)
class EnsembleSpec:
    """A pipeline: requests flow through `steps`, served in one of two forms (`form`).

    "ensemble" (the default): a Triton ensemble (`platform: "ensemble"`); every step keeps its
    own dynamic batcher and instances, the ensemble only routes tensors. "fused": one model of
    backend `kiln_fused` under the same name, with the same inputs and outputs, that runs the
    steps' own code in order inside one backend process under one dynamic batcher (`fused`).

    Attributes:
        name: Model name in the repository.
        inputs: What clients send.
        outputs: What clients get back (each produced by some step).
        steps: The models the request flows through, in data-flow order.
        max_batch_size: Largest batch a client may send; at most every step's max_batch_size.
        description: One line for the docs.
        form: "ensemble" or "fused" (PIPELINE_FORMS).
        fused: The fused form's batcher and instances (used only with form "fused").
    """

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[EnsembleStep, ...]
    max_batch_size: int = 0
    description: str = ""
    form: str = "ensemble"
    fused: Fused = Fused()

    @property
    def build(self) -> None:
        """Ensembles are never built: their steps are (or are published by hand)."""
        return None


Spec: TypeAlias = ModelSpec | EnsembleSpec
"""Anything the repository holds: a model with a backend, or an ensemble of them."""


def served_specs(specs: Sequence[ModelSpec | EnsembleSpec]) -> list[ModelSpec | EnsembleSpec]:
    """One spec per served model: each served variant of a built model under its served name
    (`digits`, `digits_int8`, ...); a model without a build spec, or an ensemble, as it is."""
    served: list[ModelSpec | EnsembleSpec] = []
    for spec in specs:
        if spec.build is None:
            served.append(spec)
            continue
        for variant in spec.build.variants:
            if variant.serve:
                served.append(dataclasses.replace(spec, name=served_name(spec.name, variant.precision)))
    return served


def _check_tensors(where: str, role: str, tensors: Sequence[TensorSpec]) -> list[str]:
    problems = []
    if not tensors:
        problems.append(f"{where}: field '{role}' must list at least one tensor, got none")
    seen: set[str] = set()
    for i, tensor in enumerate(tensors):
        at = f"{where}: field '{role}[{i}]"
        if not isinstance(tensor.name, str) or not _NAME.match(tensor.name):
            problems.append(f"{at}.name' must match {_NAME.pattern}, got {tensor.name!r}")
        elif tensor.name in seen:
            problems.append(f"{at}.name' repeats the name {tensor.name!r}")
        seen.add(tensor.name)
        if tensor.dtype not in DATA_TYPES:
            problems.append(
                f"{at}.dtype' must be one of {', '.join(DATA_TYPES)}, got {tensor.dtype!r}"
            )
        dims = tensor.dims
        if (
            not isinstance(dims, tuple)
            or not dims
            or any(not isinstance(d, int) or isinstance(d, bool) or (d < 1 and d != -1) for d in dims)
        ):
            problems.append(
                f"{at}.dims' must be a non-empty tuple of sizes >= 1 or -1 (variable), got {dims!r}"
            )
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_name(where: str, name: object) -> list[str]:
    if not isinstance(name, str) or not _NAME.match(name):
        return [
            f"{where}: field 'name' must be one path segment matching {_NAME.pattern}, "
            f"got {name!r}"
        ]
    return []


def _check_io(where: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> list[str]:
    """The inputs and outputs of a model or ensemble: each list on its own, then no optional or
    ragged output."""
    problems = _check_tensors(where, "inputs", inputs)
    problems += _check_tensors(where, "outputs", outputs)
    for i, tensor in enumerate(outputs):
        for flag in ("optional", "allow_ragged_batch"):
            if getattr(tensor, flag, False):
                problems.append(f"{where}: field 'outputs[{i}].{flag}' is only allowed on inputs")
    return problems


RAGGED_BATCH_BACKENDS = frozenset({"kiln_onnx", "kiln_pool", "kiln_detect"})
"""The backends whose execute path takes requests of different shapes in one dynamic batch, so
an input of theirs may set `TensorSpec.allow_ragged_batch`: each reads every request's own
tensors, checks them on their own and groups the requests by shape before concatenating
(kiln_onnx: `kiln.serving.batch.run_batch`, one ONNX Runtime call per shape; kiln_pool: by
sequence length; kiln_detect: by head shape). The other kiln backends concatenate every request
of a batch into one array (kiln_classify, kiln_tabular, kiln_threshold) or take only BYTES [1]
items (kiln_image, kiln_text), and kiln_fused's inputs are a pipeline's; a user's own backend is
not known to handle it."""


def _check_ragged(where: str, spec: ModelSpec) -> list[str]:
    """`allow_ragged_batch` on a model's inputs: true or false, and where set, a batch dim, a
    dynamic batcher, a -1 dim and a backend of RAGGED_BATCH_BACKENDS."""
    problems = []
    for i, tensor in enumerate(spec.inputs):
        flag = getattr(tensor, "allow_ragged_batch", False)
        if flag is False:
            continue
        at = f"{where}: field 'inputs[{i}].allow_ragged_batch' (input {tensor.name!r})"
        if not isinstance(flag, bool):
            problems.append(f"{at} must be true or false, got {flag!r}")
            continue
        if spec.max_batch_size == 0:
            problems.append(
                f"{at} needs a batch dim (max_batch_size >= 1), got max_batch_size 0: "
                "only a dynamic batch can mix shapes"
            )
        elif spec.dynamic_batching is None:
            problems.append(
                f"{at} has no effect without dynamic_batching (each request runs alone); "
                "set dynamic_batching or drop the flag"
            )
        if isinstance(tensor.dims, tuple) and -1 not in tensor.dims:
            problems.append(
                f"{at} has no effect on fixed dims {tensor.dims}: every request has the same item "
                "shape (it is for a -1 dim)"
            )
        if spec.backend not in RAGGED_BATCH_BACKENDS:
            problems.append(
                f"{at} needs a backend that handles requests of different shapes in one batch "
                f"({', '.join(sorted(RAGGED_BATCH_BACKENDS))}); backend {spec.backend!r} "
                "assumes equal shapes within a batch"
            )
    return problems


def _check_max_batch_size(where: str, mbs: object) -> tuple[int, list[str]]:
    """The max_batch_size to check the other fields against (0 when invalid), and its problems."""
    if not _is_int(mbs) or mbs < 0:
        return 0, [f"{where}: field 'max_batch_size' must be an integer >= 0, got {mbs!r}"]
    return mbs, []


def _check_model(spec: ModelSpec, backends: Iterable[str] | None) -> list[str]:
    where = f"model {spec.name!r}"
    problems = _check_name(where, spec.name)
    known = tuple(backends) if backends is not None else None
    if known is not None and spec.backend not in known:
        problems.append(
            f"{where}: field 'backend' must be one of {', '.join(known) or '(none found)'}, "
            f"got {spec.backend!r}"
        )
    problems += _check_io(where, spec.inputs, spec.outputs)
    problems += _check_ragged(where, spec)
    problems += _check_files(where, spec.files)
    overlap = {t.name for t in spec.inputs} & {t.name for t in spec.outputs}
    if overlap:
        problems.append(f"{where}: names {sorted(overlap)} are both inputs and outputs")

    mbs, found = _check_max_batch_size(where, spec.max_batch_size)
    problems += found
    if spec.dynamic_batching is not None:
        problems += _check_dynamic_batching(where, spec.dynamic_batching, mbs)
    problems += _check_instance_groups(where, spec.instance_groups)
    problems += _check_warmup(where, spec.warmup, mbs, spec.inputs)
    problems += _check_parameters(where, spec)

    if spec.version_policy is not None:
        problems += _check_version_policy(where, spec.version_policy)
    problems += _check_decoupled(where, spec)
    if spec.build is not None:
        problems += _check_build(where, spec.build, spec.outputs)
    return problems


def _check_decoupled(where: str, spec: ModelSpec) -> list[str]:
    if not isinstance(spec.decoupled, bool):
        return [f"{where}: field 'decoupled' must be true or false, got {spec.decoupled!r}"]
    if spec.decoupled and spec.backend not in DECOUPLED_BACKENDS:
        return [
            f"{where}: field 'decoupled' needs a backend that sends its own responses "
            f"({', '.join(sorted(DECOUPLED_BACKENDS))}); backend {spec.backend!r} answers each "
            "request once"
        ]
    if not spec.decoupled and spec.backend in DECOUPLED_BACKENDS:
        return [
            f"{where}: backend {spec.backend!r} streams its responses and needs field "
            "'decoupled' set to true"
        ]
    if spec.decoupled and spec.dynamic_batching is not None:
        return [
            f"{where}: field 'dynamic_batching' must be None for a decoupled model: its backend "
            "batches requests itself, between decode steps"
        ]
    return []


def _check_dynamic_batching(where: str, batching: DynamicBatching, mbs: int) -> list[str]:
    problems = []
    if mbs == 0:
        problems.append(
            f"{where}: field 'dynamic_batching' needs max_batch_size >= 1, got max_batch_size 0"
        )
    sizes = batching.preferred_batch_sizes
    if any(not _is_int(s) or s < 1 or (mbs and s > mbs) for s in sizes):
        problems.append(
            f"{where}: field 'dynamic_batching.preferred_batch_sizes' must hold sizes in "
            f"1..{mbs} (max_batch_size), got {sizes!r}"
        )
    elif list(sizes) != sorted(set(sizes)):
        problems.append(
            f"{where}: field 'dynamic_batching.preferred_batch_sizes' must be strictly "
            f"ascending, got {sizes!r}"
        )
    delay = batching.max_queue_delay_us
    if not _is_int(delay) or not 0 <= delay <= MAX_QUEUE_DELAY_US:
        problems.append(
            f"{where}: field 'dynamic_batching.max_queue_delay_us' must be in "
            f"0..{MAX_QUEUE_DELAY_US}, got {delay!r}"
        )
    return problems


def _check_instance_groups(where: str, groups: Sequence[InstanceGroup]) -> list[str]:
    problems = []
    if not groups:
        problems.append(f"{where}: field 'instance_groups' must list at least one group, got none")
    for i, group in enumerate(groups):
        at = f"{where}: field 'instance_groups[{i}]"
        if group.kind not in INSTANCE_KINDS:
            problems.append(
                f"{at}.kind' must be one of {', '.join(INSTANCE_KINDS)}, got {group.kind!r}"
            )
        if not _is_int(group.count) or group.count < 1:
            problems.append(f"{at}.count' must be an integer >= 1, got {group.count!r}")
        if group.gpus and group.kind != "GPU":
            problems.append(f"{at}.gpus' is only allowed with kind 'GPU', got kind {group.kind!r}")
    return problems


def _check_warmup(
    where: str, warmup: Sequence[Warmup], mbs: int, inputs: Sequence[TensorSpec]
) -> list[str]:
    problems = []
    for i, warm in enumerate(warmup):
        at = f"{where}: field 'warmup[{i}]"
        limit = max(mbs, 1)
        if not _is_int(warm.batch_size) or not 1 <= warm.batch_size <= limit:
            problems.append(f"{at}.batch_size' must be in 1..{limit}, got {warm.batch_size!r}")
        if warm.data not in WARMUP_DATA:
            problems.append(f"{at}.data' must be one of {', '.join(WARMUP_DATA)}, got {warm.data!r}")
        if not _is_int(warm.count) or warm.count < 1:
            problems.append(f"{at}.count' must be an integer >= 1, got {warm.count!r}")
        problems += _check_warmup_dims(at, warm, inputs)
    return problems


def _check_warmup_dims(at: str, warm: Warmup, inputs: Sequence[TensorSpec]) -> list[str]:
    """`Warmup.dims`: given for exactly the inputs with a -1 dim, each a full set of sizes >= 1
    that agrees with the spec's fixed dims."""
    given = warm.dims if isinstance(warm.dims, Mapping) else None
    if given is None:
        return [f"{at}.dims' must be a mapping of input name -> dims, got {type(warm.dims).__name__}"]
    problems = []
    by_name = {t.name: tuple(t.dims or ()) for t in inputs}
    variable = [name for name, dims in by_name.items() if -1 in dims]
    for name, dims in given.items():
        spec_dims = by_name.get(name)
        if spec_dims is None:
            problems.append(
                f"{at}.dims' names {name!r}, which is not an input (inputs: {', '.join(by_name)})"
            )
        elif -1 not in spec_dims:
            problems.append(
                f"{at}.dims[{name!r}]' is only for inputs with a -1 dim; {name!r} has fixed dims "
                f"{spec_dims}: leave it out"
            )
        elif (
            not isinstance(dims, tuple)
            or len(dims) != len(spec_dims)
            or any(not _is_int(d) or d < 1 for d in dims)
            or any(s != -1 and d != s for d, s in zip(dims, spec_dims, strict=True))
        ):
            example = tuple(8 if s == -1 else s for s in spec_dims)
            problems.append(
                f"{at}.dims[{name!r}]' must be a tuple of {len(spec_dims)} sizes >= 1 that fills the "
                f"-1 dims of {spec_dims} (e.g. {example}), got {dims!r}"
            )
    missing = [name for name in variable if name not in given]
    if missing:
        example = ", ".join(
            f"{name!r}: {tuple(8 if s == -1 else s for s in by_name[name])}" for name in missing
        )
        problems.append(
            f"{at}' needs fixed input dims; input(s) {', '.join(missing)} have a -1 dim: give "
            f"their warmup dims in Warmup.dims (fixed input dims or Warmup.dims), e.g. "
            f"dims={{{example}}}"
        )
    return problems


def _check_parameters(where: str, spec: ModelSpec) -> list[str]:
    # Imported here: the parameter schemas live with the backends' logic, kept out of import time.
    from kiln.serving.errors import ModelLoadError
    from kiln.serving.params import ParamError, check_params

    bad_types = [k for k, v in spec.parameters.items() if not isinstance(v, str)]
    if bad_types:
        return [f"{where}: field 'parameters' values must be strings; not for {bad_types}"]
    schema = backend_params(spec.backend)
    if schema is not None:
        try:
            values = check_params(spec.name, dict(spec.parameters), schema)
            rules = backend_param_rules(spec.backend)
            if rules is not None:
                rules(spec.name, values)
        except (ParamError, ModelLoadError) as error:
            return [f"{where}: field 'parameters': {error}"]
    return []


def _check_version_policy(where: str, policy: VersionPolicy) -> list[str]:
    at = f"{where}: field 'version_policy"
    if not isinstance(policy, VersionPolicy):
        return [f"{at}' must be a VersionPolicy, got {type(policy).__name__}"]
    if policy.kind not in VERSION_POLICIES:
        return [f"{at}.kind' must be one of {', '.join(VERSION_POLICIES)}, got {policy.kind!r}"]
    problems = []
    if policy.kind == "latest" and (not _is_int(policy.num_versions) or policy.num_versions < 1):
        problems.append(f"{at}.num_versions' must be an integer >= 1, got {policy.num_versions!r}")
    versions = policy.versions
    if policy.kind == "specific":
        if (
            not isinstance(versions, tuple) or not versions
            or any(not _is_int(v) or v < 1 for v in versions)
        ):
            problems.append(
                f"{at}.versions' must be a non-empty tuple of version numbers >= 1, got {versions!r}"
            )
        elif len(set(versions)) != len(versions):
            problems.append(f"{at}.versions' repeats a version, got {versions!r}")
    elif versions:
        problems.append(
            f"{at}.versions' is only allowed with kind 'specific', got kind {policy.kind!r} "
            f"and versions {versions!r}"
        )
    return problems


def _check_build(where: str, build: BuildSpec, outputs: Sequence[TensorSpec]) -> list[str]:
    problems = []
    tol = build.tolerance
    for name in ("atol", "rtol"):
        value = getattr(tol, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            problems.append(
                f"{where}: field 'build.tolerance.{name}' must be a finite number >= 0, got {value!r}"
            )
    if not _is_int(build.opset) or not 13 <= build.opset <= 21:
        problems.append(f"{where}: field 'build.opset' must be in 13..21, got {build.opset!r}")
    if build.min_accuracy is not None and not 0 <= build.min_accuracy <= 1:
        problems.append(
            f"{where}: field 'build.min_accuracy' must be in 0..1, got {build.min_accuracy!r}"
        )
    problems += _check_variants(where, build.variants)
    problems += _check_output_checks(where, build.outputs, outputs)
    if build.int8 is not None:
        problems += _check_int8_options(where, build.int8)
    source = build.source
    if not dataclasses.is_dataclass(source) or isinstance(source, type):
        problems.append(
            f"{where}: field 'build.source' must be a source dataclass instance "
            f"({', '.join(t.__name__ for t in GENERIC_SOURCES)}, or a model folder's own), "
            f"got {type(source).__name__}"
        )
        return problems
    problems += _check_ranges(where, "build.source", source)
    own_rules = getattr(source, "problems", None)
    if callable(own_rules):
        problems += [f"{where}: {problem}" for problem in own_rules()]
    if isinstance(source, CheckpointSource) and not re.match(
        r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", str(source.factory)
    ):
        problems.append(
            f"{where}: field 'build.source.factory' must look like 'package.module:function', "
            f"got {source.factory!r}"
        )
    for name in ("checkpoint", "path", "held_out"):
        if hasattr(source, name):
            path = resolve_path(getattr(source, name))
            if not path.is_file():
                problems.append(
                    f"{where}: field 'build.source.{name}' names {str(path)!r}, which does not exist"
                )
    return problems


def resolve_path(path: str) -> Path:
    """A path from a spec: absolute as given, relative to the project root otherwise."""
    from kiln.paths import ROOT

    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else ROOT / candidate


def _check_ranges(where: str, prefix: str, settings: Any) -> list[str]:
    """Checks every dataclass field of `settings` that declares a range in its metadata."""
    problems = []
    for spec_field in fields(settings):
        bounds = spec_field.metadata.get("range")
        if bounds is None:
            continue
        low, high = bounds
        value = getattr(settings, spec_field.name)
        integer = spec_field.metadata["integer"]
        kind = "an integer" if integer else "a number"
        ok = _is_int(value) if integer else isinstance(value, (int, float)) and not isinstance(
            value, bool
        )
        if not ok or not low <= value <= high:
            problems.append(
                f"{where}: field '{prefix}.{spec_field.name}' must be {kind} in "
                f"{low:g}..{high:g}, got {value!r}"
            )
    return problems


def _check_int8_options(where: str, options: Int8Options) -> list[str]:
    problems = []
    at = f"{where}: field 'build.int8"
    if options.method is not None and options.method not in INT8_METHODS:
        problems.append(f"{at}.method' must be one of {', '.join(INT8_METHODS)}, got {options.method!r}")
    for name in ("activation_type", "weight_type"):
        value = getattr(options, name)
        if value is not None and value not in INT8_TYPES:
            problems.append(f"{at}.{name}' must be one of {', '.join(INT8_TYPES)}, got {value!r}")
    for name in ("per_channel", "reduce_range"):
        value = getattr(options, name)
        if value is not None and not isinstance(value, bool):
            problems.append(f"{at}.{name}' must be true or false, got {value!r}")
    for name in ("op_types_to_quantize", "exclude_op_types", "nodes_to_exclude"):
        value = getattr(options, name)
        if value is not None and (
            isinstance(value, str) or not all(isinstance(v, str) and v for v in value)
        ):
            problems.append(f"{at}.{name}' must be a tuple of names, got {value!r}")
    if options.batch_size is not None and not (_is_int(options.batch_size) and options.batch_size >= 1):
        problems.append(f"{at}.batch_size' must be an integer >= 1, got {options.batch_size!r}")
    return problems


def _check_output_checks(
    where: str, checks: Sequence[OutputCheck], outputs: Sequence[TensorSpec]
) -> list[str]:
    problems = []
    dims = {t.name: t.dims for t in outputs}
    for i, check in enumerate(checks):
        at = f"{where}: field 'build.outputs[{i}]"
        if check.name not in dims:
            problems.append(f"{at}.name' must name an output ({', '.join(dims)}), got {check.name!r}")
            continue
        if check.kind not in OUTPUT_KINDS:
            problems.append(f"{at}.kind' must be one of {', '.join(OUTPUT_KINDS)}, got {check.kind!r}")
        if check.max_drop is not None and not (
            isinstance(check.max_drop, (int, float)) and 0 <= check.max_drop <= 1
        ):
            problems.append(f"{at}.max_drop' must be a number in 0..1 or None, got {check.max_drop!r}")
        if check.metric is not None and not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", str(check.metric)):
            problems.append(
                f"{at}.metric' must look like 'package.module:function', got {check.metric!r}"
            )
        rank = len(dims[check.name])
        axis = check.column_axis
        if axis is not None and not (_is_int(axis) and 0 <= axis < rank):
            problems.append(
                f"{at}.column_axis' must be a per-item axis of {check.name!r} (0..{rank - 1}), "
                f"got {check.column_axis!r}"
            )
        if check.kind == "detections" and (rank != 2 or min(d for d in dims[check.name]) == 0):
            problems.append(
                f"{at}.kind' detections needs a 2-D output [channels, candidates] or [candidates, "
                f"channels] (4 box values then class scores), {check.name!r} has dims {dims[check.name]}"
            )
    return problems


def _check_variants(where: str, variants: Sequence[Variant]) -> list[str]:
    problems = []
    if not variants or variants[0].precision != "fp32":
        first = variants[0].precision if variants else None
        problems.append(
            f"{where}: field 'build.variants' must start with the fp32 variant (the reference), "
            f"got {first!r} first"
        )
    seen: set[str] = set()
    for i, variant in enumerate(variants):
        at = f"{where}: field 'build.variants[{i}]"
        if variant.precision not in PRECISIONS:
            problems.append(
                f"{at}.precision' must be one of {', '.join(PRECISIONS)}, got {variant.precision!r}"
            )
        elif variant.precision in seen:
            problems.append(f"{at}.precision' repeats {variant.precision!r}")
        seen.add(variant.precision)
        drop = variant.max_metric_drop
        if not isinstance(drop, (int, float)) or not 0 <= drop <= 1:
            problems.append(f"{at}.max_metric_drop' must be a number in 0..1, got {drop!r}")
        if variant.optional and variant.precision == "fp32":
            problems.append(f"{at}.optional' cannot be true for fp32, the reference every variant needs")
    return problems


BACKEND_PARAMS: Mapping[str, str] = MappingProxyType({
    "kiln_onnx": "kiln.serving.onnx:ONNX_PARAMS",
    "kiln_image": "kiln.serving.image:IMAGE_PARAMS",
    "kiln_text": "kiln.serving.text:TEXT_PARAMS",
    "kiln_tabular": "kiln.serving.tabular:TABULAR_PARAMS",
    "kiln_classify": "kiln.serving.classify:CLASSIFY_PARAMS",
    "kiln_detect": "kiln.serving.detect:DETECT_PARAMS",
    "kiln_pool": "kiln.serving.pool:POOL_PARAMS",
    "kiln_threshold": "kiln.serving.threshold:THRESHOLD_PARAMS",
    "kiln_fused": "kiln.serving.fused:FUSED_PARAMS",
    "kiln_generate": "kiln.serving.generate:GENERATE_PARAMS",
})
"""Each kiln backend -> "module:NAME" of its declared `parameters` schema (a tuple of Param)."""


def backend_params(backend: str):  # -> tuple[Param, ...] | None
    """The declared `parameters` keys of a kiln backend, or None for a backend without a schema."""
    import importlib

    where = BACKEND_PARAMS.get(backend)
    if where is None:
        return None
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


BACKEND_PARAM_RULES: Mapping[str, str] = MappingProxyType({
    "kiln_text": "kiln.serving.text:check_text_params",
})
"""Each kiln backend with rules across its `parameters` keys (which no one key's kind can check)
-> "module:function", called as function(model, values) with the values `check_params` parsed;
it raises ParamError or the backend's load error, and the backend's load runs the same function,
so `kiln generate` and the load fail with one message."""


def backend_param_rules(backend: str):  # -> Callable[[str, Mapping[str, Any]], None] | None
    """The function checking rules across a kiln backend's parameters, or None if it has none."""
    import importlib

    where = BACKEND_PARAM_RULES.get(backend)
    if where is None:
        return None
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


def without_dynamic_batching(spec: ModelSpec) -> ModelSpec:
    """`spec` with no dynamic batcher, and so no input asking for ragged batches (`_check_ragged`
    refuses the flag without a batcher): each request runs alone."""
    inputs = tuple(dataclasses.replace(t, allow_ragged_batch=False) for t in spec.inputs)
    return dataclasses.replace(spec, dynamic_batching=None, inputs=inputs)


def _served_tensors(specs: Sequence[ModelSpec | EnsembleSpec]) -> dict[str, ModelSpec | EnsembleSpec]:
    return {spec.name: spec for spec in served_specs(specs)}


def _dims_agree(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


_Available: TypeAlias = dict[str, tuple[str, tuple[int, ...], str]]
"""Ensemble tensor name -> (dtype, dims, who made it)."""


def _check_ensemble(
    spec: EnsembleSpec,
    served: Mapping[str, ModelSpec | EnsembleSpec],
    backends: tuple[str, ...] | None = None,
) -> list[str]:
    """The ensemble's own fields, then its wiring: every step model exists, every map names a real
    tensor, every tensor consumed is produced first with the same dtype and compatible dims."""
    where = f"ensemble {spec.name!r}"
    problems = _check_name(where, spec.name)
    problems += _check_io(where, spec.inputs, spec.outputs)
    problems += [
        f"{where}: field 'inputs[{i}].allow_ragged_batch' (input {t.name!r}) is only allowed on "
        "a model's inputs, not a pipeline's (an ensemble has no batcher of its own, and kiln_fused "
        "does not take ragged batches): set it on the input of the step model whose batcher "
        "should mix shapes, e.g. text_encoder's"
        for i, t in enumerate(spec.inputs) if getattr(t, "allow_ragged_batch", False)
    ]
    mbs, found = _check_max_batch_size(where, spec.max_batch_size)
    problems += found
    if not spec.steps:
        problems.append(f"{where}: field 'steps' must list at least one step, got none")
    available: _Available = {
        t.name: (t.dtype, tuple(t.dims), "ensemble input") for t in spec.inputs
    }
    consumed: set[str] = set()
    for i, step in enumerate(spec.steps):
        at = f"{where}: field 'steps[{i}]"
        model = served.get(step.model)
        if model is None or step.model == spec.name:
            problems.append(
                f"{at}.model' must name another served model; {step.model!r} is not one "
                f"(known: {', '.join(sorted(n for n in served if n != spec.name))})"
            )
            continue
        step_mbs = model.max_batch_size
        if mbs > 0 and (step_mbs == 0 or step_mbs < mbs):
            problems.append(
                f"{at}.model' {step.model!r} has max_batch_size {step_mbs}, below the ensemble's "
                f"{mbs} (each step must take the ensemble's largest batch)"
            )
        problems += _check_step_inputs(at, step, model, available, consumed)
        problems += _check_step_outputs(at, step, model, available)
    problems += _check_ensemble_outputs(where, spec.outputs, available)
    unused = [t.name for t in spec.inputs if t.name not in consumed]
    if unused:
        problems.append(f"{where}: input(s) {unused} feed no step")
    problems += _check_form(where, spec, served, backends)
    return problems


def _check_form(
    where: str,
    spec: EnsembleSpec,
    served: Mapping[str, ModelSpec | EnsembleSpec],
    backends: tuple[str, ...] | None,
) -> list[str]:
    """The pipeline's form; for "fused": a batch dim, the fused model's batcher and instances,
    the kiln_fused backend, and steps that are kiln backends the fused model can load."""
    if spec.form not in PIPELINE_FORMS:
        return [f"{where}: field 'form' must be one of {', '.join(PIPELINE_FORMS)}, got {spec.form!r}"]
    if spec.form != "fused":
        return []
    problems = []
    fused = spec.fused
    if not isinstance(fused, Fused):
        return [f"{where}: field 'fused' must be a Fused, got {type(fused).__name__}"]
    if not _is_int(spec.max_batch_size) or spec.max_batch_size < 1:
        problems.append(
            f"{where}: field 'max_batch_size' must be >= 1 for form 'fused' (its one dynamic "
            f"batcher batches requests), got {spec.max_batch_size!r}"
        )
    else:
        problems += [
            p.replace("field 'dynamic_batching", "field 'fused.dynamic_batching")
            for p in _check_dynamic_batching(where, fused.dynamic_batching, spec.max_batch_size)
        ]
    problems += [
        p.replace("field 'instance_groups", "field 'fused.instance_groups")
        for p in _check_instance_groups(where, fused.instance_groups)
    ]
    if not isinstance(fused.step_metrics, bool):
        problems.append(
            f"{where}: field 'fused.step_metrics' must be true or false, got {fused.step_metrics!r}"
        )
    if backends is not None and FUSED_BACKEND not in backends:
        problems.append(
            f"{where}: field 'form' 'fused' needs the backend {FUSED_BACKEND!r}, which is not among "
            f"the backends ({', '.join(backends) or 'none found'})"
        )
    fusable = sorted(b for b in BACKEND_PARAMS if b != FUSED_BACKEND and b not in DECOUPLED_BACKENDS)
    for i, step in enumerate(spec.steps):
        model = served.get(step.model)
        if model is None:
            continue  # reported by the wiring checks
        backend = getattr(model, "backend", None)
        if isinstance(model, EnsembleSpec) or backend not in fusable:
            kind = "a pipeline" if isinstance(model, EnsembleSpec) else f"backend {backend!r}"
            problems.append(
                f"{where}: field 'steps[{i}].model' {step.model!r} is {kind}; form 'fused' runs "
                f"only steps of the kiln backends {', '.join(fusable)}"
            )
    return problems


def _check_step_inputs(
    at: str,
    step: EnsembleStep,
    model: ModelSpec | EnsembleSpec,
    available: _Available,
    consumed: set[str],
) -> list[str]:
    """Each step input is fed from a tensor already available that matches it; adds every
    tensor the step reads to `consumed`."""
    problems = []
    model_inputs = {t.name: t for t in model.inputs}
    for key, value in step.inputs.items():
        target = model_inputs.get(key)
        if target is None:
            problems.append(
                f"{at}.inputs' maps {key!r}, which is not an input of {step.model!r} "
                f"(its inputs: {', '.join(model_inputs)})"
            )
            continue
        consumed.add(value)
        source = available.get(value)
        if source is None:
            problems.append(
                f"{at}.inputs' feeds {step.model!r} input {key!r} from {value!r}, which is "
                "neither an ensemble input nor an earlier step's output"
            )
            continue
        dtype, dims, made_by = source
        if dtype != target.dtype or not _dims_agree(dims, tuple(target.dims)):
            problems.append(
                f"{at}.inputs' feeds {step.model!r} input {key!r} ({target.dtype} "
                f"{list(target.dims)}) from {value!r} ({made_by}: {dtype} {list(dims)})"
            )
    unmapped = [n for n, t in model_inputs.items() if n not in step.inputs and not t.optional]
    if unmapped:
        problems.append(f"{at}.inputs' leaves {step.model!r} input(s) {unmapped} unfed")
    return problems


def _check_step_outputs(
    at: str, step: EnsembleStep, model: ModelSpec | EnsembleSpec, available: _Available
) -> list[str]:
    """Each step output names a real output and a tensor nothing else produces; adds it to
    `available` for the steps after."""
    problems = []
    model_outputs = {t.name: t for t in model.outputs}
    for key, value in step.outputs.items():
        produced = model_outputs.get(key)
        if produced is None:
            problems.append(
                f"{at}.outputs' maps {key!r}, which is not an output of {step.model!r} "
                f"(its outputs: {', '.join(model_outputs)})"
            )
            continue
        if value in available:
            problems.append(
                f"{at}.outputs' names {value!r}, already the {available[value][2]}; "
                "each ensemble tensor has one producer"
            )
            continue
        available[value] = (produced.dtype, tuple(produced.dims), f"output {key!r} of {step.model!r}")
    return problems


def _check_ensemble_outputs(
    where: str, outputs: Sequence[TensorSpec], available: _Available
) -> list[str]:
    problems = []
    for i, tensor in enumerate(outputs):
        source = available.get(tensor.name)
        if source is None or source[2] == "ensemble input":
            problems.append(f"{where}: field 'outputs[{i}]' {tensor.name!r} is produced by no step")
        elif source[0] != tensor.dtype or not _dims_agree(source[1], tuple(tensor.dims)):
            problems.append(
                f"{where}: field 'outputs[{i}]' {tensor.name!r} is {tensor.dtype} {list(tensor.dims)}, "
                f"but {source[2]} is {source[0]} {list(source[1])}"
            )
    return problems


def _check_files(where: str, files: Mapping[str, str]) -> list[str]:
    problems = []
    for name, text in files.items():
        if not isinstance(name, str) or not _NAME.match(name) or name in ("config.pbtxt",) or name.isdigit():
            problems.append(
                f"{where}: field 'files' key must be a file name (one path segment, not config.pbtxt "
                f"or a version number), got {name!r}"
            )
        if not isinstance(text, str):
            problems.append(f"{where}: field 'files[{name!r}]' must be text, got {type(text).__name__}")
    return problems


def validate(
    specs: Sequence[ModelSpec | EnsembleSpec], backends: Iterable[str] | None = None
) -> None:
    """Checks every spec; raises one SpecError listing all problems.

    Args:
        specs: The models and ensembles of one repository.
        backends: Backend names a spec may use; None skips that check.
    """
    backends = tuple(backends) if backends is not None else None
    problems: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            problems.append(f"model {spec.name!r}: field 'name' repeats another model's name")
        seen.add(spec.name)
        if isinstance(spec, EnsembleSpec):
            continue
        problems += _check_model(spec, backends)
    served = _served_tensors(specs)
    origins: dict[str, set[str]] = {}
    for spec in specs:
        for variant in served_specs([spec]):
            origins.setdefault(variant.name, set()).add(spec.name)
    for name, makers in origins.items():
        if len(makers) > 1:
            problems.append(
                f"model {name!r}: served by more than one spec ({', '.join(sorted(makers))}); "
                "a variant's served name must not repeat another model's name"
            )
    for spec in specs:
        if isinstance(spec, EnsembleSpec):
            problems += _check_ensemble(spec, served, backends)
    if problems:
        raise SpecError(problems)
