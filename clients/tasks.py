"""Typed task clients for kiln's pipelines: what services call every day.

- `ImageClassifier` / `AsyncImageClassifier`: the image_classifier pipeline (ResNet-50; or
  image_classifier_int8 with `model=`): image bytes, file paths or uint8 arrays in, one
  `Classification` (top-5 labels, scores, class indices) per image out.
- `DigitsReader` / `AsyncDigitsReader`: the digits_reader pipeline, the same in and out (top-3 of
  the labels "0".."9").
- `TextEmbedder` / `AsyncTextEmbedder`: the text_embedder pipeline: strings in, `Embeddings` (an
  N x D float32 array, rows L2-normalized) out.
- `FraudScorer` / `AsyncFraudScorer`: the fraud_scorer pipeline: records (dicts of named features)
  or an N x F array of feature values in, one `FraudScore` (score, decision) per transaction out.

Each takes a URL (and then owns a `Client`/`AsyncClient` made with the given options) or an
existing client (borrowed, not closed). Large calls are split into requests of the pipeline's
max_batch_size and sent concurrently, results in input order. When a request of several items
fails with an error one item can cause (a corrupt image, an empty text, a record missing a
feature), its items are resent one by one, so the error names the item and, with
`return_exceptions=True`, every other item still gets its result.
"""

from kiln.clients._async_tasks import (
    AsyncDigitsReader,
    AsyncFraudScorer,
    AsyncImageClassifier,
    AsyncTextEmbedder,
)
from kiln.clients._sync_tasks import DigitsReader, FraudScorer, ImageClassifier, TextEmbedder
from kiln.clients._task_core import (
    Record,
    Records,
    classification,
    collect,
    encode_images,
    encode_record,
    encode_texts,
    fraud_inputs,
    fraud_score,
)

__all__ = [
    "AsyncDigitsReader",
    "AsyncFraudScorer",
    "AsyncImageClassifier",
    "AsyncTextEmbedder",
    "DigitsReader",
    "FraudScorer",
    "ImageClassifier",
    "Record",
    "Records",
    "TextEmbedder",
    "classification",
    "collect",
    "encode_images",
    "encode_record",
    "encode_texts",
    "fraud_inputs",
    "fraud_score",
]
