"""The build pipeline: spec -> trained model -> ONNX -> variants -> checked -> published, per model.

`build()` validates every spec before any stage starts, then per model (in spec order):

    up to date?  the manifest's source hash equals this build's, and every variant's artifact,
                 published copy and extra file still has its recorded sha256: nothing is rebuilt
                 (unless `force`)
    train        the source stage (e.g. `kiln.models.digits.build`) trains the model, saves the checkpoint;
                 the held-out metric must reach `build.min_accuracy`. A source that already is
                 ONNX (its stage has `export_onnx`) is not trained: see `SourceStage`
    export       `kiln.build.export`: ONNX with the spec's names, symbolic batch dim, spec's opset
    check        `kiln.build.check`: ONNX Runtime (through kiln_onnx's loader) against the FP32
                 reference on the held-out inputs within `build.tolerance`; the ONNX metric must
                 reach the minimum too; single-item latency
    fp16, int8   one stage per further variant of `build.variants`, in spec order:
                 `kiln.build.quantize` produces `<artifacts>/<model>/<precision>.onnx`, which runs
                 through kiln_onnx's loader on the held-out inputs; its metric may be at most the
                 variant's `max_metric_drop` below the FP32 reference's (`check.check_budget`,
                 else `BudgetError`); single-item latency
    verify       the source stage's optional `verify` hook: checks of the built variants beyond
                 the held-out metric (e.g. tinylm's KV cache against the whole-sequence path),
                 recorded under the manifest's `verify`; a ValueError fails the build here
    tensorrt     `kiln.build.tensorrt.compile_stage` (one call site, `_tensorrt_stage`): engines
                 where TensorRT and a GPU are, one "skipped" line elsewhere
    publish      `kiln.build.publish`: each served variant into `<repository>/<served name>/1/`
                 (`kiln.spec.served_name`: digits, digits_fp16, digits_int8) with the source's
                 extra files, then the manifest recording every variant

Any failure raises a `BuildError` naming the model and the stage; nothing is published before
every variant has passed, so the published artifacts and manifest of the last good build stay as
they were. A source stage is a module (see `SourceStage`): a model folder's `build.py`, found
through the source class it builds (`stage_entry`); the precisions a spec may ask for are
`VARIANTS`.

Only the standard library, numpy and kiln's core modules are imported at module level, so the
`kiln` CLI registers `build` without torch installed (running it then says to install
`kiln[build]`); the stages are imported when a build runs, and an up-to-date check imports no
torch at all.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from kiln import paths
from kiln import repository as repository_files
from kiln.build.check import BudgetError, BuildError, CheckError, HeldOut
from kiln.spec import (
    PRECISIONS,
    CheckpointSource,
    EnsembleSpec,
    ModelSpec,
    OnnxFileSource,
    Spec,
    Variant,
    resolve_path,
    served_name,
    validate,
)

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from kiln.build.quantize import Int8Settings

__all__ = [
    "AccuracyError",
    "BudgetError",
    "BuildError",
    "BuildResult",
    "SOURCES",
    "SourceStage",
    "add_build_command",
    "build",
    "CheckError",
    "SelectionError",
]


@dataclass(frozen=True)
class SourceEntry:
    """Where a kind of source is built.

    Attributes:
        module: The module implementing the source stage (see `SourceStage`).
        tools: Distributions, besides the pipeline's, whose versions shape its model.
    """

    module: str
    tools: tuple[str, ...] = ()


SOURCES: dict[type, SourceEntry] = {
    CheckpointSource: SourceEntry("kiln.build.user_source"),
    OnnxFileSource: SourceEntry("kiln.build.user_source"),
}
"""The generic sources -> their source stage. A model folder's own source class is built by the
folder's `build.py` (or the module its `stage` class attribute names), with the distributions its
`tools` class attribute names; see `stage_entry`. Named, not imported, so an up-to-date check
hashes the stage's code without importing torch."""


def stage_entry(source: Any) -> SourceEntry:
    """Where `source` is built: a generic source's stage, else the `build` module beside the
    module defining its class (a model folder's `spec.py` -> that folder's `build.py`)."""
    kind = type(source)
    if kind in SOURCES:
        return SOURCES[kind]
    default = f"{kind.__module__.rpartition('.')[0]}.build"
    return SourceEntry(getattr(kind, "stage", default), tuple(getattr(kind, "tools", ())))


def _has_stage(source: Any) -> bool:
    try:
        return importlib.util.find_spec(stage_entry(source).module) is not None
    except ModuleNotFoundError:
        return False
EXPORT_MODULE = "kiln.build.export"
TRAINING_MODULE = "kiln.build.training"
"""The seeded block every PyTorch source trains or initializes in; hashed with the source."""
QUANTIZE_MODULE = "kiln.build.quantize"
"""Produces the FP16 and INT8 variants; hashed into the source hash of a model that has one."""
TENSORRT_MODULE = "kiln.build.tensorrt"
"""The TensorRT stage (optional module): called once per built model, see `_tensorrt_stage`."""
VARIANTS = PRECISIONS
"""Precisions the pipeline builds (a spec's `build.variants` picks among them; fp32 first)."""
REFERENCE = "fp32"
"""The variant every other is measured against: the first of `build.variants`."""
BUILT = "built"
REFUSED = "refused"
"""The status of an optional variant its gates refused (not published)."""
UP_TO_DATE = "up to date"
BUILD_EXTRA_MODULES = ("torch", "onnx", "onnxruntime", "sklearn")
"""Modules of the `build` extra; without them `kiln build` says what to install."""
EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_BAD_INPUT = 2
"""Invalid spec, unknown model name, or the build extra is missing."""
BYTES_PER_KIB = 1024
REFERENCE_TORCH = "FP32 PyTorch"
REFERENCE_ONNX = "FP32 source ONNX (graph optimizations off)"
REFERENCE_USER = "FP32 reference outputs given with the source"
"""How the FP32 reference is named in messages: a trained PyTorch model, or a source's own ONNX."""
NOT_SERVED = "-"
"""The table's 'served as' cell of a variant kept in the artifacts folder only."""

Progress = Callable[[str], None]


