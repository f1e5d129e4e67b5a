"""The SDK's replica logic without a server: picking (round robin, least outstanding), backoff and
re-probing of a replica that refused, the failover rule per error, what the transport errors say
about whether a request may have run, the URL list, and the gRPC channel's balancing options.

The servers' side (three real tritonservers, one drained under load) is
tests/integration/test_multi_replica.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections import Counter

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from kiln.clients import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidInputError,
    KilnError,
    ModelNotFoundError,
    ModelNotReadyError,
    PermissionDeniedError,
    ReplicaBackoff,
    ReplicaStats,
    ServerError,
    ServerUnavailableError,
)
from kiln.clients._core import parse_urls
from kiln.clients._replicas import (
    BACKING_OFF,
    HEALTHY,
    LEAST_OUTSTANDING,
    PROBING,
    ROUND_ROBIN,
    ReplicaSet,
    Verdict,
    failover,
)
from kiln.clients._transport import GRPC_LB_POLICY, grpc_channel_args, grpc_target
from kiln.clients.errors import translate

URLS = ("grpc://a:8001", "grpc://b:8001", "grpc://c:8001")
BACKOFF = ReplicaBackoff(initial_s=1.0, max_s=4.0, multiplier=2.0)
REFUSED = ServerUnavailableError("refused", refused=True, server_message="connection refused")
LOST = ServerUnavailableError("lost", refused=False, server_message="Socket closed")


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replica_set(balance: str = ROUND_ROBIN, urls: tuple[str, ...] = URLS) -> tuple[ReplicaSet, Clock]:
    clock = Clock()
    return ReplicaSet(urls, balance, BACKOFF, clock), clock


def send(replicas: ReplicaSet, tried: tuple[int, ...] = ()) -> int:
    """Chooses a replica, sends (no probe expected) and answers successfully; its index."""
    pick = replicas.choose(tried)
    assert pick is not None and not pick.probe, pick
    replicas.started(pick.index)
    replicas.succeeded(pick.index)
    return pick.index


# --- picking ---------------------------------------------------------------------------------


def test_round_robin_takes_the_replicas_in_turn() -> None:
    replicas, _ = replica_set()
    assert [send(replicas) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [s.succeeded for s in replicas.stats()] == [3, 2, 2]


def test_least_outstanding_picks_the_fewest_in_flight_and_breaks_ties_in_turn() -> None:
    replicas, _ = replica_set(LEAST_OUTSTANDING)
    first = replicas.choose()
    assert first is not None and first.index == 0
    replicas.started(0)
    replicas.started(0)
    second = replicas.choose()
    assert second is not None and second.index == 1  # 0 has 2 in flight
    replicas.started(1)
    third = replicas.choose()
    assert third is not None and third.index == 2
    replicas.started(2)
    replicas.succeeded(0)
    replicas.succeeded(0)  # now 0: 0 in flight, 1: 1, 2: 1
    assert [replicas.choose().index for _ in range(3)] == [0, 0, 0]  # type: ignore[union-attr]
    assert [s.in_flight for s in replicas.stats()] == [0, 1, 1]
    replicas.succeeded(1)
    replicas.succeeded(2)  # all idle: ties go round robin
    assert [send(replicas) for _ in range(4)] == [1, 2, 0, 1]


def test_a_request_tries_each_replica_once_then_gets_none() -> None:
    replicas, _ = replica_set()
    tried: list[int] = []
    for _ in URLS:
        pick = replicas.choose(tried)
        assert pick is not None and pick.index not in tried
        tried.append(pick.index)
    assert sorted(tried) == [0, 1, 2]
    assert replicas.choose(tried) is None


# --- backoff and re-probing ------------------------------------------------------------------


def test_a_refusing_replica_is_skipped_for_its_backoff_then_probed_before_traffic() -> None:
    replicas, clock = replica_set()
    pick = replicas.choose()
    assert pick is not None and pick.index == 0
    replicas.started(0)
    replicas.failed(0, REFUSED, back_off=True)
    stats = replicas.stats()[0]
    assert (stats.state, stats.consecutive_failures, stats.retry_in_s) == (BACKING_OFF, 1, 1.0)
    assert stats.last_error == "connection refused"

    # Skipped while backing off: traffic goes to the others only.
    assert Counter(send(replicas) for _ in range(6)) == Counter({1: 3, 2: 3})

    # Backoff over: the next pick probes it first, and nobody else probes it meanwhile.
    clock.now += 1.0
    probe = replicas.choose()
    assert probe is not None and probe.index == 0 and probe.probe
    assert replicas.stats()[0].state == PROBING
    assert send(replicas) in (1, 2)

    # The probe said not ready: skipped twice as long (2 s), then probed again.
    replicas.probed(0, ready=False, detail="not ready (readiness probe)")
    stats = replicas.stats()[0]
    assert (stats.state, stats.consecutive_failures, stats.retry_in_s) == (BACKING_OFF, 2, 2.0)
    clock.now += 1.9
    assert {send(replicas) for _ in range(4)} == {1, 2}
    clock.now += 0.1
    probe = replicas.choose()
    assert probe is not None and probe.index == 0 and probe.probe

    # Ready: healthy again, back in the rotation.
    replicas.probed(0, ready=True)
    assert replicas.stats()[0].state == HEALTHY
    assert Counter(send(replicas) for _ in range(6)) == Counter({0: 2, 1: 2, 2: 2})
    assert replicas.stats()[0].probes == 2


def test_a_request_answered_after_the_replica_refused_does_not_end_its_backoff() -> None:
    """While a replica drains, the requests it accepted before still finish: only a probe may
    bring it back."""
    replicas, clock = replica_set()
    replicas.started(0)  # in flight when the replica starts draining
    replicas.started(0)
    replicas.failed(0, REFUSED, back_off=True)  # a new request is refused
    replicas.succeeded(0)  # the earlier one finishes
    assert replicas.stats()[0].state == BACKING_OFF
    assert {send(replicas) for _ in range(4)} == {1, 2}
    clock.now += 1.0
    pick = replicas.choose()
    assert pick is not None and (pick.index, pick.probe) == (0, True)


def test_the_backoff_grows_to_its_maximum() -> None:
    replicas, clock = replica_set()
    waits = []
    for _ in range(5):
        replicas.started(2)
        replicas.failed(2, REFUSED, back_off=True)
        waits.append(replicas.stats()[2].retry_in_s)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert [BACKOFF.after(n) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 4.0]


def test_a_failure_without_backoff_keeps_the_replica_in_rotation() -> None:
    replicas, _ = replica_set()
    replicas.started(0)
    replicas.failed(0, DeadlineExceededError("slow"), back_off=False)
    replicas.started(1)
    replicas.failed(1, None, back_off=True)  # interrupted (a cancelled task): nothing learnt
    assert [s.state for s in replicas.stats()] == [HEALTHY, HEALTHY, HEALTHY]
    assert [s.failed for s in replicas.stats()] == [1, 1, 0]


def test_when_every_untried_replica_backs_off_the_one_due_first_is_probed() -> None:
    replicas, clock = replica_set()
    for index, extra_failures in ((0, 2), (1, 0), (2, 1)):
        for _ in range(extra_failures + 1):
            replicas.started(index)
            replicas.failed(index, REFUSED, back_off=True)
    # Backoffs: 0 -> 4 s, 1 -> 1 s, 2 -> 2 s. Nothing is due; the request still asks someone.
    pick = replicas.choose()
    assert pick is not None and (pick.index, pick.probe) == (1, True)
    pick = replicas.choose([1])
    assert pick is not None and (pick.index, pick.probe) == (2, True)
    pick = replicas.choose([1, 2])
    assert pick is not None and (pick.index, pick.probe) == (0, True)
    assert replicas.choose([0, 1, 2]) is None


def test_one_replica_is_never_backed_off_or_probed() -> None:
    replicas, clock = replica_set(urls=URLS[:1])
    assert replicas.single
    for _ in range(3):
        pick = replicas.choose()
        assert pick is not None and (pick.index, pick.probe) == (0, False)
        replicas.started(0)
        replicas.failed(0, REFUSED, back_off=True)
        assert replicas.choose([0]) is None
    stats = replicas.stats()[0]
    assert (stats.state, stats.failed, stats.probes) == (HEALTHY, 3, 0)


# --- the failover rule -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "idempotent", "verdict"),
    [
        (REFUSED, False, Verdict(elsewhere=True, back_off=True)),
        (ModelNotReadyError("has no available versions"), False, Verdict(elsewhere=True, back_off=True)),
        (LOST, False, Verdict(elsewhere=False, back_off=True)),
        (LOST, True, Verdict(elsewhere=True, back_off=True)),
        (DeadlineExceededError("slow"), False, Verdict(elsewhere=False, back_off=False)),
        (DeadlineExceededError("slow"), True, Verdict(elsewhere=True, back_off=False)),
        (ServerError("cancelled", status="StatusCode.CANCELLED"), False, Verdict(False, True)),
        (ServerError("cancelled", status="StatusCode.CANCELLED"), True, Verdict(True, True)),
        (InvalidInputError("bad input", status="400"), True, Verdict(elsewhere=False, back_off=False)),
        (ModelNotFoundError("no such model"), True, Verdict(elsewhere=False, back_off=False)),
        (ServerError("inside the model", status="500"), True, Verdict(elsewhere=False, back_off=False)),
        (PermissionDeniedError("restricted"), True, Verdict(elsewhere=False, back_off=False)),
        (KilnError("anything else"), True, Verdict(elsewhere=False, back_off=False)),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, KilnError) else str(value),
)
def test_failover_resends_only_what_is_safe(error: KilnError, idempotent: bool, verdict: Verdict) -> None:
    assert failover(error, idempotent) == verdict


@pytest.mark.parametrize(
    ("raised", "refused"),
    [
        (ConnectionRefusedError(111, "Connection refused"), True),
        (socket.gaierror(-2, "Name or service not known"), True),
        (ConnectionResetError(104, "Connection reset by peer"), False),
        (BrokenPipeError(32, "Broken pipe"), False),
        (InferenceServerException("Service Unavailable", status="503"), True),
        (
            InferenceServerException(
                "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
                "Failed to connect to remote host: Connection refused",
                status="StatusCode.UNAVAILABLE",
            ),
            True,
        ),
        (InferenceServerException("Server exiting", status="StatusCode.UNAVAILABLE"), True),
        (
            InferenceServerException(
                "[request id: <id_unknown>] Server is stopping, scheduler for model has stopped "
                "accepting new inference requests",
                status="StatusCode.UNAVAILABLE",
            ),
            True,
        ),
        (InferenceServerException("Socket closed", status="StatusCode.UNAVAILABLE"), False),
        (InferenceServerException("Connection reset by peer", status="StatusCode.UNAVAILABLE"), False),
    ],
)
def test_transport_errors_say_whether_the_request_may_have_run(raised: BaseException, refused: bool) -> None:
    error = translate(raised, what="infer", model="fraud", url="grpc://a:8001")
    assert isinstance(error, ServerUnavailableError), error
    assert error.refused is refused
    assert error.url == "grpc://a:8001"


def test_model_not_ready_while_draining_is_a_safe_refusal() -> None:
    """What Triton 2.51 answered new requests the moment SIGTERM reached it (measured)."""
    raised = InferenceServerException(
        "Request for unknown model: 'fraud' has no available versions", status="StatusCode.NOT_FOUND"
    )
    error = translate(raised, what="infer", model="fraud", url="grpc://a:8001")
    assert isinstance(error, ModelNotReadyError)
    assert failover(error, idempotent=False) == Verdict(elsewhere=True, back_off=True)


# --- the URL list and the client ---------------------------------------------------------------


def test_one_url_or_several_of_one_protocol() -> None:
    assert parse_urls("grpc://a:1", None) == ("grpc", ("a:1",))
    assert parse_urls(["a:1", "b:2"], "grpc") == ("grpc", ("a:1", "b:2"))
    with pytest.raises(ValueError, match="one protocol, got grpc, http in http://a:1, grpc://b:2"):
        parse_urls(["http://a:1", "grpc://b:2"], None)
    with pytest.raises(ValueError, match="empty sequence"):
        parse_urls([], None)
    with pytest.raises(TypeError, match="must be a str, got int"):
        parse_urls(["http://a:1", 8000], None)  # type: ignore[list-item]


def test_replica_set_and_backoff_reject_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="given more than once: grpc://a:8001"):
        ReplicaSet([URLS[0], URLS[1], URLS[0]])
    with pytest.raises(ValueError, match="balance must be one of round_robin, least_outstanding, got 'random'"):
        ReplicaSet(URLS, "random")
    with pytest.raises(ValueError, match="initial_s must be > 0, got 0; max_s must be >= initial_s"):
        ReplicaBackoff(initial_s=0, max_s=-1)


@pytest.mark.parametrize("cls", [Client, AsyncClient])
def test_a_client_of_several_replicas(cls: type) -> None:
    client = cls(["grpc://a:8001", "grpc://b:8001"], balance=LEAST_OUTSTANDING, idempotent=True)
    assert client.urls == ("grpc://a:8001", "grpc://b:8001")
    assert client.url == "grpc://a:8001" and client.protocol == "grpc"
    assert repr(client) == f"{cls.__name__}(['grpc://a:8001', 'grpc://b:8001'])"
    assert [s.url for s in client.replicas] == list(client.urls)
    assert all(s.state == HEALTHY and s.sent == 0 for s in client.replicas)
    assert repr(cls("http://a:8000")) == f"{cls.__name__}('http://a:8000')"
    with pytest.raises(ValueError, match="cannot be used with several replicas"):
        cls(["http://a:8000", "http://b:8000"], shared_memory=True)
    with pytest.raises(ValueError, match="balance must be one of"):
        cls(["http://a:8000", "http://b:8000"], balance="fastest")


def test_nothing_listening_anywhere_names_every_url_tried() -> None:
    """Ports nobody listens on (bound and closed here): refused at once, no server needed."""
    ports = []
    for _ in range(3):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    with Client(urls, retry=None) as client:
        assert not client.is_live() and not client.is_ready() and not client.is_model_ready("fraud")
        with pytest.raises(ServerUnavailableError) as caught:
            client.model_config("fraud")
    error = caught.value
    assert error.tried == tuple(urls) and error.refused and error.url is None
    assert str(error).startswith("model 'fraud': all 3 replicas refused or could not be reached (")
    for url in urls:
        assert f"{url}: " in str(error)
    assert [s.state for s in client.replicas] == [BACKING_OFF] * 3


class HangsUp(threading.Thread):
    """A TCP server that reads each request and closes the connection without answering: a
    replica that dies with the request sent (the client cannot know whether it ran)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests = 0

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                if connection.recv(65536):
                    self.requests += 1


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def infer_async(urls: list[str], idempotent: bool) -> tuple[BaseException, list[ReplicaStats]]:
    async with AsyncClient(urls, retry=None, validate=False, idempotent=idempotent) as client:
        with pytest.raises(ServerUnavailableError) as caught:
            await client.infer("fraud", {"features": np.zeros((1, 16), np.float32)})
        return caught.value, list(client.replicas)


