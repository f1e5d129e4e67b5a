"""The build pipeline: spec -> trained model -> ONNX -> checked -> published, per model.

`build()` validates every spec before any stage starts, then per model (in spec order):

    up to date?  the manifest's source hash equals this build's and the published artifact's
                 sha256 still matches: nothing is rebuilt (unless `force`)
    train        the source stage (e.g. `kiln.build.digits`) trains the model, saves the checkpoint;
                 the held-out metric must reach `build.min_accuracy`
    export       `kiln.build.export`: ONNX with the spec's names, symbolic batch dim, spec's opset
    check        `kiln.build.check`: ONNX Runtime (through kiln_onnx's loader) against PyTorch on
                 the held-out inputs within `build.tolerance`; the ONNX metric must reach the
                 minimum too; single-item latency
    publish      `kiln.build.publish`: atomic copy into the model repository, then the manifest

Any failure raises a `BuildError` naming the model and the stage; the published artifact and
manifest of the last good build stay as they were. A source stage is a module (see `SourceStage`)
registered in `SOURCES` under the spec class it builds; later sources (resnet50, a text encoder,
a fraud MLP) and variants (fp16, int8, TensorRT) slot in there and in `VARIANTS`.

Only the standard library, numpy and kiln's core modules are imported at module level, so the
`kiln` CLI registers `build` without torch installed (running it then says to install
`kiln[build]`); the stages are imported when a build runs, and an up-to-date check imports no
torch at all.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from kiln import paths
from kiln.build.check import BuildError, CheckError, HeldOut
from kiln.spec import (
    CheckpointSource,
    DigitsCNNSource,
    FraudMLPSource,
    ModelSpec,
    OnnxFileSource,
    ResNet50Source,
    SpecError,
    TextEncoderSource,
    validate,
)

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "AccuracyError",
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
    DigitsCNNSource: SourceEntry("kiln.build.digits", tools=("scikit-learn",)),
    FraudMLPSource: SourceEntry("kiln.build.fraud", tools=("scikit-learn",)),
    TextEncoderSource: SourceEntry("kiln.build.text_encoder", tools=("tokenizers",)),
    ResNet50Source: SourceEntry("kiln.build.resnet50", tools=("scikit-image", "pillow")),
    CheckpointSource: SourceEntry("kiln.build.user_source"),
    OnnxFileSource: SourceEntry("kiln.build.user_source"),
}
"""Source spec class -> its source stage. Listed here, not imported, so an up-to-date check
hashes the stage's code without importing torch."""
EXPORT_MODULE = "kiln.build.export"
VARIANTS = ("fp32",)
"""Artifacts built per model, in order; the first is the one published for serving."""
BUILT = "built"
UP_TO_DATE = "up to date"
BUILD_EXTRA_MODULES = ("torch", "onnx", "onnxruntime", "sklearn")
"""Modules of the `build` extra; without them `kiln build` says what to install."""
EXIT_OK = 0
EXIT_BUILD_FAILED = 1
EXIT_BAD_INPUT = 2
"""Invalid spec, unknown model name, or the build extra is missing."""
BYTES_PER_KIB = 1024


class SourceStage(Protocol):
    """What a source-stage module provides (`kiln.build.digits` is one).

    Its code is hashed into the source hash: a change to it rebuilds the model.
    """

    def train(self, source: Any, progress: Callable[[str], None] | None = None) -> nn.Module:
        """Trains (or loads) the PyTorch model; returns it in eval mode."""
        ...

    def save_checkpoint(self, model: nn.Module, path: Path) -> Path:
        """Saves the trained weights."""
        ...

    def held_out(self, source: Any) -> HeldOut:
        """Held-out inputs and the metric that scores outputs on them."""
        ...


class AccuracyError(BuildError):
    """The model's held-out metric is below `build.min_accuracy`."""


class SelectionError(BuildError):
    """A model asked for by name is not in the spec."""


