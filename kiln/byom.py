"""Bring your own model: an ONNX file or a PyTorch module to a model folder, in one call.

`add_onnx(name, "model.onnx", samples, dest_dir=...)` and `add_module(name, module_or_factory,
samples, dest_dir=...)` (or `kiln add`) write `dest_dir/<name>/`:

    spec.py        a commented `ModelSpec` whose `BuildSpec.source` is an `OnnxFileSource` or a
                   `CheckpointSource` naming the files beside it (paths computed from the spec's
                   own `__file__`, so the folder works wherever it lies)
    model.onnx     the ONNX file, copied                              (add_onnx)
    checkpoint.pt  the module's state_dict                            (add_module)
    factory.py     rebuilds a module instance's class for the build   (add_module with an instance)
    held_out.npz   the samples: evaluation arrays named after the inputs, INT8 calibration arrays
                   named "calibration/<input>" (`kiln.build.user_source`'s layout)
    README.md      what was inferred, how to build, serve and load-test it

The signature comes from the ONNX graph (`infer_signature`): the inputs (initializers left out)
and outputs, their dtypes as Triton names and their dims, a symbolic or unknown dim as -1. The
first axis is the batch axis when it is symbolic in every input and output: the spec gets
`max_batch_size` (default 8) and the per-item dims are the rest. Otherwise (the graph fixes its
batch dim, e.g. at 1) the model is served without a batch dim: `max_batch_size` 0 and the dims
include the first axis. A PyTorch module is exported to ONNX in a temporary folder the way
`kiln build` exports it (`kiln.build.export`, symbolic batch axis) and read the same way.

Inputs with a -1 per-item dim get a warmup request whose dims (`Warmup.dims`) are the samples'
shape, and the summary prints the `perf_analyzer --shape` arguments they need. Each output's kind
(which decides how a variant is measured against FP32) is written into `BuildSpec.outputs` by
`kiln.build.gates.infer_kind`'s rule, with the rule as a comment: edit it where it guessed wrong.

Some choices are the user's to declare (`kiln add` flags in parentheses): an output's kind
instead of the inferred one (`output_kinds`, --kind output0=detections), the per-item dims of an
input the graph leaves symbolic (`input_dims`, --dims images=3,320,320: the folder's model.onnx
then declares them), the INT8 settings (`int8`, --int8 FIELD=VALUE: any `kiln.spec.Int8Options`
field, node-name patterns expanded against the graph) and optional variants (`variants_from`,
--optional int8).

Before anything is moved into place the written spec is imported, validated (`kiln.spec.validate`),
and its held-out file and ONNX graph are read back the way the build reads them, so a folder that
`add_*` returns builds with `kiln build --model <name>` (with `KILN_MODELS=<dest_dir>` when
`dest_dir` is not the project's `models/`).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib
import importlib.util
import inspect
import json
import keyword
import shutil
import tempfile
import textwrap
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kiln import paths
from kiln.spec import (
    OUTPUT_KINDS,
    Int8Options,
    ModelSpec,
    OnnxFileSource,
    SpecError,
    TensorSpec,
    Variant,
    Warmup,
    served_name,
    validate,
)

DEFAULT_MAX_BATCH_SIZE = 8
"""`max_batch_size` of a model whose graph has a symbolic batch axis, unless one is given."""
DEFAULT_VARIANTS: tuple[Variant, ...] = (Variant("fp32"), Variant("int8", max_metric_drop=0.05))
"""FP32 (the reference) and INT8, which may lose 5% agreement with FP32 (or 5% of a regression
output's range)."""
DEFAULT_BUDGETS = {"fp32": 0.0, "fp16": 0.01, "int8": 0.05}
"""`max_metric_drop` of a variant given by its precision alone."""
DEFAULT_OPSET = 17
"""Opset of a PyTorch module's export (`BuildSpec.opset`'s default)."""
OPSETS = (13, 21)
"""The opsets `kiln.spec.validate` accepts."""
MAX_QUEUE_DELAY_US = 200
"""The scaffolded dynamic batcher's queue delay."""
SPLIT_SEED = 0
"""Seeds the split of the samples into evaluation and calibration items."""

SPEC_FILE = "spec.py"
ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
FACTORY_FILE = "factory.py"
FACTORY_FUNCTION = "make_model"
HELD_OUT_FILE = "held_out.npz"
README_FILE = "README.md"
WRITTEN_FILES = (SPEC_FILE, ONNX_FILE, CHECKPOINT_FILE, FACTORY_FILE, HELD_OUT_FILE, README_FILE)
"""Every file `add_*` may write: with `force`, these are replaced (or removed when this scaffold
does not use them); any other file of the folder is left alone."""
CALIBRATION_PREFIX = "calibration/"
"""`kiln.build.user_source`'s name prefix of the calibration arrays."""

_FROM_ONNX = {
    onnx.TensorProto.BOOL: "BOOL",
    onnx.TensorProto.UINT8: "UINT8",
    onnx.TensorProto.INT8: "INT8",
    onnx.TensorProto.INT16: "INT16",
    onnx.TensorProto.INT32: "INT32",
    onnx.TensorProto.INT64: "INT64",
    onnx.TensorProto.FLOAT16: "FP16",
    onnx.TensorProto.FLOAT: "FP32",
    onnx.TensorProto.DOUBLE: "FP64",
}
"""ONNX element types -> kiln's Triton dtype names (the types `kiln_onnx` serves)."""
_NUMPY = {
    "BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
    "INT64": np.int64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
}
"""kiln dtype names -> numpy dtypes (as `kiln.serving.onnx.TRITON_TYPES`)."""


class ByomError(ValueError):
    """A model, its samples or the destination cannot be scaffolded; the message says what and
    how to fix it."""


# --- signature -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signature:
    """What `infer_signature` read from an ONNX graph.

    Attributes:
        inputs: Graph inputs (initializers left out) with kiln dtypes; dims per item when
            `max_batch_size` > 0, else the full dims; -1 for a symbolic or unknown dim.
        outputs: Graph outputs, likewise.
        max_batch_size: The given maximum when the first axis is a batch axis, else 0.
        opset: The graph's default-domain opset.
        batching: One sentence saying how the batch axis was decided.
        nodes: (name, operator type) of every node of the graph, in its order: what INT8
            settings may name (`Int8Options.nodes_to_exclude`, `exclude_op_types`, ...).
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    opset: int
    batching: str
    nodes: tuple[tuple[str, str], ...] = ()

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


def _load_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise ByomError(f"ONNX file {str(path)!r} does not exist")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ByomError(f"{str(path)!r} is not an ONNX model ({type(error).__name__}: {error})") from None
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise ByomError(
            f"{str(path)!r} keeps weights in external data files ({', '.join(external[:5])}...), which "
            "kiln does not copy; save the model as one file (onnx.save(model, path, "
            "save_as_external_data=False))"
        )
    return model


def _graph_tensors(
    values: Sequence[onnx.ValueInfoProto], role: str, problems: list[str]
) -> list[tuple[str, str, list[int]]]:
    """(name, kiln dtype, dims with -1 for symbolic or unknown) of each graph input or output."""
    tensors = []
    for value in values:
        kind = value.type.WhichOneof("value")
        if kind != "tensor_type":
            problems.append(f"{role} {value.name!r} is a {kind or 'value of no type'}, not a tensor")
            continue
        tensor = value.type.tensor_type
        dtype = _FROM_ONNX.get(tensor.elem_type)
        if dtype is None:
            name = onnx.TensorProto.DataType.Name(tensor.elem_type)
            problems.append(
                f"{role} {value.name!r} is {name}, which kiln_onnx does not serve "
                f"(allowed: {', '.join(onnx.TensorProto.DataType.Name(t) for t in _FROM_ONNX)})"
            )
            continue
        if not tensor.HasField("shape"):
            problems.append(
                f"{role} {value.name!r} declares no shape in the graph; re-export it with shapes "
                "(or run onnx.shape_inference.infer_shapes and set the graph's outputs)"
            )
            continue
        dims = []
        for d in tensor.shape.dim:
            if d.HasField("dim_value") and d.dim_value > 0:
                dims.append(int(d.dim_value))
            elif d.HasField("dim_value"):
                problems.append(f"{role} {value.name!r} has a dim of size {d.dim_value}")
            else:
                dims.append(-1)  # a dim_param (symbolic) or no size at all (unknown)
        if not dims:
            problems.append(
                f"{role} {value.name!r} is a scalar (no dims); kiln serves tensors with dims: "
                "make it [batch, 1] or [1]"
            )
            continue
        tensors.append((value.name, dtype, dims))
    return tensors


def infer_signature(
    model: onnx.ModelProto | Path | str, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
) -> Signature:
    """The inputs, outputs, batching and opset of an ONNX graph, in kiln's terms.

    Args:
        model: The ONNX model or the path of its file.
        max_batch_size: The model's largest batch when the first axis is a batch axis (symbolic
            in every input and output); 0 serves it without a batch dim even then.

    Raises:
        ByomError: the file is missing or not ONNX, or a tensor has a type kiln_onnx does not
            serve, no shape, or no dims (every problem listed).
    """
    if not isinstance(model, onnx.ModelProto):
        model = _load_onnx(Path(model))
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ByomError(f"max_batch_size must be an integer >= 0, got {max_batch_size!r}")
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    problems: list[str] = []
    inputs = _graph_tensors([v for v in graph.input if v.name not in initializers], "input", problems)
    outputs = _graph_tensors(list(graph.output), "output", problems)
    if not inputs and not problems:
        problems.append("the graph has no inputs (besides its initializers)")
    if problems:
        raise ByomError("the ONNX graph cannot be served as is: " + "; ".join(problems))
    opsets = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    opset = max(opsets) if opsets else 0

    tensors = [(name, dims) for name, _, dims in (*inputs, *outputs)]
    fixed = [f"{name!r} ({dims[0]})" for name, dims in tensors if dims[0] != -1]
    one_d = [repr(name) for name, dims in tensors if len(dims) == 1]
    if fixed:
        batched = False
        batching = (
            "the graph's first axis is fixed in " + ", ".join(fixed[:4])
            + (" and more" if len(fixed) > 4 else "")
            + ": it is no batch axis, so the model is served without one (max_batch_size 0, the dims "
            "include it, Triton does not batch requests); re-export with a symbolic first axis to "
            "batch"
        )
    elif max_batch_size == 0:
        batched = False
        batching = (
            "the first axis is symbolic in every input and output, but max_batch_size 0 was asked: "
            "served without a batch dim (the dims include the first axis as -1)"
        )
    elif one_d:
        batched = False
        batching = (
            f"the first axis is symbolic in every input and output, but {', '.join(one_d)} "
            "has no other axis (one value per item) and kiln needs per-item dims: served without a "
            "batch dim (max_batch_size 0, the dims include the first axis as -1); make such tensors "
            "[batch, 1] to batch"
        )
    else:
        batched = True
        batching = (
            "the first axis is symbolic in every input and output: it is the batch axis "
            f"(max_batch_size {max_batch_size}, dims are per item)"
        )

    def spec_of(name: str, dtype: str, dims: list[int]) -> TensorSpec:
        return TensorSpec(name, dtype, tuple(dims[1:] if batched else dims))

    return Signature(
        inputs=tuple(spec_of(*t) for t in inputs),
        outputs=tuple(spec_of(*t) for t in outputs),
        max_batch_size=max_batch_size if batched else 0,
        opset=opset,
        batching=batching,
        nodes=tuple((node.name, node.op_type) for node in graph.node),
    )


# --- samples ---------------------------------------------------------------------------------


Samples = Mapping[str, Any] | Path | str
"""Arrays named after the model's inputs (a mapping, or the path of an .npz), items first."""


