"""kiln_threshold's logic without Triton: decisions at the threshold, bad probabilities failing
alone, the bounded `threshold` parameter (at load and in the spec) and the load checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from kiln import tensors
from kiln.build.specs import fraud_pipelines
from kiln.serving.adapter import LoadContext
from kiln.serving.onnx import ModelLoadError
from kiln.serving.params import ParamError, check_params
from kiln.serving.threshold import THRESHOLD_PARAMS, ThresholdStep, decide, load
from kiln.spec import SpecError, validate

PROBABILITY = tensors.FRAUD_PROBABILITY
SCORE = tensors.SCORE
DECISION = tensors.DECISION


def probabilities(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32).reshape(-1, 1)


@pytest.fixture
def step() -> ThresholdStep:
    return ThresholdStep(0.22, probability=PROBABILITY, score=SCORE, decision=DECISION)


def test_decision_is_score_at_or_above_the_threshold(step: ThresholdStep) -> None:
    scores = probabilities(0.0, 0.1, 0.2199, 0.22, 0.2201, 0.5, 1.0)
    (result,) = step.run([{PROBABILITY: scores}])
    np.testing.assert_array_equal(result[SCORE], scores)
    assert result[SCORE].dtype == np.float32 and result[DECISION].dtype == np.bool_
    assert result[DECISION].shape == (7, 1)
    assert result[DECISION][:, 0].tolist() == [False, False, False, True, True, True, True]


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_the_bounds_decide_everything_or_only_certainty(threshold: float) -> None:
    scores = probabilities(0.0, 0.5, 1.0)
    expected = [True, True, True] if threshold == 0.0 else [False, False, True]
    assert decide(scores, threshold)[:, 0].tolist() == expected


def test_a_bad_probability_fails_alone_and_the_batch_is_decided(step: ThresholdStep) -> None:
    requests = [
        {PROBABILITY: probabilities(0.9, 0.1)},
        {PROBABILITY: probabilities(0.3, np.nan)},
        {PROBABILITY: probabilities(0.05)},
        {PROBABILITY: probabilities(0.5, 0.7, 1.5)},
        {PROBABILITY: probabilities(-0.01)},
        {},
        {PROBABILITY: np.zeros((1, 2), np.float32)},
    ]
    results = step.run(requests)
    assert results[0][DECISION][:, 0].tolist() == [True, False]
    assert str(results[1]) == "input 'probability' contains NaN or infinity (1 of 2 values)"
    assert results[2][DECISION][:, 0].tolist() == [False]
    np.testing.assert_array_equal(results[2][SCORE], probabilities(0.05))
    assert str(results[3]) == "input 'probability' item 2 is 1.5; a probability lies in 0..1"
    assert str(results[4]) == "input 'probability' item 0 is -0.01; a probability lies in 0..1"
    assert str(results[5]) == "missing input 'probability'"
    assert str(results[6]) == "input 'probability' has shape [1, 2]; expected [-1, 1]"
    assert all(isinstance(r, ValueError) for r in (results[1], *results[3:]))


@pytest.mark.parametrize("text", ["0", "0.22", "1", " 0.5 "])
def test_threshold_parameter_accepts_0_to_1(text: str) -> None:
    assert check_params("m", {"threshold": text}, THRESHOLD_PARAMS)["threshold"] == float(text)


@pytest.mark.parametrize("text", ["1.5", "-0.1", "abc", "nan", "inf", ""])
def test_threshold_parameter_refuses_anything_else(text: str) -> None:
    with pytest.raises(ParamError) as caught:
        check_params("m", {"threshold": text}, THRESHOLD_PARAMS)
    assert str(caught.value) == f"model 'm': parameter 'threshold' must be a finite number in 0..1, got {text!r}"


def test_a_spec_with_a_threshold_above_1_fails_validation() -> None:
    bad = dataclasses.replace(fraud_pipelines.THRESHOLD_SPEC, parameters={"threshold": "1.2"})
    with pytest.raises(SpecError) as caught:
        validate([bad])
    assert (
        "model 'fraud_threshold': field 'parameters': model 'fraud_threshold': parameter 'threshold' "
        "must be a finite number in 0..1, got '1.2'"
    ) in str(caught.value)


def test_the_spec_declares_its_threshold() -> None:
    params = check_params("fraud_threshold", dict(fraud_pipelines.THRESHOLD_SPEC.parameters), THRESHOLD_PARAMS)
    assert params["threshold"] == fraud_pipelines.THRESHOLD


def test_the_step_refuses_a_threshold_outside_0_to_1() -> None:
    with pytest.raises(ValueError, match="threshold must be in 0..1, got 2"):
        ThresholdStep(2, probability=PROBABILITY, score=SCORE, decision=DECISION)


def _config(inputs=None, outputs=None, mbs: int = 8, **params: str) -> dict:
    return {
        "max_batch_size": mbs,
        "input": inputs if inputs is not None else [{"name": "p", "data_type": "TYPE_FP32", "dims": ["1"]}],
        "output": outputs if outputs is not None else [
            {"name": "yes", "data_type": "TYPE_BOOL", "dims": ["1"]},
            {"name": "s", "data_type": "TYPE_FP32", "dims": ["1"]},
        ],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


def _context(config: dict) -> LoadContext:
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    return LoadContext("t", Path("/nonexistent/t"), Path("/nonexistent/t/1"), config, params)


def test_load_takes_the_tensor_names_from_the_config() -> None:
    step = load(_context(_config(threshold="0.7")))
    assert (step.threshold, step.probability, step.score, step.decision) == (0.7, "p", "s", "yes")
    assert load(_context(_config())).threshold == 0.5


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (_config(threshold="7"), ParamError, "model 't': parameter 'threshold' must be a finite number in 0..1, got '7'"),
        (_config(cutoff="0.3"), ParamError, "model 't': unknown parameter 'cutoff'; allowed: threshold"),
        (_config(inputs=[{"name": "p", "data_type": "TYPE_FP32", "dims": ["2"]}]), ModelLoadError,
         "model 't': kiln_threshold takes one FP32 [1] input (a probability); the config declares p TYPE_FP32 [2]"),
        (_config(outputs=[{"name": "s", "data_type": "TYPE_FP32", "dims": ["1"]}]), ModelLoadError,
         "model 't': kiln_threshold has two outputs, FP32 [1] (the score) and BOOL [1] (the decision); "
         "the config declares s TYPE_FP32 [1]"),
        (_config(mbs=0), ModelLoadError, "model 't': kiln_threshold needs max_batch_size >= 1"),
    ],
    ids=["threshold-range", "unknown-param", "input-dims", "one-output", "unbatched"],
)
def test_load_fails_with_a_clear_message(config, error, message: str) -> None:
    with pytest.raises(error) as caught:
        load(_context(config))
    assert str(caught.value) == message
