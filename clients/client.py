"""The generic clients: `Client` (blocking) and `AsyncClient` (asyncio), with the same methods.

Both talk to a Triton server (kiln's or any other) over HTTP or gRPC, picked by the URL's scheme
("http://host:8000", "grpc://host:8001") or the `protocol` argument, and offer:

- health: `is_live`, `is_ready`, `is_model_ready`, `wait_until_ready` (with a deadline);
- metadata: `server_metadata`, `models`, `model_metadata`, `model_config`, `model_info` (cached);
- inference: `infer` (one request of named numpy arrays), `infer_batch` (split into requests of
  the model's max_batch_size, sent concurrently, outputs reassembled in order);
- inputs validated against the model before sending (`InvalidInputError` names the input, the
  expected and the given dtype or shape);
- per-call timeouts, request ids passed to Triton, client-side latency on every result;
- retries with exponential backoff and jitter for errors a retry can fix (`RetryPolicy`);
- optional system shared memory for inputs and outputs (`shared_memory=True`, same host only);
- connection reuse, and `close()` / context managers that release connections and shared memory;
- several replicas: `Client([url, url, ...])` (one protocol) sends each request to one replica,
  "round_robin" (default) or "least_outstanding" (`balance=`); a replica that refuses (connection
  refused, HTTP 503, gRPC UNAVAILABLE, model not ready) or fails its readiness probe is skipped
  for a backoff (`ReplicaBackoff`) and probed (`/v2/health/ready`) before it gets traffic again;
  a refused request goes to another replica at once, one that may have run (connection lost
  after sending, timeout) only with `idempotent=True`; errors of the model or the input never do.
  `client.replicas` reports each replica's state and counts (`ReplicaStats`). The rules:
  `kiln.clients._replicas`; Kubernetes: "Several replicas" in docs/client.md;
- gRPC channels use the `round_robin` policy over a `dns:///` target, so one URL whose name
  resolves to several addresses (a Kubernetes headless Service) spreads over all of them.

Every error is a `KilnError` subclass (see `kiln.clients.errors`).

One implementation: `AsyncClient` (`kiln.clients._async_client`) is the source, `Client`
(`kiln.clients._sync_client`) is generated from it by `scripts/unasync.py`, and what they share
without I/O is `kiln.clients._core`.
"""

from kiln.clients._async_client import AsyncClient
from kiln.clients._core import (
    DEFAULT,
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    InputArrays,
    Part,
    batch_size_of,
    chunk_ranges,
    concatenate,
    expand,
    isolation_jobs,
    parse_url,
    parse_urls,
    plan_jobs,
    prepare_inputs,
    raise_first_failure,
    slice_inputs,
)
from kiln.clients._replicas import (
    BALANCES,
    LEAST_OUTSTANDING,
    ROUND_ROBIN,
    ReplicaBackoff,
    ReplicaStats,
)
from kiln.clients._sync_client import Client

__all__ = [
    "BALANCES",
    "LEAST_OUTSTANDING",
    "ROUND_ROBIN",
    "ReplicaBackoff",
    "ReplicaStats",
    "DEFAULT",
    "DEFAULT_CONCURRENCY",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_URL",
    "AsyncClient",
    "Client",
    "InputArrays",
    "Part",
    "batch_size_of",
    "chunk_ranges",
    "concatenate",
    "expand",
    "isolation_jobs",
    "parse_url",
    "parse_urls",
    "plan_jobs",
    "prepare_inputs",
    "raise_first_failure",
    "slice_inputs",
]
