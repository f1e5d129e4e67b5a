"""The user-source stage: a factory + checkpoint, or an ONNX file, with a held-out .npz."""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.build import user_source
from kiln.build.check import BuildError, run_batched, torch_runner
from kiln.build.export import ExportError
from kiln.build.user_source import METRIC_COSINE, METRIC_TOP1, UserSourceError
from kiln.spec import (
    BuildSpec,
    CheckpointSource,
    ModelSpec,
    OnnxFileSource,
    TensorSpec,
    Variant,
    validate,
)

HERE = Path(__file__).resolve().parent
FACTORY = "_user_model:make_classifier"
INPUT = "x"
OUTPUT = "scores"
MAX_BATCH = 8
EVAL_ITEMS = 20
CALIBRATION_ITEMS = 12
OPSET = 17


@pytest.fixture
def user_model(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The helper module of factories, importable as `_user_model` (as a user's package is)."""
    monkeypatch.syspath_prepend(str(HERE))
    return importlib.import_module("_user_model")


FP32_ONLY = (Variant("fp32"),)


def _spec(
    source: CheckpointSource | OnnxFileSource,
    *,
    variants: tuple[Variant, ...] = FP32_ONLY,
    outputs: tuple[TensorSpec, ...] | None = None,
) -> ModelSpec:
    return ModelSpec(
        name="tiny",
        backend="kiln_onnx",
        inputs=(TensorSpec(INPUT, "FP32", (4,)),),
        outputs=outputs or (TensorSpec(OUTPUT, "FP32", (3,)),),
        max_batch_size=MAX_BATCH,
        build=BuildSpec(source=source, opset=OPSET, variants=tuple(variants)),
    )


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        INPUT: rng.standard_normal((EVAL_ITEMS, 4)).astype(np.float32),
        f"calibration/{INPUT}": rng.standard_normal((CALIBRATION_ITEMS, 4)).astype(np.float32),
    }


def _npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture
def checkpoint_source(tmp_path: Path, user_model: ModuleType) -> CheckpointSource:
    torch.manual_seed(0)
    trained = user_model.make_classifier()
    checkpoint = tmp_path / "weights.pt"
    torch.save(trained.state_dict(), checkpoint)
    npz = _npz(tmp_path / "held_out.npz", _arrays())
    return CheckpointSource(factory=FACTORY, checkpoint=str(checkpoint), held_out=str(npz))


def _message(error: pytest.ExceptionInfo[BaseException]) -> str:
    return str(error.value)


# --- CheckpointSource: loading --------------------------------------------------------------


def test_train_loads_the_checkpoint_into_the_factorys_module(
    checkpoint_source: CheckpointSource, user_model: ModuleType
) -> None:
    spec = _spec(checkpoint_source)
    validate([spec], backends=None)  # absolute tmp paths, a valid factory string
    lines: list[str] = []
    model = user_source.train(checkpoint_source, lines.append, spec=spec)
    assert not model.training
    saved = torch.load(checkpoint_source.checkpoint, weights_only=True)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    parameters = 4 * 8 + 8 + 8 * 3 + 3
    assert lines == [
        f"{FACTORY} -> TinyClassifier ({parameters:,} parameters); 4 tensors loaded from "
        f"{checkpoint_source.checkpoint}"
    ]


def test_save_checkpoint_round_trips(checkpoint_source: CheckpointSource, tmp_path: Path) -> None:
    model = user_source.train(checkpoint_source)
    path = user_source.save_checkpoint(model, tmp_path / "out" / "checkpoint.pt")
    again = torch.load(path, weights_only=True)
    assert again.keys() == model.state_dict().keys()


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (
            "no_such_package.models:make",
            "stage 'load': build.source.factory 'no_such_package.models:make': module "
            "'no_such_package.models' cannot be imported (ModuleNotFoundError: No module named "
            "'no_such_package'); is it installed or on PYTHONPATH?",
        ),
        (
            "_user_model:make_nothing",
            "stage 'load': build.source.factory '_user_model:make_nothing': module '_user_model' "
            "has no attribute 'make_nothing'",
        ),
        (
            "_user_model:NOT_CALLABLE",
            "stage 'load': build.source.factory '_user_model:NOT_CALLABLE': "
            "_user_model.NOT_CALLABLE is a int, not callable",
        ),
        (
            "_user_model:make_not_a_module",
            "stage 'load': build.source.factory '_user_model:make_not_a_module': returned a "
            "builtins.dict, not a torch.nn.Module",
        ),
        (
            "_user_model:make_needing_arguments",
            "stage 'load': build.source.factory '_user_model:make_needing_arguments': calling it "
            "(with no arguments) raised TypeError: make_needing_arguments() missing 1 required "
            "positional argument: 'width'",
        ),
    ],
)
def test_factory_errors_name_the_field_and_what_failed(
    checkpoint_source: CheckpointSource, factory: str, expected: str
) -> None:
    source = replace(checkpoint_source, factory=factory)
    with pytest.raises(UserSourceError) as error:
        user_source.train(source)
    assert _message(error) == expected
    assert isinstance(error.value, BuildError) and error.value.stage == "load"


