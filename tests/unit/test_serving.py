"""The kiln_onnx backend's logic without Triton: parameters, request validation, batching, load
checks against real ONNX Runtime sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from kiln.serving.batch import RequestError, TensorContract, run_batch, validate_request
from kiln.serving.onnx import ONNX_PARAMS, ModelLoadError, OnnxModel, OnnxParams
from kiln.serving.params import Param, ParamError, config_parameters, parse_params

F32 = np.dtype(np.float32)
X = TensorContract("x", F32, (4,))
Y = TensorContract("y", F32, (4,))


def config(mbs: int = 8, in_dims=(4,), in_type="TYPE_FP32", out_name="y", **params) -> dict:
    return {
        "max_batch_size": mbs,
        "input": [{"name": "x", "data_type": in_type, "dims": list(in_dims)}],
        "output": [{"name": out_name, "data_type": "TYPE_FP32", "dims": [4]}],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


@pytest.fixture(scope="module")
def add_one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A version folder holding model.onnx computing y = x + 1 on [batch, 4] FP32."""
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "one"], ["y"])],
        "add_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = tmp_path_factory.mktemp("add_one")
    onnx.save(model, folder / "model.onnx")
    return folder


# -- parameters ---------------------------------------------------------------------------------


def test_params_parse_with_defaults() -> None:
    params = parse_params("m", {"intra_op_threads": "2"}, ONNX_PARAMS, OnnxParams)
    assert params.intra_op_threads == 2
    assert params.inter_op_threads == 0
    assert params.execution_providers == ("CPUExecutionProvider",)
    assert params.reject_non_finite is True


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"intra_op_threads": "-1"}, "model 'm': parameter 'intra_op_threads' must be an integer >= 0, got '-1'"),
        ({"reject_non_finite": "maybe"}, "parameter 'reject_non_finite' must be true or false, got 'maybe'"),
        ({"graph_optimization_level": "max"}, "must be one of disable, basic, extended, all, got 'max'"),
        ({"execution_providers": " , "}, "parameter 'execution_providers' must be a comma-separated list"),
        ({"threads": "1", "zzz": "2"}, "model 'm': unknown parameter 'threads', 'zzz'; allowed: "),
    ],
)
def test_bad_params_name_model_key_allowed_and_given(raw: dict, message: str) -> None:
    with pytest.raises(ParamError) as caught:
        parse_params("m", raw, ONNX_PARAMS, OnnxParams)
    assert message in str(caught.value)


def test_the_ints_kind_parses_comma_separated_integers_with_the_minimum_on_each() -> None:
    sizes = Param("sizes", "ints", (), "sizes", minimum=3)
    assert sizes.parse("m", " 8, 16 ,32") == (8, 16, 32)
    assert sizes.parse("m", "3,") == (3,)
    assert Param("any", "ints", (), "any").parse("m", "-2,0") == (-2, 0)  # no minimum: any integer
    for bad in ("8,x", "0", "8,2", "1.5", "", " , "):
        with pytest.raises(ParamError) as caught:
            sizes.parse("m", bad)
        assert str(caught.value) == (
            f"model 'm': parameter 'sizes' must be a comma-separated list of integers, each >= 3, got {bad!r}"
        )


def test_config_parameters_flattens_triton_json() -> None:
    assert config_parameters(config(intra_op_threads="3")) == {"intra_op_threads": "3"}
    assert config_parameters({}) == {}


# -- request validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input 'x'"),
        ({"x": np.zeros((2, 4), np.float64)}, "input 'x' has dtype float64; expected float32"),
        ({"x": np.zeros((2, 5), F32)}, "input 'x' has shape [2, 5]; expected [-1, 4]"),
        ({"x": np.zeros((4,), F32)}, "input 'x' has shape [4]; expected [-1, 4]"),
        ({"x": np.zeros((0, 4), F32)}, "input 'x' has an empty batch (batch size 0)"),
        ({"x": np.array([[0, np.nan, np.inf, 1]], F32)}, "input 'x' contains NaN or infinity (2 of 4 values)"),
    ],
)
def test_validate_request_names_the_problem(inputs: dict, message: str) -> None:
    with pytest.raises(RequestError) as caught:
        validate_request(inputs, [X], batched=True, reject_non_finite=True)
    assert str(caught.value) == message


def test_validate_request_checks_batch_agreement_and_allows_nan_when_told() -> None:
    two = [X, TensorContract("z", F32, (-1,))]
    with pytest.raises(RequestError, match="inputs 'x' and 'z' disagree on the batch size \\(2 and 3\\)"):
        validate_request(
            {"x": np.zeros((2, 4), F32), "z": np.zeros((3, 7), F32)}, two,
            batched=True, reject_non_finite=True,
        )
    nan = {"x": np.full((1, 4), np.nan, F32)}
    assert validate_request(nan, [X], batched=True, reject_non_finite=False) == 1


# -- batching -----------------------------------------------------------------------------------


def test_run_batch_concatenates_once_and_splits_in_order() -> None:
    calls = []

    def run(feed):
        calls.append(feed["x"].shape)
        return {"y": feed["x"] * 2}

    requests = [{"x": np.full((n, 4), n, F32)} for n in (1, 3, 2)]
    results = run_batch(requests, [X], [Y], run, batched=True, reject_non_finite=True)
    assert calls == [(6, 4)]
    for n, result in zip((1, 3, 2), results, strict=True):
        np.testing.assert_array_equal(result["y"], np.full((n, 4), 2 * n, F32))


