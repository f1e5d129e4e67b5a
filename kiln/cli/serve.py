"""`kiln serve`: run the embedded tritonserver on a model repository until Ctrl-C.

The dispatcher (`kiln.cli`) calls `add_serve_command(subparsers)` and `add_demo_flag(parser)`; the
command builds a `TritonServer` from the flags and hands it to `serve()`, which also takes an
`on_ready` hook (`--demo` runs a prediction there). kiln's own lines go to stdout, Triton's log to
stderr (unless --quiet) and always to a log file; errors are one or two lines on stderr, no
traceback, and a non-zero exit code.

When the repository serves a text-generation model (a decoupled kiln_generate model), `serve()`
also starts kiln's OpenAI-compatible endpoints (`kiln.openai`: /v1/completions,
/v1/chat/completions, /v1/models, /health) on their own port once Triton is ready
(`--openai-port`, default 9000; `--no-openai` turns them off), prints their URL in the ready
block and stops them on exit.

While serving, `serve()` also watches the python backend's stub processes: Triton 2.51 neither
restarts a stub that died (killed by the OOM killer, say) nor stops reporting its model READY, so
every request to that model would fail until a restart. kiln reloads the model in place
(explicit model-control mode), or reports the crash and exits 1 so a supervisor restarts it
(`--on-backend-crash`; see docs/operations.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, TextIO

from kiln import paths
from kiln.server import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_REPOSITORY_KEY_HEADER,
    DEFAULT_STARTUP_TIMEOUT_S,
    FREE_PORT,
    MODEL_CONTROL_MODES,
    TRITON_EXIT_TIMEOUT_S,
    BackendCrashedError,
    BackendProcess,
    TritonServer,
    TritonServerError,
    describe_returncode,
    is_repository_url,
)

if TYPE_CHECKING:
    from kiln.openai.server import OpenAIServer

PROG = "kiln serve"
EXIT_OK = 0
EXIT_ERROR = 1
SERVE_POLL_S = 0.5
"""How often `serve()` checks that tritonserver is still alive while serving."""
RELOAD_TIMEOUT_S = 60.0
"""Bound on reloading a model whose stub died. Triton 2.51 can itself abort (SIGABRT,
boost::interprocess::lock_exception) when a stub was killed holding its shared-memory lock, and a
reload against it may then never be answered: kiln stops waiting, reports, and exits 1 for a
supervisor to restart it, instead of hanging."""

ON_BACKEND_CRASH = ("reload", "exit")
"""What `kiln serve` does when a backend stub dies: reload its model in place, or exit 1."""
RELOAD = "reload"
EXIT = "exit"
DEFAULT_REPOSITORY_KEY_ENV = "KILN_REPOSITORY_KEY"

OnReady = Callable[[TritonServer], None]
DEFAULT_OPENAI_PORT = 9000
"""Port of the OpenAI-compatible endpoints (`kiln.openai.server.DEFAULT_OPENAI_PORT`)."""


@dataclass(frozen=True)
class OpenAISettings:
    """Where `serve()` runs the OpenAI-compatible endpoints (on Triton's host).

    Attributes:
        port: The port; FREE_PORT (0) picks a free one.
    """

    port: int = DEFAULT_OPENAI_PORT


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `serve` on the `kiln` subparsers; sets `func` to `run_serve`.

    Returns:
        The `serve` parser, so the dispatcher can add flags (e.g. --demo, `add_demo_flag`) and
        replace `func` with one that calls `run_serve(args, on_ready=...)`.
    """
    parser = subparsers.add_parser(
        "serve",
        help="serve the model repository with the embedded tritonserver",
        description=(
            "Run the tritonserver shipped in nvidia-pytriton on a model repository, with kiln's "
            "Python-based backends, until Ctrl-C or SIGTERM."
        ),
    )
    # The order of these calls is the order of the flags in --help.
    _add_endpoint_flags(parser)
    _add_model_flags(parser)
    _add_log_flags(parser)
    _add_operation_flags(parser)
    parser.set_defaults(func=run_serve)
    return parser


def add_demo_flag(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds --demo to the `serve` parser and makes `func` run the demo once the server is ready."""
    parser.add_argument(
        "--demo", action="store_true",
        help="once ready, classify a few held-out digits through the server and print a curl "
        "line for the same request",
    )
    parser.set_defaults(func=run_serve_command)
    return parser


def run_serve_command(args: argparse.Namespace) -> int:
    """`kiln serve` with --demo: `run_serve`, with the pipelines demo as `on_ready` when asked."""
    on_ready = None
    if args.demo:
        from kiln.demo import pipelines_demo

        on_ready = pipelines_demo
    return run_serve(args, on_ready=on_ready)


def _add_endpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--repository", type=repository_arg, default=paths.model_repository(),
        help="model repository to serve: a folder, or an object-storage URL Triton downloads the "
        "models from (s3://BUCKET/PREFIX, s3://http://HOST:PORT/BUCKET/PREFIX for an "
        "S3-compatible server, gs://, as://; credentials from the environment, e.g. "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) (default: %(default)s)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST,
        help="interface to bind the endpoints to; 0.0.0.0 for all (default: %(default)s)",
    )
    for protocol, name, default in (
        ("http", "HTTP", DEFAULT_HTTP_PORT),
        ("grpc", "gRPC", DEFAULT_GRPC_PORT),
        ("metrics", "metrics", DEFAULT_METRICS_PORT),
    ):
        parser.add_argument(
            f"--{protocol}-port", type=int, default=None, metavar="PORT",
            help=f"{name} port (default: {default}; a free one with --free-ports)",
        )
    parser.add_argument(
        "--free-ports", action="store_true",
        help="pick free ports for every endpoint not given a port flag",
    )
    parser.add_argument(
        "--openai-port", type=int, default=None, metavar="PORT",
        help="port of the OpenAI-compatible endpoints (/v1/completions, /v1/chat/completions, "
        f"/v1/models, /health), started when a text-generation model is served (default: "
        f"{DEFAULT_OPENAI_PORT}, or a free one if a Triton port flag takes it; a free one with "
        "--free-ports or 0)",
    )
    parser.add_argument(
        "--no-openai", action="store_true",
        help="do not start the OpenAI-compatible endpoints",
    )


def repository_arg(value: str) -> Path | str:
    """--repository: an object-storage URL stays a str (a Path would turn s3://http://h:p/b into
    s3:/http:/h:p/b); anything else is a folder."""
    return value if is_repository_url(value) else Path(value)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-control-mode", choices=MODEL_CONTROL_MODES, default="none",
        help="none: load every model at start; explicit: load --load-model ones; poll: reload "
        "on changes (default: %(default)s)",
    )
    parser.add_argument(
        "--load-model", action="append", default=[], metavar="NAME",
        help="model to load at start with --model-control-mode explicit (repeatable; '*' = all)",
    )
    parser.add_argument(
        "--exit-on-model-failure", action="store_true",
        help="stop when any model fails to load (default: serve the others and report each "
        "failed model with Triton's reason and the fix)",
    )
    parser.add_argument(
        "--startup-timeout", type=float, default=DEFAULT_STARTUP_TIMEOUT_S, metavar="SECONDS",
        help="give up if the server is not ready by then (default: %(default)g)",
    )
    parser.add_argument(
        "--exit-timeout", type=int, default=TRITON_EXIT_TIMEOUT_S, metavar="SECONDS",
        help="on stop, how long Triton waits for in-flight requests and open client "
        "connections before it exits anyway (default: %(default)s)",
    )


def _add_log_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-file", type=Path, default=None, metavar="PATH",
        help="save Triton's log here (default: a new file in the temp folder)",
    )
    parser.add_argument(
        "--log-verbose", type=int, default=0, metavar="LEVEL",
        help="Triton's verbose log level; 0 is off (default: %(default)s)",
    )
    parser.add_argument(
        "--quiet", action="store_true",
        help="do not stream Triton's log to stderr (it is still saved to the log file)",
    )


def _add_operation_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--on-backend-crash", choices=ON_BACKEND_CRASH, default=None,
        help="when a backend's stub process dies (Triton 2.51 keeps its model READY but fails "
        "every request): reload the model in place (needs --model-control-mode explicit) or "
        "stop and exit 1 for a supervisor to restart (default: reload in explicit mode, else exit)",
    )
    parser.add_argument(
        "--repository-key-env", default=None, metavar="VAR",
        help="restrict the model-repository API (load, unload, index) to clients sending the key "
        f"held in environment variable VAR (e.g. {DEFAULT_REPOSITORY_KEY_ENV}; at least 16 "
        "characters) in the header --repository-key-header",
    )
    parser.add_argument(
        "--repository-key-header", default=DEFAULT_REPOSITORY_KEY_HEADER, metavar="NAME",
        help="header carrying the repository key; gRPC clients send it as "
        "triton-grpc-protocol-NAME (default: %(default)s)",
    )
    parser.add_argument(
        "--triton-arg", action="append", default=[], metavar="ARG",
        help="pass an argument through to tritonserver, e.g. --triton-arg=--log-info=false",
    )


def server_from_args(args: argparse.Namespace) -> TritonServer:
    """The `TritonServer` the `serve` flags describe (not started)."""

    def port(value: int | None, default: int) -> int:
        if value is not None:
            return value
        return FREE_PORT if args.free_ports else default

    key = None
    if args.repository_key_env is not None:
        key = os.environ.get(args.repository_key_env)
        if not key:
            raise ValueError(
                f"--repository-key-env names {args.repository_key_env}, which is not set or empty"
            )
    return TritonServer(
        args.repository,
        host=args.host,
        http_port=port(args.http_port, DEFAULT_HTTP_PORT),
        grpc_port=port(args.grpc_port, DEFAULT_GRPC_PORT),
        metrics_port=port(args.metrics_port, DEFAULT_METRICS_PORT),
        model_control_mode=args.model_control_mode,
        load_models=args.load_model,
        extra_args=args.triton_arg,
        startup_timeout=args.startup_timeout,
        exit_timeout=args.exit_timeout,
        log_verbose=args.log_verbose,
        log_file=args.log_file,
        log_stream=None if args.quiet else sys.stderr,
        repository_key=key,
        repository_key_header=args.repository_key_header,
        keep_serving_on_model_failure=not args.exit_on_model_failure,
    )


def crash_policy(server: TritonServer, requested: str | None) -> str:
    """The `--on-backend-crash` policy for `server`: reload needs explicit model-control mode.

    Raises:
        ValueError: reload was asked for outside explicit mode (Triton refuses loads there).
    """
    if requested is None:
        return RELOAD if server.model_control_mode == "explicit" else EXIT
    if requested == RELOAD and server.model_control_mode != "explicit":
        raise ValueError(
            "--on-backend-crash reload needs --model-control-mode explicit (Triton refuses to "
            f"load models in mode {server.model_control_mode!r})"
        )
    return requested


def run_serve(args: argparse.Namespace, on_ready: OnReady | None = None) -> int:
    """The `serve` command: builds the server from `args` and runs `serve()`."""
    try:
        server = server_from_args(args)
        policy = crash_policy(server, getattr(args, "on_backend_crash", None))
        openai = openai_settings(args)
    except ValueError as error:  # inconsistent flags, e.g. two endpoints on one port
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return serve(server, on_ready=on_ready, on_backend_crash=policy, openai=openai)


def openai_settings(args: argparse.Namespace) -> OpenAISettings | None:
    """The OpenAI endpoints' settings the flags ask for; None with --no-openai.

    Raises:
        ValueError: A port out of range, or one of Triton's.
    """
    if getattr(args, "no_openai", False):
        return None
    triton = {args.http_port, args.grpc_port, args.metrics_port}
    port = getattr(args, "openai_port", None)
    if port is None:  # the default gives way to a Triton port given on the command line
        default_taken = DEFAULT_OPENAI_PORT in triton
        port = FREE_PORT if args.free_ports or default_taken else DEFAULT_OPENAI_PORT
    if not FREE_PORT <= port <= 65535:
        raise ValueError(f"--openai-port must be in {FREE_PORT}..65535, got {port}")
    if port != FREE_PORT and port in triton:
        raise ValueError(f"--openai-port {port} is also one of Triton's ports; give it its own")
    return OpenAISettings(port=port)


def serve(
    server: TritonServer,
    *,
    on_ready: OnReady | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    on_backend_crash: str | None = None,
    openai: OpenAISettings | None = None,
) -> int:
    """Starts `server`, prints its endpoints, runs `on_ready`, serves until Ctrl-C or SIGTERM.

    Notices within SERVE_POLL_S when tritonserver dies and reports it, and when a backend stub
    process dies: then reloads its model or stops (see `on_backend_crash`). Every path stops the
    server and leaves no tritonserver or stub process behind.

    Args:
        server: A server that has not been started.
        on_ready: Called with the running server once it is ready (e.g. a demo prediction).
        out: Where kiln's own lines go (default stdout).
        err: Where errors go (default stderr).
        on_backend_crash: "reload" (explicit model-control mode only) or "exit"; default:
            reload in explicit mode, exit otherwise.
        openai: Where to run the OpenAI-compatible endpoints, started once Triton is ready when
            it serves a text-generation model (None: never).

    Returns:
        0 after a requested stop (Ctrl-C, SIGTERM), 1 when the server failed to start or died,
        or a backend stub died with the "exit" policy or could not be reloaded.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        policy = crash_policy(server, on_backend_crash)
    except ValueError as error:
        print(f"{PROG}: error: {error}", file=err, flush=True)
        return EXIT_ERROR
    openai_server: OpenAIServer | None = None
    with _stop_signals_as_interrupt():
        try:
            try:
                server.start()
                openai_server = _start_openai(server, openai, err)
                _print_ready(server, out, openai_server)
                _report_failed_models(server, err)
                if on_ready is not None:
                    on_ready(server)
                watchdog = _BackendWatchdog(server, policy, out, err)
                while server.wait(timeout=SERVE_POLL_S) is None:
                    watchdog.check()
                server.check_running()  # it exited unasked: raises ServerExitedError
                return EXIT_ERROR
            except KeyboardInterrupt:
                if openai_server is not None:  # first: no new requests while Triton drains
                    openai_server.stop()
                return _stop_on_request(server, out)
            except TritonServerError as error:
                _report(error, err)
                return EXIT_ERROR
            except OpenAIEndpointsError as error:
                print(f"{PROG}: error: {error}", file=err, flush=True)
                return EXIT_ERROR
        finally:
            try:
                if openai_server is not None:
                    openai_server.stop()
                server.stop()
            except KeyboardInterrupt:  # a Ctrl-C during this last stop: the group is killed
                pass


class OpenAIEndpointsError(RuntimeError):
    """The OpenAI-compatible endpoints could not start (e.g. their port is in use)."""


def served_generation_models(server: TritonServer) -> list[str]:
    """The READY models of `server` that kiln's OpenAI endpoints serve (decoupled kiln_generate)."""
    from kiln.openai.protocol import generation_models

    configs = {}
    for name, state in server.models().items():
        if state != "READY":
            continue
        try:
            configs[name] = server.model_config(name)
        except TritonServerError:
            continue  # unloaded meanwhile
    return generation_models(configs)


def _start_openai(server: TritonServer, settings: OpenAISettings | None, err: TextIO) -> OpenAIServer | None:
    """Starts the OpenAI endpoints on Triton's host when a generation model is served.

    Raises:
        OpenAIEndpointsError: Their port is in use, or they did not start.
    """
    if settings is None or not served_generation_models(server):
        return None
    try:
        from kiln.openai.server import OpenAIServer, OpenAIServerError
    except ImportError as error:  # FastAPI or uvicorn missing: Triton serves on without them
        print(
            f"{PROG}: the OpenAI-compatible endpoints need FastAPI and uvicorn ({error}); install "
            "kiln's serve extra (pip install 'kiln[serve]'). Serving without them.",
            file=err, flush=True,
        )
        return None
    openai_server = OpenAIServer(server.grpc_url, host=server.host, port=settings.port)
    try:
        return openai_server.start()
    except OpenAIServerError as error:
        raise OpenAIEndpointsError(f"{error}; or --no-openai to serve without them") from error


class _BackendWatchdog:
    """Notices stub processes that died while tritonserver runs, reports each once, and reloads
    their models ("reload") or raises BackendCrashedError ("exit")."""

    def __init__(self, server: TritonServer, policy: str, out: TextIO, err: TextIO) -> None:
        self.server = server
        self.policy = policy
        self.out = out
        self.err = err
        self._seen: set[int] = set()

    def check(self) -> None:
        """One look at the stubs (cheap: a scan of /proc)."""
        dead = [p for p in self.server.crashed_backends() if p.pid not in self._seen]
        if not dead:
            return
        self._seen.update(p.pid for p in dead)
        for process in dead:
            print(
                f"{PROG}: a backend stub died: {process.describe()}; Triton does not restart it "
                "and keeps reporting the model READY while every request to it fails",
                file=self.err, flush=True,
            )
        if self.policy == EXIT:
            raise BackendCrashedError(
                f"backend stub process(es) died: {_listing(dead)}; stopping so that a supervisor "
                "restarts kiln serve (with --model-control-mode explicit, kiln reloads such a "
                "model in place instead)",
                dead,
                log_path=self.server.log_path,
            )
        for model in dict.fromkeys(p.model for p in dead):
            self._reload(model, dead)

    def _reload(self, model: str, dead: list[BackendProcess]) -> None:
        if model == "?":
            raise BackendCrashedError(
                f"a backend stub process died before kiln could tell its model ({_listing(dead)}); "
                "stopping so that a supervisor restarts kiln serve",
                dead,
                log_path=self.server.log_path,
            )
        started = time.monotonic()
        try:
            self.server.reload_model(model, timeout=RELOAD_TIMEOUT_S)
        except TritonServerError as error:
            raise BackendCrashedError(
                f"could not reload model '{model}' after its backend stub died: {error}",
                dead,
                log_path=self.server.log_path,
            ) from error
        _say(self.out, f"{PROG}: reloaded model '{model}' in {time.monotonic() - started:.1f} s")


def _listing(processes: list[BackendProcess]) -> str:
    return "; ".join(p.describe() for p in processes)


def _stop_on_request(server: TritonServer, out: TextIO) -> int:
    if server.running:
        _say(
            out,
            f"{PROG}: stopping tritonserver (waits up to {server.exit_timeout} s for in-flight "
            "requests; Ctrl-C again kills it)",
        )
    try:
        returncode = server.stop()
    except KeyboardInterrupt:
        _say(out, f"{PROG}: stopped (tritonserver killed)")
        return EXIT_OK
    detail = "" if returncode in (None, 0) else f" (tritonserver {describe_returncode(returncode)})"
    _say(out, f"{PROG}: stopped{detail}")
    return EXIT_OK


def _print_ready(server: TritonServer, out: TextIO, openai: OpenAIServer | None = None) -> None:
    try:
        version = f"tritonserver {server.metadata().get('version', '?')}"
    except TritonServerError:
        version = "tritonserver"
    try:
        models = server.models()
        listing = ", ".join(f"{name} ({state})" for name, state in sorted(models.items()))
    except TritonServerError as error:
        listing = f"(could not list: {error})"
    lines = [
        f"{PROG}: {version} is ready (pid {server.pid}), serving {server.repository}",
        f"  HTTP     http://{server.http_url}",
        f"  gRPC     {server.grpc_url}",
        f"  metrics  {server.metrics_url}",
        *([f"  OpenAI   {openai.url} ({', '.join(openai.models) or 'no model yet'})"] if openai else []),
        f"  models   {listing or '(none)'}",
        f"  log      {server.log_path}",
    ]
    if server.repository_key is not None:
        lines.append(
            f"  repository API  restricted: send the key in header '{server.repository_key_header}' "
            f"(gRPC: 'triton-grpc-protocol-{server.repository_key_header}')"
        )
    lines.append(f"{PROG}: press Ctrl-C to stop")
    _say(out, "\n".join(lines))


def fix_for(model: str, reason: str) -> str:
    """What to do about a model that failed to load, from Triton's reason."""
    base = model.rsplit("_", 1)[0] if model.endswith(("_fp16", "_int8")) else model
    if "unable to find backend library for backend 'onnxruntime'" in reason:
        return (
            "its config.pbtxt names Triton's native onnxruntime backend, which this embedded "
            "server lacks: write kiln's configs with `kiln generate` (or `kiln build`, which "
            "writes them too)"
        )
    if "model.onnx" in reason and ("No such file" in reason or "not found" in reason or "stat" in reason):
        return f"its model file is missing: build it with `kiln build --model {base}`"
    if "no version" in reason.lower() or "at least one version" in reason:
        return f"it has no version folder with a model: build it with `kiln build --model {base}`"
    return (
        "see the reason above and the log; once fixed, restart kiln serve, or load it again "
        f"(--model-control-mode explicit): POST /v2/repository/models/{model}/load"
    )


def _report_failed_models(server: TritonServer, err: TextIO) -> None:
    """Names each model that failed to load, Triton's reason and the fix; the others serve."""
    if not server.keep_serving_on_model_failure:
        return
    try:
        failed = server.failed_models()
    except TritonServerError:
        return  # the server died right after start: the serve loop reports that
    for model, reason in sorted(failed.items()):
        print(
            f"{PROG}: model '{model}' failed to load and is not served (the others are): "
            f"{reason.strip()}\n"
            f"  fix: {fix_for(model, reason)}",
            file=err, flush=True,
        )


def _report(error: TritonServerError, err: TextIO) -> None:
    message = str(error)
    if error.log_path is not None and str(error.log_path) not in message:
        message += f"\nfull log: {error.log_path}"
    print(f"{PROG}: error: {message}", file=err, flush=True)


def _say(out: TextIO, text: str) -> None:
    print(text, file=out, flush=True)  # flush: a pipe reader (tests, supervisors) sees it now


@contextmanager
def _stop_signals_as_interrupt() -> Iterator[None]:
    """Makes SIGINT and SIGTERM raise KeyboardInterrupt while serving (main thread only).

    SIGINT is set explicitly because a shell starts background jobs with SIGINT ignored, and a
    server started that way must still stop on `kill -INT`.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
