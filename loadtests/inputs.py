"""The realistic request mix every load test and benchmark sends, built once per run.

Each model folder's `loadtest.py` makes its pipelines' mix (`corpus(model, reference)`): for
example `models/resnet50/loadtest.py` photographs of several sizes, colour modes and formats,
`models/text_encoder/loadtest.py` queries, paragraphs, long and non-ASCII texts,
`models/fraud/loadtest.py` held-out transactions as records and as raw values. This module holds
what they share: `Item`, `Corpus`, image encoding, the in-process classifier reference, and the
files a run's generators share.

Each `Item` is one batch-1 request (tensor name -> numpy array, as sent) and, when the in-process
reference pipeline is available, the reference's answer (`Item.expected`), which the content checks
compare every response against (`loadtests.checks`).

`build()` makes a corpus; `save()`/`load()` write and read it (a pickle of numpy arrays), so a run's
generators (locust processes, the benchmark) share one file: `KILN_LOADTEST_INPUTS` names it.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln import tensors

INPUTS_ENV = "KILN_LOADTEST_INPUTS"
"""Environment variable naming a saved corpus (`save()`); a suite builds its own without it."""
FORMAT = 1

JPEG_QUALITY = 90
"""What cameras and upload pipelines commonly write."""


@dataclass
class Item:
    """One batch-1 request of the mix.

    Attributes:
        name: What it is, for reports ("coffee.jpg 400x600 RGB").
        inputs: Tensor name -> array with a leading batch dim of 1, exactly as sent.
        expected: Output tensor name -> the in-process reference's answer (batch dim 1), or None
            when no reference was run.
    """

    name: str
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray] | None = None

    @property
    def payload_bytes(self) -> int:
        """Bytes of the inputs' data (the request's size, less framing)."""
        total = 0
        for array in self.inputs.values():
            if array.dtype == object:
                total += sum(len(v) for v in array.reshape(-1))
            else:
                total += array.nbytes
        return total


@dataclass
class Corpus:
    """The request mix for one served model.

    Attributes:
        model: The served model (pipeline) the items are for.
        items: The requests.
        reference: Where `Item.expected` came from, or None.
        notes: Anything a report should say about the mix.
    """

    model: str
    items: list[Item]
    reference: str | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many items, how big, the reference."""
        sizes = [item.payload_bytes for item in self.items]
        ref = f"; expected answers from {self.reference}" if self.reference else "; no reference answers"
        return (
            f"{self.model}: {len(self.items)} inputs, {min(sizes)}-{max(sizes)} bytes "
            f"(median {int(np.median(sizes))}){ref}"
        )


def object_array(values: Sequence[bytes]) -> np.ndarray:
    """A BYTES tensor of shape [len(values), 1], as Triton takes it."""
    array = np.empty((len(values), 1), dtype=object)
    array[:, 0] = list(values)
    return array


def image_mode(image: np.ndarray) -> str:
    """"grey", "RGB" or "RGBA": what a report says of an image's pixels."""
    if image.ndim == 2:
        return "grey"
    return {3: "RGB", 4: "RGBA"}[image.shape[2]]


def encode_image(image: np.ndarray, fmt: str, longer_side: int | None = None) -> bytes:
    """uint8 pixels ([H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA) -> a JPEG or PNG file."""
    from PIL import Image

    picture = Image.fromarray(np.ascontiguousarray(image))
    if longer_side is not None:
        scale = longer_side / max(picture.size)
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
            Image.Resampling.LANCZOS,
        )
    buffer = io.BytesIO()
    if fmt == "JPEG":
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    else:
        picture.save(buffer, format=fmt)
    return buffer.getvalue()


def build(model: str, reference: bool = True) -> Corpus:
    """The request mix for `model`, with the in-process reference's answers when `reference`:
    made by the `loadtest.py` of the model folder serving `model`.

    Raises:
        KeyError: no mix for `model` (the message lists the models that have one).
    """
    from kiln import registry

    try:
        module = registry.module_of(model, "loadtest")
    except KeyError:
        module = None
    if module is None or not hasattr(module, "corpus"):
        raise KeyError(f"no request mix for {model!r}; known: {', '.join(models())}")
    return module.corpus(model, reference)


def models() -> tuple[str, ...]:
    """Served models a mix can be built for: the ensembles of folders with a `loadtest.py`."""
    from kiln import registry
    from kiln.spec import EnsembleSpec

    return tuple(
        spec.name
        for folder in registry.folders()
        if folder.has("loadtest")
        for spec in folder.specs
        if isinstance(spec, EnsembleSpec)
    )


def classifier_reference(corpus: Corpus) -> None:
    """Top-k classes of the in-process image pipeline (`kiln.build.reference.image`): the PyTorch
    model for an FP32 pipeline, the served ONNX file on ONNX Runtime for another precision (PyTorch
    has no INT8 model)."""
    from kiln.build.reference.image import OrtImageClassifier, TorchImageClassifier, pipeline

    files = [item.inputs[tensors.IMAGE][0, 0] for item in corpus.items]
    if pipeline(corpus.model).precision == "fp32":
        classifier: Any = TorchImageClassifier(corpus.model)
        corpus.reference = (
            f"kiln.build.reference.image.TorchImageClassifier({corpus.model!r}) (PyTorch, FP32)"
        )
    else:
        classifier = OrtImageClassifier(corpus.model)
        corpus.reference = (
            f"kiln.build.reference.image.OrtImageClassifier({corpus.model!r}) (served ONNX file, in-process)"
        )
    answers = classifier.classify(files)
    for item, indices in zip(corpus.items, answers.indices, strict=True):
        item.expected = {tensors.CLASS_INDICES: np.asarray(indices, dtype=np.int64)[np.newaxis, :]}


def save(corpus: Corpus, path: Path) -> Path:
    """Writes `corpus` to `path` (a pickle); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"format": FORMAT, "corpus": corpus}, handle, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load(path: Path) -> Corpus:
    """Reads a corpus written by `save()`.

    Raises:
        ValueError: the file is not a saved corpus of this format.
    """
    with open(path, "rb") as handle:
        document: Any = pickle.load(handle)  # noqa: S301 - our own file, written by save()
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(f"{path} is not a kiln load-test corpus (format {FORMAT})")
    return document["corpus"]


def for_model(model: str) -> Corpus:
    """The corpus of `model`: from the file `KILN_LOADTEST_INPUTS` names (a folder holding
    `<model>.pkl`, or one file) when set, else built here (with the references)."""
    location = os.environ.get(INPUTS_ENV)
    if location:
        path = Path(location)
        if path.is_dir():
            path = path / f"{model}.pkl"
        corpus = load(path)
        if corpus.model != model:
            raise ValueError(f"{path} holds the mix for {corpus.model!r}, not {model!r}")
        return corpus
    return build(model)


def describe(corpus: Corpus) -> str:
    """A multi-line listing of the mix, for the logs and the results."""
    lines = [corpus.summary(), *corpus.notes]
    lines += [f"  - {item.name} ({item.payload_bytes} B)" for item in corpus.items[:20]]
    if len(corpus.items) > 20:
        lines.append(f"  ... and {len(corpus.items) - 20} more")
    return "\n".join(lines)
