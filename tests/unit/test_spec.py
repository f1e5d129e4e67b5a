"""The typed spec's validator: every invalid field is named, with the allowed range and the value."""

from __future__ import annotations

import dataclasses

import pytest

from kiln import paths, registry
from kiln.models.digits.spec import DigitsCNNSource
from kiln.models.fraud.spec import FraudMLPSource
from kiln.models.text_encoder.spec import TextEncoderSource
from kiln.registry import by_name
from kiln.spec import (
    CheckpointSource,
    DynamicBatching,
    InstanceGroup,
    OnnxFileSource,
    SpecError,
    TensorSpec,
    Tolerance,
    Variant,
    Warmup,
    validate,
)

SPECS = registry.specs()

BACKENDS = tuple(sorted(paths.available_backends()))
DIGITS = by_name("digits")


def problems_of(*specs) -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        validate(specs, BACKENDS)
    return caught.value.problems


def test_committed_specs_are_valid() -> None:
    validate(SPECS, BACKENDS)


def test_by_name_lists_known_models_when_missing() -> None:
    with pytest.raises(KeyError, match="known: digits"):
        by_name("nope")


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"name": "../etc"}, "field 'name' must be one path segment"),
        ({"name": ".."}, "got '..'"),
        ({"name": "a/b"}, "got 'a/b'"),
        ({"backend": "kiln_tf"}, "field 'backend' must be one of " + ", ".join(BACKENDS) + ", got 'kiln_tf'"),
        ({"max_batch_size": -1}, "field 'max_batch_size' must be an integer >= 0, got -1"),
        ({"inputs": ()}, "field 'inputs' must list at least one tensor, got none"),
        (
            {"inputs": (TensorSpec("pixels", "FLOAT", (1, 8, 8)),)},
            "field 'inputs[0].dtype' must be one of BOOL, UINT8",
        ),
        (
            {"inputs": (TensorSpec("pixels", "FP32", (1, 0, 8)),)},
            "field 'inputs[0].dims' must be a non-empty tuple of sizes >= 1 or -1",
        ),
        (
            {"outputs": (TensorSpec("a", "FP32", (1,)), TensorSpec("a", "FP32", (1,)))},
            "field 'outputs[1].name' repeats the name 'a'",
        ),
        (
            {"dynamic_batching": DynamicBatching(preferred_batch_sizes=(8, 128))},
            "'dynamic_batching.preferred_batch_sizes' must hold sizes in 1..64 (max_batch_size), "
            "got (8, 128)",
        ),
        (
            {"dynamic_batching": DynamicBatching(preferred_batch_sizes=(32, 16))},
            "must be strictly ascending, got (32, 16)",
        ),
        (
            {"dynamic_batching": DynamicBatching(max_queue_delay_us=-5)},
            "'dynamic_batching.max_queue_delay_us' must be in 0..10000000, got -5",
        ),
        (
            {"instance_groups": (InstanceGroup(kind="TPU"),)},
            "'instance_groups[0].kind' must be one of CPU, GPU, AUTO, got 'TPU'",
        ),
        ({"instance_groups": (InstanceGroup(count=0),)}, "'instance_groups[0].count' must be"),
        (
            {"instance_groups": (InstanceGroup(kind="CPU", gpus=(0,)),)},
            "'instance_groups[0].gpus' is only allowed with kind 'GPU'",
        ),
        ({"warmup": (Warmup(batch_size=65),)}, "'warmup[0].batch_size' must be in 1..64, got 65"),
        ({"warmup": (Warmup(data="ones"),)}, "'warmup[0].data' must be one of zero, random"),
        (
            {"parameters": {"intra_op_threads": "many"}},
            "parameter 'intra_op_threads' must be an integer >= 0, got 'many'",
        ),
        (
            {"parameters": {"intra_threads": "1"}},
            "unknown parameter 'intra_threads'; allowed: execution_providers",
        ),
        (
            {"parameters": {"execution_providers": "CPUExecutionProvider,TPUProvider"}},
            "parameter 'execution_providers' must be a comma-separated list of",
        ),
    ],
)
def test_invalid_field_is_named(change: dict, expected: str) -> None:
    problems = problems_of(dataclasses.replace(DIGITS, **change))
    assert any(expected in p for p in problems), problems


