"""The realistic request mix every load test and benchmark sends, built once per run.

- Images (`image_classifier`, `image_classifier_int8`): scikit-image's bundled photographs (nothing
  is downloaded) at several sizes (a 128 px thumbnail to a 2-megapixel scan) and colour modes
  (grey, RGB, RGBA), encoded as JPEG and PNG, as clients upload them.
- Digits (`digits_reader`): scikit-learn's handwritten digits, rendered as 8x8 grey PNG files.
- Texts (`text_embedder`): short queries, prose paragraphs of varied length (held-out docstrings of
  the text encoder's evaluation pool), long texts past the encoder's 128 tokens (truncated by the
  server) and non-ASCII text.
- Records (`fraud_scorer`): transactions of the fraud model's held-out split
  (`kiln.build.reference.fraud.records`), as JSON records (RECORD) and, for every fifth, as the raw
  values in the model's feature order (FEATURE_VALUES): a request sends exactly one of the two.

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
PHOTOS: tuple[tuple[str, str, int | None], ...] = (
    # (skimage.data name, file format, longer side after resizing or None to keep it)
    ("astronaut", "JPEG", None),  # 512x512 RGB
    ("coffee", "JPEG", None),  # 400x600 RGB
    ("chelsea", "PNG", None),  # 300x451 RGB
    ("camera", "JPEG", None),  # 512x512 grey
    ("coins", "PNG", None),  # 303x384 grey
    ("rocket", "JPEG", 160),  # a 160x107 RGB thumbnail
    ("hubble_deep_field", "JPEG", None),  # 872x1000 RGB
    ("retina", "JPEG", None),  # 1411x1411 RGB, about 2 megapixels
    ("logo", "PNG", None),  # 500x500 RGBA
    ("immunohistochemistry", "PNG", 256),  # 256x256 RGB
)
"""The image mix: 10 files, 4 sizes classes, grey/RGB/RGBA, JPEG and PNG."""
DIGITS_IMAGES = 64
"""Digits in the digits_reader mix (the first of the data set, every class several times)."""
DIGIT_LEVELS = 16
"""scikit-learn's digits hold grey levels 0..16; a PNG holds 0..255."""

SHORT_TEXTS = (
    "reset my password",
    "How do I read a file line by line?",
    "timeout while connecting to the mail server",
    "parse a date string",
)
"""Search-box queries: a few words each."""
NON_ASCII_TEXTS = (
    "Résumé du café: la crème brûlée était très sucrée, naïve et délicieuse.",
    "Größenänderung der Datei fehlgeschlagen: Zugriff verweigert (Fehlercode 13).",
)
PARAGRAPHS = 10
"""Prose paragraphs, spread over the pool's lengths."""
LONG_TEXT_PARAGRAPHS = 8
"""Paragraphs joined into each long text (well past 128 tokens: the server truncates)."""
LONG_TEXTS = 2

FRAUD_RECORDS = 200
"""Transactions in the fraud mix (the held-out split's first, about 2% fraud)."""
VALUES_EVERY = 5
"""Every fifth fraud request sends FEATURE_VALUES instead of a RECORD."""


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


def _object(values: Sequence[bytes]) -> np.ndarray:
    array = np.empty((len(values), 1), dtype=object)
    array[:, 0] = list(values)
    return array


def _mode(image: np.ndarray) -> str:
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


def photographs() -> list[tuple[str, bytes]]:
    """The image mix: (description, encoded file) for each entry of PHOTOS."""
    import skimage.data
    from PIL import Image

    files = []
    for name, fmt, longer in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        data = encode_image(pixels, fmt, longer)
        with Image.open(io.BytesIO(data)) as decoded:
            width, height = decoded.size
        extension = {"JPEG": "jpg", "PNG": "png"}[fmt]
        files.append((f"{name}.{extension} {height}x{width} {_mode(pixels)}", data))
    return files


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


def texts() -> list[str]:
    """The text mix (see the module docstring)."""
    from kiln.build.text_encoder import load_corpus

    pool = sorted(load_corpus().evaluation, key=len)
    picks = [pool[round(i * (len(pool) - 1) / (PARAGRAPHS - 1))] for i in range(PARAGRAPHS)]
    long_texts = [
        " ".join(pool[-(LONG_TEXT_PARAGRAPHS * (k + 1)) : len(pool) - LONG_TEXT_PARAGRAPHS * k])
        for k in range(LONG_TEXTS)
    ]
    return [*SHORT_TEXTS, *picks, *long_texts, *NON_ASCII_TEXTS]


