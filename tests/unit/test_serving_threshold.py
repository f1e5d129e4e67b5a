"""kiln_threshold's logic without Triton: decisions at the threshold, bad probabilities failing
alone, the bounded `threshold` parameter (at load and in the spec), the threshold a build
published beside another model (`threshold_model`), and the load checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kiln import tensors
from kiln.models.fraud import pipeline as fraud_pipelines
from kiln.serving.adapter import LoadContext
from kiln.serving.onnx import ModelLoadError
from kiln.serving.params import ParamError, check_params
from kiln.serving.threshold import (
    DECISION_FILE,
    THRESHOLD_PARAMS,
    DecisionThreshold,
    ThresholdSourceError,
    ThresholdStep,
    decide,
    load,
)
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


def test_the_spec_takes_the_threshold_the_fraud_build_publishes() -> None:
    # No number tuned to one machine's trained weights in the spec: the build derives it.
    params = check_params("fraud_threshold", dict(fraud_pipelines.THRESHOLD_SPEC.parameters), THRESHOLD_PARAMS)
    assert params == {"threshold": None, "threshold_model": "fraud", "threshold_file": DECISION_FILE}
    validate([fraud_pipelines.THRESHOLD_SPEC])


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


def _context(config: dict, repository: Path = Path("/nonexistent")) -> LoadContext:
    params = {k: v["string_value"] for k, v in config["parameters"].items()}
    return LoadContext("t", repository / "t", repository / "t" / "1", config, params)


def test_load_takes_the_tensor_names_from_the_config() -> None:
    step = load(_context(_config(threshold="0.7")))
    assert (step.threshold, step.probability, step.score, step.decision) == (0.7, "p", "s", "yes")


def _publish(repository: Path, document: object, model: str = "scorer", version: str = "1") -> Path:
    folder = repository / model / version
    folder.mkdir(parents=True)
    path = folder / DECISION_FILE
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


DOCUMENT = DecisionThreshold(0.37, "the highest threshold with recall >= 0.8", {"recall": 0.81}).to_json()


def test_load_reads_the_threshold_the_build_published(tmp_path: Path) -> None:
    _publish(tmp_path, DOCUMENT)
    step = load(_context(_config(threshold_model="scorer"), tmp_path))
    assert step.threshold == 0.37
    assert DecisionThreshold.read(tmp_path / "scorer" / "1" / DECISION_FILE) == DecisionThreshold(
        0.37, "the highest threshold with recall >= 0.8", {"recall": 0.81}
    )


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({**DOCUMENT, "threshold": 1.5}, "'threshold' must be a number in 0..1, got 1.5"),
        ({**DOCUMENT, "threshold": "0.3"}, "'threshold' must be a number in 0..1, got '0.3'"),
        ({**DOCUMENT, "format": 9}, "not a decision document of format 1 (format 9)"),
        ([0.3], "not a decision document of format 1 (format 'list')"),
        ("{not json", "not a readable JSON document"),
    ],
    ids=["out-of-range", "string", "format", "not-an-object", "not-json"],
)
def test_a_malformed_published_document_fails_the_load_naming_the_file(
    tmp_path: Path, document: object, message: str
) -> None:
    path = _publish(tmp_path, document)
    with pytest.raises(ModelLoadError) as caught:
        load(_context(_config(threshold_model="scorer"), tmp_path))
    assert str(caught.value).startswith(f"model 't': {path}: ")
    assert message in str(caught.value)
    assert isinstance(caught.value.__cause__, ThresholdSourceError)


def test_an_unpublished_document_fails_the_load_saying_to_build(tmp_path: Path) -> None:
    (tmp_path / "scorer" / "1").mkdir(parents=True)
    with pytest.raises(ModelLoadError, match=r"model 't': 'decision.json' of model 'scorer' not found .*make build-engines"):
        load(_context(_config(threshold_model="scorer"), tmp_path))


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        (_config(threshold="7"), ParamError, "model 't': parameter 'threshold' must be a finite number in 0..1, got '7'"),
        (_config(cutoff="0.3"), ParamError,
         "model 't': unknown parameter 'cutoff'; allowed: threshold, threshold_file, threshold_model"),
        (_config(), ModelLoadError,
         "model 't': give exactly one of parameter 'threshold' (a fixed threshold) and "
         "'threshold_model' (the model whose build published 'decision.json'); neither given"),
        (_config(threshold="0.5", threshold_model="scorer"), ModelLoadError,
         "model 't': give exactly one of parameter 'threshold' (a fixed threshold) and "
         "'threshold_model' (the model whose build published 'decision.json'); both given"),
        (_config(threshold_model="../x"), ParamError,
         "model 't': parameter 'threshold_model' must be one path segment (a file or model name: "
         "letters, digits, '_', '.', '-'; not starting with '.'), got '../x'"),
        (_config(threshold="0.5", inputs=[{"name": "p", "data_type": "TYPE_FP32", "dims": ["2"]}]), ModelLoadError,
         "model 't': kiln_threshold takes one FP32 [1] input (a probability); the config declares p TYPE_FP32 [2]"),
        (_config(threshold="0.5", outputs=[{"name": "s", "data_type": "TYPE_FP32", "dims": ["1"]}]), ModelLoadError,
         "model 't': kiln_threshold has two outputs, FP32 [1] (the score) and BOOL [1] (the decision); "
         "the config declares s TYPE_FP32 [1]"),
        (_config(mbs=0, threshold="0.5"), ModelLoadError, "model 't': kiln_threshold needs max_batch_size >= 1"),
    ],
    ids=["threshold-range", "unknown-param", "neither", "both", "path", "input-dims", "one-output", "unbatched"],
)
def test_load_fails_with_a_clear_message(config, error, message: str) -> None:
    with pytest.raises(error) as caught:
        load(_context(config))
    assert str(caught.value) == message
