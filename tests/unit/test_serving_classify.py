"""kiln_classify's logic without Triton, against softmax and top-k computed independently here
(torch), plus the labels file, the load checks and the image pipelines' specs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kiln import tensors
from kiln.models.digits import pipeline as digits_pipeline
from kiln.models.resnet50 import pipeline as resnet50_pipeline
from kiln.serving.adapter import LoadContext
from kiln.serving.batch import RequestError
from kiln.serving.classify import (
    CLASSIFY_PARAMS,
    Classifier,
    ClassifyLoadError,
    ClassifyParams,
    check_config,
    load,
    read_labels,
    top_k,
)
from kiln.serving.params import ParamError, parse_params
from kiln.spec import EnsembleSpec, served_specs

CLASSES = 10
LABELS = tuple(f"label {i} é" for i in range(CLASSES))


def params(k: int = 3, softmax: bool = True) -> ClassifyParams:
    return ClassifyParams(top_k=k, labels_file="labels.txt", apply_softmax=softmax)


def expected(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's softmax and top-k (sorted): the independent computation."""
    probabilities = torch.softmax(torch.from_numpy(logits).double(), dim=1)
    scores, indices = torch.topk(probabilities, k, dim=1, sorted=True)
    return indices.numpy(), scores.float().numpy()


@pytest.mark.parametrize("k", (1, 3, CLASSES))
def test_top_k_equals_torch(k: int) -> None:
    logits = np.random.default_rng(k).normal(0, 3, (64, CLASSES)).astype(np.float32)
    indices, scores = top_k(logits, k)
    want_indices, want_scores = expected(logits, k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-6, atol=1e-8)
    assert indices.dtype == np.int64 and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 0).all()


def test_softmax_is_stable_for_huge_logits_and_sums_to_one() -> None:
    logits = np.array([[1e30, 1e30 - 1e24, -1e30, 0.0], [-5e4, -5e4 + 1, -5e4 + 2, -5e4 + 3]], np.float32)
    indices, scores = top_k(logits, 4)
    assert np.isfinite(scores).all()
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(indices[1], [3, 2, 1, 0])
    np.testing.assert_allclose(scores[1], torch.softmax(torch.tensor([3.0, 2.0, 1.0, 0.0]), 0).numpy(), rtol=1e-6)


def test_ties_go_to_the_lower_class_index_even_where_probabilities_underflow() -> None:
    logits = np.array([[0.0, 5.0, 5.0, 1.0, 5.0], [-200.0, -300.0, 100.0, -250.0, -300.0]], np.float32)
    indices, scores = top_k(logits, 4)
    np.testing.assert_array_equal(indices[0], [1, 2, 4, 3])
    # Row 1: all but class 2 underflow to probability 0 in float32; the order still follows the logits.
    np.testing.assert_array_equal(indices[1], [2, 0, 3, 1])
    assert scores[1, 0] == pytest.approx(1.0) and (scores[1, 1:] == 0).all()


def test_raw_scores_without_softmax() -> None:
    probabilities = np.array([[0.1, 0.6, 0.3]], np.float32)
    indices, scores = top_k(probabilities, 2, apply_softmax=False)
    np.testing.assert_array_equal(indices, [[1, 2]])
    np.testing.assert_array_equal(scores, probabilities[:, [1, 2]])


def test_a_dynamic_batch_in_one_pass_with_bad_requests_failing_alone() -> None:
    rng = np.random.default_rng(0)
    good_a = rng.normal(size=(3, CLASSES)).astype(np.float32)
    good_b = rng.normal(size=(1, CLASSES)).astype(np.float32)
    nan = good_a.copy()
    nan[1, 4] = np.nan
    classifier = Classifier(LABELS, params(), "logits")
    results = classifier.run([
        {"logits": good_a},
        {"logits": nan},
        {"logits": good_a[:, :5]},
        {"logits": good_a.astype(np.float64)},
        {"logits": None},
        {"logits": good_b},
    ])
    for result, logits in ((results[0], good_a), (results[5], good_b)):
        want_indices, want_scores = expected(logits, 3)
        np.testing.assert_array_equal(result[tensors.CLASS_INDICES], want_indices)
        np.testing.assert_allclose(result[tensors.SCORES], want_scores, rtol=1e-6)
        labels = result[tensors.LABELS]
        assert labels.dtype == object and labels.shape == (len(logits), 3)
        assert [[b.decode("utf-8") for b in row] for row in labels] == [[LABELS[i] for i in row] for row in want_indices]
    assert isinstance(results[1], RequestError) and results[1].reason == "non_finite"
    assert str(results[1]) == "input 'logits' item(s) 1 hold NaN or infinity; the model's output cannot be ranked"
    assert str(results[2]) == "input 'logits' has shape [3, 5]; expected [-1, 10]"
    assert str(results[3]) == "input 'logits' has dtype float64; expected float32"
    assert str(results[4]) == "missing input 'logits'"


# -- labels and load --------------------------------------------------------------------------------


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "labels.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def test_read_labels(tmp_path: Path) -> None:
    assert read_labels("m", write(tmp_path, "a\nb é\nc\n"), 3) == ("a", "b é", "c")
    assert read_labels("m", write(tmp_path, "a\nb\nc"), 3) == ("a", "b", "c")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a\nb\n", "has 2 label(s) but the input has 3 classes (one label per line, in class order)"),
        ("a\nb\nc\nd\n", "has 4 label(s) but the input has 3 classes"),
        ("a\n\nc\n", "has an empty label on line(s) 2"),
        (b"a\n\xff\nc\n", "is not UTF-8"),
    ],
)
def test_bad_labels_fail_the_load(tmp_path: Path, text, message: str) -> None:
    with pytest.raises(ClassifyLoadError) as caught:
        read_labels("m", write(tmp_path, text), 3)
    assert str(caught.value).startswith("model 'm': labels file ")
    assert message in str(caught.value)


