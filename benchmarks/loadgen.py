"""The benchmark's one load generator: closed-loop (fixed concurrency) and open-loop (fixed rate).

Every served system of the benchmark is driven by this code, with the same request mix
(`loadtests.inputs`), the same content checks (`loadtests.checks`) and the same accounting:

- One asyncio event loop in one process. Closed loop: `concurrency` workers, each sending its next
  request as soon as its last answer arrived. Open loop: requests start on a fixed schedule
  (`rate` per second), whatever the answers do; a request's latency counts from its scheduled
  start, so a generator or a server falling behind shows as latency (no coordinated omission).
- A warm-up (not measured), then a measured window: requests that *complete* inside it count;
  throughput is their number over the window's length, latency percentiles are theirs.
- Every answer is checked; a failed check is a failed request, never a throughput figure.
- The generator's CPU share (its process's CPU time over the window, as a share of the machine's
  CPUs) and, when it runs here, the server's (the process and its children) are measured over the
  same window: on 2 cores the generator competes with the server.

Targets: `TritonGrpc` (tritonclient.grpc.aio, one channel), `TritonHttp` and `BaselineHttp`
(aiohttp, one keep-alive connection per worker).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from kiln import tensors
from loadtests import checks, wire
from loadtests.inputs import Corpus

REQUEST_TIMEOUT_S = 120.0
ERRORS_KEPT = 5
"""Distinct error messages kept per measurement (the first ones)."""


class Target(Protocol):
    """A system the generator sends requests to."""

    name: str

    async def open(self, concurrency: int) -> None:
        """Connects (before the measurement)."""

    async def send(self, index: int) -> dict[str, np.ndarray]:
        """Sends mix item `index`; returns the outputs by tensor name (raises on failure)."""

    async def close(self) -> None:
        """Closes connections."""


class TritonGrpc:
    """Triton's gRPC API through `tritonclient.grpc.aio` (one channel, requests multiplexed)."""

    def __init__(self, url: str, mix: wire.EncodedMix) -> None:
        self.name = f"{mix.model} gRPC"
        self.url = url
        self.mix = mix
        self._client: Any = None

    async def open(self, concurrency: int) -> None:
        """Opens the channel."""
        import tritonclient.grpc.aio as grpc_aio

        self._client = grpc_aio.InferenceServerClient(self.url)

    async def send(self, index: int) -> dict[str, np.ndarray]:
        """One inference."""
        result = await self._client.infer(
            self.mix.model,
            self.mix.grpc_inputs[index],
            outputs=self.mix.grpc_outputs,
            client_timeout=REQUEST_TIMEOUT_S,
        )
        return wire.parse_grpc(result, self.mix.output_names)

    async def close(self) -> None:
        """Closes the channel."""
        if self._client is not None:
            await self._client.close()


class _AiohttpTarget:
    def __init__(self, url: str) -> None:
        self.base = url if url.startswith("http") else f"http://{url}"
        self._session: Any = None

    async def open(self, concurrency: int) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=max(concurrency, 1), force_close=False)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class TritonHttp(_AiohttpTarget):
    """Triton's HTTP/REST API (KServe v2, binary tensor extension), precomputed bodies."""

    def __init__(self, url: str, mix: wire.EncodedMix) -> None:
        super().__init__(url)
        self.name = f"{mix.model} HTTP"
        self.mix = mix

    async def send(self, index: int) -> dict[str, np.ndarray]:
        """One inference."""
        async with self._session.post(
            self.base + self.mix.http_path,
            data=self.mix.http_bodies[index][0],
            headers=self.mix.http_headers(index),
        ) as response:
            content = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {wire.http_error(content)}")
            return wire.parse_http(content, response.headers.get(wire.HEADER_LENGTH), self.mix.output_names)