def test_bad_request_fails_alone_and_the_rest_succeed() -> None:
    requests = [
        {"x": np.ones((1, 4), F32)},
        {"x": np.ones((1, 4), np.float64)},
        {"x": np.array([[np.nan, 0, 0, 0]], F32)},
        {"x": np.full((2, 4), 5, F32)},
    ]
    results = run_batch(
        requests, [X], [Y], lambda f: {"y": f["x"] + 1}, batched=True, reject_non_finite=True
    )
    np.testing.assert_array_equal(results[0]["y"], np.full((1, 4), 2, F32))
    assert str(results[1]) == "input 'x' has dtype float64; expected float32"
    assert "NaN or infinity" in str(results[2])
    np.testing.assert_array_equal(results[3]["y"], np.full((2, 4), 6, F32))


def test_variable_dims_are_grouped_by_shape() -> None:
    seq = TensorContract("x", F32, (-1,))
    shapes = []

    def run(feed):
        shapes.append(feed["x"].shape)
        return {"y": feed["x"].sum(axis=1, keepdims=True)}

    requests = [{"x": np.ones((1, 3), F32)}, {"x": np.ones((1, 5), F32)}, {"x": np.ones((2, 3), F32)}]
    out = TensorContract("y", F32, (1,))
    results = run_batch(requests, [seq], [out], run, batched=True, reject_non_finite=True)
    assert sorted(shapes) == [(1, 5), (3, 3)]
    assert [r["y"].ravel().tolist() for r in results] == [[3.0], [5.0], [3.0, 3.0]]


def test_model_failure_reaches_every_request_of_that_run() -> None:
    def run(feed):
        raise RuntimeError("out of memory")

    results = run_batch(
        [{"x": np.ones((1, 4), F32)}] * 3, [X], [Y], run, batched=True, reject_non_finite=True
    )
    assert [str(r) for r in results] == ["inference failed on a batch of 3 request(s): out of memory"] * 3


def test_output_with_wrong_batch_is_an_error_not_a_silent_misalignment() -> None:
    results = run_batch(
        [{"x": np.ones((2, 4), F32)}], [X], [Y], lambda f: {"y": f["x"][:1]},
        batched=True, reject_non_finite=True,
    )
    assert "output 'y' has shape [1, 4], but the batch holds 2 item(s)" in str(results[0])


def test_outputs_are_cast_to_the_configured_dtype() -> None:
    out = TensorContract("y", np.dtype(np.float16), (4,))
    (result,) = run_batch(
        [{"x": np.ones((1, 4), F32)}], [X], [out], lambda f: {"y": f["x"]},
        batched=True, reject_non_finite=True,
    )
    assert result["y"].dtype == np.float16


# -- OnnxModel.load against real ONNX Runtime sessions -----------------------------------------


def test_load_and_infer_a_dynamic_batch(add_one: Path) -> None:
    model = OnnxModel.load("add", add_one, config(intra_op_threads="1"), {"intra_op_threads": "1"})
    results = model.infer([{"x": np.zeros((1, 4), F32)}, {"x": np.ones((2, 4), F32)}])
    np.testing.assert_array_equal(results[0]["y"], np.ones((1, 4), F32))
    np.testing.assert_array_equal(results[1]["y"], np.full((2, 4), 2, F32))


def test_a_config_input_with_allow_ragged_batch_loads_and_serves(add_one: Path) -> None:
    ragged = config(intra_op_threads="1")
    ragged["input"][0]["allow_ragged_batch"] = True  # as Triton passes `allow_ragged_batch: true`
    model = OnnxModel.load("add", add_one, ragged, {"intra_op_threads": "1"})
    results = model.infer([{"x": np.zeros((1, 4), F32)}, {"x": np.ones((2, 4), F32)}])
    np.testing.assert_array_equal(results[1]["y"], np.full((2, 4), 2, F32))


@pytest.mark.parametrize(
    ("cfg", "raw", "message"),
    [
        (config(), {"model_filename": "nope.onnx"}, "model 'add': "),
        (config(), {"execution_providers": "CUDAExecutionProvider"},
         "parameter 'execution_providers' names CUDAExecutionProvider, which this onnxruntime does not have"),
        (config(in_type="TYPE_INT64"), {}, "input 'x' is int64 in config.pbtxt but tensor(float) in the ONNX model"),
        (config(in_dims=(5,)), {}, "input 'x' has dims [-1, 5] in config.pbtxt but ['batch', 4] in the ONNX model"),
        (config(mbs=0), {}, "input 'x' has dims [4] in config.pbtxt but ['batch', 4]"),
        (config(out_name="probs"), {}, "output 'probs' is not an output of the ONNX model (its outputs: y)"),
        ({**config(), "input": []}, {}, "the ONNX model needs input(s) x, which config.pbtxt does not declare"),
        (config(in_type="TYPE_STRING"), {}, "tensor 'x' has data_type TYPE_STRING, which kiln_onnx does not serve"),
    ],
)
def test_load_fails_naming_the_model_and_the_mismatch(
    add_one: Path, cfg: dict, raw: dict, message: str
) -> None:
    with pytest.raises(ModelLoadError) as caught:
        OnnxModel.load("add", add_one, cfg, raw)
    assert message in str(caught.value)


def test_missing_file_points_at_the_build(add_one: Path) -> None:
    with pytest.raises(ModelLoadError, match="run `make build-engines` to build it"):
        OnnxModel.load("add", add_one, config(), {"model_filename": "nope.onnx"})
