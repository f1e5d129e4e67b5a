"""Pipeline building blocks: the processing steps and ensembles a model folder wires around its
model, written once so that a new image classifier is a few lines of its `pipeline.py`.

`image_preprocess` (kiln_image: image file bytes -> the model's [C, S, S] input), `classify`
(kiln_classify: logits -> top-k labels, scores, class indices) and `classifier_ensemble` (the two
around a served model). `models/resnet50/pipeline.py` and `models/digits/pipeline.py` use them.

Detectors: `letterbox_preprocess` (kiln_image in letterbox mode, also outputting the transform
back to the original image), `detect` (kiln_detect: a YOLO-style raw head -> boxes in the original
image's pixels after NMS), `detector_ensemble`, and `detector_pipeline`, which makes all three
around a detector's spec. Their tensor names are defined here (LETTERBOX, BOXES, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from kiln import tensors
from kiln.spec import DynamicBatching, EnsembleSpec, EnsembleStep, Fused, InstanceGroup, ModelSpec, TensorSpec

PIXEL_SCALE = 255.0
"""8-bit pixels to [0, 1]."""
RESAMPLE = "bilinear"
"""Pillow's bilinear filter (what the models were evaluated with)."""
CLASSIFY_QUEUE_DELAY_US = 100
"""The classify steps are microseconds of work: they only gather what arrives together."""


def image_size(model: ModelSpec) -> tuple[int, int]:
    """(channels, side) of an image model's single [C, S, S] input."""
    channels, height, width = model.inputs[0].dims
    if height != width:
        raise ValueError(
            f"model {model.name!r}: kiln_image makes square crops, the input is {height}x{width}"
        )
    return channels, height


def floats(values: tuple[float, ...]) -> str:
    """A tuple of floats as a kiln_image parameter value ("0.485,0.456,0.406")."""
    return ",".join(repr(v) for v in values)


def classes(model: ModelSpec) -> int:
    """Classes of a classifier: its first output's only dim."""
    return model.outputs[0].dims[0]


def image_preprocess(
    name: str,
    model: ModelSpec,
    max_batch: int,
    delay_us: int,
    parameters: dict[str, str],
    description: str,
) -> ModelSpec:
    """A kiln_image step: IMAGE BYTES [1] -> `model`'s image input."""
    channels, side = image_size(model)
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


def classify(
    name: str, model: ModelSpec, max_batch: int, k: int, labels: list[str], description: str
) -> ModelSpec:
    """A kiln_classify step: `model`'s logits -> the top `k` of `labels` (one per class)."""
    if len(labels) != classes(model):
        raise ValueError(f"model {name!r}: {len(labels)} labels for {classes(model)} classes")
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


def classifier_ensemble(
    name: str,
    preprocess: ModelSpec,
    model: str,
    classify_step: ModelSpec,
    k: int,
    max_batch: int,
    description: str,
    form: str = "ensemble",
    fused: Fused | None = None,
) -> EnsembleSpec:
    """IMAGE -> `preprocess` -> served model `model` -> `classify_step` -> labels, scores, indices,
    served in `form` ("ensemble" or "fused", with `fused`'s batcher and instances; default
    `Fused()`)."""
    images, logits = preprocess.outputs[0].name, classify_step.inputs[0].name
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
            EnsembleStep(classify_step.name, inputs={logits: logits}, outputs=answers),
        ),
        max_batch_size=max_batch,
        form=form,
        fused=fused or Fused(),
    )


# -- detectors ------------------------------------------------------------------------------------

LETTERBOX = "letterbox"
"""FP32 [batch, 6]: per image, the transform from the model input's pixels back to the original
image's: scale_x, scale_y, pad_x, pad_y, width, height (`x = (x_model - pad_x) / scale_x`)."""
BOXES = "boxes"
"""FP32 [batch, max_detections, 4]: x1, y1, x2, y2 in the original image's pixels, clipped to it;
rows beyond DETECTION_COUNT are zeros."""
DETECTION_SCORES = "scores"
"""FP32 [batch, max_detections]: each detection's class score, descending (0 in the padding)."""
DETECTION_CLASSES = "classes"
"""INT64 [batch, max_detections]: each detection's class index (-1 in the padding)."""
DETECTION_LABELS = "labels"
"""BYTES [batch, max_detections]: each detection's label, UTF-8 (empty in the padding)."""
DETECTION_COUNT = "count"
"""INT32 [batch, 1]: how many rows of the other outputs are real detections."""
DETECTION_OUTPUTS = (BOXES, DETECTION_SCORES, DETECTION_CLASSES, DETECTION_LABELS, DETECTION_COUNT)

