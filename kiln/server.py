"""The embedded server runtime: runs the `tritonserver` of the nvidia-pytriton wheel.

`TritonServer` assembles a backend directory (Triton's python backend with the stub of the running
Python, plus every kiln backend), starts tritonserver against a model repository in its own
process group, streams and saves its log, waits until it is ready, and shuts it down cleanly. The
tests, the benchmarks and `kiln serve` all start Triton through it.

Errors a user meets (a port in use, no tritonserver binary, no repository, a model that fails to
load, Triton exiting) raise a subclass of `TritonServerError` whose message says what happened and what
to do; a model's own load error is extracted from Triton's log.

Operations (docs/operations.md): the endpoints bind to loopback unless a host is given; the
model-repository API (load, unload, index) can be restricted to clients sending a key
(`repository_key`); `load_model`, `unload_model` and `reload_model` drive it with that key; and
`backend_processes` / `crashed_backends` watch the python backend's stub processes, since Triton
2.51 neither restarts a stub that died nor stops reporting its model READY.

Example:
    >>> with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as server:
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import atexit
import collections
import ctypes
import errno
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, NamedTuple, TextIO

from kiln import paths

# --- defaults ----------------------------------------------------------------------------------

DEFAULT_HOST = "127.0.0.1"
"""Interface Triton binds to unless told otherwise: local only."""
# Triton's usual ports.
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
FREE_PORT = 0
"""A port of 0 in the API means: pick a free one."""
MAX_PORT = 65535

MODEL_CONTROL_MODES = ("none", "explicit", "poll")
DEFAULT_STARTUP_TIMEOUT_S = 120.0
"""How long `start()` waits for readiness; model loading dominates (ONNX Runtime sessions)."""
TRITON_EXIT_TIMEOUT_S = 30
"""Default --exit-timeout-secs (Triton's own default): after SIGTERM, how long Triton waits for
in-flight requests *and for open HTTP client connections* (an idle keep-alive connection counts)
before it exits anyway with status 1."""
STOP_GRACE_S = 10.0
"""Extra time beyond Triton's own drain timeout before the process group is SIGKILLed."""
KILL_WAIT_S = 5.0
"""How long to wait for the process to vanish after SIGKILL."""
READY_POLL_INTERVAL_S = 0.1
HTTP_PROBE_TIMEOUT_S = 2.0
"""Timeout of one readiness/metadata request to Triton's HTTP endpoint."""
LOG_READER_JOIN_S = 2.0
"""How long to wait for the log reader to drain the pipe after Triton exited."""
LOG_MEMORY_LINES = 5000
"""Log lines kept in memory for error reports (the log file keeps everything)."""
ERROR_TAIL_LINES = 15
"""Log lines quoted in an error about Triton exiting or never becoming ready."""
FREE_PORT_ATTEMPTS = 3
"""Starts tried when Triton loses an automatically picked port to another process."""

TRITONSERVER_ENV = "KILN_TRITONSERVER"
"""Environment variable overriding the tritonserver binary (a path)."""
PYTRITON_PACKAGE = "pytriton"
PYTRITON_DISTRIBUTION = "nvidia-pytriton==0.7.0"
INSTALL_HINT = f"pip install 'kiln[serve]' (or: pip install {PYTRITON_DISTRIBUTION})"
TRITON_SUBDIR = "tritonserver"
BINARY_RELPATH = Path("bin") / "tritonserver"
PYTHON_BACKEND_RELPATH = Path("backends") / "python"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUBS_RELPATH = Path("python_backend_stubs")
STUB_NAME = "triton_python_backend_stub"
PYTRITON_LIBS_DIRNAME = "nvidia_pytriton.libs"
"""The wheel's vendored shared libraries (libcudart, ...), beside the `pytriton` package.

The stub finds them through an RPATH relative to its own location in the wheel; the copy in our
backend directory needs them on LD_LIBRARY_PATH or it fails with "error while loading shared
libraries: libcudart-....so" and Triton waits for it forever.
"""
BACKEND_ENTRYPOINT = "model.py"
SHM_DIR = Path("/dev/shm")
SHM_PREFIX_TEMPLATE = "kiln_triton_{pid}_{token}_"
"""Prefix of the python backend's shared-memory regions, unique per server so that `stop()` can
remove what a killed stub left in /dev/shm."""
SHM_TOKEN_CHARS = 8
PR_SET_PDEATHSIG = 1
"""prctl(2) option: deliver a signal to the child when the parent (thread) dies."""

REPOSITORY_CALL_TIMEOUT_S = 300.0
"""Timeout of a repository load/unload call: Triton answers once the model is loaded."""

HEALTH_READY_PATH = "/v2/health/ready"
HEALTH_LIVE_PATH = "/v2/health/live"
SERVER_METADATA_PATH = "/v2"
REPOSITORY_INDEX_PATH = "/v2/repository/index"
REPOSITORY_MODEL_PATH = "/v2/repository/models/{model}/{action}"
MODEL_CONFIG_PATH = "/v2/models/{model}/config"
METRICS_PATH = "/metrics"
HTTP_OK = 200
UNLOADED_STATE = "UNLOADED"

REPOSITORY_API = "model-repository"
"""Triton's name of the load/unload/index API in --http-restricted-api/--grpc-restricted-protocol."""
DEFAULT_REPOSITORY_KEY_HEADER = "kiln-repository-key"
"""The header a client sends the repository key in (HTTP); see `repository_headers`."""
GRPC_RESTRICTED_HEADER_PREFIX = "triton-grpc-protocol-"
"""Triton 2.51 expects a restricted gRPC protocol's header under this prefix (gRPC metadata)."""
MIN_REPOSITORY_KEY_CHARS = 16
_REPOSITORY_KEY = re.compile(rf"^[A-Za-z0-9_.~+/-]{{{MIN_REPOSITORY_KEY_CHARS},}}$")
"""A key Triton's `<apis>:<header>=<value>` flag carries unchanged (no ',', ':', '=' or spaces)."""
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
"""A header name valid in HTTP and as gRPC metadata (lowercase)."""
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
"""A repository model name (one path segment, as kiln.spec requires)."""
STUB_ARG_MODEL_FILE = 1
"""argv index of the stub's model file, `<repository>/<model>/<version>/model.py`."""
STUB_ARG_INSTANCE = 8
"""argv index of the stub's model instance name (e.g. `fraud_features_0_0`)."""
PROC_STAT_EXIT_CODE = 49
"""Index of `exit_code` (field 52 of proc(5), a waitpid status) after the `(comm)` field."""
WAIT_SIGNAL_MASK = 0x7F
WAIT_EXIT_SHIFT = 8
WAIT_EXIT_MASK = 0xFF
ZOMBIE = "Z"

_WILDCARD_HOSTS = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
_PROTOCOL_NAMES = {"http": "HTTP", "grpc": "gRPC", "metrics": "metrics"}
_PORT_FLAGS = {"http": "--http-port", "grpc": "--grpc-port", "metrics": "--metrics-port"}

# --- Triton log formats (tritonserver 2.51.0) ------------------------------------------------
# A log line: `E1122 11:31:14.120514 4688 model_lifecycle.cc:642] "message"`, where the message
# is a quoted string with C escapes (\n, \"). Tables (the model status table) are printed raw.
_LOG_LINE = re.compile(r"^\S.*? [\w.-]+:\d+\] ?(?P<message>.*)$")
"""Lenient about the prefix (severity, time, thread), so --log-format=ISO8601 parses too."""
_MODEL_FAILED = re.compile(r"^failed to load '(?P<model>[^']+)' version \d+: (?P<error>.*)$", re.S)
_MODEL_POLL_FAILED = re.compile(
    r"^Poll failed for model directory '(?P<model>[^']+)': (?P<error>.*)$", re.S
)
_MODEL_LOADED = re.compile(r"^successfully loaded '(?P<model>[^']+)'")
_PORT_FAILED = re.compile(
    r"failed to start (?P<service>HTTP|GRPC|Metrics) service: .*?"
    r"Socket '(?P<host>.*):(?P<port>\d+)' already in use",
    re.I,
)
_PROTOBUF_ERROR = re.compile(r"^\[libprotobuf ERROR [^\]]*\] (?P<error>.*)$")
_STATUS_ROW = re.compile(
    r"^\|\s*(?P<model>[^|\s][^|]*?)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (?P<error>.*?)\s*\|$"
)
_TABLE_CHARS = "|+"
"""First characters of the rows of the tables Triton prints (models, backends, options)."""
_TRACEBACK_MARK = "\n\nAt:\n"
_METRIC_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$", re.M)
"""One sample line of the Prometheus text format: name{labels} value."""
_METRIC_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
"""The python backend appends the Python traceback after this to a failed `initialize`."""


# --- errors --------------------------------------------------------------------------------------


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


# --- helpers -------------------------------------------------------------------------------------


class Ports(NamedTuple):
    """The three ports a tritonserver listens on."""

    http: int
    grpc: int
    metrics: int


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


def generate_repository_key() -> str:
    """A random key for `repository_key` (43 URL-safe characters, 256 bits)."""
    return secrets.token_urlsafe(32)


def _wait_status_to_returncode(status: int) -> int:
    """A waitpid(2) status as a Popen returncode: -signal, or the exit code."""
    signal_number = status & WAIT_SIGNAL_MASK
    return -signal_number if signal_number else (status >> WAIT_EXIT_SHIFT) & WAIT_EXIT_MASK


def _proc_children(parent: int) -> list[tuple[int, str, int | None, list[str]]]:
    """(pid, state, returncode of a zombie, argv) of each child process of `parent`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != parent:
                continue
            argv = (entry / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
        state = fields[0]
        returncode = None
        if state == ZOMBIE and len(fields) > PROC_STAT_EXIT_CODE:
            returncode = _wait_status_to_returncode(int(fields[PROC_STAT_EXIT_CODE]))
        children.append((int(entry.name), state, returncode, argv))
    return children


def describe_returncode(returncode: int) -> str:
    """'exit code 1' or 'killed by signal SIGKILL' for a Popen return code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        return f"killed by signal {name}"
    return f"exit code {returncode}"


def pytriton_dir() -> Path | None:
    """Folder of the installed `pytriton` package, found without importing it."""
    spec = importlib.util.find_spec(PYTRITON_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver(binary: str | os.PathLike[str] | None = None) -> Path:
    """The tritonserver binary: `binary`, else $KILN_TRITONSERVER, else the nvidia-pytriton one.

    Raises:
        BinaryNotFoundError: The chosen path is not an executable file, or nvidia-pytriton is
            not installed.
    """
    if binary is not None:
        source = "the binary argument"
    elif os.environ.get(TRITONSERVER_ENV):
        binary, source = os.environ[TRITONSERVER_ENV], f"${TRITONSERVER_ENV}"
    else:
        package = pytriton_dir()
        if package is None:
            raise BinaryNotFoundError(
                f"tritonserver not found: the {PYTRITON_DISTRIBUTION} package, which ships it, "
                f"is not installed; install it with {INSTALL_HINT}"
            )
        binary, source = package / TRITON_SUBDIR / BINARY_RELPATH, PYTRITON_DISTRIBUTION
    path = Path(binary)
    if not path.is_file():
        raise BinaryNotFoundError(
            f"tritonserver not found at {path} (from {source}); point {TRITONSERVER_ENV} at a "
            f"tritonserver binary or install it with {INSTALL_HINT}"
        )
    if not os.access(path, os.X_OK):
        raise BinaryNotFoundError(f"tritonserver at {path} (from {source}) is not executable")
    return path


def _python_backend_root(binary: Path) -> Path:
    """The `tritonserver/` folder holding backends/python and the stubs for `binary`.

    A binary inside the wheel (or a copy of its layout) brings its own; any other binary uses
    the installed nvidia-pytriton's python backend.
    """
    own = binary.resolve().parent.parent
    if (own / PYTHON_BACKEND_RELPATH / PYTHON_BACKEND_FILES[0]).is_file():
        return own
    package = pytriton_dir()
    if package is None:
        raise BinaryNotFoundError(
            f"Triton's python backend not found beside {binary}, and {PYTRITON_DISTRIBUTION}, "
            f"which ships it, is not installed; install it with {INSTALL_HINT}"
        )
    return package / TRITON_SUBDIR


def _stub_path(triton_root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = triton_root / STUBS_RELPATH / version / STUB_NAME
    if not stub.is_file():
        stubs_dir = triton_root / STUBS_RELPATH
        have = sorted(p.name for p in stubs_dir.iterdir()) if stubs_dir.is_dir() else []
        raise BinaryNotFoundError(
            f"no python backend stub for Python {version} in {stubs_dir} "
            f"(it has: {', '.join(have) or 'none'}); run kiln with one of those Pythons"
        )
    return stub


def assemble_backend_directory(
    target: Path, triton_root: Path, backends_dir: Path, backends: Iterable[str]
) -> None:
    """Fills `target` with `python/` (Triton's python backend + this Python's stub) and a copy
    of every kiln backend, the layout `--backend-directory` expects."""
    python_dir = target / "python"
    python_dir.mkdir(parents=True)
    for name in PYTHON_BACKEND_FILES:
        shutil.copy2(triton_root / PYTHON_BACKEND_RELPATH / name, python_dir / name)
    shutil.copy2(_stub_path(triton_root), python_dir / STUB_NAME)  # copy2 keeps the exec bit
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in backends:
        shutil.copytree(backends_dir / name, target / name, ignore=ignore)


def _client_host(host: str) -> str:
    """Where a client on this machine reaches a server bound to `host`."""
    return _WILDCARD_HOSTS.get(host, host)


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


def _unquote(message: str) -> str:
    """Undoes the quoting Triton applies to a log message (`"...\\n..."`)."""
    if len(message) >= 2 and message[0] == '"' and message.endswith('"'):
        try:
            return json.loads(message)
        except ValueError:
            body = message[1:-1]
            return body.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
    return message


def _clean_model_error(error: str) -> str:
    """Triton's message for a failed model, without the Python traceback the stub appends."""
    return error.split(_TRACEBACK_MARK, 1)[0].strip()


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM tritonserver if kiln dies without stopping it.

    The kernel sends it when the *thread* that started the child exits, so it is only safe from
    the main thread; elsewhere (and off Linux) None.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


# --- the server ----------------------------------------------------------------------------------


class TritonServer:
    """A tritonserver process serving a model repository.

    Use it as a context manager (starts on enter, stops on exit) or call `start()` and
    `stop()`; an atexit hook stops a server that is still running when Python exits.

    Args:
        repository: The model repository; default `kiln.paths.model_repository()`.
        host: Interface the HTTP, gRPC and metrics endpoints bind to.
        http_port: HTTP port; 0 picks a free one.
        grpc_port: gRPC port; 0 picks a free one.
        metrics_port: Metrics port; 0 picks a free one.
        model_control_mode: "none" (load everything at start), "explicit" (load `load_models`
            and what the repository API asks for) or "poll".
        load_models: Models to load at start in explicit mode ("*" for all).
        extra_args: More tritonserver arguments, passed through as given.
        startup_timeout: Seconds `start()` waits for readiness.
        exit_timeout: Triton's --exit-timeout-secs: on stop, how long it drains in-flight
            requests and waits for clients to close their HTTP connections.
        log_verbose: Triton's --log-verbose level (0: off).
        log_file: Where the full log is saved (overwritten); default a new file in the temp dir,
            kept after the server stops.
        log_stream: A text stream that receives each log line as it arrives (e.g. sys.stderr);
            None keeps the log quiet.
        binary: The tritonserver to run; default $KILN_TRITONSERVER, else nvidia-pytriton's.
        backends_dir: Folder of kiln's Python-based backends; default `kiln.paths.backends_dir()`.
        repository_key: Restrict the model-repository API (load, unload, index) on HTTP and gRPC
            to clients sending this key (at least 16 characters of A-Z a-z 0-9 _ . ~ + / -;
            `generate_repository_key()` makes one); None leaves it open. `repository_headers`
            gives the headers a client sends; this object's own calls send them. Note that
            Triton takes the key on its command line, which local users can read.
        repository_key_header: The header carrying the key (lowercase letters, digits, '-').
    """

    def __init__(
        self,
        repository: str | os.PathLike[str] | None = None,
        *,
        host: str = DEFAULT_HOST,
        http_port: int = DEFAULT_HTTP_PORT,
        grpc_port: int = DEFAULT_GRPC_PORT,
        metrics_port: int = DEFAULT_METRICS_PORT,
        model_control_mode: str = "none",
        load_models: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
        exit_timeout: int = TRITON_EXIT_TIMEOUT_S,
        log_verbose: int = 0,
        log_file: str | os.PathLike[str] | None = None,
        log_stream: TextIO | None = None,
        binary: str | os.PathLike[str] | None = None,
        backends_dir: str | os.PathLike[str] | None = None,
        repository_key: str | None = None,
        repository_key_header: str = DEFAULT_REPOSITORY_KEY_HEADER,
    ) -> None:
        if repository_key is not None and not _REPOSITORY_KEY.match(repository_key):
            raise ValueError(
                f"repository_key must be at least {MIN_REPOSITORY_KEY_CHARS} characters of "
                "A-Z a-z 0-9 _ . ~ + / - (kiln.server.generate_repository_key() makes one); got "
                f"{len(repository_key)} characters"
                + ("" if len(repository_key) < MIN_REPOSITORY_KEY_CHARS else " with others")
            )
        if not _HEADER_NAME.match(repository_key_header):
            raise ValueError(
                "repository_key_header must be lowercase letters, digits and '-' (at most 64), "
                f"got {repository_key_header!r}"
            )
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(
                f"model_control_mode must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                f"got {model_control_mode!r}"
            )
        if load_models and model_control_mode != "explicit":
            raise ValueError("load_models needs model_control_mode='explicit'")
        requested = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        for protocol, port in requested.items():
            if not FREE_PORT <= port <= MAX_PORT:
                raise ValueError(f"{protocol}_port must be in {FREE_PORT}..{MAX_PORT}, got {port}")
        fixed = [p for p in requested.values() if p != FREE_PORT]
        if len(fixed) != len(set(fixed)):
            raise ValueError(f"the HTTP, gRPC and metrics ports must differ, got {requested}")
        self.repository = Path(repository) if repository is not None else paths.model_repository()
        self.host = host
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        if exit_timeout < 0:
            raise ValueError(f"exit_timeout must be >= 0, got {exit_timeout}")
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self.log_stream = log_stream
        self._requested = requested
        self._binary_arg = binary
        self.repository_key = repository_key
        self.repository_key_header = repository_key_header
        self._backends: dict[int, BackendProcess] = {}
        self._backends_dir = Path(backends_dir) if backends_dir is not None else None
        self._log_path: Path | None = Path(log_file) if log_file is not None else None
        self._ports: Ports | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._shm_prefix: str | None = None
        self._log_handle: IO[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_MEMORY_LINES)
        self._lock = threading.Lock()
        self._model_errors: dict[str, str] = {}
        self._port_failures: list[tuple[str, str, int]] = []
        self._last_protobuf_error: str | None = None
        self._stopping = False
        self._cleaned = False

    # --- properties ---

    @property
    def ports(self) -> Ports:
        """The ports in use (after `start()`; before, the requested ones, 0 = to be picked)."""
        if self._ports is not None:
            return self._ports
        return Ports(**self._requested)

    @property
    def http_url(self) -> str:
        """`host:port` of the HTTP endpoint, the form tritonclient.http takes."""
        return f"{_url_host(_client_host(self.host))}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint, the form tritonclient.grpc takes."""
        return f"{_url_host(_client_host(self.host))}:{self.ports.grpc}"

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page (`http://host:port/metrics`)."""
        return f"http://{_url_host(_client_host(self.host))}:{self.ports.metrics}{METRICS_PATH}"

    def repository_headers(self, protocol: str = "http") -> dict[str, str]:
        """The headers a client sends to use the model-repository API ({} when it is open).

        Args:
            protocol: "http" (the header as named) or "grpc" (Triton 2.51 reads a restricted
                gRPC protocol's key from the metadata key `triton-grpc-protocol-<header>`).

        Example:
            >>> client.load_model("fraud", headers=server.repository_headers("grpc"))
        """
        if protocol not in ("http", "grpc"):
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if self.repository_key is None:
            return {}
        prefix = GRPC_RESTRICTED_HEADER_PREFIX if protocol == "grpc" else ""
        return {prefix + self.repository_key_header: self.repository_key}

    @property
    def pid(self) -> int | None:
        """tritonserver's process id (also its process group id), None before `start()`."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """tritonserver's exit status; None while it runs or before it started."""
        return self._process.poll() if self._process is not None else None

    @property
    def log_path(self) -> Path | None:
        """The file holding Triton's full log (set by `start()`)."""
        return self._log_path

    @property
    def running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self._process is not None and self._process.poll() is None

    def log_text(self) -> str:
        """The last LOG_MEMORY_LINES lines of Triton's log (the log file keeps all)."""
        with self._lock:
            return "".join(line + "\n" for line in self._lines)

    def log_tail(self, lines: int = ERROR_TAIL_LINES) -> list[str]:
        """The last `lines` log lines worth quoting in an error: not empty, not table rows."""
        with self._lock:
            kept = [line for line in self._lines if line.strip() and line[0] not in _TABLE_CHARS]
        return kept[-lines:]

    @property
    def model_errors(self) -> dict[str, str]:
        """Model -> load error extracted from the log so far."""
        with self._lock:
            return dict(self._model_errors)

    # --- lifecycle ---

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> TritonServer:
        """Starts tritonserver and waits until it is ready.

        Returns:
            self, for chaining.

        Raises:
            BinaryNotFoundError, RepositoryNotFoundError, PortInUseError, ModelLoadFailedError,
            ServerExitedError, StartupTimeoutError: see each class. The server is stopped and
            cleaned up before any of them propagates.
        """
        if self._process is not None:
            raise TritonServerError("this TritonServer was already started; create a new one")
        binary = find_tritonserver(self._binary_arg)
        if not self.repository.is_dir():
            what = "is not a folder" if self.repository.exists() else "does not exist"
            raise RepositoryNotFoundError(
                f"model repository {self.repository} {what}; pass --repository or build it "
                "first (`make build-engines`)"
            )
        triton_root = _python_backend_root(binary)
        for attempt in range(1, FREE_PORT_ATTEMPTS + 1):
            ports = self._choose_ports()
            try:
                self._launch(binary, triton_root, ports)
                self._wait_until_ready()
                self.backend_processes()  # remember which stub serves which model
                return self
            except PortInUseError as error:
                self._cleanup()
                if self._requested[error.protocol] != FREE_PORT or attempt == FREE_PORT_ATTEMPTS:
                    raise
                # Another process took a port we picked between our check and Triton's bind.
                self._reset_for_retry()
            except BaseException:
                self._cleanup()
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self, timeout: float | None = None) -> int | None:
        """Stops tritonserver: SIGTERM, wait for its drain, then SIGKILL the process group.

        Safe to call more than once and on a server that already exited. A second Ctrl-C while
        waiting kills the process group at once (and is re-raised afterwards).

        Args:
            timeout: Seconds to wait after SIGTERM; default `exit_timeout` plus STOP_GRACE_S.

        Returns:
            tritonserver's exit status, or None if it never started.
        """
        if self._process is None:
            return None
        self._stopping = True
        wait_s = self.exit_timeout + STOP_GRACE_S if timeout is None else timeout
        try:
            if self._process.poll() is None:
                try:
                    self._process.send_signal(signal.SIGTERM)
                    self._process.wait(timeout=wait_s)
                except subprocess.TimeoutExpired:
                    self._kill_group()
                except KeyboardInterrupt:
                    self._kill_group()
                    raise
        finally:
            self._cleanup()
        return self._process.returncode

    def poll(self) -> int | None:
        """tritonserver's exit status if it exited, else None."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits up to `timeout` seconds for tritonserver to exit; its status, or None."""
        if self._process is None:
            return None
        try:
            return self._process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def check_running(self) -> None:
        """Raises ServerExitedError (after cleaning up) if tritonserver exited unexpectedly."""
        if self._process is None or self._process.poll() is None or self._stopping:
            return
        self._cleanup()
        raise ServerExitedError(
            "tritonserver exited unexpectedly while serving",
            self._process.returncode,
            self.log_tail(),
            log_path=self._log_path,
        )

    # --- queries over HTTP ---

    def is_ready(self) -> bool:
        """Whether GET /v2/health/ready answers 200 (all models ready, strict readiness)."""
        return self._http_status(HEALTH_READY_PATH) == HTTP_OK

    def is_live(self) -> bool:
        """Whether GET /v2/health/live answers 200."""
        return self._http_status(HEALTH_LIVE_PATH) == HTTP_OK

    def metadata(self) -> dict[str, Any]:
        """Triton's server metadata (GET /v2): name, version, extensions."""
        return self._http_json("GET", SERVER_METADATA_PATH)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of metric `name` on the metrics page whose labels include
        `labels` (0.0 when there is none yet: Triton and kiln's counters appear at their first
        increment). E.g. `metric("kiln_step_failures_total", model="m", reason="decode")`, or
        `metric("nv_inference_pending_request_count", model="m")` summed over versions.

        Raises:
            TritonServerError: the metrics page did not answer.
        """
        url = self.metrics_url
        try:
            with urllib.request.urlopen(url, timeout=HTTP_PROBE_TIMEOUT_S) as response:
                text = response.read().decode("utf-8")
        except (urllib.error.URLError, OSError) as error:
            raise TritonServerError(f"tritonserver's metrics at {url} did not answer: {error}",
                                    log_path=self._log_path) from error
        total = 0.0
        for match in _METRIC_SAMPLE.finditer(text):
            if match.group("name") != name:
                continue
            found = dict(_METRIC_LABEL.findall(match.group("labels") or ""))
            if all(found.get(key) == value for key, value in labels.items()):
                total += float(match.group("value"))
        return total

    def models(self) -> dict[str, str]:
        """Model name -> state ("READY", "UNAVAILABLE", ...) from the repository index.

        A model the index lists without a state (never loaded, explicit mode) is "UNLOADED".
        """
        index = self._repository_call("POST", REPOSITORY_INDEX_PATH, b"{}", HTTP_PROBE_TIMEOUT_S)
        return {entry["name"]: entry.get("state") or UNLOADED_STATE for entry in index}

    # --- the model-repository API (explicit model-control mode) ---

    def load_model(
        self, model: str, *, config: Mapping[str, Any] | None = None,
        timeout: float = REPOSITORY_CALL_TIMEOUT_S,
    ) -> None:
        """Loads `model`, or loads it again: new version folders are picked up (per its version
        policy) and Triton switches to them once they are ready, with no request failing.

        A load of a model whose files did not change does nothing; pass `config` (a model config
        as JSON, e.g. its current one) to force new instances (see `reload_model`).

        Raises:
            RepositoryApiError: Triton refused or the load failed (Triton's message; 403 when
                the repository key is wrong, 503 outside explicit model-control mode).
        """
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        self._repository_call("POST", self._model_path(model, "load"), json.dumps(body).encode(), timeout)

    def unload_model(
        self, model: str, *, unload_dependents: bool = False, timeout: float = REPOSITORY_CALL_TIMEOUT_S
    ) -> None:
        """Unloads `model`. Triton stops routing new requests to it at once, lets the requests it
        already holds finish, then stops its instances; the call returns before that completes.

        Raises:
            RepositoryApiError: see `load_model`.
        """
        body = {"parameters": {"unload_dependents": unload_dependents}}
        self._repository_call(
            "POST", self._model_path(model, "unload"), json.dumps(body).encode(), timeout
        )

    def reload_model(self, model: str, *, timeout: float = REPOSITORY_CALL_TIMEOUT_S) -> None:
        """Replaces `model`'s instances (and stub processes) with new ones while it serves.

        Loads the model with its current config as an override, which Triton treats as a new
        model: the new instances start, then take over; ensembles using it stay READY. This is
        how a model whose stub process died is brought back (explicit model-control mode).

        Raises:
            RepositoryApiError: see `load_model`.
        """
        config = self._repository_call(
            "GET", MODEL_CONFIG_PATH.format(model=self._quoted(model)), None, HTTP_PROBE_TIMEOUT_S
        )
        self.load_model(model, config=config, timeout=timeout)

    # --- the python backend's stub processes ---

    def backend_processes(self) -> list[BackendProcess]:
        """The python backend stub processes of this tritonserver, alive or dead (not reaped).

        A stub that died shows as a zombie: Triton 2.51 does not reap it. Its model is known when
        kiln saw it alive before (every call, and `start()`, remembers the stubs it sees).
        """
        if self._process is None or self._process.poll() is not None:
            return []
        found = []
        for pid, state, returncode, argv in _proc_children(self._process.pid):
            known = self._backends.get(pid)
            if len(argv) > STUB_ARG_INSTANCE and Path(argv[0]).name == STUB_NAME:
                model_file = Path(argv[STUB_ARG_MODEL_FILE])
                known = BackendProcess(
                    pid, model_file.parent.parent.name, model_file.parent.name,
                    argv[STUB_ARG_INSTANCE], state, returncode,
                )
                self._backends[pid] = known
            elif known is None:
                if state != ZOMBIE:
                    continue  # not a stub (nothing else is started by tritonserver here)
                known = BackendProcess(pid, "?", "?", "?", state, returncode)
            found.append(known._replace(state=state, returncode=returncode))
        return sorted(found, key=lambda p: p.pid)

    def crashed_backends(self) -> list[BackendProcess]:
        """Stub processes that died on their own (killed, or exited non-zero) while tritonserver
        runs. Triton reaps the stubs it stops itself (unload), so those are not listed."""
        return [p for p in self.backend_processes() if not p.alive and p.returncode != 0]

    @staticmethod
    def _quoted(model: str) -> str:
        if not isinstance(model, str) or not _MODEL_NAME.match(model):
            raise ValueError(f"{model!r} is not a model name (one path segment, {_MODEL_NAME.pattern})")
        return urllib.parse.quote(model, safe="")

    def _model_path(self, model: str, action: str) -> str:
        return REPOSITORY_MODEL_PATH.format(model=self._quoted(model), action=action)

    def _repository_call(self, method: str, path: str, body: bytes | None, timeout: float) -> Any:
        """A repository-API (or config) call with the key's header; Triton's error as the message."""
        request = urllib.request.Request(
            self._http_url(path), data=body, method=method, headers=self.repository_headers("http")
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read().decode("utf-8")
        except urllib.error.HTTPError as error:
            try:
                detail = json.loads(error.read().decode("utf-8")).get("error") or error.reason
            except (ValueError, AttributeError, OSError):
                detail = error.reason
            raise RepositoryApiError(
                f"tritonserver at {self.http_url} refused {method} {path} (HTTP {error.code}): {detail}",
                error.code,
                log_path=self._log_path,
            ) from None
        except (urllib.error.URLError, OSError) as error:
            raise RepositoryApiError(
                f"tritonserver at {self.http_url} did not answer {method} {path}: {error}",
                None,
                log_path=self._log_path,
            ) from error
        try:
            return json.loads(text) if text.strip() else None
        except ValueError as error:
            raise RepositoryApiError(
                f"tritonserver at {self.http_url} answered {method} {path} with no JSON: {error}",
                None,
                log_path=self._log_path,
            ) from error

    def _http_url(self, path: str) -> str:
        return f"http://{self.http_url}{path}"

    def _http_status(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(
                self._http_url(path), timeout=HTTP_PROBE_TIMEOUT_S
            ) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except (urllib.error.URLError, OSError):
            return None

    def _http_json(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(self._http_url(path), data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_PROBE_TIMEOUT_S) as response:
                return json.loads(response.read().decode("utf-8"))
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise TritonServerError(
                f"tritonserver at {self.http_url} did not answer {method} {path}: {error}",
                log_path=self._log_path,
            ) from error

    # --- internals ---

    def _choose_ports(self) -> Ports:
        """Picks the free ports asked for and checks the fixed ones are free, before Triton
        spends seconds loading models only to fail at its bind."""
        wanted = dict(self._requested)
        try:
            free = iter(pick_free_ports(self.host, sum(p == FREE_PORT for p in wanted.values())))
            chosen = {
                name: (next(free) if port == FREE_PORT else port) for name, port in wanted.items()
            }
            for protocol, port in chosen.items():
                if self._requested[protocol] != FREE_PORT and not port_is_free(self.host, port):
                    raise PortInUseError(port, protocol, self.host)
        except OSError as error:  # e.g. a host that is not an address of this machine
            raise TritonServerError(f"cannot listen on host {self.host!r}: {error}") from error
        return Ports(**chosen)

    def _command(self, binary: Path, backend_dir: Path, ports: Ports) -> list[str]:
        assert self._shm_prefix is not None
        command = [
            str(binary),
            f"--model-repository={self.repository.resolve()}",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={ports.http}",
            f"--grpc-port={ports.grpc}",
            f"--metrics-port={ports.metrics}",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
        ]
        command += [f"--load-model={name}" for name in self.load_models]
        if self.repository_key is not None:
            restriction = f"{REPOSITORY_API}:{self.repository_key_header}={self.repository_key}"
            command += [
                f"--http-restricted-api={restriction}",
                f"--grpc-restricted-protocol={restriction}",
            ]
        command += self.extra_args
        return command

    def _environment(self, triton_root: Path) -> dict[str, str]:
        env = dict(os.environ)
        # The python backend stub runs model code with the first `python` on PATH: make it ours,
        # so backends import numpy, onnxruntime and kiln from this environment.
        env["PATH"] = os.pathsep.join(
            [os.path.dirname(sys.executable)] + ([env["PATH"]] if env.get("PATH") else [])
        )
        libs = triton_root.parent.parent / PYTRITON_LIBS_DIRNAME
        if libs.is_dir():
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libs)] + ([old] if old else []))
        return env

    def _launch(self, binary: Path, triton_root: Path, ports: Ports) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="kiln-triton-"))
        backend_dir = self._workdir / "backends"
        if self._backends_dir is None:
            source, names = paths.backends_dir(), paths.available_backends()
        else:
            source = self._backends_dir
            names = tuple(sorted(p.name for p in source.iterdir() if (p / BACKEND_ENTRYPOINT).is_file()))
        assemble_backend_directory(backend_dir, triton_root, source, names)
        if self._log_path is None:
            handle, name = tempfile.mkstemp(prefix="kiln-tritonserver-", suffix=".log")
            os.close(handle)
            self._log_path = Path(name)
        self._log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self._log_path, "w", encoding="utf-8")  # noqa: SIM115
        self._shm_prefix = SHM_PREFIX_TEMPLATE.format(
            pid=os.getpid(), token=uuid.uuid4().hex[:SHM_TOKEN_CHARS]
        )
        command = self._command(binary, backend_dir, ports)
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=self._environment(triton_root),
                # Own session: a terminal's Ctrl-C reaches kiln only, which then stops Triton.
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
            )
        except OSError as error:
            raise BinaryNotFoundError(f"cannot run tritonserver at {binary}: {error}") from error
        self._ports = ports
        self._stopping = False
        self._reader = threading.Thread(
            target=self._read_log, name=f"tritonserver-log-{self._process.pid}", daemon=True
        )
        self._reader.start()
        atexit.register(self.stop)

    def _reset_for_retry(self) -> None:
        """Forgets a failed launch so `start()` can try again (the log file is overwritten)."""
        self._process = None
        self._ports = None
        self._cleaned = False
        self._backends.clear()
        with self._lock:
            self._lines.clear()
            self._model_errors.clear()
            self._port_failures.clear()

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stdout = self._process.stdout
        try:
            for raw in iter(stdout.readline, b""):
                self._record(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        except (OSError, ValueError):  # the pipe was closed by _cleanup after a join timeout
            pass

    def _record(self, line: str) -> None:
        """Keeps one log line: memory, file, stream, and the failure scan."""
        with self._lock:
            self._lines.append(line)
            self._scan(line)
            if self._log_handle is not None and not self._log_handle.closed:
                self._log_handle.write(line + "\n")
                self._log_handle.flush()
        if self.log_stream is not None:
            try:
                self.log_stream.write(line + "\n")
                self.log_stream.flush()
            except (OSError, ValueError):  # closed or broken stream: keep the file log
                self.log_stream = None

    def _scan(self, line: str) -> None:
        """Records model load failures and port bind failures from one log line."""
        protobuf = _PROTOBUF_ERROR.match(line)
        if protobuf:
            self._last_protobuf_error = protobuf.group("error").strip()
            return
        status = _STATUS_ROW.match(line)
        if status:  # the model status table: a fallback for failures logged in another form
            self._model_errors.setdefault(status.group("model"), status.group("error"))
            return
        match = _LOG_LINE.match(line)
        if not match:
            return
        message = _unquote(match.group("message").strip())
        if failed := _MODEL_FAILED.match(message):
            self._model_errors[failed.group("model")] = _clean_model_error(failed.group("error"))
        elif failed := _MODEL_POLL_FAILED.match(message):
            error = _clean_model_error(failed.group("error"))
            if self._last_protobuf_error:
                error = f"{error}: {self._last_protobuf_error}"
            self._model_errors[failed.group("model")] = error
        elif loaded := _MODEL_LOADED.match(message):
            self._model_errors.pop(loaded.group("model"), None)
        elif port := _PORT_FAILED.search(message):
            self._port_failures.append(
                (port.group("service").lower(), port.group("host"), int(port.group("port")))
            )
        self._last_protobuf_error = None  # it only explains the line right after it

    def _failure(self) -> TritonServerError | None:
        """The error the log explains, if any: a port taken, else models that failed to load."""
        with self._lock:
            port_failures = list(self._port_failures)
            model_errors = dict(self._model_errors)
        if port_failures:
            protocol, host, port = port_failures[0]
            return PortInUseError(port, protocol, host, log_path=self._log_path)
        if model_errors:
            return ModelLoadFailedError(model_errors, log_path=self._log_path)
        return None

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._process.poll() is not None:
                self._drain_reader()
                raise self._failure() or ServerExitedError(
                    "tritonserver exited during startup",
                    self._process.returncode,
                    self.log_tail(),
                    log_path=self._log_path,
                )
            status = self._http_status(HEALTH_READY_PATH)
            if status == HTTP_OK:
                return
            if status is not None:
                # HTTP is up, so loading is over; not ready with a failed model means it never
                # will be (e.g. --exit-on-error=false): report the model now, not at the deadline.
                failure = self._failure()
                if failure is not None:
                    raise failure
            if time.monotonic() >= deadline:
                raise StartupTimeoutError(
                    f"tritonserver was not ready after {self.startup_timeout:g} s "
                    f"(GET {HEALTH_READY_PATH} on {self.http_url}); last log lines:\n"
                    + "\n".join(f"  {line}" for line in self.log_tail())
                    + f"\nfull log: {self._log_path}",
                    log_path=self._log_path,
                )
            time.sleep(READY_POLL_INTERVAL_S)

    def _drain_reader(self) -> None:
        """Lets the log reader consume what Triton wrote before it exited."""
        if self._reader is not None:
            self._reader.join(timeout=LOG_READER_JOIN_S)

    def _kill_group(self) -> None:
        assert self._process is not None
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self._process.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass

    def _cleanup(self) -> None:
        """Kills whatever is left of the process group and removes temp files and shm regions.

        Runs once per launch: the group id is only signalled while it can still be ours.
        """
        if self._cleaned:
            return
        self._cleaned = True
        process = self._process
        if process is not None:
            if process.poll() is None:
                self._kill_group()
            # Stubs whose tritonserver died may outlive it briefly; they share its process group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self._drain_reader()
            if process.stdout is not None:
                process.stdout.close()
        atexit.unregister(self.stop)
        with self._lock:
            if self._log_handle is not None:
                self._log_handle.close()
                self._log_handle = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._shm_prefix is not None and SHM_DIR.is_dir():
            for region in SHM_DIR.glob(f"{self._shm_prefix}*"):
                try:
                    region.unlink()
                except OSError:
                    pass