def test_a_module_that_fails_while_importing_is_reported(
    checkpoint_source: CheckpointSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "broken_user_pkg.py").write_text("raise RuntimeError('weights server unreachable')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = _spec(replace(checkpoint_source, factory="broken_user_pkg:make"))
    with pytest.raises(UserSourceError) as error:
        user_source.train(spec.build.source, spec=spec)
    assert _message(error) == (
        "model 'tiny', stage 'load': build.source.factory 'broken_user_pkg:make': module "
        "'broken_user_pkg' cannot be imported (RuntimeError: weights server unreachable); is it "
        "installed or on PYTHONPATH?"
    )


def test_missing_and_unexpected_keys_are_named(
    checkpoint_source: CheckpointSource, tmp_path: Path
) -> None:
    state = torch.load(checkpoint_source.checkpoint, weights_only=True)
    state["extra.bias"] = state.pop("head.bias")
    path = tmp_path / "renamed.pt"
    torch.save(state, path)
    spec = _spec(replace(checkpoint_source, checkpoint=str(path)))
    with pytest.raises(UserSourceError) as error:
        user_source.train(spec.build.source, spec=spec)
    assert _message(error) == (
        f"model 'tiny', stage 'load': build.source.checkpoint '{path}' does not match the module "
        f"of '{FACTORY}': missing key(s) the module has: 'head.bias'; unexpected key(s) the "
        "module lacks: 'extra.bias'"
    )


def test_a_wrapped_state_dict_gets_a_hint(checkpoint_source: CheckpointSource, tmp_path: Path) -> None:
    state = torch.load(checkpoint_source.checkpoint, weights_only=True)
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    with pytest.raises(UserSourceError) as error:
        user_source.train(replace(checkpoint_source, checkpoint=str(path)))
    message = _message(error)
    assert "(it holds a 'state_dict' entry: save that mapping itself)" in message
    assert "unexpected key(s) the module lacks: 'state_dict', 'epoch'" in message
    assert "missing key(s) the module has: 'hidden.weight', 'hidden.bias', 'head.weight', 'head.bias'" in message


def test_shapes_that_do_not_fit_are_reported(checkpoint_source: CheckpointSource) -> None:
    source = replace(checkpoint_source, factory="_user_model:make_wider_classifier")
    with pytest.raises(UserSourceError) as error:
        user_source.train(source)
    message = _message(error)
    assert message.startswith(
        f"stage 'load': build.source.checkpoint '{checkpoint_source.checkpoint}' does not fit the "
        "module of '_user_model:make_wider_classifier': "
    )
    assert "size mismatch for hidden.weight" in message


def test_a_checkpoint_that_is_no_state_dict_is_refused(
    checkpoint_source: CheckpointSource, tmp_path: Path
) -> None:
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(UserSourceError) as error:
        user_source.train(replace(checkpoint_source, checkpoint=str(listed)))
    assert _message(error) == (
        f"stage 'load': build.source.checkpoint '{listed}' holds a list, not a state_dict (a "
        "mapping of parameter names to tensors); save it with torch.save(model.state_dict(), path)"
    )
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserSourceError) as error:
        user_source.train(replace(checkpoint_source, checkpoint=str(garbage)))
    assert _message(error).startswith(
        f"stage 'load': build.source.checkpoint '{garbage}' cannot be loaded as a state_dict with "
        "torch.load(weights_only=True) ("
    )


def test_train_refuses_an_onnx_source(tmp_path: Path) -> None:
    source = OnnxFileSource(path=str(tmp_path / "m.onnx"), held_out=str(tmp_path / "h.npz"))
    with pytest.raises(UserSourceError) as error:
        user_source.train(source)
    assert _message(error) == (
        f"stage 'train': an OnnxFileSource ('{tmp_path / 'm.onnx'}') has no PyTorch model to load: "
        "the pipeline builds it with export_onnx(source, dest, spec=spec) and takes the FP32 "
        "reference outputs from ONNX Runtime"
    )


