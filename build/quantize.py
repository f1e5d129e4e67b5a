"""Quantize stage: the FP16 and INT8 variants of an exported FP32 ONNX model, for ONNX Runtime.

FP16 (`to_fp16`): `onnxruntime.transformers.float16.convert_float_to_float16` with
`keep_io_types=True`: weights and activations become float16, the graph's inputs and outputs stay
float32 (Cast nodes at the edges), so the served config's data types are the FP32 model's. ONNX
Runtime's CPU provider lacks float16 kernels for some operators; an operator type it cannot run in
float16 is kept in float32 (`op_block_list`) and the conversion is retried, so the result always
loads and runs on the CPU (`FP16_ALWAYS_FP32` lists the types kept in FP32 from the start).

INT8 (`to_int8`): post-training static quantization. `quant_pre_process` (symbolic shape
inference and ONNX Runtime's graph optimizations, e.g. folding), then `quantize_static` in the QDQ
format with per-channel weights, calibrated on `HeldOut.calibration` (never the evaluation
inputs) fed in batches by `CalibrationReader`, which reports one progress line per batch. QDQ
keeps float32 inputs and outputs, so the `kiln_onnx` loader's checks apply unchanged. The settings
(`Int8Settings`) default to what measured best here; a source stage may override them (for
example keep a model's softmax or layer norms in FP32) through its optional `int8_settings` hook
(see `kiln.build.pipeline.SourceStage`).

Measured on this project's CPU (AMD EPYC, AVX2, no AVX-512 VNNI), digits (test accuracy):
FP32 0.9861; INT8 with unsigned (QUInt8) or signed (QInt8) activations 0.9861 either way, and
MinMax, Percentile and Entropy calibration all 0.9861, so MinMax (the fastest, one pass) is the
default. Without `reduce_range` the INT8 logits were up to 4.7 off FP32's (the AVX2 u8s8 kernel
saturates 16-bit sums, a documented ONNX Runtime caveat on CPUs without VNNI); with it, 0.54.
QUInt8 and QInt8 activations ran equally fast here (a conv net at batch 8: 1.4x FP32's speed).

onnx and onnxruntime are imported inside the functions, so the pipeline reads this module's
constants (and hashes its code) without them.
"""

from __future__ import annotations

import io
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.build.check import BuildError
from kiln.build.publish import atomic_path
from kiln.spec import ModelSpec

if TYPE_CHECKING:
    import onnx

Progress = Callable[[str], None]

CALIBRATION_BATCH_SIZE = 32
"""Calibration items per ONNX Runtime run (capped at the model's max_batch_size)."""
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
"""ONNX Runtime's calibration methods offered (`CalibrationMethod.MinMax`, ...)."""
CALIBRATION_METHOD = "minmax"
"""The default: one pass, no histograms; as accurate as the others on digits (module docstring)."""
QUANT_TYPES = ("quint8", "qint8")
"""8-bit types for activations and weights (`QuantType.QUInt8`, `QuantType.QInt8`)."""
ACTIVATION_TYPE = "quint8"
"""Unsigned activations: ONNX Runtime's u8s8 kernels on x86; as accurate and fast as qint8 here."""
WEIGHT_TYPE = "qint8"
"""Signed, symmetric weights (ONNX Runtime's recommended pairing with quint8 activations)."""
PER_CHANNEL = True
"""One scale per output channel of each weight: far less error than one per tensor."""
REDUCE_RANGE = True
"""7-bit weights: avoids the u8s8 saturation of CPUs without VNNI (module docstring)."""
UNBATCHED_CALIBRATION_BATCH = 1
"""Items per calibration run of a model without a batch dim (max_batch_size 0)."""
FP16_ALWAYS_FP32: tuple[str, ...] = ()
"""Operator types kept in FP32 from the start (others are added when ONNX Runtime lacks them)."""
PREPROCESSED_NAME = "preprocessed.onnx"
"""`quant_pre_process`'s output, in a temporary folder beside the destination."""
_MISSING_KERNEL = re.compile(r"Could not find an implementation for (\w+)\(")
"""ONNX Runtime's message for an operator without a kernel for the requested types."""
_ORT_ELEMENT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
"""ONNX Runtime's input types -> numpy, for the smoke run of a converted model."""
SYMBOLIC_DIM_SIZE = 1
"""Size used for a symbolic dim in the smoke run when no sample inputs are given."""


