"""The locust plumbing every suite shares: options, users, the load shape, the SLO listener.

Import it from a locustfile (it imports locust, which monkey-patches the process for gevent, and
makes gRPC gevent-compatible before any channel exists). It provides:

- Command-line options (`python -m locust -f loadtests/<suite>.py --help` lists them under
  "kiln"): `--model` (a served model of the suite's contract, e.g.
  image_classifier_int8), `--grpc-url`, `--load-shape`, `--slo-profile`, `--gate NAME=VALUE`,
  `--shape-users`, `--shape-seconds`, `--slo-report`, `--request-timeout`.
- `TritonHttpUser`: Triton's HTTP/REST API (KServe v2) with the binary tensor extension for
  BYTES inputs such as image files (JSON for texts and records), outputs in binary; sent by
  locust's FastHttpUser (geventhttpclient).
- `TritonGrpcUser`: Triton's gRPC API through `tritonclient.grpc`, each request reported to
  locust's statistics (`events.request.fire`) with its latency and exception.
- Both walk the request mix (`loadtests.inputs`) in a per-user shuffled order, and check every
  response's content (`loadtests.checks`); a wrong answer is that request's failure.
- `KilnShape`: the load shape (`loadtests.shapes`).
- The SLO listener: on quitting, measures the run's phase windows from every request's own
  record, applies the gates (`loadtests.slo`), prints each verdict (which gate missed and by how
  much), writes the JSON report, and sets the exit code: 0 when every gate is met, 1 otherwise.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from locust import FastHttpUser, LoadTestShape, User, constant, events, task
from locust.env import Environment

import grpc.experimental.gevent as grpc_gevent  # isort: skip

grpc_gevent.init_gevent()  # before any channel: gRPC's blocking calls must yield to gevent

import tritonclient.grpc as grpcclient  # noqa: E402

from loadtests import checks, inputs, shapes, slo, wire  # noqa: E402

log = logging.getLogger("kiln.loadtests")

REPORT_SUFFIX = "_slo.json"
"""The SLO report is written next to locust's CSV files: `<csv prefix>_slo.json`."""
SPAWN_SECONDS = 1.0
"""Users of a new phase are all started within this (locust's spawn rate = users / this)."""
GRPC_TRANSPORT = "gRPC"


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    group = parser.add_argument_group("kiln", "kiln load-test options (loadtests/common.py)")
    group.add_argument(
        "--model", default="", help="the pipeline to load-test (with a loadtest.py SLO, or an alias)"
    )
    group.add_argument("--grpc-url", default="", help="Triton's gRPC address host:port (for the gRPC user)")
    group.add_argument(
        "--load-shape", default="steady", choices=slo.SHAPES, help="steady, step (the knee) or spike"
    )
    group.add_argument(
        "--slo-profile", default="full", choices=slo.PROFILES,
        help="gates and load of the pipeline's loadtest.py (models/<folder>/; schema loadtests/slo.py)",
    )
    group.add_argument("--gate", action="append", default=[], help="override a gate: NAME=VALUE (repeatable)")
    group.add_argument(
        "--shape-users", default="", help="override the shape's users: N, N1,N2,... or BASE,PEAK"
    )
    group.add_argument("--shape-seconds", default="", help="override the shape's lengths (same layout)")
    group.add_argument(
        "--slo-report", default="", help=f"SLO report JSON (default: <csv prefix>{REPORT_SUFFIX})"
    )
    group.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request fails")


# --- per-process state ---------------------------------------------------------------------------


@dataclass
class Prepared:
    """What the users of one process share: the mix, its encoded requests, the checker."""

    model: str
    corpus: inputs.Corpus
    checker: checks.Checker
    mix: wire.EncodedMix


