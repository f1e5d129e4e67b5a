"""Crashes under load: a backend stub process killed, tritonserver killed (issue 7, item 3).

What Triton 2.51 does, measured here and stated in docs/operations.md:

- A python backend stub killed (SIGKILL, as the OOM killer does): Triton neither restarts it nor
  marks its model unavailable. The model stays READY in the repository index (its readiness
  endpoint mostly says ready too; in 1 of 5 runs it said not ready) while
  every request to it fails with "Stub process '<instance>' is not healthy" (HTTP 500 / gRPC
  INTERNAL; kiln.clients.ServerError), one per second: each waits for the instance, which spends
  1 s on each request finding its stub dead. The dead stub stays a zombie. Loading the model again
  with its current config as an override (`TritonServer.reload_model`) starts a new stub while the
  model stays served: requests sent after that succeed (those already queued on the dead instance
  still fail, one per second). `kiln serve` does that by itself in explicit mode and exits 1
  otherwise (its `--on-backend-crash` policy). Afterwards Triton never finishes unloading the dead
  instance, so its shutdown takes the whole --exit-timeout-secs (these tests set it short).
- tritonserver killed: clients get connection errors (kiln.clients.ServerUnavailableError), which
  the SDK retries; a new server on the same ports serves them again, and a retrying client never
  sees a failure. The stubs of the killed server do NOT exit: they are orphaned (adopted by
  PID 1) and keep their memory until kiln.server kills tritonserver's process group (which it
  does as soon as it sees the server gone: `check_running`, `stop`, `kiln serve`).

`kiln serve` reporting a killed tritonserver (exit 1, no hang) is in test_server.py; here it is
the stub crashes. Each test starts its own small tritonserver (the `add_one` model).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

from kiln.cli.serve import RELOAD_TIMEOUT_S
from kiln.clients import Client, RetryPolicy, ServerError, ServerUnavailableError
from kiln.server import (
    FREE_PORT,
    STUB_NAME,
    BackendProcess,
    ServerExitedError,
    TritonServer,
    pick_free_ports,
)

HOST = "127.0.0.1"
FREE_PORTS = {"http_port": FREE_PORT, "grpc_port": FREE_PORT, "metrics_port": FREE_PORT}
EXIT_TIMEOUT_S = 2
"""Triton's drain on stop: after a stub crash it waits all of it for the dead instance."""
NEVER_RETRY = RetryPolicy.disabled()
RIDE_OUT = RetryPolicy(max_attempts=1000, initial_backoff_s=0.05, max_backoff_s=0.25, deadline_s=60)
"""A policy that rides out a server restart (docs/client.md's example)."""
WARM_S = 1.0
WARM_REQUESTS = 20
"""Answered requests that show the model serving (before the kill, after the reload)."""
WARM_TIMEOUT_S = 30.0
DEAD_WINDOW_REQUESTS = 2
"""Requests sent after the stub was seen dead that must come back before the reload starts."""
OBSERVE_S = 2.5
"""How long the load runs against a broken model or a dead server."""
NOTICE_S = 5.0
"""Bound on kiln noticing a dead stub (it looks every 0.5 s)."""
RELOAD_S = 30.0
SERVE_READY_S = 90.0
SERVE_EXIT_S = 45.0
STUB_EXIT_S = 10.0
UNHEALTHY = "Stub process '{instance}' is not healthy"
READY_LINE = "press Ctrl-C to stop"


# --- load -----------------------------------------------------------------------------------------


class Outcome(NamedTuple):
    sent: float
    done: float
    error: Exception | None


