"""A capacity model of the cluster: N Triton replicas behind a Kubernetes Service, autoscaled by an
autoscaling/v2 HorizontalPodAutoscaler on average queue time per request, as a SimPy 4
discrete-event simulation calibrated on this machine (`benchmarks.cluster_calibrate`).

    python -m benchmarks.cluster_sim replicas --rate 10000 --p99-ms 10  # smallest N, p99 vs N
    python -m benchmarks.cluster_sim curve                              # replicas-for-load table
    python -m benchmarks.cluster_sim step --from 2000 --to 8000         # a load step under the HPA
    python -m benchmarks.cluster_sim validate                           # vs held-out measurements

Each runs from a stored calibration (the newest `results/cluster-calibration-*.json`, or
`--calibration PATH`), measures nothing, and writes `results/cluster-<command>-<UTC>.md` and
`.json` with the machine, the commit and the command.

It is a model, and these are its assumptions (docs/capacity.md says how each was calibrated):

- Arrivals are Poisson at a rate given by a load profile (constant, or one step).
- The Service spreads requests over the ready replicas round-robin per request (what the kiln SDK
  over a `dns:///` round-robin gRPC channel or an L7 balancer does), or per connection (`--lb
  connection`: K long-lived connections, each pinned to the replica it was opened on, as one gRPC
  channel through a ClusterIP Service is; a new pod gets only new connections).
- Each replica is one node of its own: its instances (Triton's `instance_group` count) serve one
  execution each at a time; nothing is shared between replicas. An execution's time is drawn from
  the empirical distribution measured at concurrency 1 on one server here, times the measured
  cost of a batch of that size relative to a batch of one (Triton's dynamic batcher with no queue
  delay: an instance that frees takes the largest preferred batch size that is queued, else all
  that is queued, up to the largest batch measured). The per-request time outside the instance
  (gRPC, Triton's frontend, an idle server's wake-ups) is added to every latency and occupies no
  instance: drawn from an open-loop run at a low rate (`--service open`, the default), or the
  closed loop's mean (`--service closed`).
- Replicas are added by the HPA's control loop: every `sync_s` it reads each ready pod's metric
  (avg queue time per request: Prometheus scrapes Triton's counters every `scrape_s`, an adapter
  rule divides their increase over `window_s`), computes desired = ceil(ready * metric/target)
  with the tolerance and the missing-metric rules of the Kubernetes controller, applies the
  scale-up / scale-down stabilization windows and the default rate policies, and clamps to
  [min, max]. A new pod serves after `start_delay_s` (image pull + model load), the first
  readiness probe that passes after that, and the endpoint propagation delay. A removed pod
  leaves the endpoints at once and drains its queue.
- Not modelled: CPU shared between replicas (one replica per node), request payload sizes, network
  time beyond what loopback measured, client retries, failures, the cluster autoscaler (nodes are
  assumed free), and the metric adapter's own caching.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import simpy

from kiln import paths

RESULTS_PREFIX = "cluster-"
CALIBRATION_GLOB = "cluster-calibration-*.json"
CALIBRATION_KIND = "kiln cluster calibration"
DEFAULT_P99_MS = 10.0
"""The SLO `curve` and `step` judge by default: `make bench`'s capacity target (p99 < 10 ms)."""
CURVE_RATES = (500.0, 1000.0, 2000.0, 5000.0, 10_000.0, 20_000.0)
STEADY_REQUESTS = 60_000
"""Requests simulated per steady-state point. p99 from the ~57,000 measured moved by up to 8%
between seeds 0-2 on the 18:25 calibration (10,000 req/s, 20-22 replicas): enough to move the
smallest N meeting an SLO that sits on a flat stretch of the curve by a few replicas."""
WARMUP_SHARE = 0.05
"""The first share of a steady-state run's arrivals, not measured (the queues start empty)."""
BIN_S = 5.0
"""Width of the time bins of a step's timeline (p50 / p99 of the requests arriving in each)."""
MAX_REPLICAS_SEARCHED = 1000
RECOVERY_HOLD_S = 30.0
"""After a step, p99 counts as back under the SLO once it stays there this long (6 bins)."""


# --- the replica ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batching:
    """Triton's dynamic batcher with no queue delay, and what a batch costs.

    Attributes:
        max_batch: The model's max_batch_size.
        preferred: Its preferred batch sizes: when at least one fits in the queue, the largest
            that fits is taken; otherwise everything queued (up to `max_batch`).
        fixed_s / per_request_s: The least-squares line through the measured mean execution time
            of each batch size, time(b) = fixed_s + per_request_s * b; only its shape is used
            (`factor`), the level comes from the concurrency-1 samples.
    """

    max_batch: int
    preferred: tuple[int, ...]
    fixed_s: float
    per_request_s: float

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"Batching.max_batch must be >= 1, got {self.max_batch}")
        if self.fixed_s + self.per_request_s <= 0 or self.per_request_s < 0:
            raise ValueError(
                "Batching: a batch of one must take some time and a bigger one no less, got "
                f"fixed_s={self.fixed_s}, per_request_s={self.per_request_s}"
            )

    def size(self, queued: int) -> int:
        """How many of `queued` requests the next execution takes."""
        fitting = [p for p in self.preferred if p <= min(queued, self.max_batch)]
        return max(fitting) if fitting else min(queued, self.max_batch)

    def factor(self, batch: int) -> float:
        """An execution of `batch` requests takes this many times one of a single request."""
        return (self.fixed_s + self.per_request_s * batch) / (self.fixed_s + self.per_request_s)

    @property
    def saturated_batch(self) -> int:
        """The batch a replica runs when its queue never empties."""
        return self.size(self.max_batch)


