"""kiln_image: a Python-based Triton backend turning encoded image files into a model's input.

Selected in a model's config.pbtxt with `backend: "kiln_image"`. Tensor contract: input `image`
(BYTES [batch, 1], one JPEG or PNG file per item; grey, RGB, RGBA or palette) -> one output FP32
(or FP16) [batch, C, S, S]: the image decoded, turned upright (EXIF), converted to RGB (C 3) or
grey (C 1), resized so its shorter side is round(S / crop_fraction), center-cropped to S x S,
divided by pixel_scale and normalized with the per-channel mean and std. Dynamic batching: a whole
dynamic batch is decoded image by image and normalized in one vectorized step; a request whose
image is corrupt, truncated, too large (bytes, pixels from the header before decoding, aspect
ratio) or of another format fails alone with a message naming the image ("image 0 of the request
could not be decoded: ..."), counted by reason in kiln_step_failures_total; the other requests of
the batch are answered. The logic lives in `kiln.serving.image` (parameters: `IMAGE_PARAMS`);
this file only hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.image import load

TritonPythonModel = python_model(load)
