"""digits_reader's request mix: scikit-learn's handwritten digits, rendered as 8x8 grey PNG files.

No service level of its own (`make loadtest` covers the three main pipelines); the benchmarks send
this mix.
"""

from __future__ import annotations

import numpy as np

from kiln import tensors
from loadtests.inputs import Corpus, Item, classifier_reference, encode_image, object_array

DIGITS_IMAGES = 64
"""Digits in the digits_reader mix (the first of the data set, every class several times)."""
DIGIT_LEVELS = 16
"""scikit-learn's digits hold grey levels 0..16; a PNG holds 0..255."""


def digit_pngs(count: int = DIGITS_IMAGES) -> list[tuple[str, bytes, int]]:
    """(description, 8x8 grey PNG, true digit) for the first `count` scikit-learn digits."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    scale = 255.0 / DIGIT_LEVELS
    out = []
    for index in range(min(count, len(digits.images))):
        pixels = np.clip(np.rint(digits.images[index] * scale), 0, 255).astype(np.uint8)
        out.append(
            (
                f"digit #{index} ({digits.target[index]}) 8x8 PNG",
                encode_image(pixels, "PNG"),
                int(digits.target[index]),
            )
        )
    return out


def corpus(model: str, reference: bool = True) -> Corpus:
    """The digits_reader mix, with the in-process pipeline's top classes when `reference`."""
    mix = Corpus(model, [Item(name, {tensors.IMAGE: object_array([data])}) for name, data, _ in digit_pngs()])
    if reference:
        classifier_reference(mix)
    return mix
