"""The resnet50 source stage: architecture, seeded weights, preprocessing, photo split, scoring.

The trained model here is built at a reduced image size (ResNet-50 is fully convolutional up to
its adaptive pooling) so the module runs in seconds; the full-size path runs in the build.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kiln import tensors
from kiln.build.publish import checkpoint_path
from kiln.models.resnet50 import build as resnet50
from kiln.models.resnet50.spec import SPEC as RESNET50
from kiln.spec import validate

SOURCE = RESNET50.build.source
SMALL = replace(SOURCE, image_size=64, eval_images=32, calibration_images=8)
"""The spec's source at 64x64 pixels with fewer crops: the same code paths, ~12x less compute."""
RESNET50_PARAMETERS = 25_557_032
"""torchvision's resnet50(num_classes=1000) parameter count."""
CONV_LAYERS = 53
"""1 stem conv + 16 blocks x 3 convs + 4 downsampling convs."""


@pytest.fixture(scope="module")
def progress_lines() -> list[str]:
    return []


@pytest.fixture(scope="module")
def trained(progress_lines: list[str]) -> resnet50.ResNet50:
    return resnet50.train(SMALL, progress_lines.append)


@pytest.fixture(scope="module")
def held() -> resnet50.HeldOut:
    return resnet50.held_out(SMALL)


@pytest.fixture(scope="module")
def logits(trained: resnet50.ResNet50, held: resnet50.HeldOut) -> np.ndarray:
    with torch.inference_mode():
        return trained(torch.from_numpy(held.inputs[0])).numpy()


# --- architecture and weights ------------------------------------------------------------------
def test_architecture_is_resnet50() -> None:
    model = resnet50.ResNet50(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == RESNET50_PARAMETERS
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == CONV_LAYERS
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        3, 4, 6, 3,
    ]
    # v1.5: the stride sits on the 3x3 conv of a downsampling block, not on its first 1x1.
    assert model.layer2[0].conv1.stride == (1, 1)
    assert model.layer2[0].conv2.stride == (2, 2)
    assert model.layer2[0].downsample[0].stride == (2, 2)
    assert model.layer1[0].conv2.stride == (1, 1)
    # torchvision's state_dict names, so its checkpoints would load.
    state = model.state_dict()
    for key in ("conv1.weight", "layer1.0.downsample.1.running_var", "layer4.2.bn3.weight"):
        assert key in state
    assert tuple(state["fc.weight"].shape) == (1000, 2048)


def test_output_shape_follows_batch_and_classes() -> None:
    model = resnet50.ResNet50(num_classes=7).eval()
    with torch.inference_mode():
        out = model(torch.zeros(3, 3, SMALL.image_size, SMALL.image_size))
    assert tuple(out.shape) == (3, 7)


def test_weights_are_deterministic_for_a_seed_and_leave_global_rng_alone() -> None:
    rng_before = torch.get_rng_state()
    first = resnet50.build_model(SMALL).state_dict()
    second = resnet50.build_model(SMALL).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = resnet50.build_model(replace(SMALL, seed=SMALL.seed + 1)).state_dict()
    assert not torch.equal(first["conv1.weight"], other["conv1.weight"])


def test_init_follows_torchvision_except_a_small_residual_branch_scale() -> None:
    model = resnet50.build_model(SMALL)
    conv = model.layer3[2].conv2.weight
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert conv.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.05)  # Kaiming, fan_out
    blocks = [m for m in model.modules() if isinstance(m, resnet50.Bottleneck)]
    assert len(blocks) == 16
    assert all(torch.all(b.bn3.weight == resnet50.RESIDUAL_BRANCH_SCALE) for b in blocks)
    assert torch.all(model.layer1[0].bn1.weight == 1) and torch.all(model.bn1.bias == 0)
    assert 0 < resnet50.RESIDUAL_BRANCH_SCALE < 1


