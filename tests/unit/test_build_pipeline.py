"""The whole pipeline: validation first, stages, gates, no-op rebuilds, the `build` command."""

from __future__ import annotations

import argparse
import io
import json
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln import tensors
from kiln.build import check, export, pipeline, publish
from kiln.models.digits import build as digits
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.repository import config_dict
from kiln.serving.onnx import OnnxModel
from kiln.spec import (
    CheckpointSource,
    ModelSpec,
    OnnxFileSource,
    SpecError,
    TensorSpec,
    Variant,
)

FAST_EPOCHS = 6
"""Enough for > 95% here in about a second; the full-spec accuracy is tested in test_build_digits."""
BACKENDS = ("kiln_onnx",)


def _with(spec: ModelSpec, **source_changes: object) -> ModelSpec:
    build = spec.build
    return replace(spec, build=replace(build, source=replace(build.source, **source_changes)))


FAST = _with(DIGITS, epochs=FAST_EPOCHS)


@dataclass(frozen=True)
class Built:
    artifacts: Path
    repository: Path
    results: list[pipeline.BuildResult]
    output: str

    @property
    def result(self) -> pipeline.BuildResult:
        """The fp32 variant's result."""
        return self.results[0]


def _build(specs, artifacts: Path, repository: Path, **kwargs) -> tuple[list, str]:
    out = io.StringIO()
    results = pipeline.build(
        specs, out=out, artifacts=artifacts, repository=repository, backends=BACKENDS, **kwargs
    )
    return results, out.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    root = tmp_path_factory.mktemp("built")
    results, output = _build([FAST], root / "artifacts", root / "repo")
    assert [r.variant for r in results] == ["fp32", "fp16", "int8"]
    return Built(root / "artifacts", root / "repo", results, output)


@pytest.fixture
def copy_of_built(built: Built, tmp_path: Path) -> Built:
    """The module's build, copied, for tests that change it."""
    artifacts, repository = tmp_path / "artifacts", tmp_path / "repo"
    shutil.copytree(built.artifacts, artifacts)
    shutil.copytree(built.repository, repository)
    return Built(artifacts, repository, built.results, built.output)


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any training attempt fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stage ran")

    monkeypatch.setattr(digits, "train", refuse)


def _manifest(artifacts: Path) -> dict:
    return json.loads((artifacts / "digits" / "manifest.json").read_text())


def test_build_publishes_the_artifact_and_manifest(built: Built) -> None:
    result = built.result
    published = built.repository / "digits" / "1" / "model.onnx"
    assert result.status == pipeline.BUILT
    assert result.artifact == published and published.is_file()
    assert result.size_bytes == published.stat().st_size
    assert result.metric == digits.METRIC
    assert result.metric_torch > 0.95 and result.metric_onnx > 0.95  # equal predictions: below
    assert result.latency_ms > 0
    assert set(result.timings_s) == {"train", "export", "check", "fp16", "int8", "publish"}

    manifest = _manifest(built.artifacts)
    entry = manifest["variants"]["fp32"]
    assert entry["sha256"] == publish.sha256_file(published)
    assert entry["size_bytes"] == result.size_bytes
    assert entry["metrics"][digits.METRIC] == {
        "reference": result.metric_torch,
        "onnxruntime": result.metric_onnx,
    }
    assert entry["reference"] == "FP32 PyTorch"
    assert entry["exporter"] == export.DEFAULT_EXPORTER and entry["opset"] == FAST.build.opset
    assert entry["check"]["held_out_items"] == 360
    assert entry["check"]["max_abs_error"] <= FAST.build.tolerance.atol
    assert set(manifest["tools"]) >= {"python", "torch", "onnx", "onnxruntime", "scikit-learn"}
    assert set(manifest["timings_s"]) == {"train", "export", "check", "fp16", "int8", "publish"}
    assert manifest["hash_inputs"]["build"]["source"]["epochs"] == FAST_EPOCHS
    assert (built.artifacts / "digits" / "checkpoint.pt").is_file()


