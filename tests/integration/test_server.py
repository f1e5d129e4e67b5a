"""The embedded server runtime (`kiln.server`) and `kiln serve` against a real tritonserver.

Each test starts its own tritonserver on free ports (a few seconds each) from a tiny repository
written by the `make_repository` fixture, and asserts on values and on the exact messages a user
reads.
"""

from __future__ import annotations

import io
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from kiln.server import (
    FREE_PORT,
    BinaryNotFoundError,
    ModelLoadFailedError,
    PortInUseError,
    RepositoryNotFoundError,
    StartupTimeoutError,
    TritonServer,
    pick_free_ports,
)

HOST = "127.0.0.1"
BAD_THREADS = "abc"
BAD_PARAMETERS = {"intra_op_threads": BAD_THREADS}
BAD_PARAMETER_MESSAGE = (
    f"parameter 'intra_op_threads' must be an integer >= 0, got '{BAD_THREADS}'"
)
BROKEN = "broken"
SERVE_READY_TIMEOUT_S = 90.0
"""Bound on `kiln serve` printing its endpoints (a start takes a few seconds here)."""
SERVE_EXIT_TIMEOUT_S = 45.0
"""Bound on `kiln serve` exiting after Ctrl-C, a crash or a failed start."""
CRASH_NOTICE_S = 5.0
"""`kiln serve` must notice a dead tritonserver well within this."""
PROCESS_GONE_TIMEOUT_S = 5.0
SHORT_STARTUP_S = 0.5
"""A startup deadline no tritonserver meets here (loading takes seconds)."""
READY_LINE = "press Ctrl-C to stop"
FREE_PORTS = {"http_port": FREE_PORT, "grpc_port": FREE_PORT, "metrics_port": FREE_PORT}


# --- helpers -------------------------------------------------------------------------------------


def process_group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, read from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # The fields after the command name, which is in parentheses and may hold spaces.
        state, _ppid, pgrp = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def assert_no_triton_left(pgid: int) -> None:
    """tritonserver (the group leader) and its python backend stubs are all gone."""
    deadline = time.monotonic() + PROCESS_GONE_TIMEOUT_S
    while (left := process_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    commands = [Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] for pid in left]
    assert not left, f"processes of tritonserver's group {pgid} left behind: {commands}"


def add_one_inputs(add_one, batch: int = 3) -> np.ndarray:
    return np.arange(batch * add_one.features, dtype=np.float32).reshape(batch, add_one.features)


