"""`kiln serve`: run the embedded tritonserver on a model repository until Ctrl-C.

The dispatcher (`kiln.cli`) calls `add_serve_command(subparsers)`; the command builds a
`TritonServer` from the flags and hands it to `serve()`, which also takes an `on_ready` hook (the
dispatcher's `--demo` runs a prediction there). kiln's own lines go to stdout, Triton's log to
stderr (unless --quiet) and always to a log file; errors are one or two lines on stderr, no
traceback, and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TextIO

from kiln import paths
from kiln.server import (
    DEFAULT_GRPC_PORT,
    DEFAULT_HOST,
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    DEFAULT_STARTUP_TIMEOUT_S,
    FREE_PORT,
    MODEL_CONTROL_MODES,
    TRITON_EXIT_TIMEOUT_S,
    ServerError,
    TritonServer,
    describe_returncode,
)

PROG = "kiln serve"
EXIT_OK = 0
EXIT_ERROR = 1
SERVE_POLL_S = 0.5
"""How often `serve()` checks that tritonserver is still alive while serving."""

OnReady = Callable[[TritonServer], None]


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `serve` on the `kiln` subparsers; sets `func` to `run_serve`.

    Returns:
        The `serve` parser, so the dispatcher can add flags (e.g. --demo) and replace `func`
        with one that calls `run_serve(args, on_ready=...)`.
    """
    parser = subparsers.add_parser(
        "serve",
        help="serve the model repository with the embedded tritonserver",
        description=(
            "Run the tritonserver shipped in nvidia-pytriton on a model repository, with kiln's "
            "Python-based backends, until Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--repository", type=Path, default=paths.model_repository(),
        help="model repository to serve (default: %(default)s)",
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
        "--model-control-mode", choices=MODEL_CONTROL_MODES, default="none",
        help="none: load every model at start; explicit: load --load-model ones; poll: reload "
        "on changes (default: %(default)s)",
    )
    parser.add_argument(
        "--load-model", action="append", default=[], metavar="NAME",
        help="model to load at start with --model-control-mode explicit (repeatable; '*' = all)",
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
    parser.add_argument(
        "--triton-arg", action="append", default=[], metavar="ARG",
        help="pass an argument through to tritonserver, e.g. --triton-arg=--log-info=false",
    )
    parser.set_defaults(func=run_serve)
    return parser


def server_from_args(args: argparse.Namespace) -> TritonServer:
    """The `TritonServer` the `serve` flags describe (not started)."""

    def port(value: int | None, default: int) -> int:
        if value is not None:
            return value
        return FREE_PORT if args.free_ports else default

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
    )


def run_serve(args: argparse.Namespace, on_ready: OnReady | None = None) -> int:
    """The `serve` command: builds the server from `args` and runs `serve()`."""
    try:
        server = server_from_args(args)
    except ValueError as error:  # inconsistent flags, e.g. two endpoints on one port
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    return serve(server, on_ready=on_ready)


def serve(
    server: TritonServer,
    *,
    on_ready: OnReady | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Starts `server`, prints its endpoints, runs `on_ready`, serves until Ctrl-C or SIGTERM.

    Notices within SERVE_POLL_S when tritonserver dies and reports it. Every path stops the
    server and leaves no tritonserver or stub process behind.

    Args:
        server: A server that has not been started.
        on_ready: Called with the running server once it is ready (e.g. a demo prediction).
        out: Where kiln's own lines go (default stdout).
        err: Where errors go (default stderr).

    Returns:
        0 after a requested stop (Ctrl-C, SIGTERM), 1 when the server failed to start or died.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    with _stop_signals_as_interrupt():
        try:
            try:
                server.start()
                _print_ready(server, out)
                if on_ready is not None:
                    on_ready(server)
                while server.wait(timeout=SERVE_POLL_S) is None:
                    pass
                server.check_running()  # it exited unasked: raises ServerExitedError
                return EXIT_ERROR
            except KeyboardInterrupt:
                return _stop_on_request(server, out)
            except ServerError as error:
                _report(error, err)
                return EXIT_ERROR
        finally:
            try:
                server.stop()
            except KeyboardInterrupt:  # a Ctrl-C during this last stop: the group is killed
                pass


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


def _print_ready(server: TritonServer, out: TextIO) -> None:
    try:
        version = f"tritonserver {server.metadata().get('version', '?')}"
    except ServerError:
        version = "tritonserver"
    try:
        models = server.models()
        listing = ", ".join(f"{name} ({state})" for name, state in sorted(models.items()))
    except ServerError as error:
        listing = f"(could not list: {error})"
    lines = [
        f"{PROG}: {version} is ready (pid {server.pid}), serving {server.repository}",
        f"  HTTP     http://{server.http_url}",
        f"  gRPC     {server.grpc_url}",
        f"  metrics  {server.metrics_url}",
        f"  models   {listing or '(none)'}",
        f"  log      {server.log_path}",
        f"{PROG}: press Ctrl-C to stop",
    ]
    _say(out, "\n".join(lines))


def _report(error: ServerError, err: TextIO) -> None:
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
