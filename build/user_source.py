"""Source stage of a user's own models: a PyTorch factory + checkpoint, or an ONNX file.

`CheckpointSource` ("package.module:function" building the untrained nn.Module, and a
state_dict checkpoint):

    train         imports the factory, calls it, loads the state_dict (map_location cpu,
                  weights only; every missing or unexpected key is an error), returns the module
                  in eval mode. Nothing is trained: the user trained it.

`OnnxFileSource` (an existing .onnx file):

    export_onnx   runs `onnx.checker`, verifies the graph's names, dtypes, dims and opset against
                  the spec (`kiln.build.export.verify_signature`) and copies the file, atomically.
                  It replaces the PyTorch export; `train` is not used (it says so when called),
                  and the FP32 reference outputs come from ONNX Runtime running this file.

Both take their held-out data from an .npz (`held_out`): one array per spec input, named after
it, holding the evaluation items batch-first, and "calibration/<input>" arrays holding the INT8
calibration items (required when the spec asks for an int8 variant). Dtypes must equal the
spec's, dims must match it (any size where the spec says -1), and nothing else may be in the file.

The user gave no labels, so the metric is agreement with the FP32 reference outputs, per output
tensor, by what the output means (`kiln.build.gates`): its kind is declared in the spec
(`BuildSpec.outputs`) or inferred by a stated rule (class scores: top-1 agreement; regression:
the worst column's error over its FP32 range; embedding: cosine per item; detections: recall of
FP32's boxes). With several outputs the metric is the lowest of them, and every output of every
variant is also gated on its own (`gates.check_variant`: the refusal names the output). Items
with a NaN or infinity count as disagreeing. FP32 scores 1.0 against itself, so
`max_metric_drop` of a variant is the share of items (or of the range) it may lose.

The spec is needed to read the held-out data and to verify the ONNX: `held_out` and
`export_onnx` take it as the keyword `spec` (the pipeline passes it; the other source stages take
the source alone). `train` takes it too, optionally, to name the model in its errors. This one
module serves both source kinds, so `exports_onnx(source)` says which path a source takes.
"""

from __future__ import annotations

import importlib
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from kiln.build import gates
from kiln.build.check import BuildError, HeldOut
from kiln.build.export import verify_signature
from kiln.build.publish import atomic_path
from kiln.serving.onnx import TRITON_TYPES
from kiln.spec import CheckpointSource, ModelSpec, OnnxFileSource, TensorSpec, resolve_path

Progress = Callable[[str], None]
CALIBRATION_PREFIX = "calibration/"
"""Held-out .npz arrays named `calibration/<input>` hold the INT8 calibration items."""
INT8 = "int8"
METRIC_TOP1 = "top-1 agreement with FP32"
METRIC_COSINE = "mean cosine similarity to FP32"
MAX_LISTED = 10
"""Keys listed by name in an error before the rest are counted."""
STAGE_LOAD = "load"
STAGE_HELD_OUT = "held-out"
STAGE_EXPORT = "export"


class UserSourceError(BuildError):
    """A user's model or data cannot be used; the message names the spec field, the file and what
    is wrong.

    `train` is called with the source alone, which does not know the model's name: then `model`
    is "" and the message starts with the stage; pass `spec` to name the model.
    """

    def __init__(self, model: str | None, stage: str, message: str) -> None:
        if model:
            super().__init__(model, stage, message)
        else:
            RuntimeError.__init__(self, f"stage '{stage}': {message}")
            self.model = ""
            self.stage = stage


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:MAX_LISTED])
    more = len(names) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _model_name(spec: ModelSpec | None) -> str | None:
    return spec.name if spec is not None else None


# --- CheckpointSource --------------------------------------------------------------------------


