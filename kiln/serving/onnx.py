"""The kiln_onnx backend's logic: parameters, the ONNX Runtime session, config checks, inference.

`OnnxModel.load` fails with one clear message when the config and the ONNX file disagree (a
missing input, another dtype, other dims), so a bad repository entry fails at load time, naming
the model, instead of failing every request.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.serving.batch import TensorContract, Tensors, run_batch
from kiln.serving.errors import ModelLoadError
from kiln.serving.params import Param, parse_params

KNOWN_PROVIDERS = (
    "CPUExecutionProvider",
    "CUDAExecutionProvider",
    "TensorrtExecutionProvider",
    "OpenVINOExecutionProvider",
    "DnnlExecutionProvider",
)

ONNX_PARAMS: tuple[Param, ...] = (
    Param("model_filename", "name", "model.onnx", "ONNX file inside the model's version folder"),
    Param(
        "intra_op_threads", "int", 0,
        "ONNX Runtime threads inside one operator; 0 lets ONNX Runtime choose", minimum=0,
    ),
    Param(
        "inter_op_threads", "int", 0,
        "ONNX Runtime threads across operators; 0 lets ONNX Runtime choose", minimum=0,
    ),
    Param(
        "execution_providers", "list", ("CPUExecutionProvider",),
        "ONNX Runtime execution providers, in order of preference", choices=KNOWN_PROVIDERS,
    ),
    Param(
        "graph_optimization_level", "str", "all", "ONNX Runtime graph optimizations",
        choices=("disable", "basic", "extended", "all"),
    ),
    Param(
        "reject_non_finite", "bool", True,
        "fail a request whose floating-point inputs hold NaN or infinity",
    ),
)


@dataclass(frozen=True)
class OnnxParams:
    """kiln_onnx's `parameters`, parsed (see ONNX_PARAMS for each key's meaning)."""

    model_filename: str
    intra_op_threads: int
    inter_op_threads: int
    execution_providers: tuple[str, ...]
    graph_optimization_level: str
    reject_non_finite: bool


# ONNX tensor element types (onnx.TensorProto) as ONNX Runtime names them -> numpy.
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}

# Triton's config data types -> numpy (BYTES is not a tensor ONNX Runtime takes here).
TRITON_TYPES = {
    "TYPE_BOOL": np.bool_,
    "TYPE_UINT8": np.uint8,
    "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16,
    "TYPE_INT32": np.int32,
    "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16,
    "TYPE_FP32": np.float32,
    "TYPE_FP64": np.float64,
}


def contracts(model: str, tensors: Sequence[Mapping[str, Any]]) -> tuple[TensorContract, ...]:
    """Tensor contracts from the `input` or `output` list of a model config (Triton's JSON)."""
    result = []
    for tensor in tensors:
        dtype = tensor["data_type"]
        if dtype not in TRITON_TYPES:
            raise ModelLoadError(
                f"model '{model}': tensor '{tensor['name']}' has data_type {dtype}, which "
                f"kiln_onnx does not serve; allowed: {', '.join(TRITON_TYPES)}"
            )
        result.append(
            TensorContract(
                tensor["name"], np.dtype(TRITON_TYPES[dtype]), tuple(int(d) for d in tensor["dims"])
            )
        )
    return tuple(result)


def _check_tensor(
    model: str, role: str, contract: TensorContract, ort_type: str, ort_shape: list, batched: bool
) -> None:
    want = _ORT_TYPES.get(ort_type)
    if want is None or np.dtype(want) != contract.dtype:
        raise ModelLoadError(
            f"model '{model}': {role} '{contract.name}' is {contract.dtype} in config.pbtxt but "
            f"{ort_type} in the ONNX model"
        )
    dims = list(ort_shape[1:] if batched else ort_shape)
    expected_rank = len(contract.dims) + (1 if batched else 0)
    static = [d if isinstance(d, int) and d > 0 else -1 for d in dims]
    # A dim the ONNX model fixes must be the same fixed size in the config (a config -1 there would
    # admit requests the model rejects); a dim the model leaves symbolic accepts anything.
    if len(ort_shape) != expected_rank or any(
        m != -1 and c != m for c, m in zip(contract.dims, static, strict=True)
    ):
        raise ModelLoadError(
            f"model '{model}': {role} '{contract.name}' has dims {contract.shape_text(batched)} "
            f"in config.pbtxt but {ort_shape} in the ONNX model"
        )


def _session(name: str, path: Path, params: OnnxParams) -> Any:
    """An ONNX Runtime session for `path`, with the parameters' providers, threads and graph
    optimization level."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    missing = [p for p in params.execution_providers if p not in available]
    if missing:
        raise ModelLoadError(
            f"model '{name}': parameter 'execution_providers' names {', '.join(missing)}, "
            f"which this onnxruntime does not have; available: {', '.join(available)}"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = params.intra_op_threads
    options.inter_op_num_threads = params.inter_op_threads
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[params.graph_optimization_level]
    try:
        return ort.InferenceSession(
            str(path), sess_options=options, providers=list(params.execution_providers)
        )
    except Exception as error:
        raise ModelLoadError(f"model '{name}': ONNX Runtime cannot load {path}: {error}") from error


def _check_session(
    name: str,
    session: Any,
    inputs: tuple[TensorContract, ...],
    outputs: tuple[TensorContract, ...],
    batched: bool,
) -> None:
    """Checks the config's tensors against the ONNX model's: each declared one exists with a
    matching type and shape, and every model input is declared."""
    model_inputs = {i.name: i for i in session.get_inputs()}
    for role, declared, nodes in (
        ("input", inputs, model_inputs),
        ("output", outputs, {o.name: o for o in session.get_outputs()}),
    ):
        for contract in declared:
            if contract.name not in nodes:
                raise ModelLoadError(
                    f"model '{name}': {role} '{contract.name}' is not an {role} of the ONNX "
                    f"model (its {role}s: {', '.join(nodes)})"
                )
            node = nodes[contract.name]
            _check_tensor(name, role, contract, node.type, node.shape, batched)
    unfed = set(model_inputs) - {c.name for c in inputs}
    if unfed:
        raise ModelLoadError(
            f"model '{name}': the ONNX model needs input(s) {', '.join(sorted(unfed))}, "
            "which config.pbtxt does not declare"
        )


class OnnxModel:
    """An ONNX Runtime session checked against its Triton config, run one dynamic batch at a time."""

    def __init__(
        self,
        name: str,
        session: Any,
        inputs: tuple[TensorContract, ...],
        outputs: tuple[TensorContract, ...],
        batched: bool,
        params: OnnxParams,
    ) -> None:
        self.name = name
        self.session = session
        self.inputs = inputs
        self.outputs = outputs
        self.batched = batched
        self.params = params
        self._output_names = [o.name for o in outputs]

    @classmethod
    def load(
        cls, name: str, version_dir: Path, config: Mapping[str, Any], raw_params: Mapping[str, str]
    ) -> OnnxModel:
        """Creates the session for `version_dir/model_filename` and checks it against `config`.

        Raises:
            ParamError: a `parameters` key is unknown or its value is not allowed.
            ModelLoadError: the file is missing, a provider is unavailable, or the config and the
                ONNX model disagree on an input or output.
        """
        params = parse_params(name, raw_params, ONNX_PARAMS, OnnxParams)
        path = Path(version_dir) / params.model_filename
        if not path.is_file():
            raise ModelLoadError(
                f"model '{name}': {path} does not exist (parameter 'model_filename' is "
                f"{params.model_filename!r}); run `make build-engines` to build it"
            )
        session = _session(name, path, params)
        batched = int(config.get("max_batch_size", 0)) > 0
        inputs = contracts(name, config.get("input", []))
        outputs = contracts(name, config.get("output", []))
        _check_session(name, session, inputs, outputs, batched)
        return cls(name, session, inputs, outputs, batched, params)

    def run(self, feed: Tensors) -> dict[str, np.ndarray]:
        """One ONNX Runtime run on already-validated, concatenated inputs."""
        arrays = self.session.run(self._output_names, feed)
        return dict(zip(self._output_names, arrays, strict=True))

    def infer(self, requests: Sequence[Mapping[str, np.ndarray | None]]) -> list[Tensors | Exception]:
        """Runs a dynamic batch; one result (outputs or error) per request, in order."""
        return run_batch(
            requests,
            self.inputs,
            self.outputs,
            self.run,
            batched=self.batched,
            reject_non_finite=self.params.reject_non_finite,
        )


class OnnxStep:
    """kiln_onnx as a step of the adapter (`kiln.serving.adapter.python_model`): one
    `OnnxModel.infer` per dynamic batch, so the ONNX step is served, counted (the kiln_step_*
    metrics) and mapped to Triton errors exactly like the processing steps.

    Attributes:
        model: The loaded model.
    """

    def __init__(self, model: OnnxModel) -> None:
        self.model = model

    def run(self, requests: Sequence[Mapping[str, np.ndarray | None]]) -> list[Tensors | Exception]:
        """Each request's outputs, or its error (see `OnnxModel.infer`)."""
        return self.model.infer(requests)


def load(context: Any) -> OnnxStep:  # context: kiln.serving.adapter.LoadContext
    """Loads `<version>/model.onnx` (or `parameters.model_filename`) for the model `context` names.

    Raises:
        ModelLoadError: see `OnnxModel.load`.
        ParamError: a parameter is unknown or not allowed.
    """
    model = OnnxModel.load(context.model_name, context.version_dir, context.config, context.parameters)
    return OnnxStep(model)