class BaselineHttp(_AiohttpTarget):
    """The FastAPI baseline (`benchmarks.baseline_fastapi`): the image file as the body, JSON back,
    turned into the image_classifier contract's outputs so the same checks apply."""

    def __init__(self, url: str, corpus: Corpus, name: str = "FastAPI + PyTorch eager") -> None:
        super().__init__(url)
        self.name = name
        self.files = [item.inputs[tensors.IMAGE][0, 0] for item in corpus.items]

    async def send(self, index: int) -> dict[str, np.ndarray]:
        """One classification."""
        async with self._session.post(
            self.base + "/classify",
            data=self.files[index],
            headers={"Content-Type": "application/octet-stream"},
        ) as response:
            body = await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {body[:300]!r}")
        import json

        answer = json.loads(body)
        labels = np.empty((1, len(answer["labels"])), dtype=object)
        labels[0, :] = [label.encode("utf-8") for label in answer["labels"]]
        return {
            tensors.LABELS: labels,
            tensors.SCORES: np.asarray([answer["scores"]], dtype=np.float32),
            tensors.CLASS_INDICES: np.asarray([answer["class_indices"]], dtype=np.int64),
        }


@dataclass
class CpuProbe:
    """CPU time of this process and of other processes (with their children), between two marks."""

    pids: Sequence[int] = ()
    _start: tuple[float, float] | None = None

    def _times(self) -> tuple[float, float]:
        import psutil

        own = psutil.Process().cpu_times()
        mine = own.user + own.system
        others = 0.0
        for pid in self.pids:
            try:
                process = psutil.Process(pid)
                for proc in [process, *process.children(recursive=True)]:
                    try:
                        t = proc.cpu_times()
                        others += t.user + t.system
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
        return mine, others

    def start(self) -> None:
        """Marks the window's start."""
        self._start = self._times()

    def stop(self, wall_s: float) -> tuple[float, float | None]:
        """(own CPU share, others' CPU share or None) of the machine since `start`."""
        assert self._start is not None
        mine, others = self._times()
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        own_share = (mine - self._start[0]) / (wall_s * cpus)
        other_share = (others - self._start[1]) / (wall_s * cpus) if self.pids else None
        return own_share, other_share


@dataclass
class Run:
    """One measurement (one repeat of one cell).

    Attributes:
        throughput: Successful requests per second in the window.
        requests: Requests completed in the window.
        failures: Of those, failed ones (transport, server or content-check errors).
        p50_ms / p95_ms / p99_ms / mean_ms: Latency of the requests completed in the window.
        window_s: The window's length.
        generator_cpu: This generator's CPU share of the machine over the window.
        server_cpu: The server's CPU share, when its process is here; else None.
        offered_rate: Open loop only: the scheduled rate.
        errors: The first distinct error messages.
    """

    throughput: float
    requests: int
    failures: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    window_s: float
    generator_cpu: float | None
    server_cpu: float | None
    offered_rate: float | None = None
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


