"""image_classifier's load test: its request mix and its service levels.

The mix: scikit-image's bundled photographs (nothing is downloaded) at several sizes (a 128 px
thumbnail to a 2-megapixel scan) and colour modes (grey, RGB, RGBA), encoded as JPEG and PNG, as
clients upload them. `image_classifier_int8` is load-tested with the same suite and service level.
"""

from __future__ import annotations

import io

import numpy as np

from kiln import tensors
from loadtests.inputs import Corpus, Item, classifier_reference, encode_image, image_mode, object_array
from loadtests.slo import SMOKE_LOAD, Gates, Load, PipelineSLO

PHOTOS: tuple[tuple[str, str, int | None], ...] = (
    # (skimage.data name, file format, longer side after resizing or None to keep it)
    ("astronaut", "JPEG", None),  # 512x512 RGB
    ("coffee", "JPEG", None),  # 400x600 RGB
    ("chelsea", "PNG", None),  # 300x451 RGB
    ("camera", "JPEG", None),  # 512x512 grey
    ("coins", "PNG", None),  # 303x384 grey
    ("rocket", "JPEG", 160),  # a 160x107 RGB thumbnail
    ("hubble_deep_field", "JPEG", None),  # 872x1000 RGB
    ("retina", "JPEG", None),  # 1411x1411 RGB, about 2 megapixels
    ("logo", "PNG", None),  # 500x500 RGBA
    ("immunohistochemistry", "PNG", 256),  # 256x256 RGB
)
"""The image mix: 10 files, 4 sizes classes, grey/RGB/RGBA, JPEG and PNG."""

SLOS = {
    tensors.IMAGE_CLASSIFIER: PipelineSLO(
        tensors.IMAGE_CLASSIFIER,
        gates={
            # ResNet-50 FP32 (~4 GFLOPs an image) on 2 cores: ~10-20 images/s saturated; 8 users
            # queue ~0.5 s of work ahead of each request.
            "full": Gates(p95_ms=2000, p99_ms=3000, max_failure_ratio=0.001, min_rps=4),
            "smoke": Gates(p95_ms=15000, p99_ms=20000, max_failure_ratio=0.0, min_rps=0.2),
        },
        load={
            "full": Load(
                users=8,
                duration_s=60,
                step_users=(1, 2, 4, 8, 16, 32),
                step_s=15,
                spike_users=(4, 32),
                spike_s=(15, 15, 20),
                settle_s=5,
            ),
            "smoke": SMOKE_LOAD,
        },
    ),
}
ALIASES = {tensors.IMAGE_CLASSIFIER_INT8: tensors.IMAGE_CLASSIFIER}
"""`image_classifier_int8` shares image_classifier's entry (the same contract; its suite is run
with `--model image_classifier_int8`)."""


def photographs() -> list[tuple[str, bytes]]:
    """The image mix: (description, encoded file) for each entry of PHOTOS."""
    import skimage.data
    from PIL import Image

    files = []
    for name, fmt, longer in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        data = encode_image(pixels, fmt, longer)
        with Image.open(io.BytesIO(data)) as decoded:
            width, height = decoded.size
        extension = {"JPEG": "jpg", "PNG": "png"}[fmt]
        files.append((f"{name}.{extension} {height}x{width} {image_mode(pixels)}", data))
    return files


def corpus(model: str, reference: bool = True) -> Corpus:
    """The photograph mix for `model` (image_classifier or image_classifier_int8)."""
    mix = Corpus(model, [Item(name, {tensors.IMAGE: object_array([data])}) for name, data in photographs()])
    if reference:
        classifier_reference(mix)
    return mix
