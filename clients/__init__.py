"""kiln's client SDK: call kiln's pipelines (and any Triton model) from services.

Imports only `tritonclient` and `numpy` (no torch, onnx or tensorrt), so services install just
`kiln` without extras. The public surface:

- `Client` / `AsyncClient`: the generic clients (HTTP or gRPC by URL scheme, sync or asyncio):
  health, metadata, `infer` with named numpy arrays, `infer_batch` for any number of items; given
  a list of URLs, they spread requests over those replicas and fail over from one that refuses
  (`ReplicaBackoff` sets how long it is skipped, `ReplicaStats` is what `client.replicas` reports).
- Task clients with typed results: `ImageClassifier`, `DigitsReader`, `TextEmbedder`,
  `FraudScorer`, and their asyncio twins `Async...`.
- Text generation: `TextGenerator` / `AsyncTextGenerator` (`generate` a whole text, or `stream`
  its deltas; closing a stream early cancels the request on the server).
- Results: `InferResult`, `Classification`, `Embeddings`, `FraudScore`, `Generation` (each with
  `latency_s` and `request_id`) and `GenerationDelta`; `ModelInfo` and `TensorInfo` describe a
  served model.
- Errors: `KilnError` and its subclasses; `RetryPolicy` configures retries.

Example:
    >>> from kiln.clients import ImageClassifier
    >>> with ImageClassifier("grpc://localhost:8001") as classifier:
    ...     print(classifier.classify("cat.jpg").label)
"""

from kiln.clients.client import DEFAULT, AsyncClient, Client, ReplicaBackoff, ReplicaStats
from kiln.clients.errors import (
    DeadlineExceededError,
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    PermissionDeniedError,
    ServerError,
    ServerUnavailableError,
)
from kiln.clients.generation import (
    AsyncGenerationStream,
    AsyncTextGenerator,
    GenerationStream,
    TextGenerator,
)
from kiln.clients.models import ModelInfo, TensorInfo
from kiln.clients.results import (
    Classification,
    Embeddings,
    FraudScore,
    Generation,
    GenerationDelta,
    InferResult,
)
from kiln.clients.retry import RetryPolicy
from kiln.clients.tasks import (
    AsyncDigitsReader,
    AsyncFraudScorer,
    AsyncImageClassifier,
    AsyncTextEmbedder,
    DigitsReader,
    FraudScorer,
    ImageClassifier,
    TextEmbedder,
)

__all__ = [
    "DEFAULT",
    "AsyncClient",
    "AsyncDigitsReader",
    "AsyncFraudScorer",
    "AsyncGenerationStream",
    "AsyncImageClassifier",
    "AsyncTextEmbedder",
    "AsyncTextGenerator",
    "Classification",
    "Client",
    "DeadlineExceededError",
    "DigitsReader",
    "Embeddings",
    "FraudScore",
    "FraudScorer",
    "Generation",
    "GenerationDelta",
    "GenerationStream",
    "ImageClassifier",
    "InferResult",
    "InvalidInputError",
    "KilnError",
    "ModelInfo",
    "ModelNotFoundError",
    "ModelNotReadyError",
    "PermissionDeniedError",
    "ReplicaBackoff",
    "ReplicaStats",
    "RetryPolicy",
    "ServerError",
    "ServerUnavailableError",
    "TensorInfo",
    "TextEmbedder",
    "TextGenerator",
]