@dataclass(frozen=True)
class BuildResult:
    """One built (or already up-to-date) artifact.

    Attributes:
        model: Model name.
        variant: "fp32" (later "fp16", "int8", ...).
        status: "built" or "up to date".
        metric: The metric's name, e.g. "test accuracy".
        metric_onnx: The metric of the published artifact under ONNX Runtime.
        metric_torch: The metric of the PyTorch model.
        size_bytes: Size of the published artifact.
        latency_ms: Median single-item ONNX Runtime latency (measured at build time).
        artifact: The published file.
        manifest: The build manifest.
        timings_s: Seconds per stage of this run (empty when up to date).
        reason: Why it was built, or "up to date".
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


def source_stage(spec: ModelSpec) -> SourceStage:
    """The source-stage module that builds `spec` (imported: this imports torch)."""
    assert spec.build is not None
    module: ModuleType = importlib.import_module(SOURCES[type(spec.build.source)].module)
    return module  # type: ignore[return-value]


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


def _result_from_manifest(
    spec: ModelSpec, manifest: Mapping[str, Any], repository: Path, manifest_file: Path
) -> BuildResult:
    variant = VARIANTS[0]
    entry = manifest["variants"][variant]
    metric, values = next(iter(entry["metrics"].items()))
    return BuildResult(
        model=spec.name,
        variant=variant,
        status=UP_TO_DATE,
        metric=metric,
        metric_onnx=float(values["onnxruntime"]),
        metric_torch=float(values["pytorch"]),
        size_bytes=int(entry["size_bytes"]),
        latency_ms=float(entry["latency_ms_batch1"]),
        artifact=repository / entry["published"],
        manifest=manifest_file,
        reason=UP_TO_DATE,
    )


def _build_model(
    spec: ModelSpec,
    *,
    force: bool,
    log: _Log,
    artifacts: Path,
    repository: Path,
    exporter: str | None,
) -> BuildResult:
    from kiln.build import check, publish  # numpy and the standard library only

    assert spec.build is not None
    build_spec = spec.build
    entry = SOURCES[type(build_spec.source)]
    variant = VARIANTS[0]
    name = spec.name
    tag = f"[{name}]"

    source_file = _module_file(entry.module)
    inputs = publish.hash_inputs(
        spec,
        code={f"source:{source_file.name}": source_file, "export.py": _module_file(EXPORT_MODULE)},
        tools=publish.tool_versions(entry.tools),
        # None is export.py's default; a change of that default changes export.py's hash.
        settings={"exporter": exporter, "variants": VARIANTS, "version": publish.VERSION},
    )
    expected = publish.source_hash(inputs)
    manifest_file = publish.manifest_path(name, artifacts)
    state = publish.freshness(name, expected, artifacts=artifacts, repository=repository)
    if state.up_to_date and not force:
        assert state.manifest is not None
        log.say(
            f"{tag} up to date: source hash {expected[:12]} unchanged, published artifact's "
            "sha256 verified; nothing to rebuild"
        )
        return _result_from_manifest(spec, state.manifest, repository, manifest_file)
    reason = "forced (--force)" if force else state.reason
    log.say(f"{tag} building ({reason})")

    # The stages import torch, onnx and onnxruntime: only when something is built.
    from kiln.build import export

    stage = source_stage(spec)
    exporter = exporter or export.DEFAULT_EXPORTER
    log.timings.clear()
    source = build_spec.source
    with log.stage("train"):
        log.say(f"{tag} train: {source}")
        model = stage.train(source, lambda line: log.say(f"{tag}   {line}"))
        checkpoint = stage.save_checkpoint(model, publish.checkpoint_path(name, artifacts))
        held = stage.held_out(source)
        reference = check.run_batched(check.torch_runner(model, spec), spec, held.inputs)
        reference_outputs = [reference[t.name] for t in spec.outputs]
        metric_torch = held.score(reference_outputs, reference_outputs)
    minimum = build_spec.min_accuracy
    log.say(
        f"{tag} train: PyTorch {held.metric} {metric_torch:.4f} on {held.size} held-out items"
        + (f" (minimum {minimum:g})" if minimum is not None else "")
        + f"; checkpoint {_show(checkpoint)}  [{log.timings['train']:.1f} s]"
    )
    if minimum is not None and metric_torch < minimum:
        raise AccuracyError(
            name,
            "train",
            f"PyTorch {held.metric} {metric_torch:.4f} is below build.min_accuracy {minimum:g} "
            f"({held.size} held-out items, {type(source).__name__} {source})",
        )

    exported = publish.export_path(name, variant, artifacts)
    with log.stage("export"):
        export.export_onnx(
            model, spec, export.example_inputs(spec, held.inputs), exported, exporter=exporter
        )
    log.say(
        f"{tag} export: {_show(exported)} ({exporter} exporter, opset {build_spec.opset}, "
        f"symbolic batch dim '{export.BATCH_DIM}'; checker and signature ok)  "
        f"[{log.timings['export']:.2f} s]"
    )

    with log.stage("check"):
        run = check.artifact_runner(exported, spec)
        candidate = check.run_batched(run, spec, held.inputs)
        comparison = check.assert_close(name, candidate, reference, build_spec.tolerance)
        metric_onnx = held.score([candidate[t.name] for t in spec.outputs], reference_outputs)
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
        f"{tag} check: ONNX Runtime vs PyTorch on {held.size} held-out items: max abs error "
        f"{comparison.max_abs:.2g}, max rel error {comparison.max_rel:.2g} (atol {tol.atol:g}, "
        f"rtol {tol.rtol:g}); ONNX Runtime {held.metric} {metric_onnx:.4f}; latency "
        f"{latency:.3f} ms at batch 1  [{log.timings['check']:.2f} s]"
    )

    with log.stage("publish"):
        published = publish.publish_artifact(name, exported, repository=repository)
    variants = {
        variant: {
            "published": published.relative,
            "sha256": published.sha256,
            "size_bytes": published.size_bytes,
            "exported": exported.relative_to(artifacts).as_posix(),
            "checkpoint": checkpoint.relative_to(artifacts).as_posix(),
            "exporter": exporter,
            "opset": build_spec.opset,
            "metrics": {held.metric: {"pytorch": metric_torch, "onnxruntime": metric_onnx}},
            "check": {
                "held_out_items": held.size,
                "worst_output": comparison.worst.name,
                "max_abs_error": comparison.max_abs,
                "max_rel_error": comparison.max_rel,
                "atol": tol.atol,
                "rtol": tol.rtol,
            },
            "latency_ms_batch1": latency,
        }
    }
    document = publish.manifest_document(
        spec, inputs=inputs, variants=variants, timings_s=log.timings
    )
    manifest_file = publish.write_manifest(
        name, document, artifacts=artifacts, repository=repository
    )
    log.say(
        f"{tag} publish: {_show(published.path)} ({_size(published.size_bytes)}, sha256 "
        f"{published.sha256[:12]}); manifest {_show(manifest_file)}  "
        f"[{log.timings['publish']:.2f} s]"
    )
    return BuildResult(
        model=name,
        variant=variant,
        status=BUILT,
        metric=held.metric,
        metric_onnx=metric_onnx,
        metric_torch=metric_torch,
        size_bytes=published.size_bytes,
        latency_ms=latency,
        artifact=published.path,
        manifest=manifest_file,
        timings_s=dict(log.timings),
        reason=reason,
    )


def _table(results: Sequence[BuildResult]) -> list[str]:
    header = ("model", "variant", "metric", "size", "latency b=1", "status")
    rows = [
        (
            r.model,
            r.variant,
            f"{r.metric} {r.metric_onnx:.4f}",
            _size(r.size_bytes),
            f"{r.latency_ms:.3f} ms",
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
    """Builds every spec that has a `build` section; skips those that are up to date.

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
        One result per built or up-to-date model, in spec order.

    Raises:
        SpecError: a spec is invalid (nothing was started or written).
        BuildError: a stage failed; the message names the model and the stage.
    """
    validate(specs, paths.available_backends() if backends is None else backends)
    selected = _select(specs, only)
    artifacts = Path(artifacts if artifacts is not None else paths.artifacts_dir())
    repository = Path(repository if repository is not None else paths.model_repository())
    log = _Log(out if out is not None else sys.stdout)
    buildable = [s for s in selected if s.build is not None]
    for spec in selected:
        if spec.build is None:
            log.say(f"[{spec.name}] skipped: no build section (published by hand)")
    missing = [s.name for s in buildable if type(s.build.source) not in SOURCES]
    if missing:
        raise BuildError(
            ", ".join(missing), "select", "no source stage is registered for this source type"
        )
    log.say(
        f"kiln build: {len(buildable)} model(s): {', '.join(s.name for s in buildable) or 'none'}"
        f"  (artifacts {_show(artifacts)}, repository {_show(repository)})"
    )
    start = time.perf_counter()
    results = [
        _build_model(
            spec,
            force=force,
            log=log,
            artifacts=artifacts,
            repository=repository,
            exporter=exporter,
        )
        for spec in buildable
    ]
    if results:
        log.say("")
        for line in _table(results):
            log.say(line)
        log.say("")
        for r in results:
            log.say(f"{r.model} ({r.variant}): artifact {_show(r.artifact)}")
            log.say(f"{r.model}: manifest {_show(r.manifest)}")
    built = sum(r.status == BUILT for r in results)
    log.say(
        f"kiln build: {built} built, {len(results) - built} up to date "
        f"in {time.perf_counter() - start:.1f} s"
    )
    return results


def _run_build_command(args: argparse.Namespace) -> int:
    """`kiln build`: returns the exit code; errors are one paragraph on stderr, no traceback."""
    from kiln.build.specs import SPECS

    try:
        build(SPECS, force=args.force, only=args.models)
    except SpecError as error:
        print(f"kiln build: nothing was built: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SelectionError as error:
        print(f"kiln build: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BuildError as error:
        print(f"kiln build: failed: {error}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    except ModuleNotFoundError as error:
        if error.name not in BUILD_EXTRA_MODULES:
            raise
        print(
            f"kiln build: needs the build extra ({error.name} is missing): "
            "pip install 'kiln[build]'",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    return EXIT_OK


def add_build_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `build` on the `kiln` command's subparsers; sets `func(args) -> exit code`."""
    parser = subparsers.add_parser(
        "build",
        help="train, export, check and publish every model with a build section",
        description=(
            "Validate the spec (build/specs/), then per model: train, export to ONNX, check ONNX "
            "Runtime against PyTorch, publish into the model repository with a build manifest. "
            "A model whose spec, code and tools are unchanged is not rebuilt."
        ),
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even the models that are up to date"
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="build only this model (repeatable); all specs are still validated",
    )
    parser.set_defaults(func=_run_build_command)
    return parser
