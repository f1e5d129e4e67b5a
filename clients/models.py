"""What a client knows about a served model, and the validation of inputs against it.

`ModelInfo` is read from the model's config (one request, cached per client): its inputs and
outputs with full shapes (a leading -1 batch dim when the model batches), which inputs are
optional, and `max_batch_size`, which the batching helpers split large calls by.
`validate_inputs` checks a call's named arrays against it before anything is sent, and raises an
`InvalidInputError` naming the input, the expected and the given dtype or shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from kiln.clients.errors import InvalidInputError

BYTES = "BYTES"
"""Triton's variable-length byte-string type (numpy object arrays of bytes or str)."""
ANY_DIM = -1
"""A dim of any size (and the batch dim of a batching model)."""
_CONFIG_TYPE_PREFIX = "TYPE_"
_CONFIG_TYPE_STRING = "TYPE_STRING"
"""The config's name for BYTES."""

_NUMPY_TO_TRITON = {
    np.dtype(np.bool_): "BOOL",
    np.dtype(np.uint8): "UINT8",
    np.dtype(np.uint16): "UINT16",
    np.dtype(np.uint32): "UINT32",
    np.dtype(np.uint64): "UINT64",
    np.dtype(np.int8): "INT8",
    np.dtype(np.int16): "INT16",
    np.dtype(np.int32): "INT32",
    np.dtype(np.int64): "INT64",
    np.dtype(np.float16): "FP16",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float64): "FP64",
}
_TRITON_TO_NUMPY = {v: k for k, v in _NUMPY_TO_TRITON.items()}


def triton_dtype(dtype: np.dtype) -> str | None:
    """The Triton data type of a numpy dtype ("FP32", "BYTES", ...), None if it has none."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return BYTES
    return _NUMPY_TO_TRITON.get(dtype)


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype of a Triton data type (object for BYTES)."""
    if datatype == BYTES:
        return np.dtype(np.object_)
    try:
        return _TRITON_TO_NUMPY[datatype]
    except KeyError:
        raise ValueError(f"no numpy dtype for Triton data type {datatype!r}") from None


