"""Pipeline building blocks: the processing steps and ensembles a model folder wires around its
model, written once so that a new image classifier is a few lines of its `pipeline.py`.

`image_preprocess` (kiln_image: image file bytes -> the model's [C, S, S] input), `classify`
(kiln_classify: logits -> top-k labels, scores, class indices) and `classifier_ensemble` (the two
around a served model). `models/resnet50/pipeline.py` and `models/digits/pipeline.py` use them.
"""

from __future__ import annotations

from kiln import tensors
from kiln.spec import DynamicBatching, EnsembleSpec, EnsembleStep, InstanceGroup, ModelSpec, TensorSpec

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
) -> EnsembleSpec:
    """IMAGE -> `preprocess` -> served model `model` -> `classify_step` -> labels, scores, indices."""
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
    )
