"""`kiln add`'s declared choices: output kinds (--kind), fixed input dims (--dims), INT8 settings
(--int8) and optional variants (--optional), from Python and the command line."""

from __future__ import annotations

import importlib
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln import byom, paths, registry
from kiln.build import pipeline
from kiln.byom import ByomError
from kiln.cli import main
from kiln.spec import Int8Options, OutputCheck, TensorSpec, Variant

OPSET = 17
SIDE = 8
CHANNELS = 3
CLASSES = 2
CANDIDATES = 4


@pytest.fixture
def models_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder of model folders; the registry state a build changes is restored."""
    folder = tmp_path / "models"
    folder.mkdir()
    saved_env = os.environ.get(paths.MODELS_ENV)
    package = importlib.import_module(registry.PACKAGE)
    saved_path = list(package.__path__)
    saved_modules = set(sys.modules)
    yield folder
    if saved_env is None:
        os.environ.pop(paths.MODELS_ENV, None)
    else:
        os.environ[paths.MODELS_ENV] = saved_env
    package.__path__[:] = saved_path
    for name in set(sys.modules) - saved_modules:
        if name.startswith(f"{registry.PACKAGE}."):
            del sys.modules[name]
    registry.folders.cache_clear()


def _image_onnx(path: Path) -> Path:
    """images FP32 [batch, 3, height, width] -> Conv 1x1 -> global mean -> head FP32 [batch,
    4 + CLASSES, CANDIDATES] (a detector-shaped output) and features FP32 [batch, 3]."""
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(CHANNELS, CHANNELS, 1, 1)).astype(np.float32)
    spread = rng.uniform(0.5, 1.5, size=(1, CHANNELS, 4 + CLASSES, CANDIDATES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["images", "w"], ["conv"], name="/backbone/conv/Conv"),
            helper.make_node("ReduceMean", ["conv"], ["pooled"], axes=[2, 3], keepdims=1, name="/pool/ReduceMean"),
            helper.make_node("Mul", ["pooled", "spread"], ["spreaded"], name="/head/Mul"),
            helper.make_node("ReduceSum", ["spreaded", "one"], ["head"], keepdims=0, name="/head/ReduceSum"),
            helper.make_node("Flatten", ["pooled"], ["features"], name="/features/Flatten"),
        ],
        "image",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", CHANNELS, "height", "width"])],
        [
            helper.make_tensor_value_info("head", TensorProto.FLOAT, ["batch", 4 + CLASSES, CANDIDATES]),
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", CHANNELS]),
        ],
        [
            numpy_helper.from_array(weight, "w"),
            numpy_helper.from_array(spread, "spread"),
            numpy_helper.from_array(np.array([1], np.int64), "one"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _images(items: int = 16, side: int = SIDE) -> dict[str, np.ndarray]:
    return {"images": np.random.default_rng(1).uniform(size=(items, CHANNELS, side, side)).astype(np.float32)}


def _add(tmp_path: Path, models_dir: Path, name: str = "byom_image", **options) -> byom.Scaffold:
    return byom.add_onnx(name, _image_onnx(tmp_path / "image.onnx"), _images(), dest_dir=models_dir, **options)


# --- output kinds -------------------------------------------------------------------------------


def test_a_declared_kind_replaces_the_inferred_one_and_says_so(tmp_path: Path, models_dir: Path) -> None:
    scaffold = _add(tmp_path, models_dir, output_kinds={"head": "detections"})
    assert scaffold.spec.build.outputs == (OutputCheck("head", "detections"), OutputCheck("features", "embedding"))
    assert '# head: declared; the rule would say regression\n            OutputCheck("head", "detections"),' in (
        scaffold.spec_text
    )
    assert "output  head: FP32 [batch, 6, 4], kind detections (declared; the rule would say regression)" in (
        scaffold.summary
    )
    assert "| output `head` | FP32 [batch, 6, 4] | detections (declared) |" in (scaffold.folder / "README.md").read_text()


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ({"nope": "regression"}, "output kinds: 'nope' is no output (the outputs: 'head', 'features')"),
        ({"head": "boxes"}, "output 'head': 'boxes' is no kind (one of class_scores, probabilities, regression"),
        ({"features": "detections"}, "output 'features' is FP32 [batch, 3]: a detections output holds two per-item dims"),
    ],
)
def test_bad_declared_kinds_are_named(tmp_path: Path, models_dir: Path, kinds: dict, expected: str) -> None:
    with pytest.raises(ByomError) as caught:
        _add(tmp_path, models_dir, output_kinds=kinds)
    assert expected in str(caught.value)
    assert not (models_dir / "byom_image").exists()


# --- fixed input dims ---------------------------------------------------------------------------


def test_fixed_dims_are_declared_by_the_folders_model(tmp_path: Path, models_dir: Path) -> None:
    scaffold = _add(tmp_path, models_dir, input_dims={"images": (CHANNELS, SIDE, SIDE)})
    assert scaffold.spec.inputs == (TensorSpec("images", "FP32", (CHANNELS, SIDE, SIDE)),)
    assert not scaffold.spec.warmup[0].dims  # every dim fixed: no warmup dims needed
    graph = onnx.load(str(scaffold.folder / "model.onnx")).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [CHANNELS, SIDE, SIDE]
    assert "input 'images': per-item dims fixed to [3, 8, 8] (the graph's are FP32 [batch, 3, ?, ?])" in scaffold.summary
    original = onnx.load(str(tmp_path / "image.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert original[2].dim_param == "height"  # the user's file is left as it was


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        ({"pixels": (3, 8, 8)}, "input dims: 'pixels' is no input (the inputs: 'images')"),
        ({"images": (3, 8)}, "input 'images' has 3 per-item dims (FP32 [batch, 3, ?, ?]), got 2: [3, 8]"),
        ({"images": (1, 8, 8)}, "input 'images': dim 0 is 3 in the graph, not 1"),
        ({"images": (3, 0, 8)}, "input 'images': dims must be sizes >= 1, got [3, 0, 8]"),
    ],
)
def test_bad_fixed_dims_are_named(tmp_path: Path, models_dir: Path, dims: dict, expected: str) -> None:
    with pytest.raises(ByomError) as caught:
        _add(tmp_path, models_dir, input_dims=dims)
    assert expected in str(caught.value)


def test_samples_of_another_shape_than_the_fixed_dims_are_refused(tmp_path: Path, models_dir: Path) -> None:
    with pytest.raises(ByomError, match=r"array 'images' has shape \[16, 3, 8, 8\], input 'images' needs \[items, 3, 9, 9\]"):
        _add(tmp_path, models_dir, input_dims={"images": (CHANNELS, 9, 9)})


# --- INT8 settings ------------------------------------------------------------------------------


def test_int8_settings_expand_node_patterns_into_the_spec(tmp_path: Path, models_dir: Path) -> None:
    scaffold = _add(
        tmp_path, models_dir, int8={"nodes_to_exclude": "/head/*", "op_types_to_quantize": "Conv,Mul",
                                    "per_channel": "false", "method": "percentile"},
    )
    assert scaffold.spec.build.int8 == Int8Options(
        method="percentile", per_channel=False, op_types_to_quantize=("Conv", "Mul"),
        nodes_to_exclude=("/head/Mul", "/head/ReduceSum"),
    )
    assert "nodes_to_exclude '/head/*' matched 2 node(s) of the graph (/head/Mul ... /head/ReduceSum)" in scaffold.summary
    assert 'op_types_to_quantize=("Conv", "Mul"),' in scaffold.spec_text
    assert "    Int8Options,\n" in scaffold.spec_text


def test_int8_settings_given_as_options_build(tmp_path: Path, models_dir: Path) -> None:
    scaffold = _add(
        tmp_path, models_dir, variants=("fp32", "int8"),
        int8=Int8Options(nodes_to_exclude=("/head/*",)), output_kinds={"head": "regression"},
    )
    assert scaffold.spec.build.int8.nodes_to_exclude == ("/head/Mul", "/head/ReduceSum")
    registry.add_models_dir(models_dir)
    out = io.StringIO()
    results = pipeline.build(
        [registry.by_name("byom_image")], out=out, artifacts=tmp_path / "artifacts",
        repository=tmp_path / "repository", backends=paths.available_backends(),
    )
    assert [(r.variant, r.status) for r in results] == [("fp32", pipeline.BUILT), ("int8", pipeline.BUILT)], out.getvalue()


@pytest.mark.parametrize(
    ("settings", "variants", "expected"),
    [
        ({"nodes": "x"}, ("fp32", "int8"), "int8 settings: 'nodes' is no field of kiln.spec.Int8Options"),
        ({"nodes_to_exclude": "/tail/*"}, ("fp32", "int8"), "pattern '/tail/*' matches no node of the graph"),
        ({"nodes_to_exclude": "/head/Add"}, ("fp32", "int8"), "nodes_to_exclude: the graph has no node '/head/Add'"),
        ({"exclude_op_types": "Softmax"}, ("fp32", "int8"), "exclude_op_types: the graph has no 'Softmax' node"),
        ({"per_channel": "maybe"}, ("fp32", "int8"), "int8 setting 'per_channel' must be true or false, got 'maybe'"),
        ({"method": "minmax"}, ("fp32", "fp16"), "INT8 settings were given, but no int8 variant is asked for"),
    ],
)
def test_bad_int8_settings_are_named(
    tmp_path: Path, models_dir: Path, settings: dict, variants: tuple, expected: str
) -> None:
    with pytest.raises(ByomError) as caught:
        _add(tmp_path, models_dir, int8=settings, variants=variants)
    assert expected in str(caught.value)


# --- optional variants --------------------------------------------------------------------------


def test_optional_variants() -> None:
    assert byom.variants_from(["fp32", "fp16", "int8"], ["int8"]) == (
        Variant("fp32"), Variant("fp16", max_metric_drop=0.01), Variant("int8", max_metric_drop=0.05, optional=True),
    )
    with pytest.raises(ByomError, match="fp32 cannot be optional"):
        byom.variants_from(["fp32", "int8"], ["fp32"])
    with pytest.raises(ByomError, match=r"optional variant\(s\) 'fp16' are not among the variants \(fp32, int8\)"):
        byom.variants_from(["fp32", "int8"], ["fp16"])
    with pytest.raises(ByomError, match="'int4' is no precision"):
        byom.variants_from(["fp32", "int4"])


# --- the command line ---------------------------------------------------------------------------


def test_kiln_add_flags(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "samples.npz"
    np.savez(npz, **_images())
    model = _image_onnx(tmp_path / "image.onnx")
    argv = [
        "add", "byom_flags", "--onnx", str(model), "--samples", str(npz), "--to", str(models_dir),
        "--dims", "images=3,8,8", "--kind", "head=detections", "--variants", "fp32,fp16,int8",
        "--optional", "int8", "--int8", "nodes_to_exclude=/head/*", "--int8", "nodes_to_exclude=/pool/ReduceMean",
        "--int8", "reduce_range=false",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert 'TensorSpec("images", "FP32", (3, 8, 8)),' in out
    assert 'Variant("int8", max_metric_drop=0.05, optional=True),' in out
    assert 'OutputCheck("head", "detections"),' in out
    spec = byom._load_spec(models_dir / "byom_flags" / "spec.py")
    assert spec.build.int8 == Int8Options(
        reduce_range=False, nodes_to_exclude=("/head/Mul", "/head/ReduceSum", "/pool/ReduceMean")
    )


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--kind", "head"], "--kind must look like OUTPUT=KIND (e.g. output0=detections), got 'head'"),
        (["--kind", "head=detections", "--kind", "head=regression"], "--kind gives output 'head' two kinds"),
        (["--dims", "images=3,eight,8"], "--dims images=3,eight,8: the dims must be sizes, comma-separated"),
        (["--int8", "speed=fast"], "--int8 speed=...: 'speed' is no field of kiln.spec.Int8Options"),
        (["--int8", "method=minmax", "--int8", "method=entropy"], "--int8 gives method twice"),
        (["--optional", "fp16"], "optional variant(s) 'fp16' are not among the variants (fp32, int8)"),
    ],
)
def test_kiln_add_flag_errors(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str], extra: list, expected: str
) -> None:
    npz = tmp_path / "samples.npz"
    np.savez(npz, **_images())
    model = _image_onnx(tmp_path / "image.onnx")
    argv = ["add", "byom_bad", "--onnx", str(model), "--samples", str(npz), "--to", str(models_dir), *extra]
    assert main(argv) == 2
    assert expected in capsys.readouterr().err
    assert not (models_dir / "byom_bad").exists()


def test_dims_go_with_an_onnx_file(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["add", "byom_bad", "--factory", "x:y", "--samples", "s.npz", "--to", str(models_dir), "--dims", "x=1"]
    assert main(argv) == 2
    assert "--dims goes with --onnx" in capsys.readouterr().err
