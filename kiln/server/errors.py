"""The errors of the embedded server runtime: `TritonServerError` and its subclasses.

Each message says what happened and what to do; the errors carry the path of Triton's full log.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

_PROTOCOL_NAMES = {"http": "HTTP", "grpc": "gRPC", "metrics": "metrics"}
_PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}


def describe_returncode(returncode: int) -> str:
    """'exit code 1' or 'killed by signal SIGKILL' for a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


class TritonServerError(RuntimeError):
    """Base class of every error the embedded server runtime raises.

    Attributes:
        log_path: The file holding Triton's full log, when one was written.
    """

    def __init__(self, message: str, *, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class BinaryNotFoundError(TritonServerError):
    """The tritonserver binary, its python backend or the stub for this Python is missing."""


class RepositoryNotFoundError(TritonServerError):
    """The model repository folder does not exist."""


class PortInUseError(TritonServerError):
    """A port Triton should listen on is taken.

    Attributes:
        port: The port number.
        protocol: "http", "grpc" or "metrics".
        host: The interface it was to bind to.
    """

    def __init__(
        self, port: int, protocol: str, host: str, *, log_path: Path | None = None
    ) -> None:
        super().__init__(
            f"{_PROTOCOL_NAMES.get(protocol, protocol)} port {port} on {host} is already in use: "
            f"stop what listens there, choose another port ({_PORT_FLAGS.get(protocol, '')}), "
            "or let kiln pick free ports (--free-ports)",
            log_path=log_path,
        )
        self.port = port
        self.protocol = protocol
        self.host = host


class ModelLoadFailedError(TritonServerError):
    """One or more models failed to load; `errors` maps each model to Triton's message."""

    def __init__(self, errors: Mapping[str, str], *, log_path: Path | None = None) -> None:
        lines = [f"model '{name}' failed to load: {message}" for name, message in errors.items()]
        super().__init__("\n".join(lines), log_path=log_path)
        self.errors = dict(errors)


class ServerExitedError(TritonServerError):
    """tritonserver exited when it should not have (during startup or while serving).

    Attributes:
        returncode: Its exit status (negative: the number of the signal that killed it).
        log_tail: The last lines of its log.
    """

    def __init__(
        self, summary: str, returncode: int, log_tail: Sequence[str], *, log_path: Path | None
    ) -> None:
        lines = [f"{summary} ({describe_returncode(returncode)})"]
        if log_tail:
            lines.append("last log lines:")
            lines.extend(f"  {line}" for line in log_tail)
        if log_path is not None:
            lines.append(f"full log: {log_path}")
        super().__init__("\n".join(lines), log_path=log_path)
        self.returncode = returncode
        self.log_tail = list(log_tail)


class StartupTimeoutError(TritonServerError):
    """tritonserver did not become ready before the startup deadline."""


class RepositoryApiError(TritonServerError):
    """A model-repository API call (load, unload, index) failed; the message is Triton's.

    Attributes:
        status: The HTTP status Triton answered (403: the repository key is missing or wrong),
            or None when it could not be reached.
    """

    def __init__(self, message: str, status: int | None, *, log_path: Path | None = None) -> None:
        super().__init__(message, log_path=log_path)
        self.status = status


ZOMBIE = "Z"


class BackendProcess(NamedTuple):
    """A python backend stub process of a running tritonserver (one per model instance).

    Attributes:
        pid: Its process id.
        model: The model it serves ("?" when it died before kiln saw it alive).
        version: The model version it serves.
        instance: Triton's instance name, e.g. "fraud_features_0_0".
        state: Its state letter from /proc (R, S, ... ; "Z": it died and was not reaped).
        returncode: For a dead stub, its exit status as subprocess reports one (negative: the
            signal that killed it); None while it runs.
    """

    pid: int
    model: str
    version: str
    instance: str
    state: str
    returncode: int | None

    @property
    def alive(self) -> bool:
        """Whether the process still runs (a zombie does not)."""
        return self.state != ZOMBIE

    def describe(self) -> str:
        """One line naming the model, the instance, the pid and, for a dead stub, how it ended."""
        text = f"model '{self.model}' version {self.version} (instance {self.instance}, pid {self.pid})"
        if self.returncode is not None:
            text += f": {describe_returncode(self.returncode)}"
        return text


class BackendCrashedError(TritonServerError):
    """Python backend stub processes died while tritonserver kept running.

    Triton 2.51 neither restarts such a stub nor marks its model unavailable: the model stays
    READY and every request to it fails ("Stub process '...' is not healthy").

    Attributes:
        processes: The dead stubs.
    """

    def __init__(
        self, summary: str, processes: Sequence[BackendProcess], *, log_path: Path | None = None
    ) -> None:
        super().__init__(summary, log_path=log_path)
        self.processes = list(processes)