@pytest.mark.parametrize("idempotent", [False, True])
@pytest.mark.parametrize("side", ["sync", "asyncio"])
def test_a_request_that_may_have_run_goes_elsewhere_only_when_idempotent(side: str, idempotent: bool) -> None:
    server = HangsUp()
    server.start()
    urls = [server.url, closed_port_url()]
    try:
        if side == "asyncio":
            error, replicas = asyncio.run(infer_async(urls, idempotent))
        else:
            with Client(urls, retry=None, validate=False, idempotent=idempotent) as client:
                with pytest.raises(ServerUnavailableError) as caught:
                    client.infer("fraud", {"features": np.zeros((1, 16), np.float32)})
                error, replicas = caught.value, list(client.replicas)
    finally:
        server.sock.close()
    assert isinstance(error, ServerUnavailableError)
    sent = [stats.sent for stats in replicas]
    states = [stats.state for stats in replicas]
    assert server.requests >= 1
    if idempotent:  # resent to the second replica, which refused: both named
        assert sent == [1, 1] and error.tried == tuple(urls) and not error.refused
        assert str(error).startswith("model 'fraud': all 2 replicas refused or could not be reached (")
    else:  # the first replica's lost connection, raised as is: the second was never asked
        assert sent == [1, 0] and error.tried == () and not error.refused
        assert error.url == server.url
    assert states[0] == BACKING_OFF  # a lost connection backs the replica off either way