def load_factory(source: CheckpointSource, spec: ModelSpec | None = None) -> Callable[[], Any]:
    """Imports `source.factory` ("package.module:function").

    Raises:
        UserSourceError: the module cannot be imported (or raised while importing), has no such
            attribute, or the attribute is not callable.
    """
    model = _model_name(spec)
    field = f"build.source.factory {source.factory!r}"
    module_name, _, attribute = str(source.factory).partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import runs user code: any error means "cannot import"
        raise UserSourceError(
            model,
            STAGE_LOAD,
            f"{field}: module {module_name!r} cannot be imported ({type(error).__name__}: {error}); "
            "is it installed or on PYTHONPATH?",
        ) from error
    if not hasattr(module, attribute):
        raise UserSourceError(
            model, STAGE_LOAD, f"{field}: module {module_name!r} has no attribute {attribute!r}"
        )
    factory = getattr(module, attribute)
    if not callable(factory):
        raise UserSourceError(
            model,
            STAGE_LOAD,
            f"{field}: {module_name}.{attribute} is a {type(factory).__name__}, not callable",
        )
    return factory


def _build(source: CheckpointSource, spec: ModelSpec | None) -> nn.Module:
    factory = load_factory(source, spec)
    field = f"build.source.factory {source.factory!r}"
    try:
        module = factory()
    except Exception as error:
        raise UserSourceError(
            _model_name(spec),
            STAGE_LOAD,
            f"{field}: calling it (with no arguments) raised {type(error).__name__}: {error}",
        ) from error
    if not isinstance(module, nn.Module):
        raise UserSourceError(
            _model_name(spec),
            STAGE_LOAD,
            f"{field}: returned a {type(module).__module__}.{type(module).__qualname__}, "
            "not a torch.nn.Module",
        )
    return module


def _state_dict(source: CheckpointSource, spec: ModelSpec | None) -> Mapping[str, Any]:
    model = _model_name(spec)
    path = resolve_path(source.checkpoint)
    field = f"build.source.checkpoint {str(path)!r}"
    if not path.is_file():
        raise UserSourceError(model, STAGE_LOAD, f"{field} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserSourceError(
            model,
            STAGE_LOAD,
            f"{field} cannot be loaded as a state_dict with torch.load(weights_only=True) "
            f"({type(error).__name__}: {error}); save it with torch.save(model.state_dict(), path)",
        ) from error
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise UserSourceError(
            model,
            STAGE_LOAD,
            f"{field} holds a {type(state).__name__}, not a state_dict (a mapping of parameter "
            "names to tensors); save it with torch.save(model.state_dict(), path)",
        )
    return state


def train(
    source: CheckpointSource | OnnxFileSource,
    progress: Progress | None = None,
    *,
    spec: ModelSpec | None = None,
) -> nn.Module:
    """Builds the user's module with its factory and loads its checkpoint (nothing is trained).

    Args:
        source: A CheckpointSource (an OnnxFileSource has no PyTorch model: an error).
        progress: Receives one line saying what was loaded.
        spec: Optional; names the model in errors.

    Returns:
        The module, on the CPU, in eval mode.

    Raises:
        UserSourceError: the factory cannot be imported or called or returns no nn.Module; the
            checkpoint is missing, unreadable, not a state_dict, lacks keys the module has, has
            keys it lacks, or holds tensors of other shapes.
    """
    model_name = _model_name(spec)
    if isinstance(source, OnnxFileSource):
        raise UserSourceError(
            model_name,
            "train",
            f"an OnnxFileSource ({source.path!r}) has no PyTorch model to load: the pipeline "
            "builds it with export_onnx(source, dest, spec=spec) and takes the FP32 reference "
            "outputs from ONNX Runtime",
        )
    module = _build(source, spec)
    state = _state_dict(source, spec)
    path = resolve_path(source.checkpoint)
    _load_into(module, state, source, spec)
    module.eval()
    if progress is not None:
        parameters = sum(p.numel() for p in module.parameters())
        progress(
            f"{source.factory} -> {type(module).__name__} ({parameters:,} parameters); "
            f"{len(state)} tensors loaded from {path}"
        )
    return module


