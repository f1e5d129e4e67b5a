"""The I/O behind `TextGenerator` and `AsyncTextGenerator`: one request to a decoupled generation
model, and its stream of replies, over gRPC or HTTP, blocking or asyncio.

`SyncStreamTransport.open` / `AsyncStreamTransport.open` send a `GenerationCall` and return its
replies (`SyncReplies` / `AsyncReplies`): `next()` gives the next `Reply`, None when the server
ended the stream; `close()` ends it, cancelling the request on the server when its last reply has
not arrived. Everything else (checks, retries, results, error mapping) is shared, in
`kiln.clients._generate_core` and the generated driver.

- gRPC: Triton's bidirectional stream (`ModelStreamInfer`), one stream per request, so that
  closing it cancels exactly that request (Triton 2.51 cancels a stream's requests when the
  client cancels the call; a stream closed gracefully lets them run to the end). Blocking:
  `tritonclient.grpc`'s `start_stream` / `async_stream_infer` / `stop_stream(cancel_requests=True)`
  (a client holds one stream at a time, so idle clients are pooled); asyncio:
  `tritonclient.grpc.aio`'s `stream_infer` and the call's `cancel()`. The call's deadline is the
  request's timeout, so the server cancels it too when it passes.
- HTTP: Triton's `generate` (one JSON object) and `generate_stream` (server-sent events)
  endpoints. tritonclient has no client for them, and the SDK adds no dependency: blocking calls
  use the standard library's `http.client`; asyncio ones use aiohttp, which tritonclient[http]
  already requires (`tritonclient.http.aio` is built on it). Closing a stream early closes its
  connection, and Triton 2.51 cancels the request at its next event (it notices the disconnect
  when it writes). A non-streamed request (`generate`) is not cancelled by a disconnect on 2.51:
  it runs to its end on the server.

tritonclient, grpc and aiohttp are imported on first use, so `import kiln.clients` stays cheap.
"""

from __future__ import annotations

import asyncio
import collections
import http.client
import importlib
import math
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from tritonclient.utils import InferenceServerException

from kiln.clients._generate_core import (
    EMPTY_FINAL_PARAMETER,
    FINAL_PARAMETER,
    GenerationCall,
    Reply,
    SSEDecoder,
    error_from_body,
    reply_from_json,
    reply_from_outputs,
)
from kiln.clients._transport import CONNECTION_TIMEOUT_S, HTTP

READ_CHUNK_BYTES = 64 * 1024
STREAM_ERROR_WAIT_S = 1.0
"""How long a gRPC stream that failed at once is given to report why (from its own thread)."""
DRAIN_TIMEOUT_S = 1.0
"""How long the end of a finished HTTP stream is waited for, to reuse its connection."""
HTTP_OK = 200
JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
_STALE_CONNECTION_ERRORS = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
"""What sending on a kept-alive HTTP connection the server has meanwhile closed raises: the
request is sent again once on a new connection."""