@dataclass
class Recorder:
    """Every request's completion time, latency and outcome (for the phase windows)."""

    times: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    ok: list[bool] = field(default_factory=list)

    def add(self, latency_ms: float, success: bool) -> None:
        """Records one request that completed now."""
        self.times.append(time.time())
        self.latencies.append(latency_ms)
        self.ok.append(success)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(times, latencies in ms, ok) as numpy arrays."""
        return np.asarray(self.times), np.asarray(self.latencies), np.asarray(self.ok, dtype=bool)


_STATE: dict[str, Prepared] = {}
RECORDER = Recorder()


def model_of(environment: Environment) -> str:
    """The served model this run targets: `--model` (required: one locustfile serves every
    pipeline)."""
    options = environment.parsed_options
    model = getattr(options, "model", "") if options is not None else ""
    if not model:
        raise ValueError(
            f"--model is required: the pipeline to load-test, one of {', '.join(slo.pipelines())} "
            f"(or {', '.join(slo.aliases())})"
        )
    return model


def prepare(model: str) -> Prepared:
    """Loads the mix for `model` and encodes its requests once (cached per process)."""
    if model in _STATE:
        return _STATE[model]
    slo.suite_of(model)  # fail early for a model no suite covers
    corpus = inputs.for_model(model)
    checker = checks.Checker.for_model(model)
    mix = wire.encode(corpus, [out.name for out in checker.contract.outputs], model)
    prepared = Prepared(model, corpus, checker, mix)
    _STATE[model] = prepared
    log.info("request mix: %s", corpus.summary())
    return prepared


class _MixWalker:
    """Each user sends the whole mix in its own shuffled order, again and again."""

    def __init__(self, count: int, seed: int) -> None:
        order = list(range(count))
        random.Random(seed).shuffle(order)
        self._cycle = itertools.cycle(order)

    def next(self) -> int:
        return next(self._cycle)


_USER_SEEDS = itertools.count()


# --- users ---------------------------------------------------------------------------------------


class TritonHttpUser(FastHttpUser):
    """Sends the mix to Triton's HTTP API (KServe v2, binary tensor extension); checks answers."""

    abstract = True
    wait_time = constant(0)

    def __init__(self, environment: Environment) -> None:
        options = environment.parsed_options
        if options is not None:  # read by FastHttpUser.__init__ when it makes the session
            self.network_timeout = options.request_timeout
        super().__init__(environment)

    def on_start(self) -> None:
        """Loads (once per process) the mix and this user's order."""
        self.model = model_of(self.environment)
        self.prepared = prepare(self.model)
        self.walker = _MixWalker(len(self.prepared.corpus.items), next(_USER_SEEDS))

    @task
    def infer(self) -> None:
        """One request: a mix item, its answer checked."""
        index = self.walker.next()
        item = self.prepared.corpus.items[index]
        mix = self.prepared.mix
        with self.client.post(
            mix.http_path,
            data=mix.http_bodies[index][0],
            headers=mix.http_headers(index),
            name=f"{self.model} [http]",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {wire.http_error(response.content)}")
                return
            try:
                outputs = wire.parse_http(
                    response.content, response.headers.get(wire.HEADER_LENGTH), mix.output_names
                )
                self.prepared.checker.check(item, outputs)
            except Exception as error:  # noqa: BLE001 - any malformed answer is this request's failure
                response.failure(f"{type(error).__name__}: {error}")


class TritonGrpcUser(User):
    """Sends the mix to Triton's gRPC API (tritonclient.grpc); reports each request to locust."""

    abstract = True
    wait_time = constant(0)

    def on_start(self) -> None:
        """Connects (one client per user) and loads the mix."""
        options = self.environment.parsed_options
        if not options.grpc_url:
            raise ValueError("the gRPC user needs --grpc-url host:port (Triton's gRPC endpoint)")
        self.model = model_of(self.environment)
        self.prepared = prepare(self.model)
        self.walker = _MixWalker(len(self.prepared.corpus.items), next(_USER_SEEDS))
        self.timeout = options.request_timeout
        self.client = grpcclient.InferenceServerClient(options.grpc_url)

    def on_stop(self) -> None:
        """Closes the channel."""
        self.client.close()

    @task
    def infer(self) -> None:
        """One request: a mix item, its answer checked, reported to locust's statistics."""
        index = self.walker.next()
        item = self.prepared.corpus.items[index]
        exception: Exception | None = None
        length = 0
        start = time.perf_counter()
        elapsed_ms: float | None = None
        try:
            mix = self.prepared.mix
            result = self.client.infer(
                self.model, mix.grpc_inputs[index], outputs=mix.grpc_outputs, client_timeout=self.timeout
            )
            elapsed_ms = (time.perf_counter() - start) * 1000
            outputs = wire.parse_grpc(result, mix.output_names)
            length = result.get_response().ByteSize()
            self.prepared.checker.check(item, outputs)
        except Exception as error:  # noqa: BLE001 - reported as this request's failure
            exception = error
        if elapsed_ms is None:
            elapsed_ms = (time.perf_counter() - start) * 1000
        self.environment.events.request.fire(
            request_type=GRPC_TRANSPORT,
            name=f"{self.model} [grpc]",
            response_time=elapsed_ms,
            response_length=length,
            exception=exception,
            context={},
        )


# --- the load shape ------------------------------------------------------------------------------


class KilnShape(LoadTestShape):
    """Plays the phases of `--load-shape` for the model's `loadtests.slo.Load`."""

    def __init__(self) -> None:
        super().__init__()
        self._plan: list[shapes.Phase] | None = None

    def plan(self) -> list[shapes.Phase]:
        """The phases of this run (from the options, once)."""
        if self._plan is None:
            assert self.runner is not None
            options = self.runner.environment.parsed_options
            self._plan = shapes.phases(
                options.load_shape,
                slo.load(model_of(self.runner.environment), options.slo_profile),
                shapes.parse_list(options.shape_users, int),
                shapes.parse_list(options.shape_seconds, float),
            )
        return self._plan

    def tick(self) -> tuple[int, float] | None:
        """(users, spawn rate) of the phase the run is in; None after the last phase."""
        elapsed = self.get_run_time()
        offset = 0.0
        for phase in self.plan():
            if elapsed < offset + phase.seconds:
                shapes.record_phase(phase, time.time())
                return phase.users, max(phase.users / SPAWN_SECONDS, 1.0)
            offset += phase.seconds
        shapes.record_phase(None, time.time())
        return None


# --- recording and the SLO listener --------------------------------------------------------------


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    try:
        slo.parse_overrides(options.gate)  # a bad --gate or a broken mix fails here, before any load
        prepare(model_of(environment))
    except Exception as error:
        log.error("cannot start the %s suite: %s: %s", model_of(environment), type(error).__name__, error)
        raise SystemExit(2) from error


@events.request.add_listener
def _on_request(response_time: float, exception: Exception | None, **_: Any) -> None:
    RECORDER.add(float(response_time), exception is None)


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    model = model_of(environment)
    report = slo_report(environment, model)
    print(format_report(report), file=sys.stderr, flush=True)
    target = options.slo_report or (f"{options.csv_prefix}{REPORT_SUFFIX}" if options.csv_prefix else "")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(report, indent=2) + "\n")
    environment.process_exit_code = 0 if report["passed"] else 1