@dataclass(frozen=True)
class ReplicaModel:
    """One replica: its instances and its execution times.

    Attributes:
        instances: Concurrent executions (Triton's instance_group count).
        service_s: Samples of one request's execution (batch of one), in seconds; empty when
            `exponential_mean_s` is set instead (the unit tests' M/M/c check).
        overhead_s: Per-request time outside the instance (transport, frontend), added to latency.
        overhead_samples_s: Samples of that time instead of the constant, drawn per request (the
            open-loop calibration: an isolated request's wait outside the instance, wake-ups
            included).
        batching: The dynamic batcher; None runs one request per execution.
        exponential_mean_s: Exponential execution times with this mean instead of `service_s`.
    """

    instances: int
    service_s: tuple[float, ...] = ()
    overhead_s: float = 0.0
    overhead_samples_s: tuple[float, ...] = ()
    batching: Batching | None = None
    exponential_mean_s: float | None = None

    def __post_init__(self) -> None:
        if self.instances < 1:
            raise ValueError(f"ReplicaModel.instances must be >= 1, got {self.instances}")
        if bool(self.service_s) == (self.exponential_mean_s is not None):
            raise ValueError("ReplicaModel: give exactly one of service_s (samples) and exponential_mean_s")
        if self.service_s and min(self.service_s) <= 0:
            raise ValueError(f"ReplicaModel.service_s must be > 0, got a minimum of {min(self.service_s)}")
        if self.overhead_s < 0 or (self.overhead_samples_s and min(self.overhead_samples_s) < 0):
            raise ValueError("ReplicaModel: overhead_s and overhead_samples_s must be >= 0")

    @property
    def mean_service_s(self) -> float:
        """The mean execution time of a batch of one."""
        return (
            self.exponential_mean_s if self.exponential_mean_s is not None else float(np.mean(self.service_s))
        )

    @property
    def capacity(self) -> float:
        """mu, requests/s one replica completes when its queue never empties."""
        if self.batching is None:
            return self.instances / self.mean_service_s
        batch = self.batching.saturated_batch
        return self.instances * batch / (self.mean_service_s * self.batching.factor(batch))

    @property
    def mean_overhead_s(self) -> float:
        """The mean per-request time outside the instance."""
        return float(np.mean(self.overhead_samples_s)) if self.overhead_samples_s else self.overhead_s

    def sampler(self, rng: np.random.Generator) -> Callable[[], float]:
        """A function drawing one batch-of-one execution time (seconds)."""
        if self.exponential_mean_s is not None:
            mean = self.exponential_mean_s
            return _buffered(lambda n: rng.exponential(mean, n).tolist())
        samples = np.asarray(self.service_s)
        return _buffered(lambda n: samples[rng.integers(0, len(samples), n)].tolist())

    def overhead_sampler(self, rng: np.random.Generator) -> Callable[[], float]:
        """A function drawing one request's time outside the instance (seconds)."""
        if not self.overhead_samples_s:
            constant = self.overhead_s
            return lambda: constant
        samples = np.asarray(self.overhead_samples_s)
        return _buffered(lambda n: samples[rng.integers(0, len(samples), n)].tolist())


def _buffered(draw_chunk: Callable[[int], list[float]], chunk: int = 4096) -> Callable[[], float]:
    """One value at a time from chunks drawn with numpy (one numpy call per `chunk` draws)."""
    buffer: list[float] = []

    def draw() -> float:
        if not buffer:
            buffer.extend(draw_chunk(chunk))
        return buffer.pop()

    return draw


# --- the autoscaler -------------------------------------------------------------------------------


