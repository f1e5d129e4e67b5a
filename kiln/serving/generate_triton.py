"""kiln_generate served by Triton: a decoupled Python-based model around `kiln.serving.generate`.

`execute` validates each request (a bad one is answered at once with INVALID_ARG, HTTP 400) and
hands it to the engine, which runs on its own thread; an `Outbox` thread sends each request's
responses through the request's response sender (Triton's decoupled transaction policy), merging
a sequence's deltas when it falls behind, so the engine never waits on a send: a streaming request
(`stream` true) gets one response per text delta and a last one carrying the finish reason and
the token counts, flagged final; a non-streaming one gets one response with the whole text.
A client that cancels (gRPC stream closed, request cancelled) is noticed through
`request.is_cancelled()`, asked every 20 ms by a `CancelWatcher` thread; its sequence stops at the
engine's next step and frees its cache.

Tensor contract (max_batch_size 0: the engine batches, not Triton), the names of Triton's own
LLM backends so its `generate` / `generate_stream` endpoints and tools built for them work:

    inputs   text_input BYTES [1]; optional: max_tokens INT32 [1], temperature FP32 [1],
             top_k INT32 [1], top_p FP32 [1], seed INT64 [1], stop BYTES [-1], stream BOOL [1]
    outputs  text_output BYTES [1] (the delta, or the whole text), finish_reason BYTES [1]
             ("" until the last response; then "stop", "length" or "cancelled"),
             prompt_tokens INT32 [1], completion_tokens INT32 [1]

Metrics (Triton custom metrics on /metrics, label `model`; see METRICS): time to first token and
inter-token latency histograms, prompt and generated token counters, running and waiting
sequences, KV-cache tokens used and its capacity. They are pushed by a thread every
`FLUSH_INTERVAL_S` (a push is a round trip to the server), never on the engine's path.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from kiln.serving.adapter import FLUSH_INTERVAL_S, find_artifact, read_inputs
from kiln.serving.errors import ModelLoadError
from kiln.serving.generate import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    GENERATE_PARAMS,
    Engine,
    Event,
    GenerateParams,
    GenerationError,
    GenerationRequest,
    LoadedModel,
    OverloadedError,
    request_fields,
)
from kiln.serving.params import config_parameters, parse_params

INPUTS = ("text_input", "max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stream")
OUTPUTS = ("text_output", "finish_reason", "prompt_tokens", "completion_tokens")

LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)
"""Histogram buckets (seconds) of the latency metrics: vLLM's, with finer steps below 10 ms,
where a small model on a CPU answers."""

METRICS = {
    "kiln_generate_time_to_first_token_seconds": ("HISTOGRAM", "Seconds from a request's arrival "
                                                  "at the model to its first generated token"),
    "kiln_generate_inter_token_latency_seconds": ("HISTOGRAM", "Seconds between consecutive "
                                                  "generated tokens of a request"),
    "kiln_generate_prompt_tokens_total": ("COUNTER", "Prompt tokens prefilled"),
    "kiln_generate_generation_tokens_total": ("COUNTER", "Tokens generated"),
    "kiln_generate_requests_total": ("COUNTER", "Generation requests finished, by finish reason"),
    "kiln_generate_requests_running": ("GAUGE", "Sequences in the engine's batch"),
    "kiln_generate_requests_waiting": ("GAUGE", "Requests waiting for room in the KV cache"),
    "kiln_generate_kv_cache_tokens_used": ("GAUGE", "KV-cache tokens reserved by running sequences"),
    "kiln_generate_kv_cache_tokens_capacity": ("GAUGE", "KV-cache tokens in the preallocated pool"),
}


@dataclass
class Handle:
    """One request inside the engine: where its responses go, and its timings."""

    request: Any
    sender: Any
    stream: bool
    arrival: float
    last_token_at: float = 0.0
    # The final response and `request.is_cancelled()` exclude each other: once the final response
    # is sent, Triton frees the request's response factory, and asking it then crashes the server
    # (seen: SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled).
    lock: threading.Lock = field(default_factory=threading.Lock)
    finished: bool = False

    def client_gone(self) -> bool:
        """`request.is_cancelled()`, or False once the final response went out (never asked then)."""
        with self.lock:
            return not self.finished and bool(self.request.is_cancelled())


@dataclass
class Observations:
    """Latency observations and counts since the last push (guarded by GenerateMetrics' lock)."""

    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class GenerateMetrics:
    """kiln_generate's Triton metrics, observed in memory and pushed by a daemon thread."""

    def __init__(self, pb_utils: Any, model: str, engine: Engine) -> None:
        self._engine = engine
        self._labels = {"model": model}
        self._lock = threading.Lock()
        self._pending = Observations()
        self._stop = threading.Event()
        self._metrics: dict[str, Any] = {}
        self._finished: dict[str, Any] = {}
        self._families: dict[str, Any] = {}
        self._pushed: dict[str, int] = {}
        family_type = getattr(pb_utils, "MetricFamily", None)
        self._thread: threading.Thread | None = None
        if family_type is None:
            return
        for name, (kind, description) in METRICS.items():
            family = family_type(name=name, description=description, kind=getattr(family_type, kind))
            self._families[name] = family
            if name == "kiln_generate_requests_total":
                continue
            if kind == "HISTOGRAM":
                self._metrics[name] = family.Metric(labels=self._labels, buckets=list(LATENCY_BUCKETS_S))
            else:
                self._metrics[name] = family.Metric(labels=self._labels)
        self._thread = threading.Thread(target=self._loop, name=f"kiln-metrics-{model}", daemon=True)
        self._thread.start()

    def record(self, ttft: list[float], itl: list[float], finished: list[str]) -> None:
        if not self._families:
            return
        with self._lock:
            pending = self._pending
            pending.ttft.extend(ttft)
            pending.itl.extend(itl)
            for reason in finished:
                pending.finished[reason] = pending.finished.get(reason, 0) + 1

    def flush(self) -> None:
        if not self._families:
            return
        with self._lock:
            pending, self._pending = self._pending, Observations()
        stats = self._engine.stats
        metrics = self._metrics
        for value in pending.ttft:
            metrics["kiln_generate_time_to_first_token_seconds"].observe(value)
        for value in pending.itl:
            metrics["kiln_generate_inter_token_latency_seconds"].observe(value)
        for name, total in (
            ("kiln_generate_prompt_tokens_total", stats.prompt_tokens),
            ("kiln_generate_generation_tokens_total", stats.completion_tokens),
        ):
            seen = self._pushed.get(name, 0)  # what this series already holds
            if total > seen:
                metrics[name].increment(total - seen)
                self._pushed[name] = total
        for reason, count in pending.finished.items():
            metric = self._finished.get(reason)
            if metric is None:
                metric = self._finished[reason] = self._families["kiln_generate_requests_total"].Metric(
                    labels={**self._labels, "finish_reason": reason}
                )
            metric.increment(count)
        engine = self._engine
        metrics["kiln_generate_requests_running"].set(len(engine.running))
        metrics["kiln_generate_requests_waiting"].set(len(engine.waiting))
        metrics["kiln_generate_kv_cache_tokens_used"].set(engine.pool.used_tokens)
        metrics["kiln_generate_kv_cache_tokens_capacity"].set(engine.pool.capacity_tokens)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        try:
            self.flush()
        except Exception:  # the server may be tearing the model down: that push is lost
            pass

    def _loop(self) -> None:
        while not self._stop.wait(FLUSH_INTERVAL_S):
            try:
                self.flush()
            except Exception:  # metrics never take the model down
                continue


def merge_events(events: list[Event]) -> list[Event]:
    """Each sequence's queued events merged: deltas joined, the last event's finish reason,
    counts, text and error; per sequence in order, sequences in the order they first appear. A
    sequence's first token is never merged with what follows it: it goes out alone, so the time
    to first token does not wait for later tokens (and a stream always shows its first token
    apart from the rest).

    What a response sender that fell behind sends: k responses of one token each cost k round
    trips to the server; one response of k tokens costs one, and the client reads the same text.
    A cancelled or failed sequence's merged event carries its reason, so its earlier deltas are
    dropped with it (the client left, or gets the error)."""
    merged: list[Event] = []
    open_slots: dict[int, int] = {}  # a sequence -> the index in `merged` its next event joins
    for event in events:
        key = id(event.handle)
        slot = open_slots.get(key)
        if slot is None:
            merged.append(event)
            if not event.first:
                open_slots[key] = len(merged) - 1
        else:
            before = merged[slot]
            merged[slot] = replace(event, delta=before.delta + event.delta, first=before.first or event.first)
    return merged


class Outbox:
    """Sends the engine's events from a thread of its own, so the engine never waits on Triton.

    A response sender's `send` is a round trip between the stub and the server (0.38 ms per
    response measured here); on the engine thread it took 43% of the loop at concurrency 8. The
    engine now only appends an iteration's events to a queue; this thread takes everything
    queued, merges each sequence's events (`merge_events`) and sends them. Keeping up, it sends
    one response per token; falling behind, fewer, larger deltas (a first token always alone), so
    the engine's speed and not the sender's bounds tokens per second. Per sequence, order is
    kept: its final response is always its last.

    `send(event)` does the sending (and must not raise: failures are its to handle); `close`
    sends what is queued, then stops the thread and drops every reference to the handles.
    """

    def __init__(self, send: Callable[[Event], None], name: str = "kiln-outbox") -> None:
        self._send = send
        self._queue: list[Event] = []
        self._ready = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, events: list[Event]) -> None:
        if not events:
            return
        with self._ready:
            if self._closed:
                raise RuntimeError("the outbox is closed")
            self._queue.extend(events)
            self._ready.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join(timeout=timeout)
        with self._ready:
            self._queue = []

    def _loop(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if not self._queue:
                    return
                taken, self._queue = self._queue, []
            self._deliver(taken)
            taken = []  # no reference to a request may outlive its last response

    def _deliver(self, events: list[Event]) -> None:
        for event in merge_events(events):
            self._send(event)


class CancelWatcher:
    """Asks `is_cancelled(handle)` for each of the engine's sequences every `interval_s`, from a
    thread of its own, and cancels the ones whose client left.

    In a Python-based Triton model `request.is_cancelled()` is a round trip to the server; asked
    on the engine thread for 16 running sequences every 20 ms it cost about a quarter of the
    engine's time. Here the engine only sees `Engine.cancel`. Handles are held only during a
    round, so nothing keeps a finished request alive."""

    def __init__(
        self, engine: Engine, is_cancelled: Callable[[Any], bool], interval_s: float = 0.02,
        name: str = "kiln-cancel-watcher",
    ) -> None:
        self._engine = engine
        self._is_cancelled = is_cancelled
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout=timeout)

    def check(self) -> int:
        """One round; returns how many sequences it cancelled."""
        gone = 0
        for handle in self._engine.handles():
            try:
                cancelled = bool(self._is_cancelled(handle))
            except Exception:  # the request can no longer be asked: its client is gone
                cancelled = True
            if cancelled:
                self._engine.cancel(handle)
                gone += 1
        return gone

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check()
            except Exception:  # never take the model down; the next round tries again
                continue


