"""The repository generator: committed configs equal its output; configs go through the schema."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kiln import paths, registry
from kiln.build.publish import refused_served_names
from kiln.registry import by_name
from kiln.repository import generate, model_config, render, served_specs, stale
from kiln.spec import DynamicBatching, SpecError, Variant

SPECS = registry.specs()

DIGITS = by_name("digits")


def test_committed_repository_matches_the_generator() -> None:
    # An optional variant the last build refused has no model, and so no config.
    problems = stale(SPECS, paths.model_repository(), refused=refused_served_names(SPECS))
    assert problems == [], "run `make generate` and commit:\n" + "\n".join(problems)


def test_rendered_config_parses_back_to_the_spec() -> None:
    parsed = text_format.Parse(render(DIGITS), model_config_pb2.ModelConfig())
    assert parsed.name == "digits"
    assert parsed.backend == "kiln_onnx"
    assert parsed.max_batch_size == 64
    assert [(i.name, list(i.dims)) for i in parsed.input] == [("pixels", [1, 8, 8])]
    assert parsed.input[0].data_type == model_config_pb2.TYPE_FP32
    assert [(o.name, list(o.dims)) for o in parsed.output] == [("logits", [10])]
    assert list(parsed.dynamic_batching.preferred_batch_size) == [16, 32, 64]
    assert parsed.dynamic_batching.max_queue_delay_microseconds == 500
    assert parsed.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert parsed.parameters["intra_op_threads"].string_value == "1"
    assert parsed.model_warmup[0].inputs["pixels"].zero_data is True


def test_ngc_target_uses_the_native_onnxruntime_platform() -> None:
    config = model_config(DIGITS, "ngc")
    assert config.platform == "onnxruntime_onnx"
    assert config.backend == ""
    assert config.default_model_filename == "model.onnx"
    assert set(config.parameters) == {"intra_op_thread_count", "inter_op_thread_count"}


def test_allow_ragged_batch_renders_on_the_inputs_that_set_it() -> None:
    encoder = model_config(by_name("text_encoder"))
    assert [(i.name, i.allow_ragged_batch) for i in encoder.input] == [
        ("input_ids", True), ("attention_mask", True),
    ]
    assert "allow_ragged_batch: true" in render(by_name("text_encoder"))
    assert "allow_ragged_batch" not in render(DIGITS)  # off: nothing written, Triton's default
    pool = by_name("text_pool")
    one = dataclasses.replace(pool.inputs[1], allow_ragged_batch=True)
    parsed = model_config(dataclasses.replace(pool, inputs=(pool.inputs[0], one)))
    assert [i.allow_ragged_batch for i in parsed.input] == [False, True]


def test_ngc_target_leaves_allow_ragged_batch_out_for_onnxruntime_models_only() -> None:
    # Triton's onnxruntime backend would run a ragged batch as one flat tensor, which text_encoder's
    # ONNX model does not take; kiln_onnx (embedded) runs each shape of a batch on its own.
    encoder = model_config(by_name("text_encoder"), "ngc")
    assert encoder.platform == "onnxruntime_onnx"
    assert [i.allow_ragged_batch for i in encoder.input] == [False, False]
    assert "allow_ragged_batch" not in render(by_name("text_encoder"), "ngc")
    pool = by_name("text_pool")  # a kiln backend stays a kiln backend on NGC: the flag stays
    ragged = tuple(dataclasses.replace(t, allow_ragged_batch=True) for t in pool.inputs)
    assert all(i.allow_ragged_batch for i in model_config(dataclasses.replace(pool, inputs=ragged), "ngc").input)


def test_unknown_target_is_rejected() -> None:
    with pytest.raises(ValueError, match="target must be one of embedded, ngc, got 'k8s'"):
        render(DIGITS, "k8s")


def test_generate_writes_configs_and_stale_detects_drift(tmp_path: Path) -> None:
    written = generate([DIGITS], tmp_path, backends=("kiln_onnx",))
    names = ["digits", "digits_fp16", "digits_int8"]  # one served model per variant
    assert written == [tmp_path / name / "config.pbtxt" for name in names]
    assert stale([DIGITS], tmp_path) == []

    changed = dataclasses.replace(DIGITS, dynamic_batching=DynamicBatching(max_queue_delay_us=7))
    diffs = stale([changed], tmp_path)
    assert len(diffs) == len(names)
    for name, diff in zip(names, diffs, strict=True):
        assert f"{tmp_path / name / 'config.pbtxt'} (committed)" in diff
        assert "-  max_queue_delay_microseconds: 500" in diff
        assert "+  max_queue_delay_microseconds: 7" in diff

    (tmp_path / "orphan").mkdir()
    (tmp_path / "orphan" / "config.pbtxt").write_text('name: "orphan"\n')
    assert any("no spec declares model 'orphan'" in p for p in stale([DIGITS], tmp_path))


def test_each_served_variant_gets_its_own_model(tmp_path: Path) -> None:
    build = dataclasses.replace(
        DIGITS.build,
        variants=(Variant("fp32"), Variant("fp16", serve=False), Variant("int8", max_metric_drop=0.01)),
    )
    spec = dataclasses.replace(DIGITS, build=build)
    assert [s.name for s in served_specs([spec])] == ["digits", "digits_int8"]
    written = generate([spec], tmp_path, backends=("kiln_onnx",))
    assert [p.parent.name for p in written] == ["digits", "digits_int8"]
    int8 = text_format.Parse(written[1].read_text(), model_config_pb2.ModelConfig())
    assert int8.name == "digits_int8"
    assert [i.name for i in int8.input] == [i.name for i in model_config(DIGITS).input]


def test_invalid_spec_writes_nothing(tmp_path: Path) -> None:
    bad = dataclasses.replace(DIGITS, name="other", max_batch_size=-1)
    with pytest.raises(SpecError, match="max_batch_size"):
        generate([DIGITS, bad], tmp_path, backends=("kiln_onnx",))
    assert list(tmp_path.iterdir()) == []
