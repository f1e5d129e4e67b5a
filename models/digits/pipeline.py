"""digits_reader: a PNG/JPEG of a handwritten digit in, digits' top 3 classes out.

Two served steps and the ensemble:
- `digits_preprocess` (kiln_image): IMAGE -> digits' `pixels` FP32 [1, 8, 8]: grey, 8x8, /255 (an
  8x8 PNG with pixel round(v * 255 / 16) reproduces the model input v / 16 to 0.002).
- `digits_classify` (kiln_classify): digits' logits -> top 3 of the labels "0".."9".
- `digits_reader` = digits_preprocess -> digits -> digits_classify.

Batching: every step keeps a dynamic batcher at the pipeline contract's batch size (64, the
model's own max_batch_size) and forms the largest batch queued within its delay; one instance
each (see `models/resnet50/pipeline.py`).
"""

from __future__ import annotations

from kiln import tensors
from kiln.pipelines import PIXEL_SCALE, RESAMPLE, classes, classifier_ensemble, classify, image_preprocess

from .spec import SPEC as DIGITS

DIGITS_READER_MAX_BATCH = 64
"""The pipeline contract's batch size of digits_reader."""
DIGITS_TOP_K = 3
"""Classes digits_reader returns (the contract)."""

DIGITS_PREPROCESS = "digits_preprocess"
DIGITS_CLASSIFY = "digits_classify"

DIGITS_MAX_IMAGE_BYTES = 5_000_000
DIGITS_MAX_PIXELS = 16_000_000
"""digits_reader takes photographs of a digit too, up to 16 megapixels."""
DIGITS_QUEUE_DELAY_US = 500
"""digits_preprocess waits as long as the digits model does."""

DIGITS_PREPROCESS_SPEC = image_preprocess(
    DIGITS_PREPROCESS,
    DIGITS,
    DIGITS_READER_MAX_BATCH,
    DIGITS_QUEUE_DELAY_US,
    {
        "crop_fraction": "1.0",
        "pixel_scale": repr(PIXEL_SCALE),
        "mean": "0.0",
        "std": "1.0",
        "resample": RESAMPLE,
        "max_image_bytes": str(DIGITS_MAX_IMAGE_BYTES),
        "max_pixels": str(DIGITS_MAX_PIXELS),
    },
    "kiln_image: JPEG/PNG files -> digits' 8x8 grey input in [0, 1]",
)

DIGITS_CLASSIFY_SPEC = classify(
    DIGITS_CLASSIFY,
    DIGITS,
    DIGITS_READER_MAX_BATCH,
    DIGITS_TOP_K,
    [str(i) for i in range(classes(DIGITS))],
    "kiln_classify: digits logits -> top-3 of the labels 0-9, scores, indices",
)

DIGITS_READER = classifier_ensemble(
    tensors.DIGITS_READER,
    DIGITS_PREPROCESS_SPEC,
    DIGITS.name,
    DIGITS_CLASSIFY_SPEC,
    DIGITS_TOP_K,
    DIGITS_READER_MAX_BATCH,
    "image of a handwritten digit -> digits_preprocess -> digits (FP32) -> digits_classify -> top 3",
    # Fused: the faster form here. `make bench`'s forms table (`python -m benchmarks.run --only 7
    # --repeats 3 --forms digits_reader`, perf_analyzer gRPC, medians of 3; 2-core AMD EPYC,
    # 2026-12-04): p50 at concurrency 1 1.11 ms fused vs 3.91 ms ensemble (floor 0.48 ms);
    # 2,737 vs 2,008 requests/s at 16.
    form="fused",
)

SPECS = (DIGITS_PREPROCESS_SPEC, DIGITS_CLASSIFY_SPEC, DIGITS_READER)
"""The digits_reader pipeline: its two processing steps and the pipeline (fused)."""