def check_parameters(text: str) -> None:
    """Refuses request parameters: Triton's `generate` endpoint turns a JSON field that names no
    input into one, so a misspelt field (`max_token`) would otherwise be ignored silently."""
    try:
        parameters = json.loads(text or "{}")
    except ValueError:
        parameters = {"?": text}
    if parameters:
        names = ", ".join(repr(name) for name in sorted(parameters))
        raise GenerationError(
            f"unknown field(s) {names}: kiln_generate takes {', '.join(INPUTS)}"
        )


def decoupled_model() -> type:
    """The `TritonPythonModel` class of kiln_generate (see the module doc)."""
    import triton_python_backend_utils as pb_utils

    def to_error(error: Exception) -> Any:
        error_type = pb_utils.TritonError  # looked up per call: attached after model.py's import
        message = str(error) or type(error).__name__
        if isinstance(error, ValueError):
            code = getattr(error_type, "INVALID_ARG", None)
        elif isinstance(error, OverloadedError):
            code = getattr(error_type, "UNAVAILABLE", None)
        else:
            code = None
        return error_type(message) if code is None else error_type(message, code)

    def bytes_tensor(name: str, text: str) -> Any:
        return pb_utils.Tensor(name, np.array([text.encode("utf-8")], dtype=np.object_))

    class TritonPythonModel:
        """kiln_generate: streamed text generation with continuous batching."""

        def initialize(self, args: dict) -> None:
            config = json.loads(args["model_config"])
            name = args["model_name"]
            if not pb_utils.using_decoupled_model_transaction_policy(config):
                raise ModelLoadError(
                    f"model '{name}': kiln_generate streams its responses and needs "
                    "`model_transaction_policy { decoupled: true }` (ModelSpec.decoupled)"
                )
            inputs = {t["name"] for t in config.get("input", ())}
            outputs = {t["name"] for t in config.get("output", ())}
            if "text_input" not in inputs or not set(OUTPUTS) <= outputs or not inputs <= set(INPUTS):
                raise ModelLoadError(
                    f"model '{name}': kiln_generate takes inputs {', '.join(INPUTS)} (text_input "
                    f"required) and gives outputs {', '.join(OUTPUTS)}; the config has inputs "
                    f"{sorted(inputs)} and outputs {sorted(outputs)}"
                )
            self.name = name
            self.input_names = sorted(inputs)
            params = parse_params(name, config_parameters(config), GENERATE_PARAMS, GenerateParams)
            repository = Path(args["model_repository"]).parent
            folder = find_artifact(repository, params.model, "generation.json", for_model=name).parent
            loaded = LoadedModel.from_folder(folder, params)
            self.params = params
            self.loaded = loaded
            self.engine = Engine(
                loaded.session,
                loaded.tokenizer,
                loaded.info,
                params,
                emit=self._emit,
            )
            self.metrics = GenerateMetrics(pb_utils, name, self.engine)
            self.outbox = Outbox(self._send, name=f"kiln-generate-send-{name}")
            self.watcher = CancelWatcher(
                self.engine, Handle.client_gone, name=f"kiln-generate-cancel-{name}"
            )
            self.thread = threading.Thread(
                target=self._run_engine, name=f"kiln-generate-{name}", daemon=True
            )
            self.thread.start()

        def _run_engine(self) -> None:
            try:
                self.engine.run_forever()
            except Exception as error:  # pragma: no cover - a bug: log it where the operator looks
                pb_utils.Logger.log_error(f"model '{self.name}': the engine stopped: {error!r}")
                raise

        def execute(self, requests: list) -> None:
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            for request in requests:
                sender = request.get_response_sender()
                arrival = time.perf_counter()
                try:
                    check_parameters(request.parameters())
                    inputs = read_inputs(request, self.input_names, pb_utils)
                    text = inputs.get("text_input")
                    if text is None or np.asarray(text).size != 1:
                        raise GenerationError("text_input must hold exactly one prompt")
                    prompt = np.asarray(text).reshape(-1)[0]
                    if isinstance(prompt, str):
                        prompt = prompt.encode("utf-8")
                    fields = request_fields(inputs)
                    stream = fields.pop("stream")
                    generation = GenerationRequest.create(
                        self.loaded.tokenizer, self.loaded.info, self.params, prompt, **fields,
                        stream=stream,
                    )
                    self.engine.submit(generation, Handle(request, sender, stream, arrival))
                except Exception as error:  # this request's own error; the others go on
                    sender.send(pb_utils.InferenceResponse(error=to_error(error)), flags=final)
            return None

        def _emit(self, events: list[Event]) -> None:
            """Records the iteration's latencies and queues its events (on the engine thread)."""
            now = time.perf_counter()
            ttft: list[float] = []
            itl: list[float] = []
            finished: list[str] = []
            for event in events:
                handle: Handle = event.handle
                reason = event.finish_reason
                if reason is not None:
                    finished.append(reason)
                if reason != FINISH_CANCELLED and reason != FINISH_ERROR:
                    if event.first:
                        ttft.append(now - handle.arrival)
                    else:
                        itl.append(now - handle.last_token_at)
                    handle.last_token_at = now
            self.metrics.record(ttft, itl, finished)
            self.outbox.put(events)

        def _send(self, event: Event) -> None:
            """Sends one (merged) event's response (on the outbox's thread)."""
            handle: Handle = event.handle
            reason = event.finish_reason
            if reason is None:
                self._send_response(event, handle, reason)
                return
            with handle.lock:  # the cancel watcher never asks a request whose final response went out
                handle.finished = True
                self._send_response(event, handle, reason)

        def _send_response(self, event: Event, handle: Handle, reason: str | None) -> None:
            final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            try:
                if reason == FINISH_CANCELLED:
                    handle.sender.send(flags=final)
                elif reason == FINISH_ERROR:
                    error = event.error or RuntimeError("generation failed")
                    handle.sender.send(pb_utils.InferenceResponse(error=to_error(error)), flags=final)
                elif handle.stream:
                    if event.delta or reason is not None:
                        handle.sender.send(
                            self._response(event.delta, reason, event), flags=final if reason else 0
                        )
                elif reason is not None:
                    handle.sender.send(self._response(event.text, reason, event), flags=final)
            except Exception:  # the client is gone; the engine drops the sequence next iteration
                if reason is None:
                    self.engine.cancel(handle)

        def _response(self, text: str, reason: str | None, event: Event) -> Any:
            return pb_utils.InferenceResponse(
                output_tensors=[
                    bytes_tensor("text_output", text),
                    bytes_tensor("finish_reason", reason or ""),
                    pb_utils.Tensor("prompt_tokens", np.array([event.prompt_tokens], np.int32)),
                    pb_utils.Tensor("completion_tokens", np.array([event.completion_tokens], np.int32)),
                ]
            )

        def finalize(self) -> None:
            watcher = getattr(self, "watcher", None)
            if watcher is not None:
                watcher.close()
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.stop()
                self.thread.join(timeout=10.0)
            outbox = getattr(self, "outbox", None)
            if outbox is not None:
                outbox.close()  # the engine's last events (cancelled sequences) go out first
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.close()
            # Nothing may keep a request alive past finalize: Triton waits for every request
            # of a decoupled model to be released before the model counts as unloaded.
            self.engine = self.metrics = self.outbox = self.watcher = None

    return TritonPythonModel
