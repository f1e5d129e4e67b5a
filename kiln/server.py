"""The embedded server runtime: runs the `tritonserver` of the nvidia-pytriton wheel.

`TritonServer` assembles a backend directory (Triton's python backend with the stub of the running
Python, plus every kiln backend), starts tritonserver against a model repository in its own
process group, streams and saves its log, waits until it is ready, and shuts it down cleanly. The
tests, the benchmarks and `kiln serve` all start Triton through it.

Errors a user meets (a port in use, no tritonserver binary, no repository, a model that fails to
load, Triton exiting) raise a subclass of `ServerError` whose message says what happened and what
to do; a model's own load error is extracted from Triton's log.

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
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
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

HEALTH_READY_PATH = "/v2/health/ready"
HEALTH_LIVE_PATH = "/v2/health/live"
SERVER_METADATA_PATH = "/v2"
REPOSITORY_INDEX_PATH = "/v2/repository/index"
METRICS_PATH = "/metrics"
HTTP_OK = 200
UNLOADED_STATE = "UNLOADED"

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
"""The python backend appends the Python traceback after this to a failed `initialize`."""


# --- errors --------------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """Base class of every error the embedded server runtime raises.

    Attributes:
        log_path: The file holding Triton's full log, when one was written.
    """

    def __init__(self, message: str, *, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class BinaryNotFoundError(ServerError):
    """The tritonserver binary, its python backend or the stub for this Python is missing."""


class RepositoryNotFoundError(ServerError):
    """The model repository folder does not exist."""


class PortInUseError(ServerError):
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


class ModelLoadError(ServerError):
    """One or more models failed to load; `errors` maps each model to Triton's message."""

    def __init__(self, errors: Mapping[str, str], *, log_path: Path | None = None) -> None:
        lines = [f"model '{name}' failed to load: {message}" for name, message in errors.items()]
        super().__init__("\n".join(lines), log_path=log_path)
        self.errors = dict(errors)


class ServerExitedError(ServerError):
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


class StartupTimeoutError(ServerError):
    """tritonserver did not become ready before the startup deadline."""


# --- helpers -------------------------------------------------------------------------------------


class Ports(NamedTuple):
    """The three ports a tritonserver listens on."""

    http: int
    grpc: int
    metrics: int


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
    ) -> None:
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
            BinaryNotFoundError, RepositoryNotFoundError, PortInUseError, ModelLoadError,
            ServerExitedError, StartupTimeoutError: see each class. The server is stopped and
            cleaned up before any of them propagates.
        """
        if self._process is not None:
            raise ServerError("this TritonServer was already started; create a new one")
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

    def models(self) -> dict[str, str]:
        """Model name -> state ("READY", "UNAVAILABLE", ...) from the repository index.

        A model the index lists without a state (never loaded, explicit mode) is "UNLOADED".
        """
        index = self._http_json("POST", REPOSITORY_INDEX_PATH, b"{}")
        return {entry["name"]: entry.get("state") or UNLOADED_STATE for entry in index}

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
            raise ServerError(
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
            raise ServerError(f"cannot listen on host {self.host!r}: {error}") from error
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

    def _failure(self) -> ServerError | None:
        """The error the log explains, if any: a port taken, else models that failed to load."""
        with self._lock:
            port_failures = list(self._port_failures)
            model_errors = dict(self._model_errors)
        if port_failures:
            protocol, host, port = port_failures[0]
            return PortInUseError(port, protocol, host, log_path=self._log_path)
        if model_errors:
            return ModelLoadError(model_errors, log_path=self._log_path)
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
