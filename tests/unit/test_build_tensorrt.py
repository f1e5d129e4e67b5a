"""The TensorRT stage: profiles, recipes and records here; engine builds on a GPU with TensorRT.

Tests marked `gpu` build and run real engines; they skip with the reason `availability()` gives
(on kiln's own machines: TensorRT is not installed, so they have never run there).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.build import tensorrt as trt_stage
from kiln.build.check import CheckError, compare
from kiln.build.tensorrt import (
    NO_GPU,
    NOT_INSTALLED,
    EngineCheck,
    EngineError,
    EngineRecipe,
    EngineRecord,
)
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import BuildSpec, DynamicBatching, ModelSpec, OnnxFileSource, TensorSpec, Tolerance

AVAILABLE, REASON = trt_stage.availability()
TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


def _text_spec(max_batch: int = 32, preferred: tuple[int, ...] = ()) -> ModelSpec:
    return ModelSpec(
        name="text",
        backend="kiln_onnx",
        inputs=(TensorSpec("input_ids", "INT64", (-1,)), TensorSpec("attention_mask", "INT64", (-1,))),
        outputs=(TensorSpec("token_embeddings", "FP32", (-1, 16)),),
        max_batch_size=max_batch,
        dynamic_batching=DynamicBatching(preferred_batch_sizes=preferred) if preferred else None,
    )


# --- availability ---------------------------------------------------------------------------


def test_reason_here_when_tensorrt_is_not_installed() -> None:
    if TENSORRT_INSTALLED:
        pytest.skip("the tensorrt package is installed on this machine")
    assert (AVAILABLE, REASON) == (
        False,
        "TensorRT is not installed (pip install 'kiln[gpu]' on a machine that reaches NVIDIA's "
        "package index, or use the NGC container)",
    )


def test_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` -> ModuleNotFoundError
    assert trt_stage.availability() == (False, NOT_INSTALLED)


def test_installed_but_broken(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> types.ModuleType:
        raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(trt_stage, "_load_tensorrt", broken)
    assert trt_stage.availability() == (
        False,
        "TensorRT cannot be imported (OSError: libnvinfer.so.10: cannot open shared object file: "
        "No such file or directory; pip install 'kiln[gpu]' on a machine that reaches NVIDIA's "
        "package index, or use the NGC container)",
    )


def _fake_tensorrt(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = version  # type: ignore[attr-defined]
    monkeypatch.setattr(trt_stage, "_load_tensorrt", lambda: fake)


def test_too_old(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_tensorrt(monkeypatch, "8.6.1")
    assert trt_stage.availability() == (
        False,
        "TensorRT 8.6.1 is installed; kiln needs TensorRT >= 10",
    )


def test_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    _fake_tensorrt(monkeypatch, "10.13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert trt_stage.availability() == (False, NO_GPU)
    assert NO_GPU == "no CUDA GPU is visible (torch.cuda.is_available() is False)"


# --- optimization profiles ------------------------------------------------------------------


def test_profile_of_digits_tunes_for_the_largest_preferred_batch() -> None:
    assert trt_stage.optimization_profile(DIGITS) == {
        "pixels": ((1, 1, 8, 8), (64, 1, 8, 8), (64, 1, 8, 8)),
    }
    assert trt_stage.optimization_profile(DIGITS, opt_batch=16) == {
        "pixels": ((1, 1, 8, 8), (16, 1, 8, 8), (64, 1, 8, 8)),
    }


def test_opt_batch_defaults_to_half_the_max_without_preferred_sizes() -> None:
    spec = replace(DIGITS, dynamic_batching=None, max_batch_size=10)
    assert trt_stage.default_opt_batch(spec) == 5
    assert trt_stage.optimization_profile(spec)["pixels"][1] == (5, 1, 8, 8)
    assert trt_stage.default_opt_batch(replace(spec, max_batch_size=1)) == 1


def test_profile_of_a_variable_sequence_takes_dim_ranges() -> None:
    spec = _text_spec()
    ranges = trt_stage.uniform_dim_ranges(spec, (1, 64, 128))
    assert ranges == {"input_ids": (1, 64, 128), "attention_mask": (1, 64, 128)}
    assert trt_stage.optimization_profile(spec, dim_ranges=ranges) == {
        "input_ids": ((1, 1), (16, 64), (32, 128)),
        "attention_mask": ((1, 1), (16, 64), (32, 128)),
    }


def test_a_range_applies_to_every_variable_dim_of_its_input() -> None:
    spec = replace(
        DIGITS, inputs=(TensorSpec("images", "FP32", (3, -1, -1)),), dynamic_batching=None,
        max_batch_size=4,
    )
    assert trt_stage.optimization_profile(spec, dim_ranges={"images": (32, 224, 512)}) == {
        "images": ((1, 3, 32, 32), (2, 3, 224, 224), (4, 3, 512, 512)),
    }


def test_profile_without_a_batch_dim() -> None:
    spec = replace(
        DIGITS, inputs=(TensorSpec("points", "FP32", (-1, 4)),), max_batch_size=0,
        dynamic_batching=None,
    )
    assert trt_stage.optimization_profile(spec, dim_ranges={"points": (1, 2, 8)}) == {
        "points": ((1, 4), (2, 4), (8, 4)),
    }


def test_a_variable_dim_without_a_range_fails_naming_the_input() -> None:
    with pytest.raises(EngineError) as error:
        trt_stage.optimization_profile(_text_spec(), dim_ranges={"input_ids": (1, 64, 128)})
    assert str(error.value) == (
        "model 'text', stage 'tensorrt': bad optimization profile: input 'attention_mask' has a "
        "variable (-1) dim in dims [-1]: TensorRT needs its (min, opt, max) size; pass "
        "dim_ranges={'attention_mask': (min, opt, max)}"
    )


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        (
            {"dim_ranges": {"input_ids": (0, 64, 128), "attention_mask": (1, 64, 128)}},
            "dim_ranges['input_ids'] must be (min, opt, max) integers with 1 <= min <= opt <= max, "
            "got (0, 64, 128)",
        ),
        (
            {"dim_ranges": {"input_ids": (1, 256, 128), "attention_mask": (1, 64, 128)}},
            "dim_ranges['input_ids'] must be (min, opt, max) integers with 1 <= min <= opt <= max, "
            "got (1, 256, 128)",
        ),
        (
            {"dim_ranges": {"input_ids": (1, 64), "attention_mask": (1, 64, 128)}},
            "dim_ranges['input_ids'] must be (min, opt, max) integers with 1 <= min <= opt <= max, "
            "got (1, 64)",
        ),
        (
            {"dim_ranges": {"input_ids": (1, 64, 128), "attention_mask": (1, 64, 128), "token_type_ids": (1, 1, 1)}},
            "dim_ranges names 'token_type_ids', which is not an input (inputs: input_ids, attention_mask)",
        ),
        (
            {"opt_batch": 33, "dim_ranges": {"input_ids": (1, 64, 128), "attention_mask": (1, 64, 128)}},
            "opt_batch must be an integer in 1..32 (max_batch_size), got 33",
        ),
        (
            {"opt_batch": 0, "dim_ranges": {"input_ids": (1, 64, 128), "attention_mask": (1, 64, 128)}},
            "opt_batch must be an integer in 1..32 (max_batch_size), got 0",
        ),
    ],
)
def test_bad_profile_settings_are_named(kwargs: dict, problem: str) -> None:
    with pytest.raises(EngineError) as error:
        trt_stage.optimization_profile(_text_spec(), **kwargs)
    assert str(error.value) == f"model 'text', stage 'tensorrt': bad optimization profile: {problem}"


def test_a_range_for_a_fixed_input_is_refused() -> None:
    with pytest.raises(EngineError) as error:
        trt_stage.optimization_profile(DIGITS, dim_ranges={"pixels": (1, 2, 3)})
    assert str(error.value) == (
        "model 'digits', stage 'tensorrt': bad optimization profile: dim_ranges gives a range for "
        "input 'pixels', which has no -1 dim"
    )


def test_describe_profile() -> None:
    assert trt_stage.describe_profile(trt_stage.optimization_profile(DIGITS)) == (
        "pixels min [1, 1, 8, 8] opt [64, 1, 8, 8] max [64, 1, 8, 8]"
    )


# --- recipes ----------------------------------------------------------------------------------


def test_recipes_of_tensorrt_10_use_precision_flags() -> None:
    assert trt_stage.engine_recipe("fp32", 10) == EngineRecipe("fp32", "fp32", (), False)
    assert trt_stage.engine_recipe("fp16", 10) == EngineRecipe("fp16", "fp32", ("FP16",), False)
    assert trt_stage.engine_recipe("int8", 10) == EngineRecipe("int8", "int8", ("INT8", "FP16"), False)
    assert trt_stage.engine_recipe("int8", 10).describe() == "from the int8 ONNX, flags INT8+FP16"


def test_recipes_of_tensorrt_11_are_strongly_typed() -> None:
    for precision in ("fp32", "fp16", "int8"):
        assert trt_stage.engine_recipe(precision, 11) == EngineRecipe(precision, precision, (), True)
    assert trt_stage.engine_recipe("fp16", 11).describe() == "from the fp16 ONNX, strongly typed"
    assert trt_stage.engine_recipe("int8", 10, strongly_typed=True) == EngineRecipe("int8", "int8", (), True)


def test_recipe_errors() -> None:
    with pytest.raises(ValueError, match="engine precision must be one of fp32, fp16, int8, got 'bf16'"):
        trt_stage.engine_recipe("bf16", 10)
    with pytest.raises(ValueError, match="TensorRT 8 is older than 10"):
        trt_stage.engine_recipe("fp16", 8)


# --- records ----------------------------------------------------------------------------------


def _record(tmp_path: Path, check: EngineCheck | None = None) -> EngineRecord:
    return EngineRecord(
        model="digits",
        precision="int8",
        plan=str(tmp_path / "int8.plan"),
        onnx=str(tmp_path / "int8.onnx"),
        tensorrt_version="10.13.0.35",
        gpu_name="NVIDIA H100 80GB HBM3",
        compute_capability="9.0",
        builder_flags=("INT8", "FP16"),
        strongly_typed=False,
        profile=trt_stage.optimization_profile(DIGITS),
        workspace_bytes=trt_stage.DEFAULT_WORKSPACE_BYTES,
        timing_cache=str(tmp_path / "timing.cache"),
        build_seconds=12.5,
        built_at="2026-01-02T03:04:05+00:00",
        plan_sha256="ab" * 32,
        plan_size_bytes=123_456,
        check=check,
    )


def test_record_json_round_trip(tmp_path: Path) -> None:
    check = EngineCheck(
        reference=str(tmp_path / "int8.onnx"), items=360, worst_output="logits", max_abs=0.031,
        max_rel=0.012, atol=0.1, rtol=0.05,
    )
    for record in (_record(tmp_path), _record(tmp_path, check)):
        sidecar = trt_stage.write_record(record)
        assert sidecar == tmp_path / "int8.plan.json"
        assert trt_stage.read_record(tmp_path / "int8.plan") == record
    document = record.to_json()
    assert document["gpu"] == {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert document["tensorrt_version"] == "10.13.0.35"
    assert document["profile"] == {
        "pixels": {"min": [1, 1, 8, 8], "opt": [64, 1, 8, 8], "max": [64, 1, 8, 8]}
    }
    assert document["check"]["worst_output"] == "logits"


def test_record_from_json_names_what_is_wrong(tmp_path: Path) -> None:
    document = _record(tmp_path).to_json()
    with pytest.raises(ValueError) as error:
        EngineRecord.from_json({**document, "format": 99}, "x.plan.json")
    assert str(error.value) == "x.plan.json: field 'format' must be 1, got 99"
    del document["plan_sha256"]
    with pytest.raises(ValueError) as error:
        EngineRecord.from_json(document, "x.plan.json")
    assert str(error.value) == "x.plan.json: field 'plan_sha256' is missing"


# --- the stage where TensorRT is unavailable --------------------------------------------------

SKIP_LINE = "[digits] tensorrt: skipped: {reason}; the repository serves the ONNX artifacts"


@pytest.mark.skipif(AVAILABLE, reason="TensorRT and a GPU are available here")
def test_compile_stage_here_prints_one_skip_line(tmp_path: Path) -> None:
    lines: list[str] = []
    records = trt_stage.compile_stage(
        DIGITS, {"fp32": tmp_path / "fp32.onnx"}, tmp_path / "work", lines.append,
        inputs=(np.zeros((2, 1, 8, 8), np.float32),),
    )
    assert records == []
    assert lines == [SKIP_LINE.format(reason=REASON)]
    if not TENSORRT_INSTALLED:
        assert lines == [
            "[digits] tensorrt: skipped: TensorRT is not installed (pip install 'kiln[gpu]' on a "
            "machine that reaches NVIDIA's package index, or use the NGC container); the "
            "repository serves the ONNX artifacts"
        ]
    assert not (tmp_path / "work").exists()


def test_compile_stage_skips_with_the_reason_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trt_stage, "availability", lambda: (False, "no CUDA GPU is visible"))
    lines: list[str] = []
    records = trt_stage.compile_stage(
        DIGITS, {}, tmp_path, lines.append, inputs=(np.zeros((2, 1, 8, 8), np.float32),)
    )
    assert (records, lines) == ([], [SKIP_LINE.format(reason="no CUDA GPU is visible")])


def test_compile_stage_validates_the_profile_before_skipping(tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(EngineError, match="input 'input_ids' has a variable"):
        trt_stage.compile_stage(
            _text_spec(), {}, tmp_path, lines.append, inputs=(np.zeros((1, 4), np.int64),) * 2
        )
    with pytest.raises(EngineError, match="precisions must be among fp32, fp16, int8, got 'tf32'"):
        trt_stage.compile_stage(
            DIGITS, {}, tmp_path, lines.append, inputs=(np.zeros((1, 1, 8, 8), np.float32),),
            precisions=("fp16", "tf32"),
        )
    assert lines == []


def test_build_engine_refuses_without_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trt_stage, "availability", lambda: (False, NOT_INSTALLED))
    with pytest.raises(EngineError) as error:
        trt_stage.build_engine(
            tmp_path / "fp32.onnx", DIGITS, "fp16", tmp_path / "fp16.plan",
            profile=trt_stage.optimization_profile(DIGITS),
        )
    assert str(error.value) == (
        f"model 'digits', stage 'tensorrt': cannot build a TensorRT engine here: {NOT_INSTALLED}"
    )


# --- tiny models shared by the fake-TensorRT and GPU tests -----------------------------------

FEATURES = 4
CLASSES = 3
MAX_BATCH = 8
ITEMS = 40


def _tiny_spec(tmp_path: Path) -> ModelSpec:
    source = OnnxFileSource(path=str(tmp_path / "fp32.onnx"), held_out=str(tmp_path / "h.npz"))
    return ModelSpec(
        name="tiny",
        backend="kiln_onnx",
        inputs=(TensorSpec("x", "FP32", (FEATURES,)),),
        outputs=(TensorSpec("y", "FP32", (CLASSES,)),),
        max_batch_size=MAX_BATCH,
        build=BuildSpec(source=source),
    )


def _tiny_onnx(path: Path) -> Path:
    """y = relu(x @ w1 + b1) @ w2: small, deterministic, every op TensorRT parses."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((FEATURES, 16)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Add", ["h", "b1"], ["hb"]),
            helper.make_node("Relu", ["hb"], ["r"]),
            helper.make_node("MatMul", ["r", "w2"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", CLASSES])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _inputs() -> tuple[np.ndarray, ...]:
    return (np.random.default_rng(1).standard_normal((ITEMS, FEATURES)).astype(np.float32),)


def _qdq_onnx(fp32: Path, dest: Path) -> Path:
    """The int8 QDQ model TensorRT takes: symmetric int8 activations and weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": _inputs()[0][i : i + MAX_BATCH]} for i in range(0, ITEMS, MAX_BATCH)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    quantize_static(
        str(fp32), str(dest), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    return dest


def _tensorrt_major() -> int:
    import tensorrt

    return int(tensorrt.__version__.split(".")[0])


# --- the build's call sequence, against a fake tensorrt module -------------------------------
# TensorRT cannot be installed on kiln's machines, so these tests drive build_engine and
# compile_stage through a stand-in module with the same names. They check kiln's side of the
# calls (flags per recipe, profile shapes, timing cache load/save, plan and record files), not
# TensorRT's behaviour: that is what the `gpu` tests below are for.


class _FakeCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timings"


class _FakeConfig:
    def __init__(self, calls: list) -> None:
        self.calls = calls
        self.cache: _FakeCache | None = None

    def set_flag(self, flag: str) -> None:
        self.calls.append(("set_flag", flag))

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.calls.append(("set_memory_pool_limit", pool, size))

    def add_optimization_profile(self, profile: _FakeProfile) -> None:
        self.calls.append(("add_optimization_profile", dict(profile.shapes)))

    def create_timing_cache(self, data: bytes) -> _FakeCache:
        self.calls.append(("create_timing_cache", bytes(data)))
        return _FakeCache(bytes(data))

    def set_timing_cache(self, cache: _FakeCache, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return cache.data != b"from another GPU"

    def get_timing_cache(self) -> _FakeCache | None:
        return self.cache


class _FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple] = {}

    def set_shape(self, name: str, low: tuple, opt: tuple, high: tuple) -> None:
        self.shapes[name] = (tuple(low), tuple(opt), tuple(high))


class _FakeNetwork:
    def __init__(self) -> None:
        self.inputs: list[types.SimpleNamespace] = []

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, index: int) -> types.SimpleNamespace:
        return self.inputs[index]


class _FakeParserError:
    def desc(self) -> str:
        return "Failed to parse ONNX model"

    def node_name(self) -> str:
        return ""

    def node_operator(self) -> str:
        return ""


def _fake_tensorrt_module(calls: list, version: str = "10.13.0.35") -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version  # type: ignore[attr-defined]

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2)

        def __init__(self) -> None:
            pass

    class OnnxParser:
        def __init__(self, network: _FakeNetwork, logger: ILogger) -> None:
            self.network = network
            self.num_errors = 0

        def parse_from_file(self, path: str) -> bool:
            try:
                model = onnx.load(path)
            except Exception:
                self.num_errors = 1
                return False
            self.network.inputs = [types.SimpleNamespace(name=i.name) for i in model.graph.input]
            return True

        def get_error(self, index: int) -> _FakeParserError:
            return _FakeParserError()

    class Builder:
        def __init__(self, logger: ILogger) -> None:
            pass

        def create_network(self, flags: int) -> _FakeNetwork:
            calls.append(("create_network", flags))
            return _FakeNetwork()

        def create_builder_config(self) -> _FakeConfig:
            return _FakeConfig(calls)

        def create_optimization_profile(self) -> _FakeProfile:
            return _FakeProfile()

        def build_serialized_network(self, network: _FakeNetwork, config: _FakeConfig) -> bytes:
            return b"PLAN:" + ",".join(i.name for i in network.inputs).encode()

    trt.ILogger = ILogger  # type: ignore[attr-defined]
    trt.OnnxParser = OnnxParser  # type: ignore[attr-defined]
    trt.Builder = Builder  # type: ignore[attr-defined]
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16", INT8="INT8")  # type: ignore[attr-defined]
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")  # type: ignore[attr-defined]
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0, STRONGLY_TYPED=1)  # type: ignore[attr-defined]
    return trt


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> list:
    """Installs the fake module, a fake GPU, and availability; returns the recorded calls."""
    calls: list = []
    fake = _fake_tensorrt_module(calls)
    monkeypatch.setattr(trt_stage, "_load_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_stage, "availability", lambda: (True, "TensorRT 10.13.0.35 on Fake GPU"))
    monkeypatch.setattr(trt_stage, "_gpu", lambda: ("Fake GPU", "9.0"))
    return calls


def test_build_engine_call_sequence_for_int8(fake_tensorrt: list, tmp_path: Path) -> None:
    spec = _tiny_spec(tmp_path)
    onnx_file = _tiny_onnx(tmp_path / "int8.onnx")
    cache = tmp_path / "timing.cache"
    lines: list[str] = []
    record = trt_stage.build_engine(
        onnx_file, spec, "int8", tmp_path / "work" / "int8.plan",
        profile=trt_stage.optimization_profile(spec), timing_cache_path=cache,
        workspace_bytes=1 << 28, progress=lines.append,
    )
    assert fake_tensorrt == [
        ("create_network", 0),
        ("set_flag", "INT8"),
        ("set_flag", "FP16"),
        ("set_memory_pool_limit", "WORKSPACE", 1 << 28),
        ("add_optimization_profile", {"x": ((1, 4), (4, 4), (8, 4))}),
        ("create_timing_cache", b""),
    ]
    plan = tmp_path / "work" / "int8.plan"
    assert plan.read_bytes() == b"PLAN:x"
    assert cache.read_bytes() == b"+timings"
    assert record.plan_sha256 == hashlib.sha256(b"PLAN:x").hexdigest()
    assert (record.gpu_name, record.compute_capability) == ("Fake GPU", "9.0")
    assert (record.builder_flags, record.strongly_typed) == (("INT8", "FP16"), False)
    assert trt_stage.read_record(plan) == record
    assert lines == []

    fake_tensorrt.clear()
    trt_stage.build_engine(
        onnx_file, spec, "int8", plan, profile=trt_stage.optimization_profile(spec),
        timing_cache_path=cache, progress=lines.append,
    )
    assert ("create_timing_cache", b"+timings") in fake_tensorrt
    assert lines == [f"timing cache {cache} loaded (8 bytes)"]


def test_build_engine_strongly_typed_on_tensorrt_10(fake_tensorrt: list, tmp_path: Path) -> None:
    spec = _tiny_spec(tmp_path)
    record = trt_stage.build_engine(
        _tiny_onnx(tmp_path / "fp16.onnx"), spec, "fp16", tmp_path / "fp16.plan",
        profile=trt_stage.optimization_profile(spec), strongly_typed=True,
    )
    assert fake_tensorrt[0] == ("create_network", 2)  # 1 << STRONGLY_TYPED (member 1 in TensorRT 10)
    assert not any(call[0] == "set_flag" for call in fake_tensorrt)
    assert record.strongly_typed and record.builder_flags == ()


def test_build_engine_names_parser_errors_and_profile_mismatches(
    fake_tensorrt: list, tmp_path: Path
) -> None:
    spec = _tiny_spec(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not onnx")
    with pytest.raises(EngineError) as error:
        trt_stage.build_engine(
            garbage, spec, "fp16", tmp_path / "fp16.plan", profile=trt_stage.optimization_profile(spec)
        )
    assert str(error.value) == (
        f"model 'tiny', stage 'tensorrt': TensorRT's ONNX parser rejected {garbage} (fp16 engine): "
        "Failed to parse ONNX model"
    )
    with pytest.raises(EngineError) as error:
        trt_stage.build_engine(
            _tiny_onnx(tmp_path / "fp32.onnx"), spec, "fp16", tmp_path / "fp16.plan",
            profile={"pixels": ((1, 4), (4, 4), (8, 4))},
        )
    assert str(error.value) == (
        "model 'tiny', stage 'tensorrt': the optimization profile covers inputs ['pixels'], the "
        f"network of {tmp_path / 'fp32.onnx'} has inputs ['x']"
    )
    assert not (tmp_path / "fp16.plan").exists()


def test_a_timing_cache_of_another_gpu_is_replaced(fake_tensorrt: list, tmp_path: Path) -> None:
    spec = _tiny_spec(tmp_path)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"from another GPU")
    lines: list[str] = []
    trt_stage.build_engine(
        _tiny_onnx(tmp_path / "fp32.onnx"), spec, "fp32", tmp_path / "fp32.plan",
        profile=trt_stage.optimization_profile(spec), timing_cache_path=cache, progress=lines.append,
    )
    assert lines == [f"timing cache {cache} was made by another TensorRT or GPU; starting an empty one"]
    assert cache.read_bytes() == b"+timings"


def test_compile_stage_builds_what_the_recipes_name(
    fake_tensorrt: list, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked: list[tuple[str, str]] = []

    def fake_check(plan: Path, onnx_path: Path, spec: ModelSpec, inputs, tolerance, *, precision=""):
        checked.append((Path(plan).name, Path(onnx_path).name))
        same = {"y": np.zeros((ITEMS, CLASSES))}
        return compare(same, same, tolerance)

    monkeypatch.setattr(trt_stage, "check_engine", fake_check)
    spec = _tiny_spec(tmp_path)
    fp32 = _tiny_onnx(tmp_path / "fp32.onnx")
    lines: list[str] = []
    records = trt_stage.compile_stage(
        spec, {"fp32": fp32}, tmp_path / "work", lines.append, inputs=_inputs()
    )
    # TensorRT 10: fp16 from the fp32 ONNX; int8 needs the QDQ ONNX this build did not make.
    assert [r.precision for r in records] == ["fp16"]
    assert checked == [("fp16.plan", "fp32.onnx")]
    assert records[0].check == EngineCheck(
        reference=str(fp32), items=ITEMS, worst_output="y", max_abs=0.0, max_rel=0.0,
        atol=0.02, rtol=0.02,
    )
    assert trt_stage.read_record(tmp_path / "work" / "fp16.plan") == records[0]
    assert lines[0] == (
        "[tiny] tensorrt: TensorRT 10.13.0.35 on Fake GPU; profile x min [1, 4] opt [4, 4] max [8, 4]"
    )
    assert lines[1] == "[tiny] tensorrt fp16: building from the fp32 ONNX, flags FP16 (fp32.onnx)"
    assert lines[2].startswith(f"[tiny] tensorrt fp16: {tmp_path / 'work' / 'fp16.plan'} (0.0 MiB, sha256 ")
    assert lines[3].startswith(
        "[tiny] tensorrt fp16: check vs ONNX Runtime (fp32.onnx) on 40 held-out items: max abs error 0, "
    )
    assert lines[4] == (
        "[tiny] tensorrt int8: skipped: built from the int8 ONNX, flags INT8+FP16, and this build "
        "made no int8 ONNX"
    )
    assert len(lines) == 5


# --- engines on a GPU with TensorRT (skipped elsewhere, with availability()'s reason) ------


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=REASON)
def test_compile_stage_builds_and_checks_engines(tmp_path: Path) -> None:
    import tensorrt
    import torch

    fp32 = _tiny_onnx(tmp_path / "fp32.onnx")
    int8 = _qdq_onnx(fp32, tmp_path / "int8.onnx")
    lines: list[str] = []
    records = trt_stage.compile_stage(
        _tiny_spec(tmp_path), {"fp32": fp32, "int8": int8}, tmp_path / "work", lines.append,
        inputs=_inputs(), precisions=("fp32", "int8"),
    )
    assert [r.precision for r in records] == ["fp32", "int8"]
    for record in records:
        plan = Path(record.plan)
        assert plan == tmp_path / "work" / f"{record.precision}.plan"
        assert record.tensorrt_version == tensorrt.__version__
        assert record.gpu_name == torch.cuda.get_device_name()
        major, minor = torch.cuda.get_device_capability()
        assert record.compute_capability == f"{major}.{minor}"
        assert record.profile == {"x": ((1, FEATURES), (4, FEATURES), (MAX_BATCH, FEATURES))}
        assert record.plan_size_bytes == plan.stat().st_size
        assert trt_stage.read_record(plan) == record
        assert record.check is not None and record.check.items == ITEMS
    assert (tmp_path / "work" / "timing.cache").stat().st_size > 0
    assert lines[0].startswith(f"[tiny] tensorrt: TensorRT {tensorrt.__version__} on ")


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=REASON)
def test_fp16_engine_from_the_fp32_onnx_on_tensorrt_10(tmp_path: Path) -> None:
    if _tensorrt_major() >= trt_stage.STRONGLY_TYPED_ONLY_MAJOR:
        pytest.skip("TensorRT 11 builds fp16 engines from an fp16 ONNX only (no FP16 flag)")
    fp32 = _tiny_onnx(tmp_path / "fp32.onnx")
    lines: list[str] = []
    (record,) = trt_stage.compile_stage(
        _tiny_spec(tmp_path), {"fp32": fp32}, tmp_path / "work", lines.append, inputs=_inputs(),
        precisions=("fp16",),
    )
    assert record.builder_flags == ("FP16",)
    assert record.check is not None  # compile_stage raised CheckError otherwise
    assert (record.check.atol, record.check.rtol) == (0.02, 0.02)
    # A second build reuses the timing cache written by the first.
    trt_stage.compile_stage(
        _tiny_spec(tmp_path), {"fp32": fp32}, tmp_path / "work", lines.append, inputs=_inputs(),
        precisions=("fp16",),
    )
    assert any("timing cache" in line and "loaded" in line for line in lines)


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=REASON)
def test_parser_errors_name_the_model(tmp_path: Path) -> None:
    garbage = tmp_path / "fp32.onnx"
    garbage.write_bytes(b"not an onnx model")
    spec = _tiny_spec(tmp_path)
    with pytest.raises(EngineError) as error:
        trt_stage.build_engine(
            garbage, spec, "fp32", tmp_path / "fp32.plan",
            profile=trt_stage.optimization_profile(spec),
        )
    assert str(error.value).startswith(
        f"model 'tiny', stage 'tensorrt': TensorRT's ONNX parser rejected {garbage} (fp32 engine): "
    )
    assert not (tmp_path / "fp32.plan").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not AVAILABLE, reason=REASON)
def test_check_fails_beyond_the_tolerance_and_outside_the_profile(tmp_path: Path) -> None:
    spec = _tiny_spec(tmp_path)
    fp32 = _tiny_onnx(tmp_path / "fp32.onnx")
    record = trt_stage.build_engine(
        fp32, spec, "fp32", tmp_path / "fp32.plan", profile=trt_stage.optimization_profile(spec)
    )
    plan = Path(record.plan)
    other = _tiny_onnx(tmp_path / "other.onnx")
    model = onnx.load(str(other))
    model.graph.initializer[2].CopyFrom(
        onnx.numpy_helper.from_array(np.zeros((16, CLASSES), np.float32), "w2")
    )
    onnx.save(model, str(other))
    with pytest.raises(CheckError) as error:  # an engine of other weights: outputs differ
        trt_stage.check_engine(plan, other, spec, _inputs(), Tolerance(1e-3, 1e-3), precision="fp32")
    assert "TensorRT fp32 engine output 'y' differs from ONNX Runtime (other.onnx)" in str(error.value)
    runner = trt_stage.EngineRunner(plan, "tiny")
    with pytest.raises(EngineError, match=r"input 'x' has shape \[9, 4\], outside the engine's profile"):
        runner({"x": np.zeros((MAX_BATCH + 1, FEATURES), np.float32)})
