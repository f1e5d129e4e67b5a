"""Soak: a bounded run at about 70% of the measured capacity, resident memory sampled (issue 7,
item 4).

On the session tritonserver: first the capacity of a request mix (fraud_scorer records,
text_embedder texts, digits_reader PNGs, image_classifier_int8 JPEGs, weights in MIX) is measured
with a closed loop of CONCURRENCY clients; then requests are sent open-loop at SOAK_FRACTION of
it for KILN_SOAK_SECONDS (default 25; the 10-minute run in docs/operations.md set 600), while the
resident memory (RSS) of tritonserver and of every backend stub process is sampled each second.

Asserted: no request fails; every answer equals the first answer to the same input (so nothing
drifts or mixes up requests); the same processes serve at the end; and memory does not grow: the
total RSS at the end (median of the last window of samples) is at most GROWTH_BOUND_MIB MiB above
the total after warm-up (median of the first window), and no single process grows by more than
that. The figures are printed (`pytest -s`) and, with KILN_SOAK_REPORT=path, written as JSON.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import paths, tensors
from kiln.clients import Client, RetryPolicy
from kiln.server import TritonServer

psutil = pytest.importorskip("psutil", reason="the soak samples memory with psutil (the bench extra)")

DURATION_ENV = "KILN_SOAK_SECONDS"
REPORT_ENV = "KILN_SOAK_REPORT"
DEFAULT_SECONDS = 25.0
SECONDS = float(os.environ.get(DURATION_ENV, DEFAULT_SECONDS))
TIMEOUT_MARGIN_S = 300
"""Beyond the soak itself: the session server's start, the capacity phase, the drain."""

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SECONDS + TIMEOUT_MARGIN_S)]
SOAK_FRACTION = 0.7
CONCURRENCY = 4
CAPACITY_S = 5.0
WARMUP_FRACTION = 0.2
"""The first share of the soak is warm-up (arenas, caches); the baseline is taken after it."""
WINDOW_FRACTION = 0.15
"""Share of the soak each of the baseline and final windows covers (at least MIN_WINDOW samples)."""
MIN_WINDOW = 3
SAMPLE_S = 1.0
GROWTH_BOUND_MIB = 32.0
"""Largest accepted RSS growth from after warm-up to the end: all processes together, and each."""
MIB = 1 << 20
SENDERS = 8
"""Worker threads of the open loop (more than CONCURRENCY: a slow answer must not stall the rate)."""
MIX = {
    tensors.FRAUD_SCORER: 4,
    tensors.TEXT_EMBEDDER: 2,
    tensors.DIGITS_READER: 2,
    tensors.IMAGE_CLASSIFIER_INT8: 1,
}
TEXTS = (
    "reset my password",
    "the model server restarted and the client retried the request until it came back",
    "Größenänderung fehlgeschlagen: Zugriff verweigert",
    " ".join(["a longer paragraph about dynamic batching and queues"] * 12),
)
NO_RETRY = RetryPolicy.disabled()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def column(items: list[bytes]) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=object)
    array[:, 0] = items
    return array


@dataclass(frozen=True)
class Request:
    pipeline: str
    key: str
    inputs: dict[str, np.ndarray]
    output: str


def requests_mix(served: set[str]) -> list[Request]:
    """The requests of the mix, repeated by weight; pipelines the server does not serve left out."""
    rng = np.random.default_rng(0)
    stats = json.loads((paths.model_repository() / "fraud" / "1" / "features.json").read_text())
    variants: dict[str, list[tuple[dict[str, np.ndarray], str]]] = {
        tensors.FRAUD_SCORER: [
            ({tensors.RECORD: column([json.dumps(dict(zip(
                stats["features"],
                (m + s * z for m, s, z in zip(stats["mean"], stats["std"], rng.normal(size=len(stats["mean"])),
                                              strict=True)),
                strict=True,
            ))).encode()])}, tensors.SCORE)
            for _ in range(8)
        ],
        tensors.TEXT_EMBEDDER: [({tensors.TEXT: column([t.encode()])}, tensors.EMBEDDING) for t in TEXTS],
        tensors.DIGITS_READER: [
            ({tensors.IMAGE: column([png(rng.integers(0, 256, (8, 8), dtype=np.uint8))])}, tensors.SCORES)
            for _ in range(4)
        ],
        tensors.IMAGE_CLASSIFIER_INT8: [
            ({tensors.IMAGE: column([jpeg(rng.integers(0, 256, size, dtype=np.uint8))])}, tensors.SCORES)
            for size in ((96, 128, 3), (120, 80, 3))
        ],
    }
    mix = []
    for pipeline, weight in MIX.items():
        if pipeline not in served:
            continue
        for _ in range(weight):
            for i, (inputs, output) in enumerate(variants[pipeline]):
                mix.append(Request(pipeline, f"{pipeline}/{i}", inputs, output))
    return mix


class Answers:
    """The first answer to each input; later answers must equal it."""

    def __init__(self) -> None:
        self.first: dict[str, np.ndarray] = {}
        self.errors: list[str] = []
        self.sent = Counter[str]()
        self._lock = threading.Lock()

    def record(self, request: Request, result: np.ndarray | Exception) -> None:
        with self._lock:
            self.sent[request.pipeline] += 1
            if isinstance(result, Exception):
                self.errors.append(f"{request.key}: {type(result).__name__}: {result}")
                return
            first = self.first.setdefault(request.key, result)
            if first.shape != result.shape or not np.allclose(first, result, rtol=0, atol=1e-6):
                self.errors.append(f"{request.key}: the answer changed: {first} -> {result}")


