"""Several tritonservers behind one SDK client: requests are spread, a replica drained the way
Kubernetes stops a pod loses nothing, and it gets traffic again once it is back.

Three real tritonservers serve the `fraud` model (one small ONNX model, about 1 ms a request)
from the generated repository, on 127.0.0.1, 127.0.0.2 and 127.0.0.3 with the same three ports,
as three pods would (Linux routes all of 127.0.0.0/8 to the loopback interface). Traffic per
replica is counted twice: by the client (`client.replicas`) and by each server
(`nv_inference_request_success` on its own /metrics), and the two must agree.

What Triton 2.51 does on SIGTERM (measured here before this test was written, with gRPC load and
nothing holding an HTTP connection open): /v2/health/ready stops answering at once (its HTTP
listener closes: connection refused), gRPC ServerReady answers UNAVAILABLE "Server exiting", new
inference requests are refused at once with NOT_FOUND "... has no available versions" (the
server did not run them), the requests already in flight finish, and the process exits once they
have (within --exit-timeout-secs). So the Kubernetes sequence, emulated here:

1. the pod is deleted: its endpoint is removed and its preStop hook sleeps (`PRESTOP_S`). A
   client with a URL list is not told about endpoints, so the replica keeps serving it: that is
   the honest emulation (a headless Service's DNS would stop returning the pod instead);
2. SIGTERM: Triton refuses new requests and finishes the ones in flight; the client fails each
   refused request over to another replica at once and backs the drained one off;
3. the replica is started again on the same ports: after its backoff the client probes
   /v2/health/ready and sends it traffic again.

Over HTTP it differs, and the drain test runs both: a SIGTERMed Triton 2.51 closes new HTTP
connections at once but keeps serving kept-alive ones (this client's) until --exit-timeout-secs
runs out, then closes them (and, with its timeout spent, cancels gRPC requests still in flight).
So an HTTP replica keeps getting this client's traffic for the whole exit timeout; what a closed
connection catches may have run, hence `idempotent=True` for HTTP. See "Several replicas" in
docs/client.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from kiln import paths
from kiln.clients import (
    AsyncClient,
    Client,
    InvalidInputError,
    ReplicaBackoff,
    RetryPolicy,
    ServerUnavailableError,
)
from kiln.server import TritonServer, pick_free_ports, port_is_free

MODEL = "fraud"
INPUT = "features"
OUTPUT = "probability"
FEATURES = 16
HOSTS = ("127.0.0.1", "127.0.0.2", "127.0.0.3")
EXIT_TIMEOUT_S = 5
SUCCESS = "nv_inference_request_success"
WORKERS = 4
TOTAL_REQUESTS = 5_000
BEFORE_DRAIN = 1_200
"""Requests answered before the drain starts (every replica must have had some)."""
PRESTOP_S = 1.0
"""The preStop sleep: the replica keeps serving while Kubernetes removes its endpoint."""
DOWN_S = 1.0
"""How long the drained replica stays down before it is started again."""
BACKOFF = ReplicaBackoff(initial_s=0.2, max_s=1.0)
REJOIN_S = 5.0
"""A restarted replica must answer client traffic within this long of being ready: its backoff
(at most BACKOFF.max_s), gRPC's reconnect backoff (at most 1 s, `GRPC_RECONNECT_BACKOFF_MS`) and one
probe, with room for 2 busy cores (measured: 0-1.7 s)."""
AFTER_REJOIN = 600
"""Requests sent after the replica rejoined (it must take a share of them)."""
METRICS_WAIT_S = 2.0
SIGTERM_HANDLED_S = 2.0
"""Over gRPC the drained replica answers nothing that completes later than this after SIGTERM:
only the requests in flight when Triton handled the signal (measured: a few ms; the bound leaves
room for a starved 2-core machine and stays well below EXIT_TIMEOUT_S, which HTTP's kept-alive
connections reach)."""


@dataclass
class Replicas:
    """Three tritonservers on HOSTS with the same ports; `restart(i)` starts replica i again."""

    servers: list[TritonServer]
    http_port: int
    grpc_port: int
    metrics_port: int
    log_dir: str
    restarts: list[int] = field(default_factory=list)
    warmup: list[int] = field(default_factory=list)
    """Each server's request count before any traffic (the model's warmup), the same after a restart."""

    def server(self, host: str) -> TritonServer:
        return TritonServer(
            paths.model_repository(), host=host, http_port=self.http_port, grpc_port=self.grpc_port,
            metrics_port=self.metrics_port, model_control_mode="explicit", load_models=[MODEL],
            exit_timeout=EXIT_TIMEOUT_S, log_file=f"{self.log_dir}/{host}-{len(self.restarts)}.log",
        )

    def restart(self, index: int) -> TritonServer:
        """Starts replica `index` again (`servers[index]` is the new server from the start on,
        so its pid shows when tritonserver was forked)."""
        self.restarts.append(index)
        self.servers[index] = self.server(HOSTS[index])
        return self.servers[index].start()

    def urls(self, protocol: str = "grpc") -> list[str]:
        port = self.grpc_port if protocol == "grpc" else self.http_port
        return [f"{protocol}://{host}:{port}" for host in HOSTS]


def free_on_every_host(count: int) -> list[int]:
    """`count` ports free on each of HOSTS (picked on the first, checked on the others)."""
    for _ in range(20):
        ports = pick_free_ports(HOSTS[0], count)
        if all(port_is_free(host, port) for host in HOSTS[1:] for port in ports):
            return ports
    raise AssertionError(f"found no {count} ports free on all of {', '.join(HOSTS)}")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    """The three servers, started in parallel (each loads one model); stopped at the end."""
    http_port, grpc_port, metrics_port = free_on_every_host(3)
    log_dir = str(tmp_path_factory.mktemp("replicas"))
    state = Replicas([], http_port, grpc_port, metrics_port, log_dir)
    state.servers = [state.server(host) for host in HOSTS]
    errors: list[BaseException] = []

    def start(server: TritonServer) -> None:
        try:
            server.start()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    starters = [threading.Thread(target=start, args=(server,)) for server in state.servers]
    for thread in starters:
        thread.start()
    for thread in starters:
        thread.join()
    try:
        if errors:
            raise errors[0]
        state.warmup = served(state)
        yield state
    finally:
        for server in state.servers:
            server.stop()


def features(rows: int = 1) -> dict[str, np.ndarray]:
    return {INPUT: np.random.default_rng(rows).random((rows, FEATURES), dtype=np.float32)}


def served(replicas: Replicas) -> list[int]:
    """Each running server's count of requests the model answered (from its own /metrics)."""
    return [int(server.metric(SUCCESS, model=MODEL)) for server in replicas.servers]


