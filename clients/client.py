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
- connection reuse, and `close()` / context managers that release connections and shared memory.

Every error is a `KilnError` subclass (see `kiln.clients.errors`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException

from kiln.clients import shm as shm_module
from kiln.clients._transport import (
    HTTP,
    PROTOCOLS,
    AsyncTransport,
    SyncTransport,
    output_names,
    output_shape,
    response_info,
)
from kiln.clients.errors import (
    DeadlineExceededError,
    InvalidInputError,
    KilnError,
    ServerError,
    ServerUnavailableError,
    translate,
)
from kiln.clients.models import (
    ModelInfo,
    batch_size,
    normalize_config,
    triton_dtype,
    validate_inputs,
)
from kiln.clients.results import InferResult
from kiln.clients.retry import RetryPolicy

log = logging.getLogger("kiln.clients")

T = TypeVar("T")

DEFAULT_URL = "http://localhost:8000"
DEFAULT_TIMEOUT_S = 60.0
"""Per-call timeout unless the client or the call says otherwise."""
DEFAULT_CONCURRENCY = 4
"""Requests a split call (`infer_batch`, the task clients) keeps in flight at once."""
READY_POLL_S = 0.2
"""How often `wait_until_ready` asks."""
CLEANUP_TIMEOUT_S = 5.0
"""Timeout of an unregister call, and how long `close()` keeps trying to unregister regions a
timed-out request still holds."""
RETIRED_POLL_S = 0.05
ISOLATABLE: tuple[type[KilnError], ...] = (InvalidInputError, ServerError)
"""Errors that may belong to one item of a multi-item request (a corrupt image, an empty text):
the task clients resend that request's items one by one to tell which item failed."""

InputArrays = Mapping[str, Any]
"""Input name -> numpy array (or anything np.asarray takes; strings become BYTES)."""


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Default()
"""Sentinel: use the client's default (e.g. for `timeout`)."""


def parse_url(url: str, protocol: str | None) -> tuple[str, str]:
    """(protocol, "host:port") from a URL with or without a scheme.

    "http://h:8000" and "grpc://h:8001" name their protocol; "h:8000" needs `protocol` (else
    HTTP). A scheme and a different `protocol` is an error.
    """
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if "://" in url:
        parsed = urllib.parse.urlsplit(url)
        scheme = parsed.scheme.lower()
        if scheme not in PROTOCOLS:
            raise ValueError(
                f"unsupported URL scheme {scheme!r} in {url!r}: use http://host:port or grpc://host:port"
            )
        if protocol is not None and protocol != scheme:
            raise ValueError(f"the URL {url!r} says {scheme} but protocol={protocol!r}")
        if parsed.path not in ("", "/") or parsed.query:
            raise ValueError(f"the URL {url!r} must be scheme://host:port, with no path")
        address = parsed.netloc
        protocol = scheme
    else:
        address = url.rstrip("/")
        protocol = protocol or HTTP
    if not address:
        raise ValueError(f"no host in URL {url!r}")
    return protocol, address


def prepare_inputs(inputs: InputArrays) -> dict[str, np.ndarray]:
    """Named inputs as numpy arrays; str/bytes arrays become object arrays of UTF-8 bytes.

    Raises:
        InvalidInputError: An input that is not array-like, or a BYTES input holding something
            other than str or bytes (naming the input and the item).
    """
    if not isinstance(inputs, Mapping):
        raise InvalidInputError(
            f"inputs must be a mapping of input name -> array, given {type(inputs).__name__}"
        )
    arrays = {}
    for name, value in inputs.items():
        try:
            array = np.asarray(value)
        except (ValueError, TypeError) as error:
            raise InvalidInputError(f"input '{name}' is not an array: {error}", input_name=name) from error
        if array.dtype.kind in "USO":
            array = _bytes_array(name, array)
        arrays[name] = array
    return arrays


def _bytes_array(name: str, array: np.ndarray) -> np.ndarray:
    out = np.empty(array.shape, dtype=np.object_)
    flat_in, flat_out = array.reshape(-1), out.reshape(-1)
    for i, item in enumerate(flat_in):
        if isinstance(item, (bytes, np.bytes_)):
            flat_out[i] = bytes(item)
        elif isinstance(item, (str, np.str_)):
            flat_out[i] = str(item).encode("utf-8")
        else:
            raise InvalidInputError(
                f"input '{name}': item {i} must be str or bytes for a BYTES tensor, "
                f"given {type(item).__name__}",
                input_name=name, expected="str or bytes", given=type(item).__name__, item=i,
            )
    return out


def chunk_ranges(total: int, size: int) -> list[range]:
    """Consecutive item ranges of at most `size` items covering `total` items."""
    if size < 1:
        raise ValueError(f"chunk size must be >= 1, got {size}")
    return [range(start, min(start + size, total)) for start in range(0, total, size)]


def _sub_id(request_id: str | None, suffix: str) -> str | None:
    return None if request_id is None else f"{request_id}-{suffix}"


def slice_inputs(arrays: Mapping[str, np.ndarray], items: range) -> dict[str, np.ndarray]:
    """The rows `items` of every input."""
    return {name: array[items.start : items.stop] for name, array in arrays.items()}


def concatenate(
    results: Sequence[InferResult], model: str, latency_s: float, request_id: str | None
) -> InferResult:
    """One result from the results of consecutive chunks (outputs joined along the batch dim)."""
    names = list(results[0].outputs)
    outputs = {name: np.concatenate([r.outputs[name] for r in results]) for name in names}
    return InferResult(model, outputs, latency_s, request_id, results[0].model_version)


@dataclass(frozen=True)
class Part:
    """The items of a split call that one request carried, and what came back.

    Attributes:
        items: The item indices (within the call) the request carried.
        result: Its result, or the error it failed with.
    """

    items: range
    result: InferResult | KilnError


def raise_first_failure(parts: Sequence[Part], total: int) -> None:
    """Raises the first failed part's error, naming its items (one item: "item i of n")."""
    for part in parts:
        if isinstance(part.result, KilnError):
            error = part.result
            if len(part.items) == 1 and total > 1:
                item = part.items.start
                copy = error.for_items(part.items, total)
                copy.message = f"item {item} of {total}: {error.message}"
                copy.args = (copy.message,)
                if isinstance(copy, InvalidInputError):
                    copy.item = item
                raise copy from error.__cause__
            if total > 1:
                raise error.for_items(part.items, total) from error.__cause__
            raise error


def plan_jobs(ranges: Sequence[range], request_id: str | None) -> list[tuple[range, str | None]]:
    """(items, request id) per request; ids get "-<i>" suffixes when there are several."""
    several = len(ranges) > 1
    return [(items, _sub_id(request_id, str(i)) if several else request_id) for i, items in enumerate(ranges)]


def isolation_jobs(parts: Sequence[Part], request_id: str | None) -> list[tuple[range, str | None]]:
    """One single-item job per item of each multi-item part that failed with an ISOLATABLE error."""
    return [
        (range(i, i + 1), _sub_id(request_id, f"item{i}"))
        for part in parts
        if isinstance(part.result, ISOLATABLE) and len(part.items) > 1
        for i in part.items
    ]


def expand(parts: Sequence[Part], singles: Sequence[Part]) -> list[Part]:
    """`parts` with each isolated multi-item part replaced by its single-item parts."""
    by_item = {part.items.start: part for part in singles}
    expanded: list[Part] = []
    for part in parts:
        if isinstance(part.result, ISOLATABLE) and len(part.items) > 1:
            expanded.extend(by_item[i] for i in part.items)
        else:
            expanded.append(part)
    return expanded


class _Core:
    """What the sync and async clients share: configuration, request building, result parsing."""

    def __init__(
        self,
        url: str,
        *,
        protocol: str | None,
        timeout: float | None,
        retry: RetryPolicy | None,
        concurrency: int,
        shared_memory: bool,
        validate: bool,
    ) -> None:
        self.protocol, self.address = parse_url(url, protocol)
        self.url = f"{self.protocol}://{self.address}"
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds or None, got {timeout}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if shared_memory and not shm_module.available():
            raise ValueError(f"shared_memory=True needs POSIX shared memory at {shm_module.SHM_DIR}")
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy.disabled()
        self.concurrency = concurrency
        self.shared_memory = shared_memory
        self.validate = validate
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._infos_lock = threading.Lock()
        self._regions = shm_module.RegionPool()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # --- helpers ---

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _translate(self, error: BaseException, what: str, model: str | None = None, *,
                   request_id: str | None = None, timeout: float | None = None,
                   shared_memory: bool = False) -> KilnError:
        return translate(
            error, what=what, model=model, url=self.url, request_id=request_id, timeout=timeout,
            shared_memory=shared_memory,
        )

    def _keep_for_later(self, error: BaseException, region: shm_module.Region, final: bool) -> bool:
        """After a failed unregister: whether to retire the region and try again later.

        A server that cannot be reached has lost (or will lose) it anyway; one that answered is
        still using it (a timed-out request), unless this is the last try (`close()`).
        """
        translated = self._translate(error, "unregister_system_shared_memory")
        log.debug("could not unregister shared memory %s: %s", region.name, translated)
        return not final and not isinstance(translated, ServerUnavailableError)

    @staticmethod
    def _lost_region(error: BaseException, region: shm_module.Region | None) -> bool:
        """Whether the server no longer knows `region` (it restarted): re-register and resend."""
        return (
            region is not None
            and isinstance(error, InferenceServerException)
            and region.name in (error.message() or "")
        )

    def _cached_info(self, model: str, version: str) -> ModelInfo | None:
        with self._infos_lock:
            return self._infos.get((model, version))

    def _store_info(self, model: str, version: str, config: Mapping[str, Any]) -> ModelInfo:
        info = ModelInfo.from_config(normalize_config(config))
        with self._infos_lock:
            self._infos[(model, version)] = info
        return info

    def _layout(self, info: ModelInfo | None, arrays: Mapping[str, np.ndarray], outputs: Sequence[str] | None,
                use_shm: bool) -> shm_module.Layout | None:
        if not use_shm or info is None:
            return None
        wanted = list(outputs) if outputs is not None else [t.name for t in info.outputs]
        return shm_module.plan_layout(info, arrays, wanted, batch_size(info, arrays))

    def _build(
        self,
        module: Any,
        arrays: Mapping[str, np.ndarray],
        outputs: Sequence[str] | None,
        info: ModelInfo | None,
        layout: shm_module.Layout | None,
        region: shm_module.Region | None,
    ) -> tuple[list[Any], list[Any] | None]:
        """tritonclient InferInputs (data or shm references) and InferRequestedOutputs."""
        inputs = []
        placed = {p.name: p for p in layout.inputs} if layout is not None else {}
        for name, array in arrays.items():
            datatype = triton_dtype(array.dtype)
            if datatype is None:
                raise InvalidInputError(
                    f"input '{name}': numpy {array.dtype} has no Triton data type", input_name=name,
                    given=str(array.dtype),
                )
            tensor = module.InferInput(name, list(array.shape), datatype)
            if region is not None and name in placed:
                placement = placed[name]
                region.write(placement.offset, placement.data)
                tensor.set_shared_memory(region.name, placement.byte_size, placement.offset)
            else:
                try:
                    tensor.set_data_from_numpy(array)
                except InferenceServerException as error:
                    raise InvalidInputError(
                        f"input '{name}': {error.message()}", input_name=name, server_message=error.message()
                    ) from error
            inputs.append(tensor)
        if outputs is None and (layout is None or not layout.outputs):
            return inputs, None
        names = list(outputs) if outputs is not None else [t.name for t in info.outputs] if info else []
        requested = []
        out_placed = {p.name: p for p in layout.outputs} if layout is not None else {}
        for name in names:
            output = module.InferRequestedOutput(name)
            if region is not None and name in out_placed:
                placement = out_placed[name]
                output.set_shared_memory(region.name, placement.byte_size, placement.offset)
            requested.append(output)
        return inputs, requested

    def _parse(
        self,
        raw: Any,
        model: str,
        layout: shm_module.Layout | None,
        region: shm_module.Region | None,
        latency_s: float,
        request_id: str | None,
    ) -> InferResult:
        in_shm = {p.name: p for p in layout.outputs} if layout is not None and region is not None else {}
        outputs = {}
        for name in output_names(raw):
            if name in in_shm:
                shape, datatype = output_shape(raw, name)
                outputs[name] = region.read(in_shm[name].offset, datatype, shape)
            else:
                outputs[name] = raw.as_numpy(name)
        echoed_id, version = response_info(raw)
        return InferResult(model, outputs, latency_s, echoed_id or request_id, version)

    def _log_retry(self, what: str, error: KilnError, attempt: int, wait: float) -> None:
        log.warning(
            "%s: attempt %d failed (%s: %s); retrying in %.2f s",
            what, attempt, type(error).__name__, error.server_message or error.message, wait,
        )

    def _not_ready_message(self, models: Sequence[str], timeout: float, last: str) -> str:
        what = f"models {', '.join(models)} at {self.url}" if models else f"the server at {self.url}"
        return f"{what} not ready after {timeout:g} s ({last})"


class Client(_Core):
    """A blocking client for a Triton server, over HTTP or gRPC.

    Thread-safe: each thread gets its own underlying tritonclient (the HTTP one is not
    thread-safe), reused for every call that thread makes. Close it (or use `with`) to release
    connections and shared memory.

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
        >>> with Client("grpc://localhost:8001") as client:
        ...     result = client.infer("digits", {"pixels": np.zeros((1, 1, 8, 8), np.float32)})
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
        self._transport = SyncTransport(self.protocol, self.address, verbose=verbose)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    # --- lifecycle ---

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Waits for in-flight split calls, unregisters and removes shared memory, closes
        connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)
        for region in self._regions.drain():
            self._drop_region(region)
        deadline = time.monotonic() + CLEANUP_TIMEOUT_S
        while True:
            retired = self._regions.take_retired()
            if not retired:
                break
            final = time.monotonic() >= deadline
            for region in retired:
                self._drop_region(region, final=final)
            time.sleep(RETIRED_POLL_S)
        self._transport.close()

    # --- plumbing ---

    def _retrying(self, what: str, attempt_once: Callable[[], T]) -> T:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return attempt_once()
            except KilnError as error:
                wait = self.retry.backoff(attempt) if attempt < self.retry.max_attempts else 0.0
                if not self.retry.should_retry(error, attempt, time.monotonic() - start, wait):
                    raise
                self._log_retry(what, error, attempt, wait)
                time.sleep(wait)

    def _call(self, what: str, method: str, *args: Any, model: str | None = None, timeout: Any = DEFAULT,
              retry: bool = True) -> Any:
        self._check_open()
        seconds = self._timeout(timeout)

        def once() -> Any:
            try:
                return getattr(self._transport, method)(*args, timeout=seconds)
            except Exception as error:
                raise self._translate(error, what, model, timeout=seconds) from error

        return self._retrying(what, once) if retry else once()

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="kiln-client")
            return self._executor

    def _drop_region(self, region: shm_module.Region, *, final: bool = False) -> None:
        """Unregisters and removes a region; one the server still uses is retired for later."""
        self._regions.discard(region)
        if region.registered:
            try:
                self._transport.unregister_shm(region.name, timeout=CLEANUP_TIMEOUT_S)
            except Exception as error:  # noqa: BLE001 - decided below
                if self._keep_for_later(error, region, final):
                    self._regions.retire(region)
                    return
            region.registered = False
        region.destroy()

    def _region(self, byte_size: int, timeout: float | None) -> shm_module.Region:
        for retired in self._regions.take_retired():
            self._drop_region(retired)
        region = self._regions.take(byte_size)
        if region is not None:
            return region
        region = self._regions.create(byte_size)
        try:
            self._transport.register_shm(region.name, region.key, region.byte_size, timeout=timeout)
        except Exception as error:
            self._regions.discard(region)
            region.destroy()
            raise self._translate(error, "register_system_shared_memory", shared_memory=True) from error
        region.registered = True
        return region

    # --- health ---

    def is_live(self, *, timeout: Any = DEFAULT) -> bool:
        """Whether the server is live; False when it cannot be reached."""
        try:
            return self._call("is_live", "is_live", timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    def is_ready(self, *, timeout: Any = DEFAULT) -> bool:
        """Whether the server is ready (every model it should serve is); False when unreachable."""
        try:
            return self._call("is_ready", "is_ready", timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    def is_model_ready(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> bool:
        """Whether `model` has a ready version; False when the server cannot be reached."""
        try:
            return self._call("is_model_ready", "is_model_ready", model, version, model=model,
                              timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    def wait_until_ready(self, models: Iterable[str] = (), *, timeout: float = 30.0) -> None:
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
                if not self._call("is_ready", "is_ready", timeout=READY_POLL_S * 5, retry=False):
                    last = "server not ready"
                else:
                    pending = [
                        m for m in models
                        if not self._call("is_model_ready", "is_model_ready", m, "", model=m,
                                          timeout=READY_POLL_S * 5, retry=False)
                    ]
                    if not pending:
                        return
                    last = f"not ready: {', '.join(pending)}"
            except KilnError as error:
                last = error.server_message or error.message
            if time.monotonic() >= deadline:
                raise DeadlineExceededError(self._not_ready_message(models, timeout, last), url=self.url)
            time.sleep(READY_POLL_S)

    # --- metadata ---

    def server_metadata(self, *, timeout: Any = DEFAULT) -> dict[str, Any]:
        """The server's name, version and extensions."""
        return self._call("server_metadata", "server_metadata", timeout=timeout)

    def models(self, *, timeout: Any = DEFAULT) -> dict[str, str]:
        """Model name -> state ("READY", "UNAVAILABLE", ...) from the repository index."""
        index = self._call("models", "repository_index", timeout=timeout)
        return {entry["name"]: entry.get("state") or "UNLOADED" for entry in index}

    def model_metadata(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> dict[str, Any]:
        """The model's KServe metadata: name, versions, platform, inputs, outputs (ints as ints)."""
        return self._call("model_metadata", "model_metadata", model, version, model=model, timeout=timeout)

    def model_config(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> dict[str, Any]:
        """The model's config as a dict, the same over HTTP and gRPC."""
        config = self._call("model_config", "model_config", model, version, model=model, timeout=timeout)
        return normalize_config(config)

    def model_info(self, model: str, *, version: str = "", refresh: bool = False,
                   timeout: Any = DEFAULT) -> ModelInfo:
        """The model's tensors and max_batch_size (from its config; cached per client)."""
        cached = None if refresh else self._cached_info(model, version)
        if cached is not None:
            return cached
        return self._store_info(model, version, self.model_config(model, version=version, timeout=timeout))

    # --- inference ---

    def infer(
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
        info = self.model_info(model, version=version) if (check or use_shm) else None
        if check:
            validate_inputs(info, arrays)
        return self._retrying(
            "infer",
            lambda: self._infer_once(model, arrays, outputs, info, version, request_id, timeout, use_shm),
        )

    def _infer_once(
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
            region = self._region(layout.byte_size, seconds) if layout is not None else None
            start = time.perf_counter()
            try:
                module = self._transport.module
                tensors, requested = self._build(module, arrays, outputs, info, layout, region)
                raw = self._transport.infer(
                    model, tensors, requested, version=version, request_id=request_id or "", timeout=seconds
                )
                latency = time.perf_counter() - start
                result = self._parse(raw, model, layout, region, latency, request_id)
            except Exception as error:
                if region is not None:
                    self._drop_region(region)
                    if not resend and self._lost_region(error, region):
                        log.info("the server lost this client's shared memory (restarted?); registering anew")
                        for stale in self._regions.drain():
                            self._drop_region(stale)
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

    def infer_batch(
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
        info = self.model_info(model, version=version)
        validate_inputs(info, arrays, split=True)
        parts = self._run_parts(model, arrays, outputs, info, version=version, request_id=request_id,
                                timeout=timeout, shared_memory=shared_memory, chunk=batch_size, isolate=False)
        total = batch_size_of(info, arrays)
        raise_first_failure(parts, total)
        return concatenate([p.result for p in parts], model, time.perf_counter() - start, request_id)

    def _run_parts(
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

        def send(items: range, rid: str | None) -> InferResult | KilnError:
            part_inputs = slice_inputs(arrays, items) if info.batches else dict(arrays)
            try:
                return self._retrying("infer", lambda: self._infer_once(
                    model, part_inputs, outputs, info, version, rid, timeout, use_shm))
            except KilnError as error:
                return error

        jobs = plan_jobs(ranges, request_id)
        parts = [Part(items, result) for (items, _), result in zip(jobs, self._map(send, jobs), strict=True)]
        retry_jobs = isolation_jobs(parts, request_id) if isolate else []
        if not retry_jobs:
            return parts
        results = self._map(send, retry_jobs)
        return expand(parts, [Part(items, r) for (items, _), r in zip(retry_jobs, results, strict=True)])

    def _map(
        self, send: Callable[[range, str | None], T], jobs: Sequence[tuple[range, str | None]]
    ) -> list[T]:
        if len(jobs) == 1 or self.concurrency == 1:
            return [send(items, rid) for items, rid in jobs]
        futures = [self._pool().submit(send, items, rid) for items, rid in jobs]
        return [future.result() for future in futures]


def batch_size_of(info: ModelInfo, arrays: Mapping[str, np.ndarray]) -> int:
    """Items in a call (1 for a model that does not batch)."""
    return batch_size(info, arrays) if info.batches else 1


class AsyncClient(_Core):
    """The asyncio twin of `Client`: the same methods, as coroutines.

    Use it from one event loop; `async with` (or `await client.close()`) releases connections
    and shared memory.

    Args:
        url: "http://host:port" or "grpc://host:port" (or "host:port" with `protocol`).
        protocol: "http" or "grpc", when the URL has no scheme.
        timeout: Default per-call timeout in seconds (None: wait forever).
        retry: The retry policy (default `RetryPolicy()`); None disables retries.
        concurrency: Requests a split call keeps in flight at once.
        shared_memory: Use system shared memory by default (same host only).
        validate: Check inputs against the model's config before sending.
        verbose: Let tritonclient print every request.

    Example:
        >>> async with AsyncClient("http://localhost:8000") as client:
        ...     result = await client.infer("digits", {"pixels": np.zeros((1, 1, 8, 8), np.float32)})
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

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Unregisters and removes shared memory, closes connections. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
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

    async def _call(self, what: str, method: str, *args: Any, model: str | None = None,
                    timeout: Any = DEFAULT, retry: bool = True) -> Any:
        self._check_open()
        seconds = self._timeout(timeout)

        async def once() -> Any:
            try:
                return await getattr(self._transport, method)(*args, timeout=seconds)
            except Exception as error:
                raise self._translate(error, what, model, timeout=seconds) from error

        return await (self._retrying(what, once) if retry else once())

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
        """Whether the server is ready; False when it cannot be reached."""
        try:
            return await self._call("is_ready", "is_ready", timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    async def is_model_ready(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> bool:
        """Whether `model` has a ready version; False when the server cannot be reached."""
        try:
            return await self._call("is_model_ready", "is_model_ready", model, version, model=model,
                                    timeout=timeout, retry=False)
        except ServerUnavailableError:
            return False

    async def wait_until_ready(self, models: Iterable[str] = (), *, timeout: float = 30.0) -> None:
        """Waits until the server (and each of `models`) is ready.

        Raises:
            DeadlineExceededError: Not ready within `timeout` seconds.
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
                        if not await self._call("is_model_ready", "is_model_ready", m, "", model=m,
                                                timeout=READY_POLL_S * 5, retry=False)
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
        """Model name -> state from the repository index."""
        index = await self._call("models", "repository_index", timeout=timeout)
        return {entry["name"]: entry.get("state") or "UNLOADED" for entry in index}

    async def model_metadata(
        self, model: str, *, version: str = "", timeout: Any = DEFAULT
    ) -> dict[str, Any]:
        """The model's KServe metadata (ints as ints)."""
        return await self._call(
            "model_metadata", "model_metadata", model, version, model=model, timeout=timeout
        )

    async def model_config(self, model: str, *, version: str = "", timeout: Any = DEFAULT) -> dict[str, Any]:
        """The model's config as a dict, the same over HTTP and gRPC."""
        config = await self._call(
            "model_config", "model_config", model, version, model=model, timeout=timeout
        )
        return normalize_config(config)

    async def model_info(self, model: str, *, version: str = "", refresh: bool = False,
                         timeout: Any = DEFAULT) -> ModelInfo:
        """The model's tensors and max_batch_size (cached per client)."""
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
        """Sends one request of named arrays; see `Client.infer`."""
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
                raise self._translate(
                    error, "infer", model, request_id=request_id, timeout=seconds, shared_memory=use_shm
                ) from error
            else:
                if region is not None:
                    self._regions.give_back(region)
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
        """Split into requests of max_batch_size, sent concurrently; see `Client.infer_batch`."""
        self._check_open()
        start = time.perf_counter()
        arrays = prepare_inputs(inputs)
        info = await self.model_info(model, version=version)
        validate_inputs(info, arrays, split=True)
        parts = await self._run_parts(model, arrays, outputs, info, version=version, request_id=request_id,
                                      timeout=timeout, shared_memory=shared_memory, chunk=batch_size,
                                      isolate=False)
        raise_first_failure(parts, batch_size_of(info, arrays))
        return concatenate([p.result for p in parts], model, time.perf_counter() - start, request_id)

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
        """See `Client._run_parts`."""
        use_shm = self.shared_memory if shared_memory is None else shared_memory
        total = batch_size_of(info, arrays)
        ranges = chunk_ranges(total, chunk or info.max_batch_size) if info.batches else [range(0, 1)]
        limit = asyncio.Semaphore(self.concurrency)

        async def send(items: range, rid: str | None) -> InferResult | KilnError:
            part_inputs = slice_inputs(arrays, items) if info.batches else dict(arrays)
            async with limit:
                try:
                    return await self._retrying("infer", lambda: self._infer_once(
                        model, part_inputs, outputs, info, version, rid, timeout, use_shm))
                except KilnError as error:
                    return error

        jobs = plan_jobs(ranges, request_id)
        results = await asyncio.gather(*(send(items, rid) for items, rid in jobs))
        parts = [Part(items, result) for (items, _), result in zip(jobs, results, strict=True)]
        retry_jobs = isolation_jobs(parts, request_id) if isolate else []
        if not retry_jobs:
            return parts
        results = await asyncio.gather(*(send(items, rid) for items, rid in retry_jobs))
        return expand(parts, [Part(items, r) for (items, _), r in zip(retry_jobs, results, strict=True)])
