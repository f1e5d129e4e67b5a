"""`make bench`'s generation comparisons (targets 10-13), also alone: `python -m benchmarks.generation`.

    python -m benchmarks.generation                 # the four comparisons, ~4 minutes on 2 cores
    python -m benchmarks.generation --quick         # a dry run (~1 minute)
    python -m benchmarks.generation --artifacts DIR # another tinylm-shaped model (model.onnx,
                                                    # tokenizer.json, generation.json in DIR)

One embedded tritonserver on a temporary repository (`write_repository`) serves `tinylm_generate`
as its spec declares it (continuous batching), `tinylm_generate_static` (the same spec with the
engine parameter `scheduling: static`) and the floor (`benchmarks.floor`'s `identity`), all on the
same built tinylm files; the in-process figures run `kiln.serving.generate`'s `Engine` on the same
files with the same parameters (the served config's, parsed by the backend's own schema).

10. **KV cache against recomputation** (in process, greedy, one sequence): tokens/s of the engine
    generating `kv_tokens` (256, or what the model's context leaves after the prompt) against the
    same ONNX model fed the whole sequence every step with an empty past (`recompute_generate`);
    both must produce the same tokens (checked every repeat). Target >= 5x.
11. **Continuous against static batching** (served, gRPC streaming, the same seeded Poisson
    workload of `loadtests.generation`): goodput and p95 TTFT. The arrival rate is
    `load_fraction` x the continuous model's measured capacity (the request throughput of
    target 12's closed loop at `concurrency`, measured in the same run), so the comparison sits
    at the same relative load on any CPU. Goodput's SLO is scaled from latencies measured in the
    same run (DistServe's "SLO scale"): TTFT <= `ttft_scale` (5) x the p50 TTFT of the mix sent
    one request at a time (waiting up to a few requests' prefills is fine, waiting for a batch to
    drain is not), TPOT <= `tpot_scale` (2) x the p50 TPOT of target 12's closed loop at the full
    decode batch (a stream may be half as fast as a full batch decodes: room for the prefills
    that continuous batching interleaves). Targets: goodput >= 2x, p95 TTFT >= 3x lower.
12. **Served against in process** at the same concurrency (closed loop, the same mix, greedy):
    output tokens/s of `tinylm_generate` over gRPC streaming against the same engine loop run in
    this process (`inprocess_closed`), tokens counted by delivery time inside the measured
    window. Target >= 0.9x.
13. **TTFT at concurrency 1 against the in-process prefill** of the same prompt (`max_tokens` 1:
    the first token is the whole answer): served TTFT p50 minus the in-process time (tokenize,
    prefill, sample) p50 must be at most the floor's round trip p50 (the identity model over
    gRPC, the same client) plus 1 ms.

Repeats are interleaved (repeat 1 of every system, then repeat 2, ...) and medians quoted.
Results: `results/bench-generation-<UTC>-<commit>/` (`results.md`, `results.json`), or inside
`make bench`'s report (targets 10-13 and a "Generation" section).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.util
import itertools
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from benchmarks import floor
from kiln import paths, tensors
from kiln.serving.generate import (
    GENERATE_PARAMS,
    ByteTokenizer,
    Engine,
    GenerateParams,
    GenerationRequest,
    LoadedModel,
    ModelInfo,
)
from kiln.serving.params import parse_params
from loadtests import environment
from loadtests import generation as load

GENERATE = tensors.TEXT_GENERATOR
STATIC = f"{GENERATE}_static"
"""The same spec served with `scheduling: static` (target 11's baseline)."""
ARTIFACTS = ("model.onnx", "tokenizer.json", "generation.json")
TARGETS = {
    10: ("Generation: KV cache against recomputing the prefix (tokens/s)", 5.0),
    11: ("Generation: continuous against static batching (goodput; p95 TTFT)", 2.0),
    12: ("Generation: served against the engine in process (tokens/s)", 0.9),
    13: ("Generation: TTFT at concurrency 1 against the in-process prefill", 1.0),
}
TTFT_FLOOR_MARGIN_MS = 1.0
"""Target 13: served TTFT - in-process prefill <= the floor's round trip + this."""
TTFT_RATIO = 3.0
"""Target 11's second bound: static's p95 TTFT >= this x continuous's."""


@dataclass(frozen=True)
class Settings:
    """Sizes and durations of the generation comparisons."""

    repeats: int = 3
    kv_tokens: int = 256
    kv_prompt_words: int = 16
    concurrency: int = 16
    closed_duration_s: float = 8.0
    closed_warmup_s: float = 2.0
    load_fraction: float = 0.7
    poisson_requests: int = 60
    unloaded_requests: int = 12
    ttft_scale: float = 5.0
    tpot_scale: float = 2.0
    ttft_requests: int = 40
    prompt_words: tuple[int, int] = (8, 48)
    max_tokens: tuple[int, int] = (16, 128)
    seed: int = 0


FULL = Settings()
QUICK = Settings(
    repeats=1,
    kv_tokens=128,
    closed_duration_s=3.0,
    closed_warmup_s=1.0,
    poisson_requests=24,
    unloaded_requests=6,
    ttft_requests=15,
    max_tokens=(16, 64),
)


# --- the model and its repository -------------------------------------------------------------


def generate_spec() -> Any:
    """`tinylm_generate`'s spec: from the registry, or (while models/tinylm has no spec.py yet)
    from models/tinylm/pipeline.py directly."""
    from kiln import registry

    try:
        return registry.by_name(GENERATE)
    except KeyError:
        path = paths.ROOT / "models" / "tinylm" / "pipeline.py"
        module_spec = importlib.util.spec_from_file_location("_kiln_bench_tinylm_pipeline", path)
        if module_spec is None or module_spec.loader is None:
            raise
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.GENERATE


def served_params(spec: Any) -> GenerateParams:
    """The engine parameters the served model runs with (its config's, by the backend's schema)."""
    return parse_params(spec.name, dict(spec.parameters), GENERATE_PARAMS, GenerateParams)


def default_artifacts(spec: Any | None = None) -> Path:
    """The newest version folder of the model the spec's `model` parameter names, in the model
    repository (what `make build-engines` published)."""
    params = served_params(spec or generate_spec())
    folder = paths.model_repository() / params.model
    versions = sorted(
        (int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else ()
    )
    for version in reversed(versions):
        if all((folder / str(version) / name).is_file() for name in ARTIFACTS):
            return folder / str(version)
    raise FileNotFoundError(
        f"{params.model} is not built ({folder}/<version>/ lacks {', '.join(ARTIFACTS)}): "
        "run `make build-engines`"
    )


def write_repository(folder: Path, artifacts: Path, spec: Any | None = None, with_floor: bool = True) -> Path:
    """A repository in `folder`: the model the spec's `model` parameter names (its files linked
    from `artifacts`), `tinylm_generate` as its spec declares it, `tinylm_generate_static` (the
    same with `scheduling: static`) and, with `with_floor`, the floor model."""
    from kiln.repository import render

    spec = spec or generate_spec()
    params = served_params(spec)
    repository = Path(folder)
    version = repository / params.model / "1"
    version.mkdir(parents=True)
    for name in ARTIFACTS:
        source = Path(artifacts) / name
        if not source.is_file():
            raise FileNotFoundError(f"{source} not found: a generation model needs {', '.join(ARTIFACTS)}")
        (version / name).symlink_to(source.resolve())
    static = dataclasses.replace(spec, name=STATIC, parameters={**spec.parameters, "scheduling": "static"})
    for served in (spec, static):
        (repository / served.name / "1").mkdir(parents=True)
        (repository / served.name / "1" / ".gitkeep").touch()  # a version folder Triton loads
        (repository / served.name / "config.pbtxt").write_text(render(served))
    if with_floor:
        floor.write(repository)
    return repository


def clamp_to_context(
    planned: Sequence[load.PlannedRequest], tokenizer: ByteTokenizer, info: ModelInfo
) -> list[load.PlannedRequest]:
    """`planned` with each max_tokens cut to what the model's context leaves after its prompt (the
    server refuses a request that does not fit)."""
    out = []
    for request in planned:
        room = info.max_context - len(tokenizer.encode(request.prompt))
        out.append(dataclasses.replace(request, max_tokens=max(1, min(request.max_tokens, room))))
    return out


def fit_context(planned: Sequence[load.PlannedRequest], artifacts: Path) -> list[load.PlannedRequest]:
    """`clamp_to_context` with the tokenizer and generation.json of the model folder `artifacts`."""
    info = ModelInfo.from_file(Path(artifacts) / "generation.json")
    return clamp_to_context(
        planned, ByteTokenizer.from_file(Path(artifacts) / "tokenizer.json", info.eos_token_id), info
    )


# --- in process ---------------------------------------------------------------------------------


def recompute_generate(model: LoadedModel, prompt_ids: Sequence[int], count: int) -> list[int]:
    """Greedy generation with no cache: every step feeds the whole sequence (prompt and the tokens
    so far) to the same ONNX model with an empty past and takes the last position's argmax; stops
    after `count` tokens or at the end-of-sequence token (kept, as the engine keeps it)."""
    info = model.info
    empty = np.zeros((1, info.num_heads, 0, info.head_dim), np.float32)
    past = {
        f"past_key_values.{layer}.{kind}": empty
        for layer in range(info.num_layers)
        for kind in ("key", "value")
    }
    ids = list(prompt_ids)
    generated: list[int] = []
    for _ in range(count):
        width = len(ids)
        feeds = {
            "input_ids": np.asarray([ids], np.int64),
            "attention_mask": np.ones((1, width), np.int64),
            "position_ids": np.arange(width, dtype=np.int64).reshape(1, width),
            **past,
        }
        logits = model.session.run(["logits"], feeds)[0]
        token = int(np.argmax(logits[0, -1]))
        generated.append(token)
        ids.append(token)
        if token == info.eos_token_id:
            break
    return generated


def kv_generate(model: LoadedModel, params: GenerateParams, prompt: str, count: int) -> list[int]:
    """Greedy generation of `count` tokens (or up to the end-of-sequence token) by the engine, one
    sequence, in process; returns the token ids."""
    engine = Engine(model.session, model.tokenizer, model.info, params, emit=lambda events: None)
    request = GenerationRequest.create(
        model.tokenizer, model.info, params, prompt, max_tokens=count, temperature=0.0
    )
    engine.submit(request, "kv")
    sequence = engine.waiting[-1]
    while not engine.idle:
        engine.step()
    return list(sequence.generated)


def inprocess_closed(
    model: LoadedModel,
    params: GenerateParams,
    requests: Sequence[load.PlannedRequest],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """The engine loop in this process as a closed loop: `concurrency` sequences in flight (a
    finished one is replaced by the next request of the mix before the next step), every request
    validated and tokenized as the served model does; tokens counted when the engine emits them,
    inside the window after `warmup_s`."""
    clock = time.perf_counter
    seen: dict[Any, int] = {}
    tokens = [0]
    finished = [0]
    begin = clock()
    window = (begin + warmup_s, begin + warmup_s + duration_s)

    def emit(events: list[Any]) -> None:
        now = clock()
        for event in events:
            added = event.completion_tokens - seen.get(event.handle, 0)
            seen[event.handle] = event.completion_tokens
            if window[0] <= now < window[1]:
                tokens[0] += added
                finished[0] += event.finish_reason is not None
            if event.finish_reason is not None:
                seen.pop(event.handle, None)
                in_flight.discard(event.handle)

    engine = Engine(model.session, model.tokenizer, model.info, params, emit)
    order = itertools.cycle(requests)
    in_flight: set[int] = set()
    counter = itertools.count()
    cpu_before = time.process_time()
    while clock() < window[1]:
        while len(in_flight) < concurrency:
            planned = next(order)
            request = GenerationRequest.create(
                model.tokenizer, model.info, params, planned.prompt, max_tokens=planned.max_tokens,
                temperature=planned.temperature, seed=planned.seed, top_p=planned.top_p,
            )  # fmt: skip
            handle = next(counter)
            in_flight.add(handle)
            engine.submit(request, handle)
        engine.step()
    wall = clock() - begin
    return {
        "tokens_per_s": tokens[0] / duration_s,
        "requests_per_s": finished[0] / duration_s,
        "tokens": tokens[0],
        "cpu": load.cpu_share(time.process_time() - cpu_before, wall),
        "decode_batch_mean": engine.stats.decode_batch_items / max(engine.stats.decode_batches, 1),
    }


def inprocess_first_token(model: LoadedModel, params: GenerateParams, prompt: str) -> tuple[float, str]:
    """Seconds to validate and tokenize `prompt`, prefill it and sample its first token (one engine
    step, `max_tokens` 1), and the text of that token."""
    texts: list[str] = []
    engine = Engine(
        model.session,
        model.tokenizer,
        model.info,
        params,
        emit=lambda events: texts.extend(e.text for e in events),
    )
    started = time.perf_counter()
    request = GenerationRequest.create(
        model.tokenizer, model.info, params, prompt, max_tokens=1, temperature=0.0
    )
    engine.submit(request, "first")
    engine.step()
    return time.perf_counter() - started, "".join(texts)


# --- served -----------------------------------------------------------------------------------


def served_closed(
    grpc_url: str,
    model: str,
    requests: Sequence[load.PlannedRequest],
    concurrency: int,
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """The gRPC generator as a closed loop; tokens/s by delivery time inside the window."""

    async def go() -> tuple[list[load.RequestRecord], tuple[float, float], float]:
        loop = asyncio.get_running_loop()
        records, window = await load.run_closed(
            load.GrpcStream(grpc_url, model), requests, concurrency, duration_s, warmup_s
        )
        return records, window, loop.time()

    cpu_before, started = time.process_time(), time.monotonic()
    records, window, _ = asyncio.run(go())
    wall = time.monotonic() - started
    done = [r for r in records if r.ok and r.end is not None and window[0] <= r.end < window[1]]
    failed = [r for r in records if not r.ok]
    return {
        "tokens_per_s": load.tokens_in_window(records, *window) / duration_s,
        "requests_per_s": len(done) / duration_s,
        "failed": len(failed),
        "errors": load.summarize(failed)["errors"] if failed else [],
        "cpu": load.cpu_share(time.process_time() - cpu_before, wall),
        "ttft_p50_ms": load.percentiles([r.ttft * 1e3 for r in done if r.ttft is not None])["p50"],
        "tpot_p50_ms": load.percentiles([t * 1e3 for r in done if (t := r.tpot) is not None])["p50"],
    }


def served_open(
    grpc_url: str, model: str, requests: Sequence[load.PlannedRequest], slo: load.GoodputSLO
) -> dict:
    """The Poisson workload over gRPC streaming: `loadtests.generation.summarize`'s figures."""
    cpu_before, started = time.process_time(), time.monotonic()
    records = asyncio.run(load.run_open(load.GrpcStream(grpc_url, model), requests))
    summary = load.summarize(records, slo)
    summary["cpu"] = load.cpu_share(time.process_time() - cpu_before, time.monotonic() - started)
    return summary


def served_sequential(
    grpc_url: str, model: str, requests: Sequence[load.PlannedRequest]
) -> list[load.RequestRecord]:
    """`requests` one at a time (concurrency 1) over gRPC streaming."""

    async def go() -> list[load.RequestRecord]:
        target = load.GrpcStream(grpc_url, model)
        await target.open()
        loop = asyncio.get_running_loop()
        records = []
        try:
            for request in requests:
                record = load.record_for(request, loop.time())
                await load.send(target, request, record)
                records.append(record)
        finally:
            await target.close()
        return records

    return asyncio.run(go())


def first_token_rounds(
    grpc_url: str,
    model: LoadedModel,
    params: GenerateParams,
    request: load.PlannedRequest,
    count: int,
) -> dict[str, list[float]]:
    """Target 13's measurements, `count` rounds at concurrency 1, interleaved within each round,
    one asyncio loop and one gRPC channel for all (seconds):

    - "in_process": `inprocess_first_token` of the request's prompt;
    - "served": the request's TTFT over gRPC streaming (`loadtests.generation.GrpcStream`);
    - "floor_stream": the identity model over a gRPC stream of its own (the path a generation
      request takes: one stream per request, one response);
    - "floor_unary": the identity model through unary `infer` (perf_analyzer's path).
    """
    import tritonclient.grpc as grpcclient

    row = floor.request()[floor.IDENTITY_INPUT]

    def identity_inputs() -> list[Any]:
        item = grpcclient.InferInput(floor.IDENTITY_INPUT, list(row.shape), "FP32")
        item.set_data_from_numpy(row)
        return [item]

    async def go() -> dict[str, list[float]]:
        target = load.GrpcStream(grpc_url, GENERATE)
        await target.open()
        client = target._client
        loop = asyncio.get_running_loop()
        out: dict[str, list[float]] = {"in_process": [], "served": [], "floor_stream": [], "floor_unary": []}

        async def one_identity() -> Any:
            yield {"model_name": floor.IDENTITY, "inputs": identity_inputs()}

        try:
            for _ in range(count):
                out["in_process"].append(inprocess_first_token(model, params, request.prompt)[0])
                record = load.record_for(request, loop.time())
                await load.send(target, request, record)
                if not record.ok or record.ttft is None:
                    raise RuntimeError(f"the TTFT request failed: {record.error or record.finish_reason}")
                out["served"].append(record.ttft)
                started = time.perf_counter()
                stream = client.stream_infer(one_identity())
                async for _, error in stream:
                    if error is not None:
                        raise RuntimeError(f"identity over a stream: {error}")
                    break
                out["floor_stream"].append(time.perf_counter() - started)
                async for _ in stream:  # to its end (a cancelled stream delays the server's shutdown)
                    pass
                started = time.perf_counter()
                result = await client.infer(floor.IDENTITY, identity_inputs())
                out["floor_unary"].append(time.perf_counter() - started)
                if not np.array_equal(result.as_numpy(floor.IDENTITY_OUTPUT), row):
                    raise RuntimeError("the identity model did not return its input")
        finally:
            await target.close()
        return out

    return asyncio.run(go())


# --- the comparisons --------------------------------------------------------------------------


Log = Callable[[str], None]


class GenerationBench:
    """One run of targets 10-13 against a server serving GENERATE, STATIC and the floor."""

    def __init__(
        self, settings: Settings, grpc_url: str, artifacts: Path, log: Log, spec: Any = None
    ) -> None:
        self.settings = settings
        self.grpc_url = grpc_url
        self.artifacts = artifacts
        self.log = log
        self.spec = spec or generate_spec()
        self.params = served_params(self.spec)
        self.model = LoadedModel.from_folder(artifacts, self.params)
        self.paragraphs = load.prompt_paragraphs()
        self.results: dict[str, Any] = {
            "artifacts": str(artifacts),
            "model_info": dataclasses.asdict(self.model.info),
            "params": dataclasses.asdict(self.params),
            "settings": dataclasses.asdict(settings),
        }
        self.targets: dict[int, dict[str, Any]] = {}

    def target(self, number: int, **fields: Any) -> None:
        title, threshold = TARGETS[number]
        self.targets[number] = {"number": number, "title": title, "threshold": threshold, **fields}

    def workload(self, rate: float, requests: int, **changes: Any) -> load.Workload:
        s = self.settings
        return load.Workload(
            rate=rate, requests=requests, prompt_words=s.prompt_words, max_tokens=s.max_tokens, seed=s.seed,
            **changes,
        )  # fmt: skip

    def fits(self, planned: Sequence[load.PlannedRequest]) -> list[load.PlannedRequest]:
        """`planned` with max_tokens cut to what the model's context leaves after each prompt."""
        return clamp_to_context(planned, self.model.tokenizer, self.model.info)

    def run(self, only: set[int] | None = None) -> None:
        """The comparisons in `only` (all by default); 11 needs 12's capacity, so 12 runs with it."""
        only = only or set(TARGETS)
        steps: list[tuple[set[int], Callable[[], None]]] = [
            ({10}, self.kv_cache),
            ({12, 11}, self.served_in_process),
            ({11}, self.batching),
            ({13}, self.first_token),
        ]
        for numbers, step in steps:
            if numbers & only:
                step()

    # 10
    def kv_cache(self) -> None:
        s, model = self.settings, self.model
        prompt, ids, count = self._kv_prompt()
        self.log(f"target 10: {count} tokens after a {len(ids)}-token prompt, KV cache against recomputation")
        kv_generate(model, self.params, prompt, 8)  # warm-up: the session's first runs
        recompute_generate(model, ids, 8)
        kv_rates, re_rates, matched, first_difference = [], [], True, None
        kv_tokens: list[int] = []
        for repeat in range(s.repeats):
            started = time.perf_counter()
            kv_tokens = kv_generate(model, self.params, prompt, count)
            kv_s = time.perf_counter() - started
            started = time.perf_counter()
            re_tokens = recompute_generate(model, ids, count)
            re_s = time.perf_counter() - started
            kv_rates.append(len(kv_tokens) / kv_s)
            re_rates.append(len(re_tokens) / re_s)
            if kv_tokens != re_tokens:
                matched = False
                first_difference = next(
                    (i for i, (a, b) in enumerate(zip(kv_tokens, re_tokens, strict=False)) if a != b),
                    min(len(kv_tokens), len(re_tokens)),
                )
            self.log(
                f"  [{repeat + 1}/{s.repeats}] KV cache {kv_rates[-1]:.1f} tokens/s, recomputation "
                f"{re_rates[-1]:.1f} tokens/s, same tokens: {kv_tokens == re_tokens}"
            )
        kv, re = median(kv_rates), median(re_rates)
        ratio = kv / re if re else None
        passed = bool(ratio is not None and ratio >= TARGETS[10][1] and matched)
        self.results["kv_cache"] = {
            "prompt": prompt, "prompt_tokens": len(ids), "output_tokens": len(kv_tokens), "asked": count,
            "kv_tokens_per_s": kv_rates, "recompute_tokens_per_s": re_rates, "same_tokens": matched,
            "first_difference": first_difference,
        }  # fmt: skip
        self.target(
            10,
            target=f"KV cache / recomputation >= {TARGETS[10][1]:g}x tokens/s, same greedy tokens",
            ratio=ratio,
            passed=passed,
            measured=(
                f"{kv:.1f} vs {re:.1f} tokens/s ({len(kv_tokens)} tokens after a {len(ids)}-token prompt, "
                f"greedy, one sequence, in process); tokens "
                + ("identical" if matched else f"DIFFER from position {first_difference}")
            ),
            generator="in process",
        )

    def _kv_prompt(self) -> tuple[str, list[int], int]:
        """A prompt of `kv_prompt_words` words whose greedy continuation (if any candidate does)
        reaches the asked length without the end-of-sequence token; the token count asked is
        `kv_tokens`, or what the context leaves."""
        s, model = self.settings, self.model
        candidates = [
            " ".join(p.split()[: s.kv_prompt_words])
            for p in self.paragraphs[:: max(1, len(self.paragraphs) // 8)]
        ]
        chosen = None
        for prompt in candidates:
            ids = model.tokenizer.encode(prompt)
            count = min(s.kv_tokens, model.info.max_context - len(ids))
            tokens = kv_generate(model, self.params, prompt, count)
            if chosen is None or len(tokens) > chosen[3]:
                chosen = (prompt, ids, count, len(tokens))
            if len(tokens) >= count:
                break
        assert chosen is not None
        return chosen[0], chosen[1], chosen[2]

    # 12 (and 11's capacity)
    def served_in_process(self) -> None:
        s = self.settings
        mix = self.fits(load.plan(self.workload(1.0, 64), self.paragraphs))
        self.log(
            f"target 12: closed loop at concurrency {s.concurrency}, {s.closed_warmup_s:g} s warm-up + "
            f"{s.closed_duration_s:g} s, served (gRPC streaming) and in process, {s.repeats} repeats"
        )
        served_closed(self.grpc_url, GENERATE, mix[:4], 2, 0.5, 0.5)  # warm-up: connections, sessions
        served_runs, local_runs = [], []
        for repeat in range(s.repeats):
            local = inprocess_closed(
                self.model, self.params, mix, s.concurrency, s.closed_duration_s, s.closed_warmup_s
            )
            served = served_closed(
                self.grpc_url, GENERATE, mix, s.concurrency, s.closed_duration_s, s.closed_warmup_s
            )
            local_runs.append(local)
            served_runs.append(served)
            self.log(
                f"  [{repeat + 1}/{s.repeats}] served {served['tokens_per_s']:.1f} tokens/s "
                f"({served['requests_per_s']:.2f} req/s, {served['failed']} failed, generator CPU "
                f"{served['cpu']:.0%}); in process {local['tokens_per_s']:.1f} tokens/s "
                f"({local['requests_per_s']:.2f} req/s, decode batch {local['decode_batch_mean']:.1f})"
            )
        served_tp = median(r["tokens_per_s"] for r in served_runs)
        local_tp = median(r["tokens_per_s"] for r in local_runs)
        failed = sum(r["failed"] for r in served_runs)
        ratio = served_tp / local_tp if local_tp else None
        self.results["served_in_process"] = {
            "concurrency": s.concurrency, "served": served_runs, "in_process": local_runs,
        }  # fmt: skip
        self.results["capacity_requests_per_s"] = median(r["requests_per_s"] for r in served_runs)
        self.results["full_batch_tpot_ms"] = median(r["tpot_p50_ms"] or 0.0 for r in served_runs) or None
        self.target(
            12,
            target=f"served / in process >= {TARGETS[12][1]:g}x tokens/s at the same concurrency",
            ratio=ratio,
            passed=bool(ratio is not None and ratio >= TARGETS[12][1] and failed == 0),
            measured=(
                f"{served_tp:.1f} vs {local_tp:.1f} output tokens/s at concurrency {s.concurrency} "
                "(closed loop, "
                f"the Poisson mix's prompts and lengths, greedy); {failed} failed requests"
            ),
            generator_cpu=median(r["cpu"] for r in served_runs),
            generator="kiln generation generator (gRPC streaming)",
        )

    # 11
    def batching(self) -> None:
        s = self.settings
        capacity = self.results.get("capacity_requests_per_s")
        full_batch_tpot = self.results.get("full_batch_tpot_ms")
        if not capacity or not full_batch_tpot:
            raise RuntimeError("target 11 needs target 12's measured capacity and TPOT, which have no figure")
        alone, slo = self._goodput_slo(full_batch_tpot)
        rate = s.load_fraction * capacity
        requests = self.fits(load.plan(self.workload(rate, s.poisson_requests), self.paragraphs))
        self.log(
            f"target 11: Poisson {rate:.2f} req/s ({s.load_fraction:.0%} of the measured capacity "
            f"{capacity:.2f} req/s), {len(requests)} requests; goodput SLO TTFT <= {slo.ttft_ms:.1f} ms "
            f"({s.ttft_scale:g} x unloaded p50 {alone['ttft_ms']['p50']:.1f} ms), "
            f"TPOT <= {slo.tpot_ms:.1f} ms "
            f"({s.tpot_scale:g} x the p50 at concurrency {s.concurrency}, {full_batch_tpot:.1f} ms)"
        )
        runs = self._batching_runs(requests, slo)
        good = {m: median(r["goodput"] or 0.0 for r in rs) for m, rs in runs.items()}
        p95 = {m: median(r["ttft_ms"]["p95"] or float("inf") for r in rs) for m, rs in runs.items()}
        failed = sum(r["failed"] for rs in runs.values() for r in rs)
        good_ratio = (
            good[GENERATE] / good[STATIC] if good[STATIC] else (float("inf") if good[GENERATE] else None)
        )
        ttft_ratio = p95[STATIC] / p95[GENERATE] if p95[GENERATE] else None
        self.results["batching"] = {
            "rate": rate, "load_fraction": s.load_fraction, "capacity_requests_per_s": capacity,
            "unloaded": alone, "full_batch_tpot_ms": full_batch_tpot, "slo": dataclasses.asdict(slo),
            "runs": runs,
        }  # fmt: skip
        passed = bool(
            good_ratio is not None and good_ratio >= TARGETS[11][1]
            and ttft_ratio is not None and ttft_ratio >= TTFT_RATIO and failed == 0
        )  # fmt: skip
        self.target(
            11,
            target=(
                f"goodput continuous / static >= {TARGETS[11][1]:g}x and p95 TTFT static / continuous "
                f">= {TTFT_RATIO:g}x"
            ),
            ratio=good_ratio,
            passed=passed,
            measured=(
                f"at {rate:.2f} req/s Poisson ({s.load_fraction:.0%} of capacity): "
                f"goodput {good[GENERATE]:.2f} vs "
                f"{good[STATIC]:.2f} req/s; p95 TTFT {p95[GENERATE]:.0f} vs {p95[STATIC]:.0f} ms "
                f"({_x(ttft_ratio)} lower); SLO TTFT <= {slo.ttft_ms:.0f} ms, TPOT <= {slo.tpot_ms:.1f} ms; "
                f"{failed} failed"
            ),
            extra={"ttft_ratio": ttft_ratio},
            generator_cpu=median(r["cpu"] for r in runs[GENERATE]),
            generator="kiln generation generator (gRPC streaming, Poisson)",
        )

    def _goodput_slo(self, full_batch_tpot: float) -> tuple[dict[str, Any], load.GoodputSLO]:
        """Target 11's unloaded requests (one at a time) and the goodput SLO scaled from their TTFT
        p50 and from `full_batch_tpot` (target 12's TPOT p50 at full batch)."""
        s = self.settings
        unloaded = served_sequential(
            self.grpc_url,
            GENERATE,
            self.fits(load.plan(self.workload(1.0, s.unloaded_requests), self.paragraphs)),
        )
        alone = load.summarize(unloaded)
        if alone["failed"] or alone["ttft_ms"]["p50"] is None:
            raise RuntimeError(f"the unloaded requests failed: {alone['errors']}")
        slo = load.GoodputSLO(
            ttft_ms=s.ttft_scale * alone["ttft_ms"]["p50"], tpot_ms=s.tpot_scale * full_batch_tpot
        )
        return alone, slo

    def _batching_runs(
        self, requests: Sequence[load.PlannedRequest], slo: load.GoodputSLO
    ) -> dict[str, list[dict[str, Any]]]:
        """Target 11's open-loop runs: `requests` against continuous and static batching in turn,
        `repeats` times; each model's summaries."""
        s = self.settings
        runs: dict[str, list[dict[str, Any]]] = {GENERATE: [], STATIC: []}
        for repeat in range(s.repeats):
            for model in (GENERATE, STATIC):
                summary = served_open(self.grpc_url, model, requests, slo)
                runs[model].append(summary)
                self.log(
                    f"  [{repeat + 1}/{s.repeats}] {model}: goodput {summary['goodput'] or 0:.2f} req/s, "
                    f"p95 TTFT {summary['ttft_ms']['p95'] or 0:.1f} ms, "
                    f"{summary['output_tokens_per_s'] or 0:.1f} tokens/s, "
                    f"{summary['failed']} failed"
                )
        return runs

    # 13
    def first_token(self) -> None:
        s, model = self.settings, self.model
        prompt = self._first_token_prompt()
        request = load.PlannedRequest(
            index=0,
            arrival=0.0,
            prompt=prompt,
            prompt_id=0,
            max_tokens=1,
            temperature=0.0,
            top_p=1.0,
            seed=None,
        )
        self.log(
            f"target 13: TTFT at concurrency 1 ({len(model.tokenizer.encode(prompt))}-token prompt), "
            f"{s.ttft_requests} x"
        )
        first_token_rounds(self.grpc_url, model, self.params, request, 3)  # warm-up
        rounds = first_token_rounds(self.grpc_url, model, self.params, request, s.ttft_requests)
        p = {name: load.percentiles([v * 1e3 for v in values]) for name, values in rounds.items()}
        overhead = p["served"]["p50"] - p["in_process"]["p50"]
        bound = p["floor_stream"]["p50"] + TTFT_FLOOR_MARGIN_MS
        self.results["first_token"] = {"prompt": prompt, "ms": p}
        self.target(
            13,
            target=(
                f"served TTFT - in-process prefill <= the floor's round trip (identity, gRPC stream) + "
                f"{TTFT_FLOOR_MARGIN_MS:g} ms (p50s)"
            ),
            ratio=overhead / bound if bound > 0 else None,
            passed=overhead <= bound,
            measured=(
                f"TTFT p50 {p['served']['p50']:.2f} ms (p99 {p['served']['p99']:.2f}) served vs "
                f"{p['in_process']['p50']:.2f} ms in process: {overhead:.2f} ms more, bound {bound:.2f} ms "
                f"(identity round trip p50 {p['floor_stream']['p50']:.2f} ms over a gRPC stream, "
                f"{p['floor_unary']['p50']:.2f} ms unary, + {TTFT_FLOOR_MARGIN_MS:g} ms)"
            ),
            floor_ratio=p["served"]["p50"] / p["floor_stream"]["p50"] if p["floor_stream"]["p50"] else None,
            generator="kiln generation generator (gRPC streaming, concurrency 1)",
        )

    def _first_token_prompt(self) -> str:
        """A prompt of about 32 words whose first greedy token is visible text (so the first
        response is that token, not a later one)."""
        for paragraph in self.paragraphs:
            prompt = " ".join(paragraph.split()[:32])
            if inprocess_first_token(self.model, self.params, prompt)[1]:
                return prompt
        return " ".join(self.paragraphs[0].split()[:32])


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# --- running it -------------------------------------------------------------------------------


def start_server(artifacts: Path, out: Path, log: Log, stack: list[Callable[[], None]]) -> Any:
    """The embedded tritonserver on a temporary repository (`write_repository`); its log is
    `out/tritonserver-generation.log`. Stops are pushed on `stack`."""
    from kiln.server import FREE_PORT, TritonServer

    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-generation-"))
    stack.append(lambda: shutil.rmtree(folder, ignore_errors=True))
    repository = write_repository(folder / "repository", artifacts)
    models = [GENERATE, STATIC, floor.IDENTITY]
    server = TritonServer(
        repository,
        http_port=FREE_PORT,
        grpc_port=FREE_PORT,
        metrics_port=FREE_PORT,
        model_control_mode="explicit",
        load_models=models,
        log_file=out / "tritonserver-generation.log",
    )
    log(f"generation: starting tritonserver ({', '.join(models)}) on {repository} ...")
    server.start()
    stack.append(server.stop)
    log(f"generation: serving on grpc {server.grpc_url}, http {server.http_url}")
    return server


def run(
    settings: Settings,
    out: Path,
    log: Log,
    artifacts: Path | None = None,
    only: set[int] | None = None,
) -> dict[str, Any]:
    """Starts the server, runs the comparisons, stops it; returns {"targets": [...], "details": {...},
    "commands": [...]} (targets in `benchmarks.run`'s format)."""
    artifacts = Path(artifacts) if artifacts else default_artifacts()
    stack: list[Callable[[], None]] = []
    try:
        server = start_server(artifacts, out, log, stack)
        bench = GenerationBench(settings, server.grpc_url, artifacts, log)
        bench.run(only)
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception as error:  # noqa: BLE001
                log(f"cleanup: {error}")
    return {
        "targets": [bench.targets[n] for n in sorted(bench.targets)],
        "details": bench.results,
        "commands": [
            f"# generation: kiln.server.TritonServer(<temporary repository: {GENERATE}, {STATIC}, "
            f"{floor.IDENTITY}; {artifacts}>, model_control_mode='explicit')"
        ],
    }


def section(details: dict[str, Any]) -> str:
    """The report's "Generation" section (targets 10-13's figures) from `run`'s details."""
    if not details:
        return "Not run.\n"
    info, params = details.get("model_info", {}), details.get("params", {})
    lines = [
        f"Model: {details.get('artifacts')} ({info.get('num_layers')} layers, "
        f"{info.get('num_heads')} heads x "
        f"{info.get('head_dim')}, vocabulary {info.get('vocab_size')}, context {info.get('max_context')}); "
        f"engine parameters as served: max_running {params.get('max_running')}, kv_cache_tokens "
        f"{params.get('kv_cache_tokens')}, intra_op_threads {params.get('intra_op_threads')}.\n",
    ]
    kv = details.get("kv_cache")
    if kv:
        lines.append(
            f"**KV cache (10)**: {kv['output_tokens']} tokens (asked {kv['asked']}) after a "
            f"{kv['prompt_tokens']}-token "
            f"prompt; tokens/s per repeat: KV cache {_list(kv['kv_tokens_per_s'])}, recomputation "
            f"{_list(kv['recompute_tokens_per_s'])}; same tokens: {kv['same_tokens']}.\n"
        )
    served = details.get("served_in_process")
    if served:
        lines += _served_lines(served)
    batching = details.get("batching")
    if batching:
        lines += _batching_lines(batching)
    first = details.get("first_token")
    if first:
        ms = first["ms"]
        lines.append(
            "**TTFT at concurrency 1 (13)**, p50 / p95 / p99 ms: served "
            f"{_p(ms['served'], 'p50', 'p95', 'p99')}; in process (tokenize, prefill, sample) "
            f"{_p(ms['in_process'], 'p50', 'p95', 'p99')}; the floor (identity over a gRPC stream, "
            "the verdict's) "
            f"{_p(ms['floor_stream'], 'p50', 'p95', 'p99')}; identity through unary gRPC "
            f"{_p(ms['floor_unary'], 'p50', 'p95', 'p99')}.\n"
        )
    return "\n".join(lines) + "\n"


def _served_lines(served: dict[str, Any]) -> list[str]:
    """The section's lines for target 12: served against in process, one table row per repeat."""
    lines = [
        f"**Served against in process (12)**, closed loop at concurrency {served['concurrency']}:\n",
        "| repeat | served tokens/s | served req/s | failed | generator CPU | in-process tokens/s | "
        "in-process req/s | decode batch |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, (s, p) in enumerate(zip(served["served"], served["in_process"], strict=False)):
        lines.append(
            f"| {i + 1} | {s['tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | {s['failed']} | "
            f"{s['cpu']:.0%} | "
            f"{p['tokens_per_s']:.1f} | {p['requests_per_s']:.2f} | {p['decode_batch_mean']:.1f} |"
        )
    lines.append("")
    return lines


def _batching_lines(batching: dict[str, Any]) -> list[str]:
    """The section's lines for target 11: the goodput SLO, then one table row per model and repeat."""
    slo = batching["slo"]
    lines = [
        f"**Continuous against static batching (11)**: Poisson {batching['rate']:.2f} req/s "
        f"({batching['load_fraction']:.0%} of the capacity "
        f"{batching['capacity_requests_per_s']:.2f} req/s); goodput SLO TTFT <= {slo['ttft_ms']:.1f} ms "
        f"(unloaded p50 {batching['unloaded']['ttft_ms']['p50']:.1f} ms), "
        f"TPOT <= {slo['tpot_ms']:.1f} ms (p50 at the closed loop's full batch "
        f"{batching['full_batch_tpot_ms']:.1f} ms; unloaded "
        f"{_n(batching['unloaded']['tpot_ms']['p50'])} ms).\n",
        "| model | repeat | goodput req/s | req/s | tokens/s | TTFT p50 / p95 / p99 ms | "
        "TPOT p50 / p95 ms | "
        "ITL p50 / p95 ms | E2E p50 / p95 ms | failed |",
        "| --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- | ---: |",
    ]
    for model, runs in batching["runs"].items():
        for i, r in enumerate(runs):
            lines.append(
                f"| {model} | {i + 1} | {_n(r['goodput'], 2)} | {_n(r['request_throughput'], 2)} | "
                f"{_n(r['output_tokens_per_s'])} | {_p(r['ttft_ms'], 'p50', 'p95', 'p99')} | "
                f"{_p(r['tpot_ms'], 'p50', 'p95')} | {_p(r['itl_ms'], 'p50', 'p95')} | "
                f"{_p(r['e2e_ms'], 'p50', 'p95')} | "
                f"{r['failed']} |"
            )
    lines.append("")
    return lines


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _p(figures: dict[str, Any], *keys: str) -> str:
    return " / ".join(_n(figures.get(k), 2) for k in keys)


def _list(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="one repeat, short cells: a dry run")
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats per comparison (medians are quoted)"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated targets (10-13; 11 runs 12 for its capacity)"
    )
    parser.add_argument(
        "--artifacts", type=Path, default=None,
        help="folder with model.onnx, tokenizer.json, generation.json (default: the built tinylm)",
    )  # fmt: skip
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default results/bench-generation-<UTC>-<commit>)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs targets 10-13 alone; 0 when they ran (targets may be missed), 1 when one could not."""
    args = parse_args(argv)
    settings, only = _settings_from(args)
    commit = environment.commit()
    out = args.out or paths.ROOT / "results" / f"bench-generation-{environment.utc_stamp()}-{commit}"
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.generation", *(sys.argv[1:] if argv is None else argv)])

    def log(text: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    machine = environment.machine_info()
    log(f"results go to {out}")
    log(environment.describe_machine(machine))
    started = time.monotonic()
    failed: list[str] = []
    try:
        result = run(settings, out, log, args.artifacts, only)
    except Exception as error:  # noqa: BLE001 - written into the results, exit status 1
        import traceback

        log(traceback.format_exc())
        failed.append(f"{type(error).__name__}: {error}")
        result = {"targets": [], "details": {}, "commands": []}
    results = {
        "date_utc": environment.utc_stamp(),
        "commit": commit,
        "command": command,
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "targets": result["targets"],
        "generation": result["details"],
        "commands": result["commands"],
        "failed": failed,
        "wall_s": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = _report_markdown(results, result)
    (out / "results.md").write_text(text)
    print(text, flush=True)
    log(f"done in {results['wall_s']:.0f} s; results in {out}")
    return 1 if failed else 0


def _settings_from(args: argparse.Namespace) -> tuple[Settings, set[int]]:
    """The settings (`--quick`, `--repeats`) and the targets to run (`--only`) from the command line."""
    settings = QUICK if args.quick else FULL
    if args.repeats is not None:
        settings = dataclasses.replace(settings, repeats=args.repeats)
    from benchmarks import report

    return settings, report.parse_only(args.only, TARGETS)


def _report_markdown(results: dict[str, Any], result: dict[str, Any]) -> str:
    """results.md: the header, the targets table, the generation section and the commands."""
    from benchmarks import report

    command, failed = results["command"], results["failed"]
    return "\n".join(
        [
            f"# kiln generation benchmark: {results['date_utc']}, commit {results['commit']}\n",
            f"- Machine: {environment.describe_machine(results['machine'])}",
            f"- Command: `{command}` (total {results['wall_s']:.0f} s)",
            f"- Settings: {results['settings']}",
            "",
            "## Targets\n",
            report.targets_table(results),
            "",
            *(["**Could not run:**", *[f"- {f}" for f in failed], ""] if failed else []),
            "## Generation (targets 10-13)\n",
            section(result["details"]),
            "## Commands\n",
            "```",
            command,
            *result["commands"],
            "```",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
