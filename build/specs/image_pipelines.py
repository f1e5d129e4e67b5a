"""image_classifier, image_classifier_int8 and digits_reader: image files in, top-k classes out.

Four served steps and three ensembles:
- `resnet50_preprocess` (kiln_image): IMAGE BYTES [1] -> resnet50's `images` FP32 [3, 224, 224]:
  RGB, shorter side resized to round(224 / 0.875) = 256 with Pillow's bilinear filter, center
  crop, /255, ImageNet mean and std (`kiln.build.resnet50.preprocess`, bit for bit). JPEGs are
  decoded in draft mode (DCT-domain downscale: the step ran 2.4x faster for full-HD photographs,
  3.4x for 12 megapixels here, benchmarks/image_decode.py); the reference pipeline decodes the same way.
- `resnet50_classify` (kiln_classify): resnet50's logits -> top 5 labels, scores, class indices.
  The weights are seeded (no ImageNet meaning), so the labels are "class_0000".."class_0999".
- `digits_preprocess` (kiln_image): IMAGE -> digits' `pixels` FP32 [1, 8, 8]: grey, 8x8, /255 (an
  8x8 PNG with pixel round(v * 255 / 16) reproduces the model input v / 16 to 0.002).
- `digits_classify` (kiln_classify): digits' logits -> top 3 of the labels "0".."9".
- `image_classifier` = resnet50_preprocess -> resnet50 -> resnet50_classify; `image_classifier_int8`
  the same on resnet50_int8; `digits_reader` = digits_preprocess -> digits -> digits_classify.

Sizes (channels, image size, classes) come from the built models' specs. Batching: every step
keeps a dynamic batcher at the pipeline contract's batch size (16 for the image classifiers, 64 for
digits_reader, which the models' own max_batch_size equals); the steps form the largest batch that
is queued within their delay (no preferred sizes: decoding is per image, so a bigger batch costs
nothing but the wait). One instance each: on 2 cores the model step (2 ONNX Runtime threads) is
the bottleneck, and a second decoder instance would only compete with it for the same cores.
"""

from __future__ import annotations

from kiln import tensors
from kiln.build.specs.digits import SPEC as DIGITS
from kiln.build.specs.resnet50 import SPEC as RESNET50
from kiln.spec import (
    DynamicBatching,
    EnsembleSpec,
    EnsembleStep,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    served_name,
)

IMAGE_CLASSIFIER_MAX_BATCH = 16
"""The pipeline contract's batch size of image_classifier and image_classifier_int8."""
DIGITS_READER_MAX_BATCH = 64
"""The pipeline contract's batch size of digits_reader."""
IMAGE_TOP_K = 5
"""Classes image_classifier returns (the contract)."""
DIGITS_TOP_K = 3
"""Classes digits_reader returns (the contract)."""

RESNET50_PREPROCESS = "resnet50_preprocess"
RESNET50_CLASSIFY = "resnet50_classify"
DIGITS_PREPROCESS = "digits_preprocess"
DIGITS_CLASSIFY = "digits_classify"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""resnet50's input normalization (kiln.build.resnet50.IMAGENET_MEAN; a unit test checks they
agree: the spec modules import no torch, so the build's module is not imported here)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""kiln.build.resnet50.IMAGENET_STD."""
RESNET50_CROP_FRACTION = 0.875
"""kiln.build.resnet50.CENTER_CROP_FRACTION: 224 of 256."""
PIXEL_SCALE = 255.0
"""8-bit pixels to [0, 1], for both models (digits' 0..16 grey levels become PNG levels 0..255)."""
RESAMPLE = "bilinear"
"""kiln.build.resnet50.RESAMPLE (Pillow's bilinear)."""
LABEL_DIGITS = 4
"""Digits of resnet50's class labels: class_0000 .. class_0999."""