class QuantizeError(BuildError):
    """Producing a variant failed; the message names the model, the variant and the cause."""

    def __init__(self, model: str, precision: str, message: str) -> None:
        self.precision = precision
        super().__init__(model, "quantize", f"variant {precision}: {message}")


@dataclass(frozen=True)
class Int8Settings:
    """How `to_int8` quantizes (recorded in the build manifest).

    Attributes:
        batch_size: Calibration items per run.
        method: One of `CALIBRATION_METHODS`.
        activation_type: One of `QUANT_TYPES`, for activations.
        weight_type: One of `QUANT_TYPES`, for weights.
        per_channel: Per-channel weight scales.
        reduce_range: 7-bit weights (see `REDUCE_RANGE`).
        op_types_to_quantize: Only these operator types are quantized; empty means every type
            ONNX Runtime's QDQ quantizer knows.
        exclude_op_types: Operator types kept in FP32 (e.g. "Softmax", "LayerNormalization").
        nodes_to_exclude: Node names kept in FP32.
    """

    batch_size: int = CALIBRATION_BATCH_SIZE
    method: str = CALIBRATION_METHOD
    activation_type: str = ACTIVATION_TYPE
    weight_type: str = WEIGHT_TYPE
    per_channel: bool = PER_CHANNEL
    reduce_range: bool = REDUCE_RANGE
    op_types_to_quantize: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    nodes_to_exclude: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


INT8_DEFAULTS = Int8Settings()
"""The settings used unless a source stage's `int8_settings` hook returns others."""


def _check_settings(model: str, settings: Int8Settings) -> None:
    problems = []
    if settings.method not in CALIBRATION_METHODS:
        problems.append(
            f"'method' must be one of {', '.join(CALIBRATION_METHODS)}, got {settings.method!r}"
        )
    for name in ("activation_type", "weight_type"):
        value = getattr(settings, name)
        if value not in QUANT_TYPES:
            problems.append(f"'{name}' must be one of {', '.join(QUANT_TYPES)}, got {value!r}")
    if not isinstance(settings.batch_size, int) or settings.batch_size < 1:
        problems.append(f"'batch_size' must be an integer >= 1, got {settings.batch_size!r}")
    if problems:
        raise QuantizeError(model, "int8", "invalid Int8Settings: " + "; ".join(problems))


def calibration_batch_size(spec: ModelSpec, settings: Int8Settings = INT8_DEFAULTS) -> int:
    """Items per calibration run: the settings' batch size, at most the model's max_batch_size."""
    if spec.max_batch_size <= 0:
        return UNBATCHED_CALIBRATION_BATCH
    return min(settings.batch_size, spec.max_batch_size)


class CalibrationReader:
    """ONNX Runtime's `CalibrationDataReader` over calibration inputs, in batches, with progress.

    `get_next()` returns one feed (input name -> batch) per call, then None. Each batch reports
    "calibration batch k/N (n items)" to `progress`. A model without a batch dim (max_batch_size 0)
    gets one item per feed, without a batch dim.

    With `even_batches` (what `to_int8` uses), a short last batch is filled up with the first
    items, so that every feed has the same size: ONNX Runtime's histogram calibrators (percentile,
    entropy) stack each tensor's per-batch values with `np.asarray`, which fails on a ragged last
    batch ("inhomogeneous shape"), and a user's detector failed that way too. Min and max do not
    change by seeing an item twice; a histogram counts those items twice. The progress line says
    how many were repeated.

    Args:
        spec: Names the inputs (in order) and says whether there is a batch dim.
        inputs: Calibration arrays, batch-first, one per spec input.
        batch_size: Items per feed (1 for an unbatched model).
        progress: Receives the progress lines.
        even_batches: Fill a short last batch up with the first items.
    """

    def __init__(
        self,
        spec: ModelSpec,
        inputs: Sequence[np.ndarray],
        batch_size: int,
        progress: Progress | None = None,
        even_batches: bool = False,
    ) -> None:
        self.names = [t.name for t in spec.inputs]
        self.inputs = [np.ascontiguousarray(x) for x in inputs]
        self.batched = spec.max_batch_size > 0
        self.batch_size = batch_size if self.batched else UNBATCHED_CALIBRATION_BATCH
        self.items = int(self.inputs[0].shape[0]) if self.inputs else 0
        self.batches = math.ceil(self.items / self.batch_size)
        self.progress = progress
        self.even_batches = even_batches and self.batched and self.batches > 1
        self._feeds = self._iterate()
        self.served = 0
        """Batches handed out so far."""

    def _iterate(self) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, self.items, self.batch_size):
            end = min(start + self.batch_size, self.items)
            repeated = self.batch_size - (end - start) if self.even_batches else 0
            if self.batched:
                feed = {
                    n: np.concatenate([x[start:end], x[:repeated]]) if repeated else x[start:end]
                    for n, x in zip(self.names, self.inputs, strict=True)
                }
            else:
                feed = {n: x[start] for n, x in zip(self.names, self.inputs, strict=True)}
            self.served += 1
            if self.progress is not None:
                width = len(str(self.batches))
                self.progress(
                    f"calibration batch {self.served:>{width}}/{self.batches} ({end - start} items"
                    + (f" + {repeated} repeated from the first, for equal batches)" if repeated else ")")
                )
            yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed, or None when every batch was handed out."""
        return next(self._feeds, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return self.batches


def _sample_feed(session: Any, spec: ModelSpec, sample: Sequence[np.ndarray] | None) -> dict:
    """One small feed: the first item of `sample`, or zeros shaped from the session's inputs."""
    names = [t.name for t in spec.inputs]
    if sample is not None:
        batched = spec.max_batch_size > 0
        return {
            n: np.ascontiguousarray(x[:1] if batched else x[0])
            for n, x in zip(names, sample, strict=True)
        }
    feed = {}
    for node in session.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else SYMBOLIC_DIM_SIZE for d in node.shape]
        feed[node.name] = np.zeros(shape, dtype=_ORT_ELEMENT_TYPES.get(node.type, np.float32))
    return feed