class _Book:
    """Completions of one measurement."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end
        self.latencies: list[float] = []
        self.failures = 0
        self.errors: list[str] = []

    def add(self, done: float, latency_s: float, error: str | None) -> None:
        if not self.start <= done < self.end:
            return
        self.latencies.append(latency_s * 1000)
        if error is not None:
            self.failures += 1
            if len(self.errors) < ERRORS_KEPT and error not in self.errors:
                self.errors.append(error)

    def result(self, generator_cpu: float | None, server_cpu: float | None, rate: float | None = None) -> Run:
        lat = np.asarray(self.latencies)
        count = len(lat)
        window = self.end - self.start

        def pct(q: float) -> float | None:
            return float(np.percentile(lat, q, method="higher")) if count else None

        return Run(
            throughput=(count - self.failures) / window,
            requests=count,
            failures=self.failures,
            p50_ms=pct(50),
            p95_ms=pct(95),
            p99_ms=pct(99),
            mean_ms=float(lat.mean()) if count else None,
            window_s=window,
            generator_cpu=generator_cpu,
            server_cpu=server_cpu,
            offered_rate=rate,
            errors=self.errors,
        )


async def _one(target: Target, index: int, corpus: Corpus, checker: checks.Checker) -> str | None:
    try:
        outputs = await target.send(index)
        checker.check(corpus.items[index], outputs)
    except Exception as error:  # noqa: BLE001 - a failed request, counted and reported
        return f"{type(error).__name__}: {str(error)[:300]}"
    return None


async def closed_loop(
    target: Target,
    corpus: Corpus,
    checker: checks.Checker,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    server_pids: Sequence[int] = (),
    seed: int = 0,
) -> Run:
    """`concurrency` workers, each with one request in flight, for warmup + duration seconds."""
    await target.open(concurrency)
    probe = CpuProbe(server_pids)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    book = _Book(begin + warmup_s, begin + warmup_s + duration_s)
    count = len(corpus.items)

    async def worker(number: int) -> None:
        order = list(range(count))
        random.Random(seed * 1000 + number).shuffle(order)
        for index in itertools.cycle(order):
            now = loop.time()
            if now >= book.end:
                return
            error = await _one(target, index, corpus, checker)
            done = loop.time()
            book.add(done, done - now, error)

    async def window() -> None:
        await asyncio.sleep(warmup_s)
        probe.start()
        await asyncio.sleep(duration_s)
        cpu.extend(probe.stop(duration_s))

    cpu: list[float | None] = []
    try:
        await asyncio.gather(window(), *(worker(i) for i in range(concurrency)))
    finally:
        await target.close()
    return book.result(cpu[0], cpu[1])


async def open_loop(
    target: Target,
    corpus: Corpus,
    checker: checks.Checker,
    rate: float,
    duration_s: float,
    warmup_s: float,
    server_pids: Sequence[int] = (),
    max_in_flight: int = 512,
    seed: int = 0,
) -> Run:
    """Requests started at `rate` per second (constant spacing) for warmup + duration seconds;
    latency counts from each request's scheduled start."""
    await target.open(max_in_flight)
    probe = CpuProbe(server_pids)
    loop = asyncio.get_running_loop()
    begin = loop.time()
    book = _Book(begin + warmup_s, begin + warmup_s + duration_s)
    order = list(range(len(corpus.items)))
    random.Random(seed).shuffle(order)
    indices = itertools.cycle(order)
    pending: set[asyncio.Task[None]] = set()

    async def request(index: int, scheduled: float) -> None:
        error = await _one(target, index, corpus, checker)
        done = loop.time()
        book.add(done, done - scheduled, error)

    async def window() -> None:
        await asyncio.sleep(warmup_s)
        probe.start()
        await asyncio.sleep(duration_s)
        cpu.extend(probe.stop(duration_s))

    cpu: list[float | None] = []
    clock = asyncio.ensure_future(window())
    try:
        for n in itertools.count():
            scheduled = begin + n / rate
            if scheduled >= book.end:
                break
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(pending) < max_in_flight:
                task = asyncio.ensure_future(request(next(indices), scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
            else:  # the server is this far behind: the request counts as failed at its start
                book.add(
                    loop.time(), loop.time() - scheduled, f"more than {max_in_flight} requests in flight"
                )
        await clock
        if pending:
            await asyncio.wait(pending, timeout=REQUEST_TIMEOUT_S)
    finally:
        await target.close()
    return book.result(cpu[0], cpu[1], rate)


async def warm_up(target: Target, corpus: Corpus, checker: checks.Checker) -> list[str]:
    """Sends every item of the mix once, one at a time, unmeasured (lazy initialisation, caches,
    connections); returns the errors (a system that fails here fails its cells too)."""
    await target.open(1)
    errors = []
    try:
        for index in range(len(corpus.items)):
            error = await _one(target, index, corpus, checker)
            if error is not None:
                errors.append(error)
    finally:
        await target.close()
    return errors


def run_warm_up(target: Target, corpus: Corpus, checker: checks.Checker) -> list[str]:
    """`warm_up` in a fresh event loop."""
    return asyncio.run(warm_up(target, corpus, checker))


def run_closed(
    target: Target,
    corpus: Corpus,
    checker: checks.Checker,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    server_pids: Sequence[int] = (),
    seed: int = 0,
) -> Run:
    """`closed_loop` in a fresh event loop."""
    return asyncio.run(
        closed_loop(target, corpus, checker, concurrency, duration_s, warmup_s, server_pids, seed)
    )


def run_open(
    target: Target,
    corpus: Corpus,
    checker: checks.Checker,
    rate: float,
    duration_s: float,
    warmup_s: float,
    server_pids: Sequence[int] = (),
    seed: int = 0,
) -> Run:
    """`open_loop` in a fresh event loop."""
    return asyncio.run(open_loop(target, corpus, checker, rate, duration_s, warmup_s, server_pids, seed=seed))
