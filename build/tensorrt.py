"""TensorRT stage: ONNX artifacts -> TensorRT plans for the GPU the build runs on, checked.

Where it runs: a Linux machine with an NVIDIA GPU and TensorRT >= 10, installed by the `gpu` extra
(whose TensorRT wheels fetch their libraries from NVIDIA's package index) or present in the NGC
container. None of kiln's own machines has TensorRT, so this stage was NOT run there: on them
`compile_stage` reports in one line why it skipped and the repository serves the ONNX artifacts;
the pure helpers (profiles, build recipes, engine records) are unit-tested everywhere.

What it does, per model and precision:

    recipe     `engine_recipe`: which ONNX artifact a precision is built from, with which builder
               flags. TensorRT 10 ("weak typing"): fp16 = the fp32 ONNX with BuilderFlag.FP16;
               int8 = the int8 QDQ ONNX with BuilderFlag.INT8 (explicit quantization) and FP16 as
               the fallback precision of the layers outside Q/DQ pairs. TensorRT 11 removed those
               flags and always builds strongly typed networks: the precision comes from the ONNX
               itself (fp16 = the fp16 ONNX, int8 = the QDQ ONNX).
    profile    `optimization_profile`: (min, opt, max) shapes per input from the spec: batch 1 /
               the largest preferred batch size (or max/2) / max_batch_size; a variable (-1) dim
               takes its range from `dim_ranges`.
    build      `build_engine`: OnnxParser -> builder config (flags, workspace, profile, timing
               cache loaded from and saved back to a file) -> `build_serialized_network` ->
               the plan written atomically, with an `EngineRecord` JSON sidecar naming the
               TensorRT version and the GPU (name, compute capability) it was built for. A plan
               runs only with that TensorRT version on that kind of GPU.
    check      `check_engine`: the plan (TensorRT runtime, torch CUDA tensors as buffers) against
               ONNX Runtime running the ONNX it was built from, on held-out inputs, within a
               tolerance per precision (`kiln.build.check.assert_close`).

Only numpy, the standard library and kiln's core modules are imported at module level; tensorrt,
torch and onnxruntime are imported when an engine is built or run.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from kiln.build.check import BuildError, Comparison, assert_close, onnx_runner, run_batched
from kiln.build.publish import write_bytes_atomic, write_json_atomic
from kiln.spec import ModelSpec, TensorSpec, Tolerance

Progress = Callable[[str], None]
Shape = tuple[int, ...]
ProfileShapes = tuple[Shape, Shape, Shape]
"""(min, opt, max) shape of one input, batch dim included when the model has one."""
DimRange = tuple[int, int, int]
"""(min, opt, max) size of a variable (-1) dim."""

STAGE = "tensorrt"
TENSORRT_MODULE = "tensorrt"
MIN_TENSORRT_MAJOR = 10
"""TensorRT 10 made explicit batch the only mode and introduced the name-based I/O API used here."""
STRONGLY_TYPED_ONLY_MAJOR = 11
"""From TensorRT 11 on, networks are always strongly typed and the precision flags are gone."""
ENGINE_PRECISIONS = ("fp16", "int8")
"""Engines `compile_stage` builds by default."""
RECIPE_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_WORKSPACE_BYTES = 1 << 30
"""Builder workspace pool limit (1 GiB): the scratch memory a layer's tactic may use."""
PLAN_SUFFIX = ".plan"
RECORD_SUFFIX = ".json"
TIMING_CACHE_NAME = "timing.cache"
"""Default timing-cache file in the model's work folder."""
RECORD_FORMAT = 1
"""Bumped when the record's JSON layout changes."""
BYTES_PER_MIB = 1 << 20
ENGINE_TOLERANCES: Mapping[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-3, rtol=1e-3),
    "fp16": Tolerance(atol=2e-2, rtol=2e-2),
    "int8": Tolerance(atol=1e-1, rtol=5e-2),
}
"""An engine against ONNX Runtime running the ONNX it was built from. fp32 allows for TF32, which
TensorRT enables by default; fp16 for half-precision accumulation order; int8 for a different
rounding of the same Q/DQ scales. Starting points, not yet measured on a TensorRT machine:
override them through `compile_stage(tolerances=...)`."""
INSTALL_HINT = (
    "pip install 'kiln[gpu]' on a machine that reaches NVIDIA's package index, or use the NGC "
    "container"
)
NOT_INSTALLED = f"TensorRT is not installed ({INSTALL_HINT})"
NO_TORCH = (
    "PyTorch is not installed (pip install 'kiln[build]'); the TensorRT stage runs engines with "
    "torch CUDA tensors"
)
NO_GPU = "no CUDA GPU is visible (torch.cuda.is_available() is False)"
SKIP_LINE = "[{model}] tensorrt: skipped: {reason}; the repository serves the ONNX artifacts"