def served_when_settled(replicas: Replicas, expected: list[int]) -> list[int]:
    """`served`, waiting briefly until it reaches `expected` (counters move after the reply)."""
    deadline = time.monotonic() + METRICS_WAIT_S
    while True:
        counts = served(replicas)
        if counts == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def test_one_grpc_target_of_several_addresses_is_spread_round_robin(replicas: Replicas) -> None:
    """What a Kubernetes headless Service gives a gRPC client: one name, several addresses.

    gRPC's `ipv4:` target hands the channel the same address list its DNS resolver would for
    such a name (no name resolving to three local addresses can be made without editing
    /etc/hosts); the client's round_robin policy must spread requests over all of them, where
    gRPC's default (pick_first) would send every one to the first address.
    """
    target = ",".join(f"{host}:{replicas.grpc_port}" for host in HOSTS)
    before = served(replicas)
    with Client(f"ipv4:{target}", protocol="grpc") as client:
        for _ in range(300):
            client.infer(MODEL, features())
    after = served_when_settled(replicas, [b + 100 for b in before])
    assert [a - b for a, b in zip(after, before, strict=True)] == [100, 100, 100]


def test_a_model_error_is_not_retried_on_another_replica(replicas: Replicas) -> None:
    bad = {INPUT: np.full((1, FEATURES), np.nan, np.float32)}  # the model refuses NaN
    for protocol in ("grpc", "http"):
        urls = replicas.urls(protocol)
        before = served(replicas)
        with Client(urls, idempotent=True) as client:
            with pytest.raises(InvalidInputError, match="contains NaN or infinity") as caught:
                client.infer(MODEL, bad)
            sent = [stats.sent for stats in client.replicas]
        assert sorted(sent) == [0, 0, 1], sent
        assert caught.value.url == urls[sent.index(1)]
        # The one replica that ran it counts it (the model answered with an error); the others'
        # counters do not move.
        after = served_when_settled(replicas, [b + s for b, s in zip(before, sent, strict=True)])
        assert [a - b for a, b in zip(after, before, strict=True)] == sent

    async def run() -> list[int]:
        async with AsyncClient(replicas.urls("grpc"), idempotent=True) as client:
            with pytest.raises(InvalidInputError, match="contains NaN or infinity"):
                await client.infer(MODEL, bad)
            return [stats.sent for stats in client.replicas]

    assert sorted(asyncio.run(run())) == [0, 0, 1]