class SourceStage(Protocol):
    """What a source-stage module provides (`kiln.models.digits.build` is one).

    Its code is hashed into the source hash: a change to it rebuilds the model.

    Required: `held_out`, and either `train` + `save_checkpoint` (a PyTorch model, exported by
    `kiln.build.export`) or the optional `export_onnx` (a source that already is ONNX).

    Every function below that declares a parameter named `spec` gets the model's `ModelSpec` as
    the keyword `spec=` (a stage that reads its held-out data or verifies its ONNX against the
    spec, like `kiln.build.user_source`); the others get the arguments shown.

    Optional hooks, looked up with `hasattr` on the module:

    - `export_onnx(source, dest: Path) -> Path`: writes the FP32 ONNX model to `dest` (or returns
      where it is) INSTEAD of training and exporting: `train` and `save_checkpoint` are not
      called, the FP32 reference outputs come from running that ONNX file on ONNX Runtime with
      every graph optimization off (or from `reference_outputs`), `min_accuracy` applies to its
      metric, and the check stage compares the served session (all optimizations, through
      kiln_onnx's loader) with that independent reference. The manifest records no checkpoint
      and the exporter "source onnx".
    - `reference_outputs(source) -> dict[str, np.ndarray] | None`: for an `export_onnx` source,
      the expected FP32 outputs on the held-out inputs given by the user (e.g. from the model's
      own framework); None: the unoptimized ONNX Runtime run is the reference.
    - `exports_onnx(source) -> bool`: for a module serving several source kinds, whether this
      source takes the `export_onnx` path; without it, having `export_onnx` decides.
    - `extra_files(source, model, workdir: Path) -> dict[str, Path]`: files to publish beside
      `model.onnx` in every served variant's version folder (a tokenizer, feature statistics),
      keyed by their file name there (one plain name; not `model.onnx` or `manifest.json`).
      `model` is the trained module, or None for an `export_onnx` source; `workdir` is the
      model's artifacts folder. Called once per build, after the check; each file's sha256 is
      recorded per served variant in the manifest, and a changed or missing published file
      rebuilds the model.
    - `derived(source, model, workdir: Path) -> dict[str, tuple[Path, dict]]`: values chosen
      from the trained model's held-out outputs (e.g. `kiln.models.fraud.build`'s decision threshold),
      which depend on the trained weights and so on the CPU that trained them: never written into
      a spec. Each is a JSON document written into `workdir` and published like an extra file;
      the document (the value, the `rule` that chose it, the `evidence`) is also recorded under
      the manifest's `derived`. A ValueError (the rule cannot be met) fails the build in stage
      "derive".
    - `int8_settings(source) -> kiln.build.quantize.Int8Settings`: calibration and quantization
      settings for the INT8 variant (e.g. `exclude_op_types=("Softmax",)` to keep ops in FP32);
      `kiln.build.quantize.INT8_DEFAULTS` when absent.
    - `verify(source, model, artifacts: Mapping[str, Path], workdir: Path, progress) -> dict`:
      checks of the built variants that the held-out metric cannot make (e.g.
      `kiln.models.tinylm.build`'s: the KV-cache path of each variant against the whole-sequence
      path, greedy decoding with and without the cache, a padded batch against each sequence
      alone). Called once per build after every variant passed its gates and before anything is
      published, with the trained module (None for an `export_onnx` source) and each built
      variant's ONNX file by precision; `progress` takes log lines. It returns a JSON-able record,
      written under the manifest's `verify`; a ValueError (a check failed, its message naming
      what differs) fails the build in stage "verify" and nothing is published.
    """

    def train(self, source: Any, progress: Progress | None = None) -> nn.Module:
        """Trains (or loads) the PyTorch model; returns it in eval mode."""
        ...

    def save_checkpoint(self, model: nn.Module, path: Path) -> Path:
        """Saves the trained weights."""
        ...

    def held_out(self, source: Any) -> HeldOut:
        """Held-out inputs (evaluation and calibration) and the metric that scores outputs."""
        ...


class AccuracyError(BuildError):
    """The model's held-out metric is below `build.min_accuracy`."""


class SelectionError(BuildError):
    """A model asked for by name is not in the spec."""


@dataclass(frozen=True)
class BuildResult:
    """One built (or already up-to-date) variant of a model.

    Attributes:
        model: Model name.
        variant: The precision: "fp32", "fp16" or "int8".
        status: "built", "up to date", or "refused" (an optional variant its gates refused: not
            published; `reason` says why).
        metric: The metric's name, e.g. "test accuracy".
        metric_onnx: This variant's metric under ONNX Runtime (through kiln_onnx's loader).
        metric_torch: The FP32 reference's metric (the PyTorch model's; for a source that is
            ONNX, its own ONNX model's).
        size_bytes: Size of the variant's artifact.
        latency_ms: Median single-item ONNX Runtime latency (measured at build time).
        artifact: The published file, or the artifact in the artifacts folder when not served.
        manifest: The build manifest.
        timings_s: Seconds per stage of this run (the model's stages; empty when up to date).
        reason: Why it was built, or "up to date".
        metric_drop: `metric_torch - metric_onnx`.
        max_metric_drop: The variant's budget (`Variant.max_metric_drop`).
        served_as: The model-repository name it is served under; None when not served.
    """

    model: str
    variant: str
    status: str
    metric: str
    metric_onnx: float
    metric_torch: float
    size_bytes: int
    latency_ms: float
    artifact: Path
    manifest: Path
    timings_s: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""
    metric_drop: float = 0.0
    max_metric_drop: float = 0.0
    served_as: str | None = None


def source_stage(spec: ModelSpec) -> SourceStage:
    """The source-stage module that builds `spec` (imported: this imports torch)."""
    assert spec.build is not None
    module: ModuleType = importlib.import_module(stage_entry(spec.build.source).module)
    return module  # type: ignore[return-value]


def held_out_of(spec: ModelSpec) -> HeldOut:
    """The held-out data of a built model, called as the build calls it (with `spec=` for a stage
    that declares it, like `kiln.build.user_source`)."""
    assert spec.build is not None
    return _call(source_stage(spec).held_out, spec.build.source, spec=spec)


def reference_runner(
    spec: ModelSpec, artifacts: Path | None = None
) -> tuple[str, Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]:
    """(name, run) of a built model's FP32 reference, for `kiln.build.check.run_batched`: the
    trained PyTorch module when the stage can load it (`load_trained(spec, artifacts)`), else the
    FP32 ONNX the build exported and checked against it (`artifacts/<model>/fp32.onnx`)."""
    from kiln.build import check, publish

    stage = source_stage(spec)
    if hasattr(stage, "load_trained"):
        return REFERENCE_TORCH, check.torch_runner(stage.load_trained(spec, artifacts), spec)
    fp32 = publish.export_path(spec.name, REFERENCE, artifacts)
    if not fp32.is_file():
        raise FileNotFoundError(f"model {spec.name!r}: no {fp32}; run `kiln build --model {spec.name}`")
    return "FP32 ONNX (checked against the source at build time)", check.artifact_runner(fp32, spec)


def _module_file(module: str) -> Path:
    """A module's source file, found without importing it."""
    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(f"no module named {module!r}", name=module)
    return Path(found.origin)


def _show(path: Path) -> str:
    """`path` relative to the working directory when it lies below it, else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _size(size_bytes: int) -> str:
    return f"{size_bytes / BYTES_PER_KIB:.1f} KiB"


class _Log:
    """Progress lines on `out`, prefixed with the model's name; stage timings."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.timings: dict[str, float] = {}

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = time.perf_counter() - start


def _select(specs: Sequence[ModelSpec], only: Collection[str] | None) -> list[ModelSpec]:
    if only is None:
        return list(specs)
    known = [s.name for s in specs]
    unknown = [n for n in only if n not in known]
    if unknown:
        raise SelectionError(
            ", ".join(unknown),
            "select",
            f"no model named {', '.join(repr(n) for n in unknown)} in the spec; "
            f"known: {', '.join(known) or 'none'}",
        )
    return [s for s in specs if s.name in set(only)]


