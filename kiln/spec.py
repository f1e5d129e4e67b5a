"""The typed spec: every served model and how to build it, declared once.

Specs are Python (see `build/specs/`), so tensor names come from `kiln.tensors` and a type checker
reads them. `validate()` walks a list of specs and raises one `SpecError` listing every problem,
each naming the model, the field, what is allowed and the value given, before anything is built
or written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TypeAlias

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
    """

    name: str
    dtype: str
    dims: tuple[int, ...]


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
    """

    name: str = "warmup"
    batch_size: int = 1
    data: str = "zero"
    count: int = 1


@dataclass(frozen=True)
class Tolerance:
    """How close an exported model's outputs must be to the reference's: |a-b| <= atol + rtol*|b|."""

    atol: float = 1e-4
    rtol: float = 1e-3


@dataclass(frozen=True)
class DigitsCNNSource:
    """A small CNN trained at build time on scikit-learn's handwritten digits (8x8, 10 classes).

    Attributes:
        seed: Seeds the train/test split, weight init and shuffling.
        test_fraction: Share of the 1,797 images held out for evaluation.
        epochs: Training epochs.
        batch_size: Training batch size.
        learning_rate: Adam's learning rate.
    """

    seed: int = 0
    test_fraction: float = 0.2
    epochs: int = 30
    batch_size: int = 32
    learning_rate: float = 2e-3


SourceSpec: TypeAlias = DigitsCNNSource  # grows into a union as sources are added
"""Every kind of model source the build pipeline knows."""


@dataclass(frozen=True)
class BuildSpec:
    """How the build pipeline produces a model's served artifact.

    Attributes:
        source: Where the PyTorch model comes from.
        opset: ONNX opset of the export.
        tolerance: Export check: ONNX Runtime against PyTorch on held-out inputs.
        min_accuracy: The build fails when the model's held-out accuracy is below this.
    """

    source: SourceSpec
    opset: int = 17
    tolerance: Tolerance = Tolerance()
    min_accuracy: float | None = None


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


def _check_model(spec: ModelSpec, backends: Iterable[str] | None) -> list[str]:
    # Imported here: the parameter schemas live with the backends' logic, kept out of import time.
    from kiln.serving.params import ParamError, check_params

    where = f"model {spec.name!r}"
    problems: list[str] = []
    if not isinstance(spec.name, str) or not _NAME.match(spec.name):
        problems.append(
            f"{where}: field 'name' must be one path segment matching {_NAME.pattern}, "
            f"got {spec.name!r}"
        )
    known = tuple(backends) if backends is not None else None
    if known is not None and spec.backend not in known:
        problems.append(
            f"{where}: field 'backend' must be one of {', '.join(known) or '(none found)'}, "
            f"got {spec.backend!r}"
        )
    problems += _check_tensors(where, "inputs", spec.inputs)
    problems += _check_tensors(where, "outputs", spec.outputs)
    overlap = {t.name for t in spec.inputs} & {t.name for t in spec.outputs}
    if overlap:
        problems.append(f"{where}: names {sorted(overlap)} are both inputs and outputs")

    mbs = spec.max_batch_size
    if not _is_int(mbs) or mbs < 0:
        problems.append(f"{where}: field 'max_batch_size' must be an integer >= 0, got {mbs!r}")
        mbs = 0
    batching = spec.dynamic_batching
    if batching is not None:
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

    if not spec.instance_groups:
        problems.append(f"{where}: field 'instance_groups' must list at least one group, got none")
    for i, group in enumerate(spec.instance_groups):
        at = f"{where}: field 'instance_groups[{i}]"
        if group.kind not in INSTANCE_KINDS:
            problems.append(
                f"{at}.kind' must be one of {', '.join(INSTANCE_KINDS)}, got {group.kind!r}"
            )
        if not _is_int(group.count) or group.count < 1:
            problems.append(f"{at}.count' must be an integer >= 1, got {group.count!r}")
        if group.gpus and group.kind != "GPU":
            problems.append(f"{at}.gpus' is only allowed with kind 'GPU', got kind {group.kind!r}")

    for i, warm in enumerate(spec.warmup):
        at = f"{where}: field 'warmup[{i}]"
        limit = max(mbs, 1)
        if not _is_int(warm.batch_size) or not 1 <= warm.batch_size <= limit:
            problems.append(f"{at}.batch_size' must be in 1..{limit}, got {warm.batch_size!r}")
        if warm.data not in WARMUP_DATA:
            problems.append(f"{at}.data' must be one of {', '.join(WARMUP_DATA)}, got {warm.data!r}")
        if not _is_int(warm.count) or warm.count < 1:
            problems.append(f"{at}.count' must be an integer >= 1, got {warm.count!r}")
        variable = [t.name for t in spec.inputs if -1 in tuple(t.dims or ())]
        if variable:
            problems.append(
                f"{at}' needs fixed input dims; input(s) {', '.join(variable)} have a -1 dim"
            )

    bad_types = [k for k, v in spec.parameters.items() if not isinstance(v, str)]
    if bad_types:
        problems.append(f"{where}: field 'parameters' values must be strings; not for {bad_types}")
    else:
        schema = backend_params(spec.backend)
        if schema is not None:
            try:
                check_params(spec.name, dict(spec.parameters), schema)
            except ParamError as error:
                problems.append(f"{where}: field 'parameters': {error}")

    if spec.build is not None:
        problems += _check_build(where, spec.build)
    return problems


def _check_build(where: str, build: BuildSpec) -> list[str]:
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
    source = build.source
    if isinstance(source, DigitsCNNSource):
        if not 0 < source.test_fraction < 1:
            problems.append(
                f"{where}: field 'build.source.test_fraction' must be in (0, 1), "
                f"got {source.test_fraction!r}"
            )
        for name in ("epochs", "batch_size"):
            value = getattr(source, name)
            if not _is_int(value) or value < 1:
                problems.append(
                    f"{where}: field 'build.source.{name}' must be an integer >= 1, got {value!r}"
                )
        if not source.learning_rate > 0:
            problems.append(
                f"{where}: field 'build.source.learning_rate' must be > 0, "
                f"got {source.learning_rate!r}"
            )
    else:
        problems.append(
            f"{where}: field 'build.source' must be one of DigitsCNNSource, "
            f"got {type(source).__name__}"
        )
    return problems


def backend_params(backend: str):  # -> tuple[Param, ...] | None
    """The declared `parameters` keys of a kiln backend, or None for a backend without a schema."""
    if backend == "kiln_onnx":
        from kiln.serving.onnx import ONNX_PARAMS

        return ONNX_PARAMS
    return None


def validate(specs: Sequence[ModelSpec], backends: Iterable[str] | None = None) -> None:
    """Checks every spec; raises one SpecError listing all problems.

    Args:
        specs: The models of one repository.
        backends: Backend names a spec may use; None skips that check.
    """
    backends = tuple(backends) if backends is not None else None
    problems: list[str] = []
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            problems.append(f"model {spec.name!r}: field 'name' repeats another model's name")
        seen.add(spec.name)
        problems += _check_model(spec, backends)
    if problems:
        raise SpecError(problems)
