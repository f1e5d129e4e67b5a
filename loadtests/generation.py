"""The generation load generator: Poisson arrivals of streamed generation requests, vLLM-style figures
and SLO gates (`python -m loadtests.generation`; `make loadtest` runs it as the generation suite).

locust measures a request as one latency; a streamed generation has a time to its first token, a
pace of tokens after it and a length, so this generator is its own (asyncio, one process):

- **Arrivals.** Open loop (`run_open`): request i arrives at a_i, the seeded Poisson schedule
  (`poisson_schedule`: exponential gaps of mean 1/rate, the first arrival at 0), whatever the
  server does; a request the generator sends late still counts from a_i (no coordinated
  omission). Closed loop (`run_closed`, the benchmark's): `concurrency` workers, each sending its
  next request when its last one finished; a_i is then the send time.
- **The mix** (`Workload`, `plan`): prompts cut from Python's own documentation
  (`pydoc_data.topics`, the topics the tinylm build holds out for evaluation, `prompt_topics`:
  fixed offline text, the same on every machine): `prompts` distinct prompts, each the first k
  words of a paragraph with k uniform on `prompt_words`, every request drawing one of them
  uniformly; the output length asked through `max_tokens`, uniform on `max_tokens` (a sequence may
  end earlier at the end-of-sequence token: the figures use the tokens actually generated);
  temperature 0 (greedy) by default, or seeded sampling (each request's seed derived from the
  workload's).
- **Transports.** gRPC streaming (`GrpcStream`: `tritonclient.grpc.aio` `stream_infer`, one
  stream per request, `stream` true: one response per text delta) or Triton's HTTP
  `generate_stream` server-sent events (`HttpSse`, aiohttp).

Per request it records (`RequestRecord`): a_i, the send time, every response carrying generated
text with its receive time and its cumulative `completion_tokens` (the server's count), the end,
the prompt and output token counts, the finish reason and any error. The figures
(`summarize`), with the definitions of vLLM's `benchmark_serving.py`:

- **TTFT** (time to first token) = t_first - a_i, where t_first is when the request's first
  streamed response arrives at the client. kiln_generate sends a response only when a token added
  visible text (a token ending inside a UTF-8 character, or text that may start a stop string, is
  held back and goes out with the next one) or the sequence ended, so t_first is the receipt of
  the first non-empty delta, or of the final response when there is none.
- **E2E** (end-to-end latency) = t_end - a_i, t_end the receipt of the final response (the one
  with a finish reason).
- **TPOT** (time per output token) = (E2E - TTFT) / (N - 1), N the output tokens (the final
  response's `completion_tokens`); requests with N = 1 have none.
- **ITL** (inter-token latency) = the gaps between consecutive responses of one request, one
  sample per gap, over all requests. A response carrying k > 1 tokens is one delivery (one gap):
  ITL is what a reader of the stream sees; `multi_token_share` says how many deliveries carried
  more than one token.
- **Duration** D = the last t_end - the first a_i of the measured requests. **Request
  throughput** = successful requests / D; **output tokens/s** = their output tokens / D;
  **goodput** = successful requests with TTFT <= the TTFT SLO and TPOT <= the TPOT SLO (N = 1:
  the TTFT SLO alone) / D.
- Medians, p95 and p99 are numpy percentiles with method "higher" (an observed value, as in
  `benchmarks/loadgen.py`).

A request fails on a transport or server error, no final response within `REQUEST_TIMEOUT_S`, a
finish reason other than "stop" or "length", or an answer that breaks the contract
(`check_record`: more tokens than `max_tokens`, "length" before `max_tokens`, token counts that
go backwards). Greedy requests of one prompt should agree (`consistency`: the shorter text is a
prefix of the longer whatever batch each joined; a text cut by `max_tokens` inside a UTF-8
character ends in U+FFFD, which is not held against it); disagreements are reported with where
the texts part, not gated: batches of different shapes sum in different orders, and a near tie
between two tokens could then go either way.

SLO gates (`GenerationGates`, profiles `full` and `smoke` in `SUITES`, loadtests/slo.py's style):
p95 TTFT, p95 ITL, output tokens/s, failure ratio; `--gate NAME=VALUE` overrides one.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import itertools
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln import tensors
from loadtests import slo as slo_gates

REQUEST_TIMEOUT_S = 120.0
"""A request with no final response this long after it was sent fails."""
PROMPT_TOPICS = slice(3, None, 4)
"""Which of `pydoc_data.topics`' topics (sorted by name) the prompts come from when the tinylm
build's held-out topics cannot be had (`prompt_topics`): every fourth, from the fourth."""
PERCENTILES = (50, 95, 99)
FIGURES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
SPIN_S = 0.002
"""The open loop wakes this long before an arrival and yields until it (`wait_until`)."""
FINISHED_OK = ("stop", "length")
"""Finish reasons of a request that succeeded."""