class Load:
    """Threads sending add_one requests without pause over HTTP and gRPC; every outcome kept."""

    def __init__(self, urls: Sequence[str], add_one, retry: RetryPolicy, per_url: int = 2) -> None:
        self.clients = [Client(url, retry=retry) for url in urls]
        self.add_one = add_one
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, args=(client,), daemon=True)
            for client in self.clients for _ in range(per_url)
        ]

    def _send(self, client: Client) -> None:
        x = np.arange(self.add_one.features, dtype=np.float32)[None, :]
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                y = client.infer(self.add_one.name, {self.add_one.input: x})[self.add_one.output]
                np.testing.assert_array_equal(y, x + 1)
                error = None
            except Exception as caught:  # noqa: BLE001 - every failure is counted and reported
                error = caught
            with self._lock:
                self.outcomes.append(Outcome(sent, time.monotonic(), error))

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(RELOAD_S)
        for client in self.clients:
            client.close()

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)


def urls(server: TritonServer) -> list[str]:
    return [f"http://{server.http_url}", f"grpc://{server.grpc_url}"]


def stub_of(server: TritonServer, model: str) -> BackendProcess:
    """The model's stub process, found by its command line (the stub binary, the model file)."""
    (stub,) = [p for p in server.backend_processes() if p.model == model and p.alive]
    argv = Path(f"/proc/{stub.pid}/cmdline").read_bytes().split(b"\0")
    assert Path(argv[0].decode()).name == STUB_NAME and f"/{model}/".encode() in argv[1]
    return stub


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout} s")


TRITON_ABORT = "boost::interprocess::lock_exception"
"""How Triton 2.51's python backend dies, now and then, after one of its stubs was SIGKILLed while
holding the shared-memory lock: tritonserver aborts (SIGABRT) and every model is gone. Nothing kiln
can prevent; `kiln serve` then exits 1 with the error (about 1 run in 10 here)."""


def triton_aborted(log_file: Path) -> bool:
    """Whether the tritonserver whose log is `log_file` aborted that way."""
    try:
        text = log_file.read_text(errors="replace")
    except OSError:
        return False
    return TRITON_ABORT in text or "Signal (6) received" in text


def warm_up(load: Load) -> None:
    """Lets the load run WARM_S and waits until WARM_REQUESTS were answered (a stub killed in the
    load's first moments made Triton 2.51 abort, SIGABRT, in 1 of 3 tries here; at steady load it
    did not, in dozens)."""
    time.sleep(WARM_S)
    wait_for(lambda: sum(o.error is None for o in load.snapshot()) >= WARM_REQUESTS, WARM_TIMEOUT_S,
             f"{WARM_REQUESTS} requests were not answered")


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


# --- a killed stub ----------------------------------------------------------------------------------


def test_a_killed_stub_fails_its_model_until_reloaded(make_repository, add_one, tmp_path: Path) -> None:
    """What holds whatever the timing: requests that were both sent after the stub was seen dead
    and answered before the reload began failed, with the clear error; every request sent after
    the reload returned succeeded. (A request still queued when the reload starts may go either
    way: Triton may hand it to the new instance, so no test may demand that it fails.)"""
    log_file = tmp_path / "tritonserver.log"
    try:
        _killed_stub_scenario(make_repository, add_one, log_file)
    except (Exception, pytest.fail.Exception):
        if triton_aborted(log_file):
            pytest.xfail(f"Triton 2.51 itself aborted after the stub was killed ({TRITON_ABORT}, its bug)")
        raise