def _results_from_manifest(
    spec: ModelSpec,
    manifest: Mapping[str, Any],
    *,
    artifacts: Path,
    repository: Path,
    manifest_file: Path,
) -> list[BuildResult]:
    """One up-to-date result per variant the manifest records, in spec order, and one per
    optional variant the last build refused."""
    first = next(iter(manifest["variants"].values()), {})
    metric_name = next(iter(first.get("metrics", {"": None})))
    refused = _refused_results(
        spec, manifest.get("refused") or {}, manifest_file, metric_name,
        status=f"{REFUSED} (last build)",
    )
    results = []
    for precision, entry in manifest["variants"].items():
        metric, values = next(iter(entry["metrics"].items()))
        published = entry.get("published")
        results.append(
            BuildResult(
                model=spec.name,
                variant=precision,
                status=UP_TO_DATE,
                metric=metric,
                metric_onnx=float(values["onnxruntime"]),
                metric_torch=float(values["reference"]),
                size_bytes=int(entry["size_bytes"]),
                latency_ms=float(entry["latency_ms_batch1"]),
                artifact=repository / published if published else artifacts / entry["artifact"],
                manifest=manifest_file,
                reason=UP_TO_DATE,
                metric_drop=float(entry["metric_drop"]),
                max_metric_drop=float(entry["max_metric_drop"]),
                served_as=entry.get("served_as"),
            )
        )
    return results + refused


@dataclass
class _Built:
    """A variant produced and evaluated in this run, not yet published."""

    variant: Variant
    index: int
    artifact: Path
    metric: float
    drop: float
    latency_ms: float
    max_abs_error: float
    timings_s: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return self.variant.precision


@dataclass
class _Reference:
    """The FP32 reference: its outputs on the held-out inputs and their metric."""

    held: HeldOut
    outputs: dict[str, np.ndarray]
    metric: float
    name: str
    model: Any
    checkpoint: Path | None
    exporter: str


FILE_FIELDS = ("checkpoint", "path", "held_out", "reference")
"""Source fields naming a user's file (CheckpointSource, OnnxFileSource); a source dataclass of
a model folder marks its own with field metadata {"file": True}."""


def source_data_files(source: Any) -> dict[str, Path]:
    """The files a source's model is made from, by field name, whose content the rebuild
    decision hashes: its file fields that exist, and a CheckpointSource factory's module."""
    import dataclasses

    files: dict[str, Path] = {}
    if dataclasses.is_dataclass(source):
        for item in dataclasses.fields(source):
            value = getattr(source, item.name)
            if (item.name in FILE_FIELDS or item.metadata.get("file")) and isinstance(value, str):
                path = resolve_path(value)
                if path.is_file():
                    files[item.name] = path
    if isinstance(source, CheckpointSource):
        module = str(source.factory).partition(":")[0]
        try:
            files["factory"] = _module_file(module)
        except (ModuleNotFoundError, ValueError):
            pass  # validate() and the train stage report an unimportable factory
    return files


def _hash_inputs(spec: ModelSpec, exporter: str | None) -> dict[str, Any]:
    from kiln.build import publish

    assert spec.build is not None
    entry = stage_entry(spec.build.source)
    source_file = _module_file(entry.module)
    code = {
        f"source:{source_file.name}": source_file,
        "training.py": _module_file(TRAINING_MODULE),
        "export.py": _module_file(EXPORT_MODULE),
    }
    if any(v.precision != REFERENCE for v in spec.build.variants):
        code["quantize.py"] = _module_file(QUANTIZE_MODULE)
    return publish.hash_inputs(
        spec,
        code=code,
        data=source_data_files(spec.build.source),
        tools=publish.tool_versions(entry.tools),
        # None is export.py's default; a change of that default changes export.py's hash. The
        # variants and their budgets are part of `spec.build`.
        settings={"exporter": exporter, "version": publish.VERSION},
    )


def _reference(
    spec: ModelSpec,
    stage: SourceStage,
    *,
    log: _Log,
    artifacts: Path,
    exporter: str | None,
) -> tuple[_Reference, Path]:
    """Trains and exports (or takes the source's ONNX); returns the reference and the FP32 ONNX."""
    from kiln.build import publish

    assert spec.build is not None
    exported = publish.export_path(spec.name, REFERENCE, artifacts)
    if _is_onnx_source(stage, spec.build.source):
        reference, exported = _onnx_reference(spec, stage, exported, log)
        stage_name = "export"
    else:
        reference = _trained_reference(spec, stage, log, artifacts, exporter)
        stage_name = "train"
    minimum, held, source = spec.build.min_accuracy, reference.held, spec.build.source
    if minimum is not None and reference.metric < minimum:
        raise AccuracyError(
            spec.name,
            stage_name,
            f"{reference.name.removeprefix('FP32 ')} {held.metric} {reference.metric:.4f} is below "
            f"build.min_accuracy {minimum:g} ({held.size} held-out items, "
            f"{type(source).__name__} {source})",
        )
    if reference.model is not None:
        _export_stage(spec, reference, exported, log)
    return reference, exported


def _onnx_reference(
    spec: ModelSpec, stage: SourceStage, exported: Path, log: _Log
) -> tuple[_Reference, Path]:
    """The source stage for a source that is ONNX already: its file, and an independent FP32
    reference (the user's outputs, else the file with every graph optimization off)."""
    from kiln.build import check

    assert spec.build is not None
    source, tag = spec.build.source, f"[{spec.name}]"
    with log.stage("export"):
        log.say(f"{tag} export: {type(source).__name__} is ONNX already; no training")
        exported = Path(_call(stage.export_onnx, source, exported, spec=spec))  # type: ignore[attr-defined]
        held = _call(stage.held_out, source, spec=spec)
        _check_held_out(spec, held)
        hook = getattr(stage, "reference_outputs", None)
        given = _call(hook, source, spec=spec) if hook is not None else None
        if given is not None:
            outputs, what = dict(given), REFERENCE_USER
        else:
            # Never the served session itself: the file with every optimization off.
            runner = check.onnx_runner(exported, spec, optimized=False)
            outputs, what = check.run_batched(runner, spec, held.inputs), REFERENCE_ONNX
        listed = [outputs[t.name] for t in spec.outputs]
        metric = held.score(listed, listed)
    log.say(
        f"{tag} export: {_show(exported)}; reference: {what}; {held.metric} "
        f"{metric:.4f} on {held.size} held-out items  [{log.timings['export']:.2f} s]"
    )
    return _Reference(held, outputs, metric, what, None, None, "source onnx"), exported


