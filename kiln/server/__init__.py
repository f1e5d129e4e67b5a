"""The embedded server runtime: runs the `tritonserver` of the nvidia-pytriton wheel.

`TritonServer` assembles a backend directory (Triton's python backend with the stub of the running
Python, plus every kiln backend), starts tritonserver against a model repository in its own
process group, streams and saves its log, waits until it is ready, and shuts it down cleanly. The
tests, the benchmarks and `kiln serve` all start Triton through it. The repository is a folder or
an object-storage URL (s3://, gs://, as://; see docs/operations.md, "Model repository in object
storage"): Triton downloads each model from there, and kiln's backends still come from the
backend directory kiln assembles, so nothing else changes.

Errors a user meets (a port in use, no tritonserver binary, no repository, a model that fails to
load, Triton exiting) raise a subclass of `TritonServerError` whose message says what happened and what
to do; a model's own load error is extracted from Triton's log.

Operations (docs/operations.md): the endpoints bind to loopback unless a host is given; the
model-repository API (load, unload, index) can be restricted to clients sending a key
(`repository_key`); `load_model`, `unload_model` and `reload_model` drive it with that key; and
`backend_processes` / `crashed_backends` watch the python backend's stub processes, since Triton
2.51 neither restarts a stub that died nor stops reporting its model READY.

`TritonServer` composes one module per job, and this package re-exports their public names:

    errors          `TritonServerError` and its subclasses, `describe_returncode`
    ports           defaults, `Ports`, `pick_free_ports`, `port_is_free`, `choose_ports`
    binary          finding tritonserver and its python backend; the backend directory
    process         one launch of tritonserver: command line, process group, stop, cleanup
    logs            `TritonLog`: Triton's log kept and scanned for model and port failures
    repository_api  the HTTP client: health, metadata, metrics, load/unload/index with the key
    stubs           `StubWatcher`, `BackendProcess`: the python backend's stubs, from /proc

Example:
    >>> with TritonServer(repository, http_port=0, grpc_port=0, metrics_port=0) as server:
    ...     client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import atexit
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from kiln import paths
from kiln.server.binary import (
    BACKEND_ENTRYPOINT,
    BINARY_RELPATH,
    INSTALL_HINT,
    PYTHON_BACKEND_FILES,
    PYTHON_BACKEND_RELPATH,
    PYTRITON_DISTRIBUTION,
    PYTRITON_LIBS_DIRNAME,
    PYTRITON_PACKAGE,
    STUB_NAME,
    STUBS_RELPATH,
    TRITON_SUBDIR,
    TRITONSERVER_ENV,
    assemble_backend_directory,
    backend_names,
    find_tritonserver,
    python_backend_root,
    pytriton_dir,
)
from kiln.server.errors import (
    BackendCrashedError,
    BinaryNotFoundError,
    ModelLoadFailedError,
    PortInUseError,
    RepositoryApiError,
    RepositoryNotFoundError,
    ServerExitedError,
    StartupTimeoutError,
    TritonServerError,
    describe_returncode,
)
from kiln.server.logs import ERROR_TAIL_LINES, LOG_MEMORY_LINES, LOG_READER_JOIN_S, TritonLog
from kiln.server.ports import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    FREE_PORT,
    FREE_PORT_ATTEMPTS,
    MAX_PORT,
    Ports,
    accepts_connections,
    check_ports,
    choose_ports,
    endpoint,
    pick_free_ports,
    port_is_free,
)
from kiln.server.process import (
    KILL_WAIT_S,
    MODEL_CONTROL_MODES,
    PR_SET_PDEATHSIG,
    REMOTE_REPOSITORY_SCHEMES,
    SHM_DIR,
    SHM_PREFIX_TEMPLATE,
    SHM_TOKEN_CHARS,
    STOP_GRACE_S,
    TRITON_EXIT_TIMEOUT_S,
    Options,
    TritonProcess,
    check_model_control,
    is_repository_url,
)
from kiln.server.repository_api import (
    DEFAULT_REPOSITORY_KEY_HEADER,
    GRPC_RESTRICTED_HEADER_PREFIX,
    HEALTH_LIVE_PATH,
    HEALTH_READY_PATH,
    HTTP_OK,
    HTTP_PROBE_TIMEOUT_S,
    METRICS_PATH,
    MIN_REPOSITORY_KEY_CHARS,
    MODEL_CONFIG_PATH,
    REPOSITORY_API,
    REPOSITORY_CALL_TIMEOUT_S,
    REPOSITORY_INDEX_PATH,
    REPOSITORY_MODEL_PATH,
    SERVER_METADATA_PATH,
    UNLOADED_STATE,
    RepositoryApi,
    check_repository_key,
    generate_repository_key,
    repository_headers,
    restricted_api_args,
)
from kiln.server.stubs import (
    PROC_STAT_EXIT_CODE,
    STUB_ARG_INSTANCE,
    STUB_ARG_MODEL_FILE,
    WAIT_EXIT_MASK,
    WAIT_EXIT_SHIFT,
    WAIT_SIGNAL_MASK,
    ZOMBIE,
    BackendProcess,
    StubWatcher,
)
from kiln.serving.remote import REPOSITORY_URL_ENV

__all__ = [
    # errors
    "BackendCrashedError", "BinaryNotFoundError", "ModelLoadFailedError", "PortInUseError",
    "RepositoryApiError", "RepositoryNotFoundError", "ServerExitedError", "StartupTimeoutError",
    "TritonServerError", "describe_returncode",
    # the server and what it reports
    "TritonServer", "Ports", "BackendProcess",
    # ports
    "DEFAULT_HOST", "DEFAULT_HTTP_PORT", "DEFAULT_GRPC_PORT", "DEFAULT_METRICS_PORT", "FREE_PORT",
    "FREE_PORT_ATTEMPTS", "MAX_PORT", "pick_free_ports", "port_is_free",
    # the binary and its backends
    "TRITONSERVER_ENV", "PYTRITON_PACKAGE", "PYTRITON_DISTRIBUTION", "INSTALL_HINT", "TRITON_SUBDIR",
    "BINARY_RELPATH", "PYTHON_BACKEND_RELPATH", "PYTHON_BACKEND_FILES", "STUBS_RELPATH", "STUB_NAME",
    "PYTRITON_LIBS_DIRNAME", "BACKEND_ENTRYPOINT", "assemble_backend_directory", "find_tritonserver",
    "pytriton_dir",
    # the process
    "MODEL_CONTROL_MODES", "DEFAULT_STARTUP_TIMEOUT_S", "TRITON_EXIT_TIMEOUT_S", "STOP_GRACE_S",
    "KILL_WAIT_S", "READY_POLL_INTERVAL_S", "SHM_DIR", "SHM_PREFIX_TEMPLATE", "SHM_TOKEN_CHARS",
    "PR_SET_PDEATHSIG", "REMOTE_REPOSITORY_SCHEMES", "is_repository_url",
    # the log
    "LOG_READER_JOIN_S", "LOG_MEMORY_LINES", "ERROR_TAIL_LINES",
    # the HTTP and repository API
    "HTTP_PROBE_TIMEOUT_S", "REPOSITORY_CALL_TIMEOUT_S", "HEALTH_READY_PATH", "HEALTH_LIVE_PATH",
    "SERVER_METADATA_PATH", "REPOSITORY_INDEX_PATH", "REPOSITORY_MODEL_PATH", "MODEL_CONFIG_PATH",
    "METRICS_PATH", "HTTP_OK", "UNLOADED_STATE", "REPOSITORY_API", "DEFAULT_REPOSITORY_KEY_HEADER",
    "GRPC_RESTRICTED_HEADER_PREFIX", "MIN_REPOSITORY_KEY_CHARS", "generate_repository_key",
    # the stubs
    "STUB_ARG_MODEL_FILE", "STUB_ARG_INSTANCE", "PROC_STAT_EXIT_CODE", "WAIT_SIGNAL_MASK",
    "WAIT_EXIT_SHIFT", "WAIT_EXIT_MASK", "ZOMBIE",
]

KEEP_SERVING_ARGS = ("--exit-on-error=false", "--strict-readiness=false")
"""What `keep_serving_on_model_failure` adds: Triton keeps serving the models that loaded, and
/v2/health/ready answers for the server, not for every model."""
DEFAULT_STARTUP_TIMEOUT_S = 120.0
"""How long `start()` waits for readiness; model loading dominates (ONNX Runtime sessions)."""
READY_POLL_INTERVAL_S = 0.1
SERVER_INIT_ERROR = re.compile(r'^E\d+ [\d:.]+ +\d+ tritonserver\.cc:\d+\] "(.+)"\s*$', re.M)
"""tritonserver's own startup error line (not a model's). With a repository URL it is how Triton
says it cannot read the bucket ("Unable to create S3 filesystem client...", "repository path is
not a valid directory"), and with --exit-on-error=false it then runs on, never ready."""
MODELS_FAILED_LINE = "failed to load all models"
"""The startup error line that only sums up model failures (those are reported per model)."""


class TritonServer:
    """A tritonserver process serving a model repository.

    Use it as a context manager (starts on enter, stops on exit) or call `start()` and
    `stop()`; an atexit hook stops a server that is still running when Python exits.

    Args:
        repository: The model repository; default `kiln.paths.model_repository()`. A str
            starting with s3://, gs:// or as:// is an object-storage URL, passed to
            --model-repository as written (an S3-compatible server's endpoint goes inside it:
            `s3://http://HOST:PORT/BUCKET/PREFIX`); its credentials come from the environment
            (`env`, else kiln's own: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
            AWS_DEFAULT_REGION, ...). Anything else is a folder, which must exist.
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
        keep_serving_on_model_failure: A model that fails to load does not stop the server:
            Triton runs with --exit-on-error=false and --strict-readiness=false, `start()`
            returns once it answers, and `failed_models()` names each failed model and Triton's
            reason (what `kiln serve` does). False (the default): `start()` raises
            ModelLoadFailedError, and Triton exits.
        env: Environment variables for tritonserver and its backend stubs, set over kiln's own
            environment (os.environ, with this Python first on PATH and the wheel's libraries on
            LD_LIBRARY_PATH; a PATH or LD_LIBRARY_PATH given here replaces those). E.g. the
            AWS_* credentials or TRITON_AWS_MOUNT_DIRECTORY of an s3:// repository. For a
            repository URL, KILN_REPOSITORY_URL is set to it too (unless given here): kiln's
            stubs fetch the other models' folders they read from there (`kiln.serving.remote`).
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
        keep_serving_on_model_failure: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        check_repository_key(repository_key, repository_key_header)
        check_model_control(model_control_mode, load_models)
        requested = {"http": http_port, "grpc": grpc_port, "metrics": metrics_port}
        check_ports(requested)
        if exit_timeout < 0:
            raise ValueError(f"exit_timeout must be >= 0, got {exit_timeout}")
        self.repository: Path | str
        if repository is None:
            self.repository = paths.model_repository()
        elif is_repository_url(repository):
            self.repository = str(repository)
        else:
            self.repository = Path(repository)
        self.env = dict(env or {})
        self.host = host
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.keep_serving_on_model_failure = keep_serving_on_model_failure
        self.extra_args = tuple(extra_args) + (KEEP_SERVING_ARGS if keep_serving_on_model_failure else ())
        self.startup_timeout = startup_timeout
        self.exit_timeout = exit_timeout
        self.log_verbose = log_verbose
        self.repository_key = repository_key
        self.repository_key_header = repository_key_header
        self._requested = requested
        self._binary_arg = binary
        self._backends_dir = Path(backends_dir) if backends_dir is not None else None
        self._ports: Ports | None = None
        self._log = TritonLog(Path(log_file) if log_file is not None else None, log_stream)
        self._run: TritonProcess | None = None  # the current launch
        self._stubs = StubWatcher()
        self._api = RepositoryApi(self)

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
        return endpoint(self.host, self.ports.http)

    @property
    def grpc_url(self) -> str:
        """`host:port` of the gRPC endpoint, the form tritonclient.grpc takes."""
        return endpoint(self.host, self.ports.grpc)

    @property
    def metrics_url(self) -> str:
        """Full URL of the Prometheus metrics page (`http://host:port/metrics`)."""
        return f"http://{endpoint(self.host, self.ports.metrics)}{METRICS_PATH}"

    def repository_headers(self, protocol: str = "http") -> dict[str, str]:
        """The headers a client sends to use the model-repository API ({} when it is open).

        Args:
            protocol: "http" (the header as named) or "grpc" (Triton 2.51 reads a restricted
                gRPC protocol's key from the metadata key `triton-grpc-protocol-<header>`).

        Example:
            >>> client.load_model("fraud", headers=server.repository_headers("grpc"))
        """
        return repository_headers(self.repository_key, self.repository_key_header, protocol)

    @property
    def pid(self) -> int | None:
        """tritonserver's process id (also its process group id), None before `start()`."""
        return self._run.pid if self._run is not None else None

    @property
    def returncode(self) -> int | None:
        """tritonserver's exit status; None while it runs or before it started."""
        return self._run.poll() if self._run is not None else None

    @property
    def log_path(self) -> Path | None:
        """The file holding Triton's full log (set by `start()`)."""
        return self._log.path

    @property
    def log_stream(self) -> TextIO | None:
        """The stream receiving each log line (None: quiet; set to None when it breaks)."""
        return self._log.stream

    @log_stream.setter
    def log_stream(self, stream: TextIO | None) -> None:
        self._log.stream = stream

    @property
    def running(self) -> bool:
        """Whether the tritonserver process is alive."""
        return self.pid is not None and self.returncode is None

    def log_text(self) -> str:
        """The last LOG_MEMORY_LINES lines of Triton's log (the log file keeps all)."""
        return self._log.text()

    def log_tail(self, lines: int = ERROR_TAIL_LINES) -> list[str]:
        """The last `lines` log lines worth quoting in an error: not empty, not table rows."""
        return self._log.tail(lines)

    @property
    def model_errors(self) -> dict[str, str]:
        """Model -> load error extracted from the log so far."""
        return self._log.model_errors

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
        if self.pid is not None:
            raise TritonServerError("this TritonServer was already started; create a new one")
        binary = find_tritonserver(self._binary_arg)
        if isinstance(self.repository, Path) and not self.repository.is_dir():
            what = "is not a folder" if self.repository.exists() else "does not exist"
            raise RepositoryNotFoundError(
                f"model repository {self.repository} {what}; pass --repository or build it "
                "first (`make build-engines`)"
            )
        triton_root = python_backend_root(binary)
        for attempt in range(1, FREE_PORT_ATTEMPTS + 1):
            ports = choose_ports(self.host, self._requested)
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
        run = self._run
        if run is None or run.popen is None:
            return None
        try:
            run.stop(self.exit_timeout + STOP_GRACE_S if timeout is None else timeout)
        finally:
            self._cleanup()
        return run.popen.returncode

    def poll(self) -> int | None:
        """tritonserver's exit status if it exited, else None."""
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Waits up to `timeout` seconds for tritonserver to exit; its status, or None."""
        if self._run is None or self._run.popen is None:
            return None
        try:
            return self._run.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def check_running(self) -> None:
        """Raises ServerExitedError (after cleaning up) if tritonserver exited unexpectedly."""
        run = self._run
        if run is None or run.popen is None or run.popen.poll() is None or run.stopping:
            return
        self._cleanup()
        raise ServerExitedError(
            "tritonserver exited unexpectedly while serving",
            run.popen.returncode,
            self.log_tail(),
            log_path=self.log_path,
        )

    # --- queries over HTTP ---

    def is_ready(self) -> bool:
        """Whether GET /v2/health/ready answers 200 (all models ready, strict readiness)."""
        return self._api.status(HEALTH_READY_PATH) == HTTP_OK

    def is_live(self) -> bool:
        """Whether GET /v2/health/live answers 200."""
        return self._api.status(HEALTH_LIVE_PATH) == HTTP_OK

    def metadata(self) -> dict[str, Any]:
        """Triton's server metadata (GET /v2): name, version, extensions."""
        return self._api.json("GET", SERVER_METADATA_PATH)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of metric `name` on the metrics page whose labels include
        `labels` (0.0 when there is none yet: Triton and kiln's counters appear at their first
        increment). E.g. `metric("kiln_step_failures_total", model="m", reason="decode")`, or
        `metric("nv_inference_pending_request_count", model="m")` summed over versions.

        Raises:
            TritonServerError: the metrics page did not answer.
        """
        return self._api.metric(name, **labels)

    def failed_models(self) -> dict[str, str]:
        """Model name -> Triton's reason, for each model that failed to load (UNAVAILABLE in
        the repository index): what a server kept serving despite failures still lacks."""
        return self._api.failed()

    def models(self) -> dict[str, str]:
        """Model name -> state ("READY", "UNAVAILABLE", ...) from the repository index.

        A model the index lists without a state (never loaded, explicit mode) is "UNLOADED".
        """
        return self._api.models()

    def model_config(self, model: str) -> dict[str, Any]:
        """`model`'s config as Triton serves it (GET /v2/models/<model>/config, as JSON).

        Raises:
            RepositoryApiError: Triton refused (e.g. no such model, or it is not loaded).
        """
        return self._api.config(model)

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
        self._api.load(model, config, timeout)

    def unload_model(
        self, model: str, *, unload_dependents: bool = False, timeout: float = REPOSITORY_CALL_TIMEOUT_S
    ) -> None:
        """Unloads `model`. Triton stops routing new requests to it at once, lets the requests it
        already holds finish, then stops its instances; the call returns before that completes.

        Raises:
            RepositoryApiError: see `load_model`.
        """
        self._api.unload(model, unload_dependents, timeout)

    def reload_model(self, model: str, *, timeout: float = REPOSITORY_CALL_TIMEOUT_S) -> None:
        """Replaces `model`'s instances (and stub processes) with new ones while it serves.

        Loads the model with its current config as an override, which Triton treats as a new
        model: the new instances start, then take over; ensembles using it stay READY. This is
        how a model whose stub process died is brought back (explicit model-control mode).

        Raises:
            RepositoryApiError: see `load_model`.
        """
        self.load_model(model, config=self._api.config(model), timeout=timeout)

    # --- the python backend's stub processes ---

    def backend_processes(self) -> list[BackendProcess]:
        """The python backend stub processes of this tritonserver, alive or dead (not reaped).

        A stub that died shows as a zombie: Triton 2.51 does not reap it. Its model is known when
        kiln saw it alive before (every call, and `start()`, remembers the stubs it sees).
        """
        pid = self.pid
        if pid is None or self.returncode is not None:
            return []
        return self._stubs.processes(pid)

    def crashed_backends(self) -> list[BackendProcess]:
        """Stub processes that died on their own (killed, or exited non-zero) while tritonserver
        runs. Triton reaps the stubs it stops itself (unload), so those are not listed."""
        return [p for p in self.backend_processes() if not p.alive and p.returncode != 0]

    # --- internals ---

    def _launch(self, binary: Path, triton_root: Path, ports: Ports) -> None:
        self._run = TritonProcess(self._log)
        self._run.launch(binary, triton_root, self._backends(), self._options(ports), self._environment())
        self._ports = ports
        atexit.register(self.stop)

    def _backends(self) -> tuple[Path, tuple[str, ...]]:
        """The folder of kiln's backends and the names of those tritonserver gets."""
        if self._backends_dir is None:
            return paths.backends_dir(), paths.available_backends()
        return self._backends_dir, backend_names(self._backends_dir)

    def _options(self, ports: Ports) -> Options:
        return Options(
            repository=self.repository,
            host=self.host,
            ports=ports,
            model_control_mode=self.model_control_mode,
            load_models=self.load_models,
            exit_timeout=self.exit_timeout,
            log_verbose=self.log_verbose,
            restricted_args=tuple(
                restricted_api_args(self.repository_key, self.repository_key_header)
            ),
            extra_args=self.extra_args,
        )

    def _reset_for_retry(self) -> None:
        """Forgets a failed launch so `start()` can try again (the log file is overwritten)."""
        self._run = None
        self._ports = None
        self._stubs.clear()
        self._log.reset()

    def _wait_until_ready(self) -> None:
        assert self._run is not None and self._run.popen is not None
        process = self._run.popen
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if process.poll() is not None:
                self._log.drain()
                raise self._log.failure() or self._repository_failure() or ServerExitedError(
                    "tritonserver exited during startup",
                    process.returncode,
                    self.log_tail(),
                    log_path=self.log_path,
                )
            status = self._api.status(HEALTH_READY_PATH)
            if status == HTTP_OK:
                # Ready (with --strict-readiness=false also when a model failed, which the
                # caller reads from the index): only gRPC and metrics may still be starting.
                if self._other_endpoints_listen():
                    return
            elif status is not None:
                # HTTP is up, so loading is over; not ready with a failed model means it never
                # will be (e.g. --exit-on-error=false): report the model now, not at the deadline.
                failure = self._log.failure() or self._repository_failure()
                if failure is not None:
                    raise failure
            if time.monotonic() >= deadline:
                raise StartupTimeoutError(
                    f"tritonserver was not ready after {self.startup_timeout:g} s "
                    f"(GET {HEALTH_READY_PATH} on {self.http_url}); last log lines:\n"
                    + "\n".join(f"  {line}" for line in self.log_tail())
                    + f"\nfull log: {self.log_path}",
                    log_path=self.log_path,
                )
            time.sleep(READY_POLL_INTERVAL_S)

    def _environment(self) -> dict[str, str]:
        """`env`, plus, for a repository URL, KILN_REPOSITORY_URL: Triton gives a model it
        downloads a temporary folder of its own, so kiln's stubs fetch the other models' folders
        they read (a fused pipeline's steps, a step's `*_model`) from this URL
        (`kiln.serving.remote`). A value in `env` wins."""
        if isinstance(self.repository, str):
            return {REPOSITORY_URL_ENV: self.repository, **self.env}
        return dict(self.env)

    def _repository_failure(self) -> RepositoryNotFoundError | None:
        """Triton could not read a repository URL (it logs why), named with what to check."""
        if not isinstance(self.repository, str):
            return None  # a folder was checked before the start
        errors = [m for m in SERVER_INIT_ERROR.findall(self._log.text()) if MODELS_FAILED_LINE not in m]
        if not errors:
            return None
        return RepositoryNotFoundError(
            f"tritonserver cannot read the model repository {self.repository}: {errors[-1]}; check "
            "the bucket and prefix, the endpoint (an S3-compatible server goes inside the URL: "
            "s3://http://HOST:PORT/BUCKET/PREFIX) and the credentials in tritonserver's "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, or "
            "AWS_PROFILE; `env`)",
            log_path=self.log_path,
        )

    def _other_endpoints_listen(self) -> bool:
        """Whether gRPC and metrics accept connections too: Triton starts them around HTTP, not
        before it (metrics after), so HTTP's ready alone left a window where a scrape failed."""
        assert self._ports is not None
        endpoints = (("--allow-grpc", self._ports.grpc), ("--allow-metrics", self._ports.metrics))
        wanted = [port for flag, port in endpoints if f"{flag}=false" not in self.extra_args]
        return all(accepts_connections(self.host, port) for port in wanted)

    def _cleanup(self) -> None:
        """Kills what is left of the current launch, removes its files (once per launch)."""
        if self._run is not None:
            self._run.cleanup()
        atexit.unregister(self.stop)
