"""A user's own PyTorch code: MTCNN's output network (ONet), as facenet-pytorch defines it.

facenet-pytorch 2.6.0 ships the trained weights (`facenet_pytorch/data/onet.pt`, a state_dict) but
cannot be imported without torchvision, so this module copies the architecture; `make_onet` is the
factory `kiln add --factory onet:make_onet --checkpoint .../onet.pt` names (it returns the module
untrained: kiln loads the checkpoint into it).

ONet takes 48x48 RGB face candidates, NCHW, scaled as MTCNN scales them (`standardize`), and
returns three outputs per item: the box regression (4 values), five landmarks (10 values: x1..x5,
y1..y5, as fractions of the candidate box) and the face probability (2 values, softmax: not a
face, a face).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

SIDE = 48
"""ONet's input: 48x48 pixels."""
PACKAGE = "facenet_pytorch"
WEIGHTS = "data/onet.pt"


class ONet(nn.Module):
    """MTCNN's ONet (facenet_pytorch.models.mtcnn.ONet, without its weight loading)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()  # MTCNN's weights were trained on transposed images
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        a = self.softmax6_1(self.dense6_1(x))
        b = self.dense6_2(x)
        c = self.dense6_3(x)
        return b, c, a


def make_onet() -> nn.Module:
    """The factory kiln calls: an untrained ONet (kiln loads the checkpoint into it)."""
    return ONet()


def weights_path() -> Path:
    """facenet-pytorch's onet.pt, found without importing the package (it needs torchvision)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install --no-deps facenet-pytorch==2.6.0")
    return Path(spec.submodule_search_locations[0]) / WEIGHTS


def standardize(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB crops [N, 48, 48, 3] -> ONet's input float32 [N, 3, 48, 48], scaled as MTCNN
    does: (x - 127.5) * 0.0078125."""
    x = (np.asarray(pixels, dtype=np.float32) - 127.5) * 0.0078125
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
