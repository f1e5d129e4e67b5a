"""Ensembles in the spec: wiring validation, rendering, and the files the generator owns."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kiln.registry import by_name
from kiln.repository import generate, render, stale
from kiln.spec import EnsembleSpec, EnsembleStep, ModelSpec, SpecError, TensorSpec, validate

DIGITS = by_name("digits")
assert isinstance(DIGITS, ModelSpec)

SCALE = ModelSpec(
    name="scale",
    backend="kiln_onnx",
    inputs=(TensorSpec("raw", "FP32", (1, 8, 8)),),
    outputs=(TensorSpec("scaled", "FP32", (1, 8, 8)),),
    max_batch_size=64,
    files={"notes.txt": "scales pixels\n"},
)

WRAP = EnsembleSpec(
    name="reader",
    inputs=(TensorSpec("raw_pixels", "FP32", (1, 8, 8)),),
    outputs=(TensorSpec("digit_logits", "FP32", (10,)),),
    steps=(
        EnsembleStep("scale", {"raw": "raw_pixels"}, {"scaled": "pixels_scaled"}),
        EnsembleStep("digits_int8", {"pixels": "pixels_scaled"}, {"logits": "digit_logits"}),
    ),
    max_batch_size=32,
)


def problems_of(*specs) -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        validate(specs)
    return caught.value.problems


def test_a_well_wired_ensemble_over_a_served_variant_is_valid() -> None:
    validate([DIGITS, SCALE, WRAP])


def test_ensemble_renders_platform_and_steps() -> None:
    parsed = text_format.Parse(render(WRAP), model_config_pb2.ModelConfig())
    assert parsed.platform == "ensemble"
    assert parsed.backend == ""
    assert parsed.max_batch_size == 32
    steps = parsed.ensemble_scheduling.step
    assert [s.model_name for s in steps] == ["scale", "digits_int8"]
    assert dict(steps[0].input_map) == {"raw": "raw_pixels"}
    assert dict(steps[1].output_map) == {"logits": "digit_logits"}
    assert all(s.model_version == -1 for s in steps)
    assert not parsed.instance_group


def test_optional_inputs_render_as_optional() -> None:
    spec = dataclasses.replace(
        SCALE, inputs=(TensorSpec("raw", "FP32", (1, 8, 8), optional=True),)
    )
    parsed = text_format.Parse(render(spec), model_config_pb2.ModelConfig())
    assert parsed.input[0].optional is True


def test_step_naming_an_unknown_model_is_reported() -> None:
    bad = dataclasses.replace(
        WRAP, steps=(EnsembleStep("digitz", {"pixels": "raw_pixels"}, {"logits": "digit_logits"}),)
    )
    problem = problems_of(DIGITS, bad)[0]
    assert "ensemble 'reader': field 'steps[0].model' must name another served model" in problem
    assert "'digitz' is not one" in problem and "digits_int8" in problem


def test_unfed_input_and_unknown_map_keys_are_reported() -> None:
    bad = dataclasses.replace(
        WRAP,
        steps=(EnsembleStep("digits", {"pixel": "raw_pixels"}, {"logit": "digit_logits"}),),
    )
    problems = problems_of(DIGITS, bad)
    assert any("maps 'pixel', which is not an input of 'digits' (its inputs: pixels)" in p for p in problems)
    assert any("leaves 'digits' input(s) ['pixels'] unfed" in p for p in problems)
    assert any("maps 'logit', which is not an output of 'digits'" in p for p in problems)
    assert any("'digit_logits' is produced by no step" in p for p in problems)
    assert any("input(s) ['raw_pixels'] feed no step" in p for p in problems)


def test_tensor_consumed_before_it_is_produced_is_reported() -> None:
    swapped = dataclasses.replace(WRAP, steps=tuple(reversed(WRAP.steps)))
    problems = problems_of(DIGITS, SCALE, swapped)
    assert any(
        "feeds 'digits_int8' input 'pixels' from 'pixels_scaled', which is neither an ensemble "
        "input nor an earlier step's output" in p
        for p in problems
    )


def test_dtype_and_dims_mismatch_between_steps_is_reported() -> None:
    wrong = dataclasses.replace(SCALE, outputs=(TensorSpec("scaled", "FP16", (8, 8)),))
    problems = problems_of(DIGITS, wrong, WRAP)
    assert any(
        "feeds 'digits_int8' input 'pixels' (FP32 [1, 8, 8]) from 'pixels_scaled' "
        "(output 'scaled' of 'scale': FP16 [8, 8])" in p
        for p in problems
    )


def test_ensemble_batch_above_a_steps_max_batch_size_is_reported() -> None:
    big = dataclasses.replace(WRAP, max_batch_size=128)
    problems = problems_of(DIGITS, SCALE, big)
    assert any("'scale' has max_batch_size 64, below the ensemble's 128" in p for p in problems)


def test_a_tensor_with_two_producers_is_reported() -> None:
    twice = dataclasses.replace(
        WRAP,
        steps=(
            EnsembleStep("scale", {"raw": "raw_pixels"}, {"scaled": "raw_pixels"}),
            EnsembleStep("digits", {"pixels": "raw_pixels"}, {"logits": "digit_logits"}),
        ),
    )
    problems = problems_of(DIGITS, SCALE, twice)
    assert any("names 'raw_pixels', already the ensemble input" in p for p in problems)


def test_output_only_fields_and_file_names_are_checked() -> None:
    bad = dataclasses.replace(
        SCALE,
        name="scale2",
        outputs=(TensorSpec("scaled", "FP32", (1, 8, 8), optional=True),),
        files={"../escape.txt": "x", "config.pbtxt": "y"},
    )
    problems = problems_of(bad)
    assert any("field 'outputs[0].optional' is only allowed on inputs" in p for p in problems)
    assert any("got '../escape.txt'" in p for p in problems)
    assert any("got 'config.pbtxt'" in p for p in problems)


@pytest.mark.parametrize("form", ["ensemble", "fused"])
def test_allow_ragged_batch_is_refused_on_a_pipelines_inputs_in_either_form(form: str) -> None:
    raw = dataclasses.replace(WRAP.inputs[0], allow_ragged_batch=True)
    bad = dataclasses.replace(WRAP, inputs=(raw,), form=form)
    problems = problems_of(DIGITS, SCALE, bad)
    assert any(
        "ensemble 'reader': field 'inputs[0].allow_ragged_batch' (input 'raw_pixels') is only allowed "
        "on a model's inputs, not a pipeline's" in p
        for p in problems
    ), problems
    out = dataclasses.replace(WRAP.outputs[0], allow_ragged_batch=True)
    problems = problems_of(DIGITS, SCALE, dataclasses.replace(WRAP, outputs=(out,), form=form))
    assert any("ensemble 'reader': field 'outputs[0].allow_ragged_batch' is only allowed on inputs" in p for p in problems)


def test_a_variant_name_colliding_with_another_model_is_reported() -> None:
    clash = dataclasses.replace(SCALE, name="digits_int8")
    problems = problems_of(DIGITS, clash)
    assert any("model 'digits_int8': served by more than one spec (digits, digits_int8)" in p for p in problems)


def test_generate_writes_files_and_version_folders_and_stale_checks_them(tmp_path: Path) -> None:
    generate([DIGITS, SCALE, WRAP], tmp_path, backends=("kiln_onnx",))
    assert (tmp_path / "scale" / "notes.txt").read_text() == "scales pixels\n"
    assert (tmp_path / "scale" / "1" / ".gitkeep").is_file()
    assert (tmp_path / "reader" / "1" / ".gitkeep").is_file()
    assert not (tmp_path / "digits" / "1").exists()  # built models get theirs from the build
    assert stale([DIGITS, SCALE, WRAP], tmp_path) == []

    (tmp_path / "scale" / "notes.txt").write_text("edited by hand\n")
    (tmp_path / "reader" / "1" / ".gitkeep").unlink()
    problems = stale([DIGITS, SCALE, WRAP], tmp_path)
    assert any("notes.txt (committed)" in p and "+scales pixels" in p for p in problems)
    assert any(p.endswith("reader/1/.gitkeep: missing (the spec declares model 'reader')") for p in problems)
