"""perf_analyzer, Triton's own load generator, run and parsed: the benchmark's second opinion.

`perf_analyzer` ships in `tritonclient==2.51.0` (`.venv/bin/perf_analyzer`); it needs `libb64`
(Debian `libb64-0d`) and `libcudart.so.12`, whose folder (`nvidia-cuda-runtime-cu12`) `run()`
puts on `LD_LIBRARY_PATH`. It is a C++ generator: its figures for the Triton systems check the
Python generator's (`benchmarks.loadgen`), and for an ensemble it reports the server-side time of
every composing model (queue, compute input, compute infer, compute output), which is how the
benchmark shows what each Python step adds.

Input data comes from the benchmark's request mix: `input_file()` writes perf_analyzer's JSON
(files as base64 `b64`, texts and records as strings, numbers flattened with their shape).
"""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import struct
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BINARY_NAME = "perf_analyzer"
LENGTH_PREFIX = "<I"
"""A BYTES tensor's wire form: each element as a 4-byte little-endian length, then its bytes."""
_COMPOSING = re.compile(
    r"^\s*(?P<model>\S+), version: \S*\n(?P<body>(?:\s+.*\n?)*?)(?=^\s*\S+, version:|\Z|^\S)", re.M
)
_LATENCY = re.compile(
    r"Avg request latency: (?P<total>\d+) usec \(overhead (?P<overhead>\d+) usec \+ queue (?P<queue>\d+) usec"
    r" \+ (?:compute input (?P<input>\d+) usec \+ compute infer (?P<infer>\d+) usec \+ compute output "
    r"(?P<output>\d+) usec|compute (?P<compute>\d+) usec)\)"
)
_COUNTS = re.compile(r"Inference count: (?P<inferences>\d+)\s+Execution count: (?P<executions>\d+)")
_SEND_RATE = re.compile(r"Avg send request rate: ([\d.]+) infer/sec")
_DELAYED = re.compile(
    r"not able to keep up with the desired request rate\. ([\d.]+)% of the requests were delayed"
)


def binary() -> Path:
    """The perf_analyzer next to this Python.

    Raises:
        FileNotFoundError: not installed (tritonclient 2.51.0's manylinux wheel ships it).
    """
    path = Path(sys.executable).parent / BINARY_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: install tritonclient==2.51.0 (its manylinux wheel ships perf_analyzer)"
        )
    return path


def environment() -> dict[str, str]:
    """The environment perf_analyzer needs: libcudart's folder on LD_LIBRARY_PATH."""
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # type: ignore[import-not-found]

        lib = Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(lib), *([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])]
        )
    except ImportError:
        pass
    return env


def _entry(array: np.ndarray) -> dict[str, Any]:
    """One input of one request (batch dim removed) in perf_analyzer's JSON."""
    item = array[0]
    if array.dtype == object:
        values = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in np.asarray(item).reshape(-1)]
        try:
            return {"content": [v.decode("utf-8") for v in values], "shape": list(item.shape)}
        except UnicodeDecodeError:  # files: base64 of the serialized tensor (length-prefixed elements)
            wire = b"".join(struct.pack(LENGTH_PREFIX, len(v)) + v for v in values)
            return {"b64": base64.b64encode(wire).decode("ascii"), "shape": list(item.shape)}
    return {"content": np.asarray(item).reshape(-1).tolist(), "shape": list(item.shape)}


def input_file(requests: Sequence[Mapping[str, np.ndarray]], path: Path) -> Path:
    """Writes perf_analyzer's `--input-data` JSON: one entry per request (tensor -> batch-1 array)."""
    data = [{name: _entry(np.asarray(array)) for name, array in request.items()} for request in requests]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))
    return path


@dataclass
class StepTime:
    """Server-side average time of one model per request, in microseconds."""

    model: str
    total_us: float
    queue_us: float
    compute_input_us: float | None
    compute_infer_us: float | None
    compute_output_us: float | None
    overhead_us: float
    inferences: int | None = None
    executions: int | None = None

    @property
    def average_batch(self) -> float | None:
        """Requests per execution: the dynamic batcher's average batch size."""
        return self.inferences / self.executions if self.inferences and self.executions else None