# --- preprocessing: the served input contract --------------------------------------------------
def _expected_constant(rgb: tuple[int, int, int]) -> np.ndarray:
    mean = np.asarray(resnet50.IMAGENET_MEAN)
    std = np.asarray(resnet50.IMAGENET_STD)
    return ((np.asarray(rgb) / 255.0 - mean) / std).astype(np.float32)


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (np.full((40, 70), 100, np.uint8), (100, 100, 100)),  # grey [H, W]
        (np.full((40, 70, 1), 100, np.uint8), (100, 100, 100)),  # grey [H, W, 1]
        (np.broadcast_to(np.uint8([10, 120, 250]), (90, 50, 3)).copy(), (10, 120, 250)),  # RGB
        (np.broadcast_to(np.uint8([10, 120, 250, 255]), (50, 50, 4)).copy(), (10, 120, 250)),
        (np.broadcast_to(np.uint8([10, 120, 250, 0]), (50, 50, 4)).copy(), (255, 255, 255)),
        (np.ones((30, 30), np.bool_), (255, 255, 255)),  # a mask: True is white
    ],
    ids=["grey", "grey1", "rgb", "rgba-opaque", "rgba-transparent", "bool"],
)
def test_preprocess_normalizes_a_constant_image(image: np.ndarray, rgb: tuple) -> None:
    size = 32
    out = resnet50.preprocess(image, size)
    assert out.shape == (3, size, size) and out.dtype == np.float32
    expected = _expected_constant(rgb)
    for channel in range(3):
        np.testing.assert_allclose(out[channel], expected[channel], rtol=0, atol=1e-5)


def test_preprocess_composites_half_transparent_pixels_on_white() -> None:
    image = np.broadcast_to(np.uint8([0, 0, 0, 102]), (20, 20, 4)).copy()  # alpha 0.4
    out = resnet50.preprocess(image, 8)
    grey = round(255 * (1 - 102 / 255))  # 153
    np.testing.assert_allclose(out[:, 0, 0], _expected_constant((grey,) * 3), atol=1e-5)


def test_preprocess_resizes_the_shorter_side_and_keeps_the_center() -> None:
    # A wide image: the centre 100x100 is grey 128, the sides are white.
    image = np.full((100, 300), 255, np.uint8)
    image[:, 100:200] = 128
    out = resnet50.preprocess(image, 32, crop_fraction=0.5)  # shorter side -> 64, centre 32
    np.testing.assert_allclose(out, np.broadcast_to(_expected_constant((128,) * 3)[:, None, None],
                                                    out.shape), atol=1e-5)
    # At the default fraction (0.875) the crop still lies inside the grey square.
    assert np.allclose(resnet50.preprocess(image, 32)[:, 4:-4, 4:-4], out[:, 4:-4, 4:-4])


def test_preprocess_keeps_orientation() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[:32] = (255, 0, 0)  # top half red
    out = resnet50.preprocess(image, 16, crop_fraction=1.0)
    red = _expected_constant((255, 0, 0))
    black = _expected_constant((0, 0, 0))
    np.testing.assert_allclose(out[:, 0, 0], red, atol=1e-5)
    np.testing.assert_allclose(out[:, -1, 0], black, atol=1e-5)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((8, 8, 3), np.float32), r"uint8 \(or bool\) pixels, got dtype float32"),
        (np.zeros((8, 8, 2), np.uint8), r"C 1 \(grey\), 3 \(RGB\) or 4 \(RGBA\), got shape \[8, 8, 2\]"),
        (np.zeros((2, 8, 8, 3), np.uint8), r"got shape \[2, 8, 8, 3\]"),
        (np.zeros((0, 8), np.uint8), r"must not be empty"),
    ],
)
def test_preprocess_rejects_what_it_cannot_read(image: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resnet50.preprocess(image, 16)


def test_preprocess_rejects_bad_sizes() -> None:
    image = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="image_size must be >= 1, got 0"):
        resnet50.preprocess(image, 0)
    with pytest.raises(ValueError, match=r"crop_fraction must be in \(0, 1\], got 1.5"):
        resnet50.preprocess(image, 8, crop_fraction=1.5)


# --- photographs and crops ---------------------------------------------------------------------
def test_evaluation_and_calibration_photographs_are_disjoint() -> None:
    evaluation, calibration = resnet50.EVALUATION_PHOTOS, resnet50.CALIBRATION_PHOTOS
    assert not set(evaluation) & set(calibration)
    assert len(set(evaluation)) == len(evaluation) and len(set(calibration)) == len(calibration)
    # Distinct names are not enough (skimage's `cat` is `chelsea`): compare the pictures too.
    fingerprints = {}
    for name in evaluation + calibration:
        image = resnet50.photograph(name)
        assert image.dtype == np.uint8 and image.ndim in (2, 3) and min(image.shape[:2]) >= 100
        fingerprints.setdefault(image.tobytes(), []).append(name)
    assert all(len(names) == 1 for names in fingerprints.values()), fingerprints


def test_photograph_refuses_unlisted_names() -> None:
    with pytest.raises(ValueError, match=r"unknown photograph 'eagle'; known: astronaut, "):
        resnet50.photograph("eagle")