def _trained_reference(
    spec: ModelSpec, stage: SourceStage, log: _Log, artifacts: Path, exporter: str | None
) -> _Reference:
    """The source stage for a PyTorch source: train (or load), save the checkpoint, and the
    trained module's outputs on the held-out inputs as the reference."""
    from kiln.build import check, export, publish

    assert spec.build is not None
    source, tag, minimum = spec.build.source, f"[{spec.name}]", spec.build.min_accuracy
    held = _call(stage.held_out, source, spec=spec)
    _check_held_out(spec, held)  # before training: a spec the data does not fit fails now
    with log.stage("train"):
        log.say(f"{tag} train: {source}")
        model = _call(stage.train, source, lambda line: log.say(f"{tag}   {line}"), spec=spec)
        checkpoint = stage.save_checkpoint(model, publish.checkpoint_path(spec.name, artifacts))
        outputs = check.run_batched(check.torch_runner(model, spec), spec, held.inputs)
        listed = [outputs[t.name] for t in spec.outputs]
        metric = held.score(listed, listed)
    log.say(
        f"{tag} train: PyTorch {held.metric} {metric:.4f} on {held.size} held-out items"
        + (f" (minimum {minimum:g})" if minimum is not None else "")
        + f"; checkpoint {_show(checkpoint)}  [{log.timings['train']:.1f} s]"
    )
    chosen = exporter or export.DEFAULT_EXPORTER
    return _Reference(held, outputs, metric, REFERENCE_TORCH, model, checkpoint, chosen)


def _export_stage(spec: ModelSpec, reference: _Reference, exported: Path, log: _Log) -> None:
    """Exports the trained module to the FP32 ONNX (checker and signature verified)."""
    from kiln.build import export

    assert spec.build is not None
    with log.stage("export"):
        export.export_onnx(
            reference.model,
            spec,
            export.example_inputs(spec, reference.held.inputs),
            exported,
            exporter=reference.exporter,
        )
    log.say(
        f"[{spec.name}] export: {_show(exported)} ({reference.exporter} exporter, opset "
        f"{spec.build.opset}, symbolic batch dim '{export.BATCH_DIM}'; checker and signature "
        f"ok)  [{log.timings['export']:.2f} s]"
    )


def _takes_spec(function: Callable[..., Any]) -> bool:
    try:
        return "spec" in inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        return False


def _check_held_out(spec: ModelSpec, held: HeldOut) -> None:
    """Checks the source's evaluation and calibration data against the spec's inputs.

    The data is in the model's input contract, so a spec whose inputs disagree with the model (a
    shape or dtype it rejects) fails here, before any training, with the serving backend's own
    request check naming the input, the expected and the given shape or dtype.
    """
    import numpy as np

    from kiln.serving.batch import RequestError, TensorContract, validate_request
    from kiln.serving.onnx import TRITON_TYPES

    contracts = [
        TensorContract(t.name, np.dtype(TRITON_TYPES[f"TYPE_{t.dtype}"]), t.dims)
        for t in spec.inputs
        if f"TYPE_{t.dtype}" in TRITON_TYPES
    ]
    assert spec.build is not None
    for which, arrays in (("evaluation", held.inputs), ("calibration", held.calibration)):
        if not arrays:
            continue
        named = {t.name: array for t, array in zip(spec.inputs, arrays, strict=True)}
        # Held-out data is items-first; a model without a batch axis takes one item a request.
        requests = [("", named)] if spec.max_batch_size > 0 else [
            (f"item {i}: ", {k: v[i] for k, v in named.items()}) for i in range(len(arrays[0]))
        ]
        for item, request in requests:
            try:
                validate_request(
                    request, contracts, batched=spec.max_batch_size > 0, reject_non_finite=True
                )
            except RequestError as error:
                raise BuildError(
                    spec.name,
                    "source",
                    f"the {which} data of {type(spec.build.source).__name__} does not fit field "
                    f"'inputs' of the spec: {item}{error}",
                ) from error


def _call(function: Callable[..., Any], *args: Any, spec: ModelSpec) -> Any:
    """Calls a source-stage function, adding `spec=` when it declares that parameter."""
    return function(*args, spec=spec) if _takes_spec(function) else function(*args)


def _is_onnx_source(stage: SourceStage, source: Any) -> bool:
    """Whether `source` takes the `export_onnx` path (see `SourceStage`)."""
    decides = getattr(stage, "exports_onnx", None)
    if decides is not None:
        return bool(decides(source))
    return hasattr(stage, "export_onnx")


def _int8_settings(spec: ModelSpec, stage: SourceStage, source: Any) -> Int8Settings:
    """The INT8 settings: the source stage's (its optional `int8_settings` hook) or the
    defaults, then every option the spec sets (`BuildSpec.int8`, a kiln.spec.Int8Options)."""
    import dataclasses

    from kiln.build import quantize

    hook = getattr(stage, "int8_settings", None)
    settings = quantize.INT8_DEFAULTS if hook is None else _call(hook, source, spec=spec)
    if not isinstance(settings, quantize.Int8Settings):
        raise quantize.QuantizeError(
            spec.name,
            "int8",
            f"the source stage's int8_settings hook must return kiln.build.quantize.Int8Settings, "
            f"got {type(settings).__name__}",
        )
    options = spec.build.int8 if spec.build is not None else None
    if options is not None:
        chosen = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)}
        settings = replace(settings, **{k: v for k, v in chosen.items() if v is not None})
    return settings


def _build_variant(
    spec: ModelSpec,
    variant: Variant,
    index: int,
    *,
    stage: SourceStage,
    reference: _Reference,
    fp32: Path,
    log: _Log,
    artifacts: Path,
) -> _Built:
    """Produces one further variant from the FP32 ONNX, evaluates it and gates it: every output on
    its own (`kiln.build.gates`: alive, and its metric where declared or the model is scored
    against FP32), then the model's metric on the variant's budget."""
    from kiln.build import check, gates, publish

    assert spec.build is not None
    name, precision, tag = spec.name, variant.precision, f"[{spec.name}]"
    held = reference.held
    artifact = publish.export_path(name, precision, artifacts)
    details: dict[str, Any] = {}
    with log.stage(precision):
        start = time.perf_counter()
        what = _produce_variant(spec, precision, stage, held, fp32, artifact, details, log)
        produced = time.perf_counter()
        served = replace(spec, name=served_name(name, precision))
        run = check.artifact_runner(artifact, served)
        candidate = check.run_batched(run, spec, held.inputs)
        metric = held.score([candidate[t.name] for t in spec.outputs],
                            [reference.outputs[t.name] for t in spec.outputs])
        comparison = check.compare(candidate, reference.outputs, spec.build.tolerance)
        latency = check.latency_ms(run, spec, held.inputs)
        timings = {"produce": produced - start, "evaluate": time.perf_counter() - produced}
    size = artifact.stat().st_size
    fp32_size = fp32.stat().st_size
    log.say(
        f"{tag} {precision}: {_show(artifact)} ({what}; {_size(size)}, {size / fp32_size:.2f}x "
        f"FP32's); {held.metric} {metric:.4f} vs {reference.name} {reference.metric:.4f} "
        f"(drop {_drop_text(reference.metric - metric)}, budget {variant.max_metric_drop:g}); max abs "
        f"error vs FP32 {comparison.max_abs:.3g}; latency {latency:.3f} ms at batch 1  "
        f"[{log.timings[precision]:.2f} s]"
    )
    output_scores = gates.check_variant(
        spec, precision, candidate, reference.outputs,
        default_budget=variant.max_metric_drop, gated=held.against_fp32,
    )
    details["outputs"] = gates.record(output_scores)
    log.say(f"{tag} {precision} outputs: {gates.describe(output_scores)}")
    drop = check.check_budget(
        name,
        precision,
        held.metric,
        metric,
        reference.metric,
        variant.max_metric_drop,
        reference_name=reference.name,
        detail=(
            f"build.variants[{index}] of {held.size} held-out items; nothing was published (the "
            f"last good build's artifacts stay); the rejected artifact is {_show(artifact)}"
        ),
    )
    return _Built(
        variant, index, artifact, metric, drop, latency, comparison.max_abs, timings, details
    )