def _smoke_run(path: Path, spec: ModelSpec, sample: Sequence[np.ndarray] | None) -> None:
    """Loads `path` in ONNX Runtime on the CPU and runs one item (raises what ORT raises)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    session.run([t.name for t in spec.outputs], _sample_feed(session, spec, sample))


def _save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def to_fp16(
    src: Path,
    dest: Path,
    spec: ModelSpec,
    sample: Sequence[np.ndarray] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Converts the FP32 ONNX model `src` to FP16 at `dest` (atomically), FP32 inputs/outputs kept.

    The result is loaded in ONNX Runtime and run on one item on the CPU; an operator type the CPU
    provider has no float16 kernel for is kept in FP32 and the conversion retried.

    Args:
        src: The FP32 ONNX model.
        dest: Where the FP16 model goes.
        spec: The model (names the tensors and the model in errors).
        sample: Inputs for the smoke run (the first item is used); zeros when None.
        progress: Receives a line for each operator type kept in FP32.

    Raises:
        QuantizeError: the conversion failed, or the result does not run on the CPU.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    blocked = list(FP16_ALWAYS_FP32)
    source = onnx.load(str(src))
    op_types = {node.op_type for node in source.graph.node}
    with atomic_path(Path(dest)) as tmp:
        while True:
            try:
                converted = convert_float_to_float16(
                    onnx.ModelProto.FromString(source.SerializeToString()),
                    keep_io_types=True,
                    op_block_list=blocked or None,
                )
                _save(converted, tmp)
                _smoke_run(tmp, spec, sample)
                break
            except Exception as error:
                found = _MISSING_KERNEL.search(str(error))
                op_type = found.group(1) if found else None
                if op_type is None or op_type in blocked or op_type not in op_types:
                    raise QuantizeError(
                        spec.name,
                        "fp16",
                        f"converting {src} to FP16 failed (operator types kept in FP32: "
                        f"{', '.join(blocked) or 'none'}): {error}",
                    ) from error
                blocked.append(op_type)
                if progress is not None:
                    progress(f"fp16: ONNX Runtime's CPU provider has no float16 {op_type}; kept in FP32")
    return Path(dest)


@contextmanager
def _prints_to(progress: Progress | None) -> Iterator[None]:
    """Sends what ONNX Runtime's calibrators `print` (histogram notes of Percentile and Entropy)
    to `progress`, one line each prefixed "int8: ", instead of the process's stdout."""
    captured = io.StringIO()
    try:
        with redirect_stdout(captured):
            yield
    finally:
        if progress is not None:
            for line in captured.getvalue().splitlines():
                if line.strip():
                    progress(f"int8: {line.strip()}")