def test_build_prints_progress_stage_timings_table_and_where_outputs_went(built: Built) -> None:
    lines = built.output.splitlines()
    epochs = [line for line in lines if line.startswith("[digits]   epoch ")]
    assert len(epochs) == FAST_EPOCHS
    for stage in ("train", "export", "check", "publish"):
        assert any(line.startswith(f"[digits] {stage}: ") and line.endswith("s]") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == [
        "model", "variant", "metric", "drop", "(budget)", "size", "latency", "b=1", "served", "as", "status",
    ]
    row = lines[header + 1].split()
    assert row[:4] == ["digits", "fp32", "test", "accuracy"]
    assert row[-2:] == ["digits", "built"]
    assert f"artifact {built.repository / 'digits' / '1' / 'model.onnx'}" in built.output
    assert f"manifest {built.artifacts / 'digits' / 'manifest.json'}" in built.output


def _onnx_logits(spec: ModelSpec, version: Path, x: np.ndarray) -> np.ndarray:
    """The logits of a published model through kiln_onnx's loader, in the build's chunks."""
    model = OnnxModel.load(spec.name, version, config_dict(spec), dict(spec.parameters))
    return check.run_batched(model.run, spec, [x])[tensors.DIGITS_LOGITS]


def test_published_model_loads_and_predicts_in_kiln_onnx(built: Built) -> None:
    split = digits.load_split(FAST.build.source)
    logits = _onnx_logits(FAST, built.repository / "digits" / "1", split.x_test)
    # The same file, runtime, settings and chunks as the build's check: the same numbers.
    assert digits.accuracy_of_logits(logits, split.y_test) == built.result.metric_onnx


def test_checkpoint_reloads_to_the_recorded_accuracy(built: Built) -> None:
    model = digits.load_trained(FAST, artifacts=built.artifacts)
    split = digits.load_split(FAST.build.source)
    logits = check.run_batched(check.torch_runner(model, FAST), FAST, [split.x_test])
    # The same weights (a state_dict round trip), code and chunks as the build: the same numbers.
    assert digits.accuracy_of_logits(logits[tensors.DIGITS_LOGITS], split.y_test) == built.result.metric_torch


def test_onnx_runtime_predicts_what_pytorch_predicts_wherever_pytorch_decides(built: Built) -> None:
    split = digits.load_split(FAST.build.source)
    model = digits.load_trained(FAST, artifacts=built.artifacts)
    torch_logits = check.run_batched(check.torch_runner(model, FAST), FAST, [split.x_test])
    onnx_logits = _onnx_logits(FAST, built.repository / "digits" / "1", split.x_test)
    # Not bit for bit: equal top-1 where PyTorch's top two are further apart than the check's
    # tolerance allows either runtime to move them, so accuracies differ only by near-ties.
    undecided = check.assert_same_top1(
        onnx_logits, torch_logits[tensors.DIGITS_LOGITS], FAST.build.tolerance, labels=split.y_test
    )
    assert undecided <= 2


def test_second_build_with_nothing_changed_rebuilds_nothing(
    copy_of_built: Built, no_training: None
) -> None:
    published = copy_of_built.repository / "digits" / "1" / "model.onnx"
    manifest = copy_of_built.artifacts / "digits" / "manifest.json"
    int8 = copy_of_built.repository / "digits_int8" / "1" / "model.onnx"
    before = (published.stat().st_mtime_ns, int8.stat().st_mtime_ns, manifest.read_bytes())
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository)
    assert [(r.variant, r.status) for r in results] == [
        ("fp32", pipeline.UP_TO_DATE), ("fp16", pipeline.UP_TO_DATE), ("int8", pipeline.UP_TO_DATE)
    ]
    assert "nothing to rebuild" in output
    assert "calibration batch" not in output
    assert (published.stat().st_mtime_ns, int8.stat().st_mtime_ns, manifest.read_bytes()) == before
    for result, original in zip(results, copy_of_built.results, strict=True):
        assert (result.metric_onnx, result.metric_drop, result.size_bytes, result.served_as) == (
            original.metric_onnx, original.metric_drop, original.size_bytes, original.served_as
        )
    assert f"artifact {published}" in output
    assert f"artifact {int8}" in output
    assert "0 built, 1 up to date (3 variant(s))" in output


def test_changed_spec_rebuilds(copy_of_built: Built) -> None:
    old_hash = _manifest(copy_of_built.artifacts)["source_hash"]
    changed = _with(FAST, epochs=FAST_EPOCHS + 1)
    results, output = _build([changed], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.BUILT] * 3
    assert "[digits] building (changed: spec)" in output
    manifest = _manifest(copy_of_built.artifacts)
    assert manifest["source_hash"] != old_hash
    assert manifest["hash_inputs"]["build"]["source"]["epochs"] == FAST_EPOCHS + 1


def test_hand_edited_artifact_is_rebuilt(copy_of_built: Built) -> None:
    published = copy_of_built.repository / "digits" / "1" / "model.onnx"
    good = published.read_bytes()
    published.write_bytes(b"not a model")
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.BUILT] * 3
    assert "changed since the build" in output
    assert published.read_bytes() == good  # training and export are deterministic


def test_force_rebuilds_an_up_to_date_model(copy_of_built: Built) -> None:
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository, force=True)
    assert [r.status for r in results] == [pipeline.BUILT] * 3
    assert "building (forced (--force))" in output


def test_invalid_spec_is_refused_before_any_stage(tmp_path: Path, no_training: None) -> None:
    bad = _with(FAST, epochs=0, test_fraction=1.5)
    with pytest.raises(SpecError) as info:
        _build([FAST, bad], tmp_path / "artifacts", tmp_path / "repo")
    message = str(info.value)
    assert "field 'build.source.epochs' must be an integer in 1..1000, got 0" in message
    assert "field 'build.source.test_fraction' must be a number in 0.05..0.95, got 1.5" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (
            TensorSpec(tensors.DIGITS_PIXELS, "FP32", (1, 8, 9)),
            "input 'pixels' has shape [360, 1, 8, 8]; expected [-1, 1, 8, 9]",
        ),
        (
            TensorSpec(tensors.DIGITS_PIXELS, "FP16", (1, 8, 8)),
            "input 'pixels' has dtype float32; expected float16",
        ),
    ],
    ids=["shape", "dtype"],
)
def test_input_the_model_rejects_fails_before_training(
    tmp_path: Path, no_training: None, tensor: TensorSpec, message: str
) -> None:
    bad = replace(FAST, inputs=(tensor,), warmup=())
    with pytest.raises(pipeline.BuildError) as info:
        _build([bad], tmp_path / "artifacts", tmp_path / "repo")
    text = str(info.value)
    assert "model 'digits', stage 'source'" in text
    assert "the evaluation data of DigitsCNNSource does not fit field 'inputs' of the spec" in text
    assert message in text
    assert not (tmp_path / "repo").exists()


