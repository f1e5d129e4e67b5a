"""What the generic clients share: URL parsing, input preparation, request building, result
parsing, split-call planning. No I/O happens here.

`Client` (blocking, `kiln.clients._sync_client`) and `AsyncClient` (asyncio,
`kiln.clients._async_client`) are one implementation: the async module is the source and
`scripts/unasync.py` writes the sync one from it (a test fails when they differ). Their I/O
differs only in the transports (`kiln.clients._transport`) and the fan-out of split calls
(`kiln.clients._concurrency`). What they offer: `kiln.clients.client`. Several replicas behind
one client: `kiln.clients._replicas` (picking, backoff, the failover rules).

Every error is a `KilnError` subclass (see `kiln.clients.errors`).
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from tritonclient.utils import InferenceServerException

from kiln.clients import shm as shm_module
from kiln.clients._replicas import (
    DEFAULT_BALANCE,
    ReplicaBackoff,
    ReplicaSet,
    ReplicaStats,
    all_failed_message,
    refused_before_running,
)
from kiln.clients._transport import (
    HTTP,
    PROTOCOLS,
    output_names,
    output_shape,
    response_info,
)
from kiln.clients.errors import (
    InvalidInputError,
    KilnError,
    ModelNotReadyError,
    ServerError,
    ServerUnavailableError,
    translate,
)
from kiln.clients.models import (
    ModelInfo,
    batch_size,
    normalize_config,
    triton_dtype,
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
DEFAULT_IDEMPOTENT = False
"""Whether inference may be resent to another replica after a failure that may have run it (a
connection lost after sending, a timeout). Off by default: the generic client talks to any Triton
model and cannot know that a request has no effect beyond its answer, and resending after a
timeout doubles the work of a replica fleet exactly when it is too slow already. Refusals the
server did not run (what a replica that is draining, down or restarting answers) fail over
whatever this says. kiln's own pipelines are stateless: pass idempotent=True for them."""
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


def parse_urls(urls: str | Sequence[str], protocol: str | None) -> tuple[str, tuple[str, ...]]:
    """(protocol, ("host:port", ...)) from one URL or a sequence of URLs of one protocol."""
    given = [urls] if isinstance(urls, str) else list(urls)
    if not given:
        raise ValueError("give one URL or a sequence of URLs (replicas), got an empty sequence")
    parsed = []
    for url in given:
        if not isinstance(url, str):
            raise TypeError(f"a URL must be a str, got {type(url).__name__} ({url!r})")
        parsed.append(parse_url(url, protocol))
    protocols = sorted({scheme for scheme, _ in parsed})
    if len(protocols) > 1:
        raise ValueError(
            f"replica URLs must all use one protocol, got {', '.join(protocols)} in {', '.join(given)}"
        )
    return protocols[0], tuple(address for _, address in parsed)


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
        url: str | Sequence[str],
        *,
        protocol: str | None,
        timeout: float | None,
        retry: RetryPolicy | None,
        concurrency: int,
        shared_memory: bool,
        validate: bool,
        balance: str = DEFAULT_BALANCE,
        replica_backoff: ReplicaBackoff = ReplicaBackoff(),  # noqa: B008 - frozen, shared safely
        idempotent: bool = DEFAULT_IDEMPOTENT,
    ) -> None:
        self.protocol, self.addresses = parse_urls(url, protocol)
        self.urls = tuple(f"{self.protocol}://{address}" for address in self.addresses)
        self.address, self.url = self.addresses[0], self.urls[0]
        self._replicas = ReplicaSet(self.urls, balance, replica_backoff)
        if shared_memory and len(self.urls) > 1:
            raise ValueError(
                "shared_memory=True needs one server on this host; it cannot be used with several "
                f"replicas ({', '.join(self.urls)})"
            )
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
        self.balance = balance
        self.idempotent = idempotent
        self._infos: dict[tuple[str, str], ModelInfo] = {}
        self._infos_lock = threading.Lock()
        self._regions = shm_module.RegionPool()
        self._closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url if len(self.urls) == 1 else list(self.urls)!r})"

    @property
    def replicas(self) -> tuple[ReplicaStats, ...]:
        """What this client saw of each replica (one entry per URL, in the order given): its
        state, the requests sent, answered, failed and in flight, probes and backoff."""
        return self._replicas.stats()

    # --- helpers ---

    def _timeout(self, timeout: Any) -> float | None:
        return self.timeout if timeout is DEFAULT else timeout

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")

    def _translate(self, error: BaseException, what: str, model: str | None = None, *,
                   request_id: str | None = None, timeout: float | None = None,
                   shared_memory: bool = False, url: str | None = None) -> KilnError:
        return translate(
            error, what=what, model=model, url=url or self.url, request_id=request_id, timeout=timeout,
            shared_memory=shared_memory,
        )

    def _may_retry(self, error: KilnError, idempotent: bool) -> bool:
        """Whether the RetryPolicy may resend a failed call at all. One replica: always (its
        policy alone decides, as it always did). Several: only what another replica could have
        taken, so a request that may have run is not resent by the back door."""
        return self._replicas.single or idempotent or refused_before_running(error)

    def _all_failed(
        self, what: str, model: str | None, failures: Sequence[tuple[str, KilnError | str]],
        request_id: str | None,
    ) -> KilnError:
        """The error when every replica was tried: each URL and its answer, in order. All models
        not ready: ModelNotReadyError; else ServerUnavailableError (refused when none may have
        run the request)."""
        errors = [error for _, error in failures if isinstance(error, KilnError)]
        subject = f"model '{model}'" if model else what
        message = all_failed_message(subject, failures)
        last = errors[-1] if errors else None
        context = {
            "server_message": last.server_message if last is not None else None,
            "status": last.status if last is not None else None,
            "model": model, "url": None, "request_id": request_id,
            "tried": tuple(url for url, _ in failures),
        }
        if errors and len(errors) == len(failures) and all(isinstance(e, ModelNotReadyError) for e in errors):
            return ModelNotReadyError(message, **context)
        refused = all(refused_before_running(e) for e in errors)
        return ServerUnavailableError(message, refused=refused, **context)

    def _log_failover(self, what: str, url: str, error: KilnError) -> None:
        log.info(
            "%s: %s failed (%s: %s); trying another replica",
            what, url, type(error).__name__, error.server_message or error.message,
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


def batch_size_of(info: ModelInfo, arrays: Mapping[str, np.ndarray]) -> int:
    """Items in a call (1 for a model that does not batch)."""
    return batch_size(info, arrays) if info.batches else 1