def config(classes: int = CLASSES, k: int = 3, extra: bool = False, **params) -> dict:
    params.setdefault("top_k", str(k))
    outputs = [
        {"name": tensors.LABELS, "data_type": "TYPE_STRING", "dims": [k]},
        {"name": tensors.SCORES, "data_type": "TYPE_FP32", "dims": [k]},
        {"name": tensors.CLASS_INDICES, "data_type": "TYPE_INT64", "dims": [k]},
    ] + ([{"name": "other", "data_type": "TYPE_FP32", "dims": [1]}] if extra else [])
    return {
        "input": [{"name": "logits", "data_type": "TYPE_FP32", "dims": [classes]}],
        "output": outputs,
        "parameters": {key: {"string_value": value} for key, value in params.items()},
    }


def context(tmp_path: Path, cfg: dict, labels: str | None) -> LoadContext:
    model_dir = tmp_path / "classify"
    (model_dir / "1").mkdir(parents=True)
    if labels is not None:
        (model_dir / "labels.txt").write_text(labels)
    raw = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
    return LoadContext("classify", model_dir, model_dir / "1", cfg, raw)


def test_load_reads_params_config_and_labels(tmp_path: Path) -> None:
    classifier = load(context(tmp_path, config(k=2, top_k="2"), "".join(f"{label}\n" for label in LABELS)))
    assert classifier.params.top_k == 2 and classifier.classes == CLASSES and classifier.input_name == "logits"
    out = classifier.classify(np.eye(CLASSES, dtype=np.float32)[[7]] * 10)
    assert out[tensors.LABELS][0, 0] == LABELS[7].encode("utf-8")


@pytest.mark.parametrize(
    ("cfg", "labels", "message"),
    [
        (config(k=3), "a\nb\n", "has 2 label(s) but the input has 10 classes"),
        (config(k=3), None, "file 'labels.txt' not found in"),
        (config(k=5, top_k="3"), "x\n" * CLASSES, "output 'labels' must be TYPE_STRING dims [3] (top_k), got labels TYPE_STRING [5]"),
        (config(classes=2, k=3), "a\nb\n", "parameter 'top_k' is 3, more than the input's 2 classes"),
        (config(extra=True), "x\n" * CLASSES, "also declares ['other']"),
    ],
)
def test_load_errors_name_the_model_and_the_cause(tmp_path: Path, cfg: dict, labels, message: str) -> None:
    with pytest.raises(ClassifyLoadError) as caught:
        load(context(tmp_path, cfg, labels))
    assert "model 'classify'" in str(caught.value)
    assert message in str(caught.value)


def test_params_schema() -> None:
    parsed = parse_params("m", {}, CLASSIFY_PARAMS, ClassifyParams)
    assert parsed == ClassifyParams(top_k=5, labels_file="labels.txt", apply_softmax=True)
    with pytest.raises(ParamError, match="parameter 'top_k' must be an integer >= 1, got '0'"):
        parse_params("m", {"top_k": "0"}, CLASSIFY_PARAMS, ClassifyParams)


def test_check_config_rejects_a_wrong_input() -> None:
    cfg = config()
    cfg["input"][0]["data_type"] = "TYPE_INT64"
    with pytest.raises(ClassifyLoadError, match="needs exactly one input of TYPE_FP32 or TYPE_FP16"):
        check_config("m", cfg, params())


# -- the image pipelines' specs honor the pipeline contracts ------------------------------------------


CONTRACTS = {
    tensors.IMAGE_CLASSIFIER: ("resnet50", 16, 5),
    tensors.IMAGE_CLASSIFIER_INT8: ("resnet50_int8", 16, 5),
    tensors.DIGITS_READER: ("digits", 64, 3),
}


@pytest.mark.parametrize("name", list(CONTRACTS))
def test_pipeline_contract(name: str) -> None:
    model, max_batch, k = CONTRACTS[name]
    served = {spec.name: spec for spec in served_specs((*resnet50_pipeline.SPECS, *digits_pipeline.SPECS))}
    ensemble = served[name]
    assert isinstance(ensemble, EnsembleSpec) and ensemble.max_batch_size == max_batch
    assert [(t.name, t.dtype, t.dims, t.optional) for t in ensemble.inputs] == [(tensors.IMAGE, "BYTES", (1,), False)]
    assert [(t.name, t.dtype, t.dims) for t in ensemble.outputs] == [
        (tensors.LABELS, "BYTES", (k,)), (tensors.SCORES, "FP32", (k,)), (tensors.CLASS_INDICES, "INT64", (k,)),
    ]
    assert ensemble.steps[1].model == model
    for step in (ensemble.steps[0], ensemble.steps[2]):
        spec = served[step.model]
        assert spec.max_batch_size == max_batch and spec.dynamic_batching is not None


def test_labels_files_match_the_models_classes() -> None:
    from kiln.models.digits.spec import SPEC as DIGITS
    from kiln.models.resnet50.spec import SPEC as RESNET50

    resnet = resnet50_pipeline.RESNET50_CLASSIFY_SPEC.files["labels.txt"].splitlines()
    assert len(resnet) == RESNET50.outputs[0].dims[0] == 1000
    assert resnet[0] == "class_0000" and resnet[-1] == "class_0999"
    digits = digits_pipeline.DIGITS_CLASSIFY_SPEC.files["labels.txt"].splitlines()
    assert digits == [str(i) for i in range(DIGITS.outputs[0].dims[0])]