# --- gRPC: one name, several addresses ----------------------------------------------------------


def test_grpc_channels_balance_round_robin_over_every_resolved_address() -> None:
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE

    args = dict(grpc_channel_args())
    assert args["grpc.lb_policy_name"] == GRPC_LB_POLICY == "round_robin"
    assert json.loads(args["grpc.service_config"]) == {"loadBalancingConfig": [{"round_robin": {}}]}
    # channel_args replaces tritonclient's own options: its defaults must still be there.
    assert args["grpc.max_send_message_length"] == MAX_GRPC_MESSAGE_SIZE
    assert args["grpc.max_receive_message_length"] == MAX_GRPC_MESSAGE_SIZE
    assert "grpc.keepalive_time_ms" in args
    assert grpc_target("triton-headless.ns.svc:8001") == "dns:///triton-headless.ns.svc:8001"
    assert grpc_target("ipv4:10.0.0.1:8001,10.0.0.2:8001") == "ipv4:10.0.0.1:8001,10.0.0.2:8001"


def test_task_clients_take_a_list_of_replica_urls_with_client_options() -> None:
    from kiln.clients import AsyncFraudScorer, FraudScorer

    urls = ["grpc://127.0.0.1:1", "grpc://127.0.0.2:1"]
    with FraudScorer(urls, balance="least_outstanding") as scorer:
        assert scorer.client.urls == tuple(urls) and scorer._owns
    scorer = AsyncFraudScorer(tuple(urls))
    assert scorer.client.urls == tuple(urls) and scorer._owns
    asyncio.run(scorer.close())
    with pytest.raises(TypeError, match="apply only when a URL is given"):
        FraudScorer(FraudScorer(urls).client, balance="round_robin")
