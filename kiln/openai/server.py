"""`OpenAIServer`: the OpenAI-compatible app (`kiln.openai.app`) served by uvicorn on a thread of
this process, as `kiln serve` runs it beside Triton (and the tests, in process).

The socket is bound here before uvicorn starts, so a port in use is reported in one line (and
port 0 picks a free one, read back from the socket); `start()` returns once the app's startup
(its Triton client, the discovery of the generation models) is done; `stop()` lets open
requests end for a few seconds, then closes what is left (a stream's upstream request is
cancelled when its connection closes).
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kiln.openai.app import DEFAULT_TIMEOUT_S, create_app
from kiln.server.ports import DEFAULT_HOST, FREE_PORT, endpoint

DEFAULT_OPENAI_PORT = 9000
STARTUP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
"""How long `stop()` lets open requests finish before closing their connections."""
READY_POLL_S = 0.02


class OpenAIServerError(RuntimeError):
    """The OpenAI-compatible server could not start (port in use, startup failed)."""


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on (host, port); port 0 picks a free one.

    Raises:
        OpenAIServerError: The port is taken, or the host is not an address of this machine.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        if error.errno == errno.EADDRINUSE:
            raise OpenAIServerError(
                f"OpenAI port {port} on {host} is already in use: stop what listens there, choose "
                "another port (--openai-port), or let kiln pick free ports (--free-ports)"
            ) from None
        raise OpenAIServerError(f"cannot listen on {host}:{port} for the OpenAI endpoints: {error}") from None
    sock.set_inheritable(True)
    return sock


class OpenAIServer:
    """The OpenAI-compatible endpoints on (host, port), in front of Triton's gRPC endpoint.

    Args:
        triton_grpc_url: Triton's gRPC endpoint ("host:port" or "grpc://host:port").
        host: Interface to listen on.
        port: Port (FREE_PORT, 0: a free one).
        models: The generation models to serve (default: discovered, see `kiln.openai.app`).
        timeout_s: Upstream timeout of one request, stream included.
        log_level: uvicorn's log level ("warning" keeps `kiln serve`'s output to errors).
    """

    def __init__(
        self,
        triton_grpc_url: str,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_OPENAI_PORT,
        models: Sequence[str] | None = None,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        log_level: str = "warning",
    ) -> None:
        self.triton_grpc_url = triton_grpc_url
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.app = create_app(triton_grpc_url, models=models, timeout_s=timeout_s)
        self._log_level = log_level
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL clients use: "http://host:port/v1" (what openai.OpenAI's base_url takes)."""
        if self.port is None:
            raise RuntimeError("the OpenAI server has not started")
        return f"http://{endpoint(self.host, self.port)}/v1"

    @property
    def models(self) -> list[str]:
        """The generation models the app serves (as discovered at its start)."""
        return list(self.app.state.upstream.served)

    def start(self, timeout: float = STARTUP_TIMEOUT_S) -> OpenAIServer:
        """Binds the port, starts uvicorn on a thread, waits for the app's startup.

        Raises:
            OpenAIServerError: The port is taken, or the app did not start within `timeout`.
        """
        import uvicorn

        sock = bind(self.host, self.requested_port if self.requested_port is not None else FREE_PORT)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app, log_level=self._log_level, access_log=False, lifespan="on",
            timeout_graceful_shutdown=STOP_TIMEOUT_S,
        )
        self._server = uvicorn.Server(config)

        def run() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as error:  # noqa: BLE001 - reported by start()
                self._error = error
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name="kiln-openai", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                detail = f": {self._error!r}" if self._error is not None else " (see the log above)"
                raise OpenAIServerError(
                    f"the OpenAI endpoints did not start on {self.host}:{self.port}{detail}"
                )
            time.sleep(READY_POLL_S)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S + 5.0) -> None:
        """Stops uvicorn (open requests get STOP_TIMEOUT_S to end). Idempotent."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        self._thread = None

    def __enter__(self) -> OpenAIServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


logging.getLogger("kiln.openai").addHandler(logging.NullHandler())