@dataclass
class PerfResult:
    """One perf_analyzer measurement.

    Attributes:
        model: The model measured.
        mode: "concurrency" or "rate".
        level: The concurrency or the request rate.
        throughput: Inferences per second.
        p50_ms / p90_ms / p95_ms / p99_ms: Client-side latency.
        server: The server-side time of the model itself.
        composing: For an ensemble, each composing model's server-side time.
        generator_cpu: perf_analyzer's CPU share of the machine over its run.
        send_rate: Rate mode: the rate perf_analyzer actually sent at (its "Avg send request rate",
            which perf_analyzer 2.51 prints only when it fell behind); None when not printed.
        delayed_share: Rate mode: the share of requests perf_analyzer itself sent late (its warning
            "not able to keep up with the desired request rate"); 0.0 without the warning.
        wall_s: How long it ran.
        command: Its command line.
        error: Why there is no figure, when there is none.
    """

    model: str
    mode: str
    level: float
    throughput: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    server: StepTime | None = None
    composing: list[StepTime] = field(default_factory=list)
    generator_cpu: float | None = None
    send_rate: float | None = None
    delayed_share: float | None = None
    wall_s: float = 0.0
    command: list[str] = field(default_factory=list)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def _step_time(model: str, text: str) -> StepTime | None:
    match = _LATENCY.search(text)
    if match is None:
        return None
    g = {k: (float(v) if v is not None else None) for k, v in match.groupdict().items()}
    counts = _COUNTS.search(text)
    return StepTime(
        model=model,
        total_us=g["total"] or 0.0,
        queue_us=g["queue"] or 0.0,
        compute_input_us=g["input"],
        compute_infer_us=g["infer"] if g["infer"] is not None else g["compute"],
        compute_output_us=g["output"],
        overhead_us=g["overhead"] or 0.0,
        inferences=int(counts["inferences"]) if counts else None,
        executions=int(counts["executions"]) if counts else None,
    )


def parse_output(model: str, text: str, result: PerfResult) -> None:
    """Fills `result` from perf_analyzer's stdout (its last measurement block)."""
    measurements = text.split("Inferences/Second vs. Client")[0]
    blocks = re.split(r"^(?:Request concurrency|Request Rate): .*$", measurements, flags=re.M)[1:]
    complete = [b for b in blocks if "Throughput:" in b]
    if not complete:
        return
    block = complete[-1]
    throughput = re.search(r"Throughput: ([\d.]+) infer/sec", block)
    result.throughput = float(throughput.group(1)) if throughput else None
    if result.mode == "rate":
        send_rate = _SEND_RATE.search(block)
        result.send_rate = float(send_rate.group(1)) if send_rate else None
        delayed = _DELAYED.search(block)
        result.delayed_share = float(delayed.group(1)) / 100 if delayed else 0.0
    for q in (50, 90, 95, 99):
        found = re.search(rf"p{q} latency: (\d+) usec", block)
        if found:
            setattr(result, f"p{q}_ms", int(found.group(1)) / 1000)
    server, _, composing = block.partition("Composing models:")
    server_part = server.split("Server:", 1)[1] if "Server:" in server else ""
    result.server = _step_time(model, server_part)
    for match in _COMPOSING.finditer(composing):
        step = _step_time(match.group("model"), match.group("body"))
        if step is not None:
            result.composing.append(step)


def run(
    model: str,
    grpc_url: str,
    input_data: Path | str,
    *,
    concurrency: int | None = None,
    rate: float | None = None,
    measurement_ms: int = 2000,
    max_trials: int = 4,
    stability: float = 100.0,
    timeout_s: float = 240.0,
) -> PerfResult:
    """One perf_analyzer measurement at one concurrency (sync mode) or one request rate (async
    mode, so requests start on schedule), over gRPC, with the given input data.

    perf_analyzer repeats its window until the last three agree on throughput and average
    latency within `stability` percent (its p99 on a shared 2-core machine rarely does), at most
    `max_trials` times; it then reports the last three windows' figures, p99 included."""
    if (concurrency is None) == (rate is None):
        raise ValueError("give exactly one of concurrency and rate")
    command = [
        str(binary()), "-m", model, "-u", grpc_url, "-i", "grpc",
        "--input-data", str(input_data),
        "-p", str(measurement_ms), "--max-trials", str(max_trials), "-s", str(stability),
    ]  # fmt: skip
    if concurrency is not None:
        command += ["--concurrency-range", str(concurrency)]
        result = PerfResult(model, "concurrency", concurrency, command=command)
    else:
        command += ["--request-rate-range", f"{rate:g}", "--async"]
        result = PerfResult(model, "rate", float(rate or 0), command=command)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=environment()
        )
        output = completed.stdout + completed.stderr
        returncode: int | None = completed.returncode
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() if isinstance(error.stdout, bytes) else (error.stdout or "")
        returncode = None
    result.wall_s = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.generator_cpu = used / (result.wall_s * cpus) if result.wall_s > 0 else None
    parse_output(model, output, result)
    if result.throughput is None:
        reason = "timed out" if returncode is None else f"exit status {returncode}"
        lines = [line for line in output.splitlines() if line.strip()]
        result.error = f"no measurement ({reason}): " + " | ".join(lines[-3:])
    return result