# --- held-out data -----------------------------------------------------------------------------


def test_held_out_reads_inputs_and_calibration_in_spec_order(checkpoint_source: CheckpointSource) -> None:
    spec = _spec(checkpoint_source, variants=(Variant("fp32"), Variant("int8", max_metric_drop=0.05)))
    held = user_source.held_out(checkpoint_source, spec=spec)
    arrays = _arrays()
    assert len(held.inputs) == 1 and len(held.calibration) == 1
    np.testing.assert_array_equal(held.inputs[0], arrays[INPUT])
    np.testing.assert_array_equal(held.calibration[0], arrays[f"calibration/{INPUT}"])
    assert held.size == EVAL_ITEMS
    assert held.metric == METRIC_TOP1


def test_calibration_is_optional_without_an_int8_variant(
    checkpoint_source: CheckpointSource, tmp_path: Path
) -> None:
    npz = _npz(tmp_path / "eval_only.npz", {INPUT: _arrays()[INPUT]})
    source = replace(checkpoint_source, held_out=str(npz))
    held = user_source.held_out(source, spec=_spec(source))
    assert held.calibration == ()
    with pytest.raises(UserSourceError) as error:
        user_source.held_out(source, spec=_spec(source, variants=(Variant("fp32"), Variant("int8"))))
    assert _message(error) == (
        f"model 'tiny', stage 'held-out': build.source.held_out '{npz}' lacks array(s) "
        "'calibration/x' (the spec asks for an int8 variant); it has: 'x'"
    )


def _held_out_error(source: CheckpointSource, tmp_path: Path, arrays: dict[str, np.ndarray]) -> str:
    npz = _npz(tmp_path / "bad.npz", arrays)
    source = replace(source, held_out=str(npz))
    with pytest.raises(UserSourceError) as error:
        user_source.held_out(source, spec=_spec(source))
    return _message(error)


def test_held_out_missing_array_is_named(checkpoint_source: CheckpointSource, tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["features"] = arrays.pop(INPUT)
    message = _held_out_error(checkpoint_source, tmp_path, arrays)
    npz = tmp_path / "bad.npz"
    assert message == (
        f"model 'tiny', stage 'held-out': build.source.held_out '{npz}' lacks array(s) 'x'; it "
        f"has: 'calibration/x', 'features'; build.source.held_out '{npz}' has array(s) 'features' "
        "the spec does not name; expected: 'x', 'calibration/x'"
    )


def test_held_out_wrong_dtype_is_named(checkpoint_source: CheckpointSource, tmp_path: Path) -> None:
    arrays = _arrays()
    arrays[INPUT] = arrays[INPUT].astype(np.float64)
    message = _held_out_error(checkpoint_source, tmp_path, arrays)
    assert message == (
        f"model 'tiny', stage 'held-out': array 'x' in build.source.held_out '{tmp_path / 'bad.npz'}' "
        "has dtype float64, the spec's input 'x' needs float32 (FP32)"
    )


def test_held_out_wrong_dims_are_named(checkpoint_source: CheckpointSource, tmp_path: Path) -> None:
    arrays = _arrays()
    arrays["calibration/x"] = np.zeros((CALIBRATION_ITEMS, 5), np.float32)
    message = _held_out_error(checkpoint_source, tmp_path, arrays)
    assert message == (
        "model 'tiny', stage 'held-out': array 'calibration/x' in build.source.held_out "
        f"'{tmp_path / 'bad.npz'}' has shape [12, 5], the spec's input 'x' needs [items, 4] "
        "(dims [4], at least 1 item)"
    )
    arrays["calibration/x"] = np.zeros((4,), np.float32)  # no batch dim
    message = _held_out_error(checkpoint_source, tmp_path, arrays)
    assert "array 'calibration/x'" in message and "has shape [4], the spec's input 'x' needs [items, 4]" in message


def test_held_out_accepts_any_size_for_a_variable_dim(tmp_path: Path) -> None:
    npz = _npz(tmp_path / "seq.npz", {"ids": np.zeros((3, 7), np.int64)})
    source = OnnxFileSource(path=str(tmp_path / "m.onnx"), held_out=str(npz))
    spec = replace(
        _spec(source),
        inputs=(TensorSpec("ids", "INT64", (-1,)),),
        outputs=(TensorSpec("hidden", "FP32", (-1, 8)),),
    )
    held = user_source.held_out(source, spec=spec)
    assert held.inputs[0].shape == (3, 7)
    assert held.metric == METRIC_COSINE


def test_held_out_items_must_agree_across_inputs(tmp_path: Path) -> None:
    npz = _npz(
        tmp_path / "two.npz",
        {"a": np.zeros((3, 2), np.float32), "b": np.zeros((4, 2), np.float32)},
    )
    source = OnnxFileSource(path=str(tmp_path / "m.onnx"), held_out=str(npz))
    spec = replace(
        _spec(source), inputs=(TensorSpec("a", "FP32", (2,)), TensorSpec("b", "FP32", (2,)))
    )
    with pytest.raises(UserSourceError) as error:
        user_source.held_out(source, spec=spec)
    assert _message(error) == (
        f"model 'tiny', stage 'held-out': build.source.held_out '{npz}': the evaluation arrays hold "
        "different numbers of items: 'a' 3, 'b' 4"
    )


def test_held_out_refuses_a_npy_and_a_missing_file(checkpoint_source: CheckpointSource, tmp_path: Path) -> None:
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros((2, 4), np.float32))
    source = replace(checkpoint_source, held_out=str(npy))
    with pytest.raises(UserSourceError) as error:
        user_source.held_out(source, spec=_spec(source))
    assert _message(error) == (
        f"model 'tiny', stage 'held-out': build.source.held_out '{npy}' holds one array (.npy), "
        "not an .npz archive"
    )
    gone = replace(checkpoint_source, held_out=str(tmp_path / "gone.npz"))
    with pytest.raises(UserSourceError) as error:
        user_source.held_out(gone, spec=_spec(gone))
    assert _message(error) == (
        f"model 'tiny', stage 'held-out': build.source.held_out '{tmp_path / 'gone.npz'}' does not exist"
    )


