"""The quantize stage: FP16 conversion and INT8 static quantization of the digits model."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from kiln import tensors
from kiln.build import check, export, quantize
from kiln.models.digits import build as digits
from kiln.models.digits.spec import INT8_MAX_DROP
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import TensorSpec, Tolerance

FAST_EPOCHS = 6
"""Enough for > 95% test accuracy in about a second (as in test_build_pipeline)."""
FAST = replace(DIGITS, build=replace(DIGITS.build, source=replace(DIGITS.build.source, epochs=FAST_EPOCHS)))
PIXELS = tensors.DIGITS_PIXELS
LOGITS = tensors.DIGITS_LOGITS
FP16_TOLERANCE = Tolerance(atol=0.05, rtol=0.01)
"""FP16 against FP32 logits (measured here: max abs error 0.0074 on logits up to about 20)."""
INT8_MAX_SIZE_RATIO = 0.35
"""INT8 weights are a quarter of FP32's; the graph and scales add a little (measured 0.30)."""
FP16_MAX_SIZE_RATIO = 0.55
"""FP16 weights are half of FP32's (measured 0.51)."""
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


@dataclass(frozen=True)
class Exported:
    fp32: Path
    held: check.HeldOut
    reference: dict[str, np.ndarray]
    metric: float


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    source = FAST.build.source
    model = digits.train(source)
    held = digits.held_out(source)
    path = tmp_path_factory.mktemp("quantize") / "fp32.onnx"
    export.export_onnx(model, FAST, export.example_inputs(FAST, held.inputs), path)
    reference = check.run_batched(check.torch_runner(model, FAST), FAST, held.inputs)
    return Exported(path, held, reference, held.score([reference[LOGITS]], [reference[LOGITS]]))