def _load_into(
    module: nn.Module, state: Mapping[str, Any], source: CheckpointSource, spec: ModelSpec | None
) -> None:
    """Loads `state` into `module`; raises UserSourceError naming every missing or unexpected
    key, or the shape that does not fit."""
    model_name = _model_name(spec)
    field = f"build.source.checkpoint {str(resolve_path(source.checkpoint))!r}"
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches raise even with strict=False
        raise UserSourceError(
            model_name,
            STAGE_LOAD,
            f"{field} does not fit the module of {source.factory!r}: {error}",
        ) from None
    problems = []
    if result.missing_keys:
        problems.append(
            f"missing key(s) the module has: {_listed(list(result.missing_keys))}"
        )
    if result.unexpected_keys:
        problems.append(
            f"unexpected key(s) the module lacks: {_listed(list(result.unexpected_keys))}"
        )
    if problems:
        hint = ""
        if isinstance(state.get("state_dict"), Mapping):
            hint = " (it holds a 'state_dict' entry: save that mapping itself)"
        raise UserSourceError(
            model_name,
            STAGE_LOAD,
            f"{field} does not match the module of {source.factory!r}{hint}: " + "; ".join(problems),
        )


def save_checkpoint(model: nn.Module, path: Path) -> Path:
    """Saves the model's weights (state_dict) to `path`, atomically."""
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


# --- OnnxFileSource ----------------------------------------------------------------------------


def exports_onnx(source: CheckpointSource | OnnxFileSource) -> bool:
    """Whether the pipeline takes `source`'s ONNX through `export_onnx` (an OnnxFileSource) rather
    than `train` + the PyTorch export (a CheckpointSource): this one module serves both kinds, so
    the module having `export_onnx` does not decide it."""
    return isinstance(source, OnnxFileSource)


def export_onnx(source: OnnxFileSource, dest: Path, spec: ModelSpec | None = None) -> Path:
    """Checks the user's ONNX file against the spec and copies it to `dest`, atomically.

    Args:
        source: The ONNX file.
        dest: The build's `<variant>.onnx`.
        spec: The model: tensor names, dtypes, dims and `build.opset` to verify.

    Returns:
        `dest`.

    Raises:
        UserSourceError: no spec was given, the file is missing, keeps its weights in external
            data files, or `onnx.checker` rejects it.
        ExportError: the graph's signature differs from the spec (naming the tensor).
    """
    if spec is None:
        raise UserSourceError(
            None, STAGE_EXPORT, "export_onnx needs the model's spec (spec=...) to verify the graph"
        )
    if not isinstance(source, OnnxFileSource):
        raise UserSourceError(
            spec.name,
            STAGE_EXPORT,
            f"export_onnx takes an OnnxFileSource, got a {type(source).__name__}: a checkpoint is "
            "loaded by train() and exported from PyTorch (see exports_onnx)",
        )
    path = resolve_path(source.path)
    field = f"build.source.path {str(path)!r}"
    if not path.is_file():
        raise UserSourceError(spec.name, STAGE_EXPORT, f"{field} does not exist")
    try:
        graph = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise UserSourceError(
            spec.name, STAGE_EXPORT, f"{field} is not an ONNX model ({type(error).__name__}: {error})"
        ) from None
    external = [t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise UserSourceError(
            spec.name,
            STAGE_EXPORT,
            f"{field} keeps weights in external data files ({_listed(external)}), which kiln does "
            "not copy; save the model as one file",
        )
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        raise UserSourceError(
            spec.name, STAGE_EXPORT, f"{field}: onnx.checker rejected it: {error}"
        ) from None
    verify_signature(graph, spec)
    with atomic_path(Path(dest)) as tmp:
        shutil.copyfile(path, tmp)
    return Path(dest)


# --- held-out data and the metric -----------------------------------------------------------


top1_agreement = gates.top1_agreement
cosine_similarity = gates.cosine_per_item


def agreement_metric(
    spec: ModelSpec,
) -> tuple[str, Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], float]]:
    """The metric's name and `score(outputs, reference)` for `spec`'s outputs: each output scored
    by the metric of its kind (`kiln.build.gates`: declared in `build.outputs`, else inferred by
    its stated rule), the lowest over the outputs."""
    name, score = gates.agreement(spec)
    return name, score  # type: ignore[return-value]