def _read_arrays(samples: Samples, what: str) -> dict[str, np.ndarray]:
    if isinstance(samples, (str, Path)):
        path = Path(samples).expanduser()
        if not path.is_file():
            raise ByomError(f"{what} {str(path)!r} does not exist")
        try:
            with np.load(path, allow_pickle=False) as data:
                if not isinstance(data, np.lib.npyio.NpzFile):
                    raise ByomError(f"{what} {str(path)!r} holds one array (.npy); give an .npz of "
                                    "arrays named after the model's inputs")
                return {key: data[key] for key in data.files}
        except ByomError:
            raise
        except Exception as error:
            raise ByomError(
                f"{what} {str(path)!r} cannot be read as an .npz without pickles "
                f"({type(error).__name__}: {error})"
            ) from None
    if not isinstance(samples, Mapping):
        raise ByomError(
            f"{what} must be a mapping of input name -> array or the path of an .npz, "
            f"got {type(samples).__name__}"
        )
    arrays = {}
    for key, value in samples.items():
        if hasattr(value, "detach"):  # a torch tensor
            value = value.detach().cpu().numpy()
        arrays[str(key)] = np.asarray(value)
    return arrays


@dataclass(frozen=True)
class _HeldOut:
    evaluation: dict[str, np.ndarray]
    calibration: dict[str, np.ndarray]
    notes: tuple[str, ...]


def _fit(array: np.ndarray, tensor: TensorSpec, batched: bool, key: str, notes: list[str]) -> np.ndarray:
    """`array` as held-out items of `tensor` (dtype cast within its kind, items first)."""
    want = np.dtype(_NUMPY[tensor.dtype])
    if array.dtype != want:
        if array.dtype.kind == "f" and want.kind == "f" or array.dtype.kind in "iu" and want.kind in "iu":
            if want.kind in "iu" and array.size and (
                array.min() < np.iinfo(want).min or array.max() > np.iinfo(want).max
            ):
                raise ByomError(
                    f"array {key!r} holds values outside {want}'s range, the dtype of input "
                    f"{tensor.name!r} ({tensor.dtype})"
                )
            notes.append(f"array {key!r} cast from {array.dtype} to {want} ({tensor.dtype})")
            array = array.astype(want)
        else:
            raise ByomError(
                f"array {key!r} is {array.dtype}, input {tensor.name!r} needs {want} ({tensor.dtype})"
            )
    dims = tuple(tensor.dims)
    expect = "[items, " + ", ".join("any" if d == -1 else str(d) for d in dims) + "]"
    if not batched and array.ndim == len(dims) and dims[0] in (1, -1):
        # Unbatched graph, samples stacked along its first axis: one item per row, each [1, ...].
        notes.append(f"array {key!r}: each of its {array.shape[0]} rows is one request of shape [1, ...]")
        array = array[:, None]
    shape = array.shape
    if (
        len(shape) != len(dims) + 1
        or shape[0] < 1
        or any(d != -1 and have != d for have, d in zip(shape[1:], dims, strict=True))
        or any(have < 1 for have in shape[1:])
    ):
        raise ByomError(
            f"array {key!r} has shape {list(shape)}, input {tensor.name!r} needs {expect} "
            f"(dims {list(dims)}{', per item' if batched else ', the whole request per item'})"
        )
    return np.ascontiguousarray(array)


def _prepare_held_out(
    inputs: Sequence[TensorSpec],
    batched: bool,
    samples: Samples,
    calibration: Samples | None,
    needs_calibration: bool,
) -> _HeldOut:
    """The evaluation and calibration items from the samples (split at random when no
    calibration is given and INT8 needs some)."""
    arrays = _read_arrays(samples, "samples")
    notes: list[str] = []
    names = [t.name for t in inputs]
    inside = {k[len(CALIBRATION_PREFIX):]: v for k, v in arrays.items() if k.startswith(CALIBRATION_PREFIX)}
    arrays = {k: v for k, v in arrays.items() if not k.startswith(CALIBRATION_PREFIX)}
    _check_names(arrays, names, "samples")
    evaluation = {t.name: _fit(arrays[t.name], t, batched, t.name, notes) for t in inputs}
    count = _item_count(evaluation, "samples")
    calibrating: dict[str, np.ndarray] = {}
    if calibration is not None or inside:
        given = _read_arrays(calibration, "calibration") if calibration is not None else inside
        source = "the calibration set" if calibration is not None else "the samples' calibration/ arrays"
        given = {k.removeprefix(CALIBRATION_PREFIX): v for k, v in given.items()}
        _check_names(given, names, source)
        calibrating = {
            t.name: _fit(given[t.name], t, batched, f"{CALIBRATION_PREFIX}{t.name}", notes) for t in inputs
        }
        calibration_count = _item_count(calibrating, source)
        notes.append(
            f"held-out: {count} evaluation items (the samples), {calibration_count} INT8 "
            f"calibration items ({source})"
        )
    elif needs_calibration:
        if count < 2:
            raise ByomError(
                f"the samples hold {count} item(s): INT8 needs calibration items too; give at least 2 "
                "samples (they are split) or a separate calibration set"
            )
        order = np.random.default_rng(SPLIT_SEED).permutation(count)
        cut = count // 2
        calibrating = {k: v[order[:cut]] for k, v in evaluation.items()}
        evaluation = {k: v[order[cut:]] for k, v in evaluation.items()}
        notes.append(
            f"held-out: no calibration set was given, so the {count} samples were split at random "
            f"(seed {SPLIT_SEED}) into {count - cut} evaluation and {cut} INT8 calibration items; give "
            "a separate calibration set (--calibration) to keep every sample for evaluation"
        )
    else:
        notes.append(f"held-out: {count} evaluation items (the samples); no INT8 variant, no calibration")
    return _HeldOut(evaluation, calibrating, tuple(notes))


def _check_names(arrays: Mapping[str, np.ndarray], names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in arrays]
    extra = sorted(set(arrays) - set(names))
    problems = []
    if missing:
        problems.append(f"no array for input(s) {', '.join(map(repr, missing))}")
    if extra:
        problems.append(f"array(s) {', '.join(map(repr, extra))} name no input")
    if problems:
        raise ByomError(
            f"{what}: {'; '.join(problems)} (the model's inputs: {', '.join(map(repr, names))}; "
            f"given: {', '.join(map(repr, arrays)) or 'none'})"
        )