def _killed_stub_scenario(make_repository, add_one, log_file: Path) -> None:
    with TritonServer(
        make_repository(), model_control_mode="explicit", load_models=[add_one.name],
        log_file=log_file, exit_timeout=EXIT_TIMEOUT_S, **FREE_PORTS,
    ) as server, Load(urls(server), add_one, NEVER_RETRY) as load:
        warm_up(load)
        stub = stub_of(server, add_one.name)
        os.kill(stub.pid, signal.SIGKILL)
        killed = time.monotonic()
        (crashed,) = wait_for(server.crashed_backends, NOTICE_S, "the dead stub was not listed")
        noticed = time.monotonic()
        assert crashed.pid == stub.pid and crashed.describe().endswith("killed by signal SIGKILL")
        # Wait for an observable state, not for a time: requests sent after the stub was seen
        # dead have come back (each takes Triton about 1 s to fail).
        wait_for(
            lambda: sum(o.sent > noticed for o in load.snapshot()) >= DEAD_WINDOW_REQUESTS,
            RELOAD_S, f"{DEAD_WINDOW_REQUESTS} requests sent to the dead stub did not come back",
        )
        # What Triton says meanwhile (reported, not asserted: it is Triton's, not kiln's, and its
        # readiness endpoint answered "not ready" in 1 of 5 runs here while the index said READY).
        # kiln's promise is the watcher above, which saw the dead stub either way.
        with Client(urls(server)[0]) as probe:
            said = f"model ready {probe.is_model_ready(add_one.name)}, server ready {probe.is_ready()}"
        said += f", repository index {server.models()[add_one.name]}"
        reloading = time.monotonic()
        server.reload_model(add_one.name, timeout=RELOAD_TIMEOUT_S)
        reloaded = time.monotonic()
        wait_for(lambda: sum(o.sent > reloaded for o in load.snapshot()) >= WARM_REQUESTS,
                 WARM_TIMEOUT_S, f"{WARM_REQUESTS} requests after the reload did not come back")
        new = stub_of(server, add_one.name)
        assert new.pid != stub.pid and [p.pid for p in server.crashed_backends()] == [stub.pid]
    outcomes = load.snapshot()
    failures = [o.error for o in outcomes if o.error is not None]
    dead_window = [o for o in outcomes if o.sent > noticed and o.done < reloading]
    after = [o for o in outcomes if o.sent > reloaded]
    failed_at = sorted(o.done - killed for o in outcomes if o.error is not None)
    print(
        f"\nstub killed: {len(outcomes)} requests, {len(failures)} failed (at "
        f"{', '.join(f'{t:.1f}' for t in failed_at)} s after the kill), noticed "
        f"{noticed - killed:.1f} s and reloaded {reloaded - killed:.1f} s after the kill; "
        f"{len(dead_window)} sent and answered while the stub was dead; {len(after)} requests "
        f"after the reload; meanwhile Triton said: {said}"
    )
    assert all(o.error is None for o in outcomes if o.done < killed)
    # Sent to the dead stub and answered before the reload began: each one failed.
    assert dead_window and all(o.error is not None for o in dead_window)
    # No failure among requests sent after the reload returned; every one was answered.
    assert all(o.sent < reloaded for o in outcomes if o.error is not None)
    for error in failures:  # the clear, classified error a client gets
        assert isinstance(error, ServerError), repr(error)
        assert UNHEALTHY.format(instance=stub.instance) in str(error)
    assert after and all(o.error is None for o in after)


# --- kiln serve and a killed stub ---------------------------------------------------------------------