def reference_outputs(source: CheckpointSource | OnnxFileSource, spec: ModelSpec | None = None) -> (
    dict[str, np.ndarray] | None
):
    """The FP32 outputs the user gave with an OnnxFileSource (`source.reference`, an .npz with
    one array per spec output on the evaluation items), checked against the spec and the held-out
    item count; None when none was given.

    Raises:
        UserSourceError: the file is missing, unreadable, or does not match the spec's outputs.
    """
    path_text = getattr(source, "reference", None)
    if path_text is None:
        return None
    if spec is None:
        raise UserSourceError(None, STAGE_HELD_OUT, "reference_outputs needs the model's spec (spec=...)")
    where = f"build.source.reference {str(resolve_path(path_text))!r}"
    path = resolve_path(path_text)
    if not path.is_file():
        raise UserSourceError(spec.name, STAGE_HELD_OUT, f"{where} does not exist")
    with np.load(path, allow_pickle=False) as data:
        arrays = {key: np.asarray(data[key]) for key in data.files}
    items = {key: len(array) for key, array in arrays.items()}
    names = [t.name for t in spec.outputs]
    problems = [f"{where}: no array {name!r} (the spec's output)" for name in names if name not in arrays]
    problems += [f"{where}: array {key!r} is not an output of the spec" for key in arrays if key not in names]
    if len(set(items.values())) > 1:
        problems.append(f"{where}: the arrays hold different numbers of items: {items}")
    if problems:
        raise UserSourceError(spec.name, STAGE_HELD_OUT, "; ".join(problems))
    return {t.name: arrays[t.name] for t in spec.outputs}


def _expected_shape(tensor: TensorSpec) -> str:
    return "[items, " + ", ".join("any" if d == -1 else str(d) for d in tensor.dims) + "]"


def _check_array(where: str, key: str, array: np.ndarray, tensor: TensorSpec) -> list[str]:
    problems = []
    if tensor.dtype == "BYTES" or f"TYPE_{tensor.dtype}" not in TRITON_TYPES:
        return [f"input '{tensor.name}' has dtype {tensor.dtype}, which held-out .npz files cannot hold"]
    want = np.dtype(TRITON_TYPES[f"TYPE_{tensor.dtype}"])
    if array.dtype != want:
        problems.append(
            f"array '{key}' in {where} has dtype {array.dtype}, the spec's input '{tensor.name}' "
            f"needs {want} ({tensor.dtype})"
        )
    shape = array.shape
    fits = (
        len(shape) == len(tensor.dims) + 1
        and shape[0] >= 1
        and all(d == -1 or have == d for have, d in zip(shape[1:], tensor.dims, strict=False))
        and all(have >= 1 for have in shape[1:])
    )
    if not fits:
        problems.append(
            f"array '{key}' in {where} has shape {list(shape)}, the spec's input '{tensor.name}' "
            f"needs {_expected_shape(tensor)} (dims {list(tensor.dims)}, at least 1 item)"
        )
    return problems