class AnswerWatch(threading.Thread):
    """Notes when one replica first and last answered a request of `client` (its succeeded count
    moved), in seconds after `since`, sampling every millisecond until `stop` is set."""

    def __init__(self, client: Client, index: int, since: float) -> None:
        super().__init__(daemon=True)
        self.client, self.index, self.since = client, index, since
        self.first_answer_s: float | None = None
        self.last_answer_s = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        seen = self.client.replicas[self.index].succeeded
        while not self.stop.is_set():
            count = self.client.replicas[self.index].succeeded
            if count != seen:
                seen, self.last_answer_s = count, time.monotonic() - self.since
                if self.first_answer_s is None:
                    self.first_answer_s = self.last_answer_s
            time.sleep(0.001)


@dataclass
class Load:
    """WORKERS threads (a `Client`) or WORKERS asyncio tasks on one event-loop thread (an
    `AsyncClient`, closed by that loop at the end) sending requests through one client until told
    to stop.

    `pause()` holds new requests and waits for those in flight: tritonserver is started through
    subprocess with a preexec_fn (kiln.server's parent-death signal), which runs Python in the
    forked child, and forking while other threads were inside gRPC calls aborted the child once
    here (SIGABRT, empty log). The load pauses for the fork only, a few milliseconds.
    """

    client: Client | AsyncClient
    done: int = 0
    active: int = 0
    paused: bool = False
    errors: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def threads(self) -> list[threading.Thread]:
        if isinstance(self.client, AsyncClient):
            return [threading.Thread(target=asyncio.run, args=(self.tasks(),))]
        return [threading.Thread(target=self.work) for _ in range(WORKERS)]

    def work(self) -> None:
        assert isinstance(self.client, Client)
        inputs = features()
        while not self.stop.is_set():
            if not self.claim():
                time.sleep(0.001)
                continue
            try:
                result = self.client.infer(MODEL, inputs)
            except BaseException as error:  # noqa: BLE001 - every failure is counted and reported
                self.finish(None, error)
            else:
                self.finish(result[OUTPUT].shape, None)

    async def tasks(self) -> None:
        assert isinstance(self.client, AsyncClient)
        async with self.client:
            await asyncio.gather(*(self.work_async() for _ in range(WORKERS)))

    async def work_async(self) -> None:
        assert isinstance(self.client, AsyncClient)
        inputs = features()
        while not self.stop.is_set():
            if not self.claim():
                await asyncio.sleep(0.001)
                continue
            try:
                result = await self.client.infer(MODEL, inputs)
            except BaseException as error:  # noqa: BLE001 - every failure is counted and reported
                self.finish(None, error)
            else:
                self.finish(result[OUTPUT].shape, None)

    def claim(self) -> bool:
        """Counts a request as in flight unless the load is paused."""
        with self.lock:
            if self.paused:
                return False
            self.active += 1
            return True

    def finish(self, shape: tuple[int, ...] | None, error: BaseException | None) -> None:
        with self.lock:
            self.active -= 1
            if error is not None:
                self.errors.append(error)
            elif shape != (1, 1):
                self.errors.append(AssertionError(f"output shape {shape}, expected (1, 1)"))
            else:
                self.done += 1

    def pause(self) -> None:
        with self.lock:
            self.paused = True
        while self.active:
            time.sleep(0.001)

    def resume(self) -> None:
        with self.lock:
            self.paused = False

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.done < count:
            assert time.monotonic() < deadline, f"only {self.done} of {count} requests answered"
            assert not self.errors, f"{len(self.errors)} failed, the first: {self.errors[0]!r}"
            time.sleep(0.01)


