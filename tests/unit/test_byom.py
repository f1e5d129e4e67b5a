"""Bring your own model: an ONNX file or a PyTorch module to a model folder (`kiln.byom`, `kiln add`)
that the registry discovers and `kiln build` builds and gates."""

from __future__ import annotations

import importlib
import io
import os
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from google.protobuf import text_format
from onnx import TensorProto, helper, numpy_helper
from tritonclient.grpc import model_config_pb2

from kiln import byom, paths, registry
from kiln.build import pipeline
from kiln.byom import ByomError
from kiln.cli import main
from kiln.repository import render
from kiln.spec import (
    CheckpointSource,
    ModelSpec,
    OnnxFileSource,
    SpecError,
    TensorSpec,
    Variant,
    Warmup,
    validate,
)

OPSET = 17
FEATURES = 4
CLASSES = 3
ITEMS = 80
"""Samples per test model: split 40 + 40, so one top-1 flip costs 0.025 (the int8 budget is 0.05)."""


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def models_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty folder of model folders; the registry state `add_models_dir` changes is restored
    afterwards (KILN_MODELS, `kiln.models.__path__`, the folders cache, imported folder modules)."""
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


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user's module, on sys.path under a name of its own: a factory of an nn.Sequential of
    Linear layers, a module class buildable with no arguments, and one that is not."""
    name = f"byom_user_{uuid.uuid4().hex[:8]}"
    source = tmp_path / "user_code"
    source.mkdir()
    (source / f"{name}.py").write_text(textwrap.dedent(f"""
        import torch
        from torch import nn


        def make_net() -> nn.Module:
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear({FEATURES}, 8), nn.ReLU(), nn.Linear(8, {CLASSES}))


        class TinyNet(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.hidden = nn.Linear({FEATURES}, 8)
                self.head = nn.Linear(8, {CLASSES})

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.head(torch.relu(self.hidden(x)))


        class WideNet(nn.Module):
            def __init__(self, width: int) -> None:
                super().__init__()
                self.layer = nn.Linear({FEATURES}, width)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.layer(x)
    """))
    monkeypatch.syspath_prepend(str(source))
    return name