def _produce_variant(
    spec: ModelSpec,
    precision: str,
    stage: SourceStage,
    held: HeldOut,
    fp32: Path,
    artifact: Path,
    details: dict[str, Any],
    log: _Log,
) -> str:
    """Writes `precision`'s artifact from the FP32 ONNX (INT8 with the model's settings, recorded
    into `details`); returns what it is, for the log."""
    from kiln.build import quantize

    assert spec.build is not None
    tag = f"[{spec.name}]"
    progress = lambda line: log.say(f"{tag}   {line}")  # noqa: E731
    if precision == "fp16":
        quantize.to_fp16(fp32, artifact, spec, held.inputs, progress)
        return "FP16 weights and activations, FP32 inputs/outputs"
    if precision != "int8":
        raise BuildError(spec.name, precision, f"no producer for precision {precision!r}")
    settings = _int8_settings(spec, stage, spec.build.source)
    items = int(held.calibration[0].shape[0]) if held.calibration else 0
    log.say(
        f"{tag} int8: calibrating on {items} held-out calibration items "
        f"({settings.method}, batch {quantize.calibration_batch_size(spec, settings)})"
    )
    quantize.to_int8(fp32, artifact, spec, held.calibration, progress, settings)
    details["int8"] = {**settings.record(), "calibration_items": items}
    return (
        f"INT8 QDQ, {settings.activation_type} activations, {settings.weight_type} "
        f"{'per-channel ' if settings.per_channel else ''}weights, {settings.method} "
        "calibration"
    )


def _verify_stage(
    stage: SourceStage,
    spec: ModelSpec,
    reference: _Reference,
    built: Sequence[_Built],
    artifacts: Path,
    log: _Log,
) -> dict[str, Any] | None:
    """The verify stage: the source stage's optional `verify` hook over every built variant (see
    `SourceStage`); None when the stage has none.

    Raises:
        BuildError: the hook raised a ValueError (stage "verify"; the message is the hook's).
    """
    from kiln.build import publish

    hook = getattr(stage, "verify", None)
    if hook is None:
        return None
    assert spec.build is not None
    tag = f"[{spec.name}]"
    onnx_files = {item.precision: item.artifact for item in built}
    with log.stage("verify"):
        try:
            record = _call(
                hook, spec.build.source, reference.model, onnx_files,
                publish.model_artifacts(spec.name, artifacts), lambda line: log.say(f"{tag}   {line}"),
                spec=spec,
            )
        except ValueError as error:
            raise BuildError(spec.name, "verify", str(error)) from error
    log.say(
        f"{tag} verify: {', '.join(onnx_files)} passed the source stage's checks (recorded under the "
        f"manifest's 'verify')  [{log.timings['verify']:.2f} s]"
    )
    return publish.plain_data(record)


def _tensorrt_stage(
    spec: ModelSpec,
    onnx_artifacts: Mapping[str, Path],
    workdir: Path,
    held: HeldOut,
    log: _Log,
) -> list[Any]:
    """THE call site of the TensorRT stage (`kiln.build.tensorrt.compile_stage`), once per built
    model, after every variant passed and before anything is published.

    Returns its engine records ([] where TensorRT or a GPU is absent: it then prints one line).
    A model with a variable (-1) input dim is not passed on: TensorRT needs that dim's
    (min, opt, max) range, which no spec field gives yet; a line says so.
    """
    if importlib.util.find_spec(TENSORRT_MODULE) is None:
        return []
    variable = [t.name for t in spec.inputs if -1 in t.dims]
    if variable:
        log.say(
            f"[{spec.name}] tensorrt: skipped: input(s) {', '.join(variable)} have a variable (-1) "
            "dim and the spec gives no TensorRT dim range; the repository serves the ONNX artifacts"
        )
        return []
    tensorrt = importlib.import_module(TENSORRT_MODULE)
    return list(tensorrt.compile_stage(spec, onnx_artifacts, workdir, log.say, inputs=held.inputs))


def _variant_entry(
    spec: ModelSpec, built: _Built, reference: _Reference, artifacts: Path
) -> dict[str, Any]:
    from kiln.build import publish

    return {
        "precision": built.precision,
        "serve": built.variant.serve,
        "served_as": served_name(spec.name, built.precision) if built.variant.serve else None,
        "artifact": built.artifact.relative_to(artifacts).as_posix(),
        "sha256": publish.sha256_file(built.artifact),
        "size_bytes": built.artifact.stat().st_size,
        "metrics": {
            reference.held.metric: {"reference": reference.metric, "onnxruntime": built.metric}
        },
        "reference": reference.name,
        "metric_drop": built.drop,
        "max_metric_drop": built.variant.max_metric_drop,
        "max_abs_error_vs_fp32": built.max_abs_error,
        "latency_ms_batch1": built.latency_ms,
        "timings_s": {k: round(v, 3) for k, v in built.timings_s.items()},
        **built.details,
    }


def _build_model(
    spec: ModelSpec,
    *,
    force: bool,
    log: _Log,
    artifacts: Path,
    repository: Path,
    exporter: str | None,
) -> list[BuildResult]:
    """One model through its stages: freshness, source (train/export), check, derive, variants,
    tensorrt, publish; each stage below is its own function."""
    from kiln.build import publish  # numpy and the standard library only

    assert spec.build is not None
    inputs = _hash_inputs(spec, exporter)
    state = publish.freshness(
        spec.name, publish.source_hash(inputs), artifacts=artifacts, repository=repository,
        expected_inputs=inputs,
    )
    if state.up_to_date and not force:
        return _up_to_date(spec, state, publish.source_hash(inputs), log, artifacts, repository)
    reason = "forced (--force)" if force else state.reason
    variants = ", ".join(v.precision for v in spec.build.variants)
    log.say(f"[{spec.name}] building ({reason}): variants {variants}")

    stage = source_stage(spec)  # imports torch
    log.timings.clear()
    reference, exported = _reference(spec, stage, log=log, artifacts=artifacts, exporter=exporter)
    built = [_check_stage(spec, reference, exported, log, artifacts)]
    extra, derived = _source_files(stage, spec, reference, artifacts, log)
    refused: dict[str, str] = {}
    for index, variant in enumerate(spec.build.variants[1:], start=1):
        item = _gated_variant(
            spec, variant, index, stage, reference, exported, log, artifacts, refused
        )
        if item is not None:
            built.append(item)
    verified = _verify_stage(stage, spec, reference, built, artifacts, log)
    with log.stage("tensorrt"):
        engines = _tensorrt_stage(
            spec, {b.precision: b.artifact for b in built},
            publish.model_artifacts(spec.name, artifacts), reference.held, log,
        )
    if not engines:
        del log.timings["tensorrt"]
    published = _publish_stage(
        spec, built, reference, _Outputs(extra, derived, engines, refused, verified), inputs,
        state.manifest, log, artifacts=artifacts, repository=repository,
    )
    results = _built_results(spec, built, reference, published, reason, dict(log.timings))
    return results + _refused_results(spec, refused, published.manifest, reference.held.metric)