TRANSFORM_SIZE = 6
"""Values of the LETTERBOX transform (kiln.serving.image.TRANSFORM_FIELDS)."""
BOX_VALUES = 4
YOLO_PAD_VALUE = 114
"""YOLO's letterbox grey level."""
DETECT_LAYOUTS = ("attributes_first", "candidates_first")
"""kiln_detect's head layouts: [4 + classes, candidates] (YOLOv8) or its transpose."""
DETECTOR_QUEUE_DELAY_US = 1000
"""How long a detector's preprocessing step waits for other requests (decoding takes milliseconds)."""
DETECT_QUEUE_DELAY_US = 100
"""kiln_detect is sub-millisecond work per item: it only gathers what arrives together."""


def head_classes(model: ModelSpec, layout: str = "attributes_first") -> int:
    """Classes of a detector: its first output [4 + classes, candidates] (or, candidates_first,
    [candidates, 4 + classes]) less the 4 box values."""
    if layout not in DETECT_LAYOUTS:
        raise ValueError(
            f"model {model.name!r}: layout must be one of {', '.join(DETECT_LAYOUTS)}, got {layout!r}"
        )
    dims = model.outputs[0].dims
    if len(dims) != 2:
        raise ValueError(
            f"model {model.name!r}: a detector's first output must have two dims, got {list(dims)}"
        )
    attributes = dims[0] if layout == "attributes_first" else dims[1]
    if attributes < BOX_VALUES + 1:
        raise ValueError(
            f"model {model.name!r}: output {model.outputs[0].name!r} {list(dims)} holds no class "
            f"scores in layout {layout} (needs 4 + classes >= 5 attributes)"
        )
    return attributes - BOX_VALUES


def letterbox_preprocess(
    name: str,
    model: ModelSpec,
    max_batch: int,
    delay_us: int,
    parameters: Mapping[str, str],
    description: str,
) -> ModelSpec:
    """A kiln_image step in letterbox mode: IMAGE BYTES [1] -> `model`'s image input and LETTERBOX
    FP32 [6] (pad_value 114 unless `parameters` say otherwise)."""
    spec = image_preprocess(
        name, model, max_batch, delay_us,
        {"resize_mode": "letterbox", "pad_value": str(YOLO_PAD_VALUE), **parameters}, description,
    )
    transform = TensorSpec(LETTERBOX, "FP32", (TRANSFORM_SIZE,))
    return dataclasses.replace(spec, outputs=(*spec.outputs, transform))


def detect(
    name: str,
    model: ModelSpec,
    max_batch: int,
    labels: Sequence[str],
    description: str,
    *,
    layout: str = "attributes_first",
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    classes: Sequence[int] = (),
    class_agnostic: bool = False,
) -> ModelSpec:
    """A kiln_detect step: `model`'s raw head and LETTERBOX -> BOXES, DETECTION_SCORES,
    DETECTION_CLASSES, DETECTION_LABELS (from `labels`, one per class), DETECTION_COUNT."""
    count = head_classes(model, layout)
    if len(labels) != count:
        raise ValueError(f"model {name!r}: {len(labels)} labels for {count} classes")
    head = model.outputs[0]
    parameters = {
        "layout": layout,
        "score_threshold": repr(float(score_threshold)),
        "iou_threshold": repr(float(iou_threshold)),
        "max_detections": str(max_detections),
        "class_agnostic": "true" if class_agnostic else "false",
        "labels_file": "labels.txt",
    }
    if classes:
        parameters["classes"] = ",".join(str(int(c)) for c in classes)
    return ModelSpec(
        name=name,
        description=description,
        backend="kiln_detect",
        inputs=(
            TensorSpec(head.name, head.dtype, head.dims),
            TensorSpec(LETTERBOX, "FP32", (TRANSFORM_SIZE,)),
        ),
        outputs=_detection_outputs(max_detections),
        max_batch_size=max_batch,
        dynamic_batching=DynamicBatching(max_queue_delay_us=DETECT_QUEUE_DELAY_US),
        instance_groups=(InstanceGroup(kind="CPU", count=1),),
        parameters=parameters,
        files={"labels.txt": "".join(f"{label}\n" for label in labels)},
    )


