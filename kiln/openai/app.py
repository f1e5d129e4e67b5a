"""The OpenAI-compatible ASGI app: `create_app(triton_url)`.

Endpoints (OpenAI's shapes; see `kiln.openai.protocol` for what each accepts):

    POST /v1/completions        prompt -> text_completion (streamed: text_completion chunks)
    POST /v1/chat/completions   messages -> chat.completion (streamed: chat.completion.chunk)
    GET  /v1/models             the generation models served (and /v1/models/{model})
    GET  /health                200 when Triton and every generation model are ready, else 503

Every request becomes one request to the Triton model through the SDK's `AsyncTextGenerator`
over gRPC (its own bidirectional stream, so closing it cancels exactly that request). A streamed
answer is sent as server-sent events (`data: {...}`, then `data: [DONE]`); a client that
disconnects mid-stream closes the upstream stream, and the model drops the sequence and frees its
KV cache within a decode step. Errors use OpenAI's format with the status a client expects: 400
for bad input (the generation model's own message, naming the field as `param`), 404 for an
unknown model, 503 when Triton or the model is unavailable, 504 on the upstream timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from kiln.clients import AsyncClient, AsyncTextGenerator, GenerationDelta, KilnError, RetryPolicy
from kiln.openai import protocol
from kiln.openai.protocol import APIError, GenerationRequest

log = logging.getLogger("kiln.openai")

DEFAULT_TIMEOUT_S = 600.0
"""Upstream timeout of one request (a whole stream included); past it the request is cancelled
and the client gets a 504 (or, mid-stream, an error event)."""
EVENT_STREAM = "text/event-stream"
CANCEL_RETRY_S = 0.05
DISCOVERY_TIMEOUT_S = 5.0
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStreamResponse(StreamingResponse):
    """A streamed response that notices a client's disconnect at once and then closes its body
    iterator, whatever the ASGI server: Starlette's own StreamingResponse, under ASGI spec 2.4,
    learns of a disconnect only when its next write fails, and leaves the iterator to the
    garbage collector. Here the body's generator is closed at once, which cancels the upstream
    request (`async with` around the SDK stream)."""

    media_type = EVENT_STREAM

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            except OSError:  # the client is gone: the watcher sees it too
                pass

        streaming = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(self.listen_for_disconnect(receive))
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watching.cancel()
            while not streaming.done():  # again if code below swallowed it (asyncio.wait_for can)
                streaming.cancel()
                await asyncio.wait({streaming}, timeout=CANCEL_RETRY_S)
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


class Upstream:
    """The Triton side: one `AsyncClient` (gRPC) and one `AsyncTextGenerator` per model, and which
    generation models Triton serves (given, or discovered from its repository index and configs).

    Args:
        triton_url: Triton's gRPC endpoint, "grpc://host:port".
        models: The generation models to serve; None discovers them (backend kiln_generate,
            decoupled, READY), again whenever a request names one not known yet.
        timeout_s: Upstream timeout of a request, stream included.
    """

    def __init__(self, triton_url: str, models: Sequence[str] | None, timeout_s: float | None) -> None:
        self.triton_url = triton_url
        self.fixed = list(models) if models is not None else None
        self.timeout_s = timeout_s
        self.client: AsyncClient | None = None
        self.served: list[str] = list(self.fixed or [])
        self._generators: dict[str, AsyncTextGenerator] = {}

    async def start(self) -> None:
        self.client = AsyncClient(self.triton_url, timeout=self.timeout_s, retry=RetryPolicy())
        try:
            await self.models(refresh=True)
        except APIError as error:  # Triton not up yet: asked again at the first request
            log.warning("%s", error.message)

    async def close(self) -> None:
        generators, self._generators = self._generators, {}
        for generator in generators.values():
            await generator.close()
        if self.client is not None:
            await self.client.close()

    async def models(self, *, refresh: bool = False) -> list[str]:
        """The generation models served (discovered anew with `refresh`, unless fixed).

        Raises:
            APIError: 503, Triton could not be asked.
        """
        if self.fixed is not None or not refresh or self.client is None:
            return self.served
        try:
            states = await self.client.models(timeout=DISCOVERY_TIMEOUT_S)
            configs = {
                name: await self.client.model_config(name, timeout=DISCOVERY_TIMEOUT_S)
                for name, state in states.items() if state == "READY"
            }
        except KilnError as error:
            reason = error.server_message or error.message
            raise APIError(
                503, f"cannot list Triton's generation models at {self.triton_url}: {reason}",
                type=protocol.UNAVAILABLE, code="unavailable",
            ) from error
        self.served = protocol.generation_models(configs)
        return self.served

    async def generator(self, model: str) -> AsyncTextGenerator:
        """The generator of `model`; APIError 404 when Triton serves no such generation model
        (503 when Triton cannot be asked)."""
        if model not in self.served and model not in await self.models(refresh=True):
            raise protocol.model_not_found(model, self.served)
        generator = self._generators.get(model)
        if generator is None:
            assert self.client is not None
            generator = self._generators[model] = AsyncTextGenerator(self.client, model=model)
        return generator

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Whether Triton and every generation model are ready, and what was found."""
        assert self.client is not None
        live = await self.client.is_ready(timeout=DISCOVERY_TIMEOUT_S)
        try:
            models = await self.models(refresh=True) if live else self.served
        except APIError:
            live, models = False, self.served
        states = {
            m: live and await self.client.is_model_ready(m, timeout=DISCOVERY_TIMEOUT_S) for m in models
        }
        ok = live and bool(models) and all(states.values())
        return ok, {"status": "ok" if ok else "unavailable", "triton": "ready" if live else "unavailable",
                    "models": {m: "ready" if up else "unavailable" for m, up in states.items()}}


