"""benchmarks.contract: the contract model is generated from the pipeline's spec (its tensors,
batch size and fused batcher), and Triton's own parser accepts its config."""

from __future__ import annotations

import ast

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from benchmarks import contract
from kiln import tensors
from loadtests import checks

PIPELINES = (tensors.FRAUD_SCORER, tensors.DIGITS_READER, tensors.IMAGE_CLASSIFIER, tensors.TEXT_EMBEDDER)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_contract_model_has_the_pipelines_tensors_and_batcher(pipeline: str) -> None:
    spec = checks.served(pipeline)
    config = text_format.Parse(contract.contract_config(spec), model_config_pb2.ModelConfig())
    assert config.name == f"{pipeline}_contract" and config.backend == "python"
    assert config.max_batch_size == spec.max_batch_size
    assert [(i.name, list(i.dims), i.optional) for i in config.input] == [
        (t.name, list(t.dims), t.optional) for t in spec.inputs
    ]
    assert [(o.name, list(o.dims)) for o in config.output] == [(t.name, list(t.dims)) for t in spec.outputs]
    assert list(config.dynamic_batching.preferred_batch_size) == list(
        spec.fused.dynamic_batching.preferred_batch_sizes
    )
    assert (
        config.dynamic_batching.max_queue_delay_microseconds == spec.fused.dynamic_batching.max_queue_delay_us
    )
    ast.parse(contract.contract_model_py(spec))  # the model file is valid Python


def test_a_pipeline_with_a_variable_output_dim_is_refused_with_the_output_named() -> None:
    import dataclasses

    from kiln.spec import TensorSpec

    spec = checks.served(tensors.FRAUD_SCORER)
    ragged = dataclasses.replace(spec, outputs=(TensorSpec("score", "FP32", (-1,)),))
    with pytest.raises(ValueError, match="output 'score' has a variable dim"):
        contract.contract_config(ragged)


def test_the_report_gives_each_model_as_a_ratio_to_the_floor() -> None:
    table = {
        "identity@1": {"throughput": 2000.0, "p50_ms": 0.5},
        "fraud_scorer_contract@1": {"throughput": 1000.0, "p50_ms": 0.6},
        "fraud_scorer@1": {"throughput": 500.0, "p50_ms": 0.9},
    }
    text = contract.report(tensors.FRAUD_SCORER, table, [1])
    assert "| fraud_scorer_contract | 1 | 1000 | 0.600 | 0.50x |" in text
    assert "| fraud_scorer | 1 | 500 | 0.900 | 0.25x |" in text