RESNET50_MAX_IMAGE_BYTES = 25_000_000
"""Largest accepted file: a 48-megapixel JPEG at high quality is about 20 MB."""
RESNET50_MAX_PIXELS = 50_000_000
"""Largest accepted width x height (a 48-megapixel photograph passes); read from the header, so a
decompression bomb is rejected before a byte of it is decoded."""
DIGITS_MAX_IMAGE_BYTES = 5_000_000
DIGITS_MAX_PIXELS = 16_000_000
"""digits_reader takes photographs of a digit too, up to 16 megapixels."""
RESNET50_QUEUE_DELAY_US = 1000
"""How long resnet50_preprocess waits for other requests to join a batch (decoding an image takes
milliseconds, the model tens of them)."""
DIGITS_QUEUE_DELAY_US = 500
"""digits_preprocess waits as long as the digits model does."""
CLASSIFY_QUEUE_DELAY_US = 100
"""The classify steps are microseconds of work: they only gather what arrives together."""


def _image_size(model: ModelSpec) -> tuple[int, int]:
    """(channels, side) of an image model's single [C, S, S] input."""
    channels, height, width = model.inputs[0].dims
    if height != width:
        raise ValueError(
            f"model {model.name!r}: kiln_image makes square crops, the input is {height}x{width}"
        )
    return channels, height


def _floats(values: tuple[float, ...]) -> str:
    return ",".join(repr(v) for v in values)


def _classes(model: ModelSpec) -> int:
    return model.outputs[0].dims[0]


def _preprocess(
    name: str,
    model: ModelSpec,
    max_batch: int,
    delay_us: int,
    parameters: dict[str, str],
    description: str,
) -> ModelSpec:
    channels, side = _image_size(model)
    return ModelSpec(
        name=name,
        description=description,
        backend="kiln_image",
        inputs=(TensorSpec(tensors.IMAGE, "BYTES", (1,)),),
        outputs=(TensorSpec(model.inputs[0].name, model.inputs[0].dtype, model.inputs[0].dims),),
        max_batch_size=max_batch,
        dynamic_batching=DynamicBatching(max_queue_delay_us=delay_us),
        instance_groups=(InstanceGroup(kind="CPU", count=1),),
        parameters={"channels": str(channels), "image_size": str(side), **parameters},
    )


def _classify(
    name: str, model: ModelSpec, max_batch: int, k: int, labels: list[str], description: str
) -> ModelSpec:
    if len(labels) != _classes(model):
        raise ValueError(f"model {name!r}: {len(labels)} labels for {_classes(model)} classes")
    return ModelSpec(
        name=name,
        description=description,
        backend="kiln_classify",
        inputs=(TensorSpec(model.outputs[0].name, model.outputs[0].dtype, model.outputs[0].dims),),
        outputs=(
            TensorSpec(tensors.LABELS, "BYTES", (k,)),
            TensorSpec(tensors.SCORES, "FP32", (k,)),
            TensorSpec(tensors.CLASS_INDICES, "INT64", (k,)),
        ),
        max_batch_size=max_batch,
        dynamic_batching=DynamicBatching(max_queue_delay_us=CLASSIFY_QUEUE_DELAY_US),
        instance_groups=(InstanceGroup(kind="CPU", count=1),),
        parameters={"top_k": str(k), "labels_file": "labels.txt", "apply_softmax": "true"},
        files={"labels.txt": "".join(f"{label}\n" for label in labels)},
    )


def _ensemble(
    name: str,
    preprocess: ModelSpec,
    model: str,
    classify: ModelSpec,
    k: int,
    max_batch: int,
    description: str,
) -> EnsembleSpec:
    images, logits = preprocess.outputs[0].name, classify.inputs[0].name
    answers = {t: t for t in (tensors.LABELS, tensors.SCORES, tensors.CLASS_INDICES)}
    return EnsembleSpec(
        name=name,
        description=description,
        inputs=(TensorSpec(tensors.IMAGE, "BYTES", (1,)),),
        outputs=(
            TensorSpec(tensors.LABELS, "BYTES", (k,)),
            TensorSpec(tensors.SCORES, "FP32", (k,)),
            TensorSpec(tensors.CLASS_INDICES, "INT64", (k,)),
        ),
        steps=(
            EnsembleStep(preprocess.name, inputs={tensors.IMAGE: tensors.IMAGE}, outputs={images: images}),
            EnsembleStep(model, inputs={images: images}, outputs={logits: logits}),
            EnsembleStep(classify.name, inputs={logits: logits}, outputs=answers),
        ),
        max_batch_size=max_batch,
    )