@dataclass(frozen=True)
class TensorInfo:
    """An input or output of a served model.

    Attributes:
        name: The tensor's name.
        datatype: Triton data type without TYPE_ ("FP32", "BYTES", ...).
        shape: The full shape a request carries: a leading -1 (the batch dim) when the model
            batches, then the per-item dims (-1: any size).
        optional: An input a request may leave out.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False

    def describe(self) -> str:
        """E.g. "FP32 [-1, 1, 8, 8]"."""
        return f"{self.datatype} {list(self.shape)}"

    def item_byte_size(self, batched: bool) -> int | None:
        """Bytes per item (per batch row when `batched`, the model's leading -1 left out) of a
        fixed-size numeric tensor; None for BYTES or a variable dim (the size is not known
        before the answer)."""
        dims = self.shape[1:] if batched else self.shape
        if self.datatype == BYTES or any(d < 0 for d in dims):
            return None
        return math.prod(dims) * numpy_dtype(self.datatype).itemsize


@dataclass(frozen=True)
class ModelInfo:
    """A served model's tensor contract and batching limit, read from its config.

    Attributes:
        name: The model's name.
        platform: Its platform or backend ("ensemble", "kiln_onnx", ...).
        max_batch_size: The largest batch one request may carry; 0 when the model does not
            batch (its inputs then have no batch dim).
        inputs: Its inputs, in config order.
        outputs: Its outputs, in config order.
        config: The whole model config as a JSON-like dict (ints as ints, for both protocols).
    """

    name: str
    platform: str
    max_batch_size: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    config: Mapping[str, Any]

    @property
    def batches(self) -> bool:
        """Whether requests carry a leading batch dim."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorInfo:
        """The input called `name` (KeyError naming the inputs there are)."""
        return _by_name(self.inputs, name, f"model '{self.name}' has no input", "inputs")

    def output(self, name: str) -> TensorInfo:
        """The output called `name` (KeyError naming the outputs there are)."""
        return _by_name(self.outputs, name, f"model '{self.name}' has no output", "outputs")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelInfo:
        """Builds it from a normalized config dict (see `normalize_config`)."""
        max_batch = int(config.get("max_batch_size", 0))
        batch = (ANY_DIM,) if max_batch > 0 else ()

        def tensors(entries: Any) -> tuple[TensorInfo, ...]:
            return tuple(
                TensorInfo(
                    name=entry["name"],
                    datatype=config_datatype(entry.get("data_type", "")),
                    shape=batch + tuple(int(d) for d in entry.get("dims", ())),
                    optional=bool(entry.get("optional", False)),
                )
                for entry in entries or ()
            )

        return cls(
            name=config.get("name", ""),
            platform=config.get("platform") or config.get("backend") or "",
            max_batch_size=max_batch,
            inputs=tensors(config.get("input")),
            outputs=tensors(config.get("output")),
            config=MappingProxyType(dict(config)),
        )


def _by_name(tensors: tuple[TensorInfo, ...], name: str, missing: str, kind: str) -> TensorInfo:
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    raise KeyError(f"{missing} '{name}'; its {kind}: {', '.join(t.name for t in tensors) or 'none'}")


def config_datatype(data_type: str) -> str:
    """"TYPE_FP32" -> "FP32"; "TYPE_STRING" -> "BYTES"."""
    if data_type == _CONFIG_TYPE_STRING:
        return BYTES
    return data_type.removeprefix(_CONFIG_TYPE_PREFIX)


_INT64_KEYS = frozenset({"dims", "shape", "max_queue_delay_microseconds", "preferred_batch_size"})


def normalize_json(value: Any, key: str | None = None) -> Any:
    """Makes protobuf JSON (int64 as strings) look like Triton's HTTP JSON (int64 as ints).

    gRPC's `as_json` writes 64-bit integers as strings ("dims": ["1", "8", "8"]); the HTTP API
    writes numbers. Only the keys that hold int64 values are converted.
    """
    if isinstance(value, Mapping):
        return {k: normalize_json(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalize_json(v, key) for v in value]
    if key in _INT64_KEYS and isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return value
    return value


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The model config from either protocol as one JSON-like dict (no gRPC "config" wrapper)."""
    if "config" in config and isinstance(config["config"], Mapping):
        config = config["config"]
    return normalize_json(config)


def batch_size(info: ModelInfo, inputs: Mapping[str, np.ndarray]) -> int:
    """The call's batch size (the leading dim), 1 when the model does not batch."""
    if not info.batches:
        return 1
    sizes = {np.shape(a)[0] for a in inputs.values() if np.ndim(a) > 0}
    return sizes.pop() if len(sizes) == 1 else 0


def validate_inputs(
    info: ModelInfo, inputs: Mapping[str, np.ndarray], *, split: bool = False
) -> None:
    """Checks named arrays against the model before they are sent.

    Args:
        info: The model.
        inputs: Input name -> array (already numpy).
        split: The call will be split into requests of `max_batch_size` (so a larger batch is
            fine).

    Raises:
        InvalidInputError: An unknown or missing input, a wrong dtype or shape, batch sizes
            that differ between inputs, or a batch larger than `max_batch_size` (not split).
    """
    _check_names(info, inputs)
    known = {t.name: t for t in info.inputs}
    for name, array in inputs.items():
        _check_array(info, known[name], array)
    if info.batches and inputs:
        _check_batch(info, inputs, split)


def _check_names(info: ModelInfo, inputs: Mapping[str, np.ndarray]) -> None:
    """Every input is the model's; every required input of the model is given."""
    known = {t.name for t in info.inputs}
    model = info.name
    expected_all = ", ".join(
        f"{t.name} ({t.describe()}{', optional' if t.optional else ''})" for t in info.inputs
    )
    for name in inputs:
        if name not in known:
            raise InvalidInputError(
                f"model '{model}' has no input '{name}'; its inputs: {expected_all}",
                input_name=name, expected=expected_all, given=name, model=model,
            )
    for tensor in info.inputs:
        if tensor.name not in inputs and not tensor.optional:
            raise InvalidInputError(
                f"model '{model}' needs input '{tensor.name}' ({tensor.describe()}), which is "
                f"missing; given: {', '.join(inputs) or 'no inputs'}",
                input_name=tensor.name, expected=tensor.describe(), given=None, model=model,
            )


def _check_array(info: ModelInfo, tensor: TensorInfo, array: np.ndarray) -> None:
    """The array has the input's dtype and shape (-1: any size)."""
    name, model = tensor.name, info.name
    given_type = triton_dtype(array.dtype)
    if given_type != tensor.datatype:
        raise InvalidInputError(
            f"input '{name}' of model '{model}': expected dtype {tensor.datatype}, given "
            f"{given_type or 'no Triton type'} (numpy {array.dtype})",
            input_name=name, expected=tensor.datatype, given=str(given_type or array.dtype), model=model,
        )
    shape = tuple(array.shape)
    if len(shape) != len(tensor.shape) or any(
        want != ANY_DIM and want != got for want, got in zip(tensor.shape, shape, strict=False)
    ):
        raise InvalidInputError(
            f"input '{name}' of model '{model}': expected shape {list(tensor.shape)} "
            f"(-1: any size{'; the first dim is the batch' if info.batches else ''}), "
            f"given {list(shape)}",
            input_name=name, expected=str(list(tensor.shape)), given=str(list(shape)), model=model,
        )


def _check_batch(info: ModelInfo, inputs: Mapping[str, np.ndarray], split: bool) -> None:
    """The inputs agree on a batch size of at least 1, at most max_batch_size unless `split`."""
    model = info.name
    sizes = {name: a.shape[0] for name, a in inputs.items()}
    if len(set(sizes.values())) > 1:
        raise InvalidInputError(
            f"inputs of model '{model}' have different batch sizes: "
            + ", ".join(f"'{n}': {s}" for n, s in sizes.items()),
            given=str(sizes), model=model,
        )
    size = next(iter(sizes.values()))
    if size == 0:
        raise InvalidInputError(f"model '{model}': the batch is empty", given="0", model=model)
    if not split and size > info.max_batch_size:
        name = next(iter(sizes))
        raise InvalidInputError(
            f"input '{name}' of model '{model}': a batch of {size} exceeds the model's "
            f"max_batch_size {info.max_batch_size}; use infer_batch() to split it",
            input_name=name, expected=f"<= {info.max_batch_size}", given=str(size), model=model,
        )