_log = logging.getLogger(__name__)


class EngineError(BuildError):
    """The TensorRT stage failed: bad profile settings, a parser or builder error, or a plan that
    cannot run; the message names the model."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(model, STAGE, message)


def _load_tensorrt() -> ModuleType:
    """Imports the real `tensorrt` package (a function, so tests can replace it)."""
    return importlib.import_module(TENSORRT_MODULE)


def _major(version: str) -> int:
    return int(version.split(".", 1)[0])


def availability() -> tuple[bool, str]:
    """Whether engines can be built here, and why not.

    Returns:
        (True, "TensorRT <version> on <GPU name>") or (False, the reason in one line): TensorRT
        not installed or not loadable, older than TensorRT 10, PyTorch missing, or no CUDA GPU.
    """
    try:
        trt = _load_tensorrt()
    except ModuleNotFoundError as error:
        if error.name == TENSORRT_MODULE:
            return False, NOT_INSTALLED
        return False, f"TensorRT cannot be imported ({type(error).__name__}: {error}; {INSTALL_HINT})"
    except Exception as error:  # a broken install fails in many ways (OSError for a missing .so)
        return False, f"TensorRT cannot be imported ({type(error).__name__}: {error}; {INSTALL_HINT})"
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        major = _major(version)
    except ValueError:
        return False, f"TensorRT reports version {version!r}, which kiln cannot read"
    if major < MIN_TENSORRT_MAJOR:
        return False, f"TensorRT {version} is installed; kiln needs TensorRT >= {MIN_TENSORRT_MAJOR}"
    try:
        import torch
    except ImportError:
        return False, NO_TORCH
    if not torch.cuda.is_available():
        return False, NO_GPU
    return True, f"TensorRT {version} on {torch.cuda.get_device_name()}"


# --- optimization profiles -------------------------------------------------------------------


def default_opt_batch(spec: ModelSpec) -> int:
    """The batch size TensorRT tunes for: the dynamic batcher's largest preferred batch size (the
    batch it forms under load), else half of max_batch_size (at least 1); 0 without a batch dim."""
    if spec.max_batch_size <= 0:
        return 0
    batching = spec.dynamic_batching
    if batching is not None and batching.preferred_batch_sizes:
        return max(batching.preferred_batch_sizes)
    return max(1, spec.max_batch_size // 2)


def uniform_dim_ranges(spec: ModelSpec, dim_range: DimRange) -> dict[str, DimRange]:
    """The same (min, opt, max) range for every input that has a variable (-1) dim.

    For a text model whose inputs are [batch, sequence]:
    `uniform_dim_ranges(spec, (1, 64, source.max_length))`.
    """
    return {t.name: tuple(dim_range) for t in spec.inputs if -1 in t.dims}  # type: ignore[misc]


def _valid_range(value: Any) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1] <= value[2]
    )


def optimization_profile(
    spec: ModelSpec,
    opt_batch: int | None = None,
    dim_ranges: Mapping[str, DimRange] | None = None,
) -> dict[str, ProfileShapes]:
    """The optimization profile of `spec`: (min, opt, max) shapes per input.

    With max_batch_size > 0 the leading dim runs 1 / `opt_batch` / max_batch_size; a model
    without a batch dim has its item shape only. A variable (-1) dim of an input takes
    `dim_ranges[input]` (applied to each of that input's -1 dims); fixed dims are the same in
    all three shapes.

    Args:
        spec: The model's inputs and max_batch_size.
        opt_batch: The batch size to tune for; `default_opt_batch(spec)` when None.
        dim_ranges: (min, opt, max) per input name, for the inputs with a -1 dim.

    Returns:
        Input name -> (min shape, opt shape, max shape), in the order of `spec.inputs`.

    Raises:
        EngineError: `opt_batch` outside 1..max_batch_size, a -1 dim without a range, a range
            that is not 1 <= min <= opt <= max, or a range for an input that is unknown or has
            no -1 dim.
    """
    ranges = dict(dim_ranges or {})
    problems: list[str] = []
    opt = _opt_batch(spec, opt_batch, problems)
    batch = (1, opt, spec.max_batch_size) if spec.max_batch_size > 0 else None
    variable = {t.name for t in spec.inputs if -1 in t.dims}
    for name in ranges:
        if name not in {t.name for t in spec.inputs}:
            problems.append(
                f"dim_ranges names {name!r}, which is not an input "
                f"(inputs: {', '.join(t.name for t in spec.inputs)})"
            )
        elif name not in variable:
            problems.append(f"dim_ranges gives a range for input {name!r}, which has no -1 dim")
    profile: dict[str, ProfileShapes] = {}
    for tensor in spec.inputs:
        shapes = _input_shapes(tensor, ranges.get(tensor.name), tensor.name in variable, batch, problems)
        if shapes is not None:
            profile[tensor.name] = shapes
    if problems:
        raise EngineError(spec.name, "bad optimization profile: " + "; ".join(problems))
    return profile


def _opt_batch(spec: ModelSpec, opt_batch: int | None, problems: list[str]) -> int:
    """The profile's opt batch: `opt_batch` or the default (max_batch_size after a problem, which
    goes to `problems`; 0 without a batch dim)."""
    if spec.max_batch_size <= 0:
        if opt_batch is not None:
            problems.append(f"opt_batch must be None for a model without a batch dim, got {opt_batch!r}")
        return 0
    opt = default_opt_batch(spec) if opt_batch is None else opt_batch
    if isinstance(opt, bool) or not isinstance(opt, int) or not 1 <= opt <= spec.max_batch_size:
        problems.append(
            f"opt_batch must be an integer in 1..{spec.max_batch_size} (max_batch_size), got {opt!r}"
        )
        return spec.max_batch_size
    return opt


def _input_shapes(
    tensor: TensorSpec,
    dim_range: Any,
    variable: bool,
    batch: DimRange | None,
    problems: list[str],
) -> ProfileShapes | None:
    """(min, opt, max) shape of one input: its -1 dims take `dim_range`, its batch dim `batch`
    (None without one); None, with the problem in `problems`, when its range is missing or bad."""
    if variable:
        if dim_range is None:
            problems.append(
                f"input {tensor.name!r} has a variable (-1) dim in dims {list(tensor.dims)}: "
                f"TensorRT needs its (min, opt, max) size; pass dim_ranges={{{tensor.name!r}: "
                "(min, opt, max)}"
            )
            return None
        if not _valid_range(dim_range):
            problems.append(
                f"dim_ranges[{tensor.name!r}] must be (min, opt, max) integers with "
                f"1 <= min <= opt <= max, got {dim_range!r}"
            )
            return None
    shapes = []
    for which in range(3):
        item = tuple(dim_range[which] if d == -1 else d for d in tensor.dims)
        if batch is not None:
            item = (batch[which], *item)
        shapes.append(item)
    return (shapes[0], shapes[1], shapes[2])


def describe_profile(profile: Mapping[str, ProfileShapes]) -> str:
    """One line: `name min [1, 1, 8, 8] opt [...] max [...]` per input."""
    return "; ".join(
        f"{name} min {list(low)} opt {list(opt)} max {list(high)}"
        for name, (low, opt, high) in profile.items()
    )


# --- build recipes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineRecipe:
    """How one precision's engine is built.

    Attributes:
        precision: "fp32", "fp16" or "int8": the engine's precision.
        onnx_variant: The ONNX artifact it is built from (a key of `compile_stage`'s
            `onnx_artifacts`): "fp32", "fp16" or "int8" (the QDQ model).
        builder_flags: Names of `tensorrt.BuilderFlag` members to set.
        strongly_typed: Build a strongly typed network (the ONNX's types are the precision).
    """

    precision: str
    onnx_variant: str
    builder_flags: tuple[str, ...]
    strongly_typed: bool

    def describe(self) -> str:
        """e.g. "from the int8 ONNX, flags INT8+FP16" or "from the fp16 ONNX, strongly typed"."""
        how = "strongly typed" if self.strongly_typed else (
            f"flags {'+'.join(self.builder_flags)}" if self.builder_flags else "no precision flags"
        )
        return f"from the {self.onnx_variant} ONNX, {how}"


def engine_recipe(precision: str, tensorrt_major: int, *, strongly_typed: bool = False) -> EngineRecipe:
    """The recipe of `precision` for a TensorRT major version (see the module docstring).

    Args:
        precision: "fp32", "fp16" or "int8".
        tensorrt_major: The installed TensorRT's major version (10, 11, ...).
        strongly_typed: On TensorRT 10, build strongly typed networks from the precision's own
            ONNX instead of setting precision flags (TensorRT 11 always does).

    Raises:
        ValueError: an unknown precision, or a TensorRT older than 10.
    """
    if precision not in RECIPE_PRECISIONS:
        raise ValueError(
            f"engine precision must be one of {', '.join(RECIPE_PRECISIONS)}, got {precision!r}"
        )
    if tensorrt_major < MIN_TENSORRT_MAJOR:
        raise ValueError(f"TensorRT {tensorrt_major} is older than {MIN_TENSORRT_MAJOR}")
    if strongly_typed or tensorrt_major >= STRONGLY_TYPED_ONLY_MAJOR:
        return EngineRecipe(precision, precision, (), True)
    flags = {"fp32": (), "fp16": ("FP16",), "int8": ("INT8", "FP16")}[precision]
    variant = "int8" if precision == "int8" else "fp32"
    return EngineRecipe(precision, variant, flags, False)


# --- engine records --------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineCheck:
    """How the engine's outputs compared with ONNX Runtime's on held-out inputs.

    Attributes:
        reference: The ONNX file ONNX Runtime ran.
        items: Held-out items compared.
        worst_output: Output tensor with the largest excess over the tolerance.
        max_abs: Largest absolute error over all outputs.
        max_rel: Largest relative error over all outputs.
        atol: Tolerance used.
        rtol: Tolerance used.
    """

    reference: str
    items: int
    worst_output: str
    max_abs: float
    max_rel: float
    atol: float
    rtol: float


@dataclass(frozen=True)
class EngineRecord:
    """A record of one plan: the TensorRT version and GPU it was built for, and how.

    A TensorRT plan runs only with the TensorRT version that built it, on GPUs of the compute
    capability it was built for; the record says which, so a deployment can tell a stale plan.

    Attributes:
        model: Model name.
        precision: "fp32", "fp16" or "int8".
        plan: The plan file.
        onnx: The ONNX file it was built from.
        tensorrt_version: `tensorrt.__version__` of the build.
        gpu_name: The GPU it was built on.
        compute_capability: That GPU's compute capability, e.g. "9.0".
        builder_flags: The BuilderFlag names set.
        strongly_typed: Whether the network was strongly typed.
        profile: Input name -> (min, opt, max) shape.
        workspace_bytes: The workspace pool limit.
        timing_cache: The timing-cache file used and updated, if any.
        build_seconds: Wall time of parse + build.
        built_at: UTC time, ISO 8601.
        plan_sha256: sha256 of the plan file.
        plan_size_bytes: Size of the plan file.
        check: The comparison with ONNX Runtime, once checked.
    """

    model: str
    precision: str
    plan: str
    onnx: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    builder_flags: tuple[str, ...]
    strongly_typed: bool
    profile: Mapping[str, ProfileShapes]
    workspace_bytes: int
    timing_cache: str | None
    build_seconds: float
    built_at: str
    plan_sha256: str
    plan_size_bytes: int
    check: EngineCheck | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON document."""
        return {
            "format": RECORD_FORMAT,
            "model": self.model,
            "precision": self.precision,
            "plan": self.plan,
            "onnx": self.onnx,
            "tensorrt_version": self.tensorrt_version,
            "gpu": {"name": self.gpu_name, "compute_capability": self.compute_capability},
            "builder_flags": list(self.builder_flags),
            "strongly_typed": self.strongly_typed,
            "profile": {
                name: {"min": list(low), "opt": list(opt), "max": list(high)}
                for name, (low, opt, high) in self.profile.items()
            },
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": self.timing_cache,
            "build_seconds": self.build_seconds,
            "built_at": self.built_at,
            "plan_sha256": self.plan_sha256,
            "plan_size_bytes": self.plan_size_bytes,
            "check": None if self.check is None else vars(self.check).copy(),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any], source: str = "the record") -> EngineRecord:
        """Reads `to_json`'s document back.

        Raises:
            ValueError: another format, or a field missing or of the wrong kind (naming
                `source`).
        """
        if document.get("format") != RECORD_FORMAT:
            raise ValueError(
                f"{source}: field 'format' must be {RECORD_FORMAT}, got {document.get('format')!r}"
            )
        try:
            check = document["check"]
            return cls(
                model=str(document["model"]),
                precision=str(document["precision"]),
                plan=str(document["plan"]),
                onnx=str(document["onnx"]),
                tensorrt_version=str(document["tensorrt_version"]),
                gpu_name=str(document["gpu"]["name"]),
                compute_capability=str(document["gpu"]["compute_capability"]),
                builder_flags=tuple(str(f) for f in document["builder_flags"]),
                strongly_typed=bool(document["strongly_typed"]),
                profile={
                    name: (tuple(s["min"]), tuple(s["opt"]), tuple(s["max"]))
                    for name, s in document["profile"].items()
                },
                workspace_bytes=int(document["workspace_bytes"]),
                timing_cache=document["timing_cache"],
                build_seconds=float(document["build_seconds"]),
                built_at=str(document["built_at"]),
                plan_sha256=str(document["plan_sha256"]),
                plan_size_bytes=int(document["plan_size_bytes"]),
                check=None if check is None else EngineCheck(**check),
            )
        except KeyError as error:
            raise ValueError(f"{source}: field {error.args[0]!r} is missing") from None
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{source}: malformed record: {error}") from None