def _image_items(model: str) -> list[Item]:
    if model == tensors.DIGITS_READER:
        return [Item(name, {tensors.IMAGE: _object([data])}) for name, data, _ in digit_pngs()]
    return [Item(name, {tensors.IMAGE: _object([data])}) for name, data in photographs()]


def _text_items() -> list[Item]:
    items = []
    for text in texts():
        data = text.encode("utf-8")
        label = text if len(text) <= 40 else text[:37] + "..."
        items.append(Item(f"text {len(data)} B: {label!r}", {tensors.TEXT: _object([data])}))
    return items


def _fraud_items() -> tuple[list[Item], list[dict[str, float]]]:
    from kiln.build.reference.fraud import encode, feature_names, records

    names = feature_names()
    rows = list(records(FRAUD_RECORDS))
    items = []
    for index, record in enumerate(rows):
        if index % VALUES_EVERY == VALUES_EVERY - 1:
            values = np.array([[record[n] for n in names]], dtype=np.float32)
            items.append(Item(f"transaction #{index} as FEATURE_VALUES", {tensors.FEATURE_VALUES: values}))
        else:
            items.append(Item(f"transaction #{index} as RECORD", {tensors.RECORD: _object([encode(record)])}))
    return items, rows


CLASSIFIERS = (tensors.IMAGE_CLASSIFIER, tensors.IMAGE_CLASSIFIER_INT8, tensors.DIGITS_READER)
MODELS = (*CLASSIFIERS, tensors.TEXT_EMBEDDER, tensors.FRAUD_SCORER)
"""Served models `build()` makes a mix for."""


def build(model: str, reference: bool = True) -> Corpus:
    """The request mix for `model`, with the in-process reference's answers when `reference`.

    Raises:
        KeyError: no mix for `model`.
    """
    if model in CLASSIFIERS:
        corpus = Corpus(model, _image_items(model))
    elif model == tensors.TEXT_EMBEDDER:
        corpus = Corpus(model, _text_items())
    elif model == tensors.FRAUD_SCORER:
        items, rows = _fraud_items()
        corpus = Corpus(model, items)
        if reference:
            _fraud_reference(corpus, rows)
        return corpus
    else:
        raise KeyError(f"no request mix for {model!r}; known: {', '.join(MODELS)}")
    if reference:
        if model == tensors.TEXT_EMBEDDER:
            _text_reference(corpus)
        else:
            _image_reference(corpus)
    return corpus


def _fraud_reference(corpus: Corpus, rows: list[dict[str, float]]) -> None:
    from kiln.build.reference.fraud import TorchReference, published_threshold

    # Decide at the threshold the server serves (the build's published one), so that the
    # reference and the response contract agree by construction.
    reference = TorchReference.load(threshold=published_threshold().threshold)
    names = reference.stats.names
    for item, record in zip(corpus.items, rows, strict=True):
        if tensors.FEATURE_VALUES in item.inputs:
            scored = reference.score_values(item.inputs[tensors.FEATURE_VALUES])
        else:
            scored = reference.score([{n: record[n] for n in names}])
        item.expected = {tensors.SCORE: scored.scores, tensors.DECISION: scored.decisions}
    corpus.reference = "kiln.build.reference.fraud.TorchReference (PyTorch, FP32)"


def _text_reference(corpus: Corpus) -> None:
    from kiln.build.reference.text import TorchTextEmbedder

    embedder = TorchTextEmbedder()
    texts_ = [item.inputs[tensors.TEXT][0, 0].decode("utf-8") for item in corpus.items]
    embeddings = embedder.embed(texts_)
    for item, embedding in zip(corpus.items, embeddings, strict=True):
        item.expected = {tensors.EMBEDDING: embedding[np.newaxis, :]}
    corpus.reference = "kiln.build.reference.text.TorchTextEmbedder (PyTorch, FP32)"


def _image_reference(corpus: Corpus) -> None:
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