class Serve:
    """`kiln serve` as a subprocess in its own session; its output read line by line."""

    def __init__(self, args: Sequence[str]) -> None:
        kiln = Path(sys.executable).parent / "kiln"
        command = [str(kiln)] if kiln.is_file() else [sys.executable, "-m", "kiln.cli"]
        self.process = subprocess.Popen(
            [*command, "serve", "--free-ports", "--quiet", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self.seen: list[tuple[str, str]] = []
        for name, stream in (("out", self.process.stdout), ("err", self.process.stderr)):
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()
        self.triton_pid: int | None = None
        self.http_url = self.grpc_url = ""

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines.put((name, line.rstrip("\n")))
        self.lines.put((name, None))

    def expect_any(self, patterns: dict[str, str], timeout: float) -> tuple[str, re.Match[str]]:
        """Reads lines until one matches the pattern given for its stream; (stream, match)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                name, line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                continue
            self.seen.append((name, line))
            if name in patterns and (match := re.search(patterns[name], line)):
                return name, match
        pytest.fail(f"kiln serve printed no line matching {patterns} in {timeout} s: {self.seen}")

    def expect(self, pattern: str, timeout: float, stream: str = "out") -> re.Match[str]:
        """Reads lines until one of `stream` matches `pattern`."""
        return self.expect_any({stream: pattern}, timeout)[1]

    def ready(self) -> None:
        self.triton_pid = int(self.expect(r"is ready \(pid (\d+)\)", SERVE_READY_S).group(1))
        self.http_url = self.expect(r"^  HTTP +(\S+)$", SERVE_READY_S).group(1)
        self.grpc_url = "grpc://" + self.expect(r"^  gRPC +(\S+)$", SERVE_READY_S).group(1)
        self.expect(READY_LINE, SERVE_READY_S)

    def stubs(self) -> list[tuple[int, list[bytes]]]:
        """tritonserver's stub children (pid, argv), by their command line."""
        found = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) != self.triton_pid:
                    continue
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if argv and Path(argv[0].decode()).name == STUB_NAME:
                found.append((int(entry.name), argv))
        return found

    def kill(self) -> None:
        for pgid in (self.process.pid, self.triton_pid):
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.process.wait()


@pytest.fixture
def kiln_serve() -> Iterator[type[Serve]]:
    started: list[Serve] = []

    class Tracked(Serve):
        def __init__(self, args: Sequence[str]) -> None:
            super().__init__(args)
            started.append(self)

    yield Tracked
    for run in started:
        if run.process.poll() is None:
            run.kill()


def test_kiln_serve_reloads_a_model_whose_stub_died(make_repository, add_one, kiln_serve) -> None:
    run = kiln_serve([
        "--repository", str(make_repository()), "--model-control-mode", "explicit",
        "--load-model", add_one.name, "--exit-timeout", str(EXIT_TIMEOUT_S),
    ])
    run.ready()
    ((pid, argv),) = run.stubs()
    assert argv[8] == f"{add_one.name}_0_0".encode()
    with Load([run.http_url, run.grpc_url], add_one, NEVER_RETRY) as load:
        warm_up(load)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        run.expect(
            rf"^kiln serve: a backend stub died: model '{add_one.name}' version 1 \(instance "
            rf"{add_one.name}_0_0, pid {pid}\): killed by signal SIGKILL; Triton does not restart "
            "it and keeps reporting the model READY while every request to it fails$",
            NOTICE_S, stream="err",
        )
        stream, match = run.expect_any(
            {"out": rf"^kiln serve: reloaded model '{add_one.name}' in ([\d.]+) s$", "err": r"^kiln serve: error: .*"},
            RELOAD_TIMEOUT_S + RELOAD_S,
        )
        if stream == "err":
            # Triton itself aborted: its python backend can die on a lock the killed stub held
            # (boost::interprocess::lock_exception; seen in about 1 of 10 runs). kiln's promise
            # then is a clear error and exit 1 for a supervisor, never a hang.
            assert run.process.wait(SERVE_EXIT_S) == 1
            log = Path(run.expect(r"^full log: (.*)$", 5, stream="err").group(1))
            assert triton_aborted(log), match.group(0)
            pytest.xfail(f"Triton 2.51 aborted after the stub was killed (its bug); kiln said: {match.group(0)}")
        seconds = float(match.group(1))
        recovered = time.monotonic()
        wait_for(lambda: sum(o.sent > recovered for o in load.snapshot()) >= WARM_REQUESTS,
                 WARM_TIMEOUT_S, f"{WARM_REQUESTS} requests after the reload did not come back")
    outcomes = load.snapshot()
    failures = [o for o in outcomes if o.error is not None]
    print(
        f"\nkiln serve, stub killed: {len(outcomes)} requests, {len(failures)} failed; reloaded in "
        f"{seconds:.1f} s, {recovered - killed:.1f} s after the kill"
    )
    assert all(o.sent < recovered for o in failures)
    assert all(o.error is None for o in outcomes if o.sent > recovered)
    assert run.process.poll() is None and len(run.stubs()) == 1
    os.killpg(run.process.pid, signal.SIGINT)
    assert run.process.wait(SERVE_EXIT_S) == 0


def test_kiln_serve_exits_when_a_stub_dies_outside_explicit_mode(make_repository, add_one, kiln_serve) -> None:
    run = kiln_serve(["--repository", str(make_repository())])
    run.ready()
    ((pid, _),) = run.stubs()
    os.kill(pid, signal.SIGKILL)
    # kiln notices within NOTICE_S (it looks every 0.5 s); stopping Triton then may take its exit
    # timeout (it never finishes unloading the dead instance), which is not kiln's to bound.
    run.expect(rf"^kiln serve: a backend stub died: model '{add_one.name}' version 1 ", NOTICE_S, stream="err")
    assert run.process.wait(SERVE_EXIT_S) == 1
    error = run.expect(r"^kiln serve: error: .*", 1, stream="err").group(0)
    assert error == (
        f"kiln serve: error: backend stub process(es) died: model '{add_one.name}' version 1 (instance "
        f"{add_one.name}_0_0, pid {pid}): killed by signal SIGKILL; stopping so that a supervisor "
        "restarts kiln serve (with --model-control-mode explicit, kiln reloads such a model in place "
        "instead)"
    )
    run.expect(r"^full log: ", 1, stream="err")
    assert not alive(run.triton_pid)


def test_reload_needs_explicit_mode(make_repository, kiln_serve) -> None:
    run = kiln_serve(["--repository", str(make_repository()), "--on-backend-crash", "reload"])
    assert run.process.wait(SERVE_EXIT_S) == 1
    run.expect(
        r"^kiln serve: error: --on-backend-crash reload needs --model-control-mode explicit", 5, stream="err"
    )


# --- a killed server ------------------------------------------------------------------------------------


def test_a_killed_server_is_ridden_out_by_sdk_retries(make_repository, add_one, tmp_path: Path) -> None:
    repository = make_repository()
    http, grpc, metrics = pick_free_ports(HOST, 3)
    ports = {"http_port": http, "grpc_port": grpc, "metrics_port": metrics}
    first = TritonServer(repository, log_file=tmp_path / "first.log", **ports).start()
    second = None
    try:
        stubs = [p.pid for p in first.backend_processes()]
        with Load(urls(first), add_one, RIDE_OUT) as riding, Load(urls(first), add_one, NEVER_RETRY, 1) as raw:
            warm_up(riding)
            os.kill(first.pid, signal.SIGKILL)
            killed = time.monotonic()
            time.sleep(OBSERVE_S)
            # The stubs outlive their tritonserver, adopted by another parent ...
            assert stubs and all(alive(pid) and parent(pid) != first.pid for pid in stubs)
            with pytest.raises(ServerExitedError, match=r"killed by signal SIGKILL"):
                first.check_running()
            # ... until kiln kills tritonserver's process group.
            wait_for(lambda: not any(alive(pid) for pid in stubs), STUB_EXIT_S, "the stubs did not exit")
            second = TritonServer(repository, log_file=tmp_path / "second.log", **ports).start()
            back = time.monotonic()
            wait_for(lambda: sum(o.sent > back for o in riding.snapshot()) >= WARM_REQUESTS,
                     WARM_TIMEOUT_S, f"{WARM_REQUESTS} requests to the new server did not come back")
    finally:
        first.stop()
        if second is not None:
            second.stop()
    ridden, seen = riding.snapshot(), raw.snapshot()
    raw_errors = Counter(type(o.error).__name__ for o in seen if o.error is not None)
    slowest = max(o.done - o.sent for o in ridden)
    print(
        f"\nserver killed: restarted after {back - killed:.1f} s; "
        f"retrying clients: {len(ridden)} requests, 0 failed, slowest {slowest:.1f} s; "
        f"clients without retries: {len(seen)} requests, errors {dict(raw_errors)}"
    )
    assert all(o.error is None for o in ridden), [o.error for o in ridden if o.error][:3]
    assert slowest >= back - killed - WARM_S, "no request waited for the restart"
    assert [o for o in ridden if o.sent > back]
    assert raw_errors and set(raw_errors) == {ServerUnavailableError.__name__}
    messages = {re.sub(r"\d+", "N", str(o.error)) for o in seen if o.error is not None}
    print("\n".join(sorted(messages)))
    assert all("cannot reach the server" in m or "is the server running and reachable?" in m for m in messages)
