"""Tensor names, defined once.

The specs (and through them the repository generator), the backends and the client SDK import
these names; nothing else spells them.
"""

# digits: the CNN trained on scikit-learn's 8x8 handwritten digits.
DIGITS_PIXELS = "pixels"
"""FP32 [batch, 1, 8, 8]: grey levels scaled to [0, 1] (scikit-learn's 0..16 divided by 16)."""
DIGITS_LOGITS = "logits"
"""FP32 [batch, 10]: unnormalized class scores for the digits 0-9."""