RESNET50_PREPROCESS_SPEC = _preprocess(
    RESNET50_PREPROCESS,
    RESNET50,
    IMAGE_CLASSIFIER_MAX_BATCH,
    RESNET50_QUEUE_DELAY_US,
    {
        "crop_fraction": repr(RESNET50_CROP_FRACTION),
        "pixel_scale": repr(PIXEL_SCALE),
        "mean": _floats(IMAGENET_MEAN),
        "std": _floats(IMAGENET_STD),
        "resample": RESAMPLE,
        "jpeg_draft": "true",
        "max_image_bytes": str(RESNET50_MAX_IMAGE_BYTES),
        "max_pixels": str(RESNET50_MAX_PIXELS),
    },
    "kiln_image: JPEG/PNG files -> resnet50's normalized RGB input (JPEG draft decoding)",
)

RESNET50_CLASSIFY_SPEC = _classify(
    RESNET50_CLASSIFY,
    RESNET50,
    IMAGE_CLASSIFIER_MAX_BATCH,
    IMAGE_TOP_K,
    [f"class_{i:0{LABEL_DIGITS}d}" for i in range(_classes(RESNET50))],
    "kiln_classify: resnet50 logits -> top-5 labels (class_NNNN: seeded weights), scores, indices",
)

DIGITS_PREPROCESS_SPEC = _preprocess(
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

DIGITS_CLASSIFY_SPEC = _classify(
    DIGITS_CLASSIFY,
    DIGITS,
    DIGITS_READER_MAX_BATCH,
    DIGITS_TOP_K,
    [str(i) for i in range(_classes(DIGITS))],
    "kiln_classify: digits logits -> top-3 of the labels 0-9, scores, indices",
)

IMAGE_CLASSIFIER = _ensemble(
    tensors.IMAGE_CLASSIFIER,
    RESNET50_PREPROCESS_SPEC,
    RESNET50.name,
    RESNET50_CLASSIFY_SPEC,
    IMAGE_TOP_K,
    IMAGE_CLASSIFIER_MAX_BATCH,
    "image file -> resnet50_preprocess -> resnet50 (FP32) -> resnet50_classify -> top 5",
)

IMAGE_CLASSIFIER_INT8 = _ensemble(
    tensors.IMAGE_CLASSIFIER_INT8,
    RESNET50_PREPROCESS_SPEC,
    served_name(RESNET50.name, "int8"),
    RESNET50_CLASSIFY_SPEC,
    IMAGE_TOP_K,
    IMAGE_CLASSIFIER_MAX_BATCH,
    "image file -> resnet50_preprocess -> resnet50_int8 -> resnet50_classify -> top 5",
)

DIGITS_READER = _ensemble(
    tensors.DIGITS_READER,
    DIGITS_PREPROCESS_SPEC,
    DIGITS.name,
    DIGITS_CLASSIFY_SPEC,
    DIGITS_TOP_K,
    DIGITS_READER_MAX_BATCH,
    "image of a handwritten digit -> digits_preprocess -> digits (FP32) -> digits_classify -> top 3",
)

SPECS = (
    RESNET50_PREPROCESS_SPEC,
    RESNET50_CLASSIFY_SPEC,
    DIGITS_PREPROCESS_SPEC,
    DIGITS_CLASSIFY_SPEC,
    IMAGE_CLASSIFIER,
    IMAGE_CLASSIFIER_INT8,
    DIGITS_READER,
)
"""The image pipelines: their four processing steps and the three ensembles."""
