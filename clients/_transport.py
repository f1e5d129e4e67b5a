"""The tritonclient calls behind `Client` and `AsyncClient`, one class per (sync|async).

Both speak HTTP or gRPC and hide what differs between the two protocols:

- tritonclient's HTTP client is gevent-based and not thread-safe, so the sync transport keeps one
  tritonclient per thread (connection reuse per thread) and closes them all on `close()`. gRPC
  clients are kept per thread too, for the same documented reason.
- Per-call timeouts: gRPC deadlines (`client_timeout`) for sync gRPC; a gevent timer for sync HTTP
  (a client whose call timed out may hold a half-used connection, so it is discarded); and
  `asyncio.wait_for` for both async clients.
- gRPC answers metadata and config as protobuf: they are asked for as JSON and normalized to what
  the HTTP API returns.
- gRPC channels balance over every address their host resolves to: the target is `dns:///host:port`
  and the service config picks the `round_robin` load-balancing policy (gRPC's default,
  `pick_first`, sends everything to one address, so a Kubernetes headless Service's pods but one
  would idle). tritonclient's `channel_args` replaces its own channel options rather than adding
  to them, so `grpc_channel_args` repeats tritonclient's defaults (unlimited message sizes, its
  keepalive settings) beside the policy. With one address, round_robin behaves as pick_first.

tritonclient modules are imported here, on first use, so `import kiln.clients` stays cheap.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from tritonclient.utils import InferenceServerException

from kiln.clients.models import normalize_json

HTTP = "http"
GRPC = "grpc"
PROTOCOLS = (HTTP, GRPC)
CONNECTION_TIMEOUT_S = 60.0
"""How long tritonclient waits to connect (HTTP) before failing."""
GRPC_LB_POLICY = "round_robin"
GRPC_SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{GRPC_LB_POLICY: {}}]})
"""The channel's service config: round_robin over every resolved address (gRPC's documented way;
`grpc.lb_policy_name` is set too, for gRPC builds that read only the older option)."""
DNS_SCHEME = "dns:///"
GRPC_RECONNECT_BACKOFF_MS = (100, 1000)
"""gRPC's own reconnect backoff, (initial, max) ms. Its default (1 s growing 1.6x to 120 s) keeps
a channel answering "connections to all backends failing" without trying to connect long after
a replica came back: measured here, a replica down for 5 s still failed every probe 3 s after it
was ready again. Capped at 1 s, the client's replica backoff and readiness probe decide."""


GRPC_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:")
"""Targets gRPC resolves itself (e.g. "ipv4:10.0.0.1:8001,10.0.0.2:8001"), passed through as given."""


def grpc_target(address: str) -> str:
    """The gRPC target for "host:port": resolved by gRPC's DNS resolver, every address kept."""
    return address if address.startswith(GRPC_SCHEMES) else DNS_SCHEME + address


def grpc_channel_args() -> list[tuple[str, Any]]:
    """tritonclient's default channel options, the round_robin load-balancing policy and a short
    reconnect backoff."""
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", GRPC_RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", GRPC_RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", GRPC_RECONNECT_BACKOFF_MS[1]),
        ("grpc.lb_policy_name", GRPC_LB_POLICY),
        ("grpc.service_config", GRPC_SERVICE_CONFIG),
    ]


def protocol_module(protocol: str) -> ModuleType:
    """tritonclient.http or tritonclient.grpc (InferInput, InferRequestedOutput, ...)."""
    return importlib.import_module(f"tritonclient.{protocol}")


def _aio_module(protocol: str) -> ModuleType:
    return importlib.import_module(f"tritonclient.{protocol}.aio")


def output_shape(result: Any, name: str) -> tuple[list[int], str] | None:
    """(shape, datatype) of output `name` in a tritonclient result, None if absent."""
    output = result.get_output(name)
    if output is None:
        return None
    if isinstance(output, dict):
        return [int(d) for d in output["shape"]], output["datatype"]
    return [int(d) for d in output.shape], output.datatype


def output_names(result: Any) -> list[str]:
    """Names of the outputs a tritonclient result holds."""
    response = result.get_response()
    if isinstance(response, dict):
        return [o["name"] for o in response.get("outputs", ())]
    return [o.name for o in response.outputs]


