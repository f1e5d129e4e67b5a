"""`AsyncClient`: the generic client for asyncio (see `kiln.clients._core` for what it offers).

This module is the source of both generic clients: `scripts/unasync.py` writes
`kiln.clients._sync_client` (`Client`, blocking) from it by dropping async/await and renaming the
asyncio parts; a test fails when the written file differs. Edit this file, then run
`.venv/bin/python scripts/unasync.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

import numpy as np

from kiln.clients import shm as shm_module
from kiln.clients._concurrency import AsyncFanOut
from kiln.clients._core import (
    CLEANUP_TIMEOUT_S,
    DEFAULT,
    DEFAULT_CONCURRENCY,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    READY_POLL_S,
    RETIRED_POLL_S,
    InputArrays,
    Part,
    T,
    _Core,
    batch_size_of,
    chunk_ranges,
    concatenate,
    expand,
    isolation_jobs,
    log,
    plan_jobs,
    prepare_inputs,
    raise_first_failure,
    slice_inputs,
)
from kiln.clients._transport import AsyncTransport
from kiln.clients.errors import DeadlineExceededError, KilnError, ServerUnavailableError
from kiln.clients.models import ModelInfo, normalize_config, validate_inputs
from kiln.clients.results import InferResult
from kiln.clients.retry import RetryPolicy

__all__ = ["AsyncClient"]


class AsyncClient(_Core):
    """A client for a Triton server, over HTTP or gRPC, for asyncio: every call is a coroutine.

    Use it from one event loop; `async with` (or `await client.close()`) releases connections and
    shared memory.

    Args:
        url: "http://host:port" or "grpc://host:port" (or "host:port" with `protocol`).
        protocol: "http" or "grpc", when the URL has no scheme.
        timeout: Default per-call timeout in seconds (None: wait forever).
        retry: The retry policy (default `RetryPolicy()`: 3 attempts for unavailable servers and
            models not ready); None or `RetryPolicy.disabled()` turns retries off.
        concurrency: Requests a split call keeps in flight at once.
        shared_memory: Send inputs and receive fixed-size outputs through system shared memory
            (the server must run on this host). Per call, `infer(..., shared_memory=...)` decides.
        validate: Check inputs against the model's config before sending.
        verbose: Let tritonclient print every request.

    Example:
        >>> async with AsyncClient("grpc://localhost:8001") as client:
        ...     result = await client.infer("digits", {"pixels": np.zeros((1, 1, 8, 8), np.float32)})
        ...     result["logits"].shape
        (1, 10)
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        protocol: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = RetryPolicy(),  # noqa: B008 - frozen, shared safely
        concurrency: int = DEFAULT_CONCURRENCY,
        shared_memory: bool = False,
        validate: bool = True,
        verbose: bool = False,
    ) -> None:
        super().__init__(
            url, protocol=protocol, timeout=timeout, retry=retry, concurrency=concurrency,
            shared_memory=shared_memory, validate=validate,
        )
        self._transport = AsyncTransport(self.protocol, self.address, verbose=verbose)
        self._fan_out = AsyncFanOut(self.concurrency, self._check_open)

    # --- lifecycle ---

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Waits for in-flight split calls, unregisters and removes shared memory, closes
        connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        await self._fan_out.close()
        for region in self._regions.drain():
            await self._drop_region(region)
        deadline = time.monotonic() + CLEANUP_TIMEOUT_S
        while True:
            retired = self._regions.take_retired()
            if not retired:
                break
            final = time.monotonic() >= deadline
            for region in retired:
                await self._drop_region(region, final=final)
            await asyncio.sleep(RETIRED_POLL_S)
        await self._transport.close()

    # --- plumbing ---

    async def _retrying(self, what: str, attempt_once: Callable[[], Awaitable[T]]) -> T:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_once()
            except KilnError as error:
                wait = self.retry.backoff(attempt) if attempt < self.retry.max_attempts else 0.0
                if not self.retry.should_retry(error, attempt, time.monotonic() - start, wait):
                    raise
                self._log_retry(what, error, attempt, wait)
                await asyncio.sleep(wait)

    async def _call(
        self, what: str, method: str, *args: Any, model: str | None = None, timeout: Any = DEFAULT,
        retry: bool = True,
    ) -> Any:
        self._check_open()
        seconds = self._timeout(timeout)

        async def once() -> Any:
            try:
                return await getattr(self._transport, method)(*args, timeout=seconds)
            except Exception as error:
                raise self._translate(error, what, model, timeout=seconds) from error

        if retry:
            return await self._retrying(what, once)
        return await once()

    async def _drop_region(self, region: shm_module.Region, *, final: bool = False) -> None:
        """Unregisters and removes a region; one the server still uses is retired for later."""
        self._regions.discard(region)
        if region.registered:
            try:
                await self._transport.unregister_shm(region.name, timeout=CLEANUP_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - decided below
                if self._keep_for_later(error, region, final):
                    self._regions.retire(region)
                    return
            region.registered = False
        region.destroy()

    async def _region(self, byte_size: int, timeout: float | None) -> shm_module.Region:
        for retired in self._regions.take_retired():
            await self._drop_region(retired)
        region = self._regions.take(byte_size)
        if region is not None:
            return region
        region = self._regions.create(byte_size)
        try:
            await self._transport.register_shm(region.name, region.key, region.byte_size, timeout=timeout)
        except Exception as error:
            self._regions.discard(region)
            region.destroy()
            raise self._translate(error, "register_system_shared_memory", shared_memory=True) from error
        region.registered = True
        return region

    # --- health ---

    async def is_live(self, *, timeout: Any = DEFAULT) -> bool:
        """Whether the server is live; False when it cannot be reached."""
        try:
            return await self._call("is_live", "is_live", timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    async def is_ready(self, *, timeout: Any = DEFAULT) -> bool:
        """Whether the server is ready (every model it should serve is); False when unreachable."""
        try:
            return await self._call("is_ready", "is_ready", timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    async def is_model_ready(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> bool:
        """Whether `model` has a ready version; False when the server cannot be reached."""
        try:
            return await self._call(
                "is_model_ready", "is_model_ready", model, version, model=model, timeout=timeout,
                retry=False,
            )
        except ServerUnavailableError:
            return False

    async def wait_until_ready(self, models: Iterable[str] = (), *, timeout: float = 30.0) -> None:
        """Blocks until the server (and each of `models`) is ready.

        Raises:
            DeadlineExceededError: Not ready within `timeout` seconds; says what was not ready
                and the last answer.
        """
        models = list(models)
        deadline = time.monotonic() + timeout
        while True:
            last = "not ready"
            try:
                if not await self._call("is_ready", "is_ready", timeout=READY_POLL_S * 5, retry=False):
                    last = "server not ready"
                else:
                    pending = [
                        m for m in models
                        if not await self._call(
                            "is_model_ready", "is_model_ready", m, "", model=m,
                            timeout=READY_POLL_S * 5, retry=False,
                        )
                    ]
                    if not pending:
                        return
                    last = f"not ready: {', '.join(pending)}"
            except KilnError as error:
                last = error.server_message or error.message
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(self._not_ready_message(models, timeout, last), url=self.url)
            await asyncio.sleep(READY_POLL_S)

    # --- metadata ---

    async def server_metadata(self, *, timeout: Any = DEFAULT) -> dict[str, Any]:
        """The server's name, version and extensions."""
        return await self._call("server_metadata", "server_metadata", timeout=timeout)

    async def models(self, *, timeout: Any = DEFAULT) -> dict[str, str]:
        """Model name -> state ("READY", "UNAVAILABLE", ...) from the repository index."""
        index = await self._call("models", "repository_index", timeout=timeout)
        return {entry["name"]: entry.get("state") or "UNLOADED" for entry in index}

    async def model_metadata(
        self, model: str, *, version: str = "", timeout: Any = DEFAULT
    ) -> dict[str, Any]:
        """The model's KServe metadata: name, versions, platform, inputs, outputs (ints as ints)."""
        return await self._call(
            "model_metadata", "model_metadata", model, version, model=model, timeout=timeout
        )

    async def model_config(
        self, model: str, *, version: str = "", timeout: Any = DEFAULT
    ) -> dict[str, Any]:
        """The model's config as a dict, the same over HTTP and gRPC."""
        config = await self._call(
            "model_config", "model_config", model, version, model=model, timeout=timeout
        )
        return normalize_config(config)

    async def model_info(
        self, model: str, *, version: str = "", refresh: bool = False, timeout: Any = DEFAULT
    ) -> ModelInfo:
        """The model's tensors and max_batch_size (from its config; cached per client)."""
        cached = None if refresh else self._cached_info(model, version)
        if cached is not None:
            return cached
        config = await self.model_config(model, version=version, timeout=timeout)
        return self._store_info(model, version, config)

    # --- inference ---

    async def infer(
        self,
        model: str,
        inputs: InputArrays,
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        request_id: str | None = None,
        timeout: Any = DEFAULT,
        shared_memory: bool | None = None,
        validate: bool | None = None,
    ) -> InferResult:
        """Sends one request of named arrays and returns the outputs.

        Args:
            model: The model's name.
            inputs: Input name -> array, with the batch dim first when the model batches.
            outputs: The outputs to return (default: all).
            version: The model version ("" : the server's choice).
            request_id: An id Triton logs and echoes (and `result.request_id` carries).
            timeout: Seconds for this call (default: the client's).
            shared_memory: Use system shared memory for this call (default: the client's).
            validate: Check the inputs against the model first (default: the client's).

        Raises:
            InvalidInputError, ModelNotFoundError, ModelNotReadyError, ServerUnavailableError,
            DeadlineExceededError, ServerError: see `kiln.clients.errors`.
        """
        self._check_open()
        arrays = prepare_inputs(inputs)
        use_shm = self.shared_memory if shared_memory is None else shared_memory
        check = self.validate if validate is None else validate
        info = await self.model_info(model, version=version) if (check or use_shm) else None
        if check:
            validate_inputs(info, arrays)
        return await self._retrying(
            "infer",
            lambda: self._infer_once(model, arrays, outputs, info, version, request_id, timeout, use_shm),
        )

    async def _infer_once(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        info: ModelInfo | None,
        version: str,
        request_id: str | None,
        timeout: Any,
        use_shm: bool,
    ) -> InferResult:
        seconds = self._timeout(timeout)
        layout = self._layout(info, arrays, outputs, use_shm)
        for resend in (False, True):
            region = await self._region(layout.byte_size, seconds) if layout is not None else None
            start = time.perf_counter()
            try:
                module = self._transport.module
                tensors, requested = self._build(module, arrays, outputs, info, layout, region)
                raw = await self._transport.infer(
                    model, tensors, requested, version=version, request_id=request_id or "", timeout=seconds
                )
                latency = time.perf_counter() - start
                result = self._parse(raw, model, layout, region, latency, request_id)
            except Exception as error:
                if region is not None:
                    await self._drop_region(region)
                    if not resend and self._lost_region(error, region):
                        log.info("the server lost this client's shared memory (restarted?); registering anew")
                        for stale in self._regions.drain():
                            await self._drop_region(stale)
                        continue
                    region = None
                raise self._translate(
                    error, "infer", model, request_id=request_id, timeout=seconds, shared_memory=use_shm
                ) from error
            else:
                if region is not None:
                    self._regions.give_back(region)
                log.debug("infer %s request_id=%s: %.2f ms", model, request_id, latency * 1e3)
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    async def infer_batch(
        self,
        model: str,
        inputs: InputArrays,
        outputs: Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        version: str = "",
        request_id: str | None = None,
        timeout: Any = DEFAULT,
        shared_memory: bool | None = None,
    ) -> InferResult:
        """Like `infer`, for any number of items: split into requests of the model's
        max_batch_size (or `batch_size`), sent `concurrency` at a time, outputs in input order.

        The i-th request carries request id "<request_id>-<i>" when a request id is given; the
        result's latency is the whole call's.

        Raises:
            KilnError: The first failed request's error (in item order), its message and
                `items` naming the item range that request carried.
        """
        self._check_open()
        start = time.perf_counter()
        arrays = prepare_inputs(inputs)
        info, parts = await self._infer_parts(
            model, arrays, outputs, version=version, request_id=request_id, timeout=timeout,
            shared_memory=shared_memory, chunk=batch_size, isolate=False,
        )
        total = batch_size_of(info, arrays)
        raise_first_failure(parts, total)
        return concatenate([p.result for p in parts], model, time.perf_counter() - start, request_id)

    async def _infer_parts(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None = None,
        *,
        version: str = "",
        request_id: str | None = None,
        timeout: Any = DEFAULT,
        shared_memory: bool | None = None,
        chunk: int | None = None,
        isolate: bool = True,
    ) -> tuple[ModelInfo, list[Part]]:
        """A split call, part by part: the seam the task clients run every task through
        (`kiln.clients._async_tasks`; `infer_batch` uses it too).

        Reads the model's info (cached), checks `arrays` against it (any batch size), and sends
        them as requests of `chunk` items (default: max_batch_size), `concurrency` at a time;
        with `isolate` (the task clients' default), a multi-item request that failed with an
        error one item may cause is resent item by item.

        Returns:
            The model's info, and one `Part` per request in item order, holding its result or
            the error it failed with.

        Raises:
            InvalidInputError: Inputs that do not fit the model (nothing sent); a KilnError when
                the model's info cannot be read. A failed request never raises: its Part holds it.
        """
        self._check_open()
        info = await self.model_info(model, version=version)
        validate_inputs(info, arrays, split=True)
        parts = await self._run_parts(
            model, arrays, outputs, info, version=version, request_id=request_id, timeout=timeout,
            shared_memory=shared_memory, chunk=chunk, isolate=isolate,
        )
        return info, parts

    async def _run_parts(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        info: ModelInfo,
        *,
        version: str,
        request_id: str | None,
        timeout: Any,
        shared_memory: bool | None,
        chunk: int | None,
        isolate: bool,
    ) -> list[Part]:
        """Runs a validated call as requests of `chunk` items (default: max_batch_size),
        concurrently; with `isolate`, a multi-item request that failed with an error one item
        may cause is resent item by item. Never raises for a failed request: its Part holds it."""
        use_shm = self.shared_memory if shared_memory is None else shared_memory
        total = batch_size_of(info, arrays)
        ranges = chunk_ranges(total, chunk or info.max_batch_size) if info.batches else [range(0, 1)]

        async def send(items: range, rid: str | None) -> InferResult | KilnError:
            part_inputs = slice_inputs(arrays, items) if info.batches else dict(arrays)
            try:
                return await self._retrying("infer", lambda: self._infer_once(
                    model, part_inputs, outputs, info, version, rid, timeout, use_shm))
            except KilnError as error:
                return error

        jobs = plan_jobs(ranges, request_id)
        results = await self._fan_out.map(send, jobs)
        parts = [Part(items, result) for (items, _), result in zip(jobs, results, strict=True)]
        retry_jobs = isolation_jobs(parts, request_id) if isolate else []
        if not retry_jobs:
            return parts
        results = await self._fan_out.map(send, retry_jobs)
        return expand(parts, [Part(items, r) for (items, _), r in zip(retry_jobs, results, strict=True)])