@dataclass(frozen=True)
class HpaConfig:
    """An autoscaling/v2 HorizontalPodAutoscaler on a Pods metric (AverageValue target), and the
    metric pipeline in front of it. Defaults are Kubernetes' and a Prometheus adapter rule's.

    Attributes:
        target_queue_s: The target average queue time per request.
        sync_s: The controller's period (--horizontal-pod-autoscaler-sync-period, 15 s).
        tolerance: No change while |metric/target - 1| <= this (0.1).
        up_window_s / down_window_s: Stabilization windows (behavior.scaleUp/scaleDown
            .stabilizationWindowSeconds: 0 and 300).
        up_percent / up_pods / up_period_s: The default scale-up policies: at most +100% or +4
            pods (whichever is more) per 15 s.
        down_percent / down_period_s: The default scale-down policy: at most -100% per 15 s.
        down_pods: A Pods scale-down policy instead (at most this many pods per `down_period_s`);
            None keeps the Percent one.
        min_replicas / max_replicas: The HPA's bounds.
        scrape_s: Prometheus' scrape interval of Triton's /metrics.
        window_s: The adapter rule's range: rate(queue_us[1m]) / rate(request_success[1m]).
        start_delay_s: Pod scheduled -> Triton ready: image pull + model load.
        readiness_period_s: The readiness probe's periodSeconds (first probe at pod start).
        endpoint_delay_s: A ready pod -> in the Service's endpoints (EndpointSlice propagation).
    """

    target_queue_s: float
    sync_s: float = 15.0
    tolerance: float = 0.1
    up_window_s: float = 0.0
    down_window_s: float = 300.0
    up_percent: float = 100.0
    up_pods: int = 4
    up_period_s: float = 15.0
    down_percent: float = 100.0
    down_period_s: float = 15.0
    down_pods: int | None = None
    min_replicas: int = 1
    max_replicas: int = 20
    scrape_s: float = 15.0
    window_s: float = 60.0
    start_delay_s: float = 10.0
    readiness_period_s: float = 5.0
    endpoint_delay_s: float = 1.0

    def __post_init__(self) -> None:
        if self.target_queue_s <= 0:
            raise ValueError(f"HpaConfig.target_queue_s must be > 0, got {self.target_queue_s}")
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                "HpaConfig: need 1 <= min_replicas <= max_replicas, got "
                f"{self.min_replicas}, {self.max_replicas}"
            )
        for name in ("sync_s", "scrape_s", "window_s", "readiness_period_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HpaConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.window_s < 2 * self.scrape_s:
            raise ValueError(
                f"HpaConfig.window_s ({self.window_s}) must span two scrapes (2 x scrape_s = "
                f"{2 * self.scrape_s}): a rate needs two samples"
            )


class Hpa:
    """The HPA controller's arithmetic, apart from any clock: `desired(now, current, metrics)` is
    one sync. It follows kube-controller-manager's replica calculator (plain metric, AverageValue)
    and `normalizeDesiredReplicasWithBehaviors`: tolerance, missing metrics (a pod with no metric
    counts as 0 when scaling up and as the target when scaling down, and no scale happens when
    that flips the direction), stabilization windows, rate policies, bounds."""

    def __init__(self, config: HpaConfig) -> None:
        self.config = config
        self.recommendations: list[tuple[float, int]] = []
        self.events: list[tuple[float, int]] = []  # (time, replicas added; negative when removed)

    def calculate(self, current: int, metrics: Sequence[float | None]) -> int:
        """The unstabilized recommendation from the pods' metrics (None: missing)."""
        c = self.config
        known = [m for m in metrics if m is not None]
        if not known:
            return current  # the controller skips the sync ("no metrics returned")
        ratio = float(np.mean(known)) / c.target_queue_s
        missing = len(metrics) - len(known)
        if missing == 0:
            if abs(1.0 - ratio) <= c.tolerance:
                return current
            return math.ceil(ratio * len(known))
        filled = known + [0.0 if ratio >= 1.0 else c.target_queue_s] * missing
        new_ratio = float(np.mean(filled)) / c.target_queue_s
        if abs(1.0 - new_ratio) <= c.tolerance or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
            return current
        replicas = math.ceil(new_ratio * len(filled))
        if (new_ratio < 1.0 and replicas > current) or (new_ratio > 1.0 and replicas < current):
            return current
        return replicas

    def desired(self, now: float, current: int, metrics: Sequence[float | None]) -> int:
        """One sync: the replica count the controller writes to the Deployment's scale."""
        c = self.config
        proposed = self.calculate(current, metrics)
        self.recommendations.append((now, proposed))
        up_cut, down_cut = now - c.up_window_s, now - c.down_window_s
        up = min([r for t, r in self.recommendations if t > up_cut or t == now], default=proposed)
        down = max([r for t, r in self.recommendations if t > down_cut or t == now], default=proposed)
        keep = max(c.up_window_s, c.down_window_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep or t == now]
        stabilized = min(max(current, up), down)
        limited = self._rate_limited(now, current, stabilized)
        final = min(max(limited, c.min_replicas), c.max_replicas)
        if final != current:
            self.events.append((now, final - current))
        return final

    def _rate_limited(self, now: float, current: int, wanted: int) -> int:
        c = self.config
        if wanted > current:
            added = sum(d for t, d in self.events if d > 0 and t > now - c.up_period_s)
            base = current - added
            limit = max(math.ceil(base * (1 + c.up_percent / 100)), base + c.up_pods)
            return min(wanted, max(limit, current))
        if wanted < current:
            removed = -sum(d for t, d in self.events if d < 0 and t > now - c.down_period_s)
            base = current + removed
            if c.down_pods is not None:
                limit = base - c.down_pods
            else:
                limit = math.ceil(base * (1 - c.down_percent / 100))
            return max(wanted, min(limit, current))
        return current


# --- the load --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadProfile:
    """Poisson arrivals at `rate` until `step_at_s`, then at `step_to` (a constant load: no step)."""

    rate: float
    duration_s: float
    step_at_s: float | None = None
    step_to: float | None = None

    def __post_init__(self) -> None:
        if self.rate <= 0 or (self.step_to is not None and self.step_to <= 0):
            raise ValueError(f"LoadProfile: rates must be > 0, got {self.rate} and {self.step_to}")
        if (self.step_at_s is None) != (self.step_to is None):
            raise ValueError("LoadProfile: give both step_at_s and step_to, or neither")
        if self.duration_s <= 0:
            raise ValueError(f"LoadProfile.duration_s must be > 0, got {self.duration_s}")

    def rate_at(self, t: float) -> float:
        """The arrival rate at time `t`."""
        if self.step_at_s is not None and self.step_to is not None and t >= self.step_at_s:
            return self.step_to
        return self.rate

    def next_change(self, t: float) -> float:
        """The next time after `t` the rate changes (the end when none)."""
        if self.step_at_s is not None and t < self.step_at_s:
            return self.step_at_s
        return self.duration_s


# --- the simulation --------------------------------------------------------------------------------


class Replica:
    """One pod: a queue and `instances` executors (SimPy processes), Triton's counters."""

    def __init__(self, sim: Simulation, index: int, created_s: float) -> None:
        self.sim = sim
        self.index = index
        self.created_s = created_s
        self.ready = False
        self.ready_s: float | None = None
        self.removed = False
        self.queue: deque[float] = deque()
        self.idle: list[simpy.Event] = []
        self.queue_s_total = 0.0  # nv_inference_queue_duration_us, in seconds
        self.completed = 0  # nv_inference_request_success
        self.busy_s = 0.0
        self.in_flight = 0
        for _ in range(sim.model.instances):
            sim.env.process(self._executor())

    def submit(self, arrival: float) -> None:
        """A request enters this replica's queue."""
        self.queue.append(arrival)
        if self.idle:
            self.idle.pop().succeed()

    def _executor(self) -> Any:
        sim, env = self.sim, self.sim.env
        batching = sim.model.batching
        while True:
            if not self.queue:
                wake = env.event()
                self.idle.append(wake)
                yield wake
                continue
            size = batching.size(len(self.queue)) if batching is not None else 1
            batch = [self.queue.popleft() for _ in range(size)]
            start = env.now
            duration = sim.draw() * (batching.factor(size) if batching is not None else 1.0)
            self.in_flight += size
            yield env.timeout(duration)
            end = env.now
            self.in_flight -= size
            self.busy_s += max(0.0, min(end, sim.profile.duration_s) - max(start, sim.measure_from))
            for arrival in batch:
                self.queue_s_total += start - arrival
                self.completed += 1
                sim.record(arrival, end - arrival + sim.draw_overhead(), start - arrival)


@dataclass
class Timeline:
    """What the control loop saw and did, one row per HPA sync."""

    t: list[float] = field(default_factory=list)
    desired: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    metric_s: list[float | None] = field(default_factory=list)


class Simulation:
    """One run: the arrivals, the Service, the replicas and (when `hpa`) the autoscaler.

    Args:
        model: The replica.
        profile: The load.
        replicas: Replicas at the start (ready at t = 0).
        hpa: The autoscaler; None keeps `replicas` fixed.
        lb: "request" (round-robin per request) or "connection" (round-robin per connection).
        connections: Client connections when `lb` is "connection".
        seed: The random seed: the same seed, the same run.
        measure_from: Requests arriving before this time are not recorded.
    """

    def __init__(
        self,
        model: ReplicaModel,
        profile: LoadProfile,
        replicas: int,
        *,
        hpa: HpaConfig | None = None,
        lb: str = "request",
        connections: int = 64,
        seed: int = 0,
        measure_from: float = 0.0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        if lb not in ("request", "connection"):
            raise ValueError(f"lb must be 'request' or 'connection', got {lb!r}")
        if lb == "connection" and connections < 1:
            raise ValueError(f"connections must be >= 1, got {connections}")
        self.model = model
        self.profile = profile
        self.hpa_config = hpa
        self.hpa = Hpa(hpa) if hpa is not None else None
        self.lb = lb
        self.measure_from = measure_from
        self.rng = np.random.default_rng(seed)
        self.draw = model.sampler(self.rng)
        self.draw_overhead = model.overhead_sampler(self.rng)
        self.env = simpy.Environment()
        self.pods: list[Replica] = []
        self.endpoints: list[Replica] = []
        self._rr = 0
        self.connections: list[Replica | None] = [None] * (connections if lb == "connection" else 0)
        self.arrivals: list[float] = []
        self.latencies: list[float] = []
        self.waits: list[float] = []
        self.timeline = Timeline()
        self.stopped = False
        self.scrapes: dict[int, list[tuple[float, float, int]]] = {}
        for _ in range(replicas):
            pod = self._new_pod()
            self._make_ready(pod)
        # the clients' connections opened before the run, spread over the replicas then serving
        self.connections = [self._next_endpoint() for _ in self.connections]
        self.spec_replicas = replicas

    # --- the Service ---

    def _new_pod(self) -> Replica:
        pod = Replica(self, len(self.pods), self.env.now)
        self.pods.append(pod)
        return pod

    def _make_ready(self, pod: Replica) -> None:
        if pod.removed:
            return
        pod.ready = True
        pod.ready_s = self.env.now
        self.endpoints.append(pod)
        for i, conn in enumerate(self.connections):
            if conn is None:  # connections without a pod reconnect to the new one
                self.connections[i] = self._next_endpoint()

    def _next_endpoint(self) -> Replica | None:
        if not self.endpoints:
            return None
        self._rr = (self._rr + 1) % len(self.endpoints)
        return self.endpoints[self._rr]

    def route(self) -> Replica | None:
        """The replica the Service sends the next request to."""
        if self.lb == "request":
            return self._next_endpoint()
        i = int(self.rng.integers(0, len(self.connections)))
        conn = self.connections[i]
        if conn is None or conn.removed:
            conn = self.connections[i] = self._next_endpoint()
        return conn

    def record(self, arrival: float, latency: float, wait: float) -> None:
        """One completed request (recorded when it arrived inside the measured time)."""
        if arrival >= self.measure_from:
            self.arrivals.append(arrival)
            self.latencies.append(latency)
            self.waits.append(wait)

    # --- processes ---

    def _arrivals(self) -> Any:
        env, profile = self.env, self.profile
        gaps: list[float] = []
        while True:
            if not gaps:
                gaps = self.rng.standard_exponential(4096).tolist()
            rate = profile.rate_at(env.now)
            gap = gaps.pop() / rate
            change = profile.next_change(env.now)
            if env.now + gap >= change:  # memoryless: restart the draw at the change
                if change >= profile.duration_s:
                    return
                yield env.timeout(change - env.now)
                continue
            yield env.timeout(gap)
            pod = self.route()
            if pod is not None:
                pod.submit(env.now)

    def _scraper(self) -> Any:
        assert self.hpa_config is not None
        while not self.stopped:
            for pod in self.pods:
                if pod.ready and not pod.removed:
                    self.scrapes.setdefault(pod.index, []).append(
                        (self.env.now, pod.queue_s_total, pod.completed)
                    )
            yield self.env.timeout(self.hpa_config.scrape_s)

    def pod_metric(self, pod: Replica) -> float | None:
        """The adapter's value for `pod`: increase of queue time / increase of requests over the
        window (None with fewer than two scrapes in it)."""
        assert self.hpa_config is not None
        now = self.env.now
        samples = [s for s in self.scrapes.get(pod.index, []) if s[0] > now - self.hpa_config.window_s]
        if len(samples) < 2:
            return None
        (_, q0, n0), (_, q1, n1) = samples[0], samples[-1]
        return (q1 - q0) / max(n1 - n0, 1)

    def _controller(self) -> Any:
        assert self.hpa is not None and self.hpa_config is not None
        c = self.hpa_config
        while True:
            yield self.env.timeout(c.sync_s)
            if self.stopped:
                return
            live = [p for p in self.pods if not p.removed]
            metrics = [self.pod_metric(p) if p.ready else None for p in live]
            desired = self.hpa.desired(self.env.now, self.spec_replicas, metrics)
            known = [m for m in metrics if m is not None]
            self.timeline.t.append(self.env.now)
            self.timeline.desired.append(desired)
            self.timeline.ready.append(len(self.endpoints))
            self.timeline.metric_s.append(float(np.mean(known)) if known else None)
            self._scale(desired)

    def _scale(self, desired: int) -> None:
        live = [p for p in self.pods if not p.removed]
        if desired > len(live):
            for _ in range(desired - len(live)):
                self.env.process(self._start_pod(self._new_pod()))
        elif desired < len(live):  # a ReplicaSet removes not-ready pods first, then the newest
            order = sorted(live, key=lambda p: (p.ready, p.created_s))
            for pod in order[: len(live) - desired]:
                pod.removed = True
                if pod in self.endpoints:
                    self.endpoints.remove(pod)
                self.connections = [None if conn is pod else conn for conn in self.connections]
                self.connections = [conn or self._next_endpoint() for conn in self.connections]
        self.spec_replicas = desired

    def _start_pod(self, pod: Replica) -> Any:
        c = self.hpa_config
        assert c is not None
        loaded = c.start_delay_s
        probe = math.ceil(loaded / c.readiness_period_s) * c.readiness_period_s
        yield self.env.timeout(probe + c.endpoint_delay_s)
        self._make_ready(pod)

    def run(self) -> Simulation:
        """Runs the simulation to the profile's end, then lets the queued requests finish."""
        self.env.process(self._arrivals())
        if self.hpa is not None:
            self.env.process(self._scraper())
            self.env.process(self._controller())
        self.env.run(until=self.profile.duration_s)
        self.stopped = True  # drain: no arrivals, no scaling; the queued requests finish
        while any(pod.queue or pod.in_flight for pod in self.pods) and self.env.peek() < math.inf:
            self.env.step()
        return self

    # --- results ---

    def utilization(self) -> float:
        """Busy share of all instances of the fixed replicas over the measured time."""
        span = self.profile.duration_s - self.measure_from
        slots = self.model.instances * len(self.pods) * span
        return sum(p.busy_s for p in self.pods) / slots if slots > 0 else 0.0


def percentile_ms(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile of seconds, in milliseconds (None when empty)."""
    return float(np.percentile(values, q) * 1e3) if len(values) else None


# --- questions --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Steady:
    """A fixed number of replicas at a constant rate.

    Attributes:
        offered_load: rate / (N mu), mu the replica's saturated capacity (`ReplicaModel.capacity`).
        utilization: The instances' measured busy share; above `offered_load` with batching,
            since below saturation batches are smaller than the saturated one mu assumes.
        stable: False when the offered load is >= 1 (no steady state: not simulated, no figures).
    """

    replicas: int
    rate: float
    offered_load: float
    p50_ms: float | None
    p99_ms: float | None
    mean_wait_ms: float | None
    utilization: float | None
    requests: int
    stable: bool

    def meets(self, p99_ms: float) -> bool:
        """Whether this point meets p99 < `p99_ms`."""
        return self.stable and self.p99_ms is not None and self.p99_ms < p99_ms


def steady(
    model: ReplicaModel,
    rate: float,
    replicas: int,
    *,
    requests: int = STEADY_REQUESTS,
    seed: int = 0,
    lb: str = "request",
    connections: int = 64,
) -> Steady:
    """`replicas` fixed replicas at `rate`: p50/p99 over `requests` arrivals after a warm-up.
    A load at or above the replicas' capacity has no steady state: reported unstable, not run."""
    offered = rate / (replicas * model.capacity)
    if offered >= 1.0:
        return Steady(replicas, rate, offered, None, None, None, None, 0, False)
    duration = requests / rate
    sim = Simulation(
        model,
        LoadProfile(rate, duration),
        replicas,
        seed=seed,
        lb=lb,
        connections=connections,
        measure_from=duration * WARMUP_SHARE,
    ).run()
    return Steady(
        replicas,
        rate,
        offered,
        percentile_ms(sim.latencies, 50),
        percentile_ms(sim.latencies, 99),
        float(np.mean(sim.waits) * 1e3) if sim.waits else None,
        sim.utilization(),
        len(sim.latencies),
        True,
    )


@dataclass(frozen=True)
class ReplicasAnswer:
    """The smallest N meeting the SLO at a rate, and the p99-vs-N curve searched."""

    rate: float
    p99_ms: float
    replicas: int | None
    curve: tuple[Steady, ...]


def replicas_for(
    model: ReplicaModel,
    rate: float,
    p99_ms: float,
    *,
    seed: int = 0,
    requests: int = STEADY_REQUESTS,
    extra: int = 2,
    lb: str = "request",
    connections: int = 64,
) -> ReplicasAnswer:
    """Searches N upward from the first stable count (ceil(rate / mu), or one more when that is
    exactly saturated) until p99 < `p99_ms`, then `extra` more points for the curve. Every N is
    simulated with the same seed."""
    first = max(1, math.floor(rate / model.capacity) + 1)
    curve: list[Steady] = []
    found: int | None = None
    n = first
    while n <= MAX_REPLICAS_SEARCHED:
        point = steady(model, rate, n, requests=requests, seed=seed, lb=lb, connections=connections)
        curve.append(point)
        if found is None and point.meets(p99_ms):
            found = n
        if found is not None and n >= found + extra:
            break
        n += 1
    if first > 1:  # the saturated count below, for the curve
        curve.insert(
            0, steady(model, rate, first - 1, requests=requests, seed=seed, lb=lb, connections=connections)
        )
    return ReplicasAnswer(rate, p99_ms, found, tuple(curve))


@dataclass(frozen=True)
class StepResult:
    """A load step under the HPA."""

    from_rate: float
    to_rate: float
    step_at_s: float
    p99_ms: float
    bins: tuple[dict[str, Any], ...]
    timeline: dict[str, list[Any]]
    first_scale_up_s: float | None
    first_new_ready_s: float | None
    slo_broken: bool
    recovered_s: float | None
    breaches: tuple[tuple[float, float], ...]
    final_replicas: int
    max_replicas_used: int


def step(
    model: ReplicaModel,
    from_rate: float,
    to_rate: float,
    hpa: HpaConfig,
    *,
    start_replicas: int,
    before_s: float = 120.0,
    after_s: float = 480.0,
    p99_ms: float = DEFAULT_P99_MS,
    seed: int = 0,
    lb: str = "request",
    connections: int = 64,
) -> StepResult:
    """Runs `before_s` at `from_rate`, then `after_s` at `to_rate`, under the HPA. The lag is
    measured from the step: when the first scale-up was decided, when the first new pod became
    ready, and when p99 (per `BIN_S` bin of arrivals) was back under the SLO (`recovery`: the end of
    the first breach that `RECOVERY_HOLD_S` follow without one; every breach is listed)."""
    duration = before_s + after_s
    sim = Simulation(
        model,
        LoadProfile(from_rate, duration, step_at_s=before_s, step_to=to_rate),
        start_replicas,
        hpa=hpa,
        lb=lb,
        connections=connections,
        seed=seed,
    ).run()
    bins = _latency_bins(np.asarray(sim.arrivals), np.asarray(sim.latencies), duration)
    t, desired, ready = sim.timeline.t, sim.timeline.desired, sim.timeline.ready
    first_up, new_ready = _scale_up_lag(sim, start_replicas, before_s)
    breaches = slo_breaches(bins, before_s, p99_ms)
    recovered = recovery(breaches, duration)
    recovered = None if recovered is None else recovered - before_s
    return StepResult(
        from_rate,
        to_rate,
        before_s,
        p99_ms,
        tuple(bins),
        {
            "t_s": t,
            "desired": desired,
            "ready": ready,
            "metric_ms": [None if m is None else m * 1e3 for m in sim.timeline.metric_s],
        },
        first_up,
        new_ready,
        bool(breaches),
        recovered,
        tuple(breaches),
        sim.spec_replicas,
        max(desired, default=start_replicas),
    )


def _latency_bins(arrivals: np.ndarray, latencies: np.ndarray, duration: float) -> list[dict[str, Any]]:
    """The requests, p50 and p99 of each `BIN_S` bin of arrivals over `duration`."""
    bins: list[dict[str, Any]] = []
    index = np.floor(arrivals / BIN_S).astype(int)
    order = np.argsort(index, kind="stable")
    starts = np.searchsorted(index[order], np.arange(int(math.ceil(duration / BIN_S)) + 1))
    for b in range(len(starts) - 1):
        chunk = latencies[order[starts[b] : starts[b + 1]]]
        bins.append(
            {
                "t_s": b * BIN_S,
                "requests": int(len(chunk)),
                "p50_ms": percentile_ms(chunk, 50),
                "p99_ms": percentile_ms(chunk, 99),
            }
        )
    return bins


def _scale_up_lag(sim: Simulation, start_replicas: int, before_s: float) -> tuple[float | None, float | None]:
    """Seconds from the step at `before_s` to the first scale-up decided and to the first new pod
    ready (None for either that never happened)."""
    t, desired = sim.timeline.t, sim.timeline.desired
    before = [start_replicas, *desired]  # the replicas each sync started from
    first_up = next(
        (t[i] - before_s for i in range(len(t)) if t[i] > before_s and desired[i] > before[i]), None
    )
    ready_times = [p.ready_s for p in sim.pods if p.created_s > before_s and p.ready_s is not None]
    new_ready = min(ready_times) - before_s if ready_times else None
    return first_up, new_ready


def recovery(breaches: Sequence[tuple[float, float]], end_s: float) -> float | None:
    """When p99 was back under the SLO: the end of the first breach followed by at least
    `RECOVERY_HOLD_S` without one before the next or the run's end `end_s` (0.0 when nothing
    broke; None when no breach was followed by that much)."""
    if not breaches:
        return 0.0
    for i, (_, stop) in enumerate(breaches):
        following = breaches[i + 1][0] if i + 1 < len(breaches) else end_s
        if following - stop >= RECOVERY_HOLD_S:
            return stop
    return None


def slo_breaches(bins: Sequence[dict[str, Any]], after_s: float, p99_ms: float) -> list[tuple[float, float]]:
    """The intervals [start, end) from `after_s` on made of consecutive bins whose p99 is at or
    above the SLO (a bin with no request breaks no SLO)."""
    spans: list[tuple[float, float]] = []
    for b in bins:
        if b["t_s"] < after_s or b["p99_ms"] is None or b["p99_ms"] < p99_ms:
            continue
        start, end = b["t_s"], b["t_s"] + BIN_S
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


# --- calibration ---------------------------------------------------------------------------------------


def latest_calibration(folder: Path | None = None) -> Path:
    """The newest results/cluster-calibration-*.json.

    Raises:
        FileNotFoundError: none there (run `python -m benchmarks.cluster_calibrate` first).
    """
    folder = folder or paths.ROOT / "results"
    found = sorted(folder.glob(CALIBRATION_GLOB))
    if not found:
        raise FileNotFoundError(
            f"no {CALIBRATION_GLOB} in {folder}: measure one with `python -m benchmarks.cluster_calibrate` "
            "or pass --calibration PATH"
        )
    return found[-1]


def load_calibration(path: Path) -> dict[str, Any]:
    """A stored calibration, checked for what the model reads.

    Raises:
        ValueError: not a calibration, or a field is missing (named).
    """
    data = json.loads(Path(path).read_text())
    if data.get("kind") != CALIBRATION_KIND:
        raise ValueError(f"{path} is not a cluster calibration (its kind is {data.get('kind')!r})")
    for key in ("instances", "service", "batching", "load_time_s"):
        if key not in data:
            raise ValueError(f"calibration {path} has no {key!r}: re-run benchmarks.cluster_calibrate")
    return data


SERVICE_SOURCES = ("open", "closed")
"""How a calibration becomes a replica's times. Both take the instance's execution from the
closed loop at concurrency 1 (a hot server: its samples less the mean overhead). "closed" adds
that loop's mean overhead (transport, frontend) to every request; "open" (the default when the
calibration has the run) draws each request's time outside the instance from Poisson arrivals at
a low rate, where requests rarely meet: client latency less the hot mean execution, so the
wake-ups an idle server pays (and that a closed loop never shows) add to latency but occupy no
instance."""


def replica_model(
    calibration: dict[str, Any], batching: bool = True, service: str | None = None
) -> ReplicaModel:
    """The replica a calibration describes (`batching=False`: one request per execution;
    `service`: one of `SERVICE_SOURCES`, default "open" when measured, else "closed").

    Raises:
        ValueError: an unknown source, or "open" from a calibration without its run.
    """
    source = service or ("open" if "service_open" in calibration else "closed")
    if source not in SERVICE_SOURCES:
        raise ValueError(f"service source must be one of {list(SERVICE_SOURCES)}, got {source!r}")
    hot = calibration["service"]
    overhead_samples: tuple[float, ...] = ()
    if source == "open":
        if "service_open" not in calibration:
            raise ValueError("the calibration has no open-loop run ('service_open'): use --service closed")
        run = calibration["service_open"]
        latencies = np.asarray(run["samples_us"]) + run["overhead_us"]  # the client latencies kept
        overhead_samples = tuple(np.maximum(latencies - hot["server_execution_mean_us"], 0.0) / 1e6)
    fit = calibration["batching"]
    measured = [row["batch"] for row in fit.get("table", [])]
    max_batch = min(int(fit["max_batch"]), max(measured, default=1))  # no extrapolation past the data
    return ReplicaModel(
        instances=int(calibration["instances"]),
        service_s=tuple(us / 1e6 for us in hot["samples_us"]),
        overhead_s=hot["overhead_us"] / 1e6,
        overhead_samples_s=overhead_samples,
        batching=Batching(
            max_batch, tuple(fit["preferred"]), fit["fixed_us"] / 1e6, fit["per_request_us"] / 1e6
        )
        if batching and fit.get("fixed_us") is not None
        else None,
    )


# --- the command line ----------------------------------------------------------------------------------


def _write(kind: str, body: str, data: dict[str, Any], out: Path | None, command: str) -> Path:
    from loadtests import environment

    folder = out or paths.ROOT / "results"
    folder.mkdir(parents=True, exist_ok=True)
    stamp = environment.utc_stamp()
    base = folder / f"{RESULTS_PREFIX}{kind}-{stamp}"
    data = {
        "kind": f"kiln cluster model: {kind}",
        "date_utc": stamp,
        "commit": environment.commit(),
        "command": command,
        "machine": environment.machine_info(),
        **data,
    }
    header = (
        f"# Cluster model: {kind}\n\n`{data['command']}` on {data['date_utc']} (commit `{data['commit']}`), "
        f"calibration `{data.get('calibration')}` ({data.get('service_source')}-loop service times). "
        "A simulation (SimPy), not a measurement: "
        "docs/capacity.md says what it assumes.\n\n"
    )
    base.with_suffix(".md").write_text(header + body)
    base.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return base.with_suffix(".md")


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _pct(share: float | None) -> str:
    return "n/a" if share is None else f"{share * 100:+.0f}%"


def _curve_table(curve: Sequence[Steady]) -> str:
    rows = [
        "| N | offered load rate/(N mu) | p50 ms | p99 ms | mean queue wait ms | instance busy |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in curve:
        if not s.stable:
            rows.append(f"| {s.replicas} | {s.offered_load:.2f} | unstable | unstable | unstable | 100% |")
        else:
            rows.append(
                f"| {s.replicas} | {s.offered_load:.2f} | {_fmt(s.p50_ms)} | {_fmt(s.p99_ms)} "
                f"| {_fmt(s.mean_wait_ms, 3)} | {s.utilization:.0%} |"
            )
    return "\n".join(rows) + "\n"


def _model_summary(model: ReplicaModel) -> str:
    b = model.batching
    batching = (
        f"dynamic batching (max {b.max_batch}, preferred {list(b.preferred)}, batch of b costs "
        f"{b.fixed_s * 1e6:.0f} + {b.per_request_s * 1e6:.0f} b us)"
        if b
        else "no batching"
    )
    return (
        f"replica: {model.instances} instance(s), mean execution {model.mean_service_s * 1e3:.3f} ms, "
        f"overhead {model.mean_overhead_s * 1e3:.3f} ms"
        + (" (mean of the open-loop samples)" if model.overhead_samples_s else "")
        + f", {batching}; capacity mu = {model.capacity:,.0f} req/s"
    )


def _hpa_from(args: argparse.Namespace, calibration: dict[str, Any], target_ms: float) -> HpaConfig:
    start = (
        args.start_delay_s
        if args.start_delay_s is not None
        else calibration["load_time_s"] + args.image_pull_s
    )
    return HpaConfig(
        target_queue_s=target_ms / 1e3,
        sync_s=args.sync_s,
        tolerance=args.tolerance,
        down_window_s=args.down_window_s,
        up_window_s=args.up_window_s,
        scrape_s=args.scrape_s,
        window_s=args.window_s,
        start_delay_s=start,
        readiness_period_s=args.readiness_period_s,
        max_replicas=args.max_replicas,
        down_pods=args.down_pods,
        down_period_s=args.down_period_s,
    )


def cmd_replicas(
    args: argparse.Namespace, calibration: dict[str, Any], model: ReplicaModel
) -> dict[str, Any]:
    answer = replicas_for(
        model,
        args.rate,
        args.p99_ms,
        seed=args.seed,
        requests=args.requests,
        lb=args.lb,
        connections=args.connections,
    )
    verdict = (
        f"**{answer.replicas} replicas** hold {args.rate:,.0f} req/s at p99 < {args.p99_ms:g} ms"
        if answer.replicas
        else f"no N up to {MAX_REPLICAS_SEARCHED} holds p99 < {args.p99_ms:g} ms at {args.rate:,.0f} req/s"
    )
    body = f"{verdict} (steady state, {args.lb} balancing, seed {args.seed}).\n\n{_model_summary(model)}.\n\n"
    body += _curve_table(answer.curve)
    print(body)
    return {"body": body, "answer": asdict(answer)}


def cmd_curve(args: argparse.Namespace, calibration: dict[str, Any], model: ReplicaModel) -> dict[str, Any]:
    rows = [
        "| rate req/s | replicas | p50 ms | p99 ms | offered load | p99 at N-1 | mean queue ms at N |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    answers = []
    for rate in args.rates:
        answer = replicas_for(
            model,
            rate,
            args.p99_ms,
            seed=args.seed,
            requests=args.requests,
            extra=0,
            lb=args.lb,
            connections=args.connections,
        )
        answers.append(asdict(answer))
        point = next((s for s in answer.curve if s.replicas == answer.replicas), None)
        below = next((s for s in answer.curve if answer.replicas and s.replicas == answer.replicas - 1), None)
        below_text = "n/a" if below is None else ("unstable" if not below.stable else _fmt(below.p99_ms))
        rows.append(
            f"| {rate:,.0f} | {answer.replicas} | {_fmt(point.p50_ms if point else None)} | "
            f"{_fmt(point.p99_ms if point else None)} | {point.offered_load if point else 0:.2f} "
            f"| {below_text} | {_fmt(point.mean_wait_ms if point else None, 3)} |"
        )
        print(rows[-1], flush=True)
    body = (
        f"Replicas for load at p99 < {args.p99_ms:g} ms (steady state, {args.lb} balancing, "
        f"seed {args.seed}, {args.requests:,} requests per point).\n\n{_model_summary(model)}.\n\n"
        + "\n".join(rows)
        + "\n"
    )
    print(body)
    return {"body": body, "answers": answers}


def cmd_step(args: argparse.Namespace, calibration: dict[str, Any], model: ReplicaModel) -> dict[str, Any]:
    answer = replicas_for(model, args.from_rate, args.p99_ms, seed=args.seed, requests=args.requests, extra=0)
    start = args.start_replicas or answer.replicas
    if start is None:
        raise SystemExit(f"no replica count holds {args.from_rate} req/s; pass --start-replicas")
    target_ms, target_note = _step_target(args, answer)
    hpa = _hpa_from(args, calibration, target_ms)
    result = step(
        model, args.from_rate, args.to_rate, hpa, start_replicas=start, before_s=args.before_s,
        after_s=args.after_s, p99_ms=args.p99_ms, seed=args.seed, lb=args.lb, connections=args.connections,
    )  # fmt: skip
    lines = _step_summary(args, model, hpa, result, start, target_ms, target_note)
    lines += _step_timeline_rows(result)
    body = "\n".join(lines) + "\n\n(p50/p99: the requests that arrived in the 5 s before the sync.)\n"
    print(body)
    return {"body": body, "start_replicas": start, "hpa": asdict(hpa), "result": asdict(result)}


def _step_target(args: argparse.Namespace, answer: ReplicasAnswer) -> tuple[float, str]:
    """The HPA's target queue time (ms) for the step and where it comes from: `--target-queue-ms`,
    or the mean queue time at the smallest replica count meeting the SLO at the first rate."""
    target_ms = args.target_queue_ms
    target_note = "given"
    if target_ms is None:  # the queue time the SLO's replica count runs at: the HPA then holds it
        if answer.replicas is None:
            raise SystemExit(
                f"no replica count meets the SLO at {args.from_rate} req/s: pass --target-queue-ms"
            )
        at = next(p for p in answer.curve if p.replicas == answer.replicas)
        target_ms = at.mean_wait_ms or 0.001
        target_note = (
            f"the mean queue time at {answer.replicas} replicas and {args.from_rate:,.0f} req/s, the "
            "smallest count meeting the SLO there"
        )
    return target_ms, target_note


def _step_summary(
    args: argparse.Namespace,
    model: ReplicaModel,
    hpa: HpaConfig,
    result: StepResult,
    start: int,
    target_ms: float,
    target_note: str,
) -> list[str]:
    """The step report's lines before the timeline: the setup, the lags, the breaches and the
    timeline table's header."""
    return [
        f"Load step {args.from_rate:,.0f} -> {args.to_rate:,.0f} req/s at t = {args.before_s:g} s, "
        f"starting at {start} replicas (the smallest meeting the SLO at the first rate unless given); "
        f"HPA on avg queue time per request, target {target_ms:.3f} ms ({target_note}), "
        f"sync {hpa.sync_s:g} s, "
        f"tolerance {hpa.tolerance:g}, scrape {hpa.scrape_s:g} s, window {hpa.window_s:g} s, "
        f"stabilization up {hpa.up_window_s:g} s / down {hpa.down_window_s:g} s; "
        f"pod start {hpa.start_delay_s:.1f} s "
        f"(image pull {args.image_pull_s:g} s + the model load measured here), readiness period "
        f"{hpa.readiness_period_s:g} s, endpoints {hpa.endpoint_delay_s:g} s.",
        "",
        f"{_model_summary(model)}.",
        "",
        f"- first scale-up decided: {_fmt(result.first_scale_up_s, 0)} s after the step",
        f"- first new pod in the endpoints: {_fmt(result.first_new_ready_s, 0)} s after the step",
        f"- p99 < {args.p99_ms:g} ms again (for {RECOVERY_HOLD_S:g} s at least, per {BIN_S:g} s bin of "
        "arrivals): "
        + (
            "never broken"
            if not result.slo_broken
            else (
                f"{result.recovered_s:.0f} s after the step"
                if result.recovered_s is not None
                else "not within the run"
            )
        ),
        "- every breach after the step (s after the step): "
        + (
            ", ".join(f"{a - args.before_s:.0f}-{b - args.before_s:.0f}" for a, b in result.breaches)
            or "none"
        ),
        f"- replicas: at most {result.max_replicas_used}, at the end {result.final_replicas}",
        "",
        "| t s | desired | ready | metric ms (avg queue / request) | p50 ms | p99 ms |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]


def _step_timeline_rows(result: StepResult) -> list[str]:
    """One table row per HPA sync: desired and ready replicas, the metric, and p50/p99 of the
    requests that arrived in the bin before the sync."""
    rows = []
    by_t = {round(b["t_s"]): b for b in result.bins}
    for i, t in enumerate(result.timeline["t_s"]):
        b = by_t.get(round(t - BIN_S)) or {}
        rows.append(
            f"| {t:.0f} | {result.timeline['desired'][i]} | {result.timeline['ready'][i]} | "
            f"{_fmt(result.timeline['metric_ms'][i], 3)} | {_fmt(b.get('p50_ms'))} "
            f"| {_fmt(b.get('p99_ms'))} |"
        )
    return rows


def cmd_validate(
    args: argparse.Namespace, calibration: dict[str, Any], model: ReplicaModel
) -> dict[str, Any]:
    held_out = calibration.get("validation") or []
    if not held_out:
        raise SystemExit(
            "the calibration has no held-out rate measurements (validation); re-run cluster_calibrate"
        )
    rows = [
        "| rate req/s | measured p50 / p99 ms | model p50 / p99 ms | error p50 / p99 "
        "| perf_analyzer sent late |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    checks = []
    for m in held_out:
        if m.get("p99_ms") is None:
            rows.append(f"| {m['rate']:,.0f} | no measurement: {m.get('error')} | | | |")
            continue
        s = steady(model, m["rate"], 1, seed=args.seed, requests=args.requests)
        err50 = (s.p50_ms - m["p50_ms"]) / m["p50_ms"] if s.p50_ms else None
        err99 = (s.p99_ms - m["p99_ms"]) / m["p99_ms"] if s.p99_ms else None
        checks.append({"measured": m, "model": asdict(s), "error_p50": err50, "error_p99": err99})
        rows.append(
            f"| {m['rate']:,.0f} | {_fmt(m['p50_ms'])} / {_fmt(m['p99_ms'])} "
            f"| {_fmt(s.p50_ms)} / {_fmt(s.p99_ms)} | {_pct(err50)} / {_pct(err99)} "
            f"| {_fmt((m.get('delayed_share') or 0) * 100, 1)}% |"
        )
    body = (
        "One replica, Poisson arrivals: the model against perf_analyzer (`--request-rate-range R --async "
        "--request-distribution poisson`) at rates the calibration measured but did not fit on.\n\n"
        f"{_model_summary(model)}.\n\n" + "\n".join(rows) + "\n"
    )
    print(body)
    return {"body": body, "checks": checks}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cluster_sim", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--calibration", type=Path, help="a cluster-calibration JSON (default: the newest in results/)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--requests", type=int, default=STEADY_REQUESTS, help="requests per steady-state point"
    )
    parser.add_argument(
        "--lb",
        choices=("request", "connection"),
        default="request",
        help="round-robin per request or per connection",
    )
    parser.add_argument("--connections", type=int, default=64, help="client connections with --lb connection")
    parser.add_argument("--no-batching", action="store_true", help="one request per execution")
    parser.add_argument(
        "--service", choices=SERVICE_SOURCES, help="time outside the instance: open loop (default) or closed"
    )
    parser.add_argument("--out", type=Path, help="results folder (default results/)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replicas", help="the smallest N meeting p99 < Y ms at X req/s, and p99 vs N")
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--p99-ms", type=float, default=DEFAULT_P99_MS)
    p = sub.add_parser("curve", help="replicas needed for a range of rates")
    p.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=list(CURVE_RATES))
    p.add_argument("--p99-ms", type=float, default=DEFAULT_P99_MS)
    p = sub.add_parser("step", help="a load step under the HPA: replicas and p99 over time")
    p.add_argument("--from", dest="from_rate", type=float, required=True)
    p.add_argument("--to", dest="to_rate", type=float, required=True)
    p.add_argument("--p99-ms", type=float, default=DEFAULT_P99_MS)
    p.add_argument("--start-replicas", type=int)
    p.add_argument("--before-s", type=float, default=120.0)
    p.add_argument("--after-s", type=float, default=480.0)
    p.add_argument(
        "--target-queue-ms",
        type=float,
        help="the HPA's target avg queue time per request (default: the one at which the SLO's count runs)",
    )
    p.add_argument("--sync-s", type=float, default=15.0)
    p.add_argument("--tolerance", type=float, default=0.1)
    p.add_argument("--up-window-s", type=float, default=0.0)
    p.add_argument("--down-window-s", type=float, default=300.0)
    p.add_argument("--scrape-s", type=float, default=15.0)
    p.add_argument("--window-s", type=float, default=60.0)
    p.add_argument("--readiness-period-s", type=float, default=5.0)
    p.add_argument("--image-pull-s", type=float, default=0.0, help="added to the measured model load time")
    p.add_argument("--start-delay-s", type=float, help="pod start, replacing load time + image pull")
    p.add_argument("--max-replicas", type=int, default=50)
    p.add_argument(
        "--down-pods", type=int, help="scale-down policy: at most this many pods per --down-period-s"
    )
    p.add_argument("--down-period-s", type=float, default=15.0)
    sub.add_parser("validate", help="the model against the calibration's held-out rate measurements")
    return parser.parse_args(argv)


COMMANDS = {"replicas": cmd_replicas, "curve": cmd_curve, "step": cmd_step, "validate": cmd_validate}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.calibration or latest_calibration()
    calibration = load_calibration(path)
    model = replica_model(calibration, batching=not args.no_batching, service=args.service)
    started = time.monotonic()
    data = COMMANDS[args.command](args, calibration, model)
    data.update(
        calibration=str(path),
        service_source=args.service or ("open" if "service_open" in calibration else "closed"),
        model=_model_summary(model),
        settings={k: v for k, v in vars(args).items() if k != "calibration"},
        wall_s=round(time.monotonic() - started, 1),
    )
    command = "python -m benchmarks.cluster_sim " + " ".join(sys.argv[1:] if argv is None else argv)
    written = _write(args.command, data.pop("body"), data, args.out, command)
    print(f"written: {written} and {written.with_suffix('.json')} ({data['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
