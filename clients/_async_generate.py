"""`AsyncTextGenerator`: text generation with a decoupled Triton model (kiln_generate's
`tinylm_generate`), for asyncio, and `AsyncGenerationStream`, the deltas of one streamed request
(see `kiln.clients.generation`).

What is shared without I/O (checking and encoding a request, decoding replies, parsing
server-sent events, mapping errors, assembling results) is in `kiln.clients._generate_core`; the
gRPC and HTTP I/O in `kiln.clients._generate_transport`.

This module is the source of both APIs: `scripts/unasync.py` writes `kiln.clients._sync_generate`
(the blocking `TextGenerator` and `GenerationStream`) from it; a test fails when the written file
differs. Edit this file, then run `.venv/bin/python scripts/unasync.py`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kiln import tensors
from kiln.clients._async_client import AsyncClient
from kiln.clients._async_tasks import _AsyncTask
from kiln.clients._core import DEFAULT, DEFAULT_URL
from kiln.clients._generate_core import GenerationCall, Progress, Reply, encode_call, generation_error
from kiln.clients._generate_transport import AsyncReplies, AsyncStreamTransport
from kiln.clients.errors import KilnError
from kiln.clients.results import Generation, GenerationDelta

__all__ = ["AsyncGenerationStream", "AsyncTextGenerator"]


class AsyncTextGenerator(_AsyncTask):
    """Generates text with a served generation model, whole (`generate`) or streamed (`stream`).

    Over gRPC (`grpc://host:8001`) each request is one bidirectional stream; over HTTP
    (`http://host:8000`) Triton's `generate` and `generate_stream` endpoints. Both give the same
    results.

    Args:
        client: A URL ("http://host:8000", "grpc://host:8001") or an existing `AsyncClient`
            (borrowed: its URL, timeout and retry policy are used, and it is left open).
        model: The generation model (default tinylm_generate).
        **options: `AsyncClient` options when a URL is given (timeout, retry, verbose, ...).

    Example:
        >>> async with AsyncTextGenerator("grpc://localhost:8001") as generator:
        ...     result = await generator.generate("def fib(n):", max_tokens=32, temperature=0)
        ...     print(result.text, result.finish_reason)
        ...     async with generator.stream("def fib(n):", max_tokens=32) as stream:
        ...         async for delta in stream:
        ...             print(delta.text, end="", flush=True)
    """

    MODEL = tensors.TEXT_GENERATOR

    def __init__(
        self, client: AsyncClient | str = DEFAULT_URL, *, model: str | None = None, **options: Any
    ) -> None:
        super().__init__(client, model=model, **options)
        self._streams = AsyncStreamTransport(
            self.client.protocol, self.client.address, verbose=bool(options.get("verbose", False))
        )

    async def __aenter__(self) -> AsyncTextGenerator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the generator's connections (requests still streaming are cancelled), and the
        client if this generator made it (a borrowed one stays open)."""
        await self._streams.close()
        await super().close()

    def _check_open(self) -> None:
        self.client._check_open()
        if self._streams.closed:
            raise RuntimeError(f"{self!r} is closed")

    async def generate(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        request_id: str | None = None,
        timeout: Any = DEFAULT,
    ) -> Generation:
        """Generates text for `prompt` and returns it whole (one response from the server).

        Args:
            prompt: The prompt (str, or UTF-8 bytes).
            max_tokens: Most tokens to generate (default: the model's, tinylm's is 64); the
                prompt and max_tokens together must fit the model's context.
            temperature: 0 is greedy (the same text every time); up to 2 (default 1).
            top_k: Sample among the k most likely tokens; 0 keeps all (default).
            top_p: Nucleus sampling, in (0, 1] (default 1).
            seed: The same seed, prompt and settings give the same text (default: a new draw).
            stop: A string, or up to 8, that end the text when generated (not included).
            request_id: An id sent with the request (gRPC: Triton logs and echoes it; Triton's
                HTTP generate endpoints take none) and carried by the result.
            timeout: Seconds for the whole request (default: the client's); past it the request
                is abandoned (over gRPC the server cancels it; over HTTP Triton 2.51 lets it
                run to its end) and DeadlineExceededError raised.

        Returns:
            A `Generation`: text, finish_reason ("stop", "length"), prompt_tokens,
            completion_tokens, latency_s, request_id.

        Raises:
            InvalidInputError: A bad field, named in the message and `input_name` (checked here
                for its type, by the model for its value: an empty prompt, a temperature above
                2, max_tokens beyond the context ...).
            ServerUnavailableError: The server cannot be reached or its engine's queue is full
                (retried per the client's policy).
            ModelNotFoundError, ModelNotReadyError, DeadlineExceededError, ServerError: see
                `kiln.clients.errors`.
        """
        call = encode_call(
            self.model, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop, stream=False, request_id=request_id,
        )
        start = time.perf_counter()
        async with AsyncGenerationStream(self, call, timeout) as replies:
            async for _ in replies:
                pass
        return replies.progress.generation(time.perf_counter() - start, request_id)

    def stream(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] = (),
        request_id: str | None = None,
        timeout: Any = DEFAULT,
    ) -> AsyncGenerationStream:
        """Generates text for `prompt`, delta by delta as the model produces it.

        Takes the arguments of `generate` (`timeout` bounds the whole stream). The request is sent
        when iteration starts. The last `GenerationDelta` carries the finish reason and the token
        counts; joined, the deltas' texts are the text `generate` gives for the same request.

        Closing the stream before its last delta (`aclose()`, the end of its `async with stream:`
        block, or dropping it after a `break`) cancels the request on the server, which then
        frees its KV cache at once.

        Returns:
            The request's `AsyncGenerationStream`: `async for delta in stream:` (inside
            `async with stream:` to be sure it is closed).

        Raises:
            InvalidInputError: A field of the wrong type (at once); the rest as `generate`,
                while iterating.
        """
        call = encode_call(
            self.model, prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop, stream=True, request_id=request_id,
        )
        return AsyncGenerationStream(self, call, timeout)