def _up_to_date(
    spec: ModelSpec, state: Any, expected: str, log: _Log, artifacts: Path, repository: Path
) -> list[BuildResult]:
    """The freshness stage's answer when nothing changed: the recorded results, rebuilt from the
    manifest (every artifact's sha256 was verified by `publish.freshness`)."""
    from kiln.build import publish

    assert state.manifest is not None
    log.say(
        f"[{spec.name}] up to date: source hash {expected[:12]} unchanged, every variant's artifact "
        f"sha256 verified ({', '.join(state.manifest['variants'])}); nothing to rebuild"
    )
    return _results_from_manifest(
        spec, state.manifest, artifacts=artifacts, repository=repository,
        manifest_file=publish.manifest_path(spec.name, artifacts),
    )


def _check_stage(
    spec: ModelSpec, reference: _Reference, exported: Path, log: _Log, artifacts: Path
) -> _Built:
    """The check stage: the exported FP32 model on ONNX Runtime (through kiln_onnx's loader)
    against the reference within the spec's tolerance, its metric against `min_accuracy`, its
    batch-1 latency. Returns the FP32 variant."""
    from kiln.build import check

    assert spec.build is not None
    build_spec, held, name = spec.build, reference.held, spec.name
    reference_name = reference.name.removeprefix("FP32 ")
    with log.stage("check"):
        run = check.artifact_runner(exported, spec)
        candidate = check.run_batched(run, spec, held.inputs)
        reference_outputs = [reference.outputs[t.name] for t in spec.outputs]
        comparison = check.assert_close(
            name, candidate, reference.outputs, build_spec.tolerance, reference_name=reference_name
        )
        metric_onnx = held.score([candidate[t.name] for t in spec.outputs], reference_outputs)
        minimum = build_spec.min_accuracy
        if minimum is not None and metric_onnx < minimum:
            raise AccuracyError(
                name,
                "check",
                f"ONNX Runtime {held.metric} {metric_onnx:.4f} is below build.min_accuracy "
                f"{minimum:g} ({held.size} held-out items)",
            )
        latency = check.latency_ms(run, spec, held.inputs)
    tol = build_spec.tolerance
    log.say(
        f"[{name}] check: ONNX Runtime vs {reference_name} on {held.size} "
        f"held-out items: max abs error {comparison.max_abs:.2g}, max rel error "
        f"{comparison.max_rel:.2g} (atol {tol.atol:g}, rtol {tol.rtol:g}); ONNX Runtime "
        f"{held.metric} {metric_onnx:.4f}; latency {latency:.3f} ms at batch 1  "
        f"[{log.timings['check']:.2f} s]"
    )
    from kiln.build import gates

    kinds = "; ".join(o.describe() for o in gates.resolve(spec))
    log.say(f"[{name}] outputs: {kinds} (undeclared: {gates.INFERENCE_RULE})")
    checkpoint = reference.checkpoint
    return _Built(
        variant=build_spec.variants[0],
        index=0,
        artifact=exported,
        metric=metric_onnx,
        drop=reference.metric - metric_onnx,
        latency_ms=latency,
        max_abs_error=comparison.max_abs,
        timings_s={k: log.timings[k] for k in ("train", "export", "check") if k in log.timings},
        details={
            "exporter": reference.exporter,
            "opset": build_spec.opset,
            "checkpoint": checkpoint.relative_to(artifacts).as_posix() if checkpoint else None,
            "check": {
                "held_out_items": held.size,
                "worst_output": comparison.worst.name,
                "max_abs_error": comparison.max_abs,
                "max_rel_error": comparison.max_rel,
                "atol": tol.atol,
                "rtol": tol.rtol,
            },
        },
    )


@dataclass(frozen=True)
class _Outputs:
    """What a build publishes besides the variants: extra files, derived values, engines, and
    the optional variants its gates refused (precision -> why)."""

    extra: Mapping[str, Path]
    derived: Mapping[str, Any]
    engines: Sequence[Any]
    refused: Mapping[str, str] = field(default_factory=dict)
    verified: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _Published:
    """Where the publish stage put each variant."""

    entries: Mapping[str, dict[str, Any]]
    paths: Mapping[str, Path]
    manifest: Path


def _publish_stage(
    spec: ModelSpec,
    built: Sequence[_Built],
    reference: _Reference,
    outputs: _Outputs,
    inputs: Mapping[str, Any],
    previous: Mapping[str, Any] | None,
    log: _Log,
    *,
    artifacts: Path,
    repository: Path,
) -> _Published:
    """The publish stage: each served variant and its extra files into the repository, then the
    manifest (last), then the served variants the spec dropped are removed."""
    from kiln.build import publish

    name = spec.name
    with log.stage("publish"):
        entries: dict[str, dict[str, Any]] = {}
        published_paths: dict[str, Path] = {}
        for item in built:
            entry = _variant_entry(spec, item, reference, artifacts)
            if item.variant.serve:
                served = served_name(name, item.precision)
                copy = publish.publish_artifact(served, item.artifact, repository=repository)
                files = publish.publish_files(served, outputs.extra, repository=repository)
                entry["published"] = copy.relative
                entry["files"] = {
                    n: {"published": f.relative, "sha256": f.sha256, "size_bytes": f.size_bytes}
                    for n, f in files.items()
                }
                published_paths[item.precision] = copy.path
            entries[item.precision] = entry
    # The manifest goes last: until it is written, `freshness` sees the previous build's (whose
    # recorded sha256 no longer match what was just copied), so an interrupted publish rebuilds.
    document = publish.manifest_document(spec, inputs=inputs, variants=entries, timings_s=log.timings)
    if outputs.derived:
        document["derived"] = dict(outputs.derived)
    if outputs.engines:
        document["tensorrt"] = [publish.plain_data(record) for record in outputs.engines]
    if outputs.refused:
        document["refused"] = dict(outputs.refused)
    if outputs.verified is not None:
        document["verify"] = dict(outputs.verified)
    served_names = [e["served_as"] for e in entries.values() if e["served_as"]]
    manifest_file = publish.write_manifest(
        name, document, artifacts=artifacts, repository=repository, served=served_names
    )
    removed = _unpublish_dropped(previous, entries, repository)
    log.say(
        f"[{name}] publish: "
        + "; ".join(f"{p} -> {_show(path)}" for p, path in published_paths.items())
        + (f"; extra files {', '.join(outputs.extra)}" if outputs.extra else "")
        + f"; manifest {_show(manifest_file)}  [{log.timings['publish']:.2f} s]"
    )
    for path in removed:
        log.say(f"[{name}] publish: removed {_show(path)} (no longer a served variant of the spec)")
    return _Published(entries, published_paths, manifest_file)