def test_unknown_backend_is_refused_with_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"field 'backend' must be one of kiln_onnx, got 'nope'"):
        _build([replace(FAST, backend="nope")], tmp_path / "a", tmp_path / "r")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_min_accuracy_fails_the_train_stage(tmp_path: Path) -> None:
    greedy = replace(
        _with(FAST, epochs=1), build=replace(_with(FAST, epochs=1).build, min_accuracy=0.999)
    )
    with pytest.raises(pipeline.AccuracyError) as info:
        _build([greedy], tmp_path / "artifacts", tmp_path / "repo")
    error = info.value
    assert (error.model, error.stage) == ("digits", "train")
    assert str(error).startswith("model 'digits', stage 'train': PyTorch test accuracy 0.")
    assert "is below build.min_accuracy 0.999 (360 held-out items" in str(error)
    assert not (tmp_path / "repo").exists()
    assert not (tmp_path / "artifacts" / "digits" / "manifest.json").exists()


def test_failed_check_keeps_the_last_good_artifact(
    copy_of_built: Built, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_export = export.export_onnx

    def broken_export(module, spec, example, path, **kwargs):  # type: ignore[no-untyped-def]
        real_export(module, spec, example, path, **kwargs)
        model = onnx.load(str(path))
        bias = [i for i in model.graph.initializer if i.name.endswith("bias")][-1]
        values = numpy_helper.to_array(bias) + np.float32(0.5)
        bias.CopyFrom(numpy_helper.from_array(values, bias.name))
        onnx.save(model, str(path))
        return path

    monkeypatch.setattr(export, "export_onnx", broken_export)
    published = copy_of_built.repository / "digits" / "1" / "model.onnx"
    manifest = copy_of_built.artifacts / "digits" / "manifest.json"
    before = (published.read_bytes(), manifest.read_bytes())
    with pytest.raises(check.CheckError) as info:
        _build([FAST], copy_of_built.artifacts, copy_of_built.repository, force=True)
    message = str(info.value)
    assert message.startswith("model 'digits', stage 'check': ONNX Runtime output 'logits'")
    assert "max abs error 0.5" in message and "atol=0.0001, rtol=0.001" in message
    assert (published.read_bytes(), manifest.read_bytes()) == before


EXPORT_OFFSET = 1.0
"""What `_offset_export` adds to class 0's logit: far beyond digits' tolerance on any CPU."""


def _offset_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes the export write a model whose class-0 logit is EXPORT_OFFSET above PyTorch's (the
    bias of the final Gemm raised), so the check has a known difference to find on any CPU; a
    test must not hope that ONNX Runtime and PyTorch disagree (on some CPUs they agree bit for
    bit)."""
    real = export.export_onnx

    def export_onnx(model, spec, example, dest, **kwargs):  # type: ignore[no-untyped-def]
        path = real(model, spec, example, dest, **kwargs)
        graph = onnx.load(dest)
        bias_name = graph.graph.node[-1].input[2]
        (bias,) = [i for i in graph.graph.initializer if i.name == bias_name]
        values = numpy_helper.to_array(bias).copy()
        values[0] += EXPORT_OFFSET
        bias.CopyFrom(numpy_helper.from_array(values, bias_name))
        onnx.save(graph, dest)
        return path

    monkeypatch.setattr(export, "export_onnx", export_onnx)


def test_an_export_beyond_the_tolerance_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _offset_export(monkeypatch)
    with pytest.raises(check.CheckError) as caught:
        _build([FAST], tmp_path / "artifacts", tmp_path / "repo")
    message = str(caught.value)
    assert message.startswith("model 'digits', stage 'check': ONNX Runtime output 'logits' differs from ")
    max_abs = float(re.search(r"max abs error ([0-9.e+-]+)", message).group(1))
    assert max_abs == pytest.approx(EXPORT_OFFSET, rel=1e-3)  # the known difference, found
    assert "360 of 3600 elements out of tolerance atol=0.0001, rtol=0.001" in message
    assert not (tmp_path / "repo").exists()


def test_only_builds_the_named_models_and_refuses_unknown_names(
    tmp_path: Path, no_training: None
) -> None:
    with pytest.raises(pipeline.SelectionError, match=r"no model named 'nope' in the spec; known: digits"):
        _build([FAST], tmp_path / "a", tmp_path / "r", only=["nope"])
    results, output = _build([FAST], tmp_path / "a", tmp_path / "r", only=[])
    assert results == [] and "0 model(s)" in output
    assert list(tmp_path.iterdir()) == []


def _command(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kiln")
    pipeline.add_build_command(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_build_command_flags() -> None:
    args = _command(["build", "--force", "--model", "digits", "--model", "other"])
    assert (args.force, args.models) == (True, ["digits", "other"])
    args = _command(["build"])
    assert (args.force, args.models) == (False, None)
    assert callable(args.func)


def test_build_command_builds_into_the_configured_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("kiln.registry.specs", lambda: (FAST,))
    monkeypatch.setenv("KILN_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("KILN_MODEL_REPOSITORY", str(tmp_path / "repo"))
    args = _command(["build"])
    assert args.func(args) == pipeline.EXIT_OK
    assert (tmp_path / "repo" / "digits" / "1" / "model.onnx").is_file()
    assert "1 built, 0 up to date" in capsys.readouterr().out
    args = _command(["build", "--model", "digits"])
    assert args.func(args) == pipeline.EXIT_OK
    assert "0 built, 1 up to date" in capsys.readouterr().out


def test_build_command_reports_errors_in_one_paragraph_without_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KILN_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("KILN_MODEL_REPOSITORY", str(tmp_path / "repo"))

    args = _command(["build", "--model", "nope"])
    assert args.func(args) == pipeline.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("kiln build: model 'nope', stage 'select': no model named 'nope'")
    assert "Traceback" not in err

    monkeypatch.setattr("kiln.registry.specs", lambda: (_with(FAST, epochs=0),))
    args = _command(["build"])
    assert args.func(args) == pipeline.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("kiln build: nothing was built: 1 problem(s) in the spec:")
    assert "'build.source.epochs' must be an integer in 1..1000, got 0" in err

    def fail(*args: object, **kwargs: object) -> None:
        raise pipeline.AccuracyError("digits", "train", "PyTorch test accuracy 0.5 is below 0.9")

    monkeypatch.setattr(pipeline, "build", fail)
    args = _command(["build"])
    assert args.func(args) == pipeline.EXIT_BUILD_FAILED
    err = capsys.readouterr().err
    assert err == (
        "kiln build: failed: model 'digits', stage 'train': PyTorch test accuracy 0.5 is below 0.9\n"
    )
    assert not tmp_path.joinpath("repo").exists()


# --- variants: fp16 and int8, each gated on its budget and published under its served name -----


def _with_variants(spec: ModelSpec, *variants: Variant) -> ModelSpec:
    return replace(spec, build=replace(spec.build, variants=variants))


DEGRADED_PIXEL = 0.5
"""The constant every calibration pixel is set to in the over-budget tests."""


def _degraded_calibration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes digits calibrate INT8 on constant mid-grey images: every activation range is then far
    too narrow for real digits, which costs tens of points of accuracy."""
    real = digits.held_out

    def held_out(source):  # type: ignore[no-untyped-def]
        held = real(source)
        grey = np.full_like(held.calibration[0], DEGRADED_PIXEL)
        return replace(held, calibration=(grey,))

    monkeypatch.setattr(digits, "held_out", held_out)


