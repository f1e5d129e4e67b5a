"""Variant model repositories for the benchmark: the committed specs, changed, with the built models.

`variant_repository(dest, transform)` writes, through the repository generator
(`kiln.repository.generate`), every spec after `transform` into `dest`, then links each model's
built artifacts (the files of `<model_repository>/<name>/1/`) into it, so the variant serves the
very same ONNX files, tokenizer and statistics as the committed repository. Transforms:

- `without_dynamic_batching`: every model's dynamic batcher removed (`dynamic_batching=None`),
  a fused pipeline's own one too (`Fused.dynamic_batching`; the generator always writes a fused
  model's batcher, so `variant_repository` removes it from the written config): each request runs
  alone (target 4 of the benchmark compares it with the committed batching).
- `on_gpu`: every `kiln_onnx` model on a GPU instance with CUDA first in its execution providers
  (a GPU host serving the committed models; the CPU fallback stays last).
- `identity`: the specs unchanged (a private copy of the repository, e.g. to serve specs whose
  configs are not generated yet).
- `other_form(spec)`: a pipeline in the form its spec does not choose ("ensemble" <-> "fused"),
  under the name `<pipeline>_<form>`, to serve both forms side by side.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from kiln import paths
from kiln import spec as spec_module
from kiln.repository import CONFIG_NAME, VERSION_DIR, generate
from kiln.spec import (
    PIPELINE_FORMS,
    DynamicBatching,
    EnsembleSpec,
    InstanceGroup,
    ModelSpec,
    Spec,
    served_specs,
)

Transform = Callable[[Spec], Spec]
ONNX_BACKEND = "kiln_onnx"
CUDA_PROVIDERS = "CUDAExecutionProvider,CPUExecutionProvider"


def identity(spec: Spec) -> Spec:
    """The spec as committed."""
    return spec


def without_dynamic_batching(spec: Spec) -> Spec:
    """The spec with its dynamic batcher removed (and its inputs' `allow_ragged_batch` with it): a
    model's, or a fused pipeline's own (marked
    `fused.dynamic_batching=None`, which `variant_repository` honours); an ensemble has none."""
    if isinstance(spec, ModelSpec) and spec.dynamic_batching is not None:
        return spec_module.without_dynamic_batching(spec)
    if isinstance(spec, EnsembleSpec) and spec.form == "fused" and spec.fused.dynamic_batching is not None:
        return dataclasses.replace(spec, fused=dataclasses.replace(spec.fused, dynamic_batching=None))
    return spec


def other_form(spec: EnsembleSpec) -> EnsembleSpec:
    """Pipeline `spec` in the other form, named `<name>_<form>` (e.g. `fraud_scorer_fused`).

    Raises:
        ValueError: `spec` is not a pipeline, or its form is not one of PIPELINE_FORMS.
    """
    if not isinstance(spec, EnsembleSpec) or spec.form not in PIPELINE_FORMS:
        raise ValueError(
            f"other_form needs a pipeline of form {' or '.join(PIPELINE_FORMS)}, got "
            f"{type(spec).__name__} {getattr(spec, 'name', spec)!r} (form {getattr(spec, 'form', None)!r})"
        )
    form = next(f for f in PIPELINE_FORMS if f != spec.form)
    return dataclasses.replace(spec, name=f"{spec.name}_{form}", form=form)


def _unbatched_fused(specs: list[Spec]) -> tuple[list[Spec], list[str]]:
    """Fused pipelines marked without a batcher get a placeholder one for the generator (which
    always writes one); returns the specs to generate and the names whose batcher to remove."""
    names, out = [], []
    for spec in specs:
        if isinstance(spec, EnsembleSpec) and spec.form == "fused" and spec.fused.dynamic_batching is None:
            names.append(spec.name)
            spec = dataclasses.replace(
                spec, fused=dataclasses.replace(spec.fused, dynamic_batching=DynamicBatching())
            )
        out.append(spec)
    return out, names


def _remove_dynamic_batching(config: Path) -> None:
    """Rewrites `config` (a config.pbtxt) without its `dynamic_batching` block."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    message = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
    message.ClearField("dynamic_batching")
    config.write_text(text_format.MessageToString(message))


def on_gpu(spec: Spec) -> Spec:
    """A `kiln_onnx` model on one GPU instance, CUDA first; other specs as committed."""
    if isinstance(spec, ModelSpec) and spec.backend == ONNX_BACKEND:
        parameters = {**dict(spec.parameters), "execution_providers": CUDA_PROVIDERS}
        return dataclasses.replace(
            spec, instance_groups=(InstanceGroup(kind="GPU", count=1),), parameters=parameters
        )
    return spec


def _link_tree(source: Path, dest: Path) -> int:
    """Symlinks every file under `source` into `dest` (same relative paths); returns the count."""
    count = 0
    for path in sorted(source.rglob("*")):
        if not path.is_file() or path.name == ".gitkeep":
            continue
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        os.symlink(path.resolve(), target)
        count += 1
    return count


def variant_repository(
    dest: Path,
    transform: Transform = identity,
    specs: Iterable[Spec] | None = None,
    source: Path | None = None,
) -> Path:
    """Writes the variant repository into `dest` (emptied first) and returns it.

    Args:
        dest: The new repository folder.
        transform: Applied to every spec before generating (see the module docstring).
        specs: The specs (default: every served spec, `kiln.registry.specs()`).
        source: The built repository whose artifacts are linked (default: the model repository).

    Raises:
        FileNotFoundError: a built model's artifacts are missing from `source`.
    """
    from kiln.registry import specs as served

    source = Path(source) if source is not None else paths.model_repository()
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    changed, unbatched = _unbatched_fused(
        [transform(spec) for spec in (specs if specs is not None else served())]
    )
    generate(changed, dest, backends=paths.available_backends())
    for name in unbatched:
        _remove_dynamic_batching(dest / name / CONFIG_NAME)
    for spec in served_specs(changed):
        if spec.build is None:
            continue
        built = source / spec.name / VERSION_DIR
        if not built.is_dir() or not any(p.is_file() for p in built.iterdir()):
            raise FileNotFoundError(
                f"model {spec.name!r} is not built in {source} (no files in {built}); "
                "run `make build-engines` first"
            )
        _link_tree(built, dest / spec.name / VERSION_DIR)
    assert all((dest / s.name / CONFIG_NAME).is_file() for s in served_specs(changed))
    return dest