def test_each_crop_set_reads_only_its_own_photographs(monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    original = resnet50.photograph

    def recording(name: str) -> np.ndarray:
        read.append(name)
        return original(name)

    monkeypatch.setattr(resnet50, "photograph", recording)
    tiny = replace(SMALL, image_size=16, eval_images=len(resnet50.EVALUATION_PHOTOS))
    resnet50.evaluation_crops(tiny)
    assert sorted(set(read)) == sorted(resnet50.EVALUATION_PHOTOS)
    read.clear()
    resnet50.calibration_crops(replace(tiny, calibration_images=len(resnet50.CALIBRATION_PHOTOS)))
    resnet50.recalibration_crops(tiny)
    assert sorted(set(read)) == sorted(resnet50.CALIBRATION_PHOTOS)


def test_crops_are_deterministic_per_seed_and_follow_the_contract(
    held: resnet50.HeldOut,
) -> None:
    size = SMALL.image_size
    (inputs,) = held.inputs
    (calibration,) = held.calibration
    assert inputs.shape == (SMALL.eval_images, 3, size, size) and inputs.dtype == np.float32
    assert calibration.shape == (SMALL.calibration_images, 3, size, size)
    np.testing.assert_array_equal(resnet50.evaluation_crops(SMALL), inputs)
    other = resnet50.evaluation_crops(replace(SMALL, seed=SMALL.seed + 1))
    assert not np.array_equal(other, inputs)
    # Normalized pixels: within the range [0, 1] maps to, and not all alike.
    low = (0 - max(resnet50.IMAGENET_MEAN)) / min(resnet50.IMAGENET_STD)
    high = (1 - min(resnet50.IMAGENET_MEAN)) / min(resnet50.IMAGENET_STD)
    assert low - 1e-5 <= inputs.min() and inputs.max() <= high + 1e-5
    assert len({crop.tobytes() for crop in inputs}) == len(inputs)


def test_calibration_and_recalibration_crops_are_different_draws() -> None:
    source = replace(SMALL, calibration_images=resnet50.RECALIBRATION_BATCH_SIZE)
    calibration = resnet50.calibration_crops(source)
    recalibration = resnet50.recalibration_crops(source)
    assert len(recalibration) == resnet50.RECALIBRATION_BATCHES * resnet50.RECALIBRATION_BATCH_SIZE
    assert not np.array_equal(calibration, recalibration[: len(calibration)])


# --- recalibration, predictions, scoring -------------------------------------------------------
def test_train_reports_progress_and_returns_an_eval_model(
    trained: resnet50.ResNet50, progress_lines: list[str]
) -> None:
    lines = progress_lines
    assert not trained.training
    batches = resnet50.RECALIBRATION_BATCHES
    recal = [line for line in lines if line.startswith("BN recalibration")]
    assert recal == [
        f"BN recalibration batch {k}/{batches} ({resnet50.RECALIBRATION_BATCH_SIZE} crops)"
        for k in range(1, batches + 1)
    ]
    assert re.fullmatch(r"top-1 over 64 recalibration crops: \d+ distinct classes, the most "
                        r"frequent on \d+", lines[-1]), lines[-1]


def test_batch_norm_statistics_come_from_the_photographs(trained: resnet50.ResNet50) -> None:
    fresh = resnet50.build_model(SMALL)
    assert torch.all(fresh.bn1.running_var == 1)  # a fresh network's statistics are placeholders
    norms = [m for m in trained.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == resnet50.RECALIBRATION_BATCHES for m in norms)
    assert all(m.momentum == resnet50.BN_MOMENTUM for m in norms)
    # Recomputed by hand for the stem: per-channel mean of conv1's output over the crops.
    images = torch.from_numpy(resnet50.recalibration_crops(SMALL))
    with torch.inference_mode():
        stem = trained.conv1(images)
    np.testing.assert_allclose(
        trained.bn1.running_mean.numpy(), stem.mean(dim=(0, 2, 3)).numpy(), rtol=1e-3, atol=1e-4
    )


def test_recalibrated_logits_are_centered_and_unit_scaled(trained: resnet50.ResNet50) -> None:
    features = resnet50.pooled_features(
        trained, resnet50.recalibration_crops(SMALL), resnet50.RECALIBRATION_BATCH_SIZE
    )
    with torch.inference_mode():
        logits = trained.fc(features).double()
    assert logits.mean().abs().item() < 1e-3
    assert logits.std().item() == pytest.approx(resnet50.LOGIT_STD, rel=1e-3)
    rank = torch.linalg.matrix_rank(trained.fc.weight.detach()).item()
    assert rank == resnet50.CLASSIFIER_COMPONENTS


def test_predictions_are_not_degenerate(logits: np.ndarray) -> None:
    predicted = logits.argmax(axis=1)
    distinct = len(set(predicted.tolist()))
    most_frequent = np.bincount(predicted).max()
    assert distinct >= resnet50.MIN_DISTINCT_PREDICTIONS, predicted
    assert most_frequent <= len(predicted) // 2, predicted
    assert np.isfinite(logits).all() and logits.std() > 0.1


def test_degenerate_predictions_fail_the_build() -> None:
    model = resnet50.ResNet50(num_classes=10).eval()
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.arange(10.0))  # class 9 always wins
    features = torch.rand(16, 2048)
    with pytest.raises(ValueError, match=r"predicts only 1 distinct class\(es\) over 16 "):
        resnet50._check_predictions(model, features, None)


