"""A user's files are hashed by content: overwriting one at the same path rebuilds the model, and
the build says which file changed."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln import paths
from kiln.build import pipeline
from kiln.spec import BuildSpec, ModelSpec, OnnxFileSource, TensorSpec, Variant


def _linear_onnx(path: Path, weights: np.ndarray) -> Path:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _spec(onnx_path: Path, npz: Path) -> ModelSpec:
    return ModelSpec(
        name="linear",
        backend="kiln_onnx",
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=(TensorSpec("y", "FP32", (3,)),),
        max_batch_size=8,
        build=BuildSpec(source=OnnxFileSource(str(onnx_path), str(npz)), variants=(Variant("fp32"),)),
    )


def _build(spec: ModelSpec, root: Path) -> str:
    out = io.StringIO()
    pipeline.build(
        [spec], out=out, artifacts=root / "artifacts", repository=root / "repo",
        backends=paths.available_backends(),
    )
    return out.getvalue()


def test_overwriting_a_user_file_at_the_same_path_rebuilds_and_says_which(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = _linear_onnx(tmp_path / "linear.onnx", rng.normal(size=(4, 3)))
    npz = tmp_path / "held.npz"
    np.savez(npz, x=rng.normal(size=(10, 4)).astype(np.float32))
    spec = _spec(model, npz)
    assert "[linear] building (no build manifest)" in _build(spec, tmp_path)
    assert "[linear] up to date" in _build(spec, tmp_path)

    np.savez(npz, x=rng.normal(size=(10, 4)).astype(np.float32))  # new data, same path
    assert "[linear] building (changed: data held_out)" in _build(spec, tmp_path)

    _linear_onnx(model, rng.normal(size=(4, 3)))  # new weights, same path
    log = _build(spec, tmp_path)
    assert "[linear] building (changed: data path)" in log
    assert "[linear] up to date" in _build(spec, tmp_path)


def test_source_data_files_names_the_user_files_that_exist(tmp_path: Path) -> None:
    model = _linear_onnx(tmp_path / "m.onnx", np.eye(4, 3))
    files = pipeline.source_data_files(OnnxFileSource(str(model), str(tmp_path / "missing.npz")))
    assert files == {"path": model}