def test_dynamic_batching_needs_a_batch_dim() -> None:
    spec = dataclasses.replace(DIGITS, max_batch_size=0, warmup=())
    (problem,) = problems_of(spec)
    assert "field 'dynamic_batching' needs max_batch_size >= 1, got max_batch_size 0" in problem


def test_warmup_needs_fixed_dims() -> None:
    spec = dataclasses.replace(DIGITS, inputs=(TensorSpec("pixels", "FP32", (1, -1, 8)),))
    assert any("needs fixed input dims; input(s) pixels have a -1 dim" in p for p in problems_of(spec))


@pytest.mark.parametrize(
    ("build_change", "expected"),
    [
        ({"tolerance": Tolerance(atol=-1.0)}, "'build.tolerance.atol' must be a finite number >= 0"),
        ({"tolerance": Tolerance(rtol=float("nan"))}, "'build.tolerance.rtol' must be a finite"),
        ({"opset": 9}, "'build.opset' must be in 13..21, got 9"),
        ({"min_accuracy": 1.5}, "'build.min_accuracy' must be in 0..1, got 1.5"),
        ({"source": DigitsCNNSource(test_fraction=1.0)}, "'build.source.test_fraction' must be a number in 0.05..0.95, got 1.0"),
        ({"source": DigitsCNNSource(epochs=0)}, "'build.source.epochs' must be an integer in 1..1000, got 0"),
        ({"source": DigitsCNNSource(learning_rate="fast")}, "'build.source.learning_rate' must be a number in"),
        ({"source": TextEncoderSource(hidden_size=100, heads=3)}, "'build.source.heads' must divide hidden_size 100, got 3"),
        ({"source": FraudMLPSource(hidden_sizes=())}, "'build.source.hidden_sizes' must be a non-empty tuple"),
        ({"source": CheckpointSource("mod", "x.pt", "x.npz")}, "'build.source.factory' must look like 'package.module:function', got 'mod'"),
        ({"source": CheckpointSource("pkg.mod:make", "no/such.pt", "x.npz")}, "'build.source.checkpoint' names"),
        ({"source": OnnxFileSource("missing.onnx", "x.npz")}, "missing.onnx', which does not exist"),
        ({"source": "resnet"}, "'build.source' must be a source dataclass instance (CheckpointSource, OnnxFileSource, or a model folder's own), got str"),
        ({"variants": (Variant("int8"),)}, "'build.variants' must start with the fp32 variant (the reference), got 'int8' first"),
        ({"variants": (Variant("fp32"), Variant("int4"))}, "'build.variants[1].precision' must be one of fp32, fp16, int8, got 'int4'"),
        ({"variants": (Variant("fp32"), Variant("fp32"))}, "'build.variants[1].precision' repeats 'fp32'"),
        ({"variants": (Variant("fp32"), Variant("int8", max_metric_drop=-0.1))}, "'build.variants[1].max_metric_drop' must be a number in 0..1, got -0.1"),
    ],
)
def test_invalid_build_field_is_named(build_change: dict, expected: str) -> None:
    spec = dataclasses.replace(DIGITS, build=dataclasses.replace(DIGITS.build, **build_change))
    assert any(expected in p for p in problems_of(spec))


def test_every_problem_is_reported_at_once() -> None:
    spec = dataclasses.replace(DIGITS, max_batch_size=-3, backend="x", instance_groups=())
    problems = problems_of(spec)
    assert len(problems) >= 3
    assert "3 problem(s)" in str(SpecError(problems[:3]))


def test_duplicate_model_names_are_rejected() -> None:
    problems = problems_of(DIGITS, DIGITS)
    assert problems == ("model 'digits': field 'name' repeats another model's name",)


# -- allow_ragged_batch: requests of different shapes in one dynamic batch ---------------------------

TEXT_ENCODER = by_name("text_encoder")
TEXT_POOL = by_name("text_pool")


def ragged_inputs(spec, *dims: tuple[int, ...]) -> tuple[TensorSpec, ...]:
    """`spec`'s inputs with allow_ragged_batch on, optionally with other dims (one per input)."""
    return tuple(
        dataclasses.replace(t, allow_ragged_batch=True, **({"dims": dims[i]} if dims else {}))
        for i, t in enumerate(spec.inputs)
    )