class ReplyTimeout(TimeoutError):
    """No reply within the request's timeout (the request is then cancelled; a TimeoutError, so
    it maps to DeadlineExceededError)."""


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _remaining(deadline: float | None, timeout: float | None) -> float | None:
    """Seconds left until `deadline` (None: no deadline); ReplyTimeout when none are left."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise ReplyTimeout(_late(timeout))
    return left


def _late(timeout: float | None) -> str:
    return "no answer in time" if timeout is None else f"no answer within {timeout:g} s"


def _grpc_reply(result: Any) -> Reply:
    """A Reply from a tritonclient gRPC InferResult."""
    response = result.get_response()
    final = False
    if FINAL_PARAMETER in response.parameters:
        final = bool(response.parameters[FINAL_PARAMETER].bool_param)
    outputs = {output.name: result.as_numpy(output.name) for output in response.outputs}
    return reply_from_outputs(outputs, final)


def _grpc_inputs(module: Any, call: GenerationCall) -> list[Any]:
    inputs = []
    for name, datatype, array in call.tensors():
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def _split_address(address: str) -> tuple[str, int | None]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return address, None
    return host.strip("[]"), int(port)


# --- blocking ------------------------------------------------------------------------------------


class SyncReplies:
    """The replies of one request (blocking); see the module doc."""

    def next(self) -> Reply | None:
        """The next reply; None once the server ended the stream."""
        raise NotImplementedError

    def close(self) -> None:
        """Ends the request (cancels it on the server unless its last reply arrived). Idempotent."""
        raise NotImplementedError

    def abort(self) -> None:
        """Cancels the request now, from any context (a stream dropped unfinished, `__del__`)."""
        self.close()


class SyncStreamTransport:
    """Blocking generation requests over gRPC or HTTP (thread-safe: each request gets its own
    stream or connection, from pools of idle ones).

    Args:
        protocol: "http" or "grpc".
        address: "host:port".
        verbose: tritonclient's verbose flag (gRPC).
    """

    def __init__(self, protocol: str, address: str, *, verbose: bool = False) -> None:
        self.protocol = protocol
        self.address = address
        self._verbose = verbose
        self._lock = threading.Lock()
        self._idle: list[Any] = []
        self._closed = False

    def open(self, call: GenerationCall, timeout: float | None) -> SyncReplies:
        """Sends `call`; its replies must be read within `timeout` seconds in all (None: no limit)."""
        if self.protocol == HTTP:
            return _SyncHttpReplies(self, call, timeout)
        return _SyncGrpcReplies(self, call, timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def _take(self) -> tuple[Any, bool]:
        """An idle client or connection, and whether it was used before (else a new one)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the client is closed")
            if self._idle:
                return self._idle.pop(), True
        if self.protocol == HTTP:
            host, port = _split_address(self.address)
            return http.client.HTTPConnection(host, port, timeout=CONNECTION_TIMEOUT_S), False
        module = importlib.import_module("tritonclient.grpc")
        return module.InferenceServerClient(self.address, verbose=self._verbose), False

    def _give(self, connection: Any) -> None:
        """Returns a client or connection that can serve another request."""
        with self._lock:
            if not self._closed:
                self._idle.append(connection)
                return
        _quietly_close(connection)

    def close(self) -> None:
        """Closes the idle clients and connections; those in use close when their request ends."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            _quietly_close(connection)


def _quietly_close(connection: Any) -> None:
    try:
        connection.close()
    except Exception:  # noqa: BLE001 - closing must not hide the real error
        pass


class _SyncGrpcReplies(SyncReplies):
    """One gRPC stream (a pooled tritonclient.grpc client's) carrying one request."""

    def __init__(self, transport: SyncStreamTransport, call: GenerationCall, timeout: float | None) -> None:
        self._transport = transport
        self._timeout = timeout
        self._deadline = _deadline(timeout)
        self._queue: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._done = False
        self._client: Any = None
        self._client, _ = transport._take()
        try:
            module = importlib.import_module("tritonclient.grpc")
            self._client.start_stream(callback=self._callback, stream_timeout=timeout)
            self._client.async_stream_infer(
                call.model, _grpc_inputs(module, call), request_id=call.request_id or "",
                enable_empty_final_response=True,
            )
        except InferenceServerException as error:
            # The stream failed before the request went out (e.g. nothing listens there): the
            # reason is what its thread reports through the callback, not this generic error.
            try:
                reported = self._queue.get(timeout=STREAM_ERROR_WAIT_S)[1]
            except queue.Empty:
                reported = None
            self.close()
            raise (reported or error) from None
        except BaseException:
            self.close()
            raise

    def _callback(self, result: Any, error: Any) -> None:
        self._queue.put((result, error))

    def next(self) -> Reply | None:
        if self._done:
            return None
        try:
            result, error = self._queue.get(timeout=_remaining(self._deadline, self._timeout))
        except queue.Empty:
            raise ReplyTimeout(_late(self._timeout)) from None
        if error is not None:
            raise error
        reply = _grpc_reply(result)
        self._done = reply.final
        return reply

    def close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        try:
            # After the final reply: a graceful end (half-close; Triton then closes the stream).
            # Before it: cancel the call, which cancels the request on the server.
            client.stop_stream(cancel_requests=not self._done)
        except Exception:  # noqa: BLE001 - a broken client is dropped, not reused
            _quietly_close(client)
            return
        self._transport._give(client)


class _SyncHttpReplies(SyncReplies):
    """One POST to generate / generate_stream on a pooled `http.client` connection."""

    def __init__(self, transport: SyncStreamTransport, call: GenerationCall, timeout: float | None) -> None:
        self._transport = transport
        self._timeout = timeout
        self._deadline = _deadline(timeout)
        self._stream = call.stream
        self._decoder = SSEDecoder()
        self._pending: collections.deque[str] = collections.deque()
        self._done = False
        self._ended = False
        self._connection: Any = None
        self._response: Any = None
        body = call.json_body()
        for attempt in (1, 2):
            connection, reused = transport._take()
            self._connection = connection
            try:
                self._set_timeout(connect=True)
                connection.request("POST", call.path(), body=body, headers=JSON_HEADERS)
                self._response = connection.getresponse()
                break
            except _STALE_CONNECTION_ERRORS:
                self._drop()
                if not reused or attempt == 2:
                    raise
            except BaseException:
                self._drop()
                raise
        if self._response.status != HTTP_OK:
            try:
                error = error_from_body(self._read_all(), str(self._response.status))
            finally:
                self.close()
            raise error

    def _set_timeout(self, connect: bool = False) -> None:
        left = _remaining(self._deadline, self._timeout)
        if connect and self._connection.sock is None:
            self._connection.timeout = left if left is not None else CONNECTION_TIMEOUT_S
        elif self._connection.sock is not None:
            self._connection.sock.settimeout(left)

    def _read_all(self) -> bytes:
        parts = []
        while True:
            self._set_timeout()
            chunk = self._response.read1(READ_CHUNK_BYTES)
            if not chunk:
                self._ended = True
                return b"".join(parts)
            parts.append(chunk)

    def next(self) -> Reply | None:
        if self._done:
            return None
        try:
            if not self._stream:
                reply = reply_from_json(self._read_all(), final=True)
                self._done = True
                return reply
            while not self._pending:
                if self._ended:
                    self._done = True
                    return None
                self._set_timeout()
                chunk = self._response.read1(READ_CHUNK_BYTES)
                if chunk:
                    self._pending.extend(self._decoder.feed(chunk))
                else:
                    self._ended = True
                    self._pending.extend(self._decoder.close())
            reply = reply_from_json(self._pending.popleft())
        except (OSError, http.client.HTTPException, InferenceServerException):
            self._drop()
            raise
        self._done = reply.last
        return reply

    def close(self) -> None:
        if self._connection is None:
            return
        if self._done and not self._ended:
            try:  # the chunked body's end follows the last event: read it to reuse the connection
                self._deadline = min(self._deadline or math.inf, time.monotonic() + DRAIN_TIMEOUT_S)
                self._read_all()
            except Exception:  # noqa: BLE001 - then the connection is dropped
                pass
        if self._ended and self._response is not None and self._response.isclosed():
            connection, self._connection = self._connection, None
            self._transport._give(connection)
        else:
            self._drop()  # closing the socket is how the server learns the request is cancelled

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            _quietly_close(connection)


# --- asyncio -------------------------------------------------------------------------------------


class AsyncReplies:
    """The replies of one request (asyncio); see the module doc."""

    async def next(self) -> Reply | None:
        """The next reply; None once the server ended the stream."""
        raise NotImplementedError

    async def close(self) -> None:
        """Ends the request (cancels it on the server unless its last reply arrived). Idempotent."""
        raise NotImplementedError

    def abort(self) -> None:
        """Cancels the request now, without awaiting (a stream dropped unfinished, `__del__`)."""
        raise NotImplementedError


class AsyncStreamTransport:
    """asyncio generation requests over gRPC (one `tritonclient.grpc.aio` client, one stream per
    request) or HTTP (one aiohttp session, one connection per request). Belongs to one event loop.

    Args:
        protocol: "http" or "grpc".
        address: "host:port".
        verbose: tritonclient's verbose flag (gRPC).
    """

    def __init__(self, protocol: str, address: str, *, verbose: bool = False) -> None:
        self.protocol = protocol
        self.address = address
        self._verbose = verbose
        self._client: Any = None
        self._closed = False

    async def open(self, call: GenerationCall, timeout: float | None) -> AsyncReplies:
        """Sends `call`; its replies must be read within `timeout` seconds in all (None: no limit)."""
        replies: AsyncReplies
        if self.protocol == HTTP:
            replies = _AsyncHttpReplies(self._get(), self.address, call, timeout)
        else:
            replies = _AsyncGrpcReplies(self._get(), call, timeout)
        try:
            await replies.start()  # type: ignore[attr-defined]
        except BaseException:
            await replies.close()
            raise
        return replies

    @property
    def closed(self) -> bool:
        return self._closed

    def _get(self) -> Any:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._client is None:
            if self.protocol == HTTP:
                aiohttp = importlib.import_module("aiohttp")
                self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
            else:
                aio = importlib.import_module("tritonclient.grpc.aio")
                self._client = aio.InferenceServerClient(self.address, verbose=self._verbose)
        return self._client

    async def close(self) -> None:
        """Closes the session or channel (requests still open are cancelled). Idempotent."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()


async def _within(awaitable: Any, deadline: float | None, timeout: float | None) -> Any:
    """Awaits `awaitable` until `deadline`; ReplyTimeout after it.

    `asyncio.timeout` (Python 3.11+) awaits in the caller's task, so a cancellation of that task
    always reaches the read (and so cancels the request); `asyncio.wait_for` on 3.11 may swallow
    a cancellation that races with a reply arriving, which a stream of replies every millisecond
    makes likely. Python 3.10 has only wait_for.
    """
    left = _remaining(deadline, timeout)
    if left is None:
        return await awaitable
    try:
        if hasattr(asyncio, "timeout"):
            async with asyncio.timeout(left):
                return await awaitable
        return await asyncio.wait_for(awaitable, left)
    except (asyncio.TimeoutError, TimeoutError):
        raise ReplyTimeout(_late(timeout)) from None


class _AsyncGrpcReplies(AsyncReplies):
    """One `ModelStreamInfer` call of the transport's tritonclient.grpc.aio client."""

    def __init__(self, client: Any, call: GenerationCall, timeout: float | None) -> None:
        self._client = client
        self._call = call
        self._timeout = timeout
        self._deadline = _deadline(timeout)
        self._iterator: Any = None
        self._done = False
        self._module = importlib.import_module("tritonclient.grpc")

    async def start(self) -> None:
        call = self._call
        request = {
            "model_name": call.model,
            "inputs": _grpc_inputs(self._module, call),
            "request_id": call.request_id or "",
            "parameters": {EMPTY_FINAL_PARAMETER: True},
        }

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request  # then the request side closes: Triton still sends every reply

        self._iterator = self._client.stream_infer(requests(), stream_timeout=self._timeout)

    async def next(self) -> Reply | None:
        if self._done:
            return None
        grpc = importlib.import_module("grpc")
        try:
            result, error = await _within(self._iterator.__anext__(), self._deadline, self._timeout)
        except StopAsyncIteration:
            self._done = True
            return None
        except grpc.RpcError as rpc_error:
            raise InferenceServerException(
                msg=rpc_error.details(), status=str(rpc_error.code()),
                debug_details=rpc_error.debug_error_string(),
            ) from None
        if error is not None:
            raise error
        reply = _grpc_reply(result)
        self._done = reply.final
        return reply

    async def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        iterator, self._iterator = self._iterator, None
        if iterator is not None and not self._done:
            iterator.cancel()  # cancels the call: Triton cancels the request


class _AsyncHttpReplies(AsyncReplies):
    """One POST to generate / generate_stream on the transport's aiohttp session."""

    def __init__(self, session: Any, address: str, call: GenerationCall, timeout: float | None) -> None:
        self._session = session
        self._url = f"http://{address}{call.path()}"
        self._call = call
        self._timeout = timeout
        self._deadline = _deadline(timeout)
        self._decoder = SSEDecoder()
        self._pending: collections.deque[str] = collections.deque()
        self._response: Any = None
        self._done = False
        self._ended = False

    async def start(self) -> None:
        self._response = await _within(
            self._session.post(self._url, data=self._call.json_body(), headers=JSON_HEADERS),
            self._deadline, self._timeout,
        )
        if self._response.status != HTTP_OK:
            body = await _within(self._response.read(), self._deadline, self._timeout)
            self._ended = True
            raise error_from_body(body, str(self._response.status))

    async def next(self) -> Reply | None:
        if self._done:
            return None
        if not self._call.stream:
            body = await _within(self._response.read(), self._deadline, self._timeout)
            self._ended = self._done = True
            return reply_from_json(body, final=True)
        while not self._pending:
            if self._ended:
                self._done = True
                return None
            chunk = await _within(self._response.content.readany(), self._deadline, self._timeout)
            if chunk:
                self._pending.extend(self._decoder.feed(chunk))
            else:
                self._ended = True
                self._pending.extend(self._decoder.close())
        reply = reply_from_json(self._pending.popleft())
        self._done = reply.last
        return reply

    async def close(self) -> None:
        response, self._response = self._response, None
        if response is None:
            return
        if self._done and not self._ended:
            try:  # the chunked body's end follows the last event: read it to reuse the connection
                deadline = min(self._deadline or math.inf, time.monotonic() + DRAIN_TIMEOUT_S)
                await _within(response.read(), deadline, DRAIN_TIMEOUT_S)
                self._ended = True
            except Exception:  # noqa: BLE001 - then the connection is dropped
                pass
        if self._ended:
            response.release()
        else:
            response.close()  # closing the connection is how the server learns of the cancel

    def abort(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            response.close()
