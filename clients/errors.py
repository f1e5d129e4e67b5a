"""One exception hierarchy for the SDK, and the translation of transport errors into it.

Every error a client raises is a `KilnError`; the subclass says what went wrong and what to do:

- `InvalidInputError`: an input does not fit the model (name, dtype, shape, batch size), found by
  the client's validation or reported by the server (HTTP 400, gRPC INVALID_ARGUMENT). Not retried.
- `ModelNotFoundError`: the server serves no model of that name (HTTP 404, gRPC NOT_FOUND).
  Not retried.
- `ModelNotReadyError`: the model exists but has no ready version (loading, unloaded, restarting).
  Retried.
- `ServerUnavailableError`: the server cannot be reached (connection refused or reset, HTTP 503,
  gRPC UNAVAILABLE). Retried. Its `refused` says whether the server certainly did not run the
  request (refused, not reached, answered 503/UNAVAILABLE) or the connection was lost after the
  request may have been sent: a client with several replicas fails over on the first at once, on
  the second only for idempotent calls (`kiln.clients._replicas`).
- `DeadlineExceededError`: the call took longer than its timeout. Not retried (the server may
  still be working on it).
- `PermissionDeniedError`: the server restricts this API (e.g. model load/unload without the
  repository key: HTTP 403; over gRPC Triton answers UNAVAILABLE with "This protocol is
  restricted"). Not retried.
- `ServerError`: anything else the server reports (HTTP 500, gRPC INTERNAL, ...). Not retried.

Each carries the server's own message (`server_message`), the raw transport status (`status`, e.g.
"400" or "StatusCode.NOT_FOUND"), and where it happened (`model`, `url`, `request_id`; `tried`,
the replica URLs a call to several replicas tried). The original exception is chained
(`raise ... from`), so tracebacks keep it.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence
from typing import Any

from tritonclient.utils import InferenceServerException

HTTP_BAD_REQUEST = "400"
HTTP_NOT_FOUND = "404"
HTTP_PAYLOAD_TOO_LARGE = "413"
HTTP_UNAVAILABLE = "503"
HTTP_GATEWAY_TIMEOUT = "504"
GRPC_INVALID_ARGUMENT = "StatusCode.INVALID_ARGUMENT"
GRPC_NOT_FOUND = "StatusCode.NOT_FOUND"
GRPC_UNAVAILABLE = "StatusCode.UNAVAILABLE"
GRPC_DEADLINE_EXCEEDED = "StatusCode.DEADLINE_EXCEEDED"
GRPC_OUT_OF_RANGE = "StatusCode.OUT_OF_RANGE"

_INVALID_STATUSES = frozenset(
    {HTTP_BAD_REQUEST, HTTP_PAYLOAD_TOO_LARGE, GRPC_INVALID_ARGUMENT, GRPC_OUT_OF_RANGE}
)
_NOT_FOUND_STATUSES = frozenset({HTTP_NOT_FOUND, GRPC_NOT_FOUND})
_UNAVAILABLE_STATUSES = frozenset({HTTP_UNAVAILABLE, GRPC_UNAVAILABLE})
_DEADLINE_STATUSES = frozenset({HTTP_GATEWAY_TIMEOUT, GRPC_DEADLINE_EXCEEDED})

# Triton's own wording (2.51) for the cases its status codes do not separate.
_NOT_READY_MARKERS = ("has no available versions", "is not ready", "is not available")
"""404/NOT_FOUND with these words: the model is known but no version is ready (loading,
unloaded, restarting)."""
_TIMEOUT_MARKERS = ("request timeout expired", "deadline exceeded")
_REFUSED_MARKERS = (
    "failed to connect", "connection refused", "dns resolution failed", "name resolution",
    "empty address list", "server exiting", "server not ready", "server is not ready",
    "server is stopping", "stopped accepting new inference requests",
)
"""gRPC UNAVAILABLE with these words: nothing was sent (no connection, no address) or Triton
itself refused it. Triton 2.51 after SIGTERM answers "Server exiting" (readiness) and "Server is
stopping, scheduler for model has stopped accepting new inference requests" (a request that
reached the model's scheduler as it stopped), both measured. Any other UNAVAILABLE ("Socket
closed", "Connection reset by peer") is taken for a connection lost after sending."""
_SHM_MARKERS = ("shared memory",)
SHM_HINT = (
    "system shared memory needs the server on the same host and the same /dev/shm "
    "(in containers: --ipc=host); call without shared memory otherwise"
)