# --- the workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """What a run sends (all seeded: the same workload is the same list of requests everywhere).

    Attributes:
        rate: Mean arrivals per second of the open loop (Poisson); ignored by the closed loop.
        requests: How many requests (the open loop's whole run; the closed loop cycles them).
        prompt_words: (lowest, highest) words of a prompt, uniform.
        max_tokens: (lowest, highest) output tokens asked (`max_tokens`), uniform.
        temperature: 0 is greedy; above it, seeded sampling (`top_p`, each request's seed).
        top_p: Nucleus sampling's mass when sampling.
        seed: Seeds the schedule, the prompts, the lengths and the requests' samplers.
        prompts: Distinct prompts the requests draw from (uniformly): a prompt asked again (with
            another `max_tokens`) must get the same greedy text, whatever batch it joined.
    """

    rate: float
    requests: int
    prompt_words: tuple[int, int] = (8, 48)
    max_tokens: tuple[int, int] = (16, 128)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    prompts: int = 32

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.prompts < 1:
            raise ValueError(f"prompts must be >= 1, got {self.prompts}")
        for name in ("prompt_words", "max_tokens"):
            low, high = getattr(self, name)
            if not 1 <= low <= high:
                raise ValueError(f"{name} must be (low, high) with 1 <= low <= high, got {(low, high)}")


@dataclass(frozen=True)
class PlannedRequest:
    """One request of a workload."""

    index: int
    arrival: float
    """Seconds after the run's start (the Poisson schedule; 0 for every request of a closed loop)."""
    prompt: str
    prompt_id: int
    """Which of the workload's distinct prompts this is."""
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


def poisson_schedule(rate: float, count: int, seed: int) -> list[float]:
    """`count` arrival times (seconds from the start) of a Poisson process of `rate` per second:
    the first at 0, then exponential gaps of mean 1/rate drawn from a generator seeded `seed`."""
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a finite number > 0, got {rate}")
    if count < 1:
        return []
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


@functools.cache
def prompt_topics() -> tuple[tuple[str, ...], str]:
    """The documentation topics the prompts come from, and where that choice comes from: the topics
    the tinylm build holds out for evaluation (its seeded split, `split_topics` of its build
    module), or, where that module cannot be imported, `PROMPT_TOPICS` of all topics."""
    import pydoc_data.topics

    try:
        from kiln import registry

        build, spec = registry.module_of("tinylm", "build"), registry.module_of("tinylm", "spec")
        held_out = tuple(build.split_topics(spec.SOURCE).evaluation)  # type: ignore[union-attr]
        if held_out and all(name in pydoc_data.topics.topics for name in held_out):
            return held_out, "the tinylm build's held-out evaluation topics"
    except Exception:  # noqa: BLE001 - no model folder, no build dependencies: the fixed rule
        pass
    return tuple(sorted(pydoc_data.topics.topics)[PROMPT_TOPICS]), "every fourth topic by name"


def prompt_paragraphs() -> list[str]:
    """The prompts' source: the paragraphs (blank-line separated, at least 8 words, no grammar
    blocks) of the `prompt_topics`, in a fixed order."""
    import pydoc_data.topics

    paragraphs = []
    for name in prompt_topics()[0]:
        for block in pydoc_data.topics.topics[name].split("\n\n"):
            words = block.split()
            if len(words) >= 8 and "::=" not in block and not block.startswith((" ", "*", "=")):
                paragraphs.append(" ".join(words))
    return paragraphs


def plan(workload: Workload, paragraphs: Sequence[str] | None = None) -> list[PlannedRequest]:
    """The workload's requests, in arrival order (see the module doc): a set of `workload.prompts`
    distinct prompts is cut first, then each request draws one of them and its `max_tokens`."""
    paragraphs = list(paragraphs) if paragraphs is not None else prompt_paragraphs()
    if not paragraphs:
        raise ValueError("no prompt text")
    arrivals = poisson_schedule(workload.rate, workload.requests, workload.seed)
    rng = random.Random(workload.seed)
    prompts = []
    for _ in range(workload.prompts):
        start = rng.randrange(len(paragraphs))
        words = rng.randint(*workload.prompt_words)
        text: list[str] = []
        for offset in itertools.count():  # a short paragraph continues into the next
            text += paragraphs[(start + offset) % len(paragraphs)].split()
            if len(text) >= words:
                break
        prompts.append(" ".join(text[:words]))
    out = []
    for index, arrival in enumerate(arrivals):
        prompt_id = rng.randrange(len(prompts))
        out.append(
            PlannedRequest(
                index=index,
                arrival=arrival,
                prompt=prompts[prompt_id],
                prompt_id=prompt_id,
                max_tokens=rng.randint(*workload.max_tokens),
                temperature=workload.temperature,
                top_p=workload.top_p,
                seed=None if workload.temperature == 0 else workload.seed * 1_000_003 + index,
            )
        )
    return out


# --- what a request did -------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """What the client saw of one request (times in seconds on the generator's monotonic clock)."""

    index: int
    arrival: float
    max_tokens: int
    prompt_id: int = -1
    greedy: bool = True
    sent: float | None = None
    deliveries: list[tuple[float, int]] = field(default_factory=list)
    """(receive time, cumulative completion_tokens) of each response carrying generated tokens."""
    end: float | None = None
    prompt_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.finish_reason in FINISHED_OK

    @property
    def ttft(self) -> float | None:
        return self.deliveries[0][0] - self.arrival if self.deliveries else None

    @property
    def e2e(self) -> float | None:
        return None if self.end is None else self.end - self.arrival

    @property
    def tpot(self) -> float | None:
        """(E2E - TTFT) / (N - 1); None for N < 2."""
        if self.output_tokens < 2 or self.ttft is None or self.e2e is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def itls(self) -> list[float]:
        """Gaps between consecutive deliveries."""
        times = [t for t, _ in self.deliveries]
        return [b - a for a, b in zip(times, times[1:], strict=False)]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_record(record: RequestRecord) -> str | None:
    """What breaks the contract in a finished request's answer (None: nothing)."""
    if record.end is None:
        return "no final response"
    if record.finish_reason not in FINISHED_OK:
        return f"finish_reason {record.finish_reason!r} (expected one of {', '.join(FINISHED_OK)})"
    if record.output_tokens > record.max_tokens:
        return f"{record.output_tokens} tokens generated, more than max_tokens {record.max_tokens}"
    if record.finish_reason == "length" and record.output_tokens != record.max_tokens:
        return f"finish_reason 'length' after {record.output_tokens} of max_tokens {record.max_tokens} tokens"
    counts = [n for _, n in record.deliveries]
    if any(b <= a for a, b in zip(counts, counts[1:], strict=False)):
        return f"completion_tokens did not grow from one response to the next: {counts}"
    if counts and counts[-1] != record.output_tokens:
        return f"the last response says {counts[-1]} tokens, the final {record.output_tokens}"
    if record.output_tokens < 1:
        return "no token generated"
    return None


def consistency(records: Sequence[RequestRecord]) -> tuple[int, list[str]]:
    """Greedy requests of the same prompt must agree whatever batch each joined: each text is a
    prefix of the longest one of its prompt (the others stopped earlier). Returns (requests
    compared with the longest, the disagreements)."""
    by_prompt: dict[int, list[RequestRecord]] = {}
    for record in records:
        if record.ok and record.greedy:
            by_prompt.setdefault(record.prompt_id, []).append(record)
    compared, problems = 0, []
    for group in by_prompt.values():
        longest = max(group, key=lambda r: (len(r.text), -r.index))
        for other in group:
            if other is longest:
                continue
            compared += 1
            # A text cut by max_tokens inside a UTF-8 character ends with U+FFFD where the longer
            # one goes on with the whole character: that end is not a disagreement.
            text = other.text.rstrip("\ufffd") if other.finish_reason == "length" else other.text
            if not longest.text.startswith(text):
                at = next(i for i, (a, b) in enumerate(zip(text, longest.text, strict=False)) if a != b)
                problems.append(
                    f"requests {other.index} and {longest.index} (same prompt, greedy) differ from character "
                    f"{at} of {len(text)}: {text[at : at + 20]!r} vs {longest.text[at : at + 20]!r}"
                )
    return compared, problems


# --- the figures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GoodputSLO:
    """The per-request service level goodput counts against."""

    ttft_ms: float
    tpot_ms: float

    def met(self, record: RequestRecord) -> bool:
        if not record.ok or record.ttft is None or record.ttft * 1e3 > self.ttft_ms:
            return False
        tpot = record.tpot
        return tpot is None or tpot * 1e3 <= self.tpot_ms


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """mean, p50, p95, p99 (method "higher") of `values`; None each when there are none."""
    if not len(values):
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        **{f"p{q}": float(np.percentile(array, q, method="higher")) for q in PERCENTILES},
    }


def summarize(records: Sequence[RequestRecord], slo: GoodputSLO | None = None) -> dict[str, Any]:
    """The run's figures (see the module doc for each definition); latencies in milliseconds."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    ends = [r.end for r in ok if r.end is not None]
    duration = (max(ends) - min(r.arrival for r in records)) if ends else None
    tokens = sum(r.output_tokens for r in ok)
    itl = [gap for r in ok for gap in r.itls()]
    deliveries = [n for r in ok for n in _tokens_per_delivery(r)]
    good = sum(1 for r in ok if slo.met(r)) if slo else None
    pairs, mismatches = consistency(records)

    def per_s(count: float | None) -> float | None:
        return None if count is None or not duration else count / duration

    out: dict[str, Any] = {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(failed),
        "failure_ratio": len(failed) / len(records) if records else None,
        "errors": _first_errors(failed),
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "output_tokens": tokens,
        "output_tokens_per_s": per_s(tokens),
        "prompt_tokens_mean": float(np.mean([r.prompt_tokens for r in ok])) if ok else None,
        "output_tokens_mean": float(np.mean([r.output_tokens for r in ok])) if ok else None,
        "finish_reasons": _count(r.finish_reason or "none" for r in records),
        "goodput": per_s(good),
        "good_requests": good,
        "slo": dataclasses.asdict(slo) if slo else None,
        "multi_token_share": (sum(1 for n in deliveries if n > 1) / len(deliveries)) if deliveries else None,
        "consistency_pairs": pairs,
        "consistency_mismatches": mismatches[:5],
        "consistency_failures": len(mismatches),
        "ttft_ms": percentiles([r.ttft * 1e3 for r in ok if r.ttft is not None]),
        "tpot_ms": percentiles([t * 1e3 for r in ok if (t := r.tpot) is not None]),
        "itl_ms": percentiles([gap * 1e3 for gap in itl]),
        "e2e_ms": percentiles([r.e2e * 1e3 for r in ok if r.e2e is not None]),
        "late_sends_ms": percentiles([(r.sent - r.arrival) * 1e3 for r in records if r.sent is not None]),
    }
    return out


def tokens_in_window(records: Sequence[RequestRecord], start: float, end: float) -> int:
    """Output tokens delivered between `start` and `end` (by each delivery's receive time and
    the tokens it added): the closed loop's throughput over a window."""
    total = 0
    for record in records:
        before = 0
        for at, count in record.deliveries:
            if start <= at < end:
                total += count - before
            before = count
    return total


def _tokens_per_delivery(record: RequestRecord) -> list[int]:
    counts = [n for _, n in record.deliveries]
    return [b - a for a, b in zip([0, *counts], counts, strict=False)]


def _first_errors(failed: Sequence[RequestRecord], keep: int = 5) -> list[str]:
    seen: list[str] = []
    for record in failed:
        message = record.error or f"finish_reason {record.finish_reason!r}"
        if message not in seen:
            seen.append(message)
        if len(seen) >= keep:
            break
    return seen


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


# --- transports ---------------------------------------------------------------------------------


class Target(Protocol):
    """A server the generator streams from."""

    name: str

    async def open(self) -> None: ...

    async def generate(self, request: PlannedRequest, record: RequestRecord) -> None:
        """Sends `request`, fills `record` as responses arrive (raises on a transport error)."""

    async def close(self) -> None: ...


class GrpcStream:
    """Triton's gRPC streaming API (`tritonclient.grpc.aio`, one channel, one stream per request)."""

    def __init__(self, url: str, model: str = tensors.TEXT_GENERATOR) -> None:
        self.name = f"{model} gRPC stream"
        self.url = url
        self.model = model
        self._client: Any = None

    async def open(self) -> None:
        import tritonclient.grpc.aio as grpc_aio

        self._client = grpc_aio.InferenceServerClient(self.url)

    def _inputs(self, request: PlannedRequest) -> list[Any]:
        import tritonclient.grpc as grpcclient

        def tensor(name: str, value: Any, dtype: str, numpy_dtype: Any) -> Any:
            array = np.array([value], dtype=numpy_dtype)
            item = grpcclient.InferInput(name, [1], dtype)
            item.set_data_from_numpy(array)
            return item

        inputs = [
            tensor(tensors.TEXT_INPUT, request.prompt.encode("utf-8"), "BYTES", np.object_),
            tensor(tensors.MAX_TOKENS, request.max_tokens, "INT32", np.int32),
            tensor(tensors.TEMPERATURE, request.temperature, "FP32", np.float32),
            tensor(tensors.STREAM, True, "BOOL", np.bool_),
        ]
        if request.seed is not None:
            inputs.append(tensor(tensors.SEED, request.seed, "INT64", np.int64))
            inputs.append(tensor(tensors.TOP_P, request.top_p, "FP32", np.float32))
        return inputs

    async def generate(self, request: PlannedRequest, record: RequestRecord) -> None:
        finished = asyncio.Event()
        message = {
            "model_name": self.model,
            "inputs": self._inputs(request),
            "request_id": str(request.index),
        }

        async def requests() -> Any:
            yield message
            await finished.wait()  # the stream stays open until the final response

        loop = asyncio.get_running_loop()
        record.sent = loop.time()
        stream = self._client.stream_infer(requests(), stream_timeout=REQUEST_TIMEOUT_S)
        completed = False
        try:
            async for result, error in stream:
                now = loop.time()
                if error is not None:
                    record.error = f"server error: {error}"
                    break
                reason = _text(result.as_numpy(tensors.FINISH_REASON))
                count = int(result.as_numpy(tensors.COMPLETION_TOKENS).reshape(-1)[0])
                _delivered(record, now, _text(result.as_numpy(tensors.TEXT_OUTPUT)), count, reason)
                record.prompt_tokens = int(result.as_numpy(tensors.PROMPT_TOKENS).reshape(-1)[0])
                final = result.get_response().parameters.get("triton_final_response")
                if reason or (final is not None and final.bool_param):
                    break
            # Half-close and read the stream to its end. Cancelling a finished stream instead made
            # tritonserver 2.51 wait its whole exit timeout (30 s) at shutdown.
            finished.set()
            async for _ in stream:
                pass
            completed = True
        finally:
            finished.set()
            if not completed:
                stream.cancel()

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class HttpSse:
    """Triton's HTTP `generate_stream` endpoint: one server-sent event per response (aiohttp)."""

    def __init__(self, url: str, model: str = tensors.TEXT_GENERATOR) -> None:
        self.name = f"{model} HTTP generate_stream"
        self.url = f"http://{url}/v2/models/{model}/generate_stream"
        self._session: Any = None

    async def open(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            connector=aiohttp.TCPConnector(limit=0),
        )

    async def generate(self, request: PlannedRequest, record: RequestRecord) -> None:
        body: dict[str, Any] = {
            tensors.TEXT_INPUT: request.prompt,
            tensors.MAX_TOKENS: request.max_tokens,
            tensors.TEMPERATURE: request.temperature,
            tensors.STREAM: True,
        }
        if request.seed is not None:
            body[tensors.SEED] = request.seed
            body[tensors.TOP_P] = request.top_p
        loop = asyncio.get_running_loop()
        record.sent = loop.time()
        async with self._session.post(self.url, json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return
            async for raw in response.content:
                now = loop.time()
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    record.error = f"server error: {event['error']}"
                    return
                reason = event.get(tensors.FINISH_REASON) or ""
                count = int(event[tensors.COMPLETION_TOKENS])
                _delivered(record, now, event.get(tensors.TEXT_OUTPUT) or "", count, reason)
                record.prompt_tokens = int(event[tensors.PROMPT_TOKENS])
                if reason:
                    return

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def _text(array: Any) -> str:
    if array is None:
        return ""
    value = np.asarray(array).reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _delivered(record: RequestRecord, now: float, delta: str, count: int, reason: str) -> None:
    if count > (record.deliveries[-1][1] if record.deliveries else 0):
        record.deliveries.append((now, count))
    record.text += delta
    record.output_tokens = count
    if reason:
        record.finish_reason = reason
        record.end = now


TRANSPORTS = {"grpc": GrpcStream, "http": HttpSse}


# --- the loops ------------------------------------------------------------------------------------


async def send(target: Target, request: PlannedRequest, record: RequestRecord) -> None:
    """Sends one request and fills its record; a failure is recorded, never raised."""
    try:
        await asyncio.wait_for(target.generate(request, record), REQUEST_TIMEOUT_S)
    except asyncio.TimeoutError:
        record.error = f"no final response within {REQUEST_TIMEOUT_S:.0f} s"
    except Exception as error:  # noqa: BLE001 - the request's failure, recorded
        record.error = f"{type(error).__name__}: {error}"
    if record.error is None:
        record.error = check_record(record)


def record_for(request: PlannedRequest, arrival: float) -> RequestRecord:
    """The empty record of `request` arriving at `arrival` (the loop's clock)."""
    return RequestRecord(
        index=request.index,
        arrival=arrival,
        max_tokens=request.max_tokens,
        prompt_id=request.prompt_id,
        greedy=request.temperature == 0,
    )


async def wait_until(loop: asyncio.AbstractEventLoop, when: float) -> None:
    """Sleeps until the loop's clock reads `when`: a timer sleep to `SPIN_S` before it, then yields
    to the other tasks until it is time (the timer alone woke about a millisecond late, which the
    latencies, counted from the scheduled arrival, would carry)."""
    delay = when - loop.time()
    if delay > SPIN_S:
        await asyncio.sleep(delay - SPIN_S)
    while loop.time() < when:
        await asyncio.sleep(0)


async def run_open(target: Target, requests: Sequence[PlannedRequest]) -> list[RequestRecord]:
    """Sends every request at its arrival time (the open loop); returns the records when all
    finished (each within REQUEST_TIMEOUT_S of its send)."""
    await target.open()
    loop = asyncio.get_running_loop()
    try:
        begin = loop.time()
        records, tasks = [], []
        for request in requests:
            await wait_until(loop, begin + request.arrival)
            record = record_for(request, begin + request.arrival)
            records.append(record)
            tasks.append(asyncio.ensure_future(send(target, request, record)))
        await asyncio.gather(*tasks)
    finally:
        await target.close()
    return records


async def run_closed(
    target: Target,
    requests: Sequence[PlannedRequest],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> tuple[list[RequestRecord], tuple[float, float]]:
    """`concurrency` workers, each sending the next request of `requests` (cycled) when its last one
    finished, for warmup + duration seconds (the requests in flight then finish). Returns every
    record and the measured window (start, end) on the loop's clock."""
    await target.open()
    loop = asyncio.get_running_loop()
    records: list[RequestRecord] = []
    order = itertools.cycle(requests)
    begin = loop.time()
    window = (begin + warmup_s, begin + warmup_s + duration_s)

    async def worker() -> None:
        while loop.time() < window[1]:
            request = next(order)
            record = record_for(request, loop.time())
            records.append(record)
            await send(target, request, record)

    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await target.close()
    return records, window


# --- SLO gates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationGates:
    """A generation suite's service level (loadtests/slo.py's style), over the whole run:

    - `p95_ttft_ms`: the 95th percentile of TTFT, milliseconds (upper bound);
    - `p95_itl_ms`: the 95th percentile of ITL, milliseconds (upper bound);
    - `min_tokens_per_s`: output tokens per second of the successful requests (lower bound);
    - `max_failure_ratio`: failed requests (errors, broken contract) over all requests (upper
      bound).
    """

    p95_ttft_ms: float
    p95_itl_ms: float
    min_tokens_per_s: float
    max_failure_ratio: float = 0.0


GATE_NAMES = tuple(f.name for f in dataclasses.fields(GenerationGates))
GATE_LABELS = {
    "p95_ttft_ms": "p95 TTFT",
    "p95_itl_ms": "p95 ITL",
    "min_tokens_per_s": "tokens/s",
    "max_failure_ratio": "failure ratio",
}
_UNITS = {"p95_ttft_ms": " ms", "p95_itl_ms": " ms", "min_tokens_per_s": " tokens/s", "max_failure_ratio": ""}


@dataclass(frozen=True)
class Verdict:
    """One gate against one measurement."""

    gate: str
    limit: float
    measured: float | None
    passed: bool

    def describe(self) -> str:
        label, unit = GATE_LABELS[self.gate], _UNITS[self.gate]
        status = "PASS" if self.passed else "MISS"
        if self.measured is None:
            return f"{status}  {label:<14} no measurement (no request completed)"
        upper = self.gate != "min_tokens_per_s"
        relation = ("<=" if self.passed else ">") if upper else (">=" if self.passed else "<")
        shown, limit = _fmt(self.gate, self.measured), _fmt(self.gate, self.limit)
        text = f"{status}  {label:<14} {shown}{unit} {relation} gate {limit}{unit}"
        if not self.passed:
            gap = self.measured - self.limit if upper else self.limit - self.measured
            relative = f" ({gap / self.limit:+.1%})" if self.limit else ""
            text += f"  ({'over' if upper else 'under'} by {_fmt(self.gate, gap)}{unit}{relative})"
        return text


def _fmt(gate: str, value: float) -> str:
    return f"{value:.3%}" if gate == "max_failure_ratio" else f"{value:.1f}"


def measured_for_gates(summary: dict[str, Any]) -> dict[str, float | None]:
    """The figures the gates judge, from `summarize`'s output."""
    requests = summary["requests"]
    failures = summary["failed"]
    return {
        "p95_ttft_ms": summary["ttft_ms"]["p95"],
        "p95_itl_ms": summary["itl_ms"]["p95"],
        "min_tokens_per_s": summary["output_tokens_per_s"],
        "max_failure_ratio": failures / requests if requests else None,
    }


def check(gates: GenerationGates, summary: dict[str, Any]) -> list[Verdict]:
    """Every gate against the run; a gate with no measurement misses."""
    measured = measured_for_gates(summary)
    verdicts = []
    for name in GATE_NAMES:
        limit, value = getattr(gates, name), measured[name]
        if value is None:
            passed = False
        elif name == "min_tokens_per_s":
            passed = value >= limit
        else:
            passed = value <= limit
        verdicts.append(Verdict(name, limit, value, passed))
    return verdicts


def parse_overrides(items: Sequence[str]) -> dict[str, float]:
    """`["p95_ttft_ms=500"]` -> {"p95_ttft_ms": 500.0}; ValueError names the gates
    (`loadtests.slo.parse_overrides` over this suite's GATE_NAMES)."""
    return slo_gates.parse_overrides(items, GATE_NAMES)


@dataclass(frozen=True)
class GenerationSuite:
    """A served generation model's load test: per profile, the workload and the gates."""

    model: str
    workloads: dict[str, Workload]
    gates: dict[str, GenerationGates]
    goodput: GoodputSLO
    why: str
    """How the gates were chosen (printed with the verdicts, written into the report)."""


SUITES: dict[str, GenerationSuite] = {
    tensors.TEXT_GENERATOR: GenerationSuite(
        model=tensors.TEXT_GENERATOR,
        workloads={
            "full": Workload(rate=2.0, requests=120, prompt_words=(8, 48), max_tokens=(16, 128), seed=0),
            "smoke": Workload(rate=2.0, requests=10, prompt_words=(8, 32), max_tokens=(8, 32), seed=0),
        },
        gates={
            "full": GenerationGates(p95_ttft_ms=250.0, p95_itl_ms=100.0, min_tokens_per_s=50.0),
            "smoke": GenerationGates(p95_ttft_ms=10_000.0, p95_itl_ms=5_000.0, min_tokens_per_s=1.0),
        },
        goodput=GoodputSLO(ttft_ms=250.0, tpot_ms=100.0),
        why=(
            "full: Poisson 2 req/s, about a tenth of the capacity make bench measured for tinylm on a "
            "2-core EPYC (19-22 req/s at concurrency 16, target 12). p95 TTFT <= 250 ms and p95 ITL "
            "<= 100 ms are "
            "interactive service levels (DistServe's chatbot SLO: TTFT 0.25 s, TPOT 0.1 s; 10 tokens/s "
            "streams faster than people read), not this machine's figures: it measured p95 TTFT 9.5 ms "
            "and p95 ITL 1.2-1.6 ms, so a CPU or model many times slower still passes while a server that "
            "queues requests behind whole batches or stalls its streams does not. tokens/s >= 50: the "
            "workload asks for at most 144 tokens/s (2 req/s x mean max_tokens 72; 132.5 delivered "
            "here); a model stopping at its end-of-sequence token earlier delivers less, so the gate is "
            "35% of what is asked: a server that falls behind (a backlog) misses it. smoke (CI): "
            "proves the suite and the model work, latency gates loose, no failure tolerated."
        ),
    )
}
"""The generation suites (`make loadtest` runs each with the `full` profile, CI with `smoke`)."""


# --- the report ---------------------------------------------------------------------------------


def describe(summary: dict[str, Any]) -> list[str]:
    """The run's figures as a few lines for people."""

    def row(name: str, key: str) -> str:
        p = summary[key]
        shown = "  ".join(f"{k} {_ms(p[k])}" for k in ("mean", "p50", "p95", "p99"))
        return f"  {name:<5} {shown}"

    lines = [
        f"  {summary['requests']} requests, {summary['completed']} completed, {summary['failed']} failed"
        + (f" (first: {summary['errors'][0]})" if summary["errors"] else "")
        + f"; finish reasons {summary['finish_reasons']}",
        f"  duration {_num(summary['duration_s'], 's')}; {_num(summary['request_throughput'], 'req/s', 2)}; "
        f"{_num(summary['output_tokens_per_s'], 'output tokens/s')}; goodput "
        f"{_num(summary['goodput'], 'req/s', 2)} ({summary['good_requests']} requests meet "
        f"{summary['slo']})",
        f"  prompt tokens mean {_num(summary['prompt_tokens_mean'], '')}, output tokens mean "
        f"{_num(summary['output_tokens_mean'], '')}, deliveries carrying > 1 token "
        f"{_num(None if summary['multi_token_share'] is None else 100 * summary['multi_token_share'], '%')}",
        row("TTFT", "ttft_ms"),
        row("TPOT", "tpot_ms"),
        row("ITL", "itl_ms"),
        row("E2E", "e2e_ms"),
        f"  greedy consistency: {summary['consistency_pairs']} repeated prompts compared with the longest "
        f"answer to the same prompt, {summary['consistency_failures']} disagreed"
        + (f" ({summary['consistency_mismatches'][0]})" if summary["consistency_mismatches"] else ""),
        f"  sent late by the generator: p99 {_ms(summary['late_sends_ms']['p99'])}",
    ]
    return lines


def cpu_share(cpu_s: float, wall_s: float) -> float:
    """CPU seconds over `wall_s` as a share of the machine's CPUs (1.0: every CPU busy)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cpu_s / (wall_s * cpus) if wall_s > 0 else 0.0


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _num(value: float | None, unit: str, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f} {unit}".rstrip()


def run_suite(
    suite: GenerationSuite,
    profile: str,
    grpc_url: str,
    http_url: str = "",
    transport: str = "grpc",
    overrides: dict[str, float] | None = None,
    workload: Workload | None = None,
    out: Path | None = None,
) -> dict[str, Any]:
    """One run of `suite` (its `profile`'s workload and gates, or `workload`) against a running
    server; prints the figures and verdicts; returns the report (also `out/<model>-poisson_slo.json`)."""
    workload = workload or suite.workloads[profile]
    gates = dataclasses.replace(suite.gates[profile], **(overrides or {}))
    target: Target = (
        GrpcStream(grpc_url, suite.model) if transport == "grpc" else HttpSse(http_url, suite.model)
    )
    requests = plan(workload)
    cpu_before, started = time.process_time(), time.monotonic()
    records = asyncio.run(run_open(target, requests))
    wall = time.monotonic() - started
    generator_cpu = cpu_share(time.process_time() - cpu_before, wall)
    summary = summarize(records, suite.goodput)
    verdicts = check(gates, summary)
    passed = all(v.passed for v in verdicts)
    print(
        f"Generation SLO gates for {suite.model} (profile {profile}, {target.name}, "
        f"Poisson {workload.rate:g} "
        f"req/s, {workload.requests} requests, prompts {workload.prompt_words[0]}-{workload.prompt_words[1]} "
        f"words, max_tokens {workload.max_tokens[0]}-{workload.max_tokens[1]}, temperature "
        f"{workload.temperature:g}, seed {workload.seed}; generator CPU {generator_cpu:.0%} of the machine):",
        *describe(summary),
        *(f"  {v.describe()}" for v in verdicts),
        f"  (gates: {suite.why})" if profile == "full" else "  (smoke gates: loose, no failure tolerated)",
        "SLO: PASS (every gate met)"
        if passed
        else "SLO: MISS: " + "; ".join(GATE_LABELS[v.gate] for v in verdicts if not v.passed),
        sep="\n",
        flush=True,
    )
    report = {
        "model": suite.model,
        "shape": "poisson",
        "profile": profile,
        "transport": transport,
        "workload": dataclasses.asdict(workload),
        "prompts": prompt_topics()[1],
        "gates": dataclasses.asdict(gates),
        "gates_why": suite.why,
        "summary": summary,
        "verdicts": [dataclasses.asdict(v) for v in verdicts],
        "passed": passed,
        "generator_cpu": generator_cpu,
        "wall_s": round(wall, 1),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{suite.model}-poisson_slo.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / f"{suite.model}-poisson_records.json").write_text(
            json.dumps([r.to_json() for r in records]) + "\n"
        )
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.generation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--grpc-url", default="", help="a running server's gRPC host:port")
    parser.add_argument("--http-url", default="", help="its HTTP host:port (with --transport http)")
    parser.add_argument("--model", default=tensors.TEXT_GENERATOR, help="the served generation model")
    parser.add_argument("--profile", default="full", choices=("full", "smoke"))
    parser.add_argument("--transport", default="grpc", choices=tuple(TRANSPORTS))
    parser.add_argument(
        "--rate", type=float, default=None, help="Poisson arrivals per second (the profile's)"
    )
    parser.add_argument("--requests", type=int, default=None, help="how many requests (the profile's)")
    parser.add_argument("--prompt-words", default="", help="LOW,HIGH words per prompt (the profile's)")
    parser.add_argument("--max-tokens", default="", help="LOW,HIGH output tokens asked (the profile's)")
    parser.add_argument(
        "--temperature", type=float, default=None, help="0: greedy (default); >0: seeded sampling"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--gate", action="append", default=[], help="override a gate: NAME=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON report and the records")
    args = parser.parse_args(argv)
    if args.transport == "grpc" and not args.grpc_url:
        parser.error("--grpc-url is needed (a running server; `python -m loadtests.run` starts one)")
    if args.transport == "http" and not args.http_url:
        parser.error("--http-url is needed with --transport http")
    if args.model not in SUITES:
        parser.error(f"--model: no generation suite for {args.model!r}; known: {', '.join(SUITES)}")
    try:
        parse_overrides(args.gate)
    except ValueError as error:
        parser.error(str(error))
    return args


def _pair(text: str) -> tuple[int, int] | None:
    if not text:
        return None
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def workload_for(args: argparse.Namespace) -> Workload:
    """The profile's workload with the command line's overrides."""
    base = SUITES[args.model].workloads[args.profile]
    changes: dict[str, Any] = {
        k: v
        for k, v in (
            ("rate", args.rate),
            ("requests", args.requests),
            ("prompt_words", _pair(args.prompt_words)),
            ("max_tokens", _pair(args.max_tokens)),
            ("temperature", args.temperature),
            ("seed", args.seed),
        )
        if v is not None
    }
    return dataclasses.replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    """Runs one suite against a running server; exit status 0 when every gate was met, 1 otherwise."""
    args = parse_args(argv)
    report = run_suite(
        SUITES[args.model],
        args.profile,
        args.grpc_url,
        args.http_url,
        args.transport,
        parse_overrides(args.gate),
        workload_for(args),
        args.out,
    )
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