def _gated_variant(
    spec: ModelSpec,
    variant: Variant,
    index: int,
    stage: SourceStage,
    reference: _Reference,
    fp32: Path,
    log: _Log,
    artifacts: Path,
    refused: dict[str, str],
) -> _Built | None:
    """`_build_variant`, except that an optional variant its gates refuse is recorded in
    `refused` (and None returned) instead of failing the build."""
    from kiln.build.gates import OutputGateError

    try:
        return _build_variant(
            spec, variant, index, stage=stage, reference=reference, fp32=fp32, log=log,
            artifacts=artifacts,
        )
    except (BudgetError, OutputGateError) as error:
        if not variant.optional:
            raise
        refused[variant.precision] = str(error)
        log.say(
            f"[{spec.name}] {variant.precision}: REFUSED and not published (an optional variant; "
            f"the others are): {error}"
        )
        return None


def _refused_results(
    spec: ModelSpec, refused: Mapping[str, str], manifest: Path, metric: str, status: str = REFUSED
) -> list[BuildResult]:
    """One row per refused optional variant, so the table and the caller see it."""
    nan = float("nan")
    return [
        BuildResult(
            model=spec.name, variant=precision, status=status, metric=metric, metric_onnx=nan,
            metric_torch=nan, size_bytes=0, latency_ms=nan, artifact=manifest, manifest=manifest,
            reason=why, metric_drop=nan,
            max_metric_drop=next(v.max_metric_drop for v in spec.build.variants if v.precision == precision)
            if spec.build is not None and any(v.precision == precision for v in spec.build.variants)
            else nan,
        )
        for precision, why in refused.items()
    ]


def _built_results(
    spec: ModelSpec,
    built: Sequence[_Built],
    reference: _Reference,
    published: _Published,
    reason: str,
    timings: Mapping[str, float],
) -> list[BuildResult]:
    """One BuildResult per variant of a model just built."""
    return [
        BuildResult(
            model=spec.name,
            variant=item.precision,
            status=BUILT,
            metric=reference.held.metric,
            metric_onnx=item.metric,
            metric_torch=reference.metric,
            size_bytes=item.artifact.stat().st_size,
            latency_ms=item.latency_ms,
            artifact=published.paths.get(item.precision, item.artifact),
            manifest=published.manifest,
            timings_s=dict(timings),
            reason=reason,
            metric_drop=item.drop,
            max_metric_drop=item.variant.max_metric_drop,
            served_as=published.entries[item.precision]["served_as"],
        )
        for item in built
    ]


def _source_files(
    stage: SourceStage, spec: ModelSpec, reference: _Reference, artifacts: Path, log: _Log
) -> tuple[dict[str, Path], dict[str, dict[str, Any]]]:
    """The files the source stage publishes beside every served variant.

    `extra_files` (a tokenizer, feature statistics) and `derived` (values chosen from the trained
    model's held-out outputs, such as a decision threshold: each also recorded, with the rule that
    chose it, under the manifest's `derived`). See `SourceStage`.

    Returns:
        (file name -> path of every file to publish, file name -> manifest record of the derived).

    Raises:
        BuildError: a file name is not allowed, a file is missing, a name is given twice, or the
            stage cannot derive its values (stage "derive").
    """
    from kiln.build import publish

    name, source, tag = spec.name, spec.build.source, f"[{spec.name}]"
    workdir = publish.model_artifacts(name, artifacts)
    extra: dict[str, Path] = {}
    if hasattr(stage, "extra_files"):
        given = _call(stage.extra_files, source, reference.model, workdir, spec=spec)  # type: ignore[attr-defined]
        for file_name, path in dict(given).items():
            _check_source_file(name, "files", "extra_files", file_name, Path(path), extra)
            extra[file_name] = Path(path)
    derived: dict[str, dict[str, Any]] = {}
    if hasattr(stage, "derived"):
        try:
            made = dict(_call(stage.derived, source, reference.model, workdir, spec=spec))  # type: ignore[attr-defined]
        except ValueError as error:
            raise BuildError(name, "derive", str(error)) from error
        for file_name, (path, document) in made.items():
            _check_source_file(name, "derive", "derived", file_name, Path(path), extra)
            extra[file_name] = Path(path)
            derived[file_name] = publish.plain_data(document)
            log.say(f"{tag} derived: {file_name}: {_describe_derived(document)}")
    if extra:
        log.say(
            f"{tag} files: "
            + ", ".join(f"{n} ({_size(p.stat().st_size)})" for n, p in extra.items())
            + " (published beside each served variant)"
        )
    return extra, derived


def _check_source_file(
    model: str, stage: str, hook: str, file_name: str, path: Path, taken: Collection[str]
) -> None:
    """Refuses a file a source hook names: a reserved or path-like name, one given twice, or a
    file that does not exist."""
    from kiln.build import publish

    try:
        publish.check_extra_name(model, file_name)
    except ValueError as error:
        raise BuildError(model, stage, f"{hook}: {error}") from None
    if file_name in taken:
        raise BuildError(model, stage, f"{hook} names {file_name!r}, which another hook names too")
    if not path.is_file():
        raise BuildError(model, stage, f"{hook} names {file_name!r} -> {path}, which does not exist")


def _describe_derived(document: Mapping[str, Any]) -> str:
    """One line for a derived value's log line: its value, the rule, the evidence."""
    value = next((f"{k} {v}" for k, v in document.items() if k not in ("format", "rule", "evidence")), "")
    evidence = document.get("evidence") or {}
    shown = ", ".join(
        f"{k} {v}" for k, v in evidence.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    )
    return f"{value} ({document.get('rule', 'no rule given')}){'; ' + shown if shown else ''}"


def _unpublish_dropped(
    previous: Mapping[str, Any] | None, entries: Mapping[str, Mapping[str, Any]], repository: Path
) -> list[Path]:
    """Removes what the previous build published and this one did not (a variant dropped from
    the spec or no longer served; an extra file no longer given)."""
    from kiln.build import publish

    if not previous or not isinstance(previous.get("variants"), dict):
        return []

    def published(variants: Mapping[str, Any]) -> set[str]:
        found = set()
        for entry in variants.values():
            if not isinstance(entry, Mapping) or not entry.get("published"):
                continue
            found.add(str(entry["published"]))
            found.add(str(Path(str(entry["published"])).parent / publish.MANIFEST_NAME))
            found.update(str(f.get("published")) for f in dict(entry.get("files") or {}).values())
        return found

    stale = published(previous["variants"]) - published(entries)
    return publish.remove_published(sorted(stale), repository=repository)


