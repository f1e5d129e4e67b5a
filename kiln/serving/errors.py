"""The two kinds of error every kiln backend raises, defined once.

- `RequestError` (a ValueError): one request's input is malformed. The adapter answers that
  request with INVALID_ARG (HTTP 400 / gRPC INVALID_ARGUMENT) and serves the rest of its dynamic
  batch. Each step's own request errors (`ImageError`, `TextInputError`, `RecordError`,
  `PoolInputError`) subclass it and may carry a `reason` (the failure metric's label).
- `ModelLoadError` (a RuntimeError): a model cannot be served as configured. It fails the model's
  load, the message naming the model and the cause. Each step's load errors (`ImageLoadError`,
  `TextLoadError`, `ClassifyLoadError`, `PoolLoadError`) subclass it.

(`kiln.server.ModelLoadFailedError` is the server's report that models failed to load; it carries
Triton's messages, which these errors' messages become.)
"""

from __future__ import annotations


class RequestError(ValueError):
    """This request's input is malformed; the message names the input and what was wrong."""


class ModelLoadError(RuntimeError):
    """The model cannot be served as configured; the message names the model and the cause."""