def infer_http(url: str, add_one, x: np.ndarray) -> np.ndarray:
    with httpclient.InferenceServerClient(url) as client:
        tensor = httpclient.InferInput(add_one.input, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(add_one.name, [tensor]).as_numpy(add_one.output)


def infer_grpc(url: str, add_one, x: np.ndarray) -> np.ndarray:
    with grpcclient.InferenceServerClient(url) as client:
        tensor = grpcclient.InferInput(add_one.input, list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        return client.infer(add_one.name, [tensor]).as_numpy(add_one.output)


@pytest.fixture
def log_file(tmp_path: Path) -> Path:
    """Where a test's tritonserver log goes (the temp folder is not littered)."""
    return tmp_path / "tritonserver.log"


@pytest.fixture
def held_port() -> Iterator[int]:
    """A port on HOST with a listening socket on it for the duration of the test."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, FREE_PORT))
        sock.listen()
        yield sock.getsockname()[1]


class ServeProcess:
    """`kiln serve` run as a subprocess in its own session, as a terminal would run it."""

    def __init__(self, args: Sequence[str]) -> None:
        kiln = Path(sys.executable).parent / "kiln"
        command = [str(kiln)] if kiln.is_file() else [sys.executable, "-m", "kiln.cli"]
        self.process = subprocess.Popen(
            [*command, "serve", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stdout_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""
        self.triton_pid: int | None = None

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def wait_until_ready(self) -> list[str]:
        """Reads stdout until the ready block ends; returns its lines (fails on exit/timeout)."""
        deadline = time.monotonic() + SERVE_READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                self.finish()
                pytest.fail(f"kiln serve exited before ready: {self.stderr}")
            self.stdout_lines.append(line)
            if match := re.search(r"is ready \(pid (\d+)\)", line):
                self.triton_pid = int(match.group(1))
            if READY_LINE in line:
                return list(self.stdout_lines)
        pytest.fail(f"kiln serve printed no endpoints in {SERVE_READY_TIMEOUT_S} s")

    def interrupt(self) -> None:
        """Ctrl-C in a terminal: SIGINT to kiln's whole process group (Triton has its own)."""
        os.killpg(self.process.pid, signal.SIGINT)

    def finish(self, timeout: float = SERVE_EXIT_TIMEOUT_S) -> int:
        """Waits for kiln serve to exit; collects stdout and stderr; returns the exit code."""
        returncode = self.process.wait(timeout=timeout)
        assert self.process.stderr is not None
        self.stderr = self.process.stderr.read()
        self._reader.join(timeout=PROCESS_GONE_TIMEOUT_S)
        while (line := self._lines.get_nowait() if not self._lines.empty() else None) is not None:
            self.stdout_lines.append(line)
        return returncode

    def kill(self) -> None:
        """Last-resort cleanup for a failed test: kill kiln and tritonserver's groups."""
        for pgid in (self.process.pid, self.triton_pid):
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait()


@pytest.fixture
def kiln_serve() -> Iterator[type[ServeProcess]]:
    """Starts `kiln serve` subprocesses; kills what a failing test left running."""
    started: list[ServeProcess] = []

    class Tracked(ServeProcess):
        def __init__(self, args: Sequence[str]) -> None:
            super().__init__(args)
            started.append(self)

    yield Tracked
    for run in started:
        if run.process.poll() is None or (
            run.triton_pid is not None and process_group_members(run.triton_pid)
        ):
            run.kill()


# --- the Python API ------------------------------------------------------------------------------


def test_serves_over_http_and_grpc_on_free_ports(make_repository, add_one) -> None:
    repository = make_repository()
    stream = io.StringIO()
    with TritonServer(repository, log_stream=stream, **FREE_PORTS) as server:
        ports = server.ports
        assert len(set(ports)) == 3 and FREE_PORT not in ports
        assert server.http_url == f"{HOST}:{ports.http}"
        assert server.grpc_url == f"{HOST}:{ports.grpc}"
        assert server.metrics_url == f"http://{HOST}:{ports.metrics}/metrics"
        assert server.is_ready()
        assert server.models() == {add_one.name: "READY"}
        assert server.metadata()["version"] == "2.51.0"

        x = add_one_inputs(add_one)
        np.testing.assert_array_equal(infer_http(server.http_url, add_one, x), x + 1)
        np.testing.assert_array_equal(infer_grpc(server.grpc_url, add_one, x), x + 1)
        with urllib.request.urlopen(server.metrics_url) as response:
            assert b"nv_inference_request_success" in response.read()
        pid = server.pid
        assert server.returncode is None
    # Clean stop: Triton exits 0, its stubs with it; the log was streamed, saved and kept.
    assert server.returncode == 0
    assert_no_triton_left(pid)
    loaded = f"successfully loaded '{add_one.name}'"
    assert loaded in stream.getvalue()
    assert loaded in server.log_text()
    # The default log file lies in the temp folder and outlives the server.
    assert server.log_path.parent == Path(tempfile.gettempdir())
    assert server.log_path.name.startswith("kiln-tritonserver-")
    assert loaded in server.log_path.read_text()
    server.log_path.unlink()


def test_explicit_mode_loads_only_the_named_models(make_repository, add_one, log_file) -> None:
    repository = make_repository({add_one.name: {}, BROKEN: BAD_PARAMETERS})
    with TritonServer(
        repository,
        model_control_mode="explicit",
        load_models=[add_one.name],
        log_file=log_file,
        **FREE_PORTS,
    ) as server:
        models = server.models()
        assert models[add_one.name] == "READY"
        assert models[BROKEN] == "UNLOADED"  # listed by the index, never loaded
        x = add_one_inputs(add_one, batch=1)
        np.testing.assert_array_equal(infer_http(server.http_url, add_one, x), x + 1)


def test_port_in_use_is_named_before_start(make_repository, held_port: int) -> None:
    server = TritonServer(
        make_repository(), http_port=held_port, grpc_port=FREE_PORT, metrics_port=FREE_PORT
    )
    with pytest.raises(PortInUseError) as caught:
        server.start()
    error = caught.value
    assert (error.port, error.protocol, error.host) == (held_port, "http", HOST)
    assert str(error).startswith(f"HTTP port {held_port} on {HOST} is already in use")
    assert "--http-port" in str(error) and "--free-ports" in str(error)
    assert server.pid is None  # caught before tritonserver was started


def test_port_taken_at_bind_time_is_read_from_tritons_log(
    make_repository, held_port: int, log_file: Path
) -> None:
    # Our own pre-check sees a free gRPC port, but the passthrough argument (Triton takes the
    # last value) makes Triton bind the held one: the failure can only come from its log.
    (free_grpc,) = pick_free_ports(HOST, 1)
    server = TritonServer(
        make_repository(),
        http_port=FREE_PORT,
        grpc_port=free_grpc,
        metrics_port=FREE_PORT,
        extra_args=[f"--grpc-port={held_port}"],
        log_file=log_file,
    )
    with pytest.raises(PortInUseError) as caught:
        server.start()
    error = caught.value
    assert (error.port, error.protocol, error.host) == (held_port, "grpc", HOST)
    assert "--grpc-port" in str(error)
    assert f"Socket '{HOST}:{held_port}' already in use" in server.log_text()
    assert error.log_path == log_file and log_file.is_file()
    assert_no_triton_left(server.pid)


@pytest.mark.parametrize("how", ["env", "argument", "not executable"])
def test_missing_binary_is_a_clear_error(make_repository, monkeypatch, tmp_path, how) -> None:
    binary = tmp_path / "nonexistent" / "tritonserver"
    kwargs = {}
    if how == "env":
        monkeypatch.setenv("KILN_TRITONSERVER", str(binary))
    elif how == "argument":
        kwargs["binary"] = binary
    else:
        binary = tmp_path / "tritonserver"
        binary.write_text("not a program")
        kwargs["binary"] = binary
    with pytest.raises(BinaryNotFoundError) as caught:
        TritonServer(make_repository(), **FREE_PORTS, **kwargs).start()
    message = str(caught.value)
    if how == "not executable":
        assert message == f"tritonserver at {binary} (from the binary argument) is not executable"
    else:
        assert message.startswith(f"tritonserver not found at {binary}")
        assert "nvidia-pytriton" in message
        assert ("$KILN_TRITONSERVER" in message) == (how == "env")


def test_missing_repository_is_named(tmp_path) -> None:
    missing = tmp_path / "no-such-repository"
    with pytest.raises(RepositoryNotFoundError) as caught:
        TritonServer(missing, **FREE_PORTS).start()
    assert str(caught.value).startswith(f"model repository {missing} does not exist")


def test_model_load_failure_carries_the_models_own_message(
    make_repository, add_one, log_file: Path
) -> None:
    repository = make_repository({add_one.name: {}, BROKEN: BAD_PARAMETERS})
    server = TritonServer(repository, log_file=log_file, **FREE_PORTS)
    with pytest.raises(ModelLoadFailedError) as caught:
        server.start()
    error = caught.value
    assert list(error.errors) == [BROKEN]
    assert error.errors[BROKEN].endswith(f"model '{BROKEN}': {BAD_PARAMETER_MESSAGE}")
    assert "At:" not in error.errors[BROKEN]  # the Python traceback is cut off
    assert str(error) == f"model '{BROKEN}' failed to load: {error.errors[BROKEN]}"
    assert error.log_path == log_file
    assert BAD_PARAMETER_MESSAGE in log_file.read_text()
    # Triton (--exit-on-error) exited by itself and took the healthy model's stub with it.
    assert server.returncode == 1
    assert_no_triton_left(server.pid)


def test_startup_deadline(make_repository, log_file: Path) -> None:
    server = TritonServer(
        make_repository(), startup_timeout=SHORT_STARTUP_S, log_file=log_file, **FREE_PORTS
    )
    with pytest.raises(StartupTimeoutError) as caught:
        server.start()
    assert str(caught.value).startswith(
        f"tritonserver was not ready after {SHORT_STARTUP_S:g} s (GET /v2/health/ready on "
        f"{server.http_url})"
    )
    assert str(caught.value).endswith(f"full log: {log_file}")
    assert server.returncode is not None  # killed, not left running
    assert_no_triton_left(server.pid)


# --- kiln serve ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", ["ctrl-c", "sigterm"])
def test_kiln_serve_prints_endpoints_and_stops_on_request(
    make_repository, add_one, kiln_serve, log_file: Path, stop_signal: str
) -> None:
    repository = make_repository()
    run = kiln_serve(
        ["--free-ports", "--repository", str(repository), "--quiet", "--log-file", str(log_file)]
    )
    lines = run.wait_until_ready()
    assert run.triton_pid is not None
    text = "\n".join(lines)
    http = re.search(r"^  HTTP +http://(\S+)$", text, re.M)
    grpc = re.search(r"^  gRPC +(\S+)$", text, re.M)
    assert http and grpc and re.search(r"^  metrics +http://\S+/metrics$", text, re.M)
    assert re.search(rf"^  models +{add_one.name} \(READY\)$", text, re.M)
    assert re.search(rf"^  log +{re.escape(str(log_file))}$", text, re.M)
    x = add_one_inputs(add_one)
    np.testing.assert_array_equal(infer_http(http.group(1), add_one, x), x + 1)
    np.testing.assert_array_equal(infer_grpc(grpc.group(1), add_one, x), x + 1)

    started = time.monotonic()
    if stop_signal == "ctrl-c":
        run.interrupt()
    else:  # a supervisor (systemd, docker stop) signals kiln only
        run.process.send_signal(signal.SIGTERM)
    assert run.finish() == 0
    assert time.monotonic() - started < SERVE_EXIT_TIMEOUT_S
    assert run.stdout_lines[-1] == "kiln serve: stopped"
    assert "Traceback" not in run.stderr
    assert_no_triton_left(run.triton_pid)
    assert f"successfully loaded '{add_one.name}'" in log_file.read_text()


def test_kiln_serve_reports_a_crashed_tritonserver(
    make_repository, kiln_serve, log_file: Path
) -> None:
    repository = make_repository()
    run = kiln_serve(
        ["--free-ports", "--repository", str(repository), "--quiet", "--log-file", str(log_file)]
    )
    run.wait_until_ready()
    os.kill(run.triton_pid, signal.SIGKILL)
    started = time.monotonic()
    returncode = run.finish()
    assert time.monotonic() - started < CRASH_NOTICE_S
    assert returncode == 1
    first = run.stderr.splitlines()[0]
    assert first == (
        "kiln serve: error: tritonserver exited unexpectedly while serving "
        "(killed by signal SIGKILL)"
    )
    assert "last log lines:" in run.stderr
    assert run.stderr.rstrip().endswith(f"full log: {log_file}")
    assert "Traceback" not in run.stderr
    assert_no_triton_left(run.triton_pid)


def test_kiln_serve_keeps_serving_the_others_when_a_model_fails_to_load(
    make_repository, add_one, kiln_serve, log_file: Path
) -> None:
    repository = make_repository({add_one.name: {}, BROKEN: BAD_PARAMETERS})
    run = kiln_serve(
        ["--free-ports", "--repository", str(repository), "--quiet", "--log-file", str(log_file)]
    )
    text = "\n".join(run.wait_until_ready())
    models = re.search(r"^  models +(.*)$", text, re.M)
    assert models and models.group(1) == f"{add_one.name} (READY), {BROKEN} (UNAVAILABLE)", text
    http = re.search(r"^  HTTP +http://(\S+)$", text, re.M)
    assert http
    x = add_one_inputs(add_one)
    np.testing.assert_array_equal(infer_http(http.group(1), add_one, x), x + 1)
    run.interrupt()
    assert run.finish() == 0
    failure, fix = run.stderr.splitlines()[:2]
    assert failure.startswith(
        f"kiln serve: model '{BROKEN}' failed to load and is not served (the others are): "
    )
    assert failure.endswith(BAD_PARAMETER_MESSAGE)
    assert fix.startswith("  fix: see the reason above and the log; once fixed, restart kiln serve")
    assert_no_triton_left(run.triton_pid)


def test_kiln_serve_exit_on_model_failure(
    make_repository, add_one, kiln_serve, log_file: Path
) -> None:
    repository = make_repository({add_one.name: {}, BROKEN: BAD_PARAMETERS})
    run = kiln_serve(
        ["--free-ports", "--repository", str(repository), "--quiet", "--log-file", str(log_file),
         "--exit-on-model-failure"]
    )
    assert run.finish() == 1
    lines = run.stderr.splitlines()
    assert lines[0].startswith(f"kiln serve: error: model '{BROKEN}' failed to load: ")
    assert lines[0].endswith(BAD_PARAMETER_MESSAGE)
    assert lines[1:] == [f"full log: {log_file}"]
    assert not any("is ready" in line for line in run.stdout_lines)


def test_kiln_serve_port_in_use(make_repository, held_port: int, kiln_serve) -> None:
    run = kiln_serve(
        ["--free-ports", "--grpc-port", str(held_port), "--repository", str(make_repository())]
    )
    assert run.finish() == 1
    assert run.stderr.strip() == (
        f"kiln serve: error: gRPC port {held_port} on {HOST} is already in use: stop what "
        "listens there, choose another port (--grpc-port), or let kiln pick free ports "
        "(--free-ports)"
    )
