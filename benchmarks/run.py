"""`make bench`: kiln side by side with the alternatives and with the server's own floor, in one
run, on one machine.

    python -m benchmarks.run                       # everything, ~15 minutes on 2 cores
    python -m benchmarks.run --quick               # every target, tiny grids (~4 minutes)
    python -m benchmarks.run --device gpu          # a GPU host: models on CUDA, baseline on CUDA
    python -m benchmarks.run --http-url H:8000 --grpc-url H:8001   # a running kiln server

The comparisons of issue 6 and the targets of issue 13, each measured side by side in the same
run, with the same load generator (`benchmarks.loadgen`: closed loop at a concurrency, or open
loop at a rate; or perf_analyzer, `benchmarks.perf`) and the same request mix (`loadtests.inputs`),
every answer checked (`loadtests.checks`), repeats interleaved (repeat 1 of every system, then
repeat 2, ...) and medians quoted. The main server also serves the floor (`benchmarks.floor`: a
bare Python-based identity model) and each pipeline's other form; every figure is also given as a
ratio to the floor's at the same load with the same generator:

1. Serving efficiency: `image_classifier_int8` over gRPC at saturation (the best of the
   concurrency grid) against the in-process reference pipeline (`benchmarks.inprocess`).
2. Against FastAPI + PyTorch eager (`benchmarks.baseline_fastapi`, FP32, one request at a time):
   kiln INT8 and kiln FP32, all over HTTP, at the same concurrencies: throughput ratio and p99.
3. INT8 against FP32, both served (gRPC, same concurrency).
4. Dynamic batching on against off (a variant repository without any batcher, a fused
   pipeline's own included, `benchmarks.variants`) for `fraud_scorer` (judged, >= 3x) and
   `digits_reader` (reported) at concurrency 32.
5. Each pipeline's default form against its slowest step served alone (perf_analyzer, the steps
   fed the tensors that flow through the pipeline), and the server-side time each step adds.
6. Capacity: the highest open-loop rate with p99 under 10 ms of `fraud_scorer` and of the floor,
   both searched with perf_analyzer's C++ generator (doubling, then bisection); >= 0.6x the
   floor's. The Python open-loop generator's search is a cross-check, and its own ceiling is its
   search against the floor; a probe the generator could not offer is said so, never a 0.
7. Both forms of each pipeline against the floor (perf_analyzer): p50/p99 at concurrency 1 and
   throughput at 16, which form is faster; `fraud_scorer`'s default form p50 <= 1.5x and p99 <=
   2x the floor's at concurrency 1.
8. `text_embedder` on mixed lengths >= 0.9x on one length (concurrency 16), and
9. `text_encoder`'s average batch over those runs >= 4 (Triton's statistics API).
10-13. Generation (`benchmarks.generation`, on its own server serving `tinylm_generate` with
   continuous and with static batching, and the floor): the KV cache against recomputing the
   prefix (tokens/s, >= 5x), continuous against static batching under the same seeded Poisson
   load (goodput >= 2x, p95 TTFT >= 3x lower), served against the same engine in process (tokens/s
   >= 0.9x), TTFT at concurrency 1 against the in-process prefill (<= the floor's round trip + 1 ms).

Every figure carries the generator's CPU share of the machine (and the server's when it runs
here): on 2 cores the generator competes with the server. A missed target says by how much and,
where perf_analyzer gives it, where the server-side time goes.

Results: `results/bench-<UTC time>-<commit>/` with `results.md` (the tables, PASS/MISS stated
plainly), `results.json` (everything, every repeat), plots, the request mixes, the server logs,
and the exact commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from benchmarks import capacity, floor, generation, inprocess, loadgen, perf, report, variants
from kiln import paths, tensors
from loadtests import checks, environment, inputs, wire

MODELS = (
    tensors.IMAGE_CLASSIFIER_INT8,
    tensors.IMAGE_CLASSIFIER,
    tensors.DIGITS_READER,
    tensors.FRAUD_SCORER,
    tensors.TEXT_EMBEDDER,
)
"""The served models the benchmark loads and sends requests to."""
FLOOR = floor.IDENTITY
"""The floor model, served beside the pipelines: every figure is also a ratio to its figure."""
BATCHING_MODELS = (tensors.FRAUD_SCORER, tensors.DIGITS_READER)
"""Target 4's pipelines, served again without dynamic batching (the verdict is fraud_scorer's;
digits_reader is reported beside it)."""
BATCHING_JUDGED = tensors.FRAUD_SCORER
PIPELINES = (
    tensors.IMAGE_CLASSIFIER_INT8, tensors.FRAUD_SCORER, tensors.TEXT_EMBEDDER, tensors.IMAGE_CLASSIFIER,
    tensors.DIGITS_READER,
)
"""The pipelines served in both forms (the spec's default and the other, `variants.other_form`):
all five, so that the forms table shows for each which form is faster (its default must be)."""
SLOW_FORMS = (tensors.IMAGE_CLASSIFIER_INT8, tensors.IMAGE_CLASSIFIER)
"""Pipelines measured with twice the forms window (resnet50: tens of requests a second)."""
CAPACITY_MODEL = tensors.FRAUD_SCORER
CAPACITY_P99_MS = 10.0
"""Target 6: the p99 a rate must hold."""
LATENCY_MODEL = tensors.FRAUD_SCORER
"""Target 7: the pipeline whose latency at concurrency 1 is judged against the floor's."""
TEXT_MODEL = tensors.TEXT_EMBEDDER
TEXT_STEP = "text_encoder"
"""Targets 8 and 9: the text pipeline and its model step (whose average batch is judged)."""
CAPACITY_PERF_STABILITY = 10_000.0
"""perf_analyzer's stability bound for capacity probes: a probe is judged on its p99 and delivered
rate, so an unstable window is a figure, not a missing one."""
CAPACITY_MIN_RATE = 10.0
CAPACITY_MAX_RATE = 100_000.0
"""The capacity search's bounds (requests per second)."""
CAPACITY_MIN_DELIVERED = 0.97
"""A rate is held only when at least this share of it completed (no silent backlog)."""
BASELINE_STARTUP_S = 180.0
STEP_INPUT_ITEMS = 256
"""A step measured alone (target 5, `kiln tune`) gets the tensors its pipeline's steps receive for
the mix's first STEP_INPUT_ITEMS requests (every shipped mix whole: fraud's 200 records, digits'
64, text's 18, the 10 images); target 5 sends the pipeline those same requests. (Until 2026-12-04
the steps got the first 12 only: for text_embedder the 12 shortest texts, against the pipeline's
whole mix with its two 128-token texts, 2.3x the encoder's time per text.)"""
STEP_INPUT_ELEMENTS = 500_000
STEP_INPUT_MIN_ITEMS = 2
"""A step's input file keeps at most this many tensor elements (at least 2 requests): resnet50's
images are 150,528 floats each, as JSON text about 2.6 MB an image."""
TARGETS = {
    1: ("Serving efficiency", 0.90),
    2: ("Against FastAPI + PyTorch eager", 5.0),
    3: ("INT8 against FP32, both served", 2.5),
    4: ("Dynamic batching on against off (fraud_scorer)", 3.0),
    5: ("Each pipeline's default form against its slowest step alone", 0.90),
    6: ("Capacity of fraud_scorer at p99 < 10 ms against the floor's", 0.6),
    7: ("fraud_scorer latency at concurrency 1 against the floor's (p50; p99)", 1.5),
    8: ("text_embedder on mixed lengths against one length", 0.9),
    9: ("text_encoder's average batch at concurrency 16 (mixed lengths)", 4.0),
    **generation.TARGETS,
}
LATENCY_P99_LIMIT = 2.0
"""Target 7's second bound: p99 <= this times the floor's p99 (the first, p50, is TARGETS[7])."""
GENERATION_TARGETS = frozenset(generation.TARGETS)
"""Targets 10-13 (`benchmarks.generation`): measured on their own server, started by their step."""


@dataclass(frozen=True)
class Settings:
    """Grid sizes and durations (scale them up with the flags for steadier figures)."""

    duration_s: float = 4.0
    warmup_s: float = 1.0
    repeats: int = 3
    image_grid: tuple[int, ...] = (1, 4, 16, 32)
    http_grid: tuple[int, ...] = (1, 16)
    compare_concurrency: int = 16
    batching_concurrency: int = 32
    ensembles: tuple[str, ...] = (tensors.IMAGE_CLASSIFIER_INT8, tensors.FRAUD_SCORER, tensors.TEXT_EMBEDDER)
    ensemble_concurrency: dict[str, int] = field(
        default_factory=lambda: {
            tensors.IMAGE_CLASSIFIER_INT8: 16,
            tensors.FRAUD_SCORER: 32,
            tensors.TEXT_EMBEDDER: 16,
        }
    )
    perf_ms: int = 2000
    perf_ms_slow: int = 4000
    """perf_analyzer's window for the image models (tens of requests a second: longer windows)."""
    perf_trials: int = 4
    capacity_start: float = 100.0
    capacity_bisections: int = 3
    capacity_duration_s: float = 3.0
    capacity_perf_ms: int = 1500
    """perf_analyzer's window per capacity probe (3 windows a probe)."""
    forms_concurrency: dict[str, int] = field(
        default_factory=lambda: {
            tensors.IMAGE_CLASSIFIER_INT8: 16,
            tensors.FRAUD_SCORER: 16,
            tensors.TEXT_EMBEDDER: 16,
        }
    )
    """The comparison concurrency of the forms table (throughput); latency is at concurrency 1."""
    forms: tuple[str, ...] = PIPELINES
    """The pipelines of the forms table (fraud_scorer, target 7's, always)."""
    forms_perf_ms: int = 1000
    """perf_analyzer's window in the forms block (14 runs a repeat: short windows, more repeats)."""
    text_concurrency: int = 16


FULL = Settings()
QUICK = Settings(
    duration_s=1.5,
    warmup_s=0.5,
    repeats=1,
    image_grid=(1, 8),
    http_grid=(8,),
    compare_concurrency=8,
    batching_concurrency=32,
    ensembles=(tensors.FRAUD_SCORER,),
    perf_ms=800,
    perf_ms_slow=2000,
    perf_trials=3,
    capacity_start=200.0,
    capacity_bisections=1,
    capacity_duration_s=1.5,
    capacity_perf_ms=600,
    forms=(tensors.FRAUD_SCORER,),
    forms_perf_ms=600,
)


@dataclass
class Endpoint:
    """A Triton server the benchmark talks to."""

    name: str
    http_url: str
    grpc_url: str
    pids: tuple[int, ...] = ()


@dataclass
class Plan:
    """One cell: a system at a load, measured `repeats` times."""

    id: str
    comparison: int
    system: str
    transport: str
    mode: str  # "closed", "open" or "in-process"
    level: float
    measure: Callable[[int], loadgen.Run]
    warm: tuple[str, Callable[[], list[str]]] | None = None
    """(key, function): sends the mix once before the system's first cell (once per key)."""


class Bench:
    """One benchmark run: its settings, servers, request mixes and results."""

    def __init__(self, args: argparse.Namespace, settings: Settings, out: Path) -> None:
        self.args = args
        self.settings = settings
        self.out = out
        self.cells: dict[str, dict[str, Any]] = {}
        self.perf: list[dict[str, Any]] = []
        self.targets: dict[int, dict[str, Any]] = {}
        self.ensembles: list[dict[str, Any]] = []
        self.capacity: dict[str, Any] = {}
        self.forms: list[dict[str, Any]] = []
        self.text: dict[str, Any] = {}
        self.generation: dict[str, Any] = {}
        self.commands: list[str] = []
        self.notes: list[str] = []
        self.corpora: dict[str, inputs.Corpus] = {}
        self.checkers: dict[str, checks.Checker] = {}
        self.mixes: dict[str, wire.EncodedMix] = {}
        self.main: Endpoint | None = None
        self.nobatch: Endpoint | None = None
        self.baseline_url: str | None = None
        self.baseline_pid: int | None = None
        self._warmed: set[str] = set()

    # --- bookkeeping ---

    def log(self, text: str) -> None:
        """Progress, to stdout."""
        print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)

    def corpus(self, model: str) -> inputs.Corpus:
        """The request mix of `model` (built once); the floor's is `benchmarks.floor.corpus()`."""
        if model == FLOOR and model not in self.corpora:
            self.corpora[model] = floor.corpus()
            self.checkers[model] = floor.Checker()  # type: ignore[assignment]
            self.mixes[model] = wire.encode(self.corpora[model], [floor.IDENTITY_OUTPUT])
        if model not in self.corpora:
            corpus = inputs.build(model, reference=not self.args.no_reference)
            inputs.save(corpus, self.out / "inputs" / f"{model}.pkl")
            self.corpora[model] = corpus
            self.checkers[model] = checks.Checker.for_model(model)
            self.mixes[model] = wire.encode(corpus, [o.name for o in self.checkers[model].contract.outputs])
            self.log(f"request mix: {corpus.summary()}")
        return self.corpora[model]

    def target_for(self, endpoint: Endpoint, model: str, transport: str) -> loadgen.Target:
        """A fresh generator target for `model` on `endpoint` over `transport` ("gRPC" or "HTTP")."""
        mix = self.mixes[model]
        if transport == "gRPC":
            return loadgen.TritonGrpc(endpoint.grpc_url, mix)
        return loadgen.TritonHttp(endpoint.http_url, mix)

    def plan(
        self,
        id_: str,
        comparison: int,
        system: str,
        endpoint: Endpoint,
        model: str,
        transport: str,
        concurrency: int,
    ) -> Plan:
        """A closed-loop cell of `model` on `endpoint`, warmed once per (endpoint, model, transport)."""
        corpus = self.corpus(model)
        checker = self.checkers[model]

        def measure(repeat: int) -> loadgen.Run:
            return loadgen.run_closed(
                self.target_for(endpoint, model, transport),
                corpus,
                checker,
                concurrency,
                self.settings.duration_s,
                self.settings.warmup_s,
                endpoint.pids,
                seed=repeat,
            )

        def warm() -> list[str]:
            return loadgen.run_warm_up(self.target_for(endpoint, model, transport), corpus, checker)

        key = f"{endpoint.name}/{model}/{transport}"
        return Plan(id_, comparison, system, transport, "closed", concurrency, measure, (key, warm))

    def floor_plans(self, plans: Sequence[Plan]) -> list[Plan]:
        """The floor model on the main server at every (transport, concurrency) of the closed-loop
        `plans`, with the same generator: cells `floor/<transport>-c<concurrency>`."""
        if self.main is None:
            return []
        levels = sorted({(p.transport, int(p.level)) for p in plans if p.mode == "closed"})
        known = {p.id for p in plans}
        made = [
            self.plan(floor_cell(t, c), 0, f"floor ({FLOOR})", self.main, FLOOR, t, c)
            for t, c in levels
            if t in ("gRPC", "HTTP")
        ]
        return [p for p in made if p.id not in known]

    def side_by_side(self, plans: Sequence[Plan]) -> None:
        """Measures every plan `repeats` times, interleaved: repeat r of all, then r + 1; the floor
        at each of their closed-loop loads is measured among them (`floor_plans`)."""
        plans = [*plans, *self.floor_plans(plans)]
        for plan in plans:
            self.cells.setdefault(
                plan.id,
                {
                    "id": plan.id,
                    "comparison": plan.comparison,
                    "system": plan.system,
                    "transport": plan.transport,
                    "mode": plan.mode,
                    "level": plan.level,
                    "runs": [],
                },
            )
        for plan in plans:
            if plan.warm is None or plan.warm[0] in self._warmed:
                continue
            self._warmed.add(plan.warm[0])
            try:
                errors = plan.warm[1]()
            except Exception as error:  # noqa: BLE001 - its cells will fail and say why
                errors = [f"{type(error).__name__}: {error}"]
            self.log(
                f"warmed {plan.warm[0]}" + (f": {len(errors)} errors, first: {errors[0]}" if errors else "")
            )
        for repeat in range(self.settings.repeats):
            for plan in plans:
                try:
                    run = plan.measure(repeat)
                except Exception as error:  # noqa: BLE001 - one broken cell must not end the run
                    self.log(f"{plan.id}: FAILED: {error}")
                    self.cells[plan.id].setdefault("errors", []).append(f"{type(error).__name__}: {error}")
                    continue
                self.cells[plan.id]["runs"].append(run.to_json())
                self.log(
                    f"{plan.id} [{repeat + 1}/{self.settings.repeats}]: {run.throughput:.1f}/s, "
                    f"p99 {_ms(run.p99_ms)}, failures {run.failures}, generator CPU {_pct(run.generator_cpu)}"
                    + (f", errors {run.errors[:2]}" if run.errors else "")
                )
        for plan in plans:
            self.cells[plan.id]["median"] = medians(self.cells[plan.id]["runs"])

    def pa(self, comparison: int, id_: str, model: str, input_file: Path, **kwargs: Any) -> perf.PerfResult:
        """One perf_analyzer run against the main server (or `endpoint=`), recorded; before the
        first run at a concurrency, the floor at that concurrency (`floor_pa`)."""
        if kwargs.get("concurrency") is not None and model != FLOOR:
            self.floor_pa(kwargs["concurrency"], only_if_missing=True)
        endpoint = kwargs.pop("endpoint", None) or self.main
        cell = kwargs.pop("cell", None)
        window = self.settings.perf_ms_slow if kwargs.pop("slow", False) else self.settings.perf_ms
        window = kwargs.pop("window_ms", None) or window
        assert endpoint is not None
        result = perf.run(
            model,
            endpoint.grpc_url,
            input_file,
            measurement_ms=window,
            max_trials=self.settings.perf_trials,
            **kwargs,
        )
        self.commands.append(" ".join(result.command))
        entry = {"id": id_, "comparison": comparison, "cell": cell, **result.to_json()}
        self.perf.append(entry)
        if result.error:
            self.log(f"perf_analyzer {id_}: {result.error}")
        else:
            self.log(
                f"perf_analyzer {id_}: {result.throughput:.1f}/s, p99 {_ms(result.p99_ms)}, "
                f"CPU {_pct(result.generator_cpu)}"
            )
        return result

    def floor_pa(
        self, concurrency: int, only_if_missing: bool = False, tag: str = "", window_ms: int | None = None
    ) -> perf.PerfResult | None:
        """perf_analyzer on the floor model at `concurrency` (entry `floor/pa-c<c><tag>`, with
        `window_ms` when given); with `only_if_missing`, only when no floor entry at that
        concurrency exists yet."""
        if only_if_missing and any(
            e["model"] == FLOOR and e["mode"] == "concurrency" and e["level"] == concurrency
            for e in self.perf
        ):
            return None
        path = floor.input_file(self.out / "perf_inputs" / f"{FLOOR}.json")
        return self.pa(
            0, f"floor/pa-c{concurrency}{tag}", FLOOR, path, concurrency=concurrency, window_ms=window_ms
        )

    def input_file(self, model: str) -> Path:
        """perf_analyzer's input data for `model`: the request mix."""
        path = self.out / "perf_inputs" / f"{model}.json"
        if not path.is_file():
            perf.input_file([item.inputs for item in self.corpus(model).items], path)
        return path

    def median_of(self, cell_id: str, key: str) -> float | None:
        """A cell's median figure."""
        cell = self.cells.get(cell_id)
        return None if cell is None else cell.get("median", {}).get(key)

    def perf_entry(self, id_: str) -> dict[str, Any] | None:
        """A recorded perf_analyzer result."""
        return next((p for p in self.perf if p["id"] == id_), None)

    def target(self, number: int, **fields: Any) -> None:
        """Records target `number`'s outcome."""
        title, threshold = TARGETS[number]
        self.targets[number] = {"number": number, "title": title, "threshold": threshold, **fields}

    # --- servers ---

    def start_servers(self, stack: list[Callable[[], None]]) -> None:
        """The main server (embedded unless a URL was given), the no-batching variant, FastAPI."""
        args = self.args
        self.start_baseline(stack)
        if args.http_url:
            self.main = Endpoint("kiln (given URL)", args.http_url, args.grpc_url)
            self.notes.append(
                f"A running server was given: it must serve the floor model {FLOOR!r} "
                "(`benchmarks.floor.write`) and each pipeline's other form (`<pipeline>_<form>`) "
                "for the floor ratios and the forms table."
            )
        else:
            gpu = variants.on_gpu if args.device == "gpu" else variants.identity
            others = [variants.other_form(checks.served(p)) for p in PIPELINES]
            self.main = self.embedded(
                "kiln", "kiln", gpu, main_models(others), stack, others, with_floor=True
            )
        if args.nobatch_http_url:
            self.nobatch = Endpoint(
                "kiln without batching (given URL)", args.nobatch_http_url, args.nobatch_grpc_url
            )
        elif not args.http_url:

            def transform(spec: Any) -> Any:
                spec = variants.without_dynamic_batching(spec)
                return variants.on_gpu(spec) if args.device == "gpu" else spec

            self.nobatch = self.embedded(
                "kiln, dynamic batching off", "nobatch", transform, BATCHING_MODELS, stack
            )
        else:
            self.notes.append(
                "Target 4 was not run: a running server was given (--http-url) but no server without "
                "dynamic batching (--nobatch-http-url / --nobatch-grpc-url)."
            )
        self.wait_baseline()

    def embedded(
        self,
        name: str,
        slug: str,
        transform: Callable[[Any], Any],
        models: Sequence[str],
        stack: list[Callable[[], None]],
        extra_specs: Sequence[Any] = (),
        with_floor: bool = False,
    ) -> Endpoint:
        """Starts an embedded tritonserver on a variant repository (every served spec after
        `transform`, plus `extra_specs`, plus the floor model when `with_floor`); its log is
        `tritonserver-<slug>.log` in the results."""
        from kiln.registry import specs as served
        from kiln.server import FREE_PORT, TritonServer

        folder = Path(tempfile.mkdtemp(prefix="kiln-bench-repo-"))
        stack.append(lambda: shutil.rmtree(folder, ignore_errors=True))
        repository = variants.variant_repository(folder / "repository", transform, [*served(), *extra_specs])
        if with_floor:
            floor.write(repository)
        self.log(f"{name}: variant repository {repository}")
        server = TritonServer(
            repository,
            http_port=FREE_PORT,
            grpc_port=FREE_PORT,
            metrics_port=FREE_PORT,
            model_control_mode="explicit",
            load_models=list(models),
            log_file=self.out / f"tritonserver-{slug}.log",
        )
        self.log(f"{name}: starting tritonserver ({', '.join(models)}) ...")
        started = time.monotonic()
        server.start()
        stack.append(server.stop)
        self.log(
            f"{name}: ready in {time.monotonic() - started:.0f} s, "
            f"http {server.http_url}, grpc {server.grpc_url}"
        )
        self.commands.append(
            f"# {name}: kiln.server.TritonServer({repository}, model_control_mode='explicit', "
            f"load_models={list(models)}) -> tritonserver pid {server.pid}"
        )
        return Endpoint(name, server.http_url, server.grpc_url, (server.pid,) if server.pid else ())

    def start_baseline(self, stack: list[Callable[[], None]]) -> None:
        """Starts `uvicorn benchmarks.baseline_fastapi:app` (one worker) on a free port."""
        from kiln.server import pick_free_ports

        port = pick_free_ports("127.0.0.1", 1)[0]
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "benchmarks.baseline_fastapi:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--log-level",
            "warning",
            "--no-access-log",
        ]
        env = dict(os.environ)
        env["KILN_BASELINE_DEVICE"] = "cuda" if self.args.device == "gpu" else "cpu"
        log = open(self.out / "baseline_fastapi.log", "w")  # noqa: SIM115 - closed on exit
        process = subprocess.Popen(command, cwd=paths.ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

        def stop() -> None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()

        stack.append(stop)
        self.baseline_url = f"127.0.0.1:{port}"
        self.baseline_pid = process.pid
        self._baseline_process = process
        self.commands.append(f"KILN_BASELINE_DEVICE={env['KILN_BASELINE_DEVICE']} " + " ".join(command))

    def wait_baseline(self) -> None:
        """Waits until the baseline answers /health with the model loaded."""
        deadline = time.monotonic() + BASELINE_STARTUP_S
        while time.monotonic() < deadline:
            if self._baseline_process.poll() is not None:
                raise RuntimeError(f"the FastAPI baseline exited; see {self.out / 'baseline_fastapi.log'}")
            try:
                with urllib.request.urlopen(f"http://{self.baseline_url}/health", timeout=2) as response:
                    if json.loads(response.read()).get("status") == "ready":
                        self.log(f"FastAPI baseline ready on {self.baseline_url}")
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the FastAPI baseline was not ready after {BASELINE_STARTUP_S:.0f} s")

    # --- the comparisons ---

    def image_comparisons(self) -> None:
        """Targets 1, 2 and 3: one side-by-side block of every image system."""
        s, main = self.settings, self.main
        assert main is not None
        int8, fp32 = tensors.IMAGE_CLASSIFIER_INT8, tensors.IMAGE_CLASSIFIER
        for model in (int8, fp32):
            self.corpus(model)
        reference = inprocess.classifier(int8, self.args.device)

        def in_process(repeat: int) -> loadgen.Run:
            return inprocess.measure(
                reference, self.corpora[int8], self.checkers[int8], s.duration_s, s.warmup_s
            )

        plans = [
            Plan(
                "1/reference-int8", 1, "in-process reference, INT8", "in-process", "in-process", 0, in_process
            )
        ]
        for c in sorted({*s.image_grid, s.compare_concurrency}):
            plans.append(self.plan(f"1/kiln-int8-grpc-c{c}", 1, "kiln INT8", main, int8, "gRPC", c))
        c = s.compare_concurrency
        plans.append(self.plan(f"3/kiln-fp32-grpc-c{c}", 3, "kiln FP32", main, fp32, "gRPC", c))
        for c in s.http_grid:
            plans.append(self._baseline(f"2/baseline-fp32-http-c{c}", self.corpora[fp32], c))
            plans.append(self.plan(f"2/kiln-int8-http-c{c}", 2, "kiln INT8", main, int8, "HTTP", c))
            plans.append(self.plan(f"2/kiln-fp32-http-c{c}", 2, "kiln FP32", main, fp32, "HTTP", c))
        self.log(f"targets 1-3: {len(plans)} cells x {s.repeats} repeats")
        self.side_by_side(plans)
        c = s.compare_concurrency
        for number, model, cell in ((1, int8, f"1/kiln-int8-grpc-c{c}"), (3, fp32, f"3/kiln-fp32-grpc-c{c}")):
            id_ = f"{number}/pa-{'int8' if model == int8 else 'fp32'}-c{c}"
            self.pa(number, id_, model, self.input_file(model), concurrency=c, cell=cell, slow=True)
        self._score_image_targets()

    def _baseline(self, id_: str, corpus: inputs.Corpus, concurrency: int) -> Plan:
        """A closed-loop cell of the FastAPI baseline, with the FP32 pipeline's checks."""
        checker = self.checkers.setdefault("baseline", checks.Checker.for_model(tensors.IMAGE_CLASSIFIER))

        def target() -> loadgen.Target:
            assert self.baseline_url is not None
            return loadgen.BaselineHttp(self.baseline_url, corpus)

        def measure(repeat: int) -> loadgen.Run:
            pids = (self.baseline_pid,) if self.baseline_pid else ()
            return loadgen.run_closed(
                target(),
                corpus,
                checker,
                concurrency,
                self.settings.duration_s,
                self.settings.warmup_s,
                pids,
                seed=repeat,
            )

        def warm() -> list[str]:
            return loadgen.run_warm_up(target(), corpus, checker)

        system = "FastAPI + PyTorch eager, FP32"
        return Plan(id_, 2, system, "HTTP", "closed", concurrency, measure, ("baseline", warm))

    def _score_image_targets(self) -> None:
        """Records targets 1, 2 and 3 from the cells' medians and perf_analyzer's figures."""
        self._score_serving_efficiency()
        self._score_against_baseline()
        self._score_int8_against_fp32()

    def _score_serving_efficiency(self) -> None:
        """Target 1: kiln INT8 at its best concurrency against the in-process reference."""
        s = self.settings
        grid = sorted({*s.image_grid, s.compare_concurrency})
        saturation = [(self.median_of(f"1/kiln-int8-grpc-c{c}", "throughput") or 0.0, c) for c in grid]
        best, best_c = max(saturation)
        ref = self.median_of("1/reference-int8", "throughput")
        best_cell = f"1/kiln-int8-grpc-c{best_c}"
        self.target(
            1,
            target="served / in-process >= 0.90",
            ratio=best / ref if ref else None,
            passed=bool(ref) and best / ref >= 0.90,
            measured=f"{best:.1f} vs {_num(ref)} images/s (kiln at concurrency {best_c}, gRPC)",
            cells=["1/reference-int8", best_cell],
            floor_of=best_cell,
            generator_cpu=self.median_of(best_cell, "generator_cpu"),
        )

    def _score_against_baseline(self) -> None:
        """Target 2: kiln INT8 (and FP32) against the FastAPI baseline over HTTP."""
        s = self.settings
        c = s.compare_concurrency if s.compare_concurrency in s.http_grid else max(s.http_grid)
        base = f"2/baseline-fp32-http-c{c}"
        kiln8, kiln32 = f"2/kiln-int8-http-c{c}", f"2/kiln-fp32-http-c{c}"
        b_tp, k_tp, f_tp = (self.median_of(i, "throughput") for i in (base, kiln8, kiln32))
        b_p99, k_p99, f_p99 = (self.median_of(i, "p99_ms") for i in (base, kiln8, kiln32))
        ratio = k_tp / b_tp if b_tp and k_tp is not None else None
        self.target(
            2,
            target="kiln INT8 / baseline >= 5x at the same concurrency, p99 no worse",
            ratio=ratio,
            passed=faster_and_no_slower(ratio, 5.0, k_p99, b_p99),
            measured=(
                f"at concurrency {c} (HTTP): kiln INT8 {_num(k_tp)}/s p99 {_ms(k_p99)}; baseline FP32 "
                f"{_num(b_tp)}/s p99 {_ms(b_p99)}; FP32 against FP32: kiln {_num(f_tp)}/s p99 {_ms(f_p99)} "
                f"= {_ratio(f_tp, b_tp)} (serving gain), INT8/FP32 served {_ratio(k_tp, f_tp)} "
                "(quantization gain)"
            ),
            extra={
                "fp32_ratio": f_tp / b_tp if f_tp and b_tp else None,
                "p99_kiln_ms": k_p99,
                "p99_baseline_ms": b_p99,
                "p99_kiln_fp32_ms": f_p99,
            },
            cells=[base, kiln8, kiln32],
            floor_of=kiln8,
            generator_cpu=self.median_of(kiln8, "generator_cpu"),
        )

    def _score_int8_against_fp32(self) -> None:
        """Target 3: INT8 against FP32, both served over gRPC (perf_analyzer's ratio beside it)."""
        c = self.settings.compare_concurrency
        int8_cell, fp32_cell = f"1/kiln-int8-grpc-c{c}", f"3/kiln-fp32-grpc-c{c}"
        i_tp, f_tp = self.median_of(int8_cell, "throughput"), self.median_of(fp32_cell, "throughput")
        pa8, pa32 = self.perf_entry(f"1/pa-int8-c{c}"), self.perf_entry(f"3/pa-fp32-c{c}")
        pa_ratio = (
            (pa8["throughput"] / pa32["throughput"])
            if pa8 and pa32 and pa8["throughput"] and pa32["throughput"]
            else None
        )
        ratio = i_tp / f_tp if i_tp and f_tp else None
        self.target(
            3,
            target="INT8 / FP32 >= 2.5x (throughput, both served)",
            ratio=ratio,
            passed=ratio is not None and ratio >= 2.5,
            measured=(
                f"at concurrency {c} (gRPC): INT8 {_num(i_tp)}/s, FP32 {_num(f_tp)}/s; perf_analyzer: "
                f"{_ratio(pa8 and pa8['throughput'], pa32 and pa32['throughput'])}"
            ),
            extra={"perf_analyzer_ratio": pa_ratio},
            cells=[int8_cell, fp32_cell],
            floor_of=int8_cell,
            generator_cpu=self.median_of(int8_cell, "generator_cpu"),
        )

    def batching(self) -> None:
        """Target 4: dynamic batching on against off, side by side."""
        if self.nobatch is None:
            self.target(
                4,
                target=f"{BATCHING_JUDGED} on / off >= {TARGETS[4][1]:g}x at concurrency 32, p99 no worse",
                passed=None,
                ratio=None,
                measured="not run (no server without batching)",
                cells=[],
            )
            return
        assert self.main is not None
        c = self.settings.batching_concurrency
        plans = []
        for model in BATCHING_MODELS:
            self.corpus(model)
            plans.append(
                self.plan(f"4/{model}-on-c{c}", 4, f"{model}, batching on", self.main, model, "gRPC", c)
            )
            off = self.plan(
                f"4/{model}-off-c{c}", 4, f"{model}, batching off", self.nobatch, model, "gRPC", c
            )
            plans.append(off)
        self.log(f"target 4: {len(plans)} cells x {self.settings.repeats} repeats")
        self.side_by_side(plans)
        results = [self._batching_result(model, c) for model in BATCHING_MODELS]
        judged = next(r for r in results if r[0] == BATCHING_JUDGED)
        on_run = self.perf_entry(f"4/pa-{BATCHING_JUDGED}-on-c{c}")
        why = (
            f". Where the time goes (batching on): {where_time_goes(on_run)}"
            if on_run and not judged[2]
            else ""
        )
        self.target(
            4,
            target=f"{BATCHING_JUDGED} on / off >= {TARGETS[4][1]:g}x at concurrency 32, p99 no worse",
            ratio=judged[1],
            passed=judged[2],
            measured="; ".join(
                f"{m}{'' if m == BATCHING_JUDGED else ' (reported)'}: {_num(a)}/s vs {_num(b)}/s = "
                f"{_ratio(a, b)}, p99 {_ms(p)} vs {_ms(q)}"
                for m, _, _, a, b, p, q in results
            )
            + why,
            floor_ratio=self.median_of(f"4/{BATCHING_JUDGED}-on-c{c}", "throughput")
            and floor.ratio(
                self.median_of(f"4/{BATCHING_JUDGED}-on-c{c}", "throughput"),
                self.median_of(floor_cell("gRPC", c), "throughput"),
            ),
            per_model={m: {"ratio": r, "passed": ok} for m, r, ok, *_ in results},
            cells=[f"4/{m}-{k}-c{c}" for m in BATCHING_MODELS for k in ("on", "off")],
            generator_cpu=max(
                (self.median_of(f"4/{m}-on-c{c}", "generator_cpu") or 0) for m in BATCHING_MODELS
            ),
        )

    def _batching_result(self, model: str, c: int) -> tuple[Any, ...]:
        """perf_analyzer on `model` with batching on and off; (model, ratio, passed, on/s, off/s,
        on p99, off p99) from the cells' medians."""
        on, off = f"4/{model}-on-c{c}", f"4/{model}-off-c{c}"
        self.pa(4, f"4/pa-{model}-on-c{c}", model, self.input_file(model), concurrency=c, cell=on)
        self.pa(
            4, f"4/pa-{model}-off-c{c}", model, self.input_file(model), concurrency=c,
            endpoint=self.nobatch, cell=off,
        )  # fmt: skip
        on_tp, off_tp = self.median_of(on, "throughput"), self.median_of(off, "throughput")
        on_p99, off_p99 = self.median_of(on, "p99_ms"), self.median_of(off, "p99_ms")
        ratio = on_tp / off_tp if on_tp and off_tp else None
        passed = faster_and_no_slower(ratio, TARGETS[4][1], on_p99, off_p99)
        return (model, ratio, passed, on_tp, off_tp, on_p99, off_p99)

    def ensemble_overhead(self) -> None:
        """Target 5: each ensemble against its steps served alone (perf_analyzer), and the
        server-side time per step."""
        assert self.main is not None
        verdicts = []
        for name in self.settings.ensembles:
            entry = self._ensemble_entry(name)
            self.ensembles.append(entry)
            verdicts.append((name, entry["ratio"], entry["slowest_step"]))
        ratios = [r for _, r, _ in verdicts if r is not None]
        limit = TARGETS[5][1]
        self.target(
            5,
            target=f"each pipeline's default form / its slowest step alone >= {limit:g} (perf_analyzer)",
            ratio=min(ratios) if ratios else None,
            passed=bool(ratios) and len(ratios) == len(verdicts) and all(r >= limit for r in ratios),
            measured="; ".join(
                f"{e['ensemble']} ({e['form']} form): {_ratio_value(e['ratio'])} of {e['slowest_step']}"
                + (
                    f" (where the time goes: {where_time_goes(self.perf_entry(e['perf_id']) or {})})"
                    if e["ratio"] is not None and e["ratio"] < limit
                    else ""
                )
                for e in self.ensembles
            ),
            per_model={n: {"ratio": r, "slowest_step": s} for n, r, s in verdicts},
            floor_of=next(
                (e["perf_id"] for e in self.ensembles if e["ensemble"] == tensors.FRAUD_SCORER), None
            ),
            cells=[],
            generator_cpu=max((e["generator_cpu"] or 0) for e in self.ensembles) if self.ensembles else None,
            generator="perf_analyzer",
        )

    def _ensemble_entry(self, name: str) -> dict[str, Any]:
        """perf_analyzer on ensemble `name` and on each of its steps alone: the ratio to the slowest
        step, and each step's server-side time inside the ensemble."""
        assert self.main is not None
        spec = checks.served(name)
        c = self.settings.ensemble_concurrency.get(name, 16)
        corpus = self.corpus(name)
        items = step_input_items(corpus)
        step_requests = step_tensors(self.main.grpc_url, spec, items)
        slow = name.startswith("image_classifier")
        whole_file = (
            self.input_file(name)  # the whole mix: every shipped one fits STEP_INPUT_ITEMS
            if len(items) == len(corpus.items)
            else perf.input_file(
                [item.inputs for item in items], self.out / "perf_inputs" / f"{name}--target5.json"
            )
        )
        whole = self.pa(5, f"5/pa-{name}-c{c}", name, whole_file, concurrency=c, slow=slow)
        alone = {}
        for step in spec.steps:
            requests = step_requests[step.model]
            path = perf.input_file(
                requests[: step_items_kept(requests)], self.out / "perf_inputs" / f"{name}--{step.model}.json"
            )
            alone[step.model] = self.pa(
                5, f"5/pa-{name}-step-{step.model}-c{c}", step.model, path, concurrency=c, slow=slow
            )
        slowest = slowest_step(alone)
        steps = [_step_breakdown(step.model, whole, alone[step.model]) for step in spec.steps]
        return {
            "ensemble": name,
            "form": spec.form,
            "perf_id": f"5/pa-{name}-c{c}",
            "concurrency": c,
            "throughput": whole.throughput,
            "p99_ms": whole.p99_ms,
            "server_total_us": whole.server.total_us if whole.server else None,
            "steps_total_us": sum(s["in_ensemble"]["total_us"] for s in steps if s["in_ensemble"]),
            "slowest_step": slowest[1],
            "slowest_throughput": slowest[0],
            "ratio": whole.throughput / slowest[0] if whole.throughput and slowest[0] else None,
            "steps": steps,
            "generator_cpu": whole.generator_cpu,
            "error": whole.error,
        }

    def capacity_search(self) -> None:
        """Target 6: the highest open-loop rate with p99 under 10 ms of fraud_scorer and of the
        floor, both searched with perf_analyzer's C++ generator; the Python generator's search
        of fraud_scorer as a cross-check, and its own ceiling against the floor."""
        assert self.main is not None
        model = CAPACITY_MODEL
        floor_capacity = self.perf_capacity(
            FLOOR, floor.input_file(self.out / "perf_inputs" / f"{FLOOR}.json")
        )
        model_capacity = self.perf_capacity(model, self.input_file(model))
        ceiling = self.python_ceiling()
        python = self._python_capacity(model)
        self.capacity = {
            "model": model,
            "p99_limit_ms": CAPACITY_P99_MS,
            "min_delivered": CAPACITY_MIN_DELIVERED,
            "perf_analyzer": {"floor": floor_capacity.to_json(), "model": model_capacity.to_json()},
            "python_ceiling": ceiling.to_json(),
            "python": python,
        }
        self._score_capacity(floor_capacity, model_capacity, ceiling, python)

    def _search(self) -> capacity.Search:
        s = self.settings
        return capacity.Search(s.capacity_start, s.capacity_bisections, CAPACITY_MIN_RATE, CAPACITY_MAX_RATE)

    def perf_capacity(self, model: str, input_file: Path) -> capacity.Capacity:
        """perf_analyzer's search (open loop, `--request-rate-range`, async) of `model`."""

        def measure(rate: float) -> perf.PerfResult:
            return self.pa(
                6, f"6/pa-{model}-rate-{rate:.0f}", model, input_file, rate=rate,
                window_ms=self.settings.capacity_perf_ms, stability=CAPACITY_PERF_STABILITY,
            )  # fmt: skip

        bracket = self._search().run(
            measure, lambda rate, r: capacity.perf_rate_held(r, rate, CAPACITY_P99_MS, CAPACITY_MIN_DELIVERED)
        )
        found = capacity.summarize(
            model, "perf_analyzer", bracket,
            lambda p: capacity.generator_limited(p.result, p.rate, CAPACITY_MIN_DELIVERED, CAPACITY_P99_MS),
            _perf_figures,
        )  # fmt: skip
        self.log(f"capacity of {model} (perf_analyzer): {found.note}")
        return found

    def python_ceiling(self) -> capacity.Capacity:
        """The Python open-loop generator's own ceiling: its capacity search against the floor
        (which perf_analyzer shows holding far more), so the generator is what gives out."""
        bracket = self._search().run(
            self._capacity_probe(FLOOR),
            lambda rate, run: capacity.rate_held(run, rate, CAPACITY_P99_MS, CAPACITY_MIN_DELIVERED),
            on_probe=self._log_capacity_probe,
        )
        found = capacity.summarize(FLOOR, "loadgen", bracket, lambda p: False, lambda r: r.to_json())
        self.log(f"the Python generator against the floor: {found.note}")
        return found

    def _python_capacity(self, model: str) -> dict[str, Any]:
        """The Python open-loop generator's search of `model` (cross-check): doubling, bisection,
        then the rate verified with the cell's repeats (and once more lower when it misses)."""
        probe = self._capacity_probe(model)
        bracket = self._search().run(
            probe,
            lambda rate, run: capacity.rate_held(run, rate, CAPACITY_P99_MS, CAPACITY_MIN_DELIVERED),
            on_probe=self._log_capacity_probe,
        )
        self.log(f"capacity search ({model}, Python generator): {bracket.describe()}")
        outcome = capacity.verify(
            bracket.verification_rates(),
            lambda rate: self._capacity_cell(model, rate, probe),
            CAPACITY_P99_MS,
        )
        summary = capacity.summarize(model, "loadgen", bracket, lambda p: False, lambda r: r.to_json())
        return {
            "rate": outcome.rate,
            "verified": outcome.verified,
            "median_at_rate": outcome.median,
            "bracket": [bracket.low, bracket.high],
            "probes": list(summary.probes),
            "note": summary.note,
            "cells": [f"6/{model}-open-{outcome.rate:.0f}"] if outcome.rate else [],
        }

    def _capacity_probe(self, model: str) -> Callable[..., loadgen.Run]:
        """probe(rate, seed=0): one open-loop run of `model` on the main server at `rate`."""
        assert self.main is not None
        endpoint, s, corpus = self.main, self.settings, self.corpus(model)

        def probe(rate: float, seed: int = 0) -> loadgen.Run:
            target = loadgen.TritonGrpc(endpoint.grpc_url, self.mixes[model])
            return loadgen.run_open(
                target, corpus, self.checkers[model], rate, s.capacity_duration_s, s.warmup_s,
                endpoint.pids, seed=seed,
            )  # fmt: skip

        return probe

    def _log_capacity_probe(self, probe: capacity.Probe) -> None:
        """One progress line per probe of the search."""
        run = probe.result
        self.log(
            f"capacity probe {probe.rate:.0f}/s: delivered {run.throughput:.0f}/s, p99 {_ms(run.p99_ms)}, "
            f"failures {run.failures}, generator CPU {_pct(run.generator_cpu)} -> "
            + ("held" if probe.held else "not held")
        )

    def _capacity_cell(self, model: str, rate: float, probe: Callable[..., loadgen.Run]) -> dict[str, Any]:
        """Measures `rate` with the cell's repeats (side by side); returns the medians."""
        plan = Plan(
            f"6/{model}-open-{rate:.0f}", 6, f"{model} at the capacity rate", "gRPC", "open", rate,
            lambda repeat: probe(rate, seed=repeat),
        )  # fmt: skip
        self.side_by_side([plan])
        return self.cells[plan.id]["median"]

    def _score_capacity(
        self,
        floor_capacity: capacity.Capacity,
        model_capacity: capacity.Capacity,
        ceiling: capacity.Capacity,
        python: Mapping[str, Any],
    ) -> None:
        """Records target 6: fraud's capacity over the floor's (perf_analyzer, same search), the
        Python generator's cross-check and ceiling, and where the time goes when missed."""
        ratio = floor.ratio(model_capacity.rate, floor_capacity.rate)
        verdict = floor.judge(ratio, TARGETS[6][1])
        measured = (
            f"perf_analyzer (open loop, gRPC): {CAPACITY_MODEL} {model_capacity.rate:.0f}/s "
            f"({model_capacity.note}); floor {floor_capacity.rate:.0f}/s ({floor_capacity.note}); "
            f"{verdict.describe()}. Python generator (cross-check): {CAPACITY_MODEL} {python['rate']:.0f}/s "
            f"({'verified' if python['verified'] else 'not verified'} with the repeats; {python['note']}); "
            f"its own ceiling against the floor: {ceiling.rate:.0f}/s ({ceiling.note})"
        )
        if verdict.passed is False:
            measured += f". Where the time goes: {self._capacity_breakdown(model_capacity)}"
        self.target(
            6,
            target=f"capacity at p99 < {CAPACITY_P99_MS:g} ms >= 0.6x the floor's (perf_analyzer)",
            ratio=ratio,
            passed=verdict.passed,
            measured=measured,
            floor_ratio=ratio,
            cells=python["cells"],
            generator_cpu=max((p.get("generator_cpu") or 0) for p in model_capacity.probes)
            if model_capacity.probes
            else None,
            generator="perf_analyzer",
        )

    def _capacity_breakdown(self, found: capacity.Capacity) -> str:
        """The server-side time of the first probe that did not hold (else the last probe)."""
        missed = next((p for p in found.probes if not p["held"]), found.probes[-1] if found.probes else None)
        if missed is None:
            return "no probe"
        entry = self.perf_entry(f"6/pa-{found.model}-rate-{missed['rate']:.0f}")
        return f"at {missed['rate']:.0f}/s: " + (where_time_goes(entry) if entry else "no figure")

    def pipeline_forms(self) -> None:
        """Both forms of each pipeline against the floor (perf_analyzer, repeats interleaved):
        p50/p99 at concurrency 1, throughput at the forms concurrency; which form is faster; and
        target 7 from fraud_scorer's default form at concurrency 1."""
        s = self.settings
        pipelines = [p for p in PIPELINES if p in s.forms or p == LATENCY_MODEL]
        levels = sorted({1, *(s.forms_concurrency.get(p, 16) for p in pipelines)})
        runs: dict[tuple[str, int], list[perf.PerfResult]] = {}
        for repeat in range(s.repeats):
            for c in levels:
                self.floor_pa(c, tag=f"-r{repeat + 1}", window_ms=s.forms_perf_ms)
                for pipeline in pipelines:
                    if c not in (1, s.forms_concurrency.get(pipeline, 16)):
                        continue
                    # tens of images a second: 1 s windows do not settle (perf_analyzer gives up)
                    window = 2 * s.forms_perf_ms if pipeline in SLOW_FORMS else s.forms_perf_ms
                    for model in (pipeline, variants.other_form(checks.served(pipeline)).name):
                        runs.setdefault((model, c), []).append(
                            self.pa(
                                7, f"7/pa-{model}-c{c}-r{repeat + 1}", model, self.input_file(pipeline),
                                concurrency=c, window_ms=window,
                            )
                        )  # fmt: skip
        floors = {
            c: medians_of([e for e in self.perf if e["model"] == FLOOR and e["level"] == c]) for c in levels
        }
        for pipeline in pipelines:
            self.forms.extend(form_rows(pipeline, runs, floors, s.forms_concurrency.get(pipeline, 16)))
        self._score_latency(runs.get((LATENCY_MODEL, 1), []), floors[1])

    def _score_latency(self, results: Sequence[perf.PerfResult], floor_figures: Mapping[str, Any]) -> None:
        """Target 7: fraud_scorer's default form at concurrency 1: p50 <= 1.5x and p99 <= 2x the
        floor's (medians of the interleaved repeats)."""
        figures = medians_of([r.to_json() for r in results])
        p50 = floor.judge(
            floor.ratio(figures["p50_ms"], floor_figures.get("p50_ms")), TARGETS[7][1], at_most=True
        )
        p99 = floor.judge(
            floor.ratio(figures["p99_ms"], floor_figures.get("p99_ms")), LATENCY_P99_LIMIT, at_most=True
        )
        passed = None if p50.passed is None or p99.passed is None else p50.passed and p99.passed
        measured = (
            f"{LATENCY_MODEL} p50 {_ms(figures['p50_ms'])} vs floor {_ms(floor_figures.get('p50_ms'))}: "
            f"{p50.describe()}; p99 {_ms(figures['p99_ms'])} vs floor {_ms(floor_figures.get('p99_ms'))}: "
            f"{p99.describe()} (perf_analyzer, gRPC, concurrency 1, medians of {len(results)} repeats)"
        )
        if passed is False and results:
            measured += f". Where the time goes: {where_time_goes(results[-1].to_json())}"
        self.target(
            7,
            target=f"p50 <= {TARGETS[7][1]:g}x the floor's p50 and p99 <= {LATENCY_P99_LIMIT:g}x its p99",
            ratio=p50.ratio,
            passed=passed,
            measured=measured,
            floor_ratio=p50.ratio,
            extra={"p99_ratio": p99.ratio},
            cells=[],
            generator_cpu=median([r.generator_cpu for r in results if r.generator_cpu is not None] or [0.0]),
            generator="perf_analyzer",
        )

    def text_lengths(self) -> None:
        """Targets 8 and 9: text_embedder (default form) at the text concurrency on the mixed mix
        and on one text repeated (perf_analyzer, interleaved repeats); text_encoder's average batch
        over the mixed runs from Triton's statistics API."""
        s, model = self.settings, TEXT_MODEL
        corpus = self.corpus(model)
        c = s.text_concurrency
        one = sorted(corpus.items, key=lambda item: item.payload_bytes)[len(corpus.items) // 2]
        single = perf.input_file([one.inputs], self.out / "perf_inputs" / f"{model}--single.json")
        mixed, same, batches = [], [], []
        for repeat in range(s.repeats):
            before = self.model_stats([TEXT_STEP, model])
            mixed.append(
                self.pa(
                    8, f"8/pa-{model}-mixed-c{c}-r{repeat + 1}", model, self.input_file(model), concurrency=c
                )
            )
            batches.append(stats_delta(before, self.model_stats([TEXT_STEP, model])))
            same.append(self.pa(8, f"8/pa-{model}-single-c{c}-r{repeat + 1}", model, single, concurrency=c))
        self.text = text_summary(mixed, same, batches, one.name)
        self._score_text(c)

    def generation_comparisons(self, only: set[int]) -> None:
        """Targets 10-13 (`benchmarks.generation`): tinylm_generate on its own embedded server (both
        schedulings and the floor, the built tinylm files), and the engine in this process."""
        settings = generation.QUICK if self.args.quick else generation.FULL
        if self.args.repeats is not None:
            settings = dataclasses.replace(settings, repeats=self.args.repeats)
        if self.args.http_url:
            self.notes.append(
                "Targets 10-13 ran on their own embedded server (a given --http-url serves no static "
                "variant, and the in-process figures need the built files here)."
            )
        result = generation.run(settings, self.out, self.log, self.args.generation_artifacts, only)
        self.generation = result["details"]
        self.commands += result["commands"]
        for target in result["targets"]:
            self.targets[target["number"]] = target

    def model_stats(self, models: Sequence[str]) -> dict[str, tuple[int, int]]:
        """(inference_count, execution_count) per model from Triton's statistics API (HTTP)."""
        assert self.main is not None
        base = self.main.http_url if self.main.http_url.startswith("http") else f"http://{self.main.http_url}"
        out = {}
        for model in models:
            with urllib.request.urlopen(f"{base}/v2/models/{model}/stats", timeout=10) as response:
                stats = json.loads(response.read()).get("model_stats", [])
            out[model] = (
                sum(int(v.get("inference_count", 0)) for v in stats),
                sum(int(v.get("execution_count", 0)) for v in stats),
            )
        return out

    def _score_text(self, c: int) -> None:
        """Records targets 8 and 9 from `self.text`."""
        t = self.text
        ratio = floor.judge(floor.ratio(t["mixed"]["throughput"], t["single"]["throughput"]), TARGETS[8][1])
        self.target(
            8,
            target=f"mixed lengths / one length >= {TARGETS[8][1]:g}x (throughput, concurrency {c})",
            ratio=ratio.ratio,
            passed=ratio.passed,
            measured=(
                f"mixed {_num(t['mixed']['throughput'])}/s (p99 {_ms(t['mixed']['p99_ms'])}) vs one text "
                f"({t['single_text']}) {_num(t['single']['throughput'])}/s "
                f"(p99 {_ms(t['single']['p99_ms'])}): "
                f"{ratio.describe()} (perf_analyzer, medians)"
            ),
            floor_of=f"8/pa-{TEXT_MODEL}-mixed-c{c}-r1",
            cells=[],
            generator="perf_analyzer",
        )
        batch = floor.judge(t["average_batch"], TARGETS[9][1])
        self.target(
            9,
            target=(
                f"{t['batch_model']}'s inference_count / execution_count >= {TARGETS[9][1]:g} "
                f"at concurrency {c}"
            ),
            ratio=batch.ratio,
            passed=batch.passed,
            measured=(
                f"average batch {_num(t['average_batch'])} over the mixed runs ({t['inferences']} "
                "inferences in "
                f"{t['executions']} executions of {t['batch_model']}, Triton's statistics API)"
            ),
            cells=[],
            generator="perf_analyzer",
        )


def _perf_figures(result: perf.PerfResult) -> dict[str, Any]:
    """A capacity probe's figures (perf_analyzer)."""
    return {
        "throughput": result.throughput,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "failures": 0 if result.error is None else None,
        "generator_cpu": result.generator_cpu,
        "server_cpu": None,
        "send_rate": result.send_rate,
        "delayed_share": result.delayed_share,
        "error": result.error,
    }


def where_time_goes(entry: Mapping[str, Any]) -> str:
    """One line from a perf_analyzer entry (`PerfResult.to_json()`): the server-side time per
    request (queue, compute), what the client saw beyond it, and each step's share inside it."""
    server = entry.get("server") or {}
    if not server:
        return f"p50 {_ms(entry.get('p50_ms'))}; no server-side figure"
    compute = sum(server.get(k) or 0 for k in ("compute_input_us", "compute_infer_us", "compute_output_us"))
    line = (
        f"server {server['total_us']:.0f} us per request (queue {server['queue_us']:.0f} us, compute "
        f"{compute:.0f} us)"
    )
    if entry.get("p50_ms") is not None:
        client_us = entry["p50_ms"] * 1000
        outside = client_us - server["total_us"]
        line += f"; client p50 {client_us:.0f} us" + (
            f", so about {outside:.0f} us outside the server (gRPC, client)"
            if outside > 0
            else " (not above the server's average: little time outside the server)"
        )
    steps = sorted(entry.get("composing") or [], key=lambda s: -s["total_us"])
    if steps:
        line += "; steps: " + ", ".join(
            f"{s['model']} {s['total_us']:.0f} us (queue {s['queue_us']:.0f}"
            + (f", average batch {s['inferences'] / s['executions']:.1f})" if s.get("executions") else ")")
            for s in steps
        )
    return line


def form_rows(
    pipeline: str,
    runs: Mapping[tuple[str, int], Sequence[perf.PerfResult]],
    floors: Mapping[int, Mapping[str, Any]],
    c: int,
) -> list[dict[str, Any]]:
    """The forms table's rows of `pipeline`: per form, medians at concurrency 1 and `c`, their
    ratios to the floor's, and which form is faster (p50 at 1; throughput at `c`)."""
    spec = checks.served(pipeline)
    rows = []
    for model, form in (
        (pipeline, spec.form),
        (variants.other_form(spec).name, variants.other_form(spec).form),
    ):
        low = medians_of([r.to_json() for r in runs.get((model, 1), [])])
        high = medians_of([r.to_json() for r in runs.get((model, c), [])])
        rows.append({
            "pipeline": pipeline, "form": form, "model": model, "default": model == pipeline,
            "concurrency": c,
            "p50_ms": low["p50_ms"], "p99_ms": low["p99_ms"], "throughput": high["throughput"],
            "p50_vs_floor": floor.ratio(low["p50_ms"], floors.get(1, {}).get("p50_ms")),
            "p99_vs_floor": floor.ratio(low["p99_ms"], floors.get(1, {}).get("p99_ms")),
            "throughput_vs_floor": floor.ratio(high["throughput"], floors.get(c, {}).get("throughput")),
        })  # fmt: skip
    faster_p50 = min(rows, key=lambda r: r["p50_ms"] if r["p50_ms"] is not None else float("inf"))["form"]
    faster_tput = max(rows, key=lambda r: r["throughput"] or 0.0)["form"]
    for row in rows:
        row["faster_p50"], row["faster_throughput"] = faster_p50, faster_tput
    return rows


def stats_delta(
    before: Mapping[str, tuple[int, int]], after: Mapping[str, tuple[int, int]]
) -> dict[str, tuple[int, int]]:
    """Per model: (inferences, executions) between two `Bench.model_stats` readings."""
    return {m: (after[m][0] - before[m][0], after[m][1] - before[m][1]) for m in after if m in before}


def text_summary(
    mixed: Sequence[perf.PerfResult],
    single: Sequence[perf.PerfResult],
    deltas: Sequence[Mapping[str, tuple[int, int]]],
    single_text: str,
) -> dict[str, Any]:
    """Targets 8 and 9's figures: medians of the mixed and single runs, and the model step's
    average batch over the mixed runs (text_encoder's counts; the pipeline's own when the step
    did not execute as a model, i.e. a fused default form)."""
    inferences = sum(d.get(TEXT_STEP, (0, 0))[0] for d in deltas)
    executions = sum(d.get(TEXT_STEP, (0, 0))[1] for d in deltas)
    batch_model = TEXT_STEP
    if executions == 0:
        batch_model = TEXT_MODEL
        inferences = sum(d.get(TEXT_MODEL, (0, 0))[0] for d in deltas)
        executions = sum(d.get(TEXT_MODEL, (0, 0))[1] for d in deltas)
    return {
        "mixed": medians_of([r.to_json() for r in mixed]),
        "single": medians_of([r.to_json() for r in single]),
        "single_text": single_text,
        "batch_model": batch_model,
        "inferences": inferences,
        "executions": executions,
        "average_batch": inferences / executions if executions else None,
    }


def add_floor_ratios(cells: Sequence[dict[str, Any]], perf_entries: Sequence[dict[str, Any]]) -> None:
    """Adds `vs_floor` to every closed-loop cell and every perf_analyzer run at a concurrency: its
    throughput, p50 and p99 as ratios to the floor's at the same load with the same generator
    (the floor cell's medians; the median of the floor's perf_analyzer runs at that
    concurrency). A figure without a floor figure gets None."""
    by_id = {c["id"]: c for c in cells}
    for cell in cells:
        if cell["mode"] != "closed" or cell["id"].startswith("floor/"):
            continue
        base = (by_id.get(floor_cell(cell["transport"], int(cell["level"]))) or {}).get("median") or {}
        cell["vs_floor"] = _ratios(cell.get("median") or {}, base)
    floors: dict[float, list[dict[str, Any]]] = {}
    for entry in perf_entries:
        if entry["model"] == FLOOR and entry["mode"] == "concurrency" and not entry.get("error"):
            floors.setdefault(entry["level"], []).append(entry)
    for entry in perf_entries:
        if entry["model"] == FLOOR or entry["mode"] != "concurrency":
            continue
        entry["vs_floor"] = _ratios(entry, medians_of(floors.get(entry["level"], [])))


def fill_target_floor_ratios(
    targets: Mapping[int, dict[str, Any]],
    cells: Sequence[dict[str, Any]],
    perf_entries: Sequence[dict[str, Any]],
) -> None:
    """Sets a target's `floor_ratio` (when it has none) to the throughput ratio to the floor of
    the cell or perf_analyzer run its `floor_of` names (after `add_floor_ratios`)."""
    by_id = {c["id"]: c for c in cells} | {e["id"]: e for e in perf_entries}
    for target in targets.values():
        ref = by_id.get(target.get("floor_of") or "")
        if target.get("floor_ratio") is None and ref and ref.get("vs_floor"):
            target["floor_ratio"] = ref["vs_floor"].get("throughput")


def medians_of(entries: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The median throughput, p50 and p99 of perf_analyzer entries (None where none has one)."""
    out: dict[str, float | None] = {}
    for key in ("throughput", "p50_ms", "p99_ms"):
        values = [e[key] for e in entries if e.get(key) is not None]
        out[key] = median(values) if values else None
    return out


def _ratios(figures: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, float | None]:
    """throughput, p50 and p99 of `figures` over `base`'s (the floor's)."""
    return {key: floor.ratio(figures.get(key), base.get(key)) for key in ("throughput", "p50_ms", "p99_ms")}


def floor_cell(transport: str, concurrency: int) -> str:
    """The id of the floor's closed-loop cell at `concurrency` over `transport`."""
    return f"floor/{transport}-c{concurrency}"


def main_models(other_forms: Sequence[Any]) -> list[str]:
    """What the main server loads: the benchmark's models, the floor, each pipeline's other form,
    and every step of the pipelines (target 5 serves them alone; a fused default form does not
    load its steps as models)."""
    steps = [step.model for name in PIPELINES for step in checks.served(name).steps]
    names = [*MODELS, FLOOR, *(spec.name for spec in other_forms), *steps]
    return list(dict.fromkeys(names))


def step_input_items(corpus: inputs.Corpus) -> list[inputs.Item]:
    """The requests of a pipeline's mix whose tensors its steps are measured alone on (target 5,
    `kiln tune`), and target 5's pipeline on: the same requests on both sides (`STEP_INPUT_ITEMS`)."""
    return list(corpus.items[:STEP_INPUT_ITEMS])


def step_tensors(
    grpc_url: str, spec: Any, items: Sequence[inputs.Item]
) -> dict[str, list[dict[str, np.ndarray]]]:
    """The tensors each step of ensemble `spec` receives for the requests `items`, obtained by
    sending them through the steps one by one on the server (the ensemble's wiring)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    client = grpcclient.InferenceServerClient(grpc_url)
    per_step: dict[str, list[dict[str, np.ndarray]]] = {step.model: [] for step in spec.steps}
    try:
        for item in items:
            flowing = dict(item.inputs)
            for step in spec.steps:
                request = {name: flowing[tensor] for name, tensor in step.inputs.items() if tensor in flowing}
                per_step[step.model].append(request)
                infer_inputs = []
                for name, array in request.items():
                    infer_input = grpcclient.InferInput(
                        name, list(array.shape), np_to_triton_dtype(array.dtype)
                    )
                    infer_input.set_data_from_numpy(array)
                    infer_inputs.append(infer_input)
                result = client.infer(
                    step.model,
                    infer_inputs,
                    outputs=[grpcclient.InferRequestedOutput(n) for n in step.outputs],
                )
                for name, tensor in step.outputs.items():
                    flowing[tensor] = result.as_numpy(name)
    finally:
        client.close()
    return per_step


def medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure over the repeats (and the throughput's range)."""
    if not runs:
        return {}
    out: dict[str, Any] = {"repeats": len(runs)}
    for key in (
        "throughput",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "generator_cpu",
        "server_cpu",
        "offered_rate",
    ):
        values = [r[key] for r in runs if r.get(key) is not None]
        out[key] = median(values) if values else None
    out["throughput_min"] = min(r["throughput"] for r in runs)
    out["throughput_max"] = max(r["throughput"] for r in runs)
    out["requests"] = sum(r["requests"] for r in runs)
    out["failures"] = sum(r["failures"] for r in runs)
    return out


def faster_and_no_slower(
    ratio: float | None, minimum: float, p99_ms: float | None, reference_p99_ms: float | None
) -> bool:
    """A throughput ratio of at least `minimum` with a p99 no worse than the reference's (targets
    2 and 4); False when a figure is missing."""
    return (
        ratio is not None
        and ratio >= minimum
        and p99_ms is not None
        and reference_p99_ms is not None
        and p99_ms <= reference_p99_ms
    )


def step_items_kept(requests: Sequence[Mapping[str, Any]]) -> int:
    """How many of a step's requests its perf_analyzer input file keeps: at most
    STEP_INPUT_ELEMENTS tensor elements (sized by the first request), at least
    STEP_INPUT_MIN_ITEMS requests."""
    per_request = max(sum(int(np.asarray(a).size) for a in requests[0].values()), 1)
    return max(STEP_INPUT_MIN_ITEMS, min(len(requests), STEP_INPUT_ELEMENTS // per_request))


def slowest_step(alone: Mapping[str, perf.PerfResult]) -> tuple[float | None, str | None]:
    """(throughput, model) of the step with the lowest throughput served alone; (None, None) when
    no step has a figure."""
    return min(
        ((r.throughput, m) for m, r in alone.items() if r.throughput is not None),
        default=(None, None),
    )


def _step_breakdown(model: str, whole: perf.PerfResult, alone: perf.PerfResult) -> dict[str, Any]:
    """One step of an ensemble: served alone, and its server-side time inside the ensemble."""
    timing = next((t for t in whole.composing if t.model == model), None)
    return {
        "model": model,
        "backend": getattr(checks.served(model), "backend", None),
        "alone_throughput": alone.throughput,
        "alone_p99_ms": alone.p99_ms,
        "in_ensemble": dataclasses.asdict(timing) if timing else None,
        "average_batch": timing.average_batch if timing else None,
    }


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _ratio_value(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--http-url", default="", help="a running kiln server's HTTP host:port (default: start one)"
    )
    parser.add_argument("--grpc-url", default="", help="its gRPC host:port")
    parser.add_argument(
        "--nobatch-http-url", default="", help="a running server without dynamic batching (target 4)"
    )
    parser.add_argument("--nobatch-grpc-url", default="", help="its gRPC host:port")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where the models run")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default results/bench-<UTC>-<commit>)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny grids and short cells: a dry run of the harness"
    )
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per cell and repeat")
    parser.add_argument("--warmup", type=float, default=None, help="unmeasured seconds before each cell")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per cell (medians are quoted)")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated targets to run (1-13; 1-3 run together, 8-9 too; 10-13 are generation's, "
        "11 runs 12 for its capacity)",
    )
    parser.add_argument(
        "--ensembles", default="", help="comma-separated ensembles for target 5 (default: the settings')"
    )
    parser.add_argument(
        "--forms", default="", help="comma-separated pipelines of the forms table (default: all five)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="no in-process reference answers in the mixes"
    )
    parser.add_argument(
        "--generation-artifacts",
        type=Path,
        default=None,
        help="targets 10-13: a folder with model.onnx, tokenizer.json, generation.json (default: the "
        "built tinylm)",
    )
    args = parser.parse_args(argv)
    if bool(args.http_url) != bool(args.grpc_url):
        parser.error("give both --http-url and --grpc-url, or neither")
    if bool(args.nobatch_http_url) != bool(args.nobatch_grpc_url):
        parser.error("give both --nobatch-http-url and --nobatch-grpc-url, or neither")
    return args


def settings_for(args: argparse.Namespace) -> Settings:
    """QUICK or FULL, with the command line's overrides."""
    settings = QUICK if args.quick else FULL
    overrides: dict[str, Any] = {
        k: v
        for k, v in (("duration_s", args.duration), ("warmup_s", args.warmup), ("repeats", args.repeats))
        if v is not None
    }
    if args.ensembles:
        overrides["ensembles"] = tuple(e.strip() for e in args.ensembles.split(",") if e.strip())
    if args.forms:
        overrides["forms"] = tuple(p.strip() for p in args.forms.split(",") if p.strip())
    return dataclasses.replace(settings, **overrides)


def run_comparisons(bench: Bench, only: set[int]) -> list[str]:
    """Starts the servers, runs the comparisons in `only` (a failed one is reported, the others
    still run), stops the servers; returns what failed."""
    stack: list[Callable[[], None]] = []
    failed: list[str] = []
    try:
        if only - GENERATION_TARGETS:
            bench.start_servers(stack)
        steps: list[tuple[set[int], Callable[[], None]]] = [
            ({1, 2, 3}, bench.image_comparisons),
            ({4}, bench.batching),
            ({5}, bench.ensemble_overhead),
            ({6}, bench.capacity_search),
            ({7}, bench.pipeline_forms),
            ({8, 9}, bench.text_lengths),
            (
                set(GENERATION_TARGETS),
                functools.partial(bench.generation_comparisons, only & GENERATION_TARGETS),
            ),
        ]
        for numbers, step in steps:
            if not numbers & only:
                continue
            try:
                step()
            except Exception as error:  # noqa: BLE001 - report the others
                name = getattr(step, "__name__", "generation_comparisons")
                failed.append(f"{name}: {type(error).__name__}: {error}")
                bench.log(f"{name} FAILED:\n{traceback.format_exc()}")
                for number in sorted(numbers & only - set(bench.targets)):
                    bench.target(
                        number, target="-", ratio=None, passed=None, cells=[],
                        measured=f"not run: {name} failed ({type(error).__name__}: {error})",
                    )  # fmt: skip
    finally:
        for stop in reversed(stack):
            try:
                stop()
            except Exception as error:  # noqa: BLE001
                bench.log(f"cleanup: {error}")
    return failed


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark; 0 when it ran (targets may be missed: results.md says which), 1 when
    a comparison could not run."""
    args = parse_args(argv)
    settings = settings_for(args)
    commit = environment.commit()
    out = args.out or paths.ROOT / "results" / f"bench-{environment.utc_stamp()}-{commit}"
    out.mkdir(parents=True, exist_ok=True)
    command_line = " ".join(["python -m benchmarks.run", *(sys.argv[1:] if argv is None else argv)])
    bench = Bench(args, settings, out)
    bench.log(f"results go to {out}")
    machine = environment.machine_info()
    bench.log(environment.describe_machine(machine))
    started = time.monotonic()
    failed = run_comparisons(bench, report.parse_only(args.only, TARGETS))
    add_floor_ratios(list(bench.cells.values()), bench.perf)
    fill_target_floor_ratios(bench.targets, list(bench.cells.values()), bench.perf)
    results = {
        "date_utc": environment.utc_stamp(),
        "commit": commit,
        "command": command_line,
        "device": args.device,
        "server": "embedded (kiln.server.TritonServer)" if not args.http_url else f"given: {args.http_url}",
        "machine": machine,
        "settings": dataclasses.asdict(settings),
        "inputs": {m: {"summary": c.summary(), "notes": c.notes} for m, c in bench.corpora.items()},
        "targets": [bench.targets[n] for n in sorted(bench.targets)],
        "cells": list(bench.cells.values()),
        "perf_analyzer": bench.perf,
        "ensembles": bench.ensembles,
        "capacity": bench.capacity,
        "forms": bench.forms,
        "text": bench.text,
        "generation": bench.generation,
        "commands": bench.commands,
        "notes": bench.notes,
        "failed": failed,
        "wall_s": round(time.monotonic() - started, 1),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report.write(results, out)
    print((out / "results.md").read_text(), flush=True)
    bench.log(f"done in {results['wall_s']:.0f} s; results in {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