def send(clients: list[Client], request: Request, answers: Answers, index: int) -> None:
    client = clients[index % len(clients)]
    try:
        result = client.infer(request.pipeline, request.inputs, [request.output])[request.output]
    except Exception as error:  # noqa: BLE001 - every failure is reported
        result = error
    answers.record(request, result)


def measure_capacity(clients: list[Client], mix: list[Request], answers: Answers) -> float:
    """Requests per second a closed loop of CONCURRENCY senders sustains on the mix."""
    stop = time.monotonic() + CAPACITY_S
    counts = [0] * CONCURRENCY

    def loop(worker: int) -> None:
        i = worker
        while time.monotonic() < stop:
            send(clients, mix[i % len(mix)], answers, worker)
            counts[worker] += 1
            i += CONCURRENCY

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(w,)) for w in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - started)


def processes(server: TritonServer) -> dict[str, int]:
    names = {"tritonserver": server.pid}
    for stub in server.backend_processes():
        assert stub.alive, stub.describe()
        names[stub.instance] = stub.pid
    return names


def rss(pids: dict[str, int]) -> dict[str, int]:
    return {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}


def window(samples: list[dict[str, int]], first: bool) -> dict[str, float]:
    size = max(MIN_WINDOW, round(len(samples) * WINDOW_FRACTION))
    chosen = samples[:size] if first else samples[-size:]
    return {name: float(np.median([s[name] for s in chosen])) for name in chosen[0]}


def open_loop(rate: float, seconds: float, job: Callable[[int], None], sample: Callable[[], None]) -> int:
    """Calls job(i) at `rate` per second for `seconds` (on SENDERS threads), sample() each second."""
    interval = 1.0 / rate
    started = time.monotonic()
    next_sample = started
    sent = 0
    with ThreadPoolExecutor(SENDERS) as pool:
        while (now := time.monotonic()) < started + seconds:
            if now >= next_sample:
                sample()
                next_sample += SAMPLE_S
            due = started + sent * interval
            if now >= due:
                pool.submit(job, sent)
                sent += 1
            else:
                time.sleep(min(due - now, max(0.0, next_sample - now)) or 0.001)
    sample()
    return sent


def rss_growth(
    samples: list[tuple[float, dict[str, int]]], seconds: float
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Each process's median RSS in the first and in the last window after warm-up, and its growth
    from one to the other in MiB."""
    after_warmup = [s for t, s in samples if t >= seconds * WARMUP_FRACTION]
    baseline, final = window(after_warmup, first=True), window(after_warmup, first=False)
    growth = {name: (final[name] - baseline[name]) / MIB for name in baseline}
    return baseline, final, growth


def write_report(report: dict, samples: list[tuple[float, dict[str, int]]], pids: dict[str, int]) -> None:
    """With KILN_SOAK_REPORT set: the report, plus every process's RSS samples, as JSON there."""
    if os.environ.get(REPORT_ENV):
        report["rss_mib_per_process"] = {
            name: [round(s[name] / MIB, 1) for _, s in samples] for name in pids
        }
        Path(os.environ[REPORT_ENV]).write_text(json.dumps(report, indent=2))


def test_soak_at_70_percent_of_capacity(server: TritonServer) -> None:
    seconds = SECONDS
    served = {name for name, state in server.models().items() if state == "READY"}
    mix = requests_mix(served)
    if not mix:
        pytest.skip(f"none of {', '.join(MIX)} is served (KILN_TEST_MODELS?)")
    np.random.default_rng(1).shuffle(mix)
    clients = [
        Client(f"http://{server.http_url}", retry=NO_RETRY),
        Client(f"grpc://{server.grpc_url}", retry=NO_RETRY),
    ]
    answers = Answers()
    try:
        capacity = measure_capacity(clients, mix, answers)
        rate = SOAK_FRACTION * capacity
        pids = processes(server)
        before = sum(answers.sent.values())
        before_by_pipeline = Counter(answers.sent)
        samples: list[tuple[float, dict[str, int]]] = []
        start = time.monotonic()
        sent = open_loop(
            rate, seconds,
            lambda i: send(clients, mix[i % len(mix)], answers, i),
            lambda: samples.append((time.monotonic() - start, rss(pids))),
        )
    finally:
        for client in clients:
            client.close()
    elapsed = time.monotonic() - start
    done = sum(answers.sent.values()) - before
    baseline, final, growth = rss_growth(samples, seconds)
    total_growth = sum(growth.values())
    report = {
        "seconds": round(elapsed, 1),
        "capacity_rps": round(capacity, 1),
        "rate_rps": round(rate, 1),
        "achieved_rps": round(done / elapsed, 1),
        "requests": done,
        "by_pipeline": dict(answers.sent - before_by_pipeline),
        "failures": len(answers.errors),
        "processes": len(pids),
        "rss_baseline_mib": round(sum(baseline.values()) / MIB, 1),
        "rss_final_mib": round(sum(final.values()) / MIB, 1),
        "rss_growth_mib": round(total_growth, 2),
        "largest_growth": max(growth.items(), key=lambda kv: kv[1]),
        "growth_bound_mib": GROWTH_BOUND_MIB,
        "samples": len(samples),
    }
    print("\nsoak: " + json.dumps(report))
    write_report(report, samples, pids)
    assert not answers.errors, f"{len(answers.errors)} failed: {answers.errors[:5]}"
    assert done == sent and done / elapsed >= 0.9 * rate, f"the server fell behind: {report}"
    assert processes(server) == pids, "a process was replaced during the soak"
    assert total_growth <= GROWTH_BOUND_MIB, report
    assert max(growth.values()) <= GROWTH_BOUND_MIB, growth