def test_held_out_needs_the_spec(checkpoint_source: CheckpointSource) -> None:
    with pytest.raises(UserSourceError) as error:
        user_source.held_out(checkpoint_source)
    assert _message(error) == (
        "stage 'held-out': held_out needs the model's spec (spec=...) to read the .npz"
    )


# --- the agreement metric ------------------------------------------------------------------


def test_top1_agreement_counts_matching_argmax() -> None:
    reference = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    candidate = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [np.nan, 0.0, 0.0]])
    assert user_source.top1_agreement(candidate, reference) == 0.5  # items 0 and 2; NaN disagrees


def test_cosine_similarity_per_item() -> None:
    reference = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [3.0, 4.0]])
    candidate = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0], [np.inf, 0.0]])
    # orthogonal 0, parallel 1, both zero 1, non-finite 0
    assert user_source.cosine_similarity(candidate, reference) == pytest.approx(0.5)
    assert user_source.cosine_similarity(-reference[:2], reference[:2]) == pytest.approx(-1.0)


def test_metric_of_a_classifier_is_top1_agreement_with_fp32(
    checkpoint_source: CheckpointSource,
) -> None:
    spec = _spec(checkpoint_source)
    held = user_source.held_out(checkpoint_source, spec=spec)
    model = user_source.train(checkpoint_source)
    reference = [run_batched(torch_runner(model, spec), spec, held.inputs)[OUTPUT]]
    assert held.score(reference, reference) == 1.0
    flipped = [-reference[0]]  # argmax becomes the argmin: no item agrees
    assert held.score(flipped, reference) == 0.0


def test_metric_of_several_outputs_is_the_lowest(checkpoint_source: CheckpointSource) -> None:
    spec = _spec(
        checkpoint_source,
        outputs=(TensorSpec("scores", "FP32", (2,)), TensorSpec("embedding", "FP32", (2, 2))),
    )
    name, score = user_source.agreement_metric(spec)
    # Each output by its kind (kiln.build.gates): 'scores' (2,) class scores, 'embedding' by name.
    assert name == "agreement with FP32, the lowest over outputs (scores: class_scores, embedding: embedding)"
    scores = np.array([[1.0, 0.0], [0.0, 1.0]])
    embedding = np.ones((2, 2, 2))
    assert score([scores, embedding], [scores, embedding]) == 1.0
    assert score([scores, -embedding], [scores, embedding]) == -1.0
    assert score([scores[:, ::-1], embedding], [scores, embedding]) == 0.0


# --- OnnxFileSource --------------------------------------------------------------------------


