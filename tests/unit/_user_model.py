"""Factories of a "user's" PyTorch models for the user-source tests (imported by
`CheckpointSource.factory` strings such as "_user_model:make_classifier").

Not a test module: the leading underscore keeps pytest from collecting it.
"""

from __future__ import annotations

import torch
from torch import nn

FEATURES = 4
"""Per-item input: FP32 [FEATURES]."""
CLASSES = 3
"""Per-item output of the classifier: FP32 [CLASSES] class scores."""
HIDDEN = 8
SEED = 0

NOT_CALLABLE = 42
"""A factory string may name an attribute that is no function."""


class TinyClassifier(nn.Module):
    """x [N, FEATURES] -> class scores [N, CLASSES]."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(FEATURES, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x)))


def make_classifier() -> nn.Module:
    """The untrained classifier (weights from the caller's RNG, as a user's factory would)."""
    return TinyClassifier()


def make_wider_classifier() -> nn.Module:
    """A classifier whose hidden layer is twice as wide: its shapes do not fit the checkpoint."""
    model = TinyClassifier()
    model.hidden = nn.Linear(FEATURES, 2 * HIDDEN)
    model.head = nn.Linear(2 * HIDDEN, CLASSES)
    return model


def make_not_a_module() -> dict[str, int]:
    """Returns something that is not an nn.Module."""
    return {"hidden": HIDDEN}


def make_needing_arguments(width: int) -> nn.Module:
    """A factory kiln cannot call: it requires an argument."""
    return nn.Linear(FEATURES, width)
