"""kiln_fused without Triton: the fraud pipeline's three steps as one `FusedStep`.

A temporary repository generated from the fraud specs with fraud_scorer in the fused form, with
small synthetic artifacts in place of the build's (a logistic ONNX model, feature statistics, a
decision document), so nothing here needs `make build-engines`. The fused step must answer exactly
what the three steps, each loaded by its own backend's `load`, answer when run one after another
over the same requests; a bad item fails alone with the message the ensemble form gives; the load
checks name the fused model and the step; the spec and the generator know the form.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf.json_format import MessageToDict

from kiln import paths, tensors
from kiln.models.fraud import pipeline as fraud_pipelines
from kiln.models.fraud.spec import SPEC as FRAUD
from kiln.repository import generate, model_config, render
from kiln.serving import fused as fused_module
from kiln.serving.adapter import LoadContext
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.fused import FusedStep, PipelineRequestError, StepMetrics, parse_steps
from kiln.serving.onnx import load as load_onnx
from kiln.serving.params import config_parameters
from kiln.serving.tabular import load as load_tabular
from kiln.serving.threshold import load as load_threshold
from kiln.spec import (
    BACKEND_PARAMS,
    DynamicBatching,
    EnsembleSpec,
    EnsembleStep,
    Fused,
    InstanceGroup,
    SpecError,
    Variant,
    validate,
)

NAME = tensors.FRAUD_SCORER
FEATURES_MODEL = fraud_pipelines.FEATURES_MODEL
THRESHOLD_MODEL = fraud_pipelines.THRESHOLD_MODEL
RECORD, VALUES = tensors.RECORD, tensors.FEATURE_VALUES
SCORE, DECISION = tensors.SCORE, tensors.DECISION
FEATURES = (
    "amount", "hour", "account_age_days", "distance_km", "transactions_24h", "merchant_risk",
    *(f"v{i}" for i in range(1, 11)),
)
THRESHOLD = 0.5
PREFIX = f"in ensemble '{NAME}', "
BACKENDS = paths.available_backends()

FRAUD_FP32 = dataclasses.replace(FRAUD, build=dataclasses.replace(FRAUD.build, variants=(Variant("fp32"),)))
FUSED_SCORER = dataclasses.replace(fraud_pipelines.FRAUD_SCORER, form="fused")
SPECS = [FRAUD_FP32, fraud_pipelines.FEATURES_SPEC, fraud_pipelines.THRESHOLD_SPEC, FUSED_SCORER]

RNG = np.random.default_rng(13)
MEAN = RNG.normal(0, 50, len(FEATURES))
STD = RNG.uniform(0.5, 20, len(FEATURES))
WEIGHTS = RNG.normal(0, 0.5, (len(FEATURES), 1)).astype(np.float32)
BIAS = np.float32(-0.3)


def write_logistic_onnx(path: Path) -> None:
    """probability = sigmoid(features @ WEIGHTS + BIAS), the fraud model's tensor contract."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info(tensors.FRAUD_FEATURES, TensorProto.FLOAT, [None, len(FEATURES)])
    y = helper.make_tensor_value_info(tensors.FRAUD_PROBABILITY, TensorProto.FLOAT, [None, 1])
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", [tensors.FRAUD_FEATURES, "w"], ["logit0"]),
            helper.make_node("Add", ["logit0", "b"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], [tensors.FRAUD_PROBABILITY]),
        ],
        "logistic", [x], [y],
        initializer=[numpy_helper.from_array(WEIGHTS, "w"), numpy_helper.from_array(np.array([BIAS]), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generated repository with fraud_scorer fused, and synthetic artifacts beside fraud."""
    root = tmp_path_factory.mktemp("fused_repository")
    generate(SPECS, root, backends=BACKENDS)
    built = root / FRAUD.name / "1"
    built.mkdir()
    write_logistic_onnx(built / "model.onnx")
    (built / fraud_pipelines.STATS_FILE).write_text(json.dumps(
        {"format": 1, "features": list(FEATURES), "mean": MEAN.tolist(), "std": STD.tolist()}
    ))
    (built / fraud_pipelines.DECISION_FILE).write_text(
        json.dumps({"format": 1, "threshold": THRESHOLD, "rule": "a test threshold"})
    )
    return root


def context_of(spec: Any, root: Path, version: str = "1") -> LoadContext:
    """The LoadContext Triton's python backend gives `spec`'s model (from the spec, not the file)."""
    config = MessageToDict(model_config(spec), preserving_proto_field_name=True)
    return LoadContext(spec.name, root / spec.name, root / spec.name / version, config, config_parameters(config))


@pytest.fixture(scope="module")
def fused(repository: Path) -> FusedStep:
    return fused_module.load(context_of(FUSED_SCORER, repository))


@pytest.fixture(scope="module")
def steps(repository: Path) -> tuple[Any, Any, Any]:
    """The three steps, each loaded by its own backend's load function."""
    return (
        load_tabular(context_of(fraud_pipelines.FEATURES_SPEC, repository)),
        load_onnx(context_of(FRAUD_FP32, repository)),
        load_threshold(context_of(fraud_pipelines.THRESHOLD_SPEC, repository)),
    )


def one_after_another(steps: tuple[Any, Any, Any], requests: list[dict]) -> list[Any]:
    """The requests through the three steps in turn, as the ensemble routes them: each step over
    the requests still alive, fed the tensors the ensemble's maps name."""
    tabular, model, threshold = steps
    results: list[Any] = [None] * len(requests)
    alive = list(range(len(requests)))
    feeds = [{RECORD: r.get(RECORD), VALUES: r.get(VALUES)} for r in requests]
    for step, make in (
        (tabular, lambda f: f),
        (model, lambda f: {tensors.FRAUD_FEATURES: f[tensors.FRAUD_FEATURES]}),
        (threshold, lambda f: {tensors.FRAUD_PROBABILITY: f[tensors.FRAUD_PROBABILITY]}),
    ):
        answers = step.run([make(feeds[i]) for i in alive])
        still = []
        for index, answer in zip(alive, answers, strict=True):
            if isinstance(answer, Exception):
                results[index] = answer
            else:
                feeds[index].update(answer)
                still.append(index)
        alive = still
    for index in alive:
        results[index] = {SCORE: feeds[index][SCORE], DECISION: feeds[index][DECISION]}
    return results


def transactions(count: int, seed: int = 1) -> list[dict[str, float]]:
    rng = np.random.default_rng(seed)
    rows = MEAN + STD * rng.normal(0, 1.5, (count, len(FEATURES)))
    return [dict(zip(FEATURES, map(float, row), strict=True)) for row in rows]


def records(items: list[dict[str, Any] | bytes]) -> dict[str, np.ndarray]:
    data = np.empty((len(items), 1), dtype=object)
    data[:, 0] = [i if isinstance(i, bytes) else json.dumps(i).encode() for i in items]
    return {RECORD: data}


def values(items: list[dict[str, float]]) -> dict[str, np.ndarray]:
    return {VALUES: np.array([[r[n] for n in FEATURES] for r in items], dtype=np.float32)}


def expected_scores(items: list[dict[str, float]]) -> np.ndarray:
    """The pipeline in numpy: standardize in float64, cast, the logistic model."""
    raw = np.array([[r[n] for n in FEATURES] for r in items], dtype=np.float64)
    features = ((raw - MEAN) / STD).astype(np.float32)
    return 1 / (1 + np.exp(-(features.astype(np.float64) @ WEIGHTS + BIAS)))


# -- the same answers as the steps one after another -----------------------------------------------


def test_the_fused_step_answers_as_the_three_steps_one_after_another(fused, steps) -> None:
    items = transactions(40)
    requests = [
        records(items[0:1]), records(items[1:4]), values(items[4:11]), records(items[11:12]),
        values(items[12:13]), records(items[13:40]),
    ]
    got = fused.run(requests)
    want = one_after_another(steps, requests)
    for answer, expected in zip(got, want, strict=True):
        assert set(answer) == {SCORE, DECISION}
        assert answer[SCORE].dtype == np.float32 and answer[DECISION].dtype == np.bool_
        np.testing.assert_array_equal(answer[SCORE], expected[SCORE])
        np.testing.assert_array_equal(answer[DECISION], expected[DECISION])
    scores = np.concatenate([a[SCORE] for a in got])
    np.testing.assert_allclose(scores, expected_scores(items), rtol=0, atol=1e-6)
    decisions = np.concatenate([a[DECISION] for a in got])
    assert np.array_equal(decisions, scores >= np.float32(THRESHOLD))
    assert decisions.any() and not decisions.all()


def test_each_step_is_built_by_its_own_backend(fused) -> None:
    assert [s.model for s in fused.stages] == [FEATURES_MODEL, FRAUD.name, THRESHOLD_MODEL]
    assert [type(s.step).__name__ for s in fused.stages] == ["TabularStep", "OnnxStep", "ThresholdStep"]
    tabular = fused.stages[0]
    assert dict(tabular.feeds) == {RECORD: RECORD, VALUES: VALUES}
    assert tabular.step.stats.names == FEATURES  # the statistics published beside fraud
    assert fused.stages[2].step.threshold == THRESHOLD  # the decision document beside fraud
    assert fused.outputs == (SCORE, DECISION)


# -- errors -------------------------------------------------------------------------------------


def test_a_bad_item_fails_alone_with_the_ensemble_forms_message(fused, steps) -> None:
    items = transactions(8, seed=2)
    missing = {k: v for k, v in items[1].items() if k != "hour"}
    requests = [
        records(items[0:1]),
        records([missing]),
        records(items[2:5]),
        records([{**items[5], "merchant_risk": float("nan")}]),
        {**values(items[6:7]), **records(items[6:7])},  # both inputs
        {RECORD: None, VALUES: None},  # neither
        values(items[7:8]),
    ]
    got = fused.run(requests)
    tabular = steps[0]
    for index in (1, 3, 4, 5):
        (own,) = tabular.run([{RECORD: requests[index].get(RECORD), VALUES: requests[index].get(VALUES)}])
        assert isinstance(own, RequestError)
        error = got[index]
        assert isinstance(error, PipelineRequestError) and isinstance(error, ValueError)  # INVALID_ARG
        assert str(error) == PREFIX + str(own)
        assert error.reason == own.reason and error.step == FEATURES_MODEL
        assert error.__cause__ is not None
    assert str(got[1]).startswith(PREFIX + "input 'record' item 0: missing feature(s) 'hour'; a record holds")
    assert str(got[3]) == PREFIX + "input 'record' item 0: feature 'merchant_risk' must be a finite number, got NaN"
    assert str(got[4]) == PREFIX + "send exactly one of the inputs 'record' and 'feature_values', got both"
    good = [0, 2, 6]
    want = one_after_another(steps, [requests[i] for i in good])
    for index, expected in zip(good, want, strict=True):
        np.testing.assert_array_equal(got[index][SCORE], expected[SCORE])
        np.testing.assert_array_equal(got[index][DECISION], expected[DECISION])
    np.testing.assert_allclose(got[2][SCORE], expected_scores(items[2:5]), rtol=0, atol=1e-6)


def test_a_step_failing_its_whole_batch_fails_every_request_it_had(fused) -> None:
    class Broken:
        def run(self, requests):
            raise MemoryError("out of memory")

    stage = fused.stages[1]
    broken = FusedStep(
        fused.name, [fused.stages[0], dataclasses.replace(stage, step=Broken()), fused.stages[2]], fused.outputs
    )
    items = transactions(3, seed=3)
    got = broken.run([records(items[0:1]), records([b"{"]), records(items[1:3])])
    assert isinstance(got[1], ValueError) and "not valid JSON" in str(got[1])  # refused before the model
    for error in (got[0], got[2]):
        assert not isinstance(error, ValueError)  # INTERNAL, not the client's fault
        assert str(error) == PREFIX + "step failed on a batch of 2: out of memory"
        assert error.reason == "internal" and error.step == FRAUD.name


def test_a_step_losing_an_output_fails_that_request() -> None:
    class Forgetful:
        def run(self, requests):
            return [{} for _ in requests]

    stage = fused_module.Stage("forgetful", Forgetful(), (("x", "x"),), (("y", "y"),))
    (error,) = FusedStep("pipe", [stage], ["y"]).run([{"x": np.zeros((1, 1), np.float32)}])
    assert str(error) == "in ensemble 'pipe', step 'forgetful' returned no output 'y'"


# -- metrics ------------------------------------------------------------------------------------


class FakeMetrics:
    """pb_utils' metrics API, recording increments by labels."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, tuple], float] = {}
        fake = self

        class Family:
            COUNTER = "counter"

            def __init__(self, name: str, description: str, kind: str) -> None:
                self.name = name

            def Metric(self, labels: dict) -> Any:  # noqa: N802 (pb_utils' name)
                family = self

                class Metric:
                    def increment(self, value: float) -> None:
                        key = (family.name, tuple(sorted(labels.items())))
                        fake.values[key] = fake.values.get(key, 0.0) + value

                return Metric()

        self.MetricFamily = Family

    def get(self, name: str, **labels: str) -> float:
        return self.values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_each_step_is_counted_under_its_own_name_and_the_pipeline(fused) -> None:
    pb_utils = FakeMetrics()
    metrics = StepMetrics(pb_utils, NAME, interval=None)
    counted = FusedStep(fused.name, fused.stages, fused.outputs, metrics)
    items = transactions(4, seed=4)
    counted.run([records(items[0:2]), records([{"amount": 1.0}]), values(items[2:4])])
    assert pb_utils.values == {}  # nothing pushed on the request path
    metrics.flush()
    for step, requests in ((FEATURES_MODEL, 3), (FRAUD.name, 2), (THRESHOLD_MODEL, 2)):
        assert pb_utils.get("kiln_step_requests_total", model=step, pipeline=NAME) == requests
        assert pb_utils.get("kiln_step_batches_total", model=step, pipeline=NAME) == 1
        assert pb_utils.get("kiln_step_duration_us_total", model=step, pipeline=NAME) > 0
    assert pb_utils.get(
        "kiln_step_failures_total", model=FEATURES_MODEL, pipeline=NAME, reason="missing_feature"
    ) == 1
    metrics.flush()  # nothing new: nothing pushed twice
    assert pb_utils.get("kiln_step_requests_total", model=FEATURES_MODEL, pipeline=NAME) == 3


def test_the_metrics_thread_pushes_the_counts() -> None:
    pb_utils = FakeMetrics()
    metrics = StepMetrics(pb_utils, NAME, interval=0.01)
    metrics.record("a_step", 5, [], 0.001)
    deadline = time.monotonic() + 5
    while not pb_utils.values and time.monotonic() < deadline:
        time.sleep(0.01)
    metrics.close()
    assert pb_utils.get("kiln_step_requests_total", model="a_step", pipeline=NAME) == 5


def test_no_metrics_api_no_counting() -> None:
    metrics = StepMetrics(object(), NAME)
    metrics.record("a_step", 5, [], 0.001)
    metrics.flush()


# -- loading ------------------------------------------------------------------------------------


def fused_context(root: Path, **parameters: str) -> LoadContext:
    context = context_of(FUSED_SCORER, root)
    return dataclasses.replace(context, parameters={**context.parameters, **parameters})


def copy_repository(repository: Path, dest: Path) -> Path:
    shutil.copytree(repository, dest)
    return dest


def test_the_steps_parameter_reads_back_as_the_ensemble_steps() -> None:
    text = fused_module.steps_parameter(FUSED_SCORER.steps)
    wirings = parse_steps(NAME, text)
    assert [(w.model, dict(w.inputs), dict(w.outputs)) for w in wirings] == [
        (s.model, dict(s.inputs), dict(s.outputs)) for s in FUSED_SCORER.steps
    ]


@pytest.mark.parametrize("text", ["", "{", "[]", '[{"model": "x"}]', '[{"model": "", "inputs": {}, "outputs": {}}]'])
def test_a_malformed_steps_parameter_fails_the_load(repository: Path, text: str) -> None:
    with pytest.raises(ModelLoadError, match=f"model '{NAME}': parameter 'steps'"):
        fused_module.load(fused_context(repository, steps=text))


def test_a_missing_step_config_fails_the_load(repository: Path, tmp_path: Path) -> None:
    root = copy_repository(repository, tmp_path / "repo")
    (root / THRESHOLD_MODEL / "config.pbtxt").unlink()
    with pytest.raises(ModelLoadError, match=rf"model '{NAME}': step '{THRESHOLD_MODEL}' has no .*config.pbtxt"):
        fused_module.load(fused_context(root))


def test_a_step_that_cannot_load_names_the_fused_model_and_the_step(repository: Path, tmp_path: Path) -> None:
    root = copy_repository(repository, tmp_path / "repo")
    (root / FRAUD.name / "1" / fraud_pipelines.STATS_FILE).unlink()
    with pytest.raises(ModelLoadError) as caught:
        fused_module.load(fused_context(root))
    message = str(caught.value)
    assert message.startswith(f"model '{NAME}': step '{FEATURES_MODEL}' cannot load: ")
    assert fraud_pipelines.STATS_FILE in message


def test_a_step_of_another_backend_fails_the_load(repository: Path, tmp_path: Path) -> None:
    root = copy_repository(repository, tmp_path / "repo")
    config = root / THRESHOLD_MODEL / "config.pbtxt"
    config.write_text(config.read_text().replace('backend: "kiln_threshold"', 'backend: "python"'))
    with pytest.raises(ModelLoadError, match=f"step '{THRESHOLD_MODEL}' has backend 'python'; a fused"):
        fused_module.load(fused_context(root))


def test_wiring_that_does_not_fit_a_step_fails_the_load(repository: Path) -> None:
    steps = list(FUSED_SCORER.steps)
    steps[1] = EnsembleStep(FRAUD.name, inputs={"wrong": tensors.FRAUD_FEATURES}, outputs=steps[1].outputs)
    with pytest.raises(ModelLoadError, match=rf"step '{FRAUD.name}' has no input\(s\) \['wrong'\]"):
        fused_module.load(fused_context(repository, steps=fused_module.steps_parameter(steps)))
    steps = list(FUSED_SCORER.steps)
    steps[1] = EnsembleStep(FRAUD.name, inputs={tensors.FRAUD_FEATURES: "nowhere"}, outputs=steps[1].outputs)
    with pytest.raises(ModelLoadError, match=r"is fed \['nowhere'\], which are neither"):
        fused_module.load(fused_context(repository, steps=fused_module.steps_parameter(steps)))


def test_the_newest_version_folder_of_a_step_is_loaded(repository: Path, tmp_path: Path) -> None:
    root = copy_repository(repository, tmp_path / "repo")
    newer = root / FRAUD.name / "2"
    newer.mkdir()
    for name in ("model.onnx", fraud_pipelines.STATS_FILE):
        (newer / name).write_bytes((root / FRAUD.name / "1" / name).read_bytes())
    (newer / fraud_pipelines.DECISION_FILE).write_text(json.dumps({"format": 1, "threshold": 0.25}))
    step = fused_module.load(fused_context(root))
    assert step.stages[1].step.model.session is not None
    assert step.stages[2].step.threshold == 0.25  # kiln_threshold reads the newest version's document


def test_the_ngc_target_runs_the_native_onnx_step_with_kiln_onnx(repository: Path, tmp_path: Path, fused) -> None:
    root = tmp_path / "ngc"
    generate(SPECS, root, target="ngc", backends=BACKENDS)
    assert 'platform: "onnxruntime_onnx"' in (root / FRAUD.name / "config.pbtxt").read_text()
    shutil.copytree(repository / FRAUD.name / "1", root / FRAUD.name / "1")
    ngc = fused_module.load(fused_context(root))
    onnx_step = ngc.stages[1].step.model
    assert type(ngc.stages[1].step).__name__ == "OnnxStep"
    assert (onnx_step.params.intra_op_threads, onnx_step.params.inter_op_threads) == (1, 1)  # fraud's spec
    request = [records(transactions(5, seed=5))]
    np.testing.assert_array_equal(ngc.run(request)[0][SCORE], fused.run(request)[0][SCORE])


# -- the spec and the generator ---------------------------------------------------------------------


def test_the_fused_form_renders_one_kiln_fused_model_with_the_pipelines_contract() -> None:
    text = render(FUSED_SCORER)
    config = MessageToDict(model_config(FUSED_SCORER), preserving_proto_field_name=True)
    ensemble = MessageToDict(model_config(fraud_pipelines.FRAUD_SCORER), preserving_proto_field_name=True)
    assert config["backend"] == "kiln_fused" and "platform" not in config
    assert "ensemble_scheduling" not in config and "dynamic_batching" in text
    for key in ("name", "max_batch_size", "input", "output"):
        assert config[key] == ensemble[key]
    assert set(config["parameters"]) == {"steps"}
    wirings = parse_steps(NAME, config["parameters"]["steps"]["string_value"])
    assert [w.model for w in wirings] == [FEATURES_MODEL, FRAUD.name, THRESHOLD_MODEL]
    quiet = dataclasses.replace(
        FUSED_SCORER,
        fused=Fused(DynamicBatching(max_queue_delay_us=50), (InstanceGroup(count=2),), step_metrics=False),
    )
    config = MessageToDict(model_config(quiet), preserving_proto_field_name=True)
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "50"  # uint64: JSON string
    assert config["instance_group"] == [{"count": 2, "kind": "KIND_CPU"}]
    assert config["parameters"]["step_metrics"] == {"string_value": "false"}


def test_the_schema_default_is_the_ensemble_and_fraud_scorer_chooses_fused() -> None:
    fields = {f.name: f for f in dataclasses.fields(EnsembleSpec)}
    assert fields["form"].default == "ensemble"
    assert fraud_pipelines.FRAUD_SCORER.form == "fused"  # measured faster (models/fraud/pipeline.py)
    assert 'backend: "kiln_fused"' in render(fraud_pipelines.FRAUD_SCORER)
    assert "platform: \"ensemble\"" in render(dataclasses.replace(FUSED_SCORER, form="ensemble"))


def test_generate_writes_the_fused_model_and_keeps_the_steps(repository: Path) -> None:
    for model in (NAME, FEATURES_MODEL, THRESHOLD_MODEL, FRAUD.name):
        assert (repository / model / "config.pbtxt").is_file(), model
    assert (repository / NAME / "1").is_dir()  # Triton loads no model without a version folder
    assert 'backend: "kiln_fused"' in (repository / NAME / "config.pbtxt").read_text()


def problems(*specs: Any, backends: Any = BACKENDS) -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        validate(list(specs), backends)
    return caught.value.problems


def test_the_spec_validates_the_form() -> None:
    validate(SPECS, BACKENDS)
    others = SPECS[:-1]
    where = f"ensemble '{NAME}'"
    assert problems(*others, dataclasses.replace(FUSED_SCORER, form="fusion")) == (
        f"{where}: field 'form' must be one of ensemble, fused, got 'fusion'",
    )
    bad_delay = dataclasses.replace(FUSED_SCORER, fused=Fused(DynamicBatching(max_queue_delay_us=-1)))
    assert problems(*others, bad_delay) == (
        f"{where}: field 'fused.dynamic_batching.max_queue_delay_us' must be in 0..10000000, got -1",
    )
    no_instances = dataclasses.replace(FUSED_SCORER, fused=Fused(instance_groups=()))
    assert problems(*others, no_instances) == (
        f"{where}: field 'fused.instance_groups' must list at least one group, got none",
    )
    unbatched = dataclasses.replace(FUSED_SCORER, max_batch_size=0)
    assert any("field 'max_batch_size' must be >= 1 for form 'fused'" in p for p in problems(*others, unbatched))
    assert problems(*SPECS, backends=[b for b in BACKENDS if b != "kiln_fused"]) == (
        f"{where}: field 'form' 'fused' needs the backend 'kiln_fused', which is not among the backends "
        f"({', '.join(b for b in BACKENDS if b != 'kiln_fused')})",
    )


def test_a_fused_pipeline_runs_only_kiln_steps() -> None:
    inner = dataclasses.replace(fraud_pipelines.FRAUD_SCORER, name="inner")
    outer = dataclasses.replace(
        FUSED_SCORER,
        name="outer",
        steps=(EnsembleStep("inner", inputs={RECORD: RECORD, VALUES: VALUES}, outputs={SCORE: SCORE, DECISION: DECISION}),),
    )
    found = problems(*SPECS[:-1], inner, outer)
    assert found == (
        "ensemble 'outer': field 'steps[0].model' 'inner' is a pipeline; form 'fused' runs only steps of "
        "the kiln backends "
        + ", ".join(sorted(b for b in BACKEND_PARAMS if b not in ("kiln_fused", "kiln_generate"))),
    )