def _onnx_model(path: Path, *, input_name: str = INPUT, opset: int = OPSET) -> Path:
    weights = helper.make_tensor(
        "w", TensorProto.FLOAT, (4, 3), np.arange(12, dtype=np.float32).tolist()
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", [input_name, "w"], [OUTPUT])],
        "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 3])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def onnx_source(tmp_path: Path) -> OnnxFileSource:
    path = _onnx_model(tmp_path / "user.onnx")
    npz = _npz(tmp_path / "held_out.npz", _arrays())
    return OnnxFileSource(path=str(path), held_out=str(npz))


def test_export_onnx_verifies_and_copies(onnx_source: OnnxFileSource, tmp_path: Path) -> None:
    spec = _spec(onnx_source)
    validate([spec], backends=None)
    dest = user_source.export_onnx(onnx_source, tmp_path / "artifacts" / "fp32.onnx", spec=spec)
    assert dest == tmp_path / "artifacts" / "fp32.onnx"
    assert dest.read_bytes() == Path(onnx_source.path).read_bytes()
    held = user_source.held_out(onnx_source, spec=spec)
    assert held.size == EVAL_ITEMS


def test_export_onnx_mismatched_signature_names_the_tensor(tmp_path: Path) -> None:
    path = _onnx_model(tmp_path / "renamed.onnx", input_name="features")
    source = OnnxFileSource(path=str(path), held_out=str(_npz(tmp_path / "h.npz", _arrays())))
    dest = tmp_path / "fp32.onnx"
    with pytest.raises(ExportError) as error:
        user_source.export_onnx(source, dest, spec=_spec(source))
    message = _message(error)
    assert message.startswith("model 'tiny', stage 'export': the exported graph does not match the spec: ")
    assert "input 'x' is not in the graph (its inputs: features)" in message
    assert "the graph has input(s) the spec does not declare: features" in message
    assert not dest.exists()


def test_export_onnx_other_opset_fails(tmp_path: Path) -> None:
    path = _onnx_model(tmp_path / "old.onnx", opset=13)
    source = OnnxFileSource(path=str(path), held_out=str(_npz(tmp_path / "h.npz", _arrays())))
    with pytest.raises(ExportError) as error:
        user_source.export_onnx(source, tmp_path / "fp32.onnx", spec=_spec(source))
    assert "the graph's opset is 13, the spec says 17" in _message(error)


def test_export_onnx_refuses_a_file_that_is_no_onnx(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model")
    source = OnnxFileSource(path=str(garbage), held_out=str(_npz(tmp_path / "h.npz", _arrays())))
    with pytest.raises(UserSourceError) as error:
        user_source.export_onnx(source, tmp_path / "fp32.onnx", spec=_spec(source))
    assert _message(error) == (
        f"model 'tiny', stage 'export': build.source.path '{garbage}' is not an ONNX model "
        "(DecodeError: Error parsing message)"
    )
    assert not (tmp_path / "fp32.onnx").exists()


def test_export_onnx_refuses_a_model_the_checker_rejects(tmp_path: Path) -> None:
    path = _onnx_model(tmp_path / "dangling.onnx")
    model = onnx.load(str(path))
    model.graph.node[0].input[1] = "undefined_weights"  # a node input nothing produces
    onnx.save(model, str(path))
    source = OnnxFileSource(path=str(path), held_out=str(_npz(tmp_path / "h.npz", _arrays())))
    with pytest.raises(UserSourceError) as error:
        user_source.export_onnx(source, tmp_path / "fp32.onnx", spec=_spec(source))
    message = _message(error)
    assert message.startswith(
        f"model 'tiny', stage 'export': build.source.path '{path}': onnx.checker rejected it: "
    )
    assert "undefined_weights" in message
    assert not (tmp_path / "fp32.onnx").exists()


def test_export_onnx_needs_the_spec(onnx_source: OnnxFileSource, tmp_path: Path) -> None:
    with pytest.raises(UserSourceError) as error:
        user_source.export_onnx(onnx_source, tmp_path / "fp32.onnx")
    assert _message(error) == (
        "stage 'export': export_onnx needs the model's spec (spec=...) to verify the graph"
    )


def test_exports_onnx_tells_the_two_source_kinds_apart(
    onnx_source: OnnxFileSource, checkpoint_source: CheckpointSource, tmp_path: Path
) -> None:
    assert user_source.exports_onnx(onnx_source) is True
    assert user_source.exports_onnx(checkpoint_source) is False
    with pytest.raises(UserSourceError) as error:
        user_source.export_onnx(checkpoint_source, tmp_path / "fp32.onnx", spec=_spec(checkpoint_source))
    assert _message(error) == (
        "model 'tiny', stage 'export': export_onnx takes an OnnxFileSource, got a CheckpointSource: "
        "a checkpoint is loaded by train() and exported from PyTorch (see exports_onnx)"
    )
