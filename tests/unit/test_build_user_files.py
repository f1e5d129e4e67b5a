"""A user's files are hashed by content: overwriting one at the same path rebuilds the model, and
the build says which file changed; the build writes the model's config beside its artifact."""

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
    log = _build(spec, tmp_path)
    assert "[linear] building (no build manifest)" in log
    # kiln build writes the config too: a published model.onnx never lacks one (no kiln generate).
    config = (tmp_path / "repo" / "linear" / "config.pbtxt").read_text()
    assert 'name: "linear"' in config and 'backend: "kiln_onnx"' in config
    assert "kiln build: 1 config(s) in" in log
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


def test_an_onnx_file_is_checked_against_an_independent_reference(tmp_path: Path) -> None:
    import pytest

    from kiln.build import check
    from kiln.build.check import BuildError

    rng = np.random.default_rng(1)
    weights = rng.normal(size=(4, 3))
    model = _linear_onnx(tmp_path / "linear.onnx", weights)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    npz = tmp_path / "held.npz"
    np.savez(npz, x=x)
    spec = _spec(model, npz)
    # Without a reference of the user's: the file on ONNX Runtime with every optimization off.
    unoptimized = check.onnx_runner(model, spec, optimized=False)
    np.testing.assert_allclose(unoptimized({"x": x})["y"], x @ weights.astype(np.float32), rtol=1e-5)
    assert "reference: FP32 source ONNX (graph optimizations off)" in _build(spec, tmp_path / "a")

    # With the outputs the user's framework gave: the served model must match them.
    good = tmp_path / "expected.npz"
    np.savez(good, y=(x @ weights).astype(np.float32))
    source = OnnxFileSource(str(model), str(npz), reference=str(good))
    with_reference = ModelSpec(**{**spec.__dict__, "build": BuildSpec(source=source, variants=(Variant("fp32"),))})
    assert "reference: FP32 reference outputs given with the source" in _build(with_reference, tmp_path / "b")

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, y=(x @ weights + 1.0).astype(np.float32))
    source = OnnxFileSource(str(model), str(npz), reference=str(wrong))
    off = ModelSpec(**{**spec.__dict__, "build": BuildSpec(source=source, variants=(Variant("fp32"),))})
    with pytest.raises(BuildError, match=r"model 'linear', stage 'check': .*'y'"):
        _build(off, tmp_path / "c")