def response_info(result: Any) -> tuple[str, str]:
    """(request id, model version) the server echoed in a tritonclient result."""
    response = result.get_response()
    if isinstance(response, dict):
        return str(response.get("id", "")), str(response.get("model_version", ""))
    return response.id, response.model_version


def _index_entries(index: Any) -> list[dict[str, Any]]:
    if isinstance(index, dict):
        index = index.get("models", [])
    return [dict(entry) for entry in index]


class CallTimeout(TimeoutError):
    """A sync HTTP call ran past its timeout (the gevent timer fired)."""


class SyncTransport:
    """Blocking tritonclient calls, one underlying client per thread.

    Args:
        protocol: "http" or "grpc".
        address: "host:port" (tritonclient's form, no scheme).
        verbose: tritonclient's verbose flag (prints every request).
    """

    def __init__(self, protocol: str, address: str, *, verbose: bool = False) -> None:
        self.protocol = protocol
        self.address = address
        self.module = protocol_module(protocol)
        self._verbose = verbose
        self._local = threading.local()
        self._clients: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        if protocol == HTTP:
            import gevent

            self._gevent: ModuleType | None = gevent
        else:
            self._gevent = None

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the client is closed")
                if self.protocol == HTTP:
                    # No network timeout of its own: the call's timeout (a gevent timer) decides.
                    client = self.module.InferenceServerClient(
                        self.address, verbose=self._verbose, connection_timeout=CONNECTION_TIMEOUT_S,
                        network_timeout=None,
                    )
                else:
                    client = self.module.InferenceServerClient(
                        grpc_target(self.address), verbose=self._verbose, channel_args=grpc_channel_args()
                    )
                self._clients.append(client)
            self._local.client = client
        return client

    def _discard(self, client: Any) -> None:
        """Drops this thread's client (its connection may be half used); the next call makes one."""
        if getattr(self._local, "client", None) is client:
            self._local.client = None
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing a broken client must not hide the real error
            pass

    def call(self, method: str, *args: Any, timeout: float | None, **kwargs: Any) -> Any:
        """Runs `client.method(*args, **kwargs)` on this thread's client within `timeout` s."""
        client = self._client()
        if self._gevent is None:
            return getattr(client, method)(*args, client_timeout=timeout, **kwargs)
        timer = self._gevent.Timeout(timeout) if timeout is not None else None
        if timer is not None:
            timer.start()
        try:
            return getattr(client, method)(*args, **kwargs)
        except self._gevent.Timeout as fired:
            if fired is not timer:
                raise
            self._discard(client)
            raise CallTimeout(f"no answer within {timeout:g} s") from None
        except InferenceServerException:
            raise
        except Exception:
            self._discard(client)
            raise
        finally:
            if timer is not None:
                timer.close()

    # --- the operations, the same over both protocols ---

    def is_live(self, timeout: float | None) -> bool:
        return bool(self.call("is_server_live", timeout=timeout))

    def is_ready(self, timeout: float | None) -> bool:
        return bool(self.call("is_server_ready", timeout=timeout))

    def is_model_ready(self, model: str, version: str, timeout: float | None) -> bool:
        return bool(self.call("is_model_ready", model, version, timeout=timeout))

    def server_metadata(self, timeout: float | None) -> dict[str, Any]:
        return normalize_json(self.call("get_server_metadata", timeout=timeout, **self._json()))

    def model_metadata(self, model: str, version: str, timeout: float | None) -> dict[str, Any]:
        metadata = self.call("get_model_metadata", model, version, timeout=timeout, **self._json())
        return normalize_json(metadata)

    def model_config(self, model: str, version: str, timeout: float | None) -> dict[str, Any]:
        return normalize_json(self.call("get_model_config", model, version, timeout=timeout, **self._json()))

    def repository_index(self, timeout: float | None) -> list[dict[str, Any]]:
        return _index_entries(self.call("get_model_repository_index", timeout=timeout, **self._json()))

    def register_shm(self, name: str, key: str, byte_size: int, timeout: float | None) -> None:
        self.call("register_system_shared_memory", name, key, byte_size, timeout=timeout)

    def unregister_shm(self, name: str, timeout: float | None) -> None:
        self.call("unregister_system_shared_memory", name, timeout=timeout)

    def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        outputs: Sequence[Any] | None,
        *,
        version: str,
        request_id: str,
        timeout: float | None,
    ) -> Any:
        return self.call(
            "infer", model, list(inputs), model_version=version, outputs=outputs,
            request_id=request_id, timeout=timeout,
        )

    def _json(self) -> dict[str, Any]:
        return {"as_json": True} if self.protocol == GRPC else {}

    def close(self) -> None:
        """Closes every underlying client (safe to call twice)."""
        with self._lock:
            self._closed = True
            clients, self._clients = self._clients, []
        for client in clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - close the rest
                pass