def test_recalibrate_classifier_checks_the_component_count() -> None:
    model = resnet50.ResNet50(num_classes=10)
    with pytest.raises(ValueError, match=r"components must be in 1\.\.7 .*got 8"):
        resnet50.recalibrate_classifier(model, torch.rand(8, 2048), components=8)


def test_held_out_scores_top1_agreement(held: resnet50.HeldOut, logits: np.ndarray) -> None:
    assert held.metric == resnet50.METRIC == "top-1 agreement with FP32"
    assert held.score([logits], [logits]) == 1.0
    shuffled = logits[np.random.default_rng(0).permutation(len(logits))]
    agreement = held.score([shuffled], [logits])
    expected = float(np.mean(shuffled.argmax(1) == logits.argmax(1)))
    assert agreement == expected < 0.75
    # One flipped item costs exactly 1/N.
    flipped = logits.copy()
    flipped[0, (logits[0].argmax() + 1) % logits.shape[1]] = logits[0].max() + 1
    assert held.score([flipped], [logits]) == pytest.approx(1 - 1 / len(logits))


def test_int8_settings_keep_the_classifier_in_fp32() -> None:
    from kiln.build.quantize import INT8_DEFAULTS

    settings = resnet50.int8_settings(SOURCE)
    assert settings.exclude_op_types == ("Gemm",)
    assert replace(settings, exclude_op_types=()) == INT8_DEFAULTS


# --- checkpoints -------------------------------------------------------------------------------
def test_load_trained_from_path_and_from_spec(
    trained: resnet50.ResNet50, held: resnet50.HeldOut, logits: np.ndarray, tmp_path: Path
) -> None:
    path = resnet50.save_checkpoint(trained, checkpoint_path(RESNET50.name, tmp_path))
    from_path = resnet50.load_trained(path)
    from_spec = resnet50.load_trained(RESNET50, artifacts=tmp_path)
    # Exact where the code guarantees it: a state_dict saved and loaded is the same bits.
    want = trained.state_dict()
    for loaded in (from_path, from_spec):
        state = loaded.state_dict()
        assert state.keys() == want.keys()
        assert all(torch.equal(state[k], want[k]) for k in want)
    # The logits of a batch of 4 are compared with the fixture's batch of all held-out images:
    # oneDNN may pick other kernels for another batch size (it does on AVX-512/AMX CPUs), so they
    # agree to float32 rounding, not bit for bit.
    x = torch.from_numpy(held.inputs[0][:4])
    with torch.inference_mode():
        for loaded in (from_path, from_spec):
            np.testing.assert_allclose(loaded(x).numpy(), logits[:4], rtol=1e-4, atol=1e-4)


def test_load_trained_without_checkpoint_says_to_build(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no trained checkpoint at .*kiln build"):
        resnet50.load_trained(RESNET50, artifacts=tmp_path)


# --- the spec ----------------------------------------------------------------------------------
def test_spec_is_valid_and_matches_the_source() -> None:
    validate([RESNET50], backends=("kiln_onnx",))
    (images,) = RESNET50.inputs
    (logits,) = RESNET50.outputs
    assert (images.name, images.dtype) == (tensors.RESNET50_IMAGES, "FP32")
    assert images.dims == (3, SOURCE.image_size, SOURCE.image_size) == (3, 224, 224)
    assert (logits.name, logits.dims) == (tensors.RESNET50_LOGITS, (SOURCE.num_classes,))
    precisions = [v.precision for v in RESNET50.build.variants]
    assert precisions == ["fp32", "fp16", "int8"]
    assert RESNET50.build.min_accuracy is None