@pytest.mark.parametrize(
    ("protocol", "idempotent", "cls"),
    [("grpc", False, Client), ("http", True, Client), ("grpc", False, AsyncClient)],
    ids=["grpc-default", "http-idempotent", "grpc-asyncio"],
)
def test_a_drained_replica_loses_nothing_and_gets_traffic_again(
    replicas: Replicas, protocol: str, idempotent: bool, cls: type
) -> None:
    """gRPC with the client's defaults: Triton refuses new requests at SIGTERM, so only safe
    refusals fail over. HTTP: Triton keeps serving the client's kept-alive connections until
    --exit-timeout-secs, then closes them; a request caught in that close may have run, so the
    calls are marked idempotent (kiln's models are), as docs/client.md advises for HTTP."""
    drained = 1
    others = [i for i in range(len(HOSTS)) if i != drained]
    baseline = served(replicas)
    client = cls(replicas.urls(protocol), replica_backoff=BACKOFF, retry=RetryPolicy(), idempotent=idempotent)
    load = Load(client)
    workers = load.threads()
    started = time.monotonic()
    for worker in workers:
        worker.start()
    try:
        load.wait_for(BEFORE_DRAIN)
        before = client.replicas
        assert all(stats.succeeded > 0 for stats in before), before

        # 1. The pod is deleted: the preStop sleep, during which this client is not told.
        time.sleep(PRESTOP_S)
        # 2. SIGTERM: Triton refuses new requests, finishes those in flight and exits.
        server = replicas.servers[drained]
        at_sigterm = client.replicas[drained]
        sigterm = time.monotonic()
        watcher = AnswerWatch(client, drained, sigterm)
        watcher.start()
        os.kill(server.pid, signal.SIGTERM)
        exited = server.wait(EXIT_TIMEOUT_S + 5)
        exit_s = time.monotonic() - sigterm
        watcher.stop.set()
        watcher.join()
        assert exited is not None, "tritonserver did not exit after SIGTERM"
        server.stop()  # it has exited: only cleans up
        exited_all = client.replicas
        at_exit = exited_all[drained]
        time.sleep(DOWN_S)
        down = client.replicas

        # 3. Started again on the same ports while the load goes on (paused for the fork only);
        # once tritonserver is ready, the client must find it (backoff + probe) within REJOIN_S.
        old = replicas.servers[drained]
        load.pause()
        restarter = threading.Thread(target=replicas.restart, args=(drained,))
        restarter.start()
        while replicas.servers[drained] is old or replicas.servers[drained].pid is None:
            assert restarter.is_alive() or replicas.servers[drained] is not old, "the restart failed"
            time.sleep(0.001)
        relaunched = time.monotonic()
        rejoin = AnswerWatch(client, drained, relaunched)
        rejoin.start()
        load.resume()
        restarter.join()
        ready_s = time.monotonic() - relaunched  # start() returned: Triton answered ready
        restarted = replicas.servers[drained]
        assert restarted.running, f"the restarted replica is not running; log: {restarted.log_path}"
        while rejoin.first_answer_s is None:
            assert time.monotonic() - relaunched < ready_s + REJOIN_S, (
                f"the restarted replica got no traffic within {REJOIN_S} s of being ready: "
                f"{client.replicas[drained]}"
            )
            time.sleep(0.01)
        rejoin.stop.set()
        rejoin.join()
        rejoin_s = max(0.0, rejoin.first_answer_s - ready_s)
        at_rejoin = client.replicas
        load.wait_for(max(TOTAL_REQUESTS, load.done + AFTER_REJOIN))
    finally:
        load.stop.set()
        for worker in workers:
            worker.join(30)
        if isinstance(client, Client):  # an AsyncClient was closed by its event loop
            client.close()
    elapsed = time.monotonic() - started
    final = client.replicas
    print(
        f"\n{protocol} {cls.__name__}: {load.done} requests in {elapsed:.1f} s, {len(load.errors)} failed; SIGTERM -> exit "
        f"{exit_s:.2f} s; restarted: ready after {ready_s:.2f} s, traffic after {rejoin.first_answer_s:.2f} s; "
        f"the drained replica refused "
        f"{final[drained].failed} (last: {at_exit.last_error!r}), probed {final[drained].probes} times; "
        f"it answered {at_exit.succeeded - at_sigterm.succeeded} requests after SIGTERM, the last "
        f"{watcher.last_answer_s * 1e3:.0f} ms after it"
    )

    assert not load.errors, f"{len(load.errors)} failed, the first: {load.errors[0]!r}"
    assert load.done >= TOTAL_REQUESTS
    assert all(stats.failed == 0 for i, stats in enumerate(final) if i != drained)
    # The drained replica: what it had accepted finished, what it refused went elsewhere.
    if protocol == "grpc":  # Triton refuses new work as soon as it handles the signal
        assert watcher.last_answer_s < SIGTERM_HANDLED_S, watcher.last_answer_s
    else:  # Triton 2.51 serves kept-alive HTTP connections until its exit timeout
        assert exit_s >= EXIT_TIMEOUT_S - 0.5, exit_s
        assert watcher.last_answer_s > EXIT_TIMEOUT_S - 1.0, watcher.last_answer_s
    assert at_exit.failed >= 1 and final[drained].failed == at_exit.failed
    # Down: it got no request (only probes), and the others took its share.
    assert down[drained].sent == at_exit.sent
    for i in others:
        assert down[i].succeeded - exited_all[i].succeeded > 0
    assert rejoin_s <= REJOIN_S
    # Back: it takes a share of what followed (round robin: about a third).
    after_rejoin = [f.succeeded - r.succeeded for f, r in zip(final, at_rejoin, strict=True)]
    assert after_rejoin[drained] >= sum(after_rejoin) // 6, after_rejoin
    assert final[drained].state == "healthy"

    # The servers' own counts agree with the client's.
    expected = [
        baseline[i] + final[i].succeeded if i != drained
        else replicas.warmup[i] + final[i].succeeded - down[i].succeeded
        for i in range(len(HOSTS))
    ]
    assert served_when_settled(replicas, expected) == expected


def test_all_replicas_down_names_every_url_tried(replicas: Replicas) -> None:
    for server in replicas.servers:
        server.stop()
    for protocol in ("grpc", "http"):
        urls = replicas.urls(protocol)
        started = time.monotonic()
        policy = RetryPolicy(max_attempts=2, initial_backoff_s=0.01, max_backoff_s=0.01)
        with Client(urls, retry=policy) as client:
            with pytest.raises(ServerUnavailableError) as caught:
                client.infer(MODEL, features(), validate=False)
        assert time.monotonic() - started < 5.0
        error = caught.value
        assert str(error).startswith(f"model '{MODEL}': all 3 replicas refused or could not be reached ("), (
            error
        )
        assert error.tried == tuple(urls) and error.refused
        for url in urls:
            assert f"{url}: " in str(error)

    async def run() -> ServerUnavailableError:
        async with AsyncClient(replicas.urls("http"), retry=None) as client:
            with pytest.raises(ServerUnavailableError) as caught:
                await client.model_config(MODEL)
            return caught.value

    error = asyncio.run(run())
    assert error.tried == tuple(replicas.urls("http")), error
    assert "Connect call failed" in str(error) or "onnection refused" in str(error), error
