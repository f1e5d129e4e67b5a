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
    DEFAULT_IDEMPOTENT,
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
from kiln.clients._replicas import DEFAULT_BALANCE, PROBE_TIMEOUT_S, ReplicaBackoff, failover
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
        url: "http://host:port" or "grpc://host:port" (or "host:port" with `protocol`); or a
            sequence of such URLs, one per replica of the same models, all of one protocol: each
            request goes to one of them (`balance`), and one a replica refused goes to another
            (see "Several replicas" in docs/client.md and `kiln.clients._replicas`).
        protocol: "http" or "grpc", when the URL has no scheme.
        timeout: Default per-call timeout in seconds (None: wait forever).
        retry: The retry policy (default `RetryPolicy()`: 3 attempts for unavailable servers and
            models not ready); None or `RetryPolicy.disabled()` turns retries off.
        concurrency: Requests a split call keeps in flight at once.
        shared_memory: Send inputs and receive fixed-size outputs through system shared memory
            (the server must run on this host). Per call, `infer(..., shared_memory=...)` decides.
        validate: Check inputs against the model's config before sending.
        verbose: Let tritonclient print every request.
        balance: With several replicas, which one a request goes to: "round_robin" (in turn) or
            "least_outstanding" (the fewest of this client's requests in flight, ties in turn).
        replica_backoff: With several replicas, how long one that refused (or failed its
            readiness probe) is skipped before it is probed again.
        idempotent: With several replicas, whether an inference that may have run (the
            connection was lost after sending, the server cancelled it, it timed out) may be
            resent to another replica; per call, `infer(..., idempotent=...)` decides. Default
            False: the client cannot know a model has no side effects, and resending after a
            timeout doubles the work of a fleet that is already too slow. Refusals the server did
            not run always fail over. Metadata and health calls are reads: always resent.

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
        balance: str = DEFAULT_BALANCE,
        replica_backoff: ReplicaBackoff = ReplicaBackoff(),  # noqa: B008 - frozen, shared safely
        idempotent: bool = DEFAULT_IDEMPOTENT,
    ) -> None:
        super().__init__(
            url, protocol=protocol, timeout=timeout, retry=retry, concurrency=concurrency,
            shared_memory=shared_memory, validate=validate, balance=balance,
            replica_backoff=replica_backoff, idempotent=idempotent,
        )
        self._transports = [
            AsyncTransport(self.protocol, address, verbose=verbose) for address in self.addresses
        ]
        self._transport = self._transports[0]  # the one replica shared memory is used with
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
        for transport in self._transports:
            await transport.close()

    # --- plumbing ---

    async def _retrying(
        self, what: str, attempt_once: Callable[[], Awaitable[T]], *, idempotent: bool = True
    ) -> T:
        """Runs `attempt_once()` under the RetryPolicy (the generation streams call it too)."""
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return await attempt_once()
            except KilnError as error:
                wait = self.retry.backoff(attempt) if attempt < self.retry.max_attempts else 0.0
                if not self._may_retry(error, idempotent) or not self.retry.should_retry(
                    error, attempt, time.monotonic() - start, wait
                ):
                    raise
                self._log_retry(what, error, attempt, wait)
                await asyncio.sleep(wait)

    async def _balanced(
        self, what: str, attempt_once: Callable[[int], Awaitable[T]], *, model: str | None = None,
        idempotent: bool = True, request_id: str | None = None, counted: bool = True,
    ) -> T:
        """Runs `attempt_once(replica index)` under the RetryPolicy, each attempt trying the
        replicas (`_on_replicas`): a refusal fails over at once, and the policy's backoff comes
        only after every replica refused. `counted`: an inference (counted in `replicas`)."""
        return await self._retrying(
            what, lambda: self._on_replicas(what, attempt_once, model, idempotent, request_id, counted),
            idempotent=idempotent,
        )

    async def _on_replicas(
        self, what: str, attempt_once: Callable[[int], Awaitable[T]], model: str | None, idempotent: bool,
        request_id: str | None, counted: bool,
    ) -> T:
        """One attempt: the replicas in the order `ReplicaSet.choose` gives, until one answers or
        an error must not go elsewhere (`kiln.clients._replicas.failover`). One replica: its
        error as is. Several, all failed: one error naming each URL and its answer."""
        tried: list[int] = []
        failures: list[tuple[str, KilnError | str]] = []
        while True:
            pick = self._replicas.choose(tried)
            if pick is None:
                raise self._all_failed(what, model, failures, request_id) from (
                    next((e for _, e in reversed(failures) if isinstance(e, KilnError)), None)
                )
            tried.append(pick.index)
            url = self.urls[pick.index]
            if pick.probe:
                problem = await self._probe(pick.index)
                if problem is not None:
                    failures.append((url, problem))
                    continue
            self._replicas.started(pick.index, counted)
            try:
                result = await attempt_once(pick.index)
            except KilnError as error:
                verdict = failover(error, idempotent)
                self._replicas.failed(pick.index, error, verdict.back_off, counted)
                if self._replicas.single or not verdict.elsewhere:
                    raise
                self._log_failover(what, url, error)
                failures.append((url, error))
                continue
            except BaseException:
                self._replicas.failed(pick.index, None, False, counted)
                raise
            self._replicas.succeeded(pick.index, counted)
            return result

    async def _probe(self, index: int) -> str | None:
        """Asks replica `index` whether it is ready (/v2/health/ready); None if it is, else why
        not. The answer is reported to the replica set either way."""
        ready, detail = False, "probe interrupted"
        try:
            ready = await self._transports[index].is_ready(timeout=PROBE_TIMEOUT_S)
            detail = "not ready (readiness probe)"
        except Exception as error:  # noqa: BLE001 - any failure means not ready
            translated = self._translate(error, "is_ready", timeout=PROBE_TIMEOUT_S, url=self.urls[index])
            detail = f"readiness probe failed: {translated.server_message or translated.message}"
        finally:
            self._replicas.probed(index, ready, None if ready else detail)
        return None if ready else detail

    async def _call(
        self, what: str, method: str, *args: Any, model: str | None = None, timeout: Any = DEFAULT
    ) -> Any:
        """A metadata call, retried and failed over (a read: safe to resend anywhere)."""
        self._check_open()
        seconds = self._timeout(timeout)

        async def once(index: int) -> Any:
            try:
                return await getattr(self._transports[index], method)(*args, timeout=seconds)
            except Exception as error:
                raise self._translate(error, what, model, timeout=seconds, url=self.urls[index]) from error

        return await self._balanced(what, once, model=model, counted=False)

    async def _ask_any(
        self, what: str, method: str, *args: Any, model: str | None = None, timeout: Any = DEFAULT
    ) -> bool:
        """A health question, asked of each replica in turn until one says yes (no retries).
        An unreachable replica says no; with one replica, any other error is raised."""
        self._check_open()
        seconds = self._timeout(timeout)
        for index, transport in enumerate(self._transports):
            try:
                if await getattr(transport, method)(*args, timeout=seconds):
                    return True
            except Exception as error:
                translated = self._translate(error, what, model, timeout=seconds, url=self.urls[index])
                if self._replicas.single and not isinstance(translated, ServerUnavailableError):
                    raise translated from error
        return False

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
        """Whether the server is live; False when it cannot be reached. Several replicas:
        whether any is."""
        return await self._ask_any("is_live", "is_live", timeout=timeout)

    async def is_ready(self, *, timeout: Any = DEFAULT) -> bool:
        """Whether the server is ready (every model it should serve is); False when unreachable.
        Several replicas: whether any is."""
        return await self._ask_any("is_ready", "is_ready", timeout=timeout)

    async def is_model_ready(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> bool:
        """Whether `model` has a ready version; False when the server cannot be reached. Several
        replicas: whether any has."""
        return await self._ask_any(
            "is_model_ready", "is_model_ready", model, version, model=model, timeout=timeout
        )

    async def wait_until_ready(self, models: Iterable[str] = (), *, timeout: float = 30.0) -> None:
        """Blocks until the server (and each of `models`) is ready; with several replicas, until
        one is (requests go only to replicas that answer).

        Raises:
            DeadlineExceededError: Not ready within `timeout` seconds; says what was not ready
                and the last answer.
        """
        models = list(models)
        deadline = time.monotonic() + timeout
        while True:
            last = "not ready"
            try:
                if not await self._ask_any("is_ready", "is_ready", timeout=READY_POLL_S * 5):
                    last = "server not ready"
                else:
                    pending = [
                        m for m in models
                        if not await self._ask_any(
                            "is_model_ready", "is_model_ready", m, "", model=m, timeout=READY_POLL_S * 5
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
        idempotent: bool | None = None,
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
            idempotent: With several replicas, resend it to another after a failure that may
                have run it (default: the client's, see `AsyncClient`).

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
        return await self._balanced(
            "infer",
            lambda index: self._infer_once(
                index, model, arrays, outputs, info, version, request_id, timeout, use_shm
            ),
            model=model, request_id=request_id,
            idempotent=self.idempotent if idempotent is None else idempotent,
        )

    async def _infer_once(
        self,
        index: int,
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
                transport = self._transports[index]
                tensors, requested = self._build(transport.module, arrays, outputs, info, layout, region)
                raw = await transport.infer(
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
                    error, "infer", model, request_id=request_id, timeout=seconds, shared_memory=use_shm,
                    url=self.urls[index],
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
        idempotent: bool | None = None,
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
            shared_memory=shared_memory, chunk=batch_size, isolate=False, idempotent=idempotent,
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
        idempotent: bool | None = None,
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
            shared_memory=shared_memory, chunk=chunk, isolate=isolate, idempotent=idempotent,
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
        idempotent: bool | None = None,
    ) -> list[Part]:
        """Runs a validated call as requests of `chunk` items (default: max_batch_size),
        concurrently; with `isolate`, a multi-item request that failed with an error one item
        may cause is resent item by item. Never raises for a failed request: its Part holds it."""
        use_shm = self.shared_memory if shared_memory is None else shared_memory
        resend = self.idempotent if idempotent is None else idempotent
        total = batch_size_of(info, arrays)
        ranges = chunk_ranges(total, chunk or info.max_batch_size) if info.batches else [range(0, 1)]

        async def send(items: range, rid: str | None) -> InferResult | KilnError:
            part_inputs = slice_inputs(arrays, items) if info.batches else dict(arrays)
            try:
                return await self._balanced(
                    "infer",
                    lambda index: self._infer_once(
                        index, model, part_inputs, outputs, info, version, rid, timeout, use_shm
                    ),
                    model=model, idempotent=resend, request_id=rid,
                )
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