def _drop_text(drop: float) -> str:
    """A metric drop to 4 places; a tiny gain prints as 0.0000, not -0.0000."""
    return f"{round(drop, 4) + 0.0:.4f}"


def _table(results: Sequence[BuildResult]) -> list[str]:
    header = ("model", "variant", "metric", "drop (budget)", "size", "latency b=1", "served as", "status")
    rows = [
        (
            r.model,
            r.variant,
            f"{r.metric} {r.metric_onnx:.4f}" if r.metric_onnx == r.metric_onnx else "-",
            (_drop_text(r.metric_drop) if r.metric_drop == r.metric_drop else "-")
            + (f" ({r.max_metric_drop:g})" if r.variant != REFERENCE else ""),
            _size(r.size_bytes) if r.size_bytes else "-",
            f"{r.latency_ms:.3f} ms" if r.latency_ms == r.latency_ms else "-",
            r.served_as or NOT_SERVED,
            r.status,
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (header, *rows)
    ]


def build(
    specs: Sequence[ModelSpec],
    *,
    force: bool = False,
    out: TextIO | None = None,
    only: Collection[str] | None = None,
    artifacts: Path | None = None,
    repository: Path | None = None,
    backends: Collection[str] | None = None,
    exporter: str | None = None,
) -> list[BuildResult]:
    """Builds every spec that has a `build` section; skips those that are up to date; writes
    every spec's config.pbtxt (what `kiln generate` writes, embedded target): each built model's
    right after its artifacts, the rest at the end, so no published model lacks its config. With
    `only`, the configs written are the selected models' and those of the pipelines that run
    them (with their steps that need no build). An optional variant its gates refused gets no
    config (one left from before is removed), so the server never tries to load it.

    Args:
        specs: The repository's models; all are validated before anything starts.
        force: Rebuild even when the manifest says up to date.
        out: Where progress lines and the final table go; `sys.stdout` (looked up at call time,
            so redirections apply) when None.
        only: Build only the models with these names (all of `specs` are still validated).
        artifacts: The build's working folder; `kiln.paths.artifacts_dir()` when None.
        repository: The model repository; `kiln.paths.model_repository()` when None.
        backends: Backend names a spec may use; `kiln.paths.available_backends()` when None.
        exporter: "torchscript" or "dynamo"; `kiln.build.export.DEFAULT_EXPORTER` when None.

    Returns:
        One result per variant of each built or up-to-date model, in spec order.

    Raises:
        SpecError: a spec is invalid (nothing was started or written).
        BuildError: a stage failed; the message names the model and the stage.
    """
    validate(specs, paths.available_backends() if backends is None else backends)
    selected = _select(specs, only)
    artifacts = Path(artifacts if artifacts is not None else paths.artifacts_dir())
    repository = Path(repository if repository is not None else paths.model_repository())
    log = _Log(out if out is not None else sys.stdout)
    buildable = _buildable(selected, log)
    log.say(
        f"kiln build: {len(buildable)} model(s): {', '.join(s.name for s in buildable) or 'none'}"
        f"  (artifacts {_show(artifacts)}, repository {_show(repository)})"
    )
    start = time.perf_counter()
    results: list[BuildResult] = []
    for spec in buildable:
        results += _build_model(
            spec,
            force=force,
            log=log,
            artifacts=artifacts,
            repository=repository,
            exporter=exporter,
        )
        # The model's configs beside its artifacts: a published model.onnx never lacks one; an
        # optional variant its gates refused gets none (and loses one left from before).
        repository_files.write([spec], repository, refused=_refused([spec], artifacts))
    configured = _with_pipelines(specs, selected)
    if configured:
        written = repository_files.write(configured, repository, refused=_refused(configured, artifacts))
        log.say(
            f"kiln build: {len(written)} config(s) in {_show(repository)} match the spec "
            "(written where they differed; the same files as kiln generate)"
        )
    _report(results, log, time.perf_counter() - start)
    return results


def _refused(specs: Sequence[Spec], artifacts: Path) -> dict[str, str]:
    """The served names of the variants the specs' last builds refused (`publish.refused_served_names`)."""
    from kiln.build import publish

    return publish.refused_served_names(specs, artifacts)


def _with_pipelines(specs: Sequence[Spec], selected: Sequence[Spec]) -> list[Spec]:
    """`selected`, and every pipeline that runs one of them with the pipeline's steps that need no
    build: what `kiln build --model X` writes the configs of, so that X's pipeline (its
    folder's `pipeline.py`) is served with it."""
    chosen = {s.name for s in selected}
    by_name = {s.name: s for s in specs}
    for spec in specs:
        if isinstance(spec, EnsembleSpec) and any(step.model in chosen for step in spec.steps):
            chosen.add(spec.name)
            chosen.update(
                step.model for step in spec.steps
                if step.model in by_name and getattr(by_name[step.model], "build", None) is None
            )
    return [s for s in specs if s.name in chosen]


def _buildable(selected: Sequence[ModelSpec], log: _Log) -> list[ModelSpec]:
    """The selected specs with a build section, each with a source stage to build it."""
    buildable = [s for s in selected if s.build is not None]
    hand_made = [s.name for s in selected if s.build is None]
    if hand_made:
        log.say(f"kiln build: no build section (configs only): {', '.join(hand_made)}")
    missing = [s.name for s in buildable if not _has_stage(s.build.source)]
    if missing:
        raise BuildError(
            ", ".join(missing), "select",
            "no source stage for this source type: a model folder's own source class is built by "
            "the folder's build.py (or the module its `stage` class attribute names)",
        )
    return buildable


def _report(results: Sequence[BuildResult], log: _Log, seconds: float) -> None:
    """The build's closing report: the table of variants, where each went, the counts."""
    if results:
        log.say("")
        for line in _table(results):
            log.say(line)
        log.say("")
        for r in results:
            if r.status.startswith(REFUSED):
                log.say(f"{r.model} ({r.variant}): {r.status}, not published: {r.reason}")
            else:
                log.say(f"{r.model} ({r.variant}): artifact {_show(r.artifact)}")
        for manifest in dict.fromkeys((r.model, r.manifest) for r in results):
            log.say(f"{manifest[0]}: manifest {_show(manifest[1])}")
    models = list(dict.fromkeys(r.model for r in results))
    built = [m for m in models if any(r.model == m and r.status == BUILT for r in results)]
    log.say(
        f"kiln build: {len(built)} built, {len(models) - len(built)} up to date "
        f"({len(results)} variant(s)) in {seconds:.1f} s"
    )


def add_build_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `build` on the `kiln` command's subparsers: see `kiln.cli.build`, where the
    command lives (kept here for importers of this module)."""
    from kiln.cli.build import add_build_command as add

    return add(subparsers)
