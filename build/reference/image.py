"""image_classifier, image_classifier_int8 and digits_reader in one Python process, no Triton.

The served ensembles are kiln_image -> model (ONNX Runtime) -> kiln_classify. Two in-process twins,
both configured from the same specs (`models/*/pipeline.py`, through `kiln.registry`: which steps, the
preprocessing parameters, k and the labels), so they follow the served pipeline when a spec
changes:

- `TorchImageClassifier`, the reference: each file decoded with Pillow (`decode`, written here,
  independent of `kiln.serving.image`), preprocessed by the build's own
  `kiln.models.resnet50.build.preprocess` (for digits: `digits_input`, the same steps for one grey
  channel), the PyTorch model loaded from `artifacts/<model>/checkpoint.pt`, then
  `torch.softmax` and `torch.topk`. The end-to-end tests compare the served top-k with it.
- `OrtImageClassifier`, the in-process baseline of the benchmark (issue 6): the same decode, the
  served ONNX file (`<repository>/<model>/1/model.onnx`, so also the INT8 variant) on ONNX
  Runtime with the served model's thread settings, in batches of its max_batch_size, and a numpy
  softmax and top-k. `preprocessing="served"` swaps in kiln_image's own code
  (`kiln.serving.image.ImagePreprocessor`) to time exactly what the server computes, minus Triton.

When the preprocessing spec turns `jpeg_draft` on, `decode` asks Pillow for the same reduced-size
JPEG decode as kiln_image (the size is the resize target computed from the header), so the
reference and the served pipeline see the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from kiln import paths, registry, tensors
from kiln.build.publish import published_path
from kiln.spec import EnsembleSpec, ModelSpec, served_specs

if TYPE_CHECKING:
    import torch

MAX_LEVEL = 255
"""8-bit pixels."""
TRUE_WORDS = ("true", "1", "yes", "on")
"""How a boolean parameter says true (kiln.serving.params' spelling)."""
SIXTEEN_BIT_SHIFT = 8
"""16-bit grey keeps its high byte."""
IMAGE_BACKEND = "kiln_image"
CLASSIFY_BACKEND = "kiln_classify"
"""An image pipeline's first and last steps' backends (the middle one runs the model)."""


@dataclass(frozen=True)
class ImagePipeline:
    """A served image pipeline, resolved from its ensemble spec.

    Attributes:
        name: The ensemble's name.
        preprocess: The kiln_image step's spec.
        model: The served model's name (e.g. "resnet50_int8").
        model_spec: The served model's spec (its variant, as `served_specs` names it).
        built: The spec the model is built from (its checkpoint and source).
        precision: The variant's precision ("fp32", "fp16", "int8").
        classify: The kiln_classify step's spec.
        top_k: Classes returned per image.
        labels: Every class's label, in class order (the classify step's labels file).
        max_batch_size: Images per model run: the ensemble's contract.
    """

    name: str
    preprocess: ModelSpec
    model: str
    model_spec: ModelSpec
    built: ModelSpec
    precision: str
    classify: ModelSpec
    top_k: int
    labels: tuple[str, ...]
    max_batch_size: int


@dataclass(frozen=True)
class TopK:
    """The k most likely classes of each image, most likely first.

    Attributes:
        labels: [images][k] label strings.
        scores: float32 [images, k] softmax probabilities.
        indices: int64 [images, k] class indices.
    """

    labels: list[list[str]]
    scores: np.ndarray
    indices: np.ndarray


def pipeline(name: str) -> ImagePipeline:
    """The image pipeline `name` (image_classifier, image_classifier_int8, digits_reader).

    Raises:
        KeyError: no such ensemble, or one without the three steps preprocess, model, classify.
    """
    served = {spec.name: spec for spec in served_specs(registry.specs())}
    ensemble = served.get(name)
    backends = [getattr(served.get(step.model), "backend", None) for step in getattr(ensemble, "steps", ())]
    if not isinstance(ensemble, EnsembleSpec) or len(backends) != 3 or (
        backends[0], backends[2]) != (IMAGE_BACKEND, CLASSIFY_BACKEND):
        known = [
            s.name for s in served.values() if isinstance(s, EnsembleSpec)
            and getattr(served.get(s.steps[0].model), "backend", None) == IMAGE_BACKEND
        ]
        raise KeyError(f"{name!r} is not an image pipeline; known: {', '.join(sorted(known))}")
    pre, model, post = (served[step.model] for step in ensemble.steps)
    built = next(
        spec for spec in registry.specs() if isinstance(spec, ModelSpec) and spec.build is not None
        and any(v.name == model.name for v in served_specs([spec]))
    )
    precision = "fp32" if model.name == built.name else model.name.removeprefix(f"{built.name}_")
    labels_file = post.parameters.get("labels_file", "labels.txt")
    labels = tuple(post.files[labels_file].removesuffix("\n").split("\n"))
    return ImagePipeline(
        name=name,
        preprocess=pre,
        model=model.name,
        model_spec=model,
        built=built,
        precision=precision,
        classify=post,
        top_k=int(post.parameters["top_k"]),
        labels=labels,
        max_batch_size=max(ensemble.max_batch_size, 1),
    )


# -- decode and preprocess (independent of kiln.serving.image) ---------------------------------
def _target(width: int, height: int, image_size: int, crop_fraction: float) -> tuple[int, int]:
    """kiln.models.resnet50.build.preprocess's resize size for a width x height image."""
    short = max(image_size, round(image_size / crop_fraction))
    scale = short / min(width, height)
    return max(short, round(width * scale)), max(short, round(height * scale))


def decode(
    data: bytes,
    *,
    draft: tuple[int, float] | None = None,
    exif_orientation: bool = True,
) -> np.ndarray:
    """An image file -> uint8 pixels: [H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA.

    Args:
        data: A JPEG or PNG file.
        draft: (image_size, crop_fraction): decode a JPEG at the smallest 1/2, 1/4 or 1/8 scale
            still covering the resize target of that preprocessing (Pillow's draft mode).
        exif_orientation: Turn a JPEG upright by its EXIF orientation tag.
    """
    image = Image.open(io.BytesIO(data))
    if draft is not None and image.format == "JPEG":
        image.draft(image.mode, _target(*image.size, *draft))
    image.load()
    if exif_orientation and image.format == "JPEG":
        image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16"):
        return (np.asarray(image).astype(np.uint16) >> SIXTEEN_BIT_SHIFT).astype(np.uint8)
    if mode == "P":
        mode = "RGBA" if "transparency" in image.info else "RGB"
    elif mode in ("LA", "La", "PA", "RGBa"):
        mode = "RGBA"
    elif mode == "1":
        mode = "L"
    elif mode not in ("L", "RGB", "RGBA"):
        mode = "RGB"
    return np.asarray(image.convert(mode) if mode != image.mode else image)


def digits_input(
    pixels: np.ndarray,
    image_size: int,
    crop_fraction: float,
    pixel_scale: float,
    mean: float,
    std: float,
    background: int = MAX_LEVEL,
) -> np.ndarray:
    """One-channel preprocessing: grey (RGBA composited on `background`, RGB by Pillow's luma),
    resize the shorter side with Pillow's bilinear filter, center crop, scale, normalize.

    Returns:
        float32 [1, image_size, image_size].
    """
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        alpha = pixels[:, :, 3:].astype(np.float32) / float(MAX_LEVEL)
        rgb = pixels[:, :, :3].astype(np.float32) * alpha + float(background) * (1.0 - alpha)
        pixels = np.clip(np.rint(rgb), 0, MAX_LEVEL).astype(np.uint8)
    image = Image.fromarray(pixels)
    if image.mode != "L":
        image = image.convert("L")
    size = _target(*image.size, image_size, crop_fraction)
    resized = np.asarray(image.resize(size, Image.Resampling.BILINEAR))
    top, left = (size[1] - image_size) // 2, (size[0] - image_size) // 2
    crop = resized[top : top + image_size, left : left + image_size].astype(np.float32)
    return ((crop / np.float32(pixel_scale) - np.float32(mean)) / np.float32(std))[np.newaxis]


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


class ReferencePreprocessing:
    """Files -> the model input, the build's way, with the preprocessing spec's parameters.

    Three channels go through `kiln.models.resnet50.build.preprocess` itself, which fixes the ImageNet
    mean and std, 255 and the bilinear filter: a spec asking for others is refused here, not
    silently computed otherwise.
    """

    def __init__(self, spec: ModelSpec) -> None:
        params = dict(spec.parameters)
        self.channels = int(params.get("channels", "3"))
        self.image_size = int(params["image_size"])
        self.crop_fraction = float(params.get("crop_fraction", "0.875"))
        self.pixel_scale = float(params.get("pixel_scale", "255"))
        self.mean = _floats(params.get("mean", "0"))
        self.std = _floats(params.get("std", "1"))
        self.background = int(params.get("alpha_background", str(MAX_LEVEL)))
        self.draft = params.get("jpeg_draft", "false").strip().lower() in TRUE_WORDS
        self.exif = params.get("exif_orientation", "true").strip().lower() in TRUE_WORDS
        resample = params.get("resample", "bilinear")
        if resample != "bilinear":
            raise ValueError(
                f"model {spec.name!r}: the reference resizes bilinearly, the spec says {resample!r}"
            )
        if self.channels == 3:
            from kiln.models.resnet50 import build as resnet50

            build = (resnet50.IMAGENET_MEAN, resnet50.IMAGENET_STD, resnet50.PIXEL_MAX, MAX_LEVEL)
            given = (self.mean, self.std, self.pixel_scale, self.background)
            if tuple(map(tuple, build[:2])) + build[2:] != given:
                raise ValueError(
                    f"model {spec.name!r}: kiln.models.resnet50.build.preprocess normalizes with mean "
                    f"{build[0]}, std {build[1]}, /{build[2]:g} on white; the spec gives {given}"
                )
        elif len(self.mean) != 1 or len(self.std) != 1:
            raise ValueError(f"model {spec.name!r}: one channel needs one mean and one std")

    def decode(self, data: bytes) -> np.ndarray:
        """The file's pixels, decoded as the served step decodes it (draft mode as configured)."""
        draft = (self.image_size, self.crop_fraction) if self.draft else None
        return decode(data, draft=draft, exif_orientation=self.exif)

    def __call__(self, images: Sequence[bytes]) -> np.ndarray:
        """float32 [N, C, S, S]."""
        items = []
        for data in images:
            pixels = self.decode(data)
            if self.channels == 3:
                from kiln.models.resnet50.build import preprocess

                items.append(preprocess(pixels, self.image_size, crop_fraction=self.crop_fraction))
            else:
                items.append(
                    digits_input(
                        pixels, self.image_size, self.crop_fraction, self.pixel_scale,
                        self.mean[0], self.std[0], self.background,
                    )
                )
        return np.stack(items).astype(np.float32, copy=False)


def _chunks(images: Sequence[bytes], size: int) -> list[Sequence[bytes]]:
    if not images:
        raise ValueError("classify() needs at least one image, got none")
    return [images[i : i + size] for i in range(0, len(images), size)]


class TorchImageClassifier:
    """The PyTorch reference of an image pipeline (see the module doc).

    Args:
        name: The pipeline (default image_classifier); its model must be an FP32 variant, the only
            one PyTorch has.
        artifacts: The build's artifacts folder (default: `kiln.paths.artifacts_dir()`).
    """

    def __init__(self, name: str = tensors.IMAGE_CLASSIFIER, artifacts: Path | None = None) -> None:
        from kiln.build.pipeline import source_stage

        self.pipeline = pipeline(name)
        if self.pipeline.precision != "fp32":
            raise ValueError(
                f"{name}: its model {self.pipeline.model} is the {self.pipeline.precision} variant; "
                "PyTorch has only the FP32 model (use OrtImageClassifier)"
            )
        self.preprocess = ReferencePreprocessing(self.pipeline.preprocess)
        self.model = source_stage(self.pipeline.built).load_trained(self.pipeline.built, artifacts)

    def logits(self, images: Sequence[bytes]) -> torch.Tensor:
        """float32 [N, classes]: the model's outputs for the files."""
        import torch

        parts = []
        for chunk in _chunks(images, self.pipeline.max_batch_size):
            with torch.inference_mode():
                parts.append(self.model(torch.from_numpy(self.preprocess(chunk))))
        return torch.cat(parts)

    def classify(self, images: Sequence[bytes]) -> TopK:
        """The top-k classes of each file: torch.softmax, then torch.topk."""
        import torch

        probabilities = torch.softmax(self.logits(images), dim=1)
        scores, indices = torch.topk(probabilities, self.pipeline.top_k, dim=1, sorted=True)
        indices_np = indices.numpy().astype(np.int64)
        return TopK(
            labels=[[self.pipeline.labels[i] for i in row] for row in indices_np],
            scores=scores.numpy().astype(np.float32),
            indices=indices_np,
        )


class OrtImageClassifier:
    """An image pipeline in-process on ONNX Runtime: the benchmark's no-Triton baseline.

    Args:
        name: The pipeline (image_classifier, image_classifier_int8, digits_reader).
        onnx_path: The ONNX model (default: the served one, `<repository>/<model>/1/model.onnx`).
        repository: The model repository holding it (default: `kiln.paths.model_repository()`).
        intra_op_threads: ONNX Runtime threads inside an operator (default: the served model's
            `intra_op_threads` parameter).
        inter_op_threads: Threads across operators (default: the served model's).
        preprocessing: "reference" (`decode` and the build's preprocessing) or "served"
            (kiln_image's `ImagePreprocessor` with the spec's parameters).
    """

    def __init__(
        self,
        name: str = tensors.IMAGE_CLASSIFIER,
        onnx_path: Path | None = None,
        repository: Path | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        preprocessing: str = "reference",
    ) -> None:
        import onnxruntime as ort

        self.pipeline = pipeline(name)
        if preprocessing == "reference":
            self.preprocess: Any = ReferencePreprocessing(self.pipeline.preprocess)
        elif preprocessing == "served":
            from kiln.serving.image import ImagePreprocessor, image_params

            spec = self.pipeline.preprocess
            self.preprocess = ImagePreprocessor(
                image_params(spec.name, spec.parameters), spec.inputs[0].name, spec.outputs[0].name
            ).preprocess
        else:
            raise ValueError(f"preprocessing must be 'reference' or 'served', got {preprocessing!r}")
        path = Path(onnx_path or published_path(self.pipeline.model, repository or paths.model_repository()))
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX model at {path}; run `kiln build` first")
        params = self.pipeline.model_spec.parameters
        options = ort.SessionOptions()
        options.intra_op_num_threads = (
            int(params.get("intra_op_threads", "0")) if intra_op_threads is None else intra_op_threads
        )
        options.inter_op_num_threads = (
            int(params.get("inter_op_threads", "0")) if inter_op_threads is None else inter_op_threads
        )
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.pipeline.model_spec.inputs[0].name
        self.output_name = self.pipeline.model_spec.outputs[0].name

    def logits(self, images: Sequence[bytes]) -> np.ndarray:
        """float32 [N, classes], in runs of the pipeline's max_batch_size."""
        parts = []
        for chunk in _chunks(images, self.pipeline.max_batch_size):
            (out,) = self.session.run([self.output_name], {self.input_name: self.preprocess(chunk)})
            parts.append(out)
        return np.concatenate(parts)

    def classify(self, images: Sequence[bytes]) -> TopK:
        """The top-k classes of each file: a stable numpy softmax, then a stable descending sort."""
        logits = self.logits(images).astype(np.float64)
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities = exp / exp.sum(axis=1, keepdims=True)
        indices = np.argsort(-logits, axis=1, kind="stable")[:, : self.pipeline.top_k].astype(np.int64)
        return TopK(
            labels=[[self.pipeline.labels[i] for i in row] for row in indices],
            scores=np.take_along_axis(probabilities, indices, axis=1).astype(np.float32),
            indices=indices,
        )