def _save(model: onnx.ModelProto, path: Path) -> Path:
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def _linear_onnx(path: Path, batch: str | int = "batch", output: str = "logits") -> Path:
    """x FP32 [batch, 4] -> MatMul -> output FP32 [batch, 3]."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], [output])],
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, FEATURES])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "w")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def _sequence_onnx(path: Path) -> Path:
    """tokens FP32 [batch, seq, 4] -> mean over seq -> MatMul -> embedding FP32 [batch, 3]."""
    rng = np.random.default_rng(1)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["tokens"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "w"], ["embedding"]),
        ],
        "sequence",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq", FEATURES])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(rng.normal(size=(FEATURES, CLASSES)).astype(np.float32), "w")],
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), path)


def _samples(items: int = ITEMS, shape: tuple[int, ...] = (FEATURES,), name: str = "x") -> dict[str, np.ndarray]:
    return {name: np.random.default_rng(2).normal(size=(items, *shape)).astype(np.float32)}


def _build(name: str, models: Path, root: Path) -> tuple[list[pipeline.BuildResult], str]:
    """Makes `models` known to the registry, then builds the discovered spec into tmp folders."""
    registry.add_models_dir(models)
    spec = registry.by_name(name)
    out = io.StringIO()
    results = pipeline.build(
        [spec], out=out, artifacts=root / "artifacts", repository=root / "repository",
        backends=paths.available_backends(),
    )
    return results, out.getvalue()


def _assert_built_and_gated(
    name: str, results: list[pipeline.BuildResult], log: str, root: Path, precisions: tuple[str, ...]
) -> None:
    assert [(r.model, r.variant, r.status) for r in results] == [
        (name, p, pipeline.BUILT) for p in precisions
    ], log
    for precision in precisions:
        served = name if precision == "fp32" else f"{name}_{precision}"
        assert (root / "repository" / served / "1" / "model.onnx").is_file()
    for precision in precisions[1:]:
        assert f"[{name}] {precision} outputs: " in log  # the per-output gates ran
        result = next(r for r in results if r.variant == precision)
        assert result.metric_drop <= result.max_metric_drop


# --- signature inference ----------------------------------------------------------------------


def test_infer_signature_of_a_dynamic_batch_graph(tmp_path: Path) -> None:
    signature = byom.infer_signature(_linear_onnx(tmp_path / "m.onnx"), max_batch_size=16)
    assert signature.inputs == (TensorSpec("x", "FP32", (FEATURES,)),)  # the initializer is left out
    assert signature.outputs == (TensorSpec("logits", "FP32", (CLASSES,)),)
    assert signature.max_batch_size == 16
    assert signature.opset == OPSET
    assert "it is the batch axis" in signature.batching


def test_infer_signature_of_a_fixed_batch_graph_keeps_the_batch_dim(tmp_path: Path) -> None:
    signature = byom.infer_signature(_linear_onnx(tmp_path / "m.onnx", batch=1))
    assert signature.max_batch_size == 0
    assert signature.inputs == (TensorSpec("x", "FP32", (1, FEATURES)),)
    assert signature.outputs == (TensorSpec("logits", "FP32", (1, CLASSES)),)
    assert "fixed in 'x' (1)" in signature.batching and "max_batch_size 0" in signature.batching


def test_infer_signature_symbolic_and_unknown_dims_are_minus_one(tmp_path: Path) -> None:
    signature = byom.infer_signature(_sequence_onnx(tmp_path / "m.onnx"))
    assert signature.inputs == (TensorSpec("tokens", "FP32", (-1, FEATURES)),)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.INT64, ["n", None])],  # None: an unknown dim
        [helper.make_tensor_value_info("b", TensorProto.INT64, ["n", None])],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "i.onnx")
    assert byom.infer_signature(path).inputs == (TensorSpec("a", "INT64", (-1,)),)


def test_infer_signature_names_what_cannot_be_served(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.BFLOAT16, ["n", 2])],
        [helper.make_tensor_value_info("b", TensorProto.BFLOAT16, ["n", 2])],
    )
    path = _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), tmp_path / "b.onnx")
    with pytest.raises(ByomError, match="input 'a' is BFLOAT16, which kiln_onnx does not serve"):
        byom.infer_signature(path)
    with pytest.raises(ByomError, match="does not exist"):
        byom.infer_signature(tmp_path / "missing.onnx")


# --- Warmup.dims --------------------------------------------------------------------------------


def _variable_spec(**warmup: object) -> ModelSpec:
    return ModelSpec(
        name="seq",
        backend="kiln_onnx",
        inputs=(TensorSpec("ids", "INT64", (-1,)), TensorSpec("mask", "INT64", (-1,)),
                TensorSpec("extra", "FP32", (2,))),
        outputs=(TensorSpec("out", "FP32", (3,)),),
        max_batch_size=8,
        warmup=(Warmup(**warmup),),
    )


def _problems(spec: ModelSpec) -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        validate([spec])
    return caught.value.problems


def test_warmup_of_variable_dims_needs_every_variable_input() -> None:
    (problem,) = _problems(_variable_spec(dims={"ids": (16,)}))
    assert "'warmup[0]' needs fixed input dims; input(s) mask have a -1 dim" in problem
    assert "fixed input dims or Warmup.dims" in problem and "'mask': (8,)" in problem
    validate([_variable_spec(dims={"ids": (16,), "mask": (16,)})])


@pytest.mark.parametrize(
    ("dims", "expected"),
    [
        ({"ids": (16,), "mask": (16,), "nope": (1,)}, "'warmup[0].dims' names 'nope', which is not an input"),
        ({"ids": (16,), "mask": (16,), "extra": (2,)}, "'warmup[0].dims['extra']' is only for inputs with a -1 dim"),
        ({"ids": (16, 2), "mask": (16,)}, "'warmup[0].dims['ids']' must be a tuple of 1 sizes >= 1"),
        ({"ids": (0,), "mask": (16,)}, "got (0,)"),
        ({"ids": [16], "mask": (16,)}, "got [16]"),
    ],
)
def test_warmup_dims_are_checked(dims: dict, expected: str) -> None:
    assert any(expected in p for p in _problems(_variable_spec(dims=dims))), _problems(_variable_spec(dims=dims))


def test_warmup_dims_are_rendered_into_the_config() -> None:
    spec = _variable_spec(dims={"ids": (16,), "mask": (16,)})
    config = text_format.Parse(render(spec), model_config_pb2.ModelConfig())
    inputs = config.model_warmup[0].inputs
    assert list(inputs["ids"].dims) == [16] and list(inputs["mask"].dims) == [16]
    assert list(inputs["extra"].dims) == [2]  # a fixed input keeps its spec dims


# --- scaffolding: ONNX --------------------------------------------------------------------------


def test_add_onnx_writes_a_folder_that_builds_and_gates(tmp_path: Path, models_dir: Path) -> None:
    scaffold = byom.add_onnx(
        "byom_linear", _linear_onnx(tmp_path / "linear.onnx"), _samples(), dest_dir=models_dir
    )
    folder = models_dir / "byom_linear"
    assert scaffold.folder == folder
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "held_out.npz", "model.onnx", "spec.py"]
    assert (folder / "spec.py").read_text() == scaffold.spec_text
    assert 'path=str(HERE / "model.onnx")' in scaffold.spec_text  # relative to the folder
    assert '# logits: 1-D, 3 values, the name says logits/scores/class/prob\n            OutputCheck("logits", "class_scores"),' in scaffold.spec_text
    assert "split at random (seed 0) into 40 evaluation and 40 INT8 calibration items" in scaffold.summary
    with np.load(folder / "held_out.npz") as held:
        assert sorted(held.files) == ["calibration/x", "x"]
        assert held["x"].shape == (40, FEATURES) and held["x"].dtype == np.float32  # cast from float64

    results, log = _build("byom_linear", models_dir, tmp_path)
    _assert_built_and_gated("byom_linear", results, log, tmp_path, ("fp32", "int8"))
    assert "'logits' (3,) class_scores (declared)" in log  # the kind the spec wrote down


def test_add_onnx_with_variable_dims_warms_up_at_the_samples_shape(tmp_path: Path, models_dir: Path) -> None:
    samples = _samples(shape=(16, FEATURES), name="tokens")
    scaffold = byom.add_onnx(
        "byom_sequence", _sequence_onnx(tmp_path / "seq.onnx"), samples, dest_dir=models_dir,
        calibration=_samples(items=10, shape=(16, FEATURES), name="tokens"), max_batch_size=4,
    )
    spec = scaffold.spec
    assert spec.inputs == (TensorSpec("tokens", "FP32", (-1, FEATURES)),)
    assert spec.max_batch_size == 4
    assert spec.warmup[0].dims == {"tokens": (16, FEATURES)}
    assert "--shape tokens:16,4" in scaffold.summary
    assert "--shape tokens:16,4" in (scaffold.folder / "README.md").read_text()
    assert "80 evaluation items (the samples), 10 INT8 calibration items" in scaffold.summary
    config = text_format.Parse(render(spec), model_config_pb2.ModelConfig())
    assert list(config.input[0].dims) == [-1, FEATURES]
    assert list(config.model_warmup[0].inputs["tokens"].dims) == [16, FEATURES]

    results, log = _build("byom_sequence", models_dir, tmp_path)
    _assert_built_and_gated("byom_sequence", results, log, tmp_path, ("fp32", "int8"))


def _fixed_batch_scaffold(tmp_path: Path, models_dir: Path) -> byom.Scaffold:
    return byom.add_onnx(
        "byom_fixed", _linear_onnx(tmp_path / "fixed.onnx", batch=1), _samples(),
        dest_dir=models_dir, variants=("fp32",),
    )


def test_add_onnx_with_a_fixed_batch_dim_serves_it_unbatched(tmp_path: Path, models_dir: Path) -> None:
    scaffold = _fixed_batch_scaffold(tmp_path, models_dir)
    assert scaffold.spec.max_batch_size == 0 and scaffold.spec.dynamic_batching is None
    assert scaffold.spec.inputs == (TensorSpec("x", "FP32", (1, FEATURES)),)
    assert scaffold.spec.outputs == (TensorSpec("logits", "FP32", (1, CLASSES)),)
    assert "max_batch_size 0" in scaffold.summary and "max_batch_size=0," in scaffold.spec_text
    with np.load(scaffold.folder / "held_out.npz") as held:
        assert held["x"].shape == (ITEMS, 1, FEATURES)  # each sample row is one request [1, 4]


def test_a_fixed_batch_onnx_builds(tmp_path: Path, models_dir: Path) -> None:
    _fixed_batch_scaffold(tmp_path, models_dir)
    results, log = _build("byom_fixed", models_dir, tmp_path)
    _assert_built_and_gated("byom_fixed", results, log, tmp_path, ("fp32",))


def test_add_refuses_an_existing_folder_without_force(tmp_path: Path, models_dir: Path) -> None:
    model = _linear_onnx(tmp_path / "m.onnx")
    byom.add_onnx("byom_again", model, _samples(), dest_dir=models_dir, variants=("fp32",))
    (models_dir / "byom_again" / "notes.txt").write_text("mine")
    with pytest.raises(ByomError, match=r"byom_again' already exists; pass force=True \(kiln add --force\)"):
        byom.add_onnx("byom_again", model, _samples(), dest_dir=models_dir)
    byom.add_onnx("byom_again", model, _samples(), dest_dir=models_dir, force=True)
    assert (models_dir / "byom_again" / "notes.txt").read_text() == "mine"  # not ours: left alone


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ({"y": np.zeros((4, FEATURES), np.float32)}, "samples: no array for input(s) 'x'; array(s) 'y' name no input"),
        ({"x": np.zeros((4, 5), np.float32)}, "array 'x' has shape [4, 5], input 'x' needs [items, 4]"),
        ({"x": np.zeros((4, FEATURES), np.int64)}, "array 'x' is int64, input 'x' needs float32 (FP32)"),
        ({"x": np.zeros((1, FEATURES), np.float32)}, "the samples hold 1 item(s): INT8 needs calibration items"),
    ],
)
def test_bad_samples_are_named(tmp_path: Path, models_dir: Path, samples: dict, expected: str) -> None:
    with pytest.raises(ByomError) as caught:
        byom.add_onnx("byom_bad", _linear_onnx(tmp_path / "m.onnx"), samples, dest_dir=models_dir)
    assert expected in str(caught.value)
    assert not (models_dir / "byom_bad").exists()


# --- scaffolding: PyTorch -----------------------------------------------------------------------


def test_add_module_from_a_factory_builds_and_gates(
    tmp_path: Path, models_dir: Path, user_package: str
) -> None:
    import torch

    factory = f"{user_package}:make_net"
    net = importlib.import_module(user_package).make_net()
    checkpoint = tmp_path / "weights.pt"
    torch.save(net.state_dict(), checkpoint)
    scaffold = byom.add_module(
        "byom_torch", factory, _samples(), dest_dir=models_dir, checkpoint=checkpoint,
        output_names=("logits",),
    )
    source = scaffold.spec.build.source
    assert isinstance(source, CheckpointSource) and source.factory == factory
    assert Path(source.checkpoint) == scaffold.folder / "checkpoint.pt"
    assert scaffold.spec.inputs == (TensorSpec("x", "FP32", (FEATURES,)),)
    assert scaffold.spec.outputs == (TensorSpec("logits", "FP32", (CLASSES,)),)
    assert scaffold.spec.max_batch_size == byom.DEFAULT_MAX_BATCH_SIZE

    results, log = _build("byom_torch", models_dir, tmp_path)
    _assert_built_and_gated("byom_torch", results, log, tmp_path, ("fp32", "int8"))


def test_add_module_instance_writes_a_factory_that_rebuilds_it(
    tmp_path: Path, models_dir: Path, user_package: str
) -> None:
    net = importlib.import_module(user_package).TinyNet()
    scaffold = byom.add_module("byom_instance", net, _samples(), dest_dir=models_dir, variants=("fp32",))
    assert "factory.py" in scaffold.files
    assert scaffold.spec.build.source.factory == "kiln.models.byom_instance.factory:make_model"
    assert f"from {user_package} import TinyNet" in (scaffold.folder / "factory.py").read_text()
    assert scaffold.spec.outputs == (TensorSpec("output", "FP32", (CLASSES,)),)

    results, log = _build("byom_instance", models_dir, tmp_path)
    _assert_built_and_gated("byom_instance", results, log, tmp_path, ("fp32",))


def test_add_module_instance_whose_class_cannot_be_rebuilt_says_so(
    models_dir: Path, user_package: str
) -> None:
    from torch import nn

    class Local(nn.Module):
        def forward(self, x):  # pragma: no cover - never run
            return x

    with pytest.raises(ByomError, match="cannot be imported from another process .* pass it as a factory"):
        byom.add_module("byom_local", Local(), _samples(), dest_dir=models_dir)
    wide = importlib.import_module(user_package).WideNet(5)
    with pytest.raises(ByomError, match=r"WideNet\(\) does not rebuild it .* constructor needs the arguments"):
        byom.add_module("byom_wide", wide, _samples(), dest_dir=models_dir)
    sequential = nn.Sequential(nn.Linear(FEATURES, 2))
    with pytest.raises(ByomError, match=r"Sequential\(\) does not rebuild it"):
        byom.add_module("byom_seq", sequential, _samples(), dest_dir=models_dir)
    assert list(models_dir.iterdir()) == []


def test_add_module_names_a_factory_that_does_not_import(models_dir: Path) -> None:
    with pytest.raises(ByomError, match="module 'no_such_package_xyz' cannot be imported"):
        byom.add_module("byom_missing", "no_such_package_xyz:make", _samples(), dest_dir=models_dir)


# --- the CLI --------------------------------------------------------------------------------------


def test_kiln_add_cli(tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "samples.npz"
    np.savez(npz, **_samples())
    model = _linear_onnx(tmp_path / "m.onnx")
    argv = ["add", "byom_cli", "--onnx", str(model), "--samples", str(npz), "--to", str(models_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"kiln add: wrote {models_dir / 'byom_cli'}/" in out
    assert 'SPEC = ModelSpec(\n    name="byom_cli",' in out  # the spec, printed for review
    assert f"KILN_MODELS={models_dir} kiln build --model byom_cli" in out

    assert main(argv) == 2
    assert "already exists; pass force=True (kiln add --force)" in capsys.readouterr().err
    assert main([*argv, "--force", "--max-batch-size", "32"]) == 0
    capsys.readouterr()
    assert main(["add", "byom_cli2", "--samples", str(npz), "--to", str(models_dir)]) == 2
    assert "give --onnx FILE or --factory" in capsys.readouterr().err
    assert main(["add", "byom_cli2", "--onnx", str(tmp_path / "nope.onnx"), "--samples", str(npz),
                 "--to", str(models_dir)]) == 2
    assert "nope.onnx' does not exist" in capsys.readouterr().err
    assert main(["add", "byom_cli2", "--onnx", str(model), "--samples", str(npz), "--to",
                 str(models_dir), "--checkpoint", str(npz)]) == 2
    assert "--checkpoint goes with --factory" in capsys.readouterr().err


def test_scaffolded_spec_is_a_valid_spec_on_its_own(tmp_path: Path, models_dir: Path) -> None:
    scaffold = byom.add_onnx("byom_valid", _linear_onnx(tmp_path / "m.onnx"), _samples(), dest_dir=models_dir)
    validate([scaffold.spec], paths.available_backends())
    assert isinstance(scaffold.spec.build.source, OnnxFileSource)
    assert scaffold.spec.build.variants == (Variant("fp32"), Variant("int8", max_metric_drop=0.05))


def test_kiln_add_cli_with_a_factory(
    tmp_path: Path, models_dir: Path, user_package: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    checkpoint = tmp_path / "weights.pt"
    torch.save(importlib.import_module(user_package).make_net().state_dict(), checkpoint)
    npz = tmp_path / "samples.npz"
    np.savez(npz, **_samples())
    argv = ["add", "byom_cli_torch", "--factory", f"{user_package}:make_net", "--checkpoint", str(checkpoint),
            "--samples", str(npz), "--to", str(models_dir), "--output-names", "scores", "--variants", "fp32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f'factory="{user_package}:make_net"' in out
    assert f"the build imports {user_package}: keep it importable" in out
    assert sorted(p.name for p in (models_dir / "byom_cli_torch").iterdir()) == [
        "README.md", "checkpoint.pt", "held_out.npz", "spec.py"
    ]
    wrong = tmp_path / "wrong.pt"
    torch.save({"nope": torch.zeros(1)}, wrong)
    assert main([*argv[:1], "byom_cli_torch2", *argv[2:5], str(wrong), *argv[6:]]) == 2
    assert "does not fit the module" in capsys.readouterr().err


def test_a_budget_finer_than_one_item_is_warned_about(tmp_path: Path, models_dir: Path) -> None:
    scaffold = byom.add_onnx(
        "byom_few", _linear_onnx(tmp_path / "m.onnx"), _samples(items=20), dest_dir=models_dir
    )
    assert "warning: with 10 evaluation items one item whose top class differs from FP32's costs 0.100" in (
        scaffold.summary
    )