def _read_npz(spec: ModelSpec, path: Path, where: str) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path`, read without pickles; UserSourceError if it cannot be."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UserSourceError(
            spec.name,
            STAGE_HELD_OUT,
            f"{where} cannot be read as an .npz ({type(error).__name__}: {error})",
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise UserSourceError(
            spec.name, STAGE_HELD_OUT, f"{where} holds one array (.npy), not an .npz archive"
        )
    try:
        return {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:  # e.g. an object array (pickles)
        raise UserSourceError(
            spec.name,
            STAGE_HELD_OUT,
            f"{where} cannot be read without pickles ({type(error).__name__}: {error})",
        ) from None
    finally:
        data.close()


def _held_out_problems(
    where: str,
    spec: ModelSpec,
    arrays: Mapping[str, np.ndarray],
    evaluation: Mapping[str, str],
    calibration: Mapping[str, str],
    needs_calibration: bool,
    has_calibration: bool,
) -> list[str]:
    """Everything wrong with the held-out arrays: missing or unexpected arrays, each array's dtype
    and dims, and item counts that differ within the evaluation or the calibration arrays."""
    problems: list[str] = []
    expected = list(evaluation.values()) + (
        list(calibration.values()) if needs_calibration or has_calibration else []
    )
    missing = [key for key in expected if key not in arrays]
    if missing:
        why = " (the spec asks for an int8 variant)" if needs_calibration else ""
        problems.append(
            f"{where} lacks array(s) {_listed(missing)}{why}; it has: {_listed(sorted(arrays)) or 'none'}"
        )
    unexpected = sorted(set(arrays) - set(evaluation.values()) - set(calibration.values()))
    if unexpected:
        problems.append(
            f"{where} has array(s) {_listed(unexpected)} the spec does not name; expected: "
            f"{_listed(list(evaluation.values()) + list(calibration.values()))}"
        )
    for tensor in spec.inputs:
        for key in (evaluation[tensor.name], calibration[tensor.name]):
            if key in arrays:
                problems += _check_array(where, key, arrays[key], tensor)
    for role, keys in (("evaluation", evaluation), ("calibration", calibration)):
        counts = {key: arrays[key].shape[0] for key in keys.values() if key in arrays and arrays[key].ndim}
        if len(set(counts.values())) > 1:
            problems.append(
                f"{where}: the {role} arrays hold different numbers of items: "
                + ", ".join(f"'{k}' {n}" for k, n in counts.items())
            )
    return problems


def held_out(source: CheckpointSource | OnnxFileSource, spec: ModelSpec | None = None) -> HeldOut:
    """The held-out .npz of `source`, validated against `spec`, and the agreement metric.

    Args:
        source: Names the .npz (`held_out`).
        spec: The model: input names, dtypes and dims; whether an int8 variant needs
            calibration arrays.

    Returns:
        Evaluation and calibration inputs in the order of `spec.inputs` (calibration is empty
        when the file has none and no int8 variant is asked for), scored by agreement with FP32.

    Raises:
        UserSourceError: no spec was given, or the file is missing, not an .npz, lacks an array,
            has arrays the spec does not name, or an array's dtype or dims differ from the
            spec's (each named, with what was expected and what was given).
    """
    if spec is None:
        raise UserSourceError(
            None, STAGE_HELD_OUT, "held_out needs the model's spec (spec=...) to read the .npz"
        )
    path = resolve_path(source.held_out)
    where = f"build.source.held_out {str(path)!r}"
    if not path.is_file():
        raise UserSourceError(spec.name, STAGE_HELD_OUT, f"{where} does not exist")
    needs_calibration = spec.build is not None and any(
        v.precision == INT8 for v in spec.build.variants
    )
    arrays = _read_npz(spec, path, where)
    evaluation = {t.name: t.name for t in spec.inputs}
    calibration = {t.name: f"{CALIBRATION_PREFIX}{t.name}" for t in spec.inputs}
    has_calibration = any(key in arrays for key in calibration.values())
    problems = _held_out_problems(
        where, spec, arrays, evaluation, calibration, needs_calibration, has_calibration
    )
    if problems:
        raise UserSourceError(spec.name, STAGE_HELD_OUT, "; ".join(problems))

    metric, score = agreement_metric(spec)
    use_calibration = needs_calibration or has_calibration
    return HeldOut(
        inputs=tuple(np.ascontiguousarray(arrays[evaluation[t.name]]) for t in spec.inputs),
        calibration=tuple(np.ascontiguousarray(arrays[calibration[t.name]]) for t in spec.inputs)
        if use_calibration
        else (),
        metric=metric,
        score=score,
        against_fp32=True,
    )