def _detection_outputs(max_detections: int) -> tuple[TensorSpec, ...]:
    return (
        TensorSpec(BOXES, "FP32", (max_detections, BOX_VALUES)),
        TensorSpec(DETECTION_SCORES, "FP32", (max_detections,)),
        TensorSpec(DETECTION_CLASSES, "INT64", (max_detections,)),
        TensorSpec(DETECTION_LABELS, "BYTES", (max_detections,)),
        TensorSpec(DETECTION_COUNT, "INT32", (1,)),
    )


def detector_ensemble(
    name: str,
    preprocess: ModelSpec,
    model: str,
    detect_step: ModelSpec,
    max_batch: int,
    description: str,
) -> EnsembleSpec:
    """IMAGE -> `preprocess` (image, LETTERBOX) -> served model `model` -> `detect_step` (with
    LETTERBOX) -> BOXES, DETECTION_SCORES, DETECTION_CLASSES, DETECTION_LABELS, DETECTION_COUNT."""
    images, head = preprocess.outputs[0].name, detect_step.inputs[0].name
    answers = {t: t for t in DETECTION_OUTPUTS}
    max_detections = detect_step.outputs[0].dims[0]
    return EnsembleSpec(
        name=name,
        description=description,
        inputs=(TensorSpec(tensors.IMAGE, "BYTES", (1,)),),
        outputs=_detection_outputs(max_detections),
        steps=(
            EnsembleStep(
                preprocess.name,
                inputs={tensors.IMAGE: tensors.IMAGE},
                outputs={images: images, LETTERBOX: LETTERBOX},
            ),
            EnsembleStep(model, inputs={images: images}, outputs={head: head}),
            EnsembleStep(detect_step.name, inputs={head: head, LETTERBOX: LETTERBOX}, outputs=answers),
        ),
        max_batch_size=max_batch,
    )


def detector_pipeline(
    name: str,
    model: ModelSpec,
    labels: Sequence[str],
    *,
    served_model: str | None = None,
    max_batch: int | None = None,
    preprocess_name: str | None = None,
    detect_name: str | None = None,
    preprocess_parameters: Mapping[str, str] | None = None,
    delay_us: int = DETECTOR_QUEUE_DELAY_US,
    layout: str = "attributes_first",
    score_threshold: float = 0.25,
    iou_threshold: float = 0.45,
    max_detections: int = 100,
    classes: Sequence[int] = (),
    class_agnostic: bool = False,
) -> tuple[ModelSpec, ModelSpec, EnsembleSpec]:
    """A detector served as a pipeline: (the letterbox preprocessing step, the kiln_detect step,
    the ensemble `name`): IMAGE bytes -> letterbox -> `model` -> kiln_detect -> BOXES,
    DETECTION_SCORES, DETECTION_CLASSES, DETECTION_LABELS, DETECTION_COUNT.

    Args:
        name: The ensemble's name (what clients call).
        model: The detector's spec: one image input [C, S, S] (square), its first output the raw
            head in `layout`.
        labels: One label per class.
        served_model: The served model the ensemble runs (e.g. a variant, `<model>_int8`);
            default `model.name`.
        max_batch: Every step's and the ensemble's max batch size; default the model's.
        preprocess_name, detect_name: The steps' names; default `<name>_preprocess`,
            `<name>_detect`.
        preprocess_parameters: More kiln_image parameters (mean, std, pad_value, jpeg_draft,
            max_pixels, ...); resize_mode is letterbox.
        delay_us: The preprocessing step's dynamic batcher delay.
        layout, score_threshold, iou_threshold, max_detections, classes, class_agnostic:
            kiln_detect's parameters.
    """
    batch = model.max_batch_size if max_batch is None else max_batch
    preprocess = letterbox_preprocess(
        preprocess_name or f"{name}_preprocess",
        model,
        batch,
        delay_us,
        dict(preprocess_parameters or {}),
        f"kiln_image (letterbox): JPEG/PNG files -> {model.name}'s input and the transform back",
    )
    detect_step = detect(
        detect_name or f"{name}_detect",
        model,
        batch,
        labels,
        f"kiln_detect: {model.name}'s raw head -> boxes on the original image after NMS",
        layout=layout,
        score_threshold=score_threshold,
        iou_threshold=iou_threshold,
        max_detections=max_detections,
        classes=classes,
        class_agnostic=class_agnostic,
    )
    ensemble = detector_ensemble(
        name,
        preprocess,
        served_model or model.name,
        detect_step,
        batch,
        f"image -> {preprocess.name} -> {served_model or model.name} -> {detect_step.name} -> boxes",
    )
    return preprocess, detect_step, ensemble
