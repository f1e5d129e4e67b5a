"""The digits source stage: the split, the CNN, deterministic training, checkpoints."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from kiln.build.publish import checkpoint_path
from kiln.models.digits import build as digits
from kiln.models.digits.spec import SPEC as DIGITS

SOURCE = DIGITS.build.source
TOTAL_IMAGES = 1797


@pytest.fixture(scope="module")
def split() -> digits.DigitsSplit:
    return digits.load_split(SOURCE)


@pytest.fixture(scope="module")
def trained(split: digits.DigitsSplit) -> torch.nn.Module:
    """One training run with the spec's settings, shared by this module's tests."""
    return digits.train(SOURCE, split=split)


def test_split_shapes_dtypes_and_scaling(split: digits.DigitsSplit) -> None:
    n_test = len(split.y_test)
    assert len(split.y_train) + n_test == TOTAL_IMAGES
    assert n_test == int(np.ceil(TOTAL_IMAGES * SOURCE.test_fraction))
    assert split.x_train.shape == (TOTAL_IMAGES - n_test, *digits.IMAGE_SHAPE)
    assert split.x_test.shape == (n_test, *digits.IMAGE_SHAPE)
    assert split.x_train.dtype == np.float32 and split.x_test.dtype == np.float32
    assert split.y_train.dtype == np.int64
    assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0


def test_pixel_scale_is_the_datasets_largest_grey_level() -> None:
    # The input contract (kiln.tensors.DIGITS_PIXELS) says [0, 1]: that holds only if 16 is the max.
    assert load_digits().images.max() == digits.PIXEL_SCALE


def test_split_is_deterministic_for_a_seed(split: digits.DigitsSplit) -> None:
    again = digits.load_split(SOURCE)
    np.testing.assert_array_equal(again.x_test, split.x_test)
    np.testing.assert_array_equal(again.y_train, split.y_train)
    other = digits.load_split(replace(SOURCE, seed=SOURCE.seed + 1))
    assert not np.array_equal(other.y_test, split.y_test)


def test_split_is_stratified(split: digits.DigitsSplit) -> None:
    all_counts = np.bincount(np.concatenate([split.y_train, split.y_test]), minlength=10)
    test_counts = np.bincount(split.y_test, minlength=10)
    expected = all_counts * SOURCE.test_fraction
    assert np.all(np.abs(test_counts - expected) <= 1), (test_counts, expected)


def test_model_maps_pixels_to_ten_logits() -> None:
    model = digits.build_model()
    out = model(torch.zeros(5, *digits.IMAGE_SHAPE))
    assert tuple(out.shape) == (5, digits.NUM_CLASSES)


def test_training_is_deterministic_and_leaves_global_torch_state_alone(
    split: digits.DigitsSplit,
) -> None:
    source = replace(SOURCE, epochs=1)
    rng_before = torch.get_rng_state()
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    first = digits.train(source, split=split).state_dict()
    second = digits.train(source, split=split).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic_before
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    third = digits.train(replace(source, seed=source.seed + 1), split=split).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_progress_is_one_line_per_epoch(split: digits.DigitsSplit) -> None:
    lines: list[str] = []
    digits.train(replace(SOURCE, epochs=2), lines.append, split=split)
    assert len(lines) == 2
    pattern = r"epoch {k}/2  loss \d+\.\d{{4}}  train acc (0|1)\.\d{{4}}"
    for k, line in enumerate(lines, start=1):
        assert re.fullmatch(pattern.format(k=k), line), line


def test_trained_model_beats_95_percent_with_the_spec_settings(
    trained: torch.nn.Module, split: digits.DigitsSplit
) -> None:
    acc = digits.accuracy(trained, split.x_test, split.y_test)
    assert acc > 0.95
    assert acc >= DIGITS.build.min_accuracy
    assert not trained.training


def test_accuracy_counts_correct_predictions(
    trained: torch.nn.Module, split: digits.DigitsSplit
) -> None:
    predicted = digits.predict(trained, split.x_test)
    expected = float(np.mean(predicted == split.y_test))
    assert digits.accuracy(trained, split.x_test, split.y_test) == expected
    wrong = (split.y_test + 1) % digits.NUM_CLASSES
    assert digits.accuracy(trained, split.x_test, wrong) < 0.05


def test_held_out_is_the_test_split_scored_by_accuracy(split: digits.DigitsSplit) -> None:
    held = digits.held_out(SOURCE)
    assert held.metric == digits.METRIC
    np.testing.assert_array_equal(held.inputs[0], split.x_test)
    perfect = np.eye(digits.NUM_CLASSES, dtype=np.float32)[split.y_test]
    assert held.score([perfect], [perfect]) == 1.0
    shifted = np.roll(perfect, 1, axis=1)
    assert held.score([shifted], [perfect]) == 0.0


def test_calibration_inputs_come_from_training_not_from_the_test_split(
    split: digits.DigitsSplit,
) -> None:
    held = digits.held_out(SOURCE)
    (calibration,) = held.calibration
    assert len(calibration) == SOURCE.calibration_size
    np.testing.assert_array_equal(calibration, split.x_train[: SOURCE.calibration_size])
    test_rows = {row.tobytes() for row in split.x_test}
    assert not any(row.tobytes() in test_rows for row in calibration)


def test_load_trained_from_path_and_from_spec(
    trained: torch.nn.Module, split: digits.DigitsSplit, tmp_path: Path
) -> None:
    path = digits.save_checkpoint(trained, checkpoint_path(DIGITS.name, tmp_path))
    x = torch.from_numpy(split.x_test)
    with torch.no_grad():
        want = trained(x)
        from_path = digits.load_trained(path)(x)
        from_spec = digits.load_trained(DIGITS, artifacts=tmp_path)(x)
    assert torch.equal(from_path, want)
    assert torch.equal(from_spec, want)


def test_load_trained_without_checkpoint_says_to_build(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no trained checkpoint at .*kiln build"):
        digits.load_trained(DIGITS, artifacts=tmp_path)