def record_path(plan: Path) -> Path:
    """The JSON sidecar of a plan: `fp16.plan` -> `fp16.plan.json`."""
    plan = Path(plan)
    return plan.with_name(plan.name + RECORD_SUFFIX)


def write_record(record: EngineRecord) -> Path:
    """Writes the record beside its plan, atomically; returns the sidecar's path."""
    return write_json_atomic(record_path(Path(record.plan)), record.to_json())


def read_record(plan: Path) -> EngineRecord:
    """The record of `plan` from its sidecar.

    Raises:
        FileNotFoundError: no sidecar.
        ValueError: the sidecar is not a record of this format.
    """
    path = record_path(plan)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON: {error}") from None
    return EngineRecord.from_json(document, str(path))


# --- building --------------------------------------------------------------------------------


def _logger(trt: ModuleType) -> Any:
    """A TensorRT logger that keeps the errors (for the exception) and forwards warnings."""

    class _Collecting(trt.ILogger):  # type: ignore[name-defined, misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
                _log.error("TensorRT: %s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                _log.warning("TensorRT: %s", msg)

    return _Collecting()


def _parser_errors(parser: Any) -> list[str]:
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        text = error.desc() if callable(getattr(error, "desc", None)) else str(error)
        # node_name() and node_operator() exist from TensorRT 10 on.
        node = error.node_name() if callable(getattr(error, "node_name", None)) else ""
        operator = error.node_operator() if callable(getattr(error, "node_operator", None)) else ""
        if node:
            text += f" (node {node!r}" + (f", op {operator}" if operator else "") + ")"
        errors.append(text)
    return errors


def _gpu() -> tuple[str, str]:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def build_engine(
    onnx_path: Path,
    spec: ModelSpec,
    precision: str,
    dest: Path,
    *,
    profile: Mapping[str, ProfileShapes],
    timing_cache_path: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    strongly_typed: bool = False,
    progress: Progress | None = None,
) -> EngineRecord:
    """Parses `onnx_path`, builds the `precision` engine, writes the plan and its record.

    Calls (TensorRT 10/11 Python API): `Builder(logger)`, `create_network(flags)` (0, or
    STRONGLY_TYPED on TensorRT 10 when asked; explicit batch is the only mode since 10),
    `OnnxParser(network, logger).parse_from_file`, `create_builder_config`, `set_flag` per the
    recipe, `set_memory_pool_limit(MemoryPoolType.WORKSPACE, ...)`,
    `create_optimization_profile` + `set_shape(name, min, opt, max)` +
    `add_optimization_profile`, `create_timing_cache(bytes)` + `set_timing_cache`,
    `build_serialized_network`, and `get_timing_cache().serialize()` after the build.

    Args:
        onnx_path: The ONNX file the recipe names for `precision`.
        spec: The model (its name is in every error).
        precision: "fp32", "fp16" or "int8".
        dest: The plan file (written atomically; its record goes to `record_path(dest)`).
        profile: From `optimization_profile`.
        timing_cache_path: Loaded when it exists, written back after the build; None for none.
        workspace_bytes: The builder's workspace pool limit.
        strongly_typed: See `engine_recipe`.
        progress: Receives a line when a timing cache is loaded or refused.

    Returns:
        The record (also written beside the plan), without a check yet.

    Raises:
        EngineError: TensorRT is unavailable, the parser or the builder failed, or the profile
            does not match the network's inputs.
    """
    available, reason = availability()
    if not available:
        raise EngineError(spec.name, f"cannot build a TensorRT engine here: {reason}")
    trt = _load_tensorrt()
    recipe = engine_recipe(precision, _major(trt.__version__), strongly_typed=strongly_typed)
    onnx_path, dest = Path(onnx_path), Path(dest)
    cache = None if timing_cache_path is None else Path(timing_cache_path)
    plan, build_seconds = _build_plan(trt, spec, recipe, onnx_path, profile, workspace_bytes, cache, progress)
    write_bytes_atomic(dest, plan)
    gpu_name, capability = _gpu()
    record = EngineRecord(
        model=spec.name, precision=precision, plan=str(dest), onnx=str(onnx_path),
        tensorrt_version=str(trt.__version__), gpu_name=gpu_name, compute_capability=capability,
        builder_flags=recipe.builder_flags, strongly_typed=recipe.strongly_typed, profile=dict(profile),
        workspace_bytes=workspace_bytes, timing_cache=None if cache is None else str(cache),
        build_seconds=build_seconds, built_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        plan_sha256=hashlib.sha256(plan).hexdigest(), plan_size_bytes=len(plan),
    )  # fmt: skip
    write_record(record)
    return record


def _build_plan(
    trt: ModuleType,
    spec: ModelSpec,
    recipe: EngineRecipe,
    onnx_path: Path,
    profile: Mapping[str, ProfileShapes],
    workspace_bytes: int,
    timing_cache_path: Path | None,
    progress: Progress | None,
) -> tuple[bytes, float]:
    """Parses, configures and builds: (the serialized plan, seconds of parse + build). The timing
    cache, when given, is loaded before the build and written back after it."""
    logger = _logger(trt)
    start = time.perf_counter()
    builder = trt.Builder(logger)
    network = _parse_network(trt, builder, logger, spec, recipe, onnx_path, profile)
    config = builder.create_builder_config()
    for flag in recipe.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimization = builder.create_optimization_profile()
    for name, (low, opt, high) in profile.items():
        optimization.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimization)
    if timing_cache_path is not None:
        _attach_timing_cache(config, timing_cache_path, progress or (lambda line: None))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(
            spec.name,
            f"TensorRT could not build the {recipe.precision} engine from {onnx_path}: "
            + ("; ".join(logger.errors) or "no error reported"),
        )
    plan = bytes(memoryview(serialized))
    build_seconds = time.perf_counter() - start
    if timing_cache_path is not None:
        write_bytes_atomic(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return plan, build_seconds


def _parse_network(
    trt: ModuleType,
    builder: Any,
    logger: Any,
    spec: ModelSpec,
    recipe: EngineRecipe,
    onnx_path: Path,
    profile: Mapping[str, ProfileShapes],
) -> Any:
    """The network parsed from `onnx_path` (strongly typed when the recipe says so on TensorRT 10);
    its inputs must be the profile's."""
    flags = 0
    if recipe.strongly_typed and _major(trt.__version__) < STRONGLY_TYPED_ONLY_MAJOR:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = _parser_errors(parser) or logger.errors or ["no error reported"]
        raise EngineError(
            spec.name,
            f"TensorRT's ONNX parser rejected {onnx_path} ({recipe.precision} engine): " + "; ".join(errors),
        )
    network_inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if set(network_inputs) != set(profile):
        raise EngineError(
            spec.name,
            f"the optimization profile covers inputs {sorted(profile)}, the network of "
            f"{onnx_path} has inputs {sorted(network_inputs)}",
        )
    return network


def _attach_timing_cache(config: Any, path: Path, say: Progress) -> None:
    """Loads the timing cache at `path` into `config`, or an empty one when there is none or it
    was made by another TensorRT or GPU."""
    cached = path.read_bytes() if path.is_file() else b""
    if cached:
        # A cache of another TensorRT version or GPU fails to load (None) or to attach (False).
        cache = config.create_timing_cache(cached)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            say(f"timing cache {path} loaded ({len(cached)} bytes)")
        else:
            say(f"timing cache {path} was made by another TensorRT or GPU; starting an empty one")
            cached = b""
    if not cached:
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


# --- running and checking --------------------------------------------------------------------


class EngineRunner:
    """Runs a plan with the TensorRT runtime; torch CUDA tensors are the device buffers.

    Calls: `Runtime(logger).deserialize_cuda_engine`, `create_execution_context`,
    `num_io_tensors` / `get_tensor_name` / `get_tensor_mode` / `get_tensor_dtype`,
    `get_tensor_profile_shape`, and per run `set_input_shape`, `get_tensor_shape`,
    `set_tensor_address`, `execute_async_v3` on a dedicated CUDA stream.

    Call it with a feed (input name -> array, batch-first) for outputs by name, like the
    runners of `kiln.build.check`.
    """

    def __init__(self, plan_path: Path, model: str) -> None:
        import torch

        available, reason = availability()
        if not available:
            raise EngineError(model, f"cannot run a TensorRT engine here: {reason}")
        trt = _load_tensorrt()
        self._trt = trt
        self._torch = torch
        self.model = model
        self.plan_path = Path(plan_path)
        self._logger = _logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise EngineError(
                model,
                f"TensorRT {trt.__version__} cannot load {self.plan_path}: a plan runs only with "
                f"the TensorRT version and GPU it was built for (see {record_path(self.plan_path)}); "
                + "; ".join(self._logger.errors),
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self.stream = torch.cuda.Stream()

    def __call__(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        missing = [n for n in self.inputs if n not in feed]
        if missing:
            raise EngineError(self.model, f"the feed lacks engine input(s) {', '.join(missing)}")
        keep = []  # device buffers must outlive the launch
        with torch.cuda.stream(self.stream):
            for name in self.inputs:
                array = np.ascontiguousarray(np.asarray(feed[name]).astype(self.dtypes[name], copy=False))
                tensor = torch.from_numpy(array).to("cuda", non_blocking=False)
                if not self.context.set_input_shape(name, tuple(tensor.shape)):
                    low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                    raise EngineError(
                        self.model,
                        f"input '{name}' has shape {list(tensor.shape)}, outside the engine's "
                        f"profile (min {list(low)}, max {list(high)}) of {self.plan_path}",
                    )
                self.context.set_tensor_address(name, tensor.data_ptr())
                keep.append(tensor)
            results = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise EngineError(
                        self.model,
                        f"output '{name}' has a data-dependent shape {list(shape)}, which kiln's "
                        "engine runner does not support",
                    )
                dtype = torch.from_numpy(np.empty(0, dtype=self.dtypes[name])).dtype
                out = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(name, out.data_ptr())
                results[name] = out
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise EngineError(
                    self.model,
                    f"TensorRT failed to run {self.plan_path}: "
                    + ("; ".join(self._logger.errors) or "no error reported"),
                )
        self.stream.synchronize()
        return {name: out.cpu().numpy() for name, out in results.items()}


def check_engine(
    plan_path: Path,
    onnx_path: Path,
    spec: ModelSpec,
    inputs: Sequence[np.ndarray],
    tolerance: Tolerance,
    *,
    precision: str = "",
) -> Comparison:
    """Runs the plan and ONNX Runtime (CPU) on `inputs`; every output must be within tolerance.

    Args:
        plan_path: The plan.
        onnx_path: The ONNX it was built from (the reference).
        spec: Names the tensors; inputs run in batches of max_batch_size.
        inputs: Held-out inputs, batch-first, in the order of `spec.inputs`.
        tolerance: |engine - ONNX Runtime| <= atol + rtol * |ONNX Runtime| elementwise.
        precision: Named in the messages.

    Returns:
        The comparison (all within tolerance).

    Raises:
        CheckError: an output differs beyond the tolerance (naming the worst output and its max
            absolute and relative errors), is missing or has another shape.
        EngineError: the plan cannot be loaded or run.
    """
    engine = run_batched(EngineRunner(plan_path, spec.name), spec, inputs)
    reference = run_batched(onnx_runner(Path(onnx_path), spec), spec, inputs)
    label = f"TensorRT {precision} engine" if precision else "TensorRT engine"
    return assert_close(
        spec.name,
        engine,
        reference,
        tolerance,
        candidate_name=label,
        reference_name=f"ONNX Runtime ({Path(onnx_path).name})",
        stage=STAGE,
    )


# --- the stage -------------------------------------------------------------------------------


def plan_path(workdir: Path, precision: str) -> Path:
    """Where the `precision` plan of a model is written: `<workdir>/<precision>.plan`."""
    return Path(workdir) / f"{precision}{PLAN_SUFFIX}"


def _size(size_bytes: int) -> str:
    return f"{size_bytes / BYTES_PER_MIB:.1f} MiB"


def compile_stage(
    spec: ModelSpec,
    onnx_artifacts: Mapping[str, Path],
    workdir: Path,
    progress: Progress,
    *,
    inputs: Sequence[np.ndarray],
    precisions: Sequence[str] = ENGINE_PRECISIONS,
    opt_batch: int | None = None,
    dim_ranges: Mapping[str, DimRange] | None = None,
    tolerances: Mapping[str, Tolerance] | None = None,
    timing_cache_path: Path | None = None,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
    strongly_typed: bool = False,
) -> list[EngineRecord]:
    """Builds and checks the model's TensorRT engines, or says in one line why not.

    The profile settings are validated first, on every machine, so a spec that could never build
    an engine fails everywhere. Without TensorRT or a GPU, `progress` gets exactly one line,
    "[model] tensorrt: skipped: <reason>; the repository serves the ONNX artifacts", and nothing
    is built. Otherwise each precision's engine is built from the ONNX its recipe names (a
    precision whose ONNX this build did not produce is skipped, with a line saying so), checked
    against ONNX Runtime on `inputs`, and recorded.

    Args:
        spec: The model.
        onnx_artifacts: precision -> ONNX file of this build ("fp32", "fp16", "int8" (QDQ)).
        workdir: The model's work folder: plans, records and (by default) the timing cache.
        progress: Receives whole lines, "[model] tensorrt ..." (prefixed here).
        inputs: Held-out inputs for the check, batch-first, in the order of `spec.inputs`.
        precisions: Engines to build.
        opt_batch: See `optimization_profile`.
        dim_ranges: See `optimization_profile`.
        tolerances: Per precision; `ENGINE_TOLERANCES` when None.
        timing_cache_path: Shared by the builds; `<workdir>/timing.cache` when None.
        workspace_bytes: The builder's workspace pool limit.
        strongly_typed: See `engine_recipe`.

    Returns:
        One record per engine built and checked; [] when TensorRT is unavailable.

    Raises:
        EngineError: bad profile settings, or an engine failed to build or load.
        CheckError: an engine's outputs differ from ONNX Runtime's beyond the tolerance.
    """
    # Over 60 lines only for its signature and docstring (the stage's contract, 13 parameters);
    # each engine's build and check is `_Engines.build_and_check`.
    profile = optimization_profile(spec, opt_batch, dim_ranges)
    unknown = [p for p in precisions if p not in RECIPE_PRECISIONS]
    if unknown:
        raise EngineError(
            spec.name,
            f"precisions must be among {', '.join(RECIPE_PRECISIONS)}, got {', '.join(map(repr, unknown))}",
        )
    tolerances = dict(ENGINE_TOLERANCES if tolerances is None else tolerances)
    available, reason = availability()
    if not available:
        progress(SKIP_LINE.format(model=spec.name, reason=reason))
        return []
    major = _major(_load_tensorrt().__version__)
    workdir = Path(workdir)
    cache = Path(timing_cache_path) if timing_cache_path is not None else workdir / TIMING_CACHE_NAME
    engines = _Engines(spec, workdir, profile, cache, workspace_bytes, strongly_typed, inputs, progress)
    progress(f"{engines.tag}: {reason}; profile {describe_profile(profile)}")
    records = []
    for precision in precisions:
        recipe = engine_recipe(precision, major, strongly_typed=strongly_typed)
        source = onnx_artifacts.get(recipe.onnx_variant)
        if source is None:
            progress(
                f"{engines.tag} {precision}: skipped: built {recipe.describe()}, and this build made no "
                f"{recipe.onnx_variant} ONNX"
            )
            continue
        if precision not in tolerances:
            raise EngineError(spec.name, f"no check tolerance for the {precision} engine")
        records.append(engines.build_and_check(recipe, source, tolerances[precision]))
    return records


@dataclass(frozen=True)
class _Engines:
    """What the engines of one `compile_stage` call share."""

    spec: ModelSpec
    workdir: Path
    profile: Mapping[str, ProfileShapes]
    timing_cache_path: Path
    workspace_bytes: int
    strongly_typed: bool
    inputs: Sequence[np.ndarray]
    progress: Progress

    @property
    def tag(self) -> str:
        """The prefix of every progress line: "[model] tensorrt"."""
        return f"[{self.spec.name}] tensorrt"

    def build_and_check(self, recipe: EngineRecipe, source: Path | str, tol: Tolerance) -> EngineRecord:
        """Builds the engine of `recipe` from `source`, checks it against ONNX Runtime on the
        held-out inputs within `tol`, and writes its record with the check."""
        tag, progress, precision = self.tag, self.progress, recipe.precision
        progress(f"{tag} {precision}: building {recipe.describe()} ({Path(source).name})")
        record = build_engine(
            Path(source),
            self.spec,
            precision,
            plan_path(self.workdir, precision),
            profile=self.profile,
            timing_cache_path=self.timing_cache_path,
            workspace_bytes=self.workspace_bytes,
            strongly_typed=self.strongly_typed,
            progress=lambda line: progress(f"{tag} {precision}:   {line}"),
        )
        progress(
            f"{tag} {precision}: {record.plan} ({_size(record.plan_size_bytes)}, sha256 "
            f"{record.plan_sha256[:12]}) for {record.gpu_name} (compute {record.compute_capability}), "
            f"TensorRT {record.tensorrt_version}  [{record.build_seconds:.1f} s]"
        )
        comparison = check_engine(
            Path(record.plan), Path(source), self.spec, self.inputs, tol, precision=precision
        )
        record = replace(
            record,
            check=EngineCheck(
                reference=str(source),
                items=int(self.inputs[0].shape[0]),
                worst_output=comparison.worst.name,
                max_abs=comparison.max_abs,
                max_rel=comparison.max_rel,
                atol=tol.atol,
                rtol=tol.rtol,
            ),
        )
        write_record(record)
        progress(
            f"{tag} {precision}: check vs ONNX Runtime ({Path(source).name}) on "
            f"{record.check.items} held-out items: max abs error {comparison.max_abs:.2g}, "
            f"max rel error {comparison.max_rel:.2g} (atol {tol.atol:g}, rtol {tol.rtol:g}); "
            f"record {record_path(Path(record.plan))}"
        )
        return record