@pytest.fixture
def as_onnx_source(built: Built, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Gives digits the `export_onnx` hook, serving the module build's FP32 ONNX: a build then
    skips training (and `train` fails the test if called). Returns that ONNX file."""
    source_onnx = built.artifacts / "digits" / "fp32.onnx"

    def export_onnx(source, dest):  # type: ignore[no-untyped-def]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source_onnx, dest)
        return dest

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("train ran for a source with export_onnx")

    monkeypatch.setattr(digits, "export_onnx", export_onnx, raising=False)
    monkeypatch.setattr(digits, "train", refuse)
    return source_onnx


def test_every_variant_is_built_gated_published_and_recorded(built: Built) -> None:
    by_variant = {r.variant: r for r in built.results}
    fp32 = by_variant["fp32"]
    manifest = _manifest(built.artifacts)
    assert list(manifest["variants"]) == ["fp32", "fp16", "int8"]
    for precision, served in (("fp32", "digits"), ("fp16", "digits_fp16"), ("int8", "digits_int8")):
        result = by_variant[precision]
        published = built.repository / served / "1" / "model.onnx"
        entry = manifest["variants"][precision]
        assert result.artifact == published and result.served_as == served
        assert entry["published"] == f"{served}/1/model.onnx"
        assert entry["artifact"] == f"digits/{precision}.onnx"
        assert entry["sha256"] == publish.sha256_file(published)
        assert published.read_bytes() == (built.artifacts / "digits" / f"{precision}.onnx").read_bytes()
        assert entry["size_bytes"] == result.size_bytes == published.stat().st_size
        assert entry["latency_ms_batch1"] == result.latency_ms > 0
        assert entry["metrics"][digits.METRIC] == {
            "reference": fp32.metric_torch,
            "onnxruntime": result.metric_onnx,
        }
        assert entry["metric_drop"] == pytest.approx(fp32.metric_torch - result.metric_onnx)
        assert result.metric_drop == entry["metric_drop"]
        # the manifest copy beside each served artifact is the manifest
        assert json.loads((built.repository / served / "1" / "manifest.json").read_text()) == manifest
    for precision in ("fp16", "int8"):
        entry = manifest["variants"][precision]
        budget = {v.precision: v.max_metric_drop for v in FAST.build.variants}[precision]
        assert entry["max_metric_drop"] == budget == by_variant[precision].max_metric_drop
        assert entry["metric_drop"] <= budget
        assert set(entry["timings_s"]) == {"produce", "evaluate"}
    int8 = manifest["variants"]["int8"]
    assert int8["int8"]["method"] == "minmax" and int8["int8"]["calibration_items"] == 256
    assert int8["size_bytes"] < 0.35 * manifest["variants"]["fp32"]["size_bytes"]
    assert manifest["variants"]["fp16"]["size_bytes"] < 0.55 * manifest["variants"]["fp32"]["size_bytes"]


def test_build_prints_calibration_progress_and_a_table_row_per_variant(built: Built) -> None:
    lines = built.output.splitlines()
    calibration = [line for line in lines if "calibration batch" in line]
    assert calibration == [f"[digits]   calibration batch {k}/8 (32 items)" for k in range(1, 9)]
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    rows = [line.split() for line in lines[header + 1 : header + 4]]
    by_variant = {r.variant: r for r in built.results}
    for row, (precision, served) in zip(
        rows, (("fp32", "digits"), ("fp16", "digits_fp16"), ("int8", "digits_int8")), strict=True
    ):
        result = by_variant[precision]
        assert row[:5] == ["digits", precision, "test", "accuracy", f"{result.metric_onnx:.4f}"]
        assert row[5] == f"{result.metric_drop:.4f}"
        assert row[-2:] == [served, "built"]
        assert f"{result.size_bytes / 1024:.1f}" in row
    assert rows[1][6] == "(0.005)" and rows[2][6] == "(0.005)"
    assert lines[header + 4] == ""


def test_served_variants_load_in_kiln_onnx_and_score_as_recorded(built: Built) -> None:
    split = digits.load_split(FAST.build.source)
    for result in built.results:
        served = replace(FAST, name=result.served_as)
        logits = _onnx_logits(served, result.artifact.parent, split.x_test)
        assert logits.dtype == np.float32
        assert digits.accuracy_of_logits(logits, split.y_test) == result.metric_onnx  # as the build ran it


def test_changed_budget_rebuilds(copy_of_built: Built, as_onnx_source: Path) -> None:
    looser = _with_variants(
        FAST, Variant("fp32"), Variant("fp16", max_metric_drop=0.005), Variant("int8", max_metric_drop=0.01)
    )
    results, output = _build([looser], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.BUILT] * 3
    assert "[digits] building (changed: spec)" in output
    assert _manifest(copy_of_built.artifacts)["variants"]["int8"]["max_metric_drop"] == 0.01
    assert results[2].max_metric_drop == 0.01


def test_deleted_published_variant_rebuilds(copy_of_built: Built) -> None:
    int8 = copy_of_built.repository / "digits_int8" / "1" / "model.onnx"
    good = int8.read_bytes()
    int8.unlink()
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.BUILT] * 3
    assert f"[digits] building (published int8 artifact {int8} is missing)" in output
    assert int8.read_bytes() == good  # training, export and calibration are deterministic


def test_int8_past_its_budget_fails_the_build_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _degraded_calibration(monkeypatch)
    strict = _with_variants(FAST, Variant("fp32"), Variant("int8", max_metric_drop=0.0))
    monkeypatch.setattr("kiln.registry.specs", lambda: (strict,))
    monkeypatch.setenv("KILN_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("KILN_MODEL_REPOSITORY", str(tmp_path / "repo"))
    args = _command(["build"])
    assert args.func(args) == pipeline.EXIT_BUILD_FAILED
    captured = capsys.readouterr()
    err = captured.err.strip()
    match = re.fullmatch(
        r"kiln build: failed: model 'digits', stage 'budget': variant int8: test accuracy (0\.\d{4}) "
        r"is (0\.\d{4}) below the FP32 PyTorch model's (0\.\d{4}), more than its budget "
        r"max_metric_drop 0; build\.variants\[1\] of 360 held-out items; nothing was published "
        r"\(the last good build's artifacts stay\); the rejected artifact is (.+int8\.onnx)",
        err,
    )
    assert match, err
    value, drop, reference = (float(match.group(i)) for i in (1, 2, 3))
    assert reference > 0.95 and value < reference - 0.1  # constant calibration: a collapse
    # Each printed number is rounded to 4 decimals (at most 5e-5 off), so the printed drop is
    # within 3 * 5e-5 of the difference of the printed values, whatever the CPU's digits.
    assert drop == pytest.approx(reference - value, abs=1.5e-4 + 1e-12)
    assert Path(match.group(4)).resolve() == (tmp_path / "artifacts" / "digits" / "int8.onnx").resolve()
    # the variant's log line named its metric before the gate refused it
    assert f"test accuracy {value:.4f} vs FP32 PyTorch {reference:.4f}" in captured.out
    assert "calibration batch 8/8 (32 items)" in captured.out
    assert not (tmp_path / "repo").exists()  # nothing of any variant was published
    assert not (tmp_path / "artifacts" / "digits" / "manifest.json").exists()


def test_budget_error_keeps_the_last_good_build(
    copy_of_built: Built, monkeypatch: pytest.MonkeyPatch, as_onnx_source: Path
) -> None:
    _degraded_calibration(monkeypatch)
    files = sorted(p for p in copy_of_built.repository.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    manifest = (copy_of_built.artifacts / "digits" / "manifest.json").read_bytes()
    with pytest.raises(pipeline.BudgetError) as info:
        _build([FAST], copy_of_built.artifacts, copy_of_built.repository, force=True)
    error = info.value
    assert (error.model, error.stage, error.variant, error.budget) == ("digits", "budget", "int8", 0.005)
    assert error.drop == pytest.approx(error.reference - error.value) and error.drop > 0.005
    assert {p: p.read_bytes() for p in files} == before
    assert (copy_of_built.artifacts / "digits" / "manifest.json").read_bytes() == manifest


def test_a_variant_not_served_stays_in_artifacts_and_its_old_copy_is_removed(
    copy_of_built: Built,
) -> None:
    fp16_dir = copy_of_built.repository / "digits_fp16" / "1"
    assert (fp16_dir / "model.onnx").is_file()
    (copy_of_built.repository / "digits_fp16" / "config.pbtxt").write_text("generated\n")
    quiet = _with_variants(
        FAST, Variant("fp32"), Variant("fp16", max_metric_drop=0.005, serve=False),
        Variant("int8", max_metric_drop=0.005),
    )
    results, output = _build([quiet], copy_of_built.artifacts, copy_of_built.repository)
    fp16 = results[1]
    assert (fp16.variant, fp16.served_as) == ("fp16", None)
    assert fp16.artifact == copy_of_built.artifacts / "digits" / "fp16.onnx"
    entry = _manifest(copy_of_built.artifacts)["variants"]["fp16"]
    assert "published" not in entry and entry["served_as"] is None
    assert entry["sha256"] == publish.sha256_file(fp16.artifact)
    assert not fp16_dir.exists()  # the previous build's copy and manifest are gone ...
    assert (copy_of_built.repository / "digits_fp16" / "config.pbtxt").read_text() == "generated\n"
    assert f"removed {fp16_dir / 'model.onnx'} (no longer a served variant of the spec)" in output
    header = next(line for line in output.splitlines() if line.startswith("model "))
    row = output.splitlines()[output.splitlines().index(header) + 2].split()
    assert row[1] == "fp16" and row[-2:] == [pipeline.NOT_SERVED, "built"]
    # ... and the non-served artifact is covered by the up-to-date check
    kwargs = {"artifacts": copy_of_built.artifacts, "repository": copy_of_built.repository}
    source_hash = _manifest(copy_of_built.artifacts)["source_hash"]
    assert publish.freshness("digits", source_hash, **kwargs).up_to_date
    fp16.artifact.write_bytes(b"edited")
    assert publish.freshness("digits", source_hash, **kwargs).reason == (
        f"fp16 artifact {fp16.artifact} changed since the build"
    )


def test_extra_files_hook_publishes_beside_every_served_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[object, Path]] = []

    def extra_files(source, model, workdir):  # type: ignore[no-untyped-def]
        calls.append((model, workdir))
        path = workdir / "labels.txt"
        path.write_text("\n".join(str(k) for k in range(10)) + "\n")
        return {"labels.txt": path}

    monkeypatch.setattr(digits, "extra_files", extra_files, raising=False)
    artifacts, repository = tmp_path / "artifacts", tmp_path / "repo"
    spec = _with_variants(FAST, Variant("fp32"), Variant("int8", max_metric_drop=0.005))
    results, output = _build([spec], artifacts, repository)
    assert len(calls) == 1 and calls[0][1] == artifacts / "digits"
    assert calls[0][0] is not None  # the trained module
    manifest = _manifest(artifacts)
    for served, precision in (("digits", "fp32"), ("digits_int8", "int8")):
        published = repository / served / "1" / "labels.txt"
        assert published.read_text().splitlines() == [str(k) for k in range(10)]
        assert manifest["variants"][precision]["files"] == {
            "labels.txt": {
                "published": f"{served}/1/labels.txt",
                "sha256": publish.sha256_file(published),
                "size_bytes": published.stat().st_size,
            }
        }
    assert "[digits] files: labels.txt (0.0 KiB) (published beside each served variant)" in output
    # a deleted extra file is noticed: the model is rebuilt
    (repository / "digits_int8" / "1" / "labels.txt").unlink()
    state = publish.freshness(
        "digits", manifest["source_hash"], artifacts=artifacts, repository=repository
    )
    assert state.reason == (
        f"published int8 file 'labels.txt' {repository / 'digits_int8' / '1' / 'labels.txt'} is missing"
    )


def test_extra_files_hook_with_a_reserved_name_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: Built, as_onnx_source: Path
) -> None:
    def extra_files(source, model, workdir):  # type: ignore[no-untyped-def]
        return {"model.onnx": built.artifacts / "digits" / "fp32.onnx"}

    monkeypatch.setattr(digits, "extra_files", extra_files, raising=False)
    with pytest.raises(pipeline.BuildError) as info:
        _build([FAST], tmp_path / "artifacts", tmp_path / "repo")
    assert str(info.value) == (
        "model 'digits', stage 'files': extra_files: model 'digits': extra file name 'model.onnx' is "
        "reserved (kiln writes model.onnx, manifest.json into the version folder)"
    )
    assert not (tmp_path / "repo").exists()


def test_export_onnx_hook_replaces_training_and_the_reference_is_that_onnx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, built: Built, as_onnx_source: Path
) -> None:
    source_onnx = as_onnx_source
    extra_models: list[object] = []

    def extra_files(source, model, workdir):  # type: ignore[no-untyped-def]
        extra_models.append(model)
        return {}

    monkeypatch.setattr(digits, "extra_files", extra_files, raising=False)
    artifacts, repository = tmp_path / "artifacts", tmp_path / "repo"
    results, output = _build([FAST], artifacts, repository)
    assert [r.status for r in results] == [pipeline.BUILT] * 3
    fp32, _, int8 = results
    # the reference is the source's ONNX on ONNX Runtime with every graph optimization off (never
    # the served session itself): the same predictions as the trained model's
    assert fp32.metric_torch == built.result.metric_onnx == fp32.metric_onnx
    assert (repository / "digits" / "1" / "model.onnx").read_bytes() == source_onnx.read_bytes()
    assert "[digits] export: DigitsCNNSource is ONNX already; no training" in output
    assert (
        "[digits] check: ONNX Runtime vs source ONNX (graph optimizations off) on 360 held-out items: "
        "max abs error"
    ) in output
    assert int8.metric_onnx == built.results[2].metric_onnx
    manifest = _manifest(artifacts)
    entry = manifest["variants"]["fp32"]
    assert (entry["exporter"], entry["checkpoint"], entry["reference"]) == (
        "source onnx", None, "FP32 source ONNX (graph optimizations off)"
    )
    assert not (artifacts / "digits" / "checkpoint.pt").exists()
    assert "train" not in manifest["timings_s"]
    assert extra_models == [None]  # no trained module for a source that is ONNX


def test_int8_settings_hook_changes_calibration_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_onnx_source: Path
) -> None:
    from kiln.build import quantize

    settings = quantize.Int8Settings(batch_size=64, method="percentile", exclude_op_types=("Gemm",))
    monkeypatch.setattr(digits, "int8_settings", lambda source: settings, raising=False)
    spec = _with_variants(FAST, Variant("fp32"), Variant("int8", max_metric_drop=0.005))
    results, output = _build([spec], tmp_path / "artifacts", tmp_path / "repo")
    assert "[digits] int8: calibrating on 256 held-out calibration items (percentile, batch 64)" in output
    assert [line for line in output.splitlines() if "calibration batch" in line] == [
        f"[digits]   calibration batch {k}/4 (64 items)" for k in range(1, 5)
    ]
    # ONNX Runtime's own prints (the percentile calibrator's notes) arrive as prefixed lines
    assert "[digits]   int8: Finding optimal threshold for each tensor using 'percentile' algorithm ..." in output
    record = _manifest(tmp_path / "artifacts")["variants"]["int8"]["int8"]
    assert record == {**settings.record(), "calibration_items": 256}

    monkeypatch.setattr(digits, "int8_settings", lambda source: {"method": "minmax"}, raising=False)
    with pytest.raises(quantize.QuantizeError) as info:
        _build([spec], tmp_path / "artifacts2", tmp_path / "repo2")
    assert str(info.value) == (
        "model 'digits', stage 'quantize': variant int8: the source stage's int8_settings hook must "
        "return kiln.build.quantize.Int8Settings, got dict"
    )


# --- kiln.build.user_source through the pipeline: the `spec=` keyword and `exports_onnx` ------------


def _user_held_out(path: Path) -> Path:
    held = digits.held_out(FAST.build.source)
    np.savez(
        path,
        **{tensors.DIGITS_PIXELS: held.inputs[0], f"calibration/{tensors.DIGITS_PIXELS}": held.calibration[0]},
    )
    return path


def _user_spec(source: object) -> ModelSpec:
    return replace(
        FAST,
        name="mine",
        build=replace(
            FAST.build,
            source=source,
            min_accuracy=None,
            variants=(Variant("fp32"), Variant("int8", max_metric_drop=0.02)),
        ),
    )


def test_user_onnx_file_source_builds_variants_without_training(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.build import user_source

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("train ran for an OnnxFileSource")

    monkeypatch.setattr(user_source, "train", refuse)
    source = OnnxFileSource(
        path=str(built.artifacts / "digits" / "fp32.onnx"),
        held_out=str(_user_held_out(tmp_path / "held.npz")),
    )
    results, output = _build([_user_spec(source)], tmp_path / "artifacts", tmp_path / "repo")
    fp32, int8 = results
    assert (fp32.metric, fp32.metric_torch, fp32.metric_onnx) == (user_source.METRIC_TOP1, 1.0, 1.0)
    assert 1.0 - int8.metric_onnx <= 0.02 and int8.served_as == "mine_int8"
    assert "[mine] export: OnnxFileSource is ONNX already; no training" in output
    assert (tmp_path / "repo" / "mine_int8" / "1" / "model.onnx").is_file()


def test_user_checkpoint_source_is_loaded_not_exported_from_onnx(
    built: Built, tmp_path: Path
) -> None:
    source = CheckpointSource(
        factory="kiln.models.digits.build:build_model",
        checkpoint=str(built.artifacts / "digits" / "checkpoint.pt"),
        held_out=str(_user_held_out(tmp_path / "held.npz")),
    )
    results, output = _build([_user_spec(source)], tmp_path / "artifacts", tmp_path / "repo")
    assert [r.variant for r in results] == ["fp32", "int8"]
    assert "[mine] train: PyTorch top-1 agreement with FP32 1.0000 on 360 held-out items" in output
    assert "kiln.models.digits.build:build_model -> Sequential" in output
    entry = _manifest_of(tmp_path / "artifacts", "mine")["variants"]["fp32"]
    assert (entry["exporter"], entry["checkpoint"]) == (export.DEFAULT_EXPORTER, "mine/checkpoint.pt")


def _manifest_of(artifacts: Path, model: str) -> dict:
    return json.loads((artifacts / model / "manifest.json").read_text())


# --- values derived from the trained model (a decision threshold) -----------------------------


def _derive(monkeypatch: pytest.MonkeyPatch, value: float | Exception) -> list:
    """Gives digits a `derived` hook publishing `cut.json` (or raising `value`); returns the
    models it was handed."""
    seen: list = []

    def derived(source, model, workdir):  # type: ignore[no-untyped-def]
        seen.append(model)
        if isinstance(value, Exception):
            raise value
        document = {"format": 1, "threshold": value, "rule": "the test's rule", "evidence": {"items": 3}}
        path = Path(workdir) / "cut.json"
        path.write_text(json.dumps(document))
        return {"cut.json": (path, document)}

    monkeypatch.setattr(digits, "derived", derived, raising=False)
    return seen


def test_derived_values_are_published_beside_each_variant_and_recorded_in_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _derive(monkeypatch, 0.25)
    spec = _with_variants(FAST, Variant("fp32"), Variant("fp16", max_metric_drop=0.01))
    results, output = _build([spec], tmp_path / "artifacts", tmp_path / "repo")
    assert len(seen) == 1 and seen[0] is not None  # the trained module
    for served in ("digits", "digits_fp16"):
        published = json.loads((tmp_path / "repo" / served / "1" / "cut.json").read_text())
        assert published["threshold"] == 0.25
    manifest = _manifest(tmp_path / "artifacts")
    assert manifest["derived"] == {
        "cut.json": {"format": 1, "threshold": 0.25, "rule": "the test's rule", "evidence": {"items": 3}}
    }
    assert set(manifest["variants"]["fp32"]["files"]) == {"cut.json"}
    assert "[digits] derived: cut.json: threshold 0.25 (the test's rule); items 3" in output
    # Published like an extra file: deleting it rebuilds the model.
    (tmp_path / "repo" / "digits" / "1" / "cut.json").unlink()
    again, _ = _build([spec], tmp_path / "artifacts", tmp_path / "repo")
    assert again[0].status == pipeline.BUILT and len(seen) == 2


def test_a_rule_that_cannot_be_met_fails_the_build_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _derive(monkeypatch, ValueError("no threshold reaches recall 1"))
    with pytest.raises(pipeline.BuildError) as caught:
        _build([_with_variants(FAST, Variant("fp32"))], tmp_path / "artifacts", tmp_path / "repo")
    assert str(caught.value) == "model 'digits', stage 'derive': no threshold reaches recall 1"
    assert isinstance(caught.value.__cause__, ValueError)
    assert not (tmp_path / "repo").exists()


# --- checks of the built variants (the optional `verify` hook) ----------------------------------


def _verify(monkeypatch: pytest.MonkeyPatch, outcome: dict | Exception) -> list:
    """Gives digits a `verify` hook returning `outcome` (or raising it); returns what it was
    handed: (model, artifacts by precision, workdir) per call."""
    seen: list = []

    def verify(source, model, artifacts, workdir, progress):  # type: ignore[no-untyped-def]
        seen.append((model, dict(artifacts), Path(workdir)))
        progress("checked every variant")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(digits, "verify", verify, raising=False)
    return seen


def test_verify_hook_sees_every_built_variant_and_its_record_lands_in_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _verify(monkeypatch, {"checked": ["fp32", "fp16"], "max_abs_error": 0.5})
    spec = _with_variants(FAST, Variant("fp32"), Variant("fp16", max_metric_drop=0.01))
    _, output = _build([spec], tmp_path / "artifacts", tmp_path / "repo")
    [(model, artifacts, workdir)] = seen
    assert model is not None  # the trained module
    assert artifacts == {
        "fp32": tmp_path / "artifacts" / "digits" / "fp32.onnx",
        "fp16": tmp_path / "artifacts" / "digits" / "fp16.onnx",
    }
    assert workdir == tmp_path / "artifacts" / "digits"
    assert _manifest(tmp_path / "artifacts")["verify"] == {"checked": ["fp32", "fp16"], "max_abs_error": 0.5}
    assert "[digits]   checked every variant" in output
    assert "[digits] verify: fp32, fp16 passed the source stage's checks" in output


def test_a_failed_verify_check_fails_the_build_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _verify(monkeypatch, ValueError("variant fp32: the cached logits differ"))
    with pytest.raises(pipeline.BuildError) as caught:
        _build([_with_variants(FAST, Variant("fp32"))], tmp_path / "artifacts", tmp_path / "repo")
    assert str(caught.value) == "model 'digits', stage 'verify': variant fp32: the cached logits differ"
    assert isinstance(caught.value.__cause__, ValueError)
    assert not (tmp_path / "repo").exists()
    assert not (tmp_path / "artifacts" / "digits" / "manifest.json").exists()


def test_building_one_model_writes_the_configs_of_the_pipelines_that_run_it() -> None:
    # `kiln build --model fraud` serves fraud_scorer too: the pipeline and its steps that need no
    # build; not the other folders' models.
    from kiln import registry

    specs = registry.specs()
    fraud = next(s for s in specs if s.name == "fraud")
    names = [s.name for s in pipeline._with_pipelines(specs, [fraud])]
    assert sorted(names) == ["fraud", "fraud_features", "fraud_scorer", "fraud_threshold"]
    iris = next(s for s in specs if s.name == "iris")  # a folder with no pipeline
    assert [s.name for s in pipeline._with_pipelines(specs, [iris])] == ["iris"]