@pytest.fixture(scope="module")
def fp16(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fp16") / "fp16.onnx"
    return quantize.to_fp16(exported.fp32, dest, FAST, exported.held.inputs)


@pytest.fixture(scope="module")
def int8(exported: Exported, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    dest = tmp_path_factory.mktemp("int8") / "int8.onnx"
    lines: list[str] = []
    quantize.to_int8(exported.fp32, dest, FAST, exported.held.calibration, lines.append)
    return dest, lines


def _served_outputs(path: Path, exported: Exported) -> np.ndarray:
    """Runs `path` through kiln_onnx's loader (its load checks included) on the held-out inputs."""
    run = check.load_served(FAST, path).run
    return check.run_batched(run, FAST, exported.held.inputs)[LOGITS]


def _io_types(path: Path) -> dict[str, int]:
    graph = onnx.load(str(path)).graph
    return {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output)}


def test_fp16_keeps_fp32_inputs_and_outputs_and_halves_the_weights(
    exported: Exported, fp16: Path
) -> None:
    assert _io_types(fp16) == {PIXELS: TensorProto.FLOAT, LOGITS: TensorProto.FLOAT}
    weights = onnx.load(str(fp16)).graph.initializer
    assert weights and {w.data_type for w in weights if len(w.dims) > 1} == {TensorProto.FLOAT16}
    assert fp16.stat().st_size < FP16_MAX_SIZE_RATIO * exported.fp32.stat().st_size


def test_fp16_matches_fp32_closely_and_keeps_the_accuracy(exported: Exported, fp16: Path) -> None:
    logits = _served_outputs(fp16, exported)
    assert logits.dtype == np.float32
    comparison = check.compare({LOGITS: logits}, exported.reference, FP16_TOLERANCE)
    assert comparison.ok, comparison.worst
    assert comparison.max_abs > 0  # it really is FP16 arithmetic
    metric = exported.held.score([logits], [exported.reference[LOGITS]])
    assert exported.metric - metric <= DIGITS.build.variants[1].max_metric_drop


def test_fp16_keeps_an_operator_without_a_float16_kernel_in_fp32(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = quantize._smoke_run
    refused: list[Path] = []

    def no_fp16_relu(path: Path, spec, sample) -> None:  # type: ignore[no-untyped-def]
        """Refuses a model where a Relu is not fed through a Cast (a float16 Relu)."""
        nodes = onnx.load(str(path)).graph.node
        casts = {n.output[0] for n in nodes if n.op_type == "Cast"}
        if any(n.input[0] not in casts for n in nodes if n.op_type == "Relu"):
            refused.append(path)
            raise RuntimeError(
                "[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for "
                "Relu(14) node with name '/1/Relu'"
            )
        real(path, spec, sample)

    monkeypatch.setattr(quantize, "_smoke_run", no_fp16_relu)
    lines: list[str] = []
    dest = quantize.to_fp16(exported.fp32, tmp_path / "fp16.onnx", FAST, exported.held.inputs, lines.append)
    assert len(refused) == 1
    assert lines == ["fp16: ONNX Runtime's CPU provider has no float16 Relu; kept in FP32"]
    model = onnx.load(str(dest))
    relus = [n for n in model.graph.node if n.op_type == "Relu"]
    casts_in = {n.output[0]: n for n in model.graph.node if n.op_type == "Cast"}
    assert relus and all(r.input[0] in casts_in for r in relus)  # fed through a Cast to FP32
    assert any(i.data_type == TensorProto.FLOAT16 for i in model.graph.initializer)


def test_fp16_failure_names_the_model_and_the_cause(
    exported: Exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(path: Path, spec, sample) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : Load model failed")

    monkeypatch.setattr(quantize, "_smoke_run", broken)
    dest = tmp_path / "fp16.onnx"
    with pytest.raises(quantize.QuantizeError) as info:
        quantize.to_fp16(exported.fp32, dest, FAST)
    assert str(info.value) == (
        f"model 'digits', stage 'quantize': variant fp16: converting {exported.fp32} to FP16 failed "
        "(operator types kept in FP32: none): [ONNXRuntimeError] : 1 : FAIL : Load model failed"
    )
    assert list(tmp_path.iterdir()) == []  # no partial file


def test_int8_is_qdq_with_fp32_io_smaller_and_within_the_digits_budget(
    exported: Exported, int8: tuple[Path, list[str]]
) -> None:
    path, _ = int8
    assert _io_types(path) == {PIXELS: TensorProto.FLOAT, LOGITS: TensorProto.FLOAT}
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert QDQ_OPS <= ops
    ratio = path.stat().st_size / exported.fp32.stat().st_size
    assert ratio < INT8_MAX_SIZE_RATIO
    logits = _served_outputs(path, exported)  # passes kiln_onnx's load check
    metric = exported.held.score([logits], [exported.reference[LOGITS]])
    assert exported.metric - metric <= INT8_MAX_DROP
    # it is quantized arithmetic, not a copy of FP32
    assert not check.compare({LOGITS: logits}, exported.reference, DIGITS.build.tolerance).ok


def test_int8_reports_one_progress_line_per_calibration_batch(int8: tuple[Path, list[str]]) -> None:
    _, lines = int8
    batches = math.ceil(FAST.build.source.calibration_size / quantize.CALIBRATION_BATCH_SIZE)
    assert lines == [
        f"calibration batch {k}/{batches} ({quantize.CALIBRATION_BATCH_SIZE} items)"
        for k in range(1, batches + 1)
    ]


def test_calibration_reader_yields_exactly_the_calibration_inputs(exported: Exported) -> None:
    calibration = exported.held.calibration[0]
    lines: list[str] = []
    reader = quantize.CalibrationReader(FAST, exported.held.calibration, 100, lines.append)
    assert len(reader) == 3
    feeds = list(reader)
    assert reader.get_next() is None
    assert [set(f) for f in feeds] == [{PIXELS}] * 3
    assert [len(f[PIXELS]) for f in feeds] == [100, 100, 56]
    np.testing.assert_array_equal(np.concatenate([f[PIXELS] for f in feeds]), calibration)
    assert lines == [
        "calibration batch 1/3 (100 items)",
        "calibration batch 2/3 (100 items)",
        "calibration batch 3/3 (56 items)",
    ]
    # never the evaluation inputs: no calibration image is a test image
    evaluation = {x.tobytes() for x in exported.held.inputs[0]}
    assert not any(x.tobytes() in evaluation for x in calibration)


def test_even_batches_fill_the_last_batch_with_the_first_items(exported: Exported) -> None:
    calibration = exported.held.calibration[0]
    lines: list[str] = []
    reader = quantize.CalibrationReader(FAST, exported.held.calibration, 100, lines.append, even_batches=True)
    feeds = [f[PIXELS] for f in reader]
    assert [len(f) for f in feeds] == [100, 100, 100]
    np.testing.assert_array_equal(np.concatenate(feeds)[:256], calibration)
    np.testing.assert_array_equal(feeds[2][56:], calibration[:44])
    assert lines[-1] == "calibration batch 3/3 (56 items + 44 repeated from the first, for equal batches)"
    # one batch holding every item is left as it is
    assert [len(f[PIXELS]) for f in quantize.CalibrationReader(FAST, exported.held.calibration, 300, even_batches=True)] == [256]


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_a_short_last_batch(exported: Exported, tmp_path: Path, method: str) -> None:
    # ONNX Runtime's histogram calibrators np.asarray the per-batch values: a ragged last batch
    # (256 items in batches of 48) failed with "inhomogeneous shape" before batches were evened.
    settings = quantize.Int8Settings(method=method, batch_size=48)
    dest = quantize.to_int8(exported.fp32, tmp_path / "int8.onnx", FAST, exported.held.calibration, None, settings)
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(dest)).graph.node)


def test_calibration_batches_are_capped_by_max_batch_size_and_unbatched_models_go_item_by_item() -> None:
    small = replace(FAST, max_batch_size=8, dynamic_batching=None)
    assert quantize.calibration_batch_size(small) == 8
    assert quantize.calibration_batch_size(FAST) == quantize.CALIBRATION_BATCH_SIZE
    unbatched = replace(FAST, max_batch_size=0, dynamic_batching=None, warmup=())
    assert quantize.calibration_batch_size(unbatched) == 1
    x = np.arange(3 * 64, dtype=np.float32).reshape(3, 1, 8, 8)
    feeds = list(quantize.CalibrationReader(unbatched, (x,), 32))
    assert [f[PIXELS].shape for f in feeds] == [(1, 8, 8)] * 3
    np.testing.assert_array_equal(feeds[2][PIXELS], x[2])


def test_int8_excluded_op_types_stay_fp32(exported: Exported, tmp_path: Path) -> None:
    settings = quantize.Int8Settings(exclude_op_types=("Gemm",))
    dest = quantize.to_int8(exported.fp32, tmp_path / "int8.onnx", FAST, exported.held.calibration, None, settings)
    graph = onnx.load(str(dest)).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert gemms and convs
    float_weights = {i.name for i in graph.initializer if i.data_type == TensorProto.FLOAT}
    assert all(n.input[1] in float_weights for n in gemms)  # excluded: FP32 weights
    assert all(produced_by.get(n.input[1]) == "DequantizeLinear" for n in convs)  # INT8 weights


def test_int8_refuses_bad_settings_and_calibration_naming_the_model(
    exported: Exported, tmp_path: Path
) -> None:
    dest = tmp_path / "int8.onnx"
    with pytest.raises(quantize.QuantizeError) as info:
        quantize.to_int8(
            exported.fp32, dest, FAST, exported.held.calibration,
            settings=quantize.Int8Settings(method="kl", activation_type="int4", batch_size=0),
        )
    assert str(info.value) == (
        "model 'digits', stage 'quantize': variant int8: invalid Int8Settings: 'method' must be one "
        "of minmax, percentile, entropy, got 'kl'; 'activation_type' must be one of quint8, qint8, "
        "got 'int4'; 'batch_size' must be an integer >= 1, got 0"
    )
    empty = (np.zeros((0, 1, 8, 8), np.float32),)
    with pytest.raises(quantize.QuantizeError, match=r"same number \(>= 1\) of items per input, got \{'pixels': 0\}"):
        quantize.to_int8(exported.fp32, dest, FAST, empty)
    two_inputs = replace(FAST, inputs=(*FAST.inputs, TensorSpec("mask", "FP32", (1,))))
    with pytest.raises(
        quantize.QuantizeError,
        match=r"variant int8: HeldOut.calibration has 1 array\(s\), the spec has 2 input\(s\) \(pixels, mask\)",
    ):
        quantize.to_int8(exported.fp32, dest, two_inputs, exported.held.calibration)
    assert list(tmp_path.iterdir()) == []


def test_int8_settings_record_is_json_data() -> None:
    record = quantize.Int8Settings(nodes_to_exclude=("/a",)).record()
    assert record == {
        "batch_size": quantize.CALIBRATION_BATCH_SIZE,
        "method": "minmax",
        "activation_type": "quint8",
        "weight_type": "qint8",
        "per_channel": True,
        "reduce_range": True,
        "op_types_to_quantize": [],
        "exclude_op_types": [],
        "nodes_to_exclude": ["/a"],
    }