def _item_count(arrays: Mapping[str, np.ndarray], what: str) -> int:
    counts = {k: int(v.shape[0]) for k, v in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ByomError(
            f"{what}: the arrays hold different numbers of items: "
            + ", ".join(f"{k!r} {n}" for k, n in counts.items())
        )
    return next(iter(counts.values()))


def _write_npz(path: Path, held: _HeldOut) -> None:
    arrays = dict(held.evaluation)
    arrays.update({f"{CALIBRATION_PREFIX}{k}": v for k, v in held.calibration.items()})
    with path.open("wb") as f:
        np.savez(f, **arrays)


def warmup_dims(inputs: Sequence[TensorSpec], items: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """`Warmup.dims` for the inputs with a -1 dim: the shape of one held-out item."""
    return {
        t.name: tuple(int(d) for d in items[t.name].shape[1:]) for t in inputs if -1 in t.dims
    }


def perf_analyzer_shapes(dims: Mapping[str, Sequence[int]]) -> list[str]:
    """perf_analyzer's `--shape NAME:D1,D2` arguments for inputs of variable dims."""
    return [f"--shape {name}:{','.join(str(d) for d in shape)}" for name, shape in dims.items()]


# --- declared choices: output kinds, input dims, INT8 settings, optional variants -------------


def variants_from(precisions: Sequence[str], optional: Sequence[str] = ()) -> tuple[Variant, ...]:
    """Variants from their precisions ("fp32", "fp16", "int8", each with its `DEFAULT_BUDGETS`
    budget), those in `optional` marked `Variant(optional=True)`: its gates' refusal is reported
    and it is not published, while the others are (what `kiln add --variants ... --optional ...`
    writes).

    Raises:
        ByomError: an unknown precision, or an optional one that is not among the variants (or is
            fp32, the reference every variant is measured against).
    """
    unknown = [p for p in (*precisions, *optional) if p not in DEFAULT_BUDGETS]
    if unknown:
        raise ByomError(
            f"variants: {', '.join(map(repr, unknown))} is no precision (one of {', '.join(DEFAULT_BUDGETS)})"
        )
    stray = [p for p in optional if p not in precisions]
    if stray:
        raise ByomError(
            f"optional variant(s) {', '.join(map(repr, stray))} are not among the variants "
            f"({', '.join(precisions) or 'none'})"
        )
    if "fp32" in optional:
        raise ByomError(
            "fp32 cannot be optional: it is the reference every other variant is measured against"
        )
    return tuple(
        Variant(p, max_metric_drop=DEFAULT_BUDGETS[p], optional=p in optional) for p in precisions
    )


@dataclass(frozen=True)
class _Kind:
    """An output's kind, and why (the reason comment of the spec, the summary and the README)."""

    kind: str
    reason: str
    declared: bool


def _output_kinds(signature: Signature, declared: Mapping[str, str] | None) -> dict[str, _Kind]:
    """Each output's kind: the declared one (`output_kinds`, `kiln add --kind`), else
    `kiln.build.gates.infer_kind`'s rule.

    Raises:
        ByomError: a declared name is no output, a kind is not one of OUTPUT_KINDS, or a
            detections output lacks the two per-item dims [4 + classes, candidates].
    """
    from kiln.build import gates

    declared = dict(declared or {})
    outputs = {t.name: t for t in signature.outputs}
    problems = []
    for name, kind in declared.items():
        tensor = outputs.get(name)
        if tensor is None:
            problems.append(f"{name!r} is no output (the outputs: {', '.join(map(repr, outputs))})")
        elif kind not in OUTPUT_KINDS:
            problems.append(f"output {name!r}: {kind!r} is no kind (one of {', '.join(OUTPUT_KINDS)})")
        elif kind == "detections" and len(tensor.dims) != 2:
            problems.append(
                f"output {name!r} is {_dims_text(tensor, signature.batched)}: a detections output holds "
                "two per-item dims, [4 + classes, candidates] or [candidates, 4 + classes]"
            )
    if problems:
        raise ByomError("output kinds: " + "; ".join(problems))
    kinds = {}
    for tensor in signature.outputs:
        inferred = gates.infer_kind(tensor)
        if tensor.name in declared:
            kind = declared[tensor.name]
            reason = "declared" + ("" if kind == inferred else f"; the rule would say {inferred}")
            kinds[tensor.name] = _Kind(kind, reason, True)
        else:
            kinds[tensor.name] = _Kind(inferred, _kind_reason(tensor, inferred), False)
    return kinds


def _fix_input_dims(
    model: onnx.ModelProto, signature: Signature, input_dims: Mapping[str, Sequence[int]]
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` whose inputs named in `input_dims` declare those dims (per item when the
    graph has a batch axis, which stays symbolic), and what was done.

    Raises:
        ByomError: a name is no input, the dims are not sizes >= 1, their count differs from the
            input's, or they contradict a size the graph fixes; or the graph does not accept them
            (onnx.checker's shape inference).
    """
    inputs = {t.name: t for t in signature.inputs}
    per_item = "per-item " if signature.batched else ""
    problems = []
    fixed: dict[str, tuple[int, ...]] = {}
    for name, dims in input_dims.items():
        tensor = inputs.get(name)
        if tensor is None:
            problems.append(f"{name!r} is no input (the inputs: {', '.join(map(repr, inputs))})")
            continue
        dims = tuple(dims)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            problems.append(f"input {name!r}: dims must be sizes >= 1, got {list(dims)}")
            continue
        have = list(tensor.dims)
        if len(dims) != len(have):
            problems.append(
                f"input {name!r} has {len(have)} {per_item}dims ({_dims_text(tensor, signature.batched)}), "
                f"got {len(dims)}: {list(dims)}"
            )
            continue
        clash = [
            f"dim {i} is {h} in the graph, not {d}"
            for i, (h, d) in enumerate(zip(have, dims, strict=True))
            if h not in (-1, d)
        ]
        if clash:
            problems.append(f"input {name!r}: " + ", ".join(clash))
            continue
        fixed[name] = dims
    if problems:
        raise ByomError("input dims: " + "; ".join(problems))
    model = copy.deepcopy(model)
    offset = 1 if signature.batched else 0
    notes = []
    for value in model.graph.input:
        dims = fixed.get(value.name)
        if dims is None:
            continue
        shape = value.type.tensor_type.shape.dim
        for i, size in enumerate(dims):
            shape[i + offset].Clear()
            shape[i + offset].dim_value = size
        before = _dims_text(inputs[value.name], signature.batched)
        notes.append(
            f"input {value.name!r}: {per_item}dims fixed to {list(dims)} (the graph's are {before}); "
            f"{ONNX_FILE} declares them, so the server refuses a request of any other shape"
        )
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:
        raise ByomError(f"input dims {dict(fixed)}: the graph does not accept them ({error})") from None
    return model, notes


INT8_FIELDS = {f.name: f for f in dataclasses.fields(Int8Options)}
"""`Int8Options`' fields, by name: what `int8` / `kiln add --int8 FIELD=VALUE` may set."""
_INT8_NAMES = ("op_types_to_quantize", "exclude_op_types", "nodes_to_exclude")
_INT8_FLAGS = ("per_channel", "reduce_range")
_GLOB = set("*?[")


def _int8_value(field: str, value: Any) -> Any:
    """One `Int8Options` field's value from a mapping (text from the command line, or Python)."""
    if field in _INT8_NAMES:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        return tuple(str(v) for v in value if str(v))
    if field in _INT8_FLAGS:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "1"):
            return True
        if text in ("false", "no", "0"):
            return False
        raise ByomError(f"int8 setting {field!r} must be true or false, got {value!r}")
    if field == "batch_size":
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ByomError(f"int8 setting 'batch_size' must be an integer, got {value!r}") from None
    return str(value)


def _int8_values(int8: Int8Options | Mapping[str, Any]) -> dict[str, Any]:
    """Every `Int8Options` field's value from `int8` (options or a mapping), None where not given."""
    if isinstance(int8, Int8Options):
        return {name: getattr(int8, name) for name in INT8_FIELDS}
    if isinstance(int8, Mapping):
        unknown = [k for k in int8 if k not in INT8_FIELDS]
        if unknown:
            raise ByomError(
                f"int8 settings: {', '.join(map(repr, unknown))} is no field of kiln.spec.Int8Options "
                f"({', '.join(INT8_FIELDS)})"
            )
        values = {name: None for name in INT8_FIELDS}
        values.update({k: None if v is None else _int8_value(k, v) for k, v in int8.items()})
        return values
    raise ByomError(
        f"int8 must be a kiln.spec.Int8Options or a mapping of its fields, got {type(int8).__name__}"
    )


def _int8_options(
    int8: Int8Options | Mapping[str, Any] | None, signature: Signature, variants: Sequence[Variant]
) -> tuple[Int8Options | None, list[str]]:
    """The spec's `BuildSpec.int8` from `int8` (an `Int8Options`, or a mapping of its field names
    to values: names as a tuple or comma-separated text), and what was decided. A
    `nodes_to_exclude` entry holding * ? or [ is a pattern (fnmatch) over the graph's node names,
    replaced by the names it matches; plain names and operator types must be the graph's.

    Raises:
        ByomError: no int8 variant is asked for, an unknown field or a value of the wrong kind, a
            pattern that matches nothing, a node or operator type the graph lacks.
    """
    if int8 is None:
        return None, []
    if not any(v.precision == "int8" for v in variants):
        raise ByomError(
            "INT8 settings were given, but no int8 variant is asked for (add int8 to the variants)"
        )
    values = _int8_values(int8)
    names = [name for name, _ in signature.nodes]
    types = sorted({op for _, op in signature.nodes})
    problems, notes = [], []
    excluded = values.get("nodes_to_exclude")
    if excluded:
        expanded: list[str] = []
        for entry in excluded:
            if _GLOB & set(entry):
                matched = [n for n in names if fnmatch.fnmatchcase(n, entry)]
                if not matched:
                    problems.append(f"nodes_to_exclude pattern {entry!r} matches no node of the graph")
                    continue
                notes.append(
                    f"int8: nodes_to_exclude {entry!r} matched {len(matched)} node(s) of the graph "
                    f"({matched[0]} ... {matched[-1]}), kept in FP32"
                )
                expanded += matched
            elif entry in names:
                expanded.append(entry)
            else:
                problems.append(
                    f"nodes_to_exclude: the graph has no node {entry!r} (its first nodes: "
                    f"{', '.join(names[:3])}; a pattern such as '/head/*' matches many)"
                )
        values["nodes_to_exclude"] = tuple(dict.fromkeys(expanded))
    for field in ("op_types_to_quantize", "exclude_op_types"):
        missing = [op for op in values.get(field) or () if op not in types]
        if missing:
            problems.append(
                f"{field}: the graph has no {', '.join(map(repr, missing))} node (its operator types: "
                f"{', '.join(types)})"
            )
    if problems:
        raise ByomError("int8 settings: " + "; ".join(problems))
    options = Int8Options(**values)
    given = [f"{k}={_int8_short(v)}" for k, v in values.items() if v is not None]
    notes.insert(0, "int8 settings (BuildSpec.int8): " + (", ".join(given) or "the defaults"))
    return options, notes


def _int8_short(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(value[:3]) + (f", ... {len(value)} in all" if len(value) > 3 else "") + ")"
    return repr(value)


# --- the folder ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scaffold:
    """A model folder `add_onnx`/`add_module` wrote.

    Attributes:
        name: The model (and folder) name.
        folder: `dest_dir/<name>`.
        files: The files written into it.
        spec: The `ModelSpec` its spec.py defines (imported back and validated).
        spec_text: spec.py's text, for review.
        summary: What was inferred and decided, and what to run next (what `kiln add` prints).
    """

    name: str
    folder: Path
    files: tuple[str, ...]
    spec: ModelSpec
    spec_text: str
    summary: str

    def __str__(self) -> str:
        return self.summary


def _variants(variants: Sequence[Variant | str]) -> tuple[Variant, ...]:
    result = []
    for v in variants:
        if isinstance(v, Variant):
            result.append(v)
        elif isinstance(v, str) and v in DEFAULT_BUDGETS:
            result.append(Variant(v, max_metric_drop=DEFAULT_BUDGETS[v]))
        else:
            raise ByomError(
                "variants: each must be a kiln.spec.Variant or one of "
                f"{', '.join(DEFAULT_BUDGETS)}, got {v!r}"
            )
    if not result or result[0].precision != "fp32":
        raise ByomError(
            "variants must start with fp32 (the reference the others are measured against), got "
            + (", ".join(v.precision for v in result) or "none")
        )
    return tuple(result)


def _check_destination(name: str, dest_dir: Path | str, force: bool) -> Path:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or not name.isascii():
        raise ByomError(
            f"model name {name!r} must be a Python identifier (letters, digits, _; not a keyword): "
            "the folder imports as kiln.models.<name>"
        )
    dest = Path(dest_dir).expanduser().resolve()
    if dest.exists() and not dest.is_dir():
        raise ByomError(f"destination {str(dest)!r} is a file, not a folder")
    folder = dest / name
    if folder.exists() and not force:
        raise ByomError(
            f"{str(folder)!r} already exists; pass force=True (kiln add --force) to overwrite the files "
            f"kiln add writes there ({', '.join(WRITTEN_FILES)})"
        )
    for root in paths.models_dirs():
        other = root / name
        if root.resolve() != dest and other.is_dir():
            raise ByomError(
                f"a model folder named {name!r} already exists at {str(other)!r} (a folder's name is "
                "its package, kiln.models.<name>); choose another name"
            )
    return folder


def _kind_reason(tensor: TensorSpec, kind: str) -> str:
    """Which part of `kiln.build.gates.INFERENCE_RULE` gave `tensor` its kind."""
    if kind == "class_scores":
        return f"1-D, {tensor.dims[0]} values, the name says logits/scores/class/prob"
    if kind == "embedding":
        return "the name says embed/hidden/feature/pool"
    return "no class-score or embedding rule matched"


def _py(value: Any) -> str:
    """`value` as Python source, strings in double quotes (the project's style)."""
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _int8_text(options: Int8Options, notes: Sequence[str]) -> list[str]:
    """The `int8=Int8Options(...)` lines of spec.py (the fields given; long name lists packed)."""
    lines = ["        # INT8 quantization settings (kiln.spec.Int8Options), given to kiln add."]
    for note in notes[1:]:
        lines += [f"        # {line}" for line in textwrap.wrap(note.removeprefix("int8: "), 88)]
    lines.append("        int8=Int8Options(")
    for field in INT8_FIELDS:
        value = getattr(options, field)
        if value is None:
            continue
        if isinstance(value, tuple) and len(value) > 3:
            lines.append(f"            {field}=(")
            row = ""
            for item in value:
                piece = f"{_py(item)}, "
                if row and len(row) + len(piece) > 84:
                    lines.append("                " + row.rstrip())
                    row = ""
                row += piece
            lines += ["                " + row.rstrip(), "            ),"]
        else:
            lines.append(f"            {field}={_py(value)},")
    lines.append("        ),")
    return lines


def _dims_text(tensor: TensorSpec, batched: bool) -> str:
    dims = ["batch"] if batched else []
    dims += ["?" if d == -1 else str(d) for d in tensor.dims]
    return f"{tensor.dtype} [{', '.join(dims)}]"


def _spec_text(
    *,
    name: str,
    description: str,
    origin: str,
    signature: Signature,
    source: str,
    variants: Sequence[Variant],
    warmup: Warmup,
    held: _HeldOut,
    kinds: Mapping[str, _Kind],
    int8: Int8Options | None = None,
    int8_notes: Sequence[str] = (),
) -> str:
    """spec.py: a commented ModelSpec."""
    lines = _spec_preamble(
        name=name, description=description, origin=origin, source=source, variants=variants,
        batched=signature.batched, int8=int8 is not None,
    )
    lines += _spec_serving_text(signature)
    lines += _warmup_text(warmup)
    lines += _build_text(
        signature=signature, source=source, variants=variants, held=held, kinds=kinds, int8=int8,
        int8_notes=int8_notes,
    )
    lines += [")", ""]
    return "\n".join(lines)


def _spec_preamble(
    *, name: str, description: str, origin: str, source: str, variants: Sequence[Variant], batched: bool,
    int8: bool,
) -> list[str]:
    """spec.py's docstring, imports and `HERE`, up to the ModelSpec's name, description and backend."""
    read_from = "the ONNX graph" if source.startswith("OnnxFileSource") else "its ONNX export"
    served = ", ".join(served_name(name, v.precision) for v in variants if v.serve)
    return [
        f'"""{name}: {description}',
        "",
        f"Scaffolded by `kiln add` from {origin}: the tensors were read from {read_from},",
        f"the held-out data ({HELD_OUT_FILE}) is the samples given to `kiln add`. Review it, then",
        "",
        f"    kiln generate              # writes the config.pbtxt of {served}",
        f"    kiln build --model {name}",
        "",
        "(with KILN_MODELS=<the folder holding this one> when that is not the project's models/).",
        '"""',
        "",
        "from pathlib import Path",
        "",
        "from kiln.spec import (",
        "    BuildSpec,",
        *(["    CheckpointSource,"] if source.startswith("CheckpointSource") else []),
        *(["    DynamicBatching,"] if batched else []),
        "    InstanceGroup,",
        *(["    Int8Options,"] if int8 else []),
        "    ModelSpec,",
        *(["    OnnxFileSource,"] if source.startswith("OnnxFileSource") else []),
        "    OutputCheck,",
        "    TensorSpec,",
        "    Variant,",
        "    Warmup,",
        ")",
        "",
        "HERE = Path(__file__).resolve().parent",
        '"""This folder: the files the build reads lie beside this spec, wherever the folder is."""',
        "",
        "SPEC = ModelSpec(",
        f"    name={_py(name)},",
        f"    description={_py(description)},",
        '    backend="kiln_onnx",',
    ]


def _spec_serving_text(signature: Signature) -> list[str]:
    """The ModelSpec's tensors, batching and instance groups, commented."""
    batched = signature.batched
    lines: list[str] = []
    for role, tensors in (("inputs", signature.inputs), ("outputs", signature.outputs)):
        lines.append(f"    {role}=(")
        for t in tensors:
            lines.append(
                f"        TensorSpec({_py(t.name)}, {_py(t.dtype)}, {_py(tuple(t.dims))}),"
                f"  # {_dims_text(t, batched)}"
            )
        lines.append("    ),")
    if any(-1 in t.dims for t in (*signature.inputs, *signature.outputs)):
        lines.append("    # -1: a dim of any size (symbolic or unknown in the graph).")
    batching = signature.batching[0].upper() + signature.batching[1:] + "."
    lines += [f"    # {line}" for line in textwrap.wrap(batching, 94)]
    lines.append(f"    max_batch_size={signature.max_batch_size},")
    if batched:
        lines += [
            "    # Requests wait up to this long for others to join their batch.",
            f"    dynamic_batching=DynamicBatching(max_queue_delay_us={MAX_QUEUE_DELAY_US}),",
        ]
    lines.append('    instance_groups=(InstanceGroup(kind="CPU", count=1),),')
    return lines


def _warmup_text(warmup: Warmup) -> list[str]:
    """The ModelSpec's `warmup=` lines: one zero-filled request, at the samples' shape if dims vary."""
    if not warmup.dims:
        return [
            "    # One zero-filled request before the model is marked ready.",
            f'    warmup=(Warmup(name={_py(warmup.name)}, batch_size=1, data="zero"),),',
        ]
    shapes = ", ".join(f"{k} {list(v)}" for k, v in warmup.dims.items())
    return [
        "    # One zero-filled request before the model is marked ready; the inputs with a -1 dim",
        f"    # warm up at the samples' shape ({shapes}).",
        "    warmup=(",
        "        Warmup(",
        f'            name={_py(warmup.name)}, batch_size=1, data="zero",',
        f"            dims={_py(dict(warmup.dims))},",
        "        ),",
        "    ),",
    ]


def _build_text(
    *, signature: Signature, source: str, variants: Sequence[Variant], held: _HeldOut,
    kinds: Mapping[str, _Kind], int8: Int8Options | None, int8_notes: Sequence[str],
) -> list[str]:
    """The ModelSpec's `build=BuildSpec(...)` lines: source, opset, variants, INT8 settings, outputs."""
    evaluation = len(next(iter(held.evaluation.values())))
    calibration = len(next(iter(held.calibration.values()))) if held.calibration else 0
    items = f"{evaluation} evaluation" + (f" + {calibration} INT8 calibration" if calibration else "")
    lines = [
        "    build=BuildSpec(",
        f"        # {HELD_OUT_FILE}: {items} items.",
        f"        source={source},",
        f"        opset={signature.opset},",
        "        # No labels: every variant is scored by agreement with the FP32 model's outputs",
        "        # (1.0 for FP32 itself); max_metric_drop is how much of it a variant may lose.",
        "        variants=(",
        *_variants_text(variants),
        "        ),",
    ]
    if any(getattr(v, "optional", False) for v in variants):
        lines += [
            "        # optional=True: a variant its gates refuse is reported (the build log, the table,",
            "        # the manifest's 'refused') and not published, while the others are.",
        ]
    if int8 is not None:
        lines += _int8_text(int8, int8_notes)
    lines += _output_checks_text(signature, kinds)
    lines.append("    ),")
    return lines


def _variants_text(variants: Sequence[Variant]) -> list[str]:
    """One `Variant(...)` line per variant, the arguments that differ from the defaults given."""
    lines: list[str] = []
    for v in variants:
        budget = ""
        if v.precision != "fp32" or v.max_metric_drop:
            budget = f", max_metric_drop={v.max_metric_drop!r}"
        serve = "" if v.serve else ", serve=False"
        optional = ", optional=True" if getattr(v, "optional", False) else ""
        lines.append(f"            Variant({_py(v.precision)}{budget}{serve}{optional}),")
    return lines


def _output_checks_text(signature: Signature, kinds: Mapping[str, _Kind]) -> list[str]:
    """The BuildSpec's `outputs=(...)` lines: each output's kind and why, after the inference rule."""
    from kiln.build import gates

    rule = (
        "What each output means decides how a variant is measured against FP32. Inferred by the rule "
        f"of kiln.build.gates.infer_kind: {gates.INFERENCE_RULE}. Change a kind where it guessed wrong "
        "(one of class_scores, probabilities, regression, embedding, detections)."
    )
    lines = [f"        # {line}" for line in textwrap.wrap(rule, 90)]
    lines.append("        outputs=(")
    for t in signature.outputs:
        kind = kinds[t.name]
        lines.append(f"            # {t.name}: {kind.reason}")
        lines.append(f"            OutputCheck({_py(t.name)}, {_py(kind.kind)}),")
    lines.append("        ),")
    return lines


def _source_text(kind: str, *, factory: str | None = None) -> str:
    indent = " " * 12
    held = f"{indent}held_out=str(HERE / {_py(HELD_OUT_FILE)}),"
    if kind == "onnx":
        return "\n".join(
            ["OnnxFileSource(", f"{indent}path=str(HERE / {_py(ONNX_FILE)}),", held, " " * 8 + ")"]
        )
    return "\n".join([
        "CheckpointSource(",
        f"{indent}factory={_py(factory)},",
        f"{indent}checkpoint=str(HERE / {_py(CHECKPOINT_FILE)}),",
        held,
        " " * 8 + ")",
    ])


def _load_spec(path: Path) -> ModelSpec:
    """Imports a written spec.py under a private name and returns its SPEC."""
    module_name = f"_kiln_add_{uuid.uuid4().hex}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    assert loader_spec is not None and loader_spec.loader is not None
    module = importlib.util.module_from_spec(loader_spec)
    try:
        loader_spec.loader.exec_module(module)
    except Exception as error:  # a bug of ours: say where
        raise ByomError(f"the written {path} does not import: {type(error).__name__}: {error}") from error
    spec = getattr(module, "SPEC", None)
    if not isinstance(spec, ModelSpec):
        raise ByomError(f"the written {path} defines no SPEC")
    return spec


def _check_written(spec: ModelSpec) -> None:
    """Validates the spec and reads its files back the way the build does."""
    from kiln.build import user_source
    from kiln.build.check import BuildError
    from kiln.build.export import verify_signature

    try:
        validate([spec], paths.available_backends() or None)
    except SpecError as error:
        raise ByomError(f"the scaffolded spec is not valid: {error}") from None
    try:
        user_source.held_out(spec.build.source, spec=spec)
        if isinstance(spec.build.source, OnnxFileSource):
            verify_signature(Path(spec.build.source.path), spec)
    except BuildError as error:
        raise ByomError(f"the scaffolded folder does not read back: {error}") from None


def _readme(
    *, name: str, description: str, origin: str, signature: Signature, variants: Sequence[Variant],
    held: _HeldOut, shapes: Sequence[str], files: Sequence[str], notes: Sequence[str],
    dest_in_models: bool, kinds: Mapping[str, _Kind],
) -> str:
    batched = signature.batched
    env = "" if dest_in_models else "KILN_MODELS=<the folder holding this one> "
    lines = [
        f"# {name}",
        "",
        f"{description}",
        "",
        f"Scaffolded by `kiln add` from {origin}. See "
        + ("[Bring your own model](../../docs/byom.md)." if dest_in_models else "kiln's docs/byom.md."),
        "",
        "## Files",
        "",
        *(f"- `{f}`" for f in files),
        "",
        "## Tensors",
        "",
        "| tensor | dtype and dims | output kind |",
        "| --- | --- | --- |",
        *(f"| input `{t.name}` | {_dims_text(t, batched)} | |" for t in signature.inputs),
        *(f"| output `{t.name}` | {_dims_text(t, batched)} | {kinds[t.name].kind} "
          f"({'declared' if kinds[t.name].declared else 'inferred'}) |"
          for t in signature.outputs),
        "",
        f"Batching: {signature.batching}.",
        "",
        "## Build",
        "",
        "Every variant is scored by agreement with the FP32 model on the held-out items "
        f"(`{HELD_OUT_FILE}`): "
        + ", ".join(
            f"{v.precision} (max drop {v.max_metric_drop:g}"
            + (", optional" if getattr(v, "optional", False) else "") + ")"
            for v in variants
        ) + ".",
        "",
        *(f"- {note}" for note in (*held.notes, *notes)),
        "",
        "```bash",
        f"{env}kiln generate                 # writes its config.pbtxt files",
        f"{env}kiln build --model {name}",
        f"{env}kiln serve",
        "```",
        "",
        *_readme_load_test(name, shapes),
    ]
    return "\n".join(lines)


def _readme_load_test(name: str, shapes: Sequence[str]) -> list[str]:
    """README.md's "Load test" section: the perf_analyzer shapes of variable dims (none without any)."""
    if not shapes:
        return []
    return [
        "## Load test",
        "",
        "Inputs with a variable dim need their shape given to perf_analyzer:",
        "",
        "```bash",
        f"perf_analyzer -m {name} {' '.join(shapes)}",
        "```",
        "",
    ]


def _summary(
    *, folder: Path, files: Sequence[str], origin: str, signature: Signature, variants: Sequence[Variant],
    held: _HeldOut, warmup: Warmup, shapes: Sequence[str], notes: Sequence[str], dest_in_models: bool,
    name: str, kinds: Mapping[str, _Kind],
) -> str:
    batched = signature.batched
    env = "" if dest_in_models else f"KILN_MODELS={folder.parent} "
    lines = [f"kiln add: wrote {folder}/ ({', '.join(files)}) from {origin}"]
    for t in signature.inputs:
        lines.append(f"  input   {t.name}: {_dims_text(t, batched)}")
    for t in signature.outputs:
        kind = kinds[t.name]
        lines.append(f"  output  {t.name}: {_dims_text(t, batched)}, kind {kind.kind} ({kind.reason})")
    lines.append(f"  batching: {signature.batching}")
    budgets = ", ".join(
        v.precision
        + (f" (max drop {v.max_metric_drop:g}" if v.precision != "fp32" else "")
        + (", optional" if getattr(v, "optional", False) else "")
        + (")" if v.precision != "fp32" else "")
        for v in variants
    )
    lines.append(f"  opset {signature.opset}; variants: {budgets}")
    lines += [f"  {note}" for note in (*held.notes, *notes)]
    if warmup.dims:
        lines.append(
            "  warmup: one zero-filled request with "
            + ", ".join(f"{k} {list(v)}" for k, v in warmup.dims.items())
            + " (the samples' shape) for the variable dims"
        )
    if shapes:
        lines.append(f"  perf_analyzer needs the variable dims: perf_analyzer -m {name} {' '.join(shapes)}")
    lines += [
        "next:",
        f"  review {folder / SPEC_FILE} (below): the output kinds, the budgets, the batching",
        f"  {env}kiln generate",
        f"  {env}kiln build --model {name}",
    ]
    return "\n".join(lines)


def _granularity_notes(
    signature: Signature, variants: Sequence[Variant], held: _HeldOut, kinds: Mapping[str, _Kind]
) -> list[str]:
    """A warning when one disagreeing evaluation item costs a class-score output more than a
    variant's budget (a top-1 agreement moves in steps of 1/items)."""
    items = len(next(iter(held.evaluation.values())))
    budgets = [v.max_metric_drop for v in variants if v.precision != "fp32"]
    classes = [t.name for t in signature.outputs if kinds[t.name].kind in ("class_scores", "probabilities")]
    if not budgets or not classes or 1 / items <= min(budgets):
        return []
    return [
        f"warning: with {items} evaluation items one item whose top class differs from FP32's costs "
        f"{1 / items:.3f} of the top-1 agreement of {', '.join(map(repr, classes))}, more than the budget "
        f"{min(budgets):g}: a single flip refuses the variant; give more samples (about "
        f"{int(np.ceil(1 / min(budgets))) * 4} or more) or raise max_metric_drop"
    ]


def _check_opset(signature: Signature) -> None:
    """Refuses a graph whose opset kiln does not build."""
    if not OPSETS[0] <= signature.opset <= OPSETS[1]:
        raise ByomError(
            f"the graph's opset is {signature.opset}; kiln builds opsets {OPSETS[0]}..{OPSETS[1]}: "
            "convert it (onnx.version_converter.convert_version(model, 17)) or re-export it"
        )


def _check_and_move(tmp: Path, folder: Path, files: Sequence[str]) -> None:
    """Reads `tmp`'s spec back as the build would, then moves `files` into `folder` (stale ones removed)."""
    _check_written(_load_spec(tmp / SPEC_FILE))
    folder.mkdir(exist_ok=True)
    for stale in WRITTEN_FILES:
        if stale not in files and (folder / stale).is_file():
            (folder / stale).unlink()
    for written in files:
        (tmp / written).replace(folder / written)


def _write_folder(
    *,
    name: str,
    dest_dir: Path | str,
    force: bool,
    origin: str,
    description: str | None,
    signature: Signature,
    source_kind: str,
    factory: str | None,
    variants: Sequence[Variant | str],
    samples: Samples,
    calibration: Samples | None,
    payload: Callable[[Path], list[str]],
    notes: Sequence[str] = (),
    output_kinds: Mapping[str, str] | None = None,
    int8: Int8Options | Mapping[str, Any] | None = None,
) -> Scaffold:
    """Writes the folder into a temporary sibling, checks it, then moves its files into place.

    `payload(tmp_folder)` writes the model's own files (model.onnx, or checkpoint.pt and
    factory.py) and returns their names.
    """
    folder = _check_destination(name, dest_dir, force)
    chosen = _variants(variants)
    _check_opset(signature)
    kinds = _output_kinds(signature, output_kinds)
    int8_settings, int8_notes = _int8_options(int8, signature, chosen)
    needs_calibration = any(v.precision == "int8" for v in chosen)
    held = _prepare_held_out(signature.inputs, signature.batched, samples, calibration, needs_calibration)
    notes = [*notes, *int8_notes, *_granularity_notes(signature, chosen, held, kinds)]
    dims = warmup_dims(signature.inputs, held.evaluation)
    warmup = Warmup(name="sample_shape" if dims else "zeros", dims=dims)
    shapes = perf_analyzer_shapes(dims)
    description = description or f"{origin}, brought with kiln add"
    source = _source_text(source_kind, factory=factory)
    spec_text = _spec_text(
        name=name, description=description, origin=origin, signature=signature, source=source,
        variants=chosen, warmup=warmup, held=held, kinds=kinds, int8=int8_settings, int8_notes=int8_notes,
    )
    dest = folder.parent
    dest_in_models = dest == (paths.ROOT / "models").resolve()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.kiln-add-", dir=dest))
    try:
        files = [SPEC_FILE, *payload(tmp), HELD_OUT_FILE, README_FILE]
        (tmp / SPEC_FILE).write_text(spec_text)
        _write_npz(tmp / HELD_OUT_FILE, held)
        (tmp / README_FILE).write_text(_readme(
            name=name, description=description, origin=origin, signature=signature, variants=chosen,
            held=held, shapes=shapes, files=files, notes=notes, dest_in_models=dest_in_models,
            kinds=kinds,
        ))
        _check_and_move(tmp, folder, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = _summary(
        folder=folder, files=files, origin=origin, signature=signature, variants=chosen, held=held,
        warmup=warmup, shapes=shapes, notes=notes, dest_in_models=dest_in_models, name=name,
        kinds=kinds,
    )
    return Scaffold(
        name=name, folder=folder, files=tuple(files), spec=_load_spec(folder / SPEC_FILE),
        spec_text=spec_text, summary=summary,
    )


# --- ONNX ------------------------------------------------------------------------------------


def _smoke_run(
    onnx_path: Path, signature: Signature, items: Mapping[str, np.ndarray], model: bytes | None = None
) -> None:
    """Runs the graph (`model`'s bytes when given: the file with its input dims fixed) once on the
    first held-out item(s), so samples it rejects fail here."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(
            model if model is not None else str(onnx_path), providers=["CPUExecutionProvider"]
        )
    except Exception as error:
        raise ByomError(f"ONNX Runtime cannot load {str(onnx_path)!r}: {error}") from None
    feed = {
        t.name: items[t.name][:2] if signature.batched else items[t.name][0] for t in signature.inputs
    }
    try:
        session.run(None, feed)
    except Exception as error:
        shapes = ", ".join(f"{k} {list(v.shape)} {v.dtype}" for k, v in feed.items())
        raise ByomError(f"ONNX Runtime failed on the samples ({shapes}): {error}") from None


def add_onnx(
    name: str,
    onnx_path: Path | str,
    samples: Samples,
    *,
    dest_dir: Path | str,
    calibration: Samples | None = None,
    variants: Sequence[Variant | str] = DEFAULT_VARIANTS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    description: str | None = None,
    force: bool = False,
    output_kinds: Mapping[str, str] | None = None,
    input_dims: Mapping[str, Sequence[int]] | None = None,
    int8: Int8Options | Mapping[str, Any] | None = None,
) -> Scaffold:
    """Writes `dest_dir/<name>/` serving the ONNX file at `onnx_path` (an `OnnxFileSource`).

    Args:
        name: The model's name, also its folder's (a Python identifier).
        onnx_path: The ONNX file; copied into the folder as model.onnx.
        samples: Inputs to evaluate the variants on: arrays named after the graph's inputs, items
            first (a mapping, or an .npz; "calibration/<input>" arrays in it are the calibration
            set). For a graph without a batch axis each item is a whole request.
        dest_dir: The folder of model folders to write into (the project's `models/`, or one
            named in KILN_MODELS).
        calibration: The INT8 calibration inputs, laid out as `samples`; when None (and the
            samples hold none) the samples are split at random into evaluation and calibration.
        variants: The variants to build, fp32 first (a precision takes its `DEFAULT_BUDGETS`).
        max_batch_size: The largest batch when the graph has a symbolic batch axis.
        description: One line for the spec; a default names the file.
        force: Overwrite the files `kiln add` writes in an existing folder.
        output_kinds: Output name -> its kind (one of `kiln.spec.OUTPUT_KINDS`), declared instead
            of the inferred one (`{"output0": "detections"}`).
        input_dims: Input name -> dims to fix where the graph's are symbolic (per item when the
            graph has a batch axis: `{"images": (3, 320, 320)}` for a detector trained at 320).
            The folder's model.onnx declares them, so the server refuses other shapes.
        int8: The INT8 variant's settings (`BuildSpec.int8`): an `Int8Options` or a mapping of
            its fields; a `nodes_to_exclude` entry with * ? [ is a pattern over the graph's node
            names ("/model.22/*"), written out as the names it matches.

    Returns:
        The folder, its spec and its text, and the summary `kiln add` prints.

    Raises:
        ByomError: naming what is wrong (the file, a tensor, a sample array, the destination).
    """
    _check_destination(name, dest_dir, force)
    _variants(variants)
    path = Path(onnx_path).expanduser().resolve()
    model = _load_onnx(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:
        raise ByomError(f"onnx.checker rejected {str(path)!r}: {error}") from None
    signature = infer_signature(model, max_batch_size=max_batch_size)
    notes: list[str] = []
    fixed: bytes | None = None
    if input_dims:
        model, notes = _fix_input_dims(model, signature, input_dims)
        signature = infer_signature(model, max_batch_size=max_batch_size)
        fixed = model.SerializeToString()

    def payload(folder: Path) -> list[str]:
        if fixed is None:
            shutil.copyfile(path, folder / ONNX_FILE)
        else:
            (folder / ONNX_FILE).write_bytes(fixed)
        return [ONNX_FILE]

    held = _prepare_held_out(signature.inputs, signature.batched, samples, calibration, False)
    _smoke_run(path, signature, held.evaluation, fixed)
    return _write_folder(
        name=name, dest_dir=dest_dir, force=force, origin=f"ONNX file {path.name}",
        description=description, signature=signature, source_kind="onnx", factory=None,
        variants=variants, samples=samples, calibration=calibration, payload=payload, notes=notes,
        output_kinds=output_kinds, int8=int8,
    )


# --- PyTorch ---------------------------------------------------------------------------------


def _import_factory(factory: str) -> Callable[[], Any]:
    module_name, sep, attribute = factory.partition(":")
    if not sep or not module_name or not attribute.isidentifier():
        raise ByomError(f"factory {factory!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:
        raise ByomError(
            f"factory {factory!r}: module {module_name!r} cannot be imported ({type(error).__name__}: "
            f"{error}); is it installed or on PYTHONPATH?"
        ) from error
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ByomError(f"factory {factory!r}: {module_name!r} has no callable {attribute!r}")
    return function


def _call_factory(factory: str) -> Any:
    from torch import nn

    try:
        module = _import_factory(factory)()
    except ByomError:
        raise
    except Exception as error:
        raise ByomError(
            f"factory {factory!r}: calling it with no arguments raised {type(error).__name__}: {error}"
        ) from error
    if not isinstance(module, nn.Module):
        raise ByomError(f"factory {factory!r} returned a {type(module).__name__}, not a torch.nn.Module")
    return module


def _importable_name(obj: Any) -> str | None:
    """'module:qualname' when `obj` can be imported back by that name from another process."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", "")
    if not module_name or module_name == "__main__" or "<locals>" in qualname or "." in qualname:
        return None
    try:
        found = getattr(importlib.import_module(module_name), qualname, None)
    except Exception:
        return None
    return f"{module_name}:{qualname}" if found is obj else None


def _load_checkpoint(module: Any, checkpoint: Path, factory: str) -> None:
    import torch

    if not checkpoint.is_file():
        raise ByomError(f"checkpoint {str(checkpoint)!r} does not exist")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ByomError(
            f"checkpoint {str(checkpoint)!r} cannot be loaded with torch.load(weights_only=True) "
            f"({type(error).__name__}: {error}); save it with torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, Mapping):
        raise ByomError(f"checkpoint {str(checkpoint)!r} holds a {type(state).__name__}, not a state_dict")
    try:
        module.load_state_dict(state, strict=True)
    except Exception as error:
        raise ByomError(
            f"checkpoint {str(checkpoint)!r} does not fit the module {factory!r} builds: {error}"
        ) from None


def _rebuild_factory(module: Any, name: str) -> tuple[str, str]:
    """The factory.py text that rebuilds a module instance's class, and its factory string.

    Raises:
        ByomError: the class cannot be imported from another process (defined in __main__ or in
            a function, or not found under its name), or `Class()` does not rebuild the module's
            weights (its constructor needs the arguments it was made with).
    """
    cls = type(module)
    where = _importable_name(cls)
    label = f"{cls.__module__}.{cls.__qualname__}"
    advice = (
        "write a function that builds the module (e.g. `def make(): return MyNet(hidden=64)`) in an "
        "importable module and pass it as a factory ('package.module:function', kiln add --factory), "
        "with the weights as a checkpoint"
    )
    if where is None:
        raise ByomError(
            f"the module's class {label} cannot be imported from another process (it is defined in "
            f"__main__, inside a function, or not under that name), so the build could not rebuild "
            f"it: {advice}"
        )
    try:
        rebuilt = cls()
        rebuilt.load_state_dict(module.state_dict(), strict=True)
    except Exception as error:
        raise ByomError(
            f"the module's class {label} is importable, but {cls.__qualname__}() does not rebuild it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): its "
            f"constructor needs the arguments the module was made with; {advice}"
        ) from None
    module_name, _, qualname = where.partition(":")
    text = (
        f'"""Rebuilds the module of `{name}` for the build: `{qualname}()` (written by `kiln add`).\n\n'
        f"The build (CheckpointSource) calls `{FACTORY_FUNCTION}` and loads {CHECKPOINT_FILE} into what it\n"
        f"returns; `{module_name}` must be importable wherever it builds.\n"
        '"""\n\n'
        "from torch import nn\n\n"
        f"from {module_name} import {qualname}\n\n\n"
        f"def {FACTORY_FUNCTION}() -> nn.Module:\n"
        f'    """An untrained {qualname}; the weights come from {CHECKPOINT_FILE}."""\n'
        f"    return {qualname}()\n"
    )
    return text, f"kiln.models.{name}.{FACTORY_FILE.removesuffix('.py')}:{FACTORY_FUNCTION}"


def _ordered_inputs(module: Any, arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The sample names in the order of the module's forward parameters (when they all are
    parameters of it), else in the samples' order."""
    try:
        parameters = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return list(arrays)
    if set(arrays) <= set(parameters):
        return [p for p in parameters if p in arrays]
    return list(arrays)


def _export_signature(
    module: Any,
    arrays: Mapping[str, np.ndarray],
    *,
    output_names: Sequence[str] | None,
    variable_dims: Mapping[str, Sequence[int]],
    max_batch_size: int,
    opset: int,
) -> Signature:
    """Runs the module on the samples, exports it like `kiln build` (symbolic batch axis and the
    variable dims) into a temporary folder and reads the signature of that graph."""
    import torch

    from kiln.build import export
    from kiln.build.check import BuildError
    from kiln.spec import BuildSpec

    if max_batch_size < 1:
        raise ByomError(
            "max_batch_size must be >= 1 for a PyTorch module (exported with a batch axis), "
            f"got {max_batch_size}"
        )
    names = _ordered_inputs(module, arrays)
    inputs = _sample_inputs(arrays, names, variable_dims)
    example = tuple(torch.from_numpy(np.ascontiguousarray(arrays[n][: export.EXAMPLE_BATCH])) for n in names)
    module = copy.deepcopy(module).cpu().eval()
    try:
        with torch.no_grad():
            result = module(*example)
    except Exception as error:
        shapes = ", ".join(f"{n} {list(e.shape)} {e.dtype}" for n, e in zip(names, example, strict=True))
        raise ByomError(
            f"running the module on the samples ({shapes}) raised {type(error).__name__}: {error}"
        ) from None
    outputs = _result_outputs(result, output_names)
    provisional = ModelSpec(
        name="byom", backend="kiln_onnx", inputs=tuple(inputs), outputs=tuple(outputs),
        max_batch_size=max_batch_size, build=BuildSpec(source=None, opset=opset),
    )
    with tempfile.TemporaryDirectory(prefix="kiln-add-") as tmp:
        path = Path(tmp) / "export.onnx"
        try:
            export._run_exporter(module, provisional, example, path, export.DEFAULT_EXPORTER)
        except BuildError as error:
            raise ByomError(f"exporting the module to ONNX failed: {error}") from None
        return infer_signature(path, max_batch_size=max_batch_size)


def _sample_inputs(
    arrays: Mapping[str, np.ndarray], names: Sequence[str], variable_dims: Mapping[str, Sequence[int]]
) -> list[TensorSpec]:
    """The module's inputs (in `names`' order) from the samples: dtypes, per-item dims, -1 where variable."""
    for name, axes in variable_dims.items():
        if name not in arrays:
            raise ByomError(f"variable dims name {name!r}, which is no input (inputs: {', '.join(names)})")
        rank = arrays[name].ndim - 1
        bad = [a for a in axes if not isinstance(a, int) or not 0 <= a < rank]
        if bad:
            raise ByomError(
                f"variable dims of {name!r} must be per-item axes 0..{rank - 1} (the batch axis is not "
                f"counted), got {list(axes)}"
            )
    inputs = []
    for name in names:
        array = arrays[name]
        dtype = next((k for k, v in _NUMPY.items() if np.dtype(v) == array.dtype), None)
        if dtype is None or array.ndim < 2:
            raise ByomError(
                f"sample array {name!r} is {array.dtype} {list(array.shape)}: it needs one of "
                f"{', '.join(np.dtype(v).name for v in _NUMPY.values())} and shape [items, dims...] "
                "(a per-item scalar must be [items, 1])"
            )
        variable = set(variable_dims.get(name, ()))
        dims = tuple(-1 if i in variable else int(d) for i, d in enumerate(array.shape[1:]))
        inputs.append(TensorSpec(name, dtype, dims))
    return inputs


def _result_outputs(result: Any, output_names: Sequence[str] | None) -> list[TensorSpec]:
    """The module's outputs from what it returned on the samples: names, dtypes and per-item dims."""
    import torch

    results = list(result) if isinstance(result, (tuple, list)) else [result]
    if not all(isinstance(r, torch.Tensor) for r in results):
        raise ByomError(
            "the module must return a tensor or a tuple of tensors, got "
            + ", ".join(type(r).__name__ for r in results)
        )
    if output_names is None:
        output_names = ["output"] if len(results) == 1 else [f"output_{i}" for i in range(len(results))]
    if len(output_names) != len(results):
        raise ByomError(
            f"output names {list(output_names)} name {len(output_names)} outputs; the module returns "
            f"{len(results)}"
        )
    outputs = []
    for out_name, tensor in zip(output_names, results, strict=True):
        if tensor.dim() < 2:
            raise ByomError(
                f"output {out_name!r} has shape {list(tensor.shape)} (one value per item): kiln needs "
                "per-item dims; return it as [batch, 1] (e.g. .unsqueeze(-1))"
            )
        torch_dtype = str(tensor.dtype).removeprefix("torch.")
        dtype = next((k for k, v in _NUMPY.items() if np.dtype(v).name == torch_dtype), None)
        if dtype is None:
            raise ByomError(f"output {out_name!r} is {tensor.dtype}, which kiln_onnx does not serve")
        outputs.append(TensorSpec(out_name, dtype, tuple(int(d) for d in tensor.shape[1:])))
    return outputs


def _resolve_module(
    module_or_factory: Any, checkpoint: Path | str | None, name: str
) -> tuple[Any, str, str | None, str]:
    """The module to export, the spec's factory, factory.py's text (an instance's, else None), the origin."""
    from torch import nn

    if isinstance(module_or_factory, nn.Module):
        module = module_or_factory
        if checkpoint is not None:
            raise ByomError("checkpoint is for a factory; a module instance's own weights are saved")
        factory_text, factory = _rebuild_factory(module, name)
        return module, factory, factory_text, f"PyTorch module {type(module).__qualname__}"
    if callable(module_or_factory) and not isinstance(module_or_factory, str):
        factory = _importable_name(module_or_factory)
        if factory is None:
            raise ByomError(
                f"factory {module_or_factory!r} cannot be imported by name from another process "
                "(a lambda, a nested function, or defined in __main__): define it at the top level "
                "of an importable module and pass 'package.module:function'"
            )
    elif isinstance(module_or_factory, str):
        factory = module_or_factory
    else:
        raise ByomError(
            "module_or_factory must be a torch.nn.Module, a factory function or "
            f"'package.module:function', got {type(module_or_factory).__name__}"
        )
    module = _call_factory(factory)
    if checkpoint is not None:
        _load_checkpoint(module, Path(checkpoint).expanduser(), factory)
    return module, factory, None, f"PyTorch factory {factory}"


def _module_notes(
    module: Any, factory: str, factory_text: str | None, checkpoint: Path | str | None
) -> list[str]:
    """What `add_module` decided about the module's export, weights and imports, for the summary."""
    notes = ["the module is exported in eval mode"]
    if checkpoint is None and factory_text is None:
        notes.append(
            f"no checkpoint was given: {CHECKPOINT_FILE} holds the weights the factory's module has "
            "(freshly initialized unless the factory loads some)"
        )
    if factory_text is None:
        notes.append(
            f"the build imports {factory.partition(':')[0]}: keep it importable (installed or on PYTHONPATH)"
        )
    else:
        notes.append(f"{FACTORY_FILE} rebuilds {type(module).__qualname__}(); the build imports "
                     f"{type(module).__module__}: keep it importable")
    return notes


def add_module(
    name: str,
    module_or_factory: Any,
    samples: Samples,
    *,
    dest_dir: Path | str,
    checkpoint: Path | str | None = None,
    calibration: Samples | None = None,
    variants: Sequence[Variant | str] = DEFAULT_VARIANTS,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    output_names: Sequence[str] | None = None,
    variable_dims: Mapping[str, Sequence[int]] | None = None,
    opset: int = DEFAULT_OPSET,
    description: str | None = None,
    force: bool = False,
    output_kinds: Mapping[str, str] | None = None,
    int8: Int8Options | Mapping[str, Any] | None = None,
) -> Scaffold:
    """Writes `dest_dir/<name>/` serving a PyTorch module (a `CheckpointSource`).

    Args:
        name: The model's name, also its folder's (a Python identifier).
        module_or_factory: A factory, "package.module:function" (or the function itself) that
            returns the untrained nn.Module, which the spec names; or an nn.Module instance, whose
            class must be importable and buildable with no arguments: the folder then gets a
            factory.py calling `Class()` (anything else is refused, saying why).
        samples: Inputs, arrays named after the forward's parameters (ordered as they are when
            they all are parameters of it), items first; a mapping or an .npz.
        dest_dir: The folder of model folders to write into.
        checkpoint: With a factory: the state_dict to load (copied as checkpoint.pt); None saves
            the weights the factory's module has. Not used with an instance (its own weights are
            saved).
        calibration: The INT8 calibration inputs; None splits the samples (see `add_onnx`).
        variants: The variants to build, fp32 first.
        max_batch_size: The model's largest batch (the export's first axis is the batch axis).
        output_names: Names of the outputs, in the order the module returns them; default
            "output" (one) or "output_0", "output_1"... (names decide inferred output kinds:
            "logits" reads as class scores).
        variable_dims: Per-item axes of inputs that vary between requests, e.g.
            `{"input_ids": (0,)}` for a sequence length (exported as symbolic dims, -1 in the spec).
        opset: The export's opset.
        description: One line for the spec.
        force: Overwrite the files `kiln add` writes in an existing folder.
        output_kinds: Output name -> its kind, declared instead of the inferred one (see
            `add_onnx`).
        int8: The INT8 variant's settings (see `add_onnx`; node names are the export's).

    Raises:
        ByomError: naming what is wrong.
    """
    import torch

    _check_destination(name, dest_dir, force)
    _variants(variants)
    module, factory, factory_text, origin = _resolve_module(module_or_factory, checkpoint, name)
    arrays = _read_arrays(samples, "samples")
    evaluation = {k: v for k, v in arrays.items() if not k.startswith(CALIBRATION_PREFIX)}
    signature = _export_signature(
        module, evaluation, output_names=output_names, variable_dims=dict(variable_dims or {}),
        max_batch_size=max_batch_size, opset=opset,
    )
    notes = _module_notes(module, factory, factory_text, checkpoint)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}

    def payload(folder: Path) -> list[str]:
        torch.save(state, folder / CHECKPOINT_FILE)
        if factory_text is None:
            return [CHECKPOINT_FILE]
        (folder / FACTORY_FILE).write_text(factory_text)
        return [CHECKPOINT_FILE, FACTORY_FILE]

    return _write_folder(
        name=name, dest_dir=dest_dir, force=force, origin=origin, description=description,
        signature=signature, source_kind="checkpoint", factory=factory, variants=variants,
        samples=arrays, calibration=calibration, payload=payload, notes=notes,
        output_kinds=output_kinds, int8=int8,
    )


__all__ = [
    "ByomError",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_VARIANTS",
    "Scaffold",
    "Signature",
    "add_module",
    "add_onnx",
    "infer_signature",
    "perf_analyzer_shapes",
    "variants_from",
    "warmup_dims",
]
