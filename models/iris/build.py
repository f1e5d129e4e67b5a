"""Source stage of `iris`: scikit-learn's iris flowers and an MLP trained on them.

The pipeline calls `train`, `save_checkpoint` and `held_out` (`kiln.build.pipeline.SourceStage`).
The model standardizes its own input (the training split's mean and std are buffers of its first
layer), so clients send raw centimetres.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch import nn

from kiln.build.check import HeldOut
from kiln.build.publish import save_state_dict
from kiln.build.training import seeded

from .spec import IrisMLPSource

FEATURES = 4
CLASSES = 3


@dataclass(frozen=True)
class IrisSplit:
    """The seeded, stratified split: x float32 [N, 4] in centimetres, y int64 [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_split(source: IrisMLPSource) -> IrisSplit:
    """The split `source` describes (the same for every build with the same seed)."""
    data = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data.astype(np.float32), data.target.astype(np.int64),
        test_size=source.test_fraction, random_state=source.seed, stratify=data.target,
    )
    return IrisSplit(x_train, y_train, x_test, y_test)


class Standardize(nn.Module):
    """(x - mean) / std with the training split's statistics, kept in the model."""

    def __init__(self, x: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(x.mean(axis=0)))
        self.register_buffer("std", torch.from_numpy(x.std(axis=0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train(source: IrisMLPSource, progress: Callable[[str], None] | None = None) -> nn.Module:
    """Trains the MLP with Adam, full batch; returns it in eval mode."""
    split = load_split(source)
    x, y = torch.from_numpy(split.x_train), torch.from_numpy(split.y_train)
    with seeded(source.seed, deterministic=True):
        model = nn.Sequential(
            Standardize(split.x_train),
            nn.Linear(FEATURES, source.hidden),
            nn.ReLU(),
            nn.Linear(source.hidden, CLASSES),
        )
        optimizer = torch.optim.Adam(model.parameters(), lr=source.learning_rate)
        loss_fn = nn.CrossEntropyLoss()
        model.train()
        for epoch in range(1, source.epochs + 1):
            logits = model(x)
            loss = loss_fn(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if progress is not None and (epoch % 100 == 0 or epoch == source.epochs):
                accuracy = float((logits.argmax(dim=1) == y).float().mean())
                progress(f"epoch {epoch}/{source.epochs}  loss {loss.item():.4f}  train acc {accuracy:.4f}")
    return model.eval()


save_checkpoint = save_state_dict
"""Saves the weights (state_dict), atomically."""


def held_out(source: IrisMLPSource) -> HeldOut:
    """The test split, scored by accuracy; INT8 calibrates on the training split."""
    split = load_split(source)

    def score(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        return float(np.mean(np.argmax(outputs[0], axis=1) == split.y_test))

    return HeldOut(
        inputs=(split.x_test,), calibration=(split.x_train,), metric="test accuracy", score=score
    )
