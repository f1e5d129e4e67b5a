"""The export stage: the spec's names, dtypes and dims, a symbolic batch dim, the checker."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from kiln import tensors
from kiln.build import check, export
from kiln.models.digits import build as digits
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import TensorSpec


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return digits.build_model().eval()


def _example(spec=DIGITS) -> tuple[torch.Tensor, ...]:
    return export.example_inputs(spec, (digits.load_split(spec.build.source).x_test,))


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("export") / "fp32.onnx"
    return export.export_onnx(_model(), DIGITS, _example(), path)


def test_graph_has_the_spec_names_dtypes_and_a_symbolic_batch_dim(exported: Path) -> None:
    model = onnx.load(str(exported))
    assert export.graph_signature(model) == {
        "inputs": {tensors.DIGITS_PIXELS: (onnx.TensorProto.FLOAT, [export.BATCH_DIM, 1, 8, 8])},
        "outputs": {tensors.DIGITS_LOGITS: (onnx.TensorProto.FLOAT, [export.BATCH_DIM, 10])},
    }
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets[""] == DIGITS.build.opset
    onnx.checker.check_model(model, full_check=True)


def test_export_follows_the_spec_opset(tmp_path: Path) -> None:
    spec = replace(DIGITS, build=replace(DIGITS.build, opset=13))
    path = export.export_onnx(_model(), spec, _example(spec), tmp_path / "m.onnx")
    assert {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""] == 13


@pytest.mark.parametrize("batch", [1, 3, DIGITS.max_batch_size])
def test_exported_graph_runs_any_batch_size_like_torch(exported: Path, batch: int) -> None:
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(batch).random((batch, 1, 8, 8), dtype=np.float32)
    (logits,) = session.run([tensors.DIGITS_LOGITS], {tensors.DIGITS_PIXELS: x})
    with torch.no_grad():
        want = _model()(torch.from_numpy(x)).numpy()
    assert logits.shape == (batch, 10)
    np.testing.assert_allclose(logits, want, atol=1e-5, rtol=1e-4)


def test_kiln_onnx_load_check_accepts_the_export(exported: Path) -> None:
    served = check.load_served(DIGITS, exported)
    assert [c.name for c in served.inputs] == [tensors.DIGITS_PIXELS]
    assert served.batched


def test_verify_signature_names_each_mismatch(exported: Path) -> None:
    model = onnx.load(str(exported))
    wrong_dims = replace(DIGITS, inputs=(TensorSpec(tensors.DIGITS_PIXELS, "FP32", (1, 8, 9)),))
    with pytest.raises(export.ExportError) as info:
        export.verify_signature(model, wrong_dims)
    message = str(info.value)
    assert "model 'digits', stage 'export'" in message
    assert f"input '{tensors.DIGITS_PIXELS}' has dims ['batch', 1, 8, 8]" in message
    assert "['batch', 1, 8, 9]" in message

    wrong_type = replace(DIGITS, outputs=(TensorSpec(tensors.DIGITS_LOGITS, "FP16", (10,)),))
    with pytest.raises(export.ExportError, match=r"output 'logits' is FLOAT in the graph.*FP16"):
        export.verify_signature(model, wrong_type)

    unbatched = replace(DIGITS, max_batch_size=0, dynamic_batching=None)
    with pytest.raises(export.ExportError, match=r"input 'pixels' has dims \['batch', 1, 8, 8\]"):
        export.verify_signature(model, unbatched)

    other_opset = replace(DIGITS, build=replace(DIGITS.build, opset=18))
    with pytest.raises(export.ExportError, match="the graph's opset is 17, the spec says 18"):
        export.verify_signature(model, other_opset)

    renamed = replace(DIGITS, inputs=(TensorSpec("image", "FP32", (1, 8, 8)),))
    with pytest.raises(export.ExportError) as info:
        export.verify_signature(model, renamed)
    assert "input 'image' is not in the graph (its inputs: pixels)" in str(info.value)
    assert "input(s) the spec does not declare: pixels" in str(info.value)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_verify_signature_requires_a_symbolic_batch_dim(tmp_path: Path) -> None:
    # A graph with a fixed batch of 2 would refuse every other batch size at serving time.
    fixed = tmp_path / "fixed.onnx"
    torch.onnx.export(
        _model(), _example(), str(fixed), input_names=[tensors.DIGITS_PIXELS],
        output_names=[tensors.DIGITS_LOGITS], opset_version=DIGITS.build.opset, dynamo=False,
    )
    with pytest.raises(export.ExportError, match=r"has dims \[2, 1, 8, 8\].*needs \['batch'"):
        export.verify_signature(fixed, DIGITS)


def test_failed_export_leaves_no_file_behind(tmp_path: Path) -> None:
    wrong = replace(DIGITS, inputs=(TensorSpec(tensors.DIGITS_PIXELS, "FP32", (1, 8, 9)),))
    dest = tmp_path / "fp32.onnx"
    with pytest.raises(export.ExportError, match="does not match the spec"):
        export.export_onnx(_model(), wrong, _example(), dest)
    assert list(tmp_path.iterdir()) == []


def test_unknown_exporter_is_refused(tmp_path: Path) -> None:
    with pytest.raises(export.ExportError, match=r"exporter must be one of torchscript, dynamo"):
        export.export_onnx(_model(), DIGITS, _example(), tmp_path / "m.onnx", exporter="jit")


def test_dynamo_exporter_without_onnxscript_names_the_missing_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes `import onnxscript` raise ModuleNotFoundError, as on a
    # machine where the package is missing.
    for name in [m for m in sys.modules if m == "onnxscript" or m.startswith("onnxscript.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(export.ExportError, match="needs the module 'onnxscript'"):
        export.export_onnx(_model(), DIGITS, _example(), tmp_path / "m.onnx", exporter="dynamo")


def test_dynamo_exporter_gives_the_same_signature(tmp_path: Path, exported: Path) -> None:
    path = export.export_onnx(
        _model(), DIGITS, _example(), tmp_path / "m.onnx", exporter="dynamo"
    )
    assert export.graph_signature(onnx.load(str(path))) == export.graph_signature(
        onnx.load(str(exported))
    )
