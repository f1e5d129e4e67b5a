"""Export stage: a PyTorch module to an ONNX file whose signature is the spec's.

Input and output names come from the spec's TensorSpecs, the opset from `BuildSpec.opset`. With
`max_batch_size > 0` the leading dim of every tensor is symbolic (`BATCH_DIM`); spec dims of -1
become symbolic too. After export, `onnx.checker` runs (with shape inference) and the graph's
names, element types and dims are compared with the spec, so a model `kiln_onnx` would refuse to
load fails here, naming the tensor.

Exporters (torch 2.13):
- "torchscript" (the default): `torch.onnx.export(..., dynamo=False)`, the TorchScript tracer.
  Needs nothing beyond torch and onnx. PyTorch marks it deprecated (a DeprecationWarning, which
  is silenced here; every other warning, e.g. a TracerWarning, still shows).
- "dynamo": `torch.onnx.export(..., dynamo=True)`, the torch.export-based exporter and PyTorch's
  default since 2.9. Needs the `onnxscript` package (in the `build` extra); it targets a
  newer opset natively and converts down to the spec's.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from kiln.build.check import BuildError
from kiln.build.publish import atomic_path
from kiln.spec import ModelSpec, TensorSpec

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_EXPORTER = "torchscript"
"""Works with torch 2.13 and onnx alone; see the module docstring."""
BATCH_DIM = "batch"
"""Name of the symbolic batch dim in the exported graph."""
EXAMPLE_BATCH = 2
"""Items in the tracing example: more than 1, so no exporter can specialise the batch dim to 1."""

ONNX_TYPES = {
    "BOOL": onnx.TensorProto.BOOL,
    "UINT8": onnx.TensorProto.UINT8,
    "INT8": onnx.TensorProto.INT8,
    "INT16": onnx.TensorProto.INT16,
    "INT32": onnx.TensorProto.INT32,
    "INT64": onnx.TensorProto.INT64,
    "FP16": onnx.TensorProto.FLOAT16,
    "FP32": onnx.TensorProto.FLOAT,
    "FP64": onnx.TensorProto.DOUBLE,
}
"""Spec data types -> ONNX element types (BYTES has no ONNX tensor export)."""

_LEGACY_DEPRECATIONS = (
    r"You are using the legacy TorchScript-based ONNX export",
    r"The feature will be removed",
)
"""DeprecationWarnings of the torchscript exporter that say only that it is deprecated."""


class ExportError(BuildError):
    """The export failed or its graph does not match the spec."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(model, "export", message)


def _symbolic_axes(spec: ModelSpec, tensor: TensorSpec) -> dict[int, str]:
    batched = spec.max_batch_size > 0
    axes = {0: BATCH_DIM} if batched else {}
    offset = 1 if batched else 0
    for i, dim in enumerate(tensor.dims):
        if dim == -1:
            axes[i + offset] = f"{tensor.name}_{i}"
    return axes


def dynamic_axes(spec: ModelSpec) -> dict[str, dict[int, str]]:
    """Symbolic axes per tensor name, as the torchscript exporter takes them."""
    axes = {t.name: _symbolic_axes(spec, t) for t in (*spec.inputs, *spec.outputs)}
    return {name: a for name, a in axes.items() if a}


def _dynamic_shapes(spec: ModelSpec) -> tuple[dict[int, Any], ...]:
    """Symbolic axes per positional input, as the dynamo exporter takes them."""
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            dims[name] = torch.export.Dim(name)
        return dims[name]

    return tuple(
        {axis: dim(name) for axis, name in _symbolic_axes(spec, t).items()} for t in spec.inputs
    )


