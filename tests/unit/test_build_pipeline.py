"""The whole pipeline: validation first, stages, gates, no-op rebuilds, the `build` command."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from kiln import tensors
from kiln.build import check, digits, export, pipeline, publish
from kiln.build.specs.digits import SPEC as DIGITS
from kiln.repository import config_dict
from kiln.serving.onnx import OnnxModel
from kiln.spec import ModelSpec, SpecError, Tolerance

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
    result: pipeline.BuildResult
    output: str


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
    assert len(results) == 1
    return Built(root / "artifacts", root / "repo", results[0], output)


@pytest.fixture
def copy_of_built(built: Built, tmp_path: Path) -> Built:
    """The module's build, copied, for tests that change it."""
    artifacts, repository = tmp_path / "artifacts", tmp_path / "repo"
    shutil.copytree(built.artifacts, artifacts)
    shutil.copytree(built.repository, repository)
    return Built(artifacts, repository, built.result, built.output)


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
    assert result.metric_torch > 0.95 and result.metric_onnx == result.metric_torch
    assert result.latency_ms > 0
    assert set(result.timings_s) == {"train", "export", "check", "publish"}

    manifest = _manifest(built.artifacts)
    entry = manifest["variants"]["fp32"]
    assert entry["sha256"] == publish.sha256_file(published)
    assert entry["size_bytes"] == result.size_bytes
    assert entry["metrics"][digits.METRIC] == {
        "pytorch": result.metric_torch,
        "onnxruntime": result.metric_onnx,
    }
    assert entry["exporter"] == export.DEFAULT_EXPORTER and entry["opset"] == FAST.build.opset
    assert entry["check"]["held_out_items"] == 360
    assert entry["check"]["max_abs_error"] <= FAST.build.tolerance.atol
    assert set(manifest["tools"]) >= {"python", "torch", "onnx", "onnxruntime", "scikit-learn"}
    assert set(manifest["timings_s"]) == {"train", "export", "check", "publish"}
    assert manifest["hash_inputs"]["build"]["source"]["epochs"] == FAST_EPOCHS
    assert (built.artifacts / "digits" / "checkpoint.pt").is_file()


def test_build_prints_progress_stage_timings_table_and_where_outputs_went(built: Built) -> None:
    lines = built.output.splitlines()
    epochs = [line for line in lines if line.startswith("[digits]   epoch ")]
    assert len(epochs) == FAST_EPOCHS
    for stage in ("train", "export", "check", "publish"):
        assert any(line.startswith(f"[digits] {stage}: ") and line.endswith("s]") for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("model "))
    assert lines[header].split() == ["model", "variant", "metric", "size", "latency", "b=1", "status"]
    row = lines[header + 1].split()
    assert row[:4] == ["digits", "fp32", "test", "accuracy"]
    assert row[-1] == "built"
    assert f"artifact {built.repository / 'digits' / '1' / 'model.onnx'}" in built.output
    assert f"manifest {built.artifacts / 'digits' / 'manifest.json'}" in built.output


def test_published_model_loads_and_predicts_in_kiln_onnx(built: Built) -> None:
    version = built.repository / "digits" / "1"
    model = OnnxModel.load("digits", version, config_dict(FAST), dict(FAST.parameters))
    split = digits.load_split(FAST.build.source)
    logits = model.run({tensors.DIGITS_PIXELS: split.x_test})[tensors.DIGITS_LOGITS]
    accuracy = float(np.mean(logits.argmax(axis=1) == split.y_test))
    assert accuracy == built.result.metric_onnx


def test_checkpoint_reloads_to_the_recorded_accuracy(built: Built) -> None:
    model = digits.load_trained(FAST, artifacts=built.artifacts)
    split = digits.load_split(FAST.build.source)
    assert digits.accuracy(model, split.x_test, split.y_test) == built.result.metric_torch


def test_second_build_with_nothing_changed_rebuilds_nothing(
    copy_of_built: Built, no_training: None
) -> None:
    published = copy_of_built.repository / "digits" / "1" / "model.onnx"
    manifest = copy_of_built.artifacts / "digits" / "manifest.json"
    before = (published.stat().st_mtime_ns, manifest.read_bytes())
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.UP_TO_DATE]
    assert "nothing to rebuild" in output
    assert (published.stat().st_mtime_ns, manifest.read_bytes()) == before
    result = results[0]
    assert (result.metric_onnx, result.size_bytes) == (
        copy_of_built.result.metric_onnx,
        copy_of_built.result.size_bytes,
    )
    assert f"artifact {published}" in output


def test_changed_spec_rebuilds(copy_of_built: Built) -> None:
    old_hash = _manifest(copy_of_built.artifacts)["source_hash"]
    changed = _with(FAST, epochs=FAST_EPOCHS + 1)
    results, output = _build([changed], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.BUILT]
    assert "[digits] building (spec, code or tool versions changed)" in output
    manifest = _manifest(copy_of_built.artifacts)
    assert manifest["source_hash"] != old_hash
    assert manifest["hash_inputs"]["build"]["source"]["epochs"] == FAST_EPOCHS + 1


def test_hand_edited_artifact_is_rebuilt(copy_of_built: Built) -> None:
    published = copy_of_built.repository / "digits" / "1" / "model.onnx"
    good = published.read_bytes()
    published.write_bytes(b"not a model")
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository)
    assert [r.status for r in results] == [pipeline.BUILT]
    assert "changed since the build" in output
    assert published.read_bytes() == good  # training and export are deterministic


def test_force_rebuilds_an_up_to_date_model(copy_of_built: Built) -> None:
    results, output = _build([FAST], copy_of_built.artifacts, copy_of_built.repository, force=True)
    assert [r.status for r in results] == [pipeline.BUILT]
    assert "building (forced (--force))" in output


def test_invalid_spec_is_refused_before_any_stage(tmp_path: Path, no_training: None) -> None:
    bad = _with(FAST, epochs=0, test_fraction=1.5)
    with pytest.raises(SpecError) as info:
        _build([FAST, bad], tmp_path / "artifacts", tmp_path / "repo")
    message = str(info.value)
    assert "field 'build.source.epochs' must be an integer in 1..1000, got 0" in message
    assert "field 'build.source.test_fraction' must be a number in 0.05..0.95, got 1.5" in message
    assert list(tmp_path.iterdir()) == []


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


def test_too_tight_tolerance_fails_the_check(tmp_path: Path) -> None:
    # ONNX Runtime and PyTorch sum in other orders: a zero tolerance cannot hold for float32.
    strict = replace(FAST, build=replace(FAST.build, tolerance=Tolerance(atol=0.0, rtol=0.0)))
    with pytest.raises(check.CheckError, match=r"stage 'check'.*tolerance atol=0, rtol=0"):
        _build([strict], tmp_path / "artifacts", tmp_path / "repo")
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
    monkeypatch.setattr("kiln.build.specs.SPECS", (FAST,))
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

    monkeypatch.setattr("kiln.build.specs.SPECS", (_with(FAST, epochs=0),))
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