class AsyncGenerationStream:
    """The deltas of one generation request, as they arrive (`AsyncTextGenerator.stream`).

    Iterate it (`async for delta in stream:`); the request is sent at the first step, and errors
    a retry can fix (the server unreachable, the engine's queue full) are retried until the
    first reply per the client's policy, never after. Closing it early (`aclose()`, the end of
    its `async with stream:` block, or letting it go after a `break`) cancels the request on
    the server.

    Attributes:
        model: The generation model.
        request_id: The request id sent, None when none was given.
        progress: What arrived so far (`progress.generation(...)` assembles the whole result).
    """

    def __init__(self, generator: AsyncTextGenerator, call: GenerationCall, timeout: Any) -> None:
        generator._check_open()
        self.model = call.model
        self.request_id = call.request_id
        self.progress = Progress()
        self._generator = generator
        self._call = call
        self._timeout: float | None = generator.client._timeout(timeout)
        self._replies: AsyncReplies | None = None
        self._started = 0.0
        self._finished = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, request_id={self.request_id!r})"

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> GenerationDelta:
        if self._finished:
            raise StopAsyncIteration
        try:
            if self._replies is None:
                reply = await self._open()
            else:
                reply = await self._replies.next()
        except KilnError:
            await self.aclose()
            raise
        except Exception as error:
            await self.aclose()
            raise self._error(error) from error
        except BaseException:  # cancelled, interrupted: the request is cancelled too
            await self.aclose()
            raise
        delta = self.progress.delta(reply, time.perf_counter() - self._started)
        if delta.final:
            self._finished = True
            await self.aclose()  # after the last reply: a graceful end, nothing is cancelled
        return delta

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Ends the stream; before its last delta, that cancels the request on the server.
        Idempotent."""
        self._finished = True
        replies, self._replies = self._replies, None
        if replies is not None:
            await replies.close()

    def __del__(self) -> None:
        replies = getattr(self, "_replies", None)
        if replies is not None:  # dropped before its end (a `break`): cancel the request
            try:
                replies.abort()
            except Exception:  # noqa: BLE001 - e.g. at interpreter exit: nothing more to do
                pass

    async def _open(self) -> Reply | None:
        """Sends the request and waits for its first reply, retrying per the client's policy
        what fails before that reply."""

        async def once() -> Reply | None:
            self._started = time.perf_counter()
            replies: AsyncReplies | None = None
            try:
                replies = await self._generator._streams.open(self._call, self._timeout)
                first = await replies.next()
            except BaseException as error:
                if replies is not None:
                    await replies.close()
                if isinstance(error, Exception) and not isinstance(error, KilnError):
                    raise self._error(error) from error
                raise
            self._replies = replies
            return first

        return await self._generator.client._retrying("generate", once)

    def _error(self, error: BaseException) -> KilnError:
        client = self._generator.client
        return generation_error(
            error, model=self.model, url=client.url, request_id=self.request_id, timeout=self._timeout
        )
