"""The ports and addresses of a tritonserver: defaults, validation, picking free ones.

A port of 0 (`FREE_PORT`) asks for a free one; `choose_ports` picks those and checks the fixed
ones are free before Triton spends seconds loading models only to fail at its bind.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Mapping
from typing import NamedTuple

from kiln.server.errors import PortInUseError, TritonServerError

DEFAULT_HOST = "127.0.0.1"
"""Interface Triton binds to unless told otherwise: local only."""
# Triton's usual ports.
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
FREE_PORT = 0
"""A port of 0 in the API means: pick a free one."""
MAX_PORT = 65535
FREE_PORT_ATTEMPTS = 3
"""Starts tried when Triton loses an automatically picked port to another process."""

_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class Ports(NamedTuple):
    """The three ports a tritonserver listens on."""

    http: int
    grpc: int
    metrics: int


def check_ports(requested: Mapping[str, int]) -> None:
    """Raises ValueError unless each port is in FREE_PORT..MAX_PORT and the fixed ones differ.

    Args:
        requested: Protocol ("http", "grpc", "metrics") -> port, FREE_PORT for a free one.
    """
    for protocol, port in requested.items():
        if not FREE_PORT <= port <= MAX_PORT:
            raise ValueError(f"{protocol}_port must be in {FREE_PORT}..{MAX_PORT}, got {port}")
    fixed = [p for p in requested.values() if p != FREE_PORT]
    if len(fixed) != len(set(fixed)):
        raise ValueError(f"the HTTP, gRPC and metrics ports must differ, got {dict(requested)}")


def choose_ports(host: str, requested: Mapping[str, int]) -> Ports:
    """Picks the free ports asked for and checks the fixed ones are free, before Triton
    spends seconds loading models only to fail at its bind.

    Raises:
        PortInUseError: a fixed port is taken.
        TritonServerError: `host` cannot be listened on (e.g. not an address of this machine).
    """
    try:
        free = iter(pick_free_ports(host, sum(p == FREE_PORT for p in requested.values())))
        chosen = {
            name: (next(free) if port == FREE_PORT else port) for name, port in requested.items()
        }
        for protocol, port in chosen.items():
            if requested[protocol] != FREE_PORT and not port_is_free(host, port):
                raise PortInUseError(port, protocol, host)
    except OSError as error:  # e.g. a host that is not an address of this machine
        raise TritonServerError(f"cannot listen on host {host!r}: {error}") from error
    return Ports(**chosen)


def endpoint(host: str, port: int) -> str:
    """`host:port` where a client on this machine reaches a server bound to `host` (IPv6 in [])."""
    return f"{_url_host(_client_host(host))}:{port}"


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return _WILDCARD_HOSTS.get(host, host)


def accepts_connections(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether something listens on `port` where a client on this machine reaches `host`."""
    try:
        with socket.create_connection((_client_host(host), port), timeout=timeout):
            return True
    except OSError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _socket_family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def pick_free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports that are free on `host` right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(_socket_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, FREE_PORT))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_is_free(host: str, port: int) -> bool:
    """Whether a listening socket could bind `host:port` now (as Triton will, SO_REUSEADDR)."""
    with socket.socket(_socket_family(host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return False
            raise
    return True