class AsyncTransport:
    """asyncio tritonclient calls (tritonclient.http.aio / tritonclient.grpc.aio).

    One underlying client, created on first use inside the running event loop.

    Args:
        protocol: "http" or "grpc".
        address: "host:port".
        verbose: tritonclient's verbose flag.
    """

    def __init__(self, protocol: str, address: str, *, verbose: bool = False) -> None:
        self.protocol = protocol
        self.address = address
        self.module = protocol_module(protocol)
        self._aio = _aio_module(protocol)
        self._verbose = verbose
        self._client: Any = None
        self._closed = False

    def _get(self) -> Any:
        if self._closed:
            raise RuntimeError("the client is closed")
        if self._client is None:
            if self.protocol == HTTP:  # no connection timeout of its own: wait_for decides
                self._client = self._aio.InferenceServerClient(
                    self.address, verbose=self._verbose, conn_timeout=None
                )
            else:
                self._client = self._aio.InferenceServerClient(
                    grpc_target(self.address), verbose=self._verbose, channel_args=grpc_channel_args()
                )
        return self._client

    async def call(self, method: str, *args: Any, timeout: float | None, **kwargs: Any) -> Any:
        """Awaits `client.method(*args, **kwargs)` within `timeout` seconds."""
        coroutine = getattr(self._get(), method)(*args, **kwargs)
        if timeout is None:
            return await coroutine
        return await asyncio.wait_for(coroutine, timeout)

    async def is_live(self, timeout: float | None) -> bool:
        return bool(await self.call("is_server_live", timeout=timeout))

    async def is_ready(self, timeout: float | None) -> bool:
        return bool(await self.call("is_server_ready", timeout=timeout))

    async def is_model_ready(self, model: str, version: str, timeout: float | None) -> bool:
        return bool(await self.call("is_model_ready", model, version, timeout=timeout))

    async def server_metadata(self, timeout: float | None) -> dict[str, Any]:
        return normalize_json(await self.call("get_server_metadata", timeout=timeout, **self._json()))

    async def model_metadata(self, model: str, version: str, timeout: float | None) -> dict[str, Any]:
        return normalize_json(
            await self.call("get_model_metadata", model, version, timeout=timeout, **self._json())
        )

    async def model_config(self, model: str, version: str, timeout: float | None) -> dict[str, Any]:
        return normalize_json(
            await self.call("get_model_config", model, version, timeout=timeout, **self._json())
        )

    async def repository_index(self, timeout: float | None) -> list[dict[str, Any]]:
        return _index_entries(await self.call("get_model_repository_index", timeout=timeout, **self._json()))

    async def register_shm(self, name: str, key: str, byte_size: int, timeout: float | None) -> None:
        await self.call("register_system_shared_memory", name, key, byte_size, timeout=timeout)

    async def unregister_shm(self, name: str, timeout: float | None) -> None:
        await self.call("unregister_system_shared_memory", name, timeout=timeout)

    async def infer(
        self,
        model: str,
        inputs: Sequence[Any],
        outputs: Sequence[Any] | None,
        *,
        version: str,
        request_id: str,
        timeout: float | None,
    ) -> Any:
        return await self.call(
            "infer", model, list(inputs), model_version=version, outputs=outputs,
            request_id=request_id, timeout=timeout,
        )

    def _json(self) -> dict[str, Any]:
        return {"as_json": True} if self.protocol == GRPC else {}

    async def close(self) -> None:
        """Closes the underlying client (safe to call twice)."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.close()
