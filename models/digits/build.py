"""Source stage of `digits`: scikit-learn's handwritten digits and a small CNN trained on them.

The data ships inside scikit-learn (`load_digits`, 1,797 8x8 images, grey levels 0..16): nothing
is downloaded. Pixels are divided by `PIXEL_SCALE`, which defines the model's input contract
(`kiln.tensors.DIGITS_PIXELS`: FP32 [batch, 1, 8, 8] in [0, 1]); clients scale the same way.

Training is deterministic for a seed on one CPU (another instruction set gives other last digits;
see docs/results.md, "What is and is not bit-reproducible"): the weights are initialised from a forked, seeded
RNG (the caller's global RNG is left alone), batches are shuffled by a seeded generator, and
PyTorch's deterministic algorithms are on for the duration of training.

The stage interface the pipeline uses (see `kiln.build.pipeline.SourceStage`): `train`,
`save_checkpoint`, `held_out`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from kiln.build.check import HeldOut
from kiln.build.publish import load_state_dict, save_state_dict
from kiln.build.training import seeded
from kiln.spec import ModelSpec

from .spec import DigitsCNNSource

PIXEL_SCALE = 16.0
"""scikit-learn's digits have grey levels 0..16; dividing by this maps them to [0, 1]."""
IMAGE_SHAPE = (1, 8, 8)
"""Per-item input shape: one grey channel, 8x8 pixels."""
NUM_CLASSES = 10
CONV1_CHANNELS = 16
CONV2_CHANNELS = 32
HIDDEN_UNITS = 64
KERNEL_SIZE = 3
POOL_SIZE = 2
METRIC = "test accuracy"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class DigitsSplit:
    """The seeded, stratified train/test split, scaled: x float32 [N, 1, 8, 8], y int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(source: DigitsCNNSource) -> DigitsSplit:
    """Loads the digits and splits them, stratified by class, with `source.seed`.

    Args:
        source: Gives `test_fraction` and `seed`.
    """
    data = load_digits()
    x = (data.images / PIXEL_SCALE).astype(np.float32).reshape(-1, *IMAGE_SHAPE)
    y = data.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=source.test_fraction, random_state=source.seed, stratify=y
    )
    return DigitsSplit(
        np.ascontiguousarray(x_train),
        np.ascontiguousarray(y_train),
        np.ascontiguousarray(x_test),
        np.ascontiguousarray(y_test),
    )


def build_model() -> nn.Module:
    """The untrained CNN: [N, 1, 8, 8] pixels -> [N, 10] logits."""
    pooled = (IMAGE_SHAPE[1] // POOL_SIZE) * (IMAGE_SHAPE[2] // POOL_SIZE)
    padding = KERNEL_SIZE // 2
    return nn.Sequential(
        nn.Conv2d(IMAGE_SHAPE[0], CONV1_CHANNELS, KERNEL_SIZE, padding=padding),
        nn.ReLU(),
        nn.Conv2d(CONV1_CHANNELS, CONV2_CHANNELS, KERNEL_SIZE, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(POOL_SIZE),
        nn.Flatten(),
        nn.Linear(CONV2_CHANNELS * pooled, HIDDEN_UNITS),
        nn.ReLU(),
        nn.Linear(HIDDEN_UNITS, NUM_CLASSES),
    )


def train(
    source: DigitsCNNSource,
    progress: Progress | None = None,
    split: DigitsSplit | None = None,
) -> nn.Module:
    """Trains the CNN with Adam on the training split; returns it in eval mode.

    Args:
        source: Seed, epochs, batch size and learning rate.
        progress: Receives one line per epoch (epoch k/N, mean loss, train accuracy).
        split: The split to train on; loaded from `source` when None.
    """
    split = split if split is not None else load_split(source)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train)
    with seeded(source.seed, deterministic=True):
        model = build_model()
        shuffle = torch.Generator().manual_seed(source.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=source.learning_rate)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        width = len(str(source.epochs))
        for epoch in range(1, source.epochs + 1):
            order = torch.randperm(len(x), generator=shuffle)
            total_loss, correct = 0.0, 0
            for start in range(0, len(x), source.batch_size):
                idx = order[start : start + source.batch_size]
                logits = model(x[idx])
                loss = loss_fn(logits, y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(idx)
                correct += int((logits.argmax(dim=1) == y[idx]).sum())
            if progress is not None:
                progress(
                    f"epoch {epoch:>{width}}/{source.epochs}  loss {total_loss / len(x):.4f}  "
                    f"train acc {correct / len(x):.4f}"
                )
    return model.eval()


save_checkpoint = save_state_dict
"""SourceStage: saves the weights (state_dict), atomically."""


def load_trained(spec_or_path: ModelSpec | Path | str, artifacts: Path | None = None) -> nn.Module:
    """The trained CNN from its saved checkpoint, in eval mode.

    Args:
        spec_or_path: The model's spec (its checkpoint in the artifacts folder) or a checkpoint
            file.
        artifacts: The artifacts folder when a spec is given; `kiln.paths.artifacts_dir()` when
            None.

    Raises:
        FileNotFoundError: no checkpoint; run the build first.
    """
    _, state = load_state_dict(spec_or_path, artifacts)
    model = build_model()
    model.load_state_dict(state)
    return model.eval()


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Class indices for pixels `x` ([N, 1, 8, 8], scaled)."""
    with torch.inference_mode():
        return model.eval()(torch.from_numpy(np.ascontiguousarray(x))).argmax(dim=1).numpy()


def accuracy_of_logits(logits: np.ndarray, y: np.ndarray) -> float:
    """Share of items whose largest logit is the label."""
    return float(np.mean(np.argmax(logits, axis=1) == y))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """The model's accuracy on pixels `x` with labels `y`."""
    return float(np.mean(predict(model, x) == y))


def held_out(source: DigitsCNNSource) -> HeldOut:
    """The test split as check inputs, scored by accuracy on the logits; calibration inputs are
    the first `source.calibration_size` images of the training split (disjoint from the test)."""
    split = load_split(source)
    labels = split.y_test

    def score(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        return accuracy_of_logits(outputs[0], labels)

    return HeldOut(
        inputs=(split.x_test,),
        calibration=(split.x_train[: source.calibration_size],),
        metric=METRIC,
        score=score,
    )
