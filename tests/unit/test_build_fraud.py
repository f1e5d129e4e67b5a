"""The fraud source stage: the synthetic data set, its standardization, the MLP, held-out scoring."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from kiln.build.check import HeldOut
from kiln.build.publish import checkpoint_path
from kiln.models.fraud import build as fraud
from kiln.models.fraud.spec import SPEC as FRAUD
from kiln.models.fraud.spec import FraudMLPSource

SOURCE = FRAUD.build.source
SMALL = replace(SOURCE, samples=5_000, calibration_size=64)
"""A quick data set for the tests that train more than once."""
SHARE_TOLERANCE = 0.002
"""Allowed gap between a split's fraud share and the generator's expected share (about 10%)."""
EXPECTED_SHARE = SOURCE.fraud_rate * (1 - fraud.FLIP_Y) + fraud.FLIP_Y / 2
"""make_classification assigns FLIP_Y of the labels at random, half of them to fraud."""


@pytest.fixture(scope="module")
def split() -> fraud.FraudSplit:
    return fraud.load_split(SOURCE)


@pytest.fixture(scope="module")
def trained(split: fraud.FraudSplit) -> fraud.FraudMLP:
    """One training run with the spec's settings, shared by this module's tests."""
    return fraud.train(SOURCE, split=split)


@pytest.fixture(scope="module")
def held() -> HeldOut:
    return fraud.held_out(SOURCE)


def test_split_sizes_dtypes_and_names(split: fraud.FraudSplit) -> None:
    n_test = len(split.y_test)
    assert n_test == int(np.ceil(SOURCE.samples * SOURCE.test_fraction))
    assert len(split.y_train) + n_test == SOURCE.samples
    assert split.x_train.shape == (SOURCE.samples - n_test, SOURCE.features)
    assert split.x_test.shape == (n_test, SOURCE.features)
    assert split.x_train.dtype == np.float32 and split.x_test.dtype == np.float32
    assert split.y_train.dtype == np.int64 and set(np.unique(split.y_train)) == {0, 1}
    assert split.stats.names == fraud.feature_names(SOURCE)


def test_feature_names_are_the_named_columns_then_anonymised_ones() -> None:
    names = fraud.feature_names(SOURCE)
    named = tuple(c.name for c in fraud.NAMED_COLUMNS)
    assert len(names) == SOURCE.features == len(set(names))
    assert names[: len(named)] == named
    assert names[len(named) :] == tuple(f"v{k}" for k in range(1, SOURCE.features - len(named) + 1))
    assert fraud.feature_names(replace(SOURCE, features=3)) == ("amount", "hour", "account_age_days")


def test_data_set_is_deterministic_for_a_seed(split: fraud.FraudSplit) -> None:
    again = fraud.load_split(SOURCE)
    np.testing.assert_array_equal(again.raw_train, split.raw_train)
    np.testing.assert_array_equal(again.x_test, split.x_test)
    np.testing.assert_array_equal(again.y_test, split.y_test)
    other = fraud.load_split(replace(SOURCE, seed=SOURCE.seed + 1))
    assert not np.array_equal(other.raw_test, split.raw_test)


def test_data_set_is_imbalanced_at_the_fraud_rate_in_both_splits(split: fraud.FraudSplit) -> None:
    for labels in (split.y_train, split.y_test):
        assert abs(labels.mean() - EXPECTED_SHARE) < SHARE_TOLERANCE, labels.mean()
    # Stratified: the test split holds test_fraction of the fraud cases, to the item.
    total_fraud = int(split.y_train.sum() + split.y_test.sum())
    assert abs(int(split.y_test.sum()) - total_fraud * SOURCE.test_fraction) <= 1


def test_raw_features_have_plausible_scales(split: fraud.FraudSplit) -> None:
    names = split.stats.names
    raw = np.concatenate([split.raw_train, split.raw_test])
    amount = raw[:, names.index("amount")]
    hour = raw[:, names.index("hour")]
    risk = raw[:, names.index("merchant_risk")]
    assert amount.min() > 0 and np.mean(amount) > np.median(amount)  # log-normal: a long right tail
    assert hour.min() >= 0 and hour.max() < 24
    assert risk.min() >= 0 and risk.max() < 1
    # Scales spanning orders of magnitude: standardization matters.
    assert split.stats.std.max() / split.stats.std.min() > 1e3


def test_standardization_uses_the_training_split_only(split: fraud.FraudSplit) -> None:
    stats = split.stats
    np.testing.assert_array_equal(stats.mean, split.raw_train.mean(axis=0))
    np.testing.assert_array_equal(stats.std, split.raw_train.std(axis=0))
    np.testing.assert_allclose(split.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(split.x_train.std(axis=0), 1.0, atol=1e-5)
    # The test split is standardized with the training statistics, so its mean is not exactly 0.
    assert np.abs(split.x_test.mean(axis=0)).max() > 1e-3
    expected = ((split.raw_test - stats.mean) / stats.std).astype(np.float32)
    np.testing.assert_array_equal(split.x_test, expected)


def test_feature_stats_reject_a_constant_column() -> None:
    raw = np.array([[1.0, 5.0], [2.0, 5.0]])
    with pytest.raises(ValueError, match=r"feature\(s\) b are constant in the training split"):
        fraud.FeatureStats.fit(("a", "b"), raw)


def test_extra_files_writes_features_json_that_round_trips(
    split: fraud.FraudSplit, trained: fraud.FraudMLP, tmp_path: Path
) -> None:
    files = fraud.extra_files(SOURCE, trained, tmp_path)
    assert files == {fraud.FEATURES_FILE: tmp_path / fraud.FEATURES_FILE}
    document = json.loads(files[fraud.FEATURES_FILE].read_text())
    assert document["format"] == fraud.FEATURES_FORMAT
    assert document["features"] == list(fraud.feature_names(SOURCE))
    assert document["mean"] == split.stats.mean.tolist()
    assert document["std"] == split.stats.std.tolist()
    stats = fraud.read_feature_stats(files[fraud.FEATURES_FILE])
    assert stats.names == split.stats.names
    np.testing.assert_array_equal(stats.standardize(split.raw_test), split.x_test)


def test_features_json_with_another_layout_is_refused() -> None:
    document = fraud.FeatureStats(("a", "b"), np.zeros(2), np.ones(2)).to_json()
    with pytest.raises(ValueError, match=r"format must be 1, got 2"):
        fraud.FeatureStats.from_json({**document, "format": 2})
    with pytest.raises(ValueError, match=r"2 features but 1 means and 2 stds"):
        fraud.FeatureStats.from_json({**document, "mean": [0.0]})


def test_too_few_fraud_cases_for_a_split_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = replace(SOURCE, samples=100, fraud_rate=0.001)
    labels = np.zeros(tiny.samples, dtype=np.int64)
    labels[0] = 1
    features = np.random.default_rng(0).random((tiny.samples, tiny.features))
    monkeypatch.setattr(fraud, "make_transactions", lambda source: (features, labels))
    with pytest.raises(
        ValueError, match=r"has 1 fraud and 99 normal .* needs 2 of each: raise samples \(100\) or fraud_rate \(0.001\)"
    ):
        fraud.load_split(tiny)


def test_model_outputs_a_probability_per_item(trained: fraud.FraudMLP, split: fraud.FraudSplit) -> None:
    x = torch.from_numpy(split.x_test[:7])
    extreme = torch.tensor([[1e3] * SOURCE.features, [-1e3] * SOURCE.features])
    both = torch.cat([x, extreme])
    with torch.no_grad():
        out = trained(both)
        # forward is sigmoid(logits) of the same batch: equal by construction (another batch size
        # could take other kernels, which differ in the last digits on some CPUs).
        want = torch.sigmoid(trained.logits(both))
    assert tuple(out.shape) == (9, 1) and out.dtype == torch.float32
    assert bool(((out >= 0) & (out <= 1)).all())
    np.testing.assert_array_equal(out.numpy(), want.numpy())
    linears = [m for m in trained.body if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [*SOURCE.hidden_sizes, 1]


def test_trained_model_reaches_the_spec_minimum_roc_auc(
    trained: fraud.FraudMLP, split: fraud.FraudSplit
) -> None:
    auc = fraud.roc_auc(split.y_test, fraud.predict_proba(trained, split.x_test))
    assert auc >= FRAUD.build.min_accuracy, auc
    assert auc < 0.995  # label noise keeps the synthetic task from being trivial
    assert not trained.training


def test_probabilities_are_not_inflated_by_the_class_weight(
    trained: fraud.FraudMLP, split: fraud.FraudSplit
) -> None:
    # Without the bias correction the mean probability would be many times the fraud share.
    mean = float(fraud.predict_proba(trained, split.x_test).mean())
    assert abs(mean - split.y_test.mean()) < 0.25 * split.y_test.mean(), mean


def test_training_is_deterministic_and_leaves_global_torch_state_alone() -> None:
    source = replace(SMALL, epochs=1)
    split = fraud.load_split(source)
    rng_before = torch.get_rng_state()
    threads_before = torch.get_num_threads()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    first = fraud.train(source, split=split).state_dict()
    second = fraud.train(source, split=split).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads_before
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = fraud.train(replace(source, seed=source.seed + 1), split=split).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_progress_is_one_line_per_epoch() -> None:
    lines: list[str] = []
    fraud.train(replace(SMALL, epochs=2), lines.append)
    assert len(lines) == 2
    pattern = r"epoch {k}/2  loss \d+\.\d{{4}}  train ROC-AUC (0|1)\.\d{{4}}"
    for k, line in enumerate(lines, start=1):
        assert re.fullmatch(pattern.format(k=k), line), line


def test_held_out_inputs_are_the_standardized_test_split(
    held: HeldOut, split: fraud.FraudSplit
) -> None:
    assert held.metric == "ROC-AUC"
    (inputs,) = held.inputs
    np.testing.assert_array_equal(inputs, split.x_test)
    assert held.size == len(split.y_test)


def test_calibration_rows_come_from_training_not_from_the_test_split(
    held: HeldOut, split: fraud.FraudSplit
) -> None:
    (calibration,) = held.calibration
    assert calibration.shape == (SOURCE.calibration_size, SOURCE.features)
    np.testing.assert_array_equal(calibration, split.x_train[: SOURCE.calibration_size])
    test_rows = {row.tobytes() for row in split.x_test}
    assert not any(row.tobytes() in test_rows for row in calibration)


def test_calibration_larger_than_the_training_split_is_refused() -> None:
    source = replace(SMALL, calibration_size=4_000)
    with pytest.raises(ValueError, match=r"calibration_size 4000 exceeds the 3750 training rows"):
        fraud.held_out(source)


def test_score_is_sklearns_roc_auc_of_the_probability(
    held: HeldOut, split: fraud.FraudSplit
) -> None:
    rng = np.random.default_rng(0)
    scores = rng.random((held.size, 1), dtype=np.float32)
    unused = np.full_like(scores, np.nan)  # ROC-AUC is labelled: the reference plays no part
    auc = held.score([scores], [unused])
    assert auc == roc_auc_score(split.y_test, scores[:, 0])
    assert abs(auc - 0.5) < 0.05
    perfect = split.y_test.astype(np.float32)[:, None]
    assert held.score([perfect], [unused]) == 1.0
    assert held.score([1 - perfect], [unused]) == 0.0


def test_load_trained_from_path_and_from_spec(
    trained: fraud.FraudMLP, split: fraud.FraudSplit, tmp_path: Path
) -> None:
    path = fraud.save_checkpoint(trained, checkpoint_path(FRAUD.name, tmp_path))
    x = torch.from_numpy(split.x_test)
    with torch.no_grad():
        want = trained(x)
        from_path = fraud.load_trained(path)(x)
        from_spec = fraud.load_trained(FRAUD, artifacts=tmp_path)(x)
    assert torch.equal(from_path, want)
    assert torch.equal(from_spec, want)


def test_load_trained_refuses_a_checkpoint_of_other_layer_sizes(tmp_path: Path) -> None:
    other = fraud.build_model(replace(SOURCE, hidden_sizes=(8,)))
    fraud.save_checkpoint(other, checkpoint_path(FRAUD.name, tmp_path))
    with pytest.raises(ValueError, match=r"hidden sizes \(8,\); the spec asks for 16 and \(64, 32\)"):
        fraud.load_trained(FRAUD, artifacts=tmp_path)


def test_load_trained_without_checkpoint_says_to_build(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no trained checkpoint at .*kiln build"):
        fraud.load_trained(FRAUD, artifacts=tmp_path)


def test_spec_signature_matches_its_source() -> None:
    assert isinstance(SOURCE, FraudMLPSource)
    assert [(t.name, t.dtype, t.dims) for t in FRAUD.inputs] == [("features", "FP32", (SOURCE.features,))]
    assert [(t.name, t.dtype, t.dims) for t in FRAUD.outputs] == [("probability", "FP32", (1,))]


# --- the decision threshold: derived by the build, never written into the spec ----------------


def test_choose_threshold_picks_the_highest_grid_point_that_meets_the_recall_floor() -> None:
    # 10 frauds scored 0.05, 0.15, ..., 0.95 and 10 normal transactions scored 0.01 .. 0.10.
    fraud_scores = np.arange(10) * 0.1 + 0.05
    normal_scores = np.arange(1, 11) * 0.01
    scores = np.concatenate([fraud_scores, normal_scores]).astype(np.float32)
    labels = np.array([1] * 10 + [0] * 10)
    choice = fraud.choose_threshold(scores, labels, min_recall=0.8, step=0.1)
    # At 0.2 the frauds 0.25 .. 0.95 are caught (8 of 10, recall 0.8); at 0.3 only 7.
    assert choice.threshold == 0.2
    assert (choice.caught, choice.positives, choice.flagged, choice.items) == (8, 10, 8, 20)
    assert choice.recall == 0.8 and choice.precision == 1.0
    assert choice.next_recall == 0.7
    # One more fraud caught needs the next lower grid point, which also flags a normal score.
    lower = fraud.choose_threshold(scores, labels, min_recall=0.9, step=0.1)
    assert (lower.threshold, lower.caught, lower.flagged) == (0.1, 9, 10)


def test_choose_threshold_compares_in_fp32_as_the_served_step_does() -> None:
    # A fraud scored exactly float32(0.3) counts as caught at 0.3 (score >= threshold in FP32).
    scores = np.array([np.float32(0.3), 0.9], dtype=np.float32)
    choice = fraud.choose_threshold(scores, np.array([1, 1]), min_recall=1.0, step=0.1)
    assert choice.threshold == 0.3


def test_choose_threshold_says_when_the_rule_cannot_be_met() -> None:
    scores = np.array([0.0, 0.5, 0.001], dtype=np.float32)
    with pytest.raises(ValueError, match=r"no threshold on the 0\.01 grid reaches held-out recall 1: the lowest, 0\.01, catches 1 of 2 frauds"):
        fraud.choose_threshold(scores, np.array([1, 1, 0]), min_recall=1.0, step=0.01)
    with pytest.raises(ValueError, match="no fraud"):
        fraud.choose_threshold(scores, np.zeros(3), min_recall=0.5, step=0.01)


def test_the_threshold_grid_holds_clean_multiples_of_the_step() -> None:
    grid = fraud.threshold_grid(0.01)
    assert grid.size == 100 and grid[0] == 0.01 and grid[20] == 0.21 and grid[-1] == 1.0
    assert fraud.threshold_grid(0.25).tolist() == [0.25, 0.5, 0.75, 1.0]


def test_derived_publishes_the_rule_s_threshold_for_the_trained_model(
    trained: fraud.FraudMLP, split: fraud.FraudSplit, tmp_path: Path
) -> None:
    from kiln.serving.threshold import DECISION_FILE, DecisionThreshold

    ((name, (path, document)),) = fraud.derived(SOURCE, trained, tmp_path).items()
    assert name == DECISION_FILE and path == tmp_path / DECISION_FILE
    published = DecisionThreshold.read(path)
    assert published.to_json() == document == json.loads(path.read_text())
    # It is the rule applied to this model's held-out scores, whatever this CPU trained.
    scores = fraud.predict_proba(trained, split.x_test)
    want = fraud.choose_threshold(
        scores, split.y_test, min_recall=SOURCE.min_recall, step=SOURCE.threshold_step
    )
    assert published.threshold == want.threshold
    caught = int(((scores >= np.float32(want.threshold)) & (split.y_test == 1)).sum())
    assert caught / int(split.y_test.sum()) >= SOURCE.min_recall
    assert document["evidence"]["caught"] == caught
    assert "0.01 grid" in published.rule and "at least 0.8" in published.rule
    with pytest.raises(ValueError, match="trained model"):
        fraud.derived(SOURCE, None, tmp_path)
