"""Several Triton replicas behind one client: the replica set, picking, health state, backoff and
the failover rules. No I/O happens here; the clients (`kiln.clients._async_client` and its
generated blocking twin) probe and send.

How a request finds a replica (`ReplicaSet.choose`, called once per try within one attempt of the
client's `RetryPolicy`):

1. A replica whose backoff has expired and that nobody is probing is handed out first, with
   `probe=True`: the caller asks its `/v2/health/ready` (gRPC: ServerReady) and sends the request
   there only if it answers ready. So a replica that came back gets traffic again within its
   backoff plus one probe, and never before a probe said it is ready.
2. Otherwise a healthy replica not yet tried for this request, by the balance policy:
   "round_robin" (the next one in turn) or "least_outstanding" (the fewest requests in flight
   from this client, ties broken in turn).
3. When every untried replica is backing off, the one whose backoff ends first, with `probe=True`:
   a request is never failed without something having been asked, so a fleet that restarted
   whole is found again by the next request rather than after the backoff.
4. None when every replica was tried for this request: the caller raises one error naming each
   URL and what it said.

What a failure means (`failover`): a refusal the server certainly did not run (connection refused,
name not resolved, HTTP 503 / gRPC UNAVAILABLE answered by the server, the model not ready there)
is always sent to another replica, and the replica backs off. A request that may have run (the
connection was lost after sending, the server cancelled it, the attempt timed out) is resent to
another replica only when the call is idempotent; a lost connection still backs the replica off,
a timeout does not (a slow replica is not a dead one). Anything the model or the request caused
(invalid input, unknown model, an error inside the model, a denied API) is raised at once: another
replica would answer the same.

With a single replica none of this applies: it is never backed off or probed, and the client's
`RetryPolicy` alone decides, exactly as before replicas existed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from kiln.clients.errors import (
    DeadlineExceededError,
    KilnError,
    ModelNotReadyError,
    ServerError,
    ServerUnavailableError,
)

ROUND_ROBIN = "round_robin"
LEAST_OUTSTANDING = "least_outstanding"
BALANCES = (ROUND_ROBIN, LEAST_OUTSTANDING)
DEFAULT_BALANCE = ROUND_ROBIN
PROBE_TIMEOUT_S = 1.0
"""Timeout of a readiness probe: a replica that cannot say it is ready within it is not."""
GRPC_CANCELLED = "StatusCode.CANCELLED"
"""What Triton 2.51 answers a request in flight when its exit timeout runs out on SIGTERM."""

HEALTHY = "healthy"
BACKING_OFF = "backing_off"
PROBING = "probing"


@dataclass(frozen=True)
class ReplicaBackoff:
    """How long a replica that refused or failed a probe is skipped before it is probed again.

    The n-th consecutive failure skips it for `min(max_s, initial_s * multiplier**(n-1))` seconds.
    The defaults (0.5 s, doubling, at most 5 s) keep a drained replica's cost to a probe every few
    seconds while it is away, and bring a restarted one back within 5 s and one probe.

    Attributes:
        initial_s: The skip after the first failure.
        max_s: The longest skip.
        multiplier: Growth of the skip per consecutive failure.
    """

    initial_s: float = 0.5
    max_s: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        problems = []
        if self.initial_s <= 0:
            problems.append(f"initial_s must be > 0, got {self.initial_s}")
        if self.max_s < self.initial_s:
            problems.append(f"max_s must be >= initial_s ({self.initial_s}), got {self.max_s}")
        if self.multiplier < 1:
            problems.append(f"multiplier must be >= 1, got {self.multiplier}")
        if problems:
            raise ValueError("invalid ReplicaBackoff: " + "; ".join(problems))

    def after(self, failures: int) -> float:
        """Seconds to skip a replica after `failures` (>= 1) consecutive failures."""
        if failures < 1:
            raise ValueError(f"failures start at 1, got {failures}")
        return min(self.max_s, self.initial_s * self.multiplier ** (failures - 1))


@dataclass(frozen=True)
class ReplicaStats:
    """What one client saw of one replica (`Client.replicas`).

    Attributes:
        url: The replica's URL.
        state: "healthy", "backing_off" (skipped until `retry_in_s` has passed, then probed) or
            "probing" (a probe is under way).
        sent: Inference requests sent to it (metadata reads are balanced and failed over the
            same way but not counted here; probes neither).
        succeeded: Inference requests it answered.
        failed: Inference requests it failed (any error, including the model's own).
        in_flight: Requests of any kind sent and not yet answered (what least_outstanding
            compares).
        probes: Readiness probes asked of it.
        consecutive_failures: Refusals and failed probes since a probe last found it ready (0
            when healthy).
        retry_in_s: Seconds until it may be probed again (0 when not backing off).
        last_error: What its last refusal or failed probe said, None if none.
    """

    url: str
    state: str
    sent: int
    succeeded: int
    failed: int
    in_flight: int
    probes: int
    consecutive_failures: int
    retry_in_s: float
    last_error: str | None


@dataclass(frozen=True)
class Pick:
    """The replica to try next, and whether to probe it first."""

    index: int
    probe: bool


@dataclass(frozen=True)
class Verdict:
    """What to do after a request failed on a replica.

    Attributes:
        elsewhere: Send the request to another replica (else raise the error).
        back_off: Skip this replica for a while (it refused or lost the connection).
    """

    elsewhere: bool
    back_off: bool


def refused_before_running(error: KilnError) -> bool:
    """Whether the server certainly did not run the request that failed with `error`."""
    if isinstance(error, ModelNotReadyError):
        return True
    return isinstance(error, ServerUnavailableError) and error.refused


def failover(error: KilnError, idempotent: bool) -> Verdict:
    """The failover rule for a request that failed with `error` (see the module docstring)."""
    if refused_before_running(error):
        return Verdict(elsewhere=True, back_off=True)
    if isinstance(error, ServerUnavailableError):  # lost after sending: it may have run
        return Verdict(elsewhere=idempotent, back_off=True)
    if isinstance(error, DeadlineExceededError):
        return Verdict(elsewhere=idempotent, back_off=False)
    if isinstance(error, ServerError) and error.status == GRPC_CANCELLED:
        return Verdict(elsewhere=idempotent, back_off=True)
    return Verdict(elsewhere=False, back_off=False)


def check_balance(balance: str) -> str:
    """`balance`, or a ValueError naming the allowed policies."""
    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    return balance


class _Replica:
    """The mutable state of one replica (guarded by its ReplicaSet's lock)."""

    def __init__(self, index: int, url: str) -> None:
        self.index = index
        self.url = url
        self.sent = 0
        self.succeeded = 0
        self.failed = 0
        self.in_flight = 0
        self.probes = 0
        self.failures = 0
        self.retry_at = 0.0
        self.probing = False
        self.last_error: str | None = None

    def backing_off(self, now: float) -> bool:
        return self.failures > 0 and now < self.retry_at

    def due_for_probe(self, now: float) -> bool:
        return self.failures > 0 and now >= self.retry_at and not self.probing

    def healthy(self) -> bool:
        return self.failures == 0


class ReplicaSet:
    """The replicas of one client and what it knows of them; thread-safe.

    Args:
        urls: The replicas' URLs, in order (at least one, no duplicates).
        balance: "round_robin" or "least_outstanding".
        backoff: How long a failed replica is skipped.
        clock: Seconds, monotonic (a test's fake clock).
    """

    def __init__(
        self,
        urls: Sequence[str],
        balance: str = DEFAULT_BALANCE,
        backoff: ReplicaBackoff = ReplicaBackoff(),  # noqa: B008 - frozen, shared safely
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("at least one replica URL is needed, got none")
        duplicates = sorted({url for url in urls if list(urls).count(url) > 1})
        if duplicates:
            raise ValueError(f"replica URLs must differ; given more than once: {', '.join(duplicates)}")
        self.balance = check_balance(balance)
        self.backoff = backoff
        self._clock = clock
        self._replicas = [_Replica(i, url) for i, url in enumerate(urls)]
        self._cursor = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._replicas)

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(r.url for r in self._replicas)

    @property
    def single(self) -> bool:
        """One replica: no backoff, no probes, the RetryPolicy alone decides."""
        return len(self._replicas) == 1

    def choose(self, tried: Collection[int] = ()) -> Pick | None:
        """The replica to try next for a request that already tried `tried` (indices), or None
        when every replica was tried. A Pick with `probe=True` must be reported back with
        `probed` (the replica is marked as being probed until then)."""
        with self._lock:
            if self.single:
                return None if 0 in tried else Pick(0, probe=False)
            now = self._clock()
            untried = [r for r in self._rotation() if r.index not in tried]
            if not untried:
                return None
            due = [r for r in untried if r.due_for_probe(now)]
            if due:
                return self._claim_probe(due[0])
            healthy = [r for r in untried if r.healthy()]
            if healthy:
                least = self.balance == LEAST_OUTSTANDING
                chosen = min(healthy, key=lambda r: r.in_flight) if least else healthy[0]
                self._cursor = (chosen.index + 1) % len(self._replicas)
                return Pick(chosen.index, probe=False)
            return self._claim_probe(min(untried, key=lambda r: r.retry_at))

    def _rotation(self) -> list[_Replica]:
        """The replicas in turn, starting at the cursor (min() keeps the first of equals, so a
        tie in least_outstanding goes to the next in turn)."""
        n = len(self._replicas)
        return [self._replicas[(self._cursor + i) % n] for i in range(n)]

    def _claim_probe(self, replica: _Replica) -> Pick:
        replica.probing = True
        replica.probes += 1
        return Pick(replica.index, probe=True)

    def probed(self, index: int, ready: bool, detail: str | None = None) -> None:
        """Reports a probe's answer: ready makes the replica healthy; else it backs off longer."""
        with self._lock:
            replica = self._replicas[index]
            replica.probing = False
            if ready:
                replica.failures = 0
                replica.retry_at = 0.0
            else:
                self._back_off(replica, detail or "not ready")

    def started(self, index: int, counted: bool = True) -> None:
        """A request is being sent to replica `index` (`counted`: an inference request)."""
        with self._lock:
            replica = self._replicas[index]
            replica.sent += counted
            replica.in_flight += 1

    def succeeded(self, index: int, counted: bool = True) -> None:
        """The request sent to replica `index` was answered. It does not end a backoff: a request
        sent before the replica refused (one in flight while it drains) may still be answered,
        and only a probe says it takes new work."""
        with self._lock:
            replica = self._replicas[index]
            replica.in_flight -= 1
            replica.succeeded += counted

    def failed(self, index: int, error: KilnError | None, back_off: bool, counted: bool = True) -> None:
        """The request sent to replica `index` failed (`error`; None: interrupted, e.g. a
        cancelled task); `back_off` (from `failover`) skips the replica for a while."""
        with self._lock:
            replica = self._replicas[index]
            replica.in_flight -= 1
            replica.failed += counted
            if back_off and error is not None and not self.single:
                self._back_off(replica, error.server_message or error.message)

    def _back_off(self, replica: _Replica, detail: str) -> None:
        replica.failures += 1
        replica.retry_at = self._clock() + self.backoff.after(replica.failures)
        replica.last_error = detail

    def stats(self) -> tuple[ReplicaStats, ...]:
        """A snapshot of every replica, in the order given."""
        with self._lock:
            now = self._clock()
            return tuple(
                ReplicaStats(
                    url=r.url,
                    state=PROBING if r.probing else BACKING_OFF if r.failures else HEALTHY,
                    sent=r.sent,
                    succeeded=r.succeeded,
                    failed=r.failed,
                    in_flight=r.in_flight,
                    probes=r.probes,
                    consecutive_failures=r.failures,
                    retry_in_s=max(0.0, r.retry_at - now) if r.failures else 0.0,
                    last_error=r.last_error,
                )
                for r in self._replicas
            )


def all_failed_message(where: str, failures: Sequence[tuple[str, KilnError | str]]) -> str:
    """The message of the error raised when every replica was tried: each URL and its answer."""
    parts = [
        f"{url}: {error if isinstance(error, str) else error.server_message or error.message}"
        for url, error in failures
    ]
    return f"{where}: all {len(failures)} replicas refused or could not be reached ({'; '.join(parts)})"