async def _body(request: Request) -> dict[str, Any]:
    return protocol.parse_json(await request.body())


def create_app(
    triton_url: str, *, models: Sequence[str] | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S
) -> FastAPI:
    """The OpenAI-compatible app in front of the Triton server at `triton_url` (gRPC).

    Args:
        triton_url: "grpc://host:port" (or "host:port").
        models: The generation models to serve; default: every READY decoupled kiln_generate model.
        timeout_s: Upstream timeout of one request, a whole stream included (None: no limit).
    """
    if "://" not in triton_url:
        triton_url = f"grpc://{triton_url}"
    upstream = Upstream(triton_url, models, timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await upstream.start()
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(
        title="kiln: OpenAI-compatible generation API", lifespan=lifespan, docs_url=None, redoc_url=None,
    )
    app.state.upstream = upstream
    started = protocol.now()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = protocol.NOT_FOUND if error.status_code == 404 else protocol.INVALID_REQUEST
        message = f"{request.method} {request.url.path}: {error.detail}"
        return error_response(APIError(error.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(error).__name__}: {error}",
                                       type=protocol.SERVER_ERROR, code="internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok, body = await upstream.ready()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        served = await upstream.models(refresh=True)
        return {"object": "list", "data": [protocol.model_card(m, started) for m in served]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        if model not in await upstream.models(refresh=True):
            raise protocol.model_not_found(model, upstream.served)
        return protocol.model_card(model, started)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(protocol.parse_completion(await _body(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(protocol.parse_chat(await _body(request)))

    async def _generate(request: GenerationRequest) -> Response:
        generator = await upstream.generator(request.model)
        response_id = protocol.new_id(request.kind)
        created = protocol.now()
        if not request.stream:
            try:
                result = await generator.generate(
                    request.prompt, request_id=response_id, timeout=upstream.timeout_s, **request.options
                )
            except KilnError as error:
                raise protocol.api_error(error, request) from error
            return JSONResponse(protocol.response(request, response_id, created, result))
        stream = generator.stream(
            request.prompt, request_id=response_id, timeout=upstream.timeout_s, **request.options
        )
        try:  # the first delta decides the status: a refused request is an error response, not a stream
            first = await stream.__anext__()
        except KilnError as error:
            await stream.aclose()
            raise protocol.api_error(error, request) from error
        return EventStreamResponse(
            _events(request, response_id, created, stream, first), headers=STREAM_HEADERS
        )

    return app


async def _events(
    request: GenerationRequest, response_id: str, created: int, stream: Any, first: GenerationDelta
) -> AsyncIterator[bytes]:
    """The server-sent events of a streamed answer: its chunks, then `data: [DONE]`. Closing this
    generator (the client went away) closes `stream`, which cancels the upstream request."""
    chunk = protocol.chunk
    async with stream:
        if request.kind == protocol.CHAT_COMPLETION:
            yield protocol.event(chunk(request, response_id, created, text="", role=True))
        delta = first
        while True:
            final = delta.finish_reason is not None
            if request.kind == protocol.COMPLETION:
                if delta.text or final:
                    reason = _reason(delta) if final else None
                    if isinstance(reason, APIError):
                        yield protocol.event(reason.body())
                        return
                    yield protocol.event(chunk(request, response_id, created, text=delta.text, reason=reason))
            else:
                if delta.text:
                    yield protocol.event(chunk(request, response_id, created, text=delta.text))
                if final:
                    reason = _reason(delta)
                    if isinstance(reason, APIError):
                        yield protocol.event(reason.body())
                        return
                    yield protocol.event(chunk(request, response_id, created, reason=reason))
            if final:
                if request.include_usage:
                    yield protocol.event(protocol.usage_chunk(
                        request, response_id, created, delta.prompt_tokens, delta.completion_tokens))
                yield protocol.DONE
                return
            try:
                delta = await stream.__anext__()
            except KilnError as error:
                yield protocol.event(protocol.api_error(error, request).body())
                return


def _reason(delta: GenerationDelta) -> str | APIError:
    try:
        return protocol.finish_reason(delta.finish_reason or "")
    except APIError as error:
        return error
