"""image_classifier and image_classifier_int8: image files in, resnet50's top 5 classes out.

Two served steps and two pipelines (fused: each one kiln_fused model running the three steps in one
process; `PIPELINE_FORM`):
- `resnet50_preprocess` (kiln_image): IMAGE BYTES [1] -> resnet50's `images` FP32 [3, 224, 224]:
  RGB, shorter side resized to round(224 / 0.875) = 256 with Pillow's bilinear filter, center
  crop, /255, ImageNet mean and std (`kiln.models.resnet50.build.preprocess`, bit for bit). JPEGs
  are decoded in draft mode (DCT-domain downscale: the step ran 2.4x faster for full-HD
  photographs, 3.4x for 12 megapixels here, benchmarks/image_decode.py); the reference pipeline
  decodes the same way.
- `resnet50_classify` (kiln_classify): resnet50's logits -> top 5 labels, scores, class indices.
  The weights are seeded (no ImageNet meaning), so the labels are "class_0000".."class_0999".
- `image_classifier` = resnet50_preprocess -> resnet50 -> resnet50_classify; `image_classifier_int8`
  the same on resnet50_int8.

Sizes (channels, image size, classes) come from the model's spec. Batching: every step keeps a
dynamic batcher at the pipeline contract's batch size (16, the model's own max_batch_size); the
steps form the largest batch that is queued within their delay (no preferred sizes: decoding is
per image, so a bigger batch costs nothing but the wait). One instance each: on 2 cores the model
step (2 ONNX Runtime threads) is the bottleneck, and a second decoder instance would only compete
with it for the same cores.
"""

from __future__ import annotations

from kiln import tensors
from kiln.pipelines import (
    PIXEL_SCALE,
    RESAMPLE,
    classes,
    classifier_ensemble,
    classify,
    floats,
    image_preprocess,
)
from kiln.spec import served_name

from .spec import SPEC as RESNET50

IMAGE_CLASSIFIER_MAX_BATCH = 16
"""The pipeline contract's batch size of image_classifier and image_classifier_int8."""
IMAGE_TOP_K = 5
"""Classes image_classifier returns (the contract)."""

RESNET50_PREPROCESS = "resnet50_preprocess"
RESNET50_CLASSIFY = "resnet50_classify"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""resnet50's input normalization (kiln.models.resnet50.build.IMAGENET_MEAN; a unit test checks
they agree: the spec modules import no torch, so the build's module is not imported here)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""kiln.models.resnet50.build.IMAGENET_STD."""
RESNET50_CROP_FRACTION = 0.875
"""kiln.models.resnet50.build.CENTER_CROP_FRACTION: 224 of 256."""
LABEL_DIGITS = 4
"""Digits of resnet50's class labels: class_0000 .. class_0999."""

RESNET50_MAX_IMAGE_BYTES = 25_000_000
"""Largest accepted file: a 48-megapixel JPEG at high quality is about 20 MB."""
RESNET50_MAX_PIXELS = 50_000_000
"""Largest accepted width x height (a 48-megapixel photograph passes); read from the header, so a
decompression bomb is rejected before a byte of it is decoded."""
RESNET50_QUEUE_DELAY_US = 1000
"""How long resnet50_preprocess waits for other requests to join a batch (decoding an image takes
milliseconds, the model tens of them)."""

PIPELINE_FORM = "fused"
"""Both pipelines' form: fused, the faster here. `make bench`'s forms table (`python -m
benchmarks.run --only 7 --repeats 3 [--forms image_classifier]`, perf_analyzer gRPC, medians of
3; 2-core AMD EPYC, 2026-12-04): image_classifier_int8 p50 at concurrency 1 19.8 ms fused vs
23.5 ms ensemble, 64.3 vs 62.0 images/s at 16; image_classifier (FP32) 49.3 vs 53.2 ms, 23.0 vs
18.8 images/s. The model's compute dominates either way; fused saves the two extra hops and
copies of a 600 KB tensor per image. The ensemble form would let the decoder scale apart from
the model (e.g. on more cores, or the model on a GPU)."""

RESNET50_PREPROCESS_SPEC = image_preprocess(
    RESNET50_PREPROCESS,
    RESNET50,
    IMAGE_CLASSIFIER_MAX_BATCH,
    RESNET50_QUEUE_DELAY_US,
    {
        "crop_fraction": repr(RESNET50_CROP_FRACTION),
        "pixel_scale": repr(PIXEL_SCALE),
        "mean": floats(IMAGENET_MEAN),
        "std": floats(IMAGENET_STD),
        "resample": RESAMPLE,
        "jpeg_draft": "true",
        "max_image_bytes": str(RESNET50_MAX_IMAGE_BYTES),
        "max_pixels": str(RESNET50_MAX_PIXELS),
    },
    "kiln_image: JPEG/PNG files -> resnet50's normalized RGB input (JPEG draft decoding)",
)

RESNET50_CLASSIFY_SPEC = classify(
    RESNET50_CLASSIFY,
    RESNET50,
    IMAGE_CLASSIFIER_MAX_BATCH,
    IMAGE_TOP_K,
    [f"class_{i:0{LABEL_DIGITS}d}" for i in range(classes(RESNET50))],
    "kiln_classify: resnet50 logits -> top-5 labels (class_NNNN: seeded weights), scores, indices",
)

IMAGE_CLASSIFIER = classifier_ensemble(
    tensors.IMAGE_CLASSIFIER,
    RESNET50_PREPROCESS_SPEC,
    RESNET50.name,
    RESNET50_CLASSIFY_SPEC,
    IMAGE_TOP_K,
    IMAGE_CLASSIFIER_MAX_BATCH,
    "image file -> resnet50_preprocess -> resnet50 (FP32) -> resnet50_classify -> top 5",
    form=PIPELINE_FORM,
)

IMAGE_CLASSIFIER_INT8 = classifier_ensemble(
    tensors.IMAGE_CLASSIFIER_INT8,
    RESNET50_PREPROCESS_SPEC,
    served_name(RESNET50.name, "int8"),
    RESNET50_CLASSIFY_SPEC,
    IMAGE_TOP_K,
    IMAGE_CLASSIFIER_MAX_BATCH,
    "image file -> resnet50_preprocess -> resnet50_int8 -> resnet50_classify -> top 5",
    form=PIPELINE_FORM,
)

SPECS = (RESNET50_PREPROCESS_SPEC, RESNET50_CLASSIFY_SPEC, IMAGE_CLASSIFIER, IMAGE_CLASSIFIER_INT8)
"""The image classifier pipelines: their two processing steps and the two pipelines (fused)."""