def _check_calibration(spec: ModelSpec, inputs: Sequence[np.ndarray]) -> None:
    if len(inputs) != len(spec.inputs):
        raise QuantizeError(
            spec.name,
            "int8",
            f"HeldOut.calibration has {len(inputs)} array(s), the spec has {len(spec.inputs)} "
            f"input(s) ({', '.join(t.name for t in spec.inputs)})",
        )
    counts = {
        t.name: int(np.shape(x)[0]) if np.ndim(x) else 0
        for t, x in zip(spec.inputs, inputs, strict=True)
    }
    if min(counts.values()) < 1 or len(set(counts.values())) != 1:
        raise QuantizeError(
            spec.name,
            "int8",
            f"HeldOut.calibration must hold the same number (>= 1) of items per input, got {counts}",
        )


def _excluded_nodes(model_path: Path, settings: Int8Settings) -> list[str]:
    import onnx

    nodes = list(settings.nodes_to_exclude)
    if settings.exclude_op_types:
        graph = onnx.load(str(model_path), load_external_data=False).graph
        nodes += [n.name for n in graph.node if n.op_type in settings.exclude_op_types]
    return nodes


@contextmanager
def _working_directory(path: str | Path) -> Iterator[None]:
    """Runs the block with `path` as the current directory (ONNX Runtime's symbolic shape
    inference writes sym_shape_infer_temp.onnx and external .data files into the cwd)."""
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def to_int8(
    src: Path,
    dest: Path,
    spec: ModelSpec,
    calibration_inputs: Sequence[np.ndarray],
    progress: Progress | None = None,
    settings: Int8Settings = INT8_DEFAULTS,
) -> Path:
    """Quantizes the FP32 ONNX model `src` to INT8 QDQ at `dest` (atomically).

    Args:
        src: The FP32 ONNX model.
        dest: Where the INT8 model goes.
        spec: The model (input names, batching; names the model in errors).
        calibration_inputs: `HeldOut.calibration`: batch-first arrays, one per spec input.
        progress: Receives "calibration batch k/N (n items)" per batch, and a line should shape
            inference have to fall back.
        settings: Calibration and quantization settings.

    Raises:
        QuantizeError: invalid settings or calibration inputs, or ONNX Runtime's pre-processing
            or quantization failed.
    """
    _check_settings(spec.name, settings)
    _check_calibration(spec, calibration_inputs)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-", dir=dest.parent) as scratch:
        scratch = str(Path(scratch).resolve())  # absolute: pre-processing runs with it as the cwd
        preprocessed = Path(scratch) / PREPROCESSED_NAME
        src = Path(src).resolve()
        _preprocess(spec, src, preprocessed, scratch, progress)
        reader = CalibrationReader(
            spec, calibration_inputs, calibration_batch_size(spec, settings), progress,
            even_batches=True,
        )
        with atomic_path(dest) as tmp, _prints_to(progress):
            _quantize(spec, src, preprocessed, tmp, reader, settings)
    return dest


def _preprocess(
    spec: ModelSpec, src: Path, preprocessed: Path, scratch: str, progress: Progress | None
) -> None:
    """ONNX Runtime's quantization pre-processing of `src` into `preprocessed`, run in `scratch`;
    with ONNX shape inference only when symbolic shape inference gives up."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _working_directory(scratch):  # its temporaries land in the cwd when it fails
            quant_pre_process(str(src), str(preprocessed))
    except Exception as symbolic_error:  # symbolic shape inference gives up on some graphs
        if progress is not None:
            progress(
                f"int8: symbolic shape inference failed ({type(symbolic_error).__name__}: "
                f"{symbolic_error}); pre-processing with ONNX shape inference only"
            )
        try:
            with _working_directory(scratch):
                quant_pre_process(str(src), str(preprocessed), skip_symbolic_shape=True)
        except Exception as error:
            raise QuantizeError(
                spec.name, "int8", f"quant_pre_process failed on {src}: {error}"
            ) from error


def _quantize(
    spec: ModelSpec,
    src: Path,
    preprocessed: Path,
    dest: Path,
    reader: CalibrationReader,
    settings: Int8Settings,
) -> None:
    """quantize_static on the pre-processed model: INT8 QDQ at `dest`, calibrated by `reader`."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    types = {"quint8": QuantType.QUInt8, "qint8": QuantType.QInt8}
    try:
        quantize_static(
            str(preprocessed),
            str(dest),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(settings.op_types_to_quantize) or None,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=types[settings.activation_type],
            weight_type=types[settings.weight_type],
            nodes_to_exclude=_excluded_nodes(preprocessed, settings) or None,
            calibrate_method=methods[settings.method],
        )
    except Exception as error:
        raise QuantizeError(
            spec.name, "int8", f"quantize_static failed on {src}: {error}"
        ) from error