def slo_report(environment: Environment, model: str) -> dict[str, Any]:
    """The run measured and held to its gates, as a JSON-ready dict."""
    options = environment.parsed_options
    gates = slo.gates(model, options.slo_profile, slo.parse_overrides(options.gate))
    load = slo.load(model, options.slo_profile)
    times, latencies, ok = RECORDER.arrays()
    timeline = list(shapes.TIMELINE)
    if timeline:
        start, end = timeline[0].start, timeline[-1].end
    else:
        start, end = (float(times.min()), float(times.max()) + 1e-3) if len(times) else (0.0, 0.0)
    overall = shapes.stats("whole run", 0, start, end + 1e-6, times, latencies, ok)
    windows = shapes.measure(timeline, load.settle_s, times, latencies, ok)
    evaluation = shapes.evaluate(options.load_shape, gates, windows, overall)
    prepared = _STATE.get(model)
    checker = prepared.checker if prepared else None
    stats = environment.stats.total
    return {
        "model": model,
        "suite": slo.suite_of(model),
        "profile": options.slo_profile,
        "gates": {name: getattr(gates, name) for name in slo.GATE_NAMES},
        "user_classes": sorted(c.__name__ for c in environment.user_classes),
        "requests": int(len(times)),
        "locust_requests": stats.num_requests,
        "locust_failures": stats.num_failures,
        "content_checks": {
            "passed": checker.passed if checker else 0,
            "failed": checker.failed if checker else 0,
        },
        "inputs": prepared.corpus.summary() if prepared else None,
        **evaluation.to_json(),
    }


def format_report(report: dict[str, Any]) -> str:
    """The report for people: the windows, the knee, each gate's verdict, the outcome."""
    lines = [
        f"SLO gates for {report['model']} (profile {report['profile']}, shape {report['shape']}, "
        f"users {', '.join(report['user_classes'])}):",
    ]
    for window in report["windows"]:
        lines.append("  " + _window_line(window))
    if report["shape"] == "step":
        knee = report["knee"]
        lines.append(
            f"  knee: {knee['rps']:.1f} req/s at {knee['users']} users (p99 {knee['p99_ms']:.1f} ms)"
            if knee
            else "  knee: none (no step met the p99 and failure-ratio gates)"
        )
    checks_ = report["content_checks"]
    lines.append(f"  content checks: {checks_['passed']} passed, {checks_['failed']} failed")
    for verdict in report["verdicts"]:
        lines.append("  " + verdict["text"])
    missed = [v for v in report["verdicts"] if not v["passed"]]
    if missed:
        shortfalls = [
            f"{slo.GATE_LABELS[v['gate']]} "
            + slo.Verdict(v["gate"], v["limit"], v["measured"], False).shortfall()
            for v in missed
        ]
        lines.append("SLO: MISS: " + "; ".join(shortfalls))
    else:
        lines.append("SLO: PASS (every gate met)")
    return "\n".join(lines)


def _window_line(window: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f} ms"

    ratio = window["failure_ratio"]
    return (
        f"{window['label']:<22} {window['users']:>4} users  {window['requests']:>6} requests  "
        f"{window['rps']:8.1f} req/s  p50 {ms(window['p50_ms'])}  p95 {ms(window['p95_ms'])}  "
        f"p99 {ms(window['p99_ms'])}  failures {'-' if ratio is None else f'{ratio:.3%}'}"
    )