def test_the_committed_text_encoder_takes_ragged_batches_and_a_kiln_pool_input_may_too() -> None:
    assert all(t.allow_ragged_batch for t in TEXT_ENCODER.inputs)
    assert not any(t.allow_ragged_batch for t in TEXT_ENCODER.outputs)
    assert TensorSpec("x", "FP32", (-1,)).allow_ragged_batch is False  # off unless asked for
    validate([TEXT_ENCODER, dataclasses.replace(TEXT_POOL, inputs=ragged_inputs(TEXT_POOL))], BACKENDS)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"outputs": (TensorSpec("token_embeddings", "FP32", (-1, 256), allow_ragged_batch=True),)},
            "model 'text_encoder': field 'outputs[0].allow_ragged_batch' is only allowed on inputs",
        ),
        (
            {"max_batch_size": 0, "dynamic_batching": None},
            "model 'text_encoder': field 'inputs[0].allow_ragged_batch' (input 'input_ids') needs a "
            "batch dim (max_batch_size >= 1), got max_batch_size 0",
        ),
        (
            {"dynamic_batching": None},
            "model 'text_encoder': field 'inputs[1].allow_ragged_batch' (input 'attention_mask') has "
            "no effect without dynamic_batching (each request runs alone)",
        ),
        (
            {"inputs": ragged_inputs(TEXT_ENCODER, (16,), (-1,))},
            "model 'text_encoder': field 'inputs[0].allow_ragged_batch' (input 'input_ids') has no "
            "effect on fixed dims (16,)",
        ),
        (
            {"backend": "kiln_classify", "parameters": {}},
            "model 'text_encoder': field 'inputs[0].allow_ragged_batch' (input 'input_ids') needs a "
            "backend that handles requests of different shapes in one batch (kiln_detect, kiln_onnx, "
            "kiln_pool); backend 'kiln_classify' assumes equal shapes within a batch",
        ),
        (
            {"inputs": (dataclasses.replace(TEXT_ENCODER.inputs[0], allow_ragged_batch="yes"), TEXT_ENCODER.inputs[1])},
            "model 'text_encoder': field 'inputs[0].allow_ragged_batch' (input 'input_ids') must be "
            "true or false, got 'yes'",
        ),
    ],
    ids=["output", "no-batch-dim", "no-dynamic-batching", "fixed-dims", "backend", "not-a-bool"],
)
def test_allow_ragged_batch_is_refused_where_it_cannot_work(change: dict, expected: str) -> None:
    problems = problems_of(dataclasses.replace(TEXT_ENCODER, **change))
    assert any(expected in p for p in problems), problems


def test_allow_ragged_batch_problems_are_reported_for_every_tensor_at_once() -> None:
    spec = dataclasses.replace(TEXT_ENCODER, dynamic_batching=None, backend="kiln_threshold", parameters={})
    ragged = [p for p in problems_of(spec) if "allow_ragged_batch" in p]
    assert len(ragged) == 4  # no batcher and the backend, for each of the two inputs
    assert sum("(input 'input_ids')" in p for p in ragged) == sum("(input 'attention_mask')" in p for p in ragged) == 2


def test_a_decoupled_model_renders_its_transaction_policy() -> None:
    from kiln.models.tinylm.pipeline import GENERATE
    from kiln.repository import config_dict

    validate([GENERATE], BACKENDS)
    config = config_dict(GENERATE)
    assert config["model_transaction_policy"] == {"decoupled": True}
    assert "dynamic_batching" not in config and config["max_batch_size"] == 0
    assert "model_transaction_policy" not in config_dict(DIGITS)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"decoupled": False}, "backend 'kiln_generate' streams its responses and needs field 'decoupled'"),
        (
            {"max_batch_size": 4, "dynamic_batching": DynamicBatching()},
            "field 'dynamic_batching' must be None for a decoupled model",
        ),
        ({"decoupled": "yes"}, "field 'decoupled' must be true or false, got 'yes'"),
        ({"parameters": {"scheduling": "eager"}}, "parameter 'scheduling' must be one of continuous, static"),
    ],
)
def test_a_generation_model_is_refused_where_it_cannot_work(change: dict, expected: str) -> None:
    from kiln.models.tinylm.pipeline import GENERATE

    found = problems_of(dataclasses.replace(GENERATE, **change))
    assert any(expected in problem for problem in found), found


def test_only_a_streaming_backend_may_be_decoupled() -> None:
    found = problems_of(dataclasses.replace(DIGITS, decoupled=True))
    assert any(
        "field 'decoupled' needs a backend that sends its own responses (kiln_generate); backend "
        "'kiln_onnx' answers each request once" in problem
        for problem in found
    ), found