class KilnError(Exception):
    """Base class of every error the client SDK raises.

    Attributes:
        server_message: The server's (or transport's) own message, unchanged; None for errors
            raised before anything was sent.
        status: The raw transport status: an HTTP status ("404") or a gRPC code
            ("StatusCode.NOT_FOUND"); None when there was none.
        model: The model the call was for, when there was one.
        url: The server's URL.
        request_id: The request id the call sent, when one was given.
        items: For a call split into several requests: the item indices (`range`) of the
            request that failed; None otherwise.
        tried: For a client of several replicas, when every replica failed: their URLs in the
            order tried (the message says what each answered); () otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        server_message: str | None = None,
        status: str | None = None,
        model: str | None = None,
        url: str | None = None,
        request_id: str | None = None,
        items: range | None = None,
        tried: tuple[str, ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.server_message = server_message
        self.status = status
        self.model = model
        self.url = url
        self.request_id = request_id
        self.items = items
        self.tried = tried

    def __str__(self) -> str:
        return self.message

    def for_items(self, items: range, total: int) -> KilnError:
        """A copy of this error (same class) for the request carrying `items` of `total` items."""
        copy = _copy_error(self, f"items {items.start}..{items.stop - 1} of {total}: {self.message}")
        copy.items = items
        return copy


class InvalidInputError(KilnError, ValueError):
    """An input does not fit the model (name, dtype, shape, batch size, content).

    Raised by the client's validation before anything is sent, or from the server's rejection.

    Attributes:
        input_name: The offending input's name, when known.
        expected: What the model expects (e.g. "FP32 [-1, 1, 8, 8]"), when known.
        given: What the call gave, when known.
        item: The index of the offending item within the call, when known.
    """

    def __init__(
        self,
        message: str,
        *,
        input_name: str | None = None,
        expected: str | None = None,
        given: str | None = None,
        item: int | None = None,
        **context: Any,
    ) -> None:
        super().__init__(message, **context)
        self.input_name = input_name
        self.expected = expected
        self.given = given
        self.item = item


class ModelNotFoundError(KilnError, LookupError):
    """The server serves no model of that name (check the name, or load the model)."""


class ModelNotReadyError(KilnError):
    """The model is known but no version is ready: it is loading, unloaded or restarting."""


class ServerUnavailableError(KilnError, ConnectionError):
    """The server cannot be reached or refuses work: not running, restarting, overloaded.

    Attributes:
        refused: True when the server certainly did not run the request: the connection was
            refused or the name not resolved, the server answered HTTP 503, or gRPC UNAVAILABLE
            came in words that mean no connection or Triton's own refusal (`_REFUSED_MARKERS`).
            False when the connection was lost after the request may have been sent (reset,
            closed, a gRPC stream that broke): it may have run. The default, False, is the
            cautious answer for a cause nobody classified.
    """

    def __init__(self, message: str, *, refused: bool = False, **context: Any) -> None:
        super().__init__(message, **context)
        self.refused = refused


class DeadlineExceededError(KilnError, TimeoutError):
    """The call did not complete within its timeout (the client gave up waiting)."""


class ServerError(KilnError):
    """Any other failure the server reports (e.g. an exception inside a model)."""


class PermissionDeniedError(KilnError, PermissionError):
    """The server restricts this API and the call lacks the key (`kiln serve --repository-key-env`)."""


_RESTRICTED_MARKERS = ("api is restricted", "protocol is restricted")
_FORBIDDEN_STATUSES = frozenset({"403", "StatusCode.PERMISSION_DENIED"})


RETRYABLE: tuple[type[KilnError], ...] = (ServerUnavailableError, ModelNotReadyError)
"""Errors a retry can fix: the server or model comes back. Everything else fails the same way
again (bad input, unknown model) or may have done the work already (a timeout)."""


def _copy_error(error: KilnError, message: str) -> KilnError:
    copy = error.__class__.__new__(error.__class__)
    copy.__dict__.update(error.__dict__)
    Exception.__init__(copy, message)
    copy.message = message
    copy.__cause__ = error.__cause__
    return copy


def classify_status(status: str | None, message: str) -> type[KilnError]:
    """The KilnError subclass for a server error with this status and message."""
    lowered = message.lower()
    if status in _FORBIDDEN_STATUSES or any(marker in lowered for marker in _RESTRICTED_MARKERS):
        return PermissionDeniedError  # before UNAVAILABLE: gRPC reports a restriction that way
    if any(marker in lowered for marker in _SHM_MARKERS) and status not in _UNAVAILABLE_STATUSES:
        return ServerError
    if status in _NOT_FOUND_STATUSES:
        if any(marker in lowered for marker in _NOT_READY_MARKERS):
            return ModelNotReadyError
        return ModelNotFoundError
    if status in _UNAVAILABLE_STATUSES:
        if any(marker in lowered for marker in _NOT_READY_MARKERS):
            return ModelNotReadyError
        return ServerUnavailableError
    if status in _DEADLINE_STATUSES or any(marker in lowered for marker in _TIMEOUT_MARKERS):
        return DeadlineExceededError
    if status in _INVALID_STATUSES:
        return InvalidInputError
    return ServerError


def _connection_error_types() -> tuple[type[BaseException], ...]:
    """Transport exceptions meaning 'could not talk to the server', from the modules loaded."""
    import sys

    types: list[type[BaseException]] = [ConnectionError, socket.gaierror, socket.herror]
    geventhttpclient = sys.modules.get("geventhttpclient.response")
    if geventhttpclient is not None:
        types += [geventhttpclient.HTTPConnectionClosed, geventhttpclient.HTTPParseError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(types)


def _refused_types() -> tuple[type[BaseException], ...]:
    """Transport exceptions raised before a request could be sent: no connection was made."""
    import sys

    types: list[type[BaseException]] = [ConnectionRefusedError, socket.gaierror, socket.herror]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        types.append(aiohttp.ClientConnectorError)
    return tuple(types)


def _where(what: str, model: str | None, url: str | None) -> str:
    """The context an error message starts with: the model (or else the operation) and the URL."""
    subject = f"model '{model}'" if model else what
    return f"{subject} at {url}" if url else subject


def translate(
    error: BaseException,
    *,
    what: str,
    model: str | None = None,
    url: str | None = None,
    request_id: str | None = None,
    timeout: float | None = None,
    shared_memory: bool = False,
) -> KilnError:
    """The KilnError for an exception from tritonclient, gRPC or the network.

    Args:
        error: What the transport raised.
        what: The operation (e.g. "infer", "model_config"), named when there is no model.
        model: The model it was for.
        url: The server's URL.
        request_id: The request id sent, if any.
        timeout: The call's timeout in seconds, for the message of a timeout.
        shared_memory: Whether the call used system shared memory (adds a hint to its errors).

    Returns:
        The translated error (the caller raises it `from error`). A KilnError is returned as is.
    """
    if isinstance(error, KilnError):
        return error
    context = {"model": model, "url": url, "request_id": request_id}
    where = _where(what, model, url)
    limit = f" of {timeout:g} s" if timeout is not None else ""
    if isinstance(error, InferenceServerException):
        server_message = error.message() or str(error)
        status = error.status()
        cls = classify_status(status, server_message)
        message = f"{where}: {server_message}"
        if cls is ModelNotFoundError:
            message += " (check the model name; Client.models() lists what the server serves)"
        elif cls is ServerUnavailableError:
            message += " (is the server running and reachable?)"
        elif cls is DeadlineExceededError:
            message = f"{where}: no answer within the timeout{limit} ({server_message})"
        if shared_memory and any(marker in server_message.lower() for marker in _SHM_MARKERS):
            message += f"; {SHM_HINT}"
        if cls is ServerUnavailableError:
            refused = status == HTTP_UNAVAILABLE or any(m in server_message.lower() for m in _REFUSED_MARKERS)
            return ServerUnavailableError(
                message, refused=refused, server_message=server_message, status=status, **context
            )
        return cls(message, server_message=server_message, status=status, **context)
    if isinstance(error, (asyncio.TimeoutError, TimeoutError, socket.timeout)):
        return DeadlineExceededError(
            f"{where}: no answer within the timeout{limit}", server_message=str(error) or None, **context
        )
    if isinstance(error, _connection_error_types()) or isinstance(error, OSError):
        detail = str(error) or type(error).__name__
        return ServerUnavailableError(
            f"{where}: cannot reach the server ({detail}); is it running and reachable?",
            refused=isinstance(error, _refused_types()),
            server_message=detail,
            **context,
        )
    return KilnError(f"{where}: {what} failed: {type(error).__name__}: {error}", server_message=str(error),
                     **context)


def first_error(results: Sequence[object]) -> KilnError | None:
    """The first KilnError in `results`, or None."""
    return next((r for r in results if isinstance(r, KilnError)), None)