def example_inputs(spec: ModelSpec, inputs: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
    """The tracing example: the first `EXAMPLE_BATCH` items of each held-out input."""
    if spec.max_batch_size > 0:
        return tuple(torch.from_numpy(np.ascontiguousarray(x[:EXAMPLE_BATCH])) for x in inputs)
    return tuple(torch.from_numpy(np.ascontiguousarray(x[0])) for x in inputs)


def export_onnx(
    module: nn.Module,
    spec: ModelSpec,
    example: Sequence[torch.Tensor],
    path: Path,
    *,
    exporter: str = DEFAULT_EXPORTER,
) -> Path:
    """Exports `module` to `path` (atomically), runs the ONNX checker and `verify_signature`.

    Args:
        module: The trained model; exported in eval mode.
        spec: Tensor names, dims, batching and `build.opset`.
        example: Example inputs, one per `spec.inputs` (see `example_inputs`).
        path: Destination `.onnx` file.
        exporter: "torchscript" or "dynamo".

    Raises:
        ExportError: the exporter failed (or is not installed), the checker rejected the graph,
            or its signature differs from the spec.
    """
    if spec.build is None:
        raise ExportError(spec.name, "the spec has no build section")
    if exporter not in EXPORTERS:
        raise ExportError(
            spec.name, f"exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}"
        )
    module.eval()
    path = Path(path)
    with atomic_path(path) as tmp:
        _run_exporter(module, spec, example, tmp, exporter)
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as error:
            raise ExportError(spec.name, f"onnx.checker rejected the export: {error}") from None
        verify_signature(onnx.load(str(tmp)), spec)
    return path


def _run_exporter(
    module: nn.Module, spec: ModelSpec, example: Sequence[torch.Tensor], dest: Path, exporter: str
) -> None:
    """torch.onnx.export with `exporter` to `dest`: the spec's names, opset and dynamic dims."""
    common = {
        "input_names": [t.name for t in spec.inputs],
        "output_names": [t.name for t in spec.outputs],
        "opset_version": spec.build.opset,
    }
    try:
        with warnings.catch_warnings(), torch.no_grad():
            if exporter == "torchscript":
                for message in _LEGACY_DEPRECATIONS:
                    warnings.filterwarnings("ignore", message, DeprecationWarning)
                torch.onnx.export(
                    module, tuple(example), str(dest), **common,
                    dynamic_axes=dynamic_axes(spec), dynamo=False,
                )
            else:
                torch.onnx.export(
                    module, tuple(example), str(dest), **common,
                    dynamic_shapes=_dynamic_shapes(spec), dynamo=True,
                    external_data=False, verbose=False,
                )
    except ModuleNotFoundError as error:
        raise ExportError(
            spec.name,
            f"the {exporter} exporter needs the module '{error.name}', which is not installed",
        ) from error
    except Exception as error:
        raise ExportError(spec.name, f"torch.onnx.export ({exporter}) failed: {error}") from error


def graph_signature(model: onnx.ModelProto) -> dict[str, dict[str, tuple[int, list[int | str]]]]:
    """The graph's inputs and outputs: name -> (ONNX element type, dims as ints or symbol names).

    Initializers listed as graph inputs (old exporters) are left out.
    """
    initializers = {i.name for i in model.graph.initializer}

    def describe(value: onnx.ValueInfoProto) -> tuple[int, list[int | str]]:
        tensor = value.type.tensor_type
        dims: list[int | str] = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor.shape.dim
        ]
        return tensor.elem_type, dims

    return {
        "inputs": {v.name: describe(v) for v in model.graph.input if v.name not in initializers},
        "outputs": {v.name: describe(v) for v in model.graph.output},
    }


def _type_name(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type)


def verify_signature(model: onnx.ModelProto | Path | str, spec: ModelSpec) -> None:
    """Checks the graph's tensors and opset against the spec.

    Every spec input and output must exist with the spec's element type and dims; with
    `max_batch_size > 0` the leading dim must be symbolic; a spec dim of -1 must be symbolic; the
    graph may have no other inputs; the default-domain opset must be `build.opset`.

    Raises:
        ExportError: listing every mismatch.
    """
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    signature = graph_signature(model)
    batched = spec.max_batch_size > 0
    problems: list[str] = []
    for role, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs)):
        graph = signature[role]
        for tensor in tensors:
            if tensor.name not in graph:
                problems.append(
                    f"{role[:-1]} '{tensor.name}' is not in the graph (its {role}: "
                    f"{', '.join(graph) or 'none'})"
                )
                continue
            elem_type, dims = graph[tensor.name]
            want_type = ONNX_TYPES.get(tensor.dtype)
            if want_type is None or elem_type != want_type:
                problems.append(
                    f"{role[:-1]} '{tensor.name}' is {_type_name(elem_type)} in the graph, the spec "
                    f"says {tensor.dtype}"
                )
            want = ([BATCH_DIM] if batched else []) + list(tensor.dims)
            rank_ok = len(dims) == len(want)
            item_dims = dims[1:] if batched else dims
            fixed_ok = rank_ok and all(
                (isinstance(have, str) if d == -1 else have == d)
                for have, d in zip(item_dims, tensor.dims, strict=False)
            )
            batch_ok = not batched or (rank_ok and isinstance(dims[0], str))
            if not (rank_ok and fixed_ok and batch_ok):
                problems.append(
                    f"{role[:-1]} '{tensor.name}' has dims {dims} in the graph, the spec needs "
                    f"{want} (strings are symbolic dims)"
                )
    extra = set(signature["inputs"]) - {t.name for t in spec.inputs}
    if extra:
        problems.append(f"the graph has input(s) the spec does not declare: {', '.join(sorted(extra))}")
    opsets = {o.domain: o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    opset = next(iter(opsets.values()), None)
    if spec.build is not None and opset != spec.build.opset:
        problems.append(f"the graph's opset is {opset}, the spec says {spec.build.opset}")
    if problems:
        raise ExportError(spec.name, "the exported graph does not match the spec: " + "; ".join(problems))
