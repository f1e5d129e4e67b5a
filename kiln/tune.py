"""Batching chosen by measurement: sweep a served model's dynamic batcher and instance count.

`kiln tune MODEL` (`kiln.cli.tune`) renders every point of a grid (queue delays x preferred batch
sizes sets x instance counts, plus the spec's current settings) as its own model in one temporary
repository (`<model>__tuneNN`, the same built artifacts linked in), serves them all from one
tritonserver, and measures each with perf_analyzer (`benchmarks.perf`, gRPC) at a low and a high
concurrency, the candidates interleaved (repeat 1 of every candidate, then repeat 2, the order
rotated each repeat), using the model's own request inputs: its folder's load-test mix when the
mix fits the model's inputs, else the tensors a pipeline feeds it (the mix sent through the
pipeline's steps one by one, `benchmarks.run.step_tensors`). Figures are the medians of the
repeats.

The choice (`choose`, the rule stated in `Rule.describe` and in the record):
1. a candidate measured in fewer than half of its repeats (at either concurrency) is out;
2. its median p50 at the low concurrency must be within `p50_slack` (10%) of the best candidate's:
   batching may not cost a lone request its latency;
3. its median p99 at the high concurrency must be within `p99_factor` (2x) of the best
   candidate's (and under `p99_ms` when given);
4. of the rest, the highest median throughput at the high concurrency wins; candidates within
   `tie` (5%) of it are equal on this noisy a measurement, and the cheapest of those wins: fewest
   instances, then the shortest queue delay, then the fewest preferred sizes.

The record (`tuning.json` in the model's folder, one entry per model and form, with `tuning.md`
beside it) keeps the grid, every candidate's medians and repeats, the rule, the choice, the
machine, the date, the command and the commit. Nothing here edits a spec: the chosen values are
printed as the line to put in it (`spec_line`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import paths
from kiln.spec import (
    MAX_QUEUE_DELAY_US,
    DynamicBatching,
    EnsembleSpec,
    InstanceGroup,
    ModelSpec,
    Spec,
    served_name,
    served_specs,
    without_dynamic_batching,
)

RECORD_FILE = "tuning.json"
TABLE_FILE = "tuning.md"
RECORD_FORMAT = 1
CANDIDATE_INFIX = "__tune"
"""Candidate `i` of model `m` is served as `m__tune<ii>`."""
DEFAULT_DELAYS_US = (0, 100, 500, 2000)
DEFAULT_INSTANCES = (1, 2)
DEFAULT_CONCURRENCIES = (1, 16)
DEFAULT_REPEATS = 3
DEFAULT_WINDOW_MS = 500
ANSWER_CHECK_ITEMS = 4
"""Requests of the mix each candidate must answer exactly as the first one (one at a time)."""
PERF_MAX_TRIALS = 6
"""perf_analyzer's windows per measurement at most, until three agree (`benchmarks.perf.run`)."""


class TuneError(ValueError):
    """A tuning that cannot run: an unknown model, a bad grid, no inputs; the message says which."""


@dataclass(frozen=True)
class Candidate:
    """One point of the sweep: the model's dynamic batcher and instance count.

    Attributes:
        max_queue_delay_us: How long a request may wait for others.
        preferred_batch_sizes: The batch sizes the batcher tries to form (empty: none).
        instances: Instances of the model (of the spec's instance kind).
        batching: False for a model whose spec has no dynamic batcher (its current settings).
        current: The settings the spec has now.
    """

    max_queue_delay_us: int
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1
    batching: bool = True
    current: bool = False

    @property
    def key(self) -> tuple[Any, ...]:
        """The settings alone (two candidates with the same key are the same configuration)."""
        return (self.batching, self.max_queue_delay_us, self.preferred_batch_sizes, self.instances)

    def label(self) -> str:
        """A short description: "delay 100 us, preferred 8,16, 2 inst"."""
        instances = f"{self.instances} inst"
        if not self.batching:
            text = f"no dynamic batcher, {instances}"
        else:
            preferred = ",".join(map(str, self.preferred_batch_sizes)) or "none"
            text = f"delay {self.max_queue_delay_us} us, preferred {preferred}, {instances}"
        return text + (" (current)" if self.current else "")

    def cost(self) -> tuple[int, int, int]:
        """What the tie-break prefers less of: instances, queue delay, preferred sizes."""
        return (self.instances, self.max_queue_delay_us, len(self.preferred_batch_sizes))


@dataclass(frozen=True)
class Grid:
    """The sweep's axes; every combination is a candidate.

    Attributes:
        delays_us: Queue delays (`max_queue_delay_us`).
        preferred: Sets of preferred batch sizes (an empty tuple: none).
        instances: Instance counts.
    """

    delays_us: tuple[int, ...] = DEFAULT_DELAYS_US
    preferred: tuple[tuple[int, ...], ...] = ((), (8, 16))
    instances: tuple[int, ...] = DEFAULT_INSTANCES

    def candidates(self) -> list[Candidate]:
        """Every combination, in axis order (instances, then delays, then preferred sets)."""
        return [
            Candidate(delay, tuple(preferred), count)
            for count in self.instances
            for delay in self.delays_us
            for preferred in self.preferred
        ]

    def problems(self, max_batch_size: int) -> list[str]:
        """What is wrong with the grid for a model of `max_batch_size` (empty: nothing)."""
        found = []
        delays = self.delays_us
        if not delays or any(not _is_int(d) or not 0 <= d <= MAX_QUEUE_DELAY_US for d in delays):
            found.append(f"delays must be integers in 0..{MAX_QUEUE_DELAY_US} us, got {list(self.delays_us)}")
        if not self.instances or any(not _is_int(n) or not 1 <= n <= 64 for n in self.instances):
            found.append(f"instances must be integers in 1..64, got {list(self.instances)}")
        if not self.preferred:
            found.append("preferred must list at least one set (use 'none' for no preferred sizes)")
        for sizes in self.preferred:
            if any(not _is_int(s) or not 1 <= s <= max_batch_size for s in sizes) or list(sizes) != sorted(
                set(sizes)
            ):
                found.append(
                    f"preferred set {','.join(map(str, sizes))} must be ascending distinct sizes in "
                    f"1..{max_batch_size} (the model's max_batch_size)"
                )
        return found

    @classmethod
    def parse(cls, text: str, high_concurrency: int = DEFAULT_CONCURRENCIES[1]) -> Grid:
        """A grid from `--grid`: "delays=0,100;preferred=none/8,16;instances=1,2"; an axis left
        out keeps its default (see `default`).

        Raises:
            TuneError: an unknown axis or a value that is not a number, naming it.
        """
        grid = cls.default(high_concurrency)
        axes: dict[str, Any] = {}
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            key, sep, value = part.partition("=")
            key = key.strip()
            if not sep or key not in ("delays", "preferred", "instances"):
                raise TuneError(
                    f"--grid part {part!r} must be delays=..., preferred=... or instances=... "
                    "(e.g. 'delays=0,100;preferred=none/8,16;instances=1,2')"
                )
            try:
                if key == "preferred":
                    axes["preferred"] = tuple(
                        () if s.strip() in ("", "none") else tuple(int(x) for x in s.split(","))
                        for s in value.split("/")
                    )
                else:
                    axes[f"{key}_us" if key == "delays" else key] = tuple(int(x) for x in value.split(","))
            except ValueError:
                raise TuneError(f"--grid {key}={value!r}: values must be integers separated by ','") from None
        return dataclasses.replace(grid, **axes)

    @classmethod
    def default(cls, high_concurrency: int = DEFAULT_CONCURRENCIES[1]) -> Grid:
        """The default sweep: queue delays 0/100/500/2000 us, no preferred sizes or half and all
        of the high concurrency's requests, 1 and 2 instances (16 candidates)."""
        half = max(1, high_concurrency // 2)
        sets = ((), (half, high_concurrency)) if half < high_concurrency else ((), (high_concurrency,))
        return cls(preferred=sets)

    def to_json(self) -> dict[str, Any]:
        return {
            "delays_us": list(self.delays_us),
            "preferred_batch_sizes": [list(s) for s in self.preferred],
            "instances": list(self.instances),
        }


@dataclass(frozen=True)
class Rule:
    """The choice rule (see the module docstring); its numbers are recorded with the choice.

    Attributes:
        low_concurrency: Where a lone request's latency is measured (p50).
        high_concurrency: Where throughput and the tail (p99) are measured.
        p50_slack: How far above the best low-concurrency p50 a candidate's may be (0.10: 10%).
        p99_factor: How many times the best high-concurrency p99 a candidate's may be.
        p99_ms: An absolute bound on the high-concurrency p99, or None.
        tie: Throughputs within this share of the best count as equal (the cheapest wins).
    """

    low_concurrency: int = DEFAULT_CONCURRENCIES[0]
    high_concurrency: int = DEFAULT_CONCURRENCIES[1]
    p50_slack: float = 0.10
    p99_factor: float = 2.0
    p99_ms: float | None = None
    tie: float = 0.05

    def problems(self) -> list[str]:
        found = []
        if not (_is_int(self.low_concurrency) and _is_int(self.high_concurrency)) or not (
            1 <= self.low_concurrency < self.high_concurrency
        ):
            found.append(
                f"concurrencies must be integers with 1 <= low < high, got {self.low_concurrency} "
                f"and {self.high_concurrency}"
            )
        if not 0 <= self.p50_slack <= 10:
            found.append(f"p50 slack must be in 0..10 (a share), got {self.p50_slack}")
        if not self.p99_factor >= 1:
            found.append(f"p99 factor must be >= 1, got {self.p99_factor}")
        if self.p99_ms is not None and not self.p99_ms > 0:
            found.append(f"p99 bound must be > 0 ms, got {self.p99_ms}")
        if not 0 <= self.tie < 1:
            found.append(f"tie must be in 0..1 (a share), got {self.tie}")
        return found

    def describe(self) -> str:
        """The rule in one paragraph, with its numbers."""
        low, high = self.low_concurrency, self.high_concurrency
        bound = f" and under {self.p99_ms:g} ms" if self.p99_ms is not None else ""
        return (
            f"Out: any candidate measured in fewer than half of its repeats at either concurrency; "
            f"a median p50 at concurrency {low} more "
            f"than {self.p50_slack:.0%} above the best candidate's; a median p99 at concurrency {high} "
            f"more than {self.p99_factor:g}x the best candidate's{bound}. Of the rest, the highest "
            f"median throughput at concurrency {high} wins; candidates within {self.tie:.0%} of it "
            "count as equal and the cheapest of them wins (fewest instances, then the shortest "
            "queue delay, then the fewest preferred sizes)."
        )


@dataclass(frozen=True)
class Figures:
    """The medians of one candidate's repeats at one concurrency.

    Attributes:
        throughput: Inferences per second.
        p50_ms / p99_ms: Client-side latency.
        average_batch: The server's requests per execution (the dynamic batcher's batch).
        repeats: Repeats with a figure.
        errors: Why repeats have no figure.
    """

    throughput: float | None
    p50_ms: float | None
    p99_ms: float | None
    average_batch: float | None = None
    repeats: int = 0
    errors: tuple[str, ...] = ()

    @classmethod
    def of(cls, runs: Sequence[Mapping[str, Any]]) -> Figures:
        """The medians of repeats given as dicts with throughput, p50_ms, p99_ms, average_batch
        (None where missing) and error."""
        ok = [r for r in runs if r.get("error") is None and r.get("throughput") is not None]

        def med(key: str) -> float | None:
            values = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(values) if values else None

        errors = tuple(str(r["error"]) for r in runs if r.get("error") is not None)
        return cls(med("throughput"), med("p50_ms"), med("p99_ms"), med("average_batch"), len(ok), errors)

    @property
    def complete(self) -> bool:
        """Usable by the rule: figures from at least half of the repeats (perf_analyzer sometimes
        cannot stabilize one window on a loaded machine; that repeat alone is dropped)."""
        figures = (self.throughput, self.p50_ms, self.p99_ms)
        return self.repeats >= max(1, len(self.errors)) and None not in figures


@dataclass(frozen=True)
class Choice:
    """The outcome of the rule.

    Attributes:
        chosen: Index of the chosen candidate, or None when none met the bounds.
        verdicts: Per candidate: "chosen", "eligible: ..." or "out: ..." with the numbers.
        best_p50_ms / best_p99_ms / best_throughput: The references the bounds used.
    """

    chosen: int | None
    verdicts: tuple[str, ...]
    best_p50_ms: float | None = None
    best_p99_ms: float | None = None
    best_throughput: float | None = None


def choose(candidates: Sequence[Candidate], figures: Sequence[Mapping[int, Figures]], rule: Rule) -> Choice:
    """Applies `rule` to every candidate's medians (`figures[i][concurrency]`)."""
    low, high = rule.low_concurrency, rule.high_concurrency
    measured = [
        i for i, f in enumerate(figures)
        if low in f and high in f and f[low].complete and f[high].complete
    ]  # fmt: skip
    verdicts = ["out: measured in fewer than half of its repeats" for _ in candidates]
    if not measured:
        return Choice(None, tuple(verdicts))
    best_p50 = min(figures[i][low].p50_ms for i in measured)  # type: ignore[type-var]
    best_p99 = min(figures[i][high].p99_ms for i in measured)  # type: ignore[type-var]
    p99_limit = best_p99 * rule.p99_factor
    if rule.p99_ms is not None:
        p99_limit = min(p99_limit, rule.p99_ms)
    eligible = []
    for i in measured:
        p50, p99 = figures[i][low].p50_ms, figures[i][high].p99_ms
        assert p50 is not None and p99 is not None
        if p50 > best_p50 * (1 + rule.p50_slack):
            verdicts[i] = (
                f"out: p50 at c={low} {p50:.3f} ms > {1 + rule.p50_slack:.2f} x best {best_p50:.3f} ms"
            )
        elif p99 > p99_limit:
            verdicts[i] = f"out: p99 at c={high} {p99:.3f} ms > limit {p99_limit:.3f} ms"
        else:
            eligible.append(i)
    if not eligible:
        return Choice(None, tuple(verdicts), best_p50, best_p99)
    best = max(figures[i][high].throughput or 0.0 for i in eligible)
    equal = [i for i in eligible if (figures[i][high].throughput or 0.0) >= best * (1 - rule.tie)]
    chosen = min(equal, key=lambda i: (candidates[i].cost(), i))
    for i in eligible:
        share = (figures[i][high].throughput or 0.0) / best if best else 0.0
        tied = " (tied, costlier)" if i in equal else ""
        verdicts[i] = f"eligible: {share:.0%} of the best throughput{tied}"
    tie_note = f": cheapest of {len(equal)} within {rule.tie:.0%}" if len(equal) > 1 else ""
    verdicts[chosen] = "chosen" + tie_note
    return Choice(chosen, tuple(verdicts), best_p50, best_p99, best)


# --- the model, its candidates and its repository -------------------------------------------


@dataclass(frozen=True)
class Target:
    """What is tuned: a served model (a variant of a built model) or a fused pipeline.

    Attributes:
        name: The served name given (e.g. "fraud", "fraud_int8", "fraud_scorer").
        spec: Its spec as served (a ModelSpec under the served name, or the EnsembleSpec in the
            form tuned).
        folder: The model folder serving it (where the record goes).
        form: "model" for a ModelSpec, else the pipeline's form ("fused").
    """

    name: str
    spec: Spec
    folder: Path
    form: str

    @property
    def batching(self) -> DynamicBatching | None:
        if isinstance(self.spec, EnsembleSpec):
            return self.spec.fused.dynamic_batching
        return self.spec.dynamic_batching

    @property
    def instance_groups(self) -> tuple[InstanceGroup, ...]:
        if isinstance(self.spec, EnsembleSpec):
            return self.spec.fused.instance_groups
        return self.spec.instance_groups

    def current(self) -> Candidate:
        """The spec's own settings as a candidate."""
        batching = self.batching
        count = sum(g.count for g in self.instance_groups) or 1
        if batching is None:
            return Candidate(0, (), count, batching=False, current=True)
        preferred = tuple(batching.preferred_batch_sizes)
        return Candidate(batching.max_queue_delay_us, preferred, count, current=True)

    def render(self, candidate: Candidate, name: str) -> Spec:
        """The spec of `candidate`, served as `name` (a model nothing builds: its artifacts are
        linked in from the built repository)."""
        kind = self.instance_groups[0].kind if self.instance_groups else "CPU"
        groups = (InstanceGroup(kind=kind, count=candidate.instances),)
        preserve = bool(self.batching and self.batching.preserve_ordering)
        batching = DynamicBatching(candidate.preferred_batch_sizes, candidate.max_queue_delay_us, preserve)
        if isinstance(self.spec, EnsembleSpec):
            fused = dataclasses.replace(self.spec.fused, dynamic_batching=batching, instance_groups=groups)
            return dataclasses.replace(self.spec, name=name, form="fused", fused=fused)
        spec = self.spec if candidate.batching else without_dynamic_batching(self.spec)
        return dataclasses.replace(
            spec, name=name, build=None, instance_groups=groups,
            dynamic_batching=batching if candidate.batching else None,
        )  # fmt: skip


def resolve(name: str, form: str | None = None) -> Target:
    """The target of `kiln tune NAME [--form F]`.

    Raises:
        TuneError: no served model of that name, or a pipeline in the ensemble form (it has no
            batcher of its own: tune its steps, or its fused form).
    """
    from kiln import registry

    for spec in registry.specs():
        for served in served_specs([spec]):
            if served.name != name:
                continue
            folder = registry.folder_of(spec.name).path
            if isinstance(served, EnsembleSpec):
                form = form or served.form
                if form == "model":
                    raise TuneError(f"{name!r} is a pipeline, not a model: tune it with --form fused")
                if form != "fused":
                    raise TuneError(
                        f"{name!r} is a pipeline in the ensemble form, which has no dynamic batcher of "
                        "its own: tune its step models, or its fused form (--form fused)"
                    )
                return Target(name, dataclasses.replace(served, form="fused"), folder, "fused")
            if form not in (None, "model"):
                raise TuneError(f"{name!r} is a model, not a pipeline: --form applies to pipelines only")
            if not served.max_batch_size:
                raise TuneError(f"{name!r} has max_batch_size 0 (no batch dim): it cannot be batched")
            return Target(name, served, folder, "model")
    known = ", ".join(s.name for s in served_specs(registry.specs()))
    raise TuneError(f"no served model named {name!r}; known: {known}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def candidate_name(target: str, index: int) -> str:
    return f"{target}{CANDIDATE_INFIX}{index:02d}"


def candidates_for(target: Target, grid: Grid, include_current: bool = True) -> list[Candidate]:
    """The current settings first (when asked), then the grid, each configuration once (a grid
    point equal to the current settings is marked current)."""
    current = target.current()
    found: list[Candidate] = [current] if include_current else []
    for candidate in grid.candidates():
        if include_current and candidate.key == current.key:
            continue
        if candidate.key not in {c.key for c in found}:
            found.append(candidate)
    return found


def _by_served_name() -> dict[str, Spec]:
    """Served name -> the registry spec serving it (a built model's spec for each variant)."""
    from kiln import registry

    return {served.name: spec for spec in registry.specs() for served in served_specs([spec])}


def feeding_pipelines(target: Target) -> list[tuple[EnsembleSpec, str]]:
    """The pipelines with a step serving the target's model (or its FP32 variant, whose inputs
    are the same), and that step's model name."""
    from kiln import registry

    base = _by_served_name()[target.name].name
    found = []
    for spec in registry.specs():
        if isinstance(spec, EnsembleSpec):
            step = next((s.model for s in spec.steps if s.model in (target.name, base)), None)
            if step is not None:
                found.append((spec, step))
    return found


def dependencies(target: Target) -> list[Spec]:
    """The specs the temporary repository serves beside the candidates: the target's model, the
    steps of the target (a pipeline) and of the pipelines feeding it (for its inputs), and what
    those steps need, each built model limited to FP32 and the variants needed."""
    by_served = _by_served_name()
    stack = [target.name] if isinstance(target.spec, ModelSpec) else []
    stack += [s.model for s in getattr(target.spec, "steps", ())]
    for pipeline, _ in feeding_pipelines(target) if isinstance(target.spec, ModelSpec) else []:
        stack += [s.model for s in pipeline.steps]
    needed: set[str] = set()
    while stack:
        name = stack.pop()
        if name in needed or name not in by_served:
            continue
        needed.add(name)
        spec = by_served[name]
        if isinstance(spec, EnsembleSpec):
            stack += [s.model for s in spec.steps]
    out: list[Spec] = []
    bases = {by_served[n].name: by_served[n] for n in sorted(needed)}
    for spec in bases.values():
        if spec.build is not None:
            variants = tuple(
                v for v in spec.build.variants
                if v.precision == "fp32" or served_name(spec.name, v.precision) in needed
            )  # fmt: skip
            spec = dataclasses.replace(spec, build=dataclasses.replace(spec.build, variants=variants))
        out.append(spec)
    return out


def _project_import() -> None:
    """Makes the checkout's `benchmarks` and `loadtests` importable (`kiln tune` measures with
    them; they are project folders, not installed packages)."""
    root = str(paths.ROOT)
    if not (paths.ROOT / "benchmarks" / "perf.py").is_file():
        raise TuneError(f"kiln tune needs the project checkout's benchmarks/ (not found under {root})")
    if root not in sys.path:
        sys.path.insert(0, root)


def build_repository(target: Target, candidates: Sequence[Candidate], dest: Path) -> list[str]:
    """Writes the repository of the sweep into `dest`; returns the candidates' model names.

    Raises:
        TuneError: the target's model is not built.
    """
    _project_import()
    from benchmarks.variants import variant_repository

    names = [candidate_name(target.name, i) for i in range(len(candidates))]
    rendered = [target.render(c, n) for c, n in zip(candidates, names, strict=True)]
    built = paths.model_repository() / target.name / "1"
    if isinstance(target.spec, ModelSpec) and not any(p.is_file() for p in built.glob("*")):
        raise TuneError(
            f"{target.name!r} is not built ({built} holds no artifact): run `make build-engines` first"
        )
    try:
        variant_repository(dest, specs=[*dependencies(target), *rendered])
    except FileNotFoundError as error:
        raise TuneError(str(error)) from error
    if isinstance(target.spec, ModelSpec):
        for name in names:
            for path in sorted(built.iterdir()):
                if path.is_file() and path.name != ".gitkeep":
                    os.symlink(path.resolve(), dest / name / "1" / path.name)
    return names


Requests = list[dict[str, Any]]
"""Batch-1 requests: input name -> numpy array."""


def _corpus(model: str) -> Any:
    """The load-test mix of `model` without the reference's answers, or None when it has none."""
    _project_import()
    from loadtests import inputs

    try:
        return inputs.build(model, reference=False)
    except KeyError:
        return None


def request_inputs(target: Target, grpc_url: str) -> tuple[Requests, str]:
    """The requests to measure with and where they come from: the target's own load-test mix
    when its requests fit the target's inputs, else the tensors a feeding pipeline's mix hands
    the target's step (sent through the steps on the server at `grpc_url`).

    Raises:
        TuneError: no mix fits and no pipeline with a mix feeds the target.
    """
    names = {t.name for t in target.spec.inputs}
    corpus = _corpus(target.name)
    if corpus is not None and corpus.items and all(set(i.inputs) <= names for i in corpus.items):
        where = f"the load-test mix of {target.name} ({len(corpus.items)} requests)"
        return [dict(i.inputs) for i in corpus.items], where
    from benchmarks.run import step_input_items, step_items_kept, step_tensors

    for pipeline, step in feeding_pipelines(target):
        corpus = _corpus(pipeline.name)
        if corpus is None:
            continue
        steps = dataclasses.replace(pipeline, form="ensemble")
        requests = step_tensors(grpc_url, steps, step_input_items(corpus))[step]
        requests = requests[: step_items_kept(requests)]
        return requests, (
            f"the tensors {pipeline.name}'s load-test mix feeds its step {step} ({len(requests)} requests, "
            "sent through the steps one by one)"
        )
    raise TuneError(
        f"no request inputs for {target.name!r}: its folder's loadtest.py has no mix for it and no "
        "pipeline with a mix feeds it (add a `corpus` to the folder's loadtest.py)"
    )


def check_answers(grpc_url: str, names: Sequence[str], requests: Requests) -> int:
    """Sends the first requests one at a time to every candidate; each must answer exactly as
    the first candidate does (they serve the same model). Returns the requests checked.

    Raises:
        TuneError: a candidate answers otherwise, naming it and the request.
    """
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    client = grpcclient.InferenceServerClient(grpc_url)
    checked = requests[:ANSWER_CHECK_ITEMS]
    try:
        for index, request in enumerate(checked):
            answers = []
            for name in names:
                tensors = []
                for key, array in request.items():
                    tensor = grpcclient.InferInput(key, list(array.shape), np_to_triton_dtype(array.dtype))
                    tensor.set_data_from_numpy(array)
                    tensors.append(tensor)
                result = client.infer(name, tensors)
                answers.append({o.name: result.as_numpy(o.name) for o in result.get_response().outputs})
            for name, answer in zip(names[1:], answers[1:], strict=True):
                same = answer.keys() == answers[0].keys() and all(
                    np.array_equal(answer[k], answers[0][k]) for k in answer
                )
                if not same:
                    raise TuneError(f"candidate {name} answers request #{index} otherwise than {names[0]}")
    finally:
        client.close()
    return len(checked)


Runs = list[dict[int, list[dict[str, Any]]]]
"""Per candidate, per concurrency, every repeat's figures."""
Log = Callable[[str], None]


def measure(
    grpc_url: str, names: Sequence[str], input_file: Path, rule: Rule, repeats: int, window_ms: int, log: Log
) -> Runs:
    """perf_analyzer on every candidate at both concurrencies, `repeats` times, interleaved:
    repeat r of every candidate (the order rotated by r, so no candidate always runs first or
    after the same neighbour), then repeat r + 1."""
    from benchmarks import perf

    runs: Runs = [{rule.low_concurrency: [], rule.high_concurrency: []} for _ in names]
    for repeat in range(repeats):
        order = [(i + repeat) % len(names) for i in range(len(names))]
        for concurrency in (rule.low_concurrency, rule.high_concurrency):
            for i in order:
                result = perf.run(
                    names[i], grpc_url, input_file, concurrency=concurrency, measurement_ms=window_ms,
                    max_trials=PERF_MAX_TRIALS,
                )
                figures = {
                    "repeat": repeat + 1,
                    "throughput": result.throughput,
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "average_batch": result.server.average_batch if result.server else None,
                    "generator_cpu": result.generator_cpu,
                    "error": result.error,
                }
                runs[i][concurrency].append(figures)
                shown = (
                    f"{result.throughput:.0f}/s p50 {result.p50_ms} ms p99 {result.p99_ms} ms"
                    if result.error is None else result.error
                )
                log(f"[{repeat + 1}/{repeats}] {names[i]} c={concurrency}: {shown}")
    return runs


def batching_line(candidate: Candidate, preserve_ordering: bool = False) -> str:
    """The DynamicBatching(...) of `candidate` as Python, or "None" for no batcher."""
    if not candidate.batching:
        return "None"
    parts = []
    if candidate.preferred_batch_sizes:
        parts.append(f"preferred_batch_sizes={tuple(candidate.preferred_batch_sizes)!r}")
    parts.append(f"max_queue_delay_us={candidate.max_queue_delay_us}")
    if preserve_ordering:
        parts.append("preserve_ordering=True")
    return f"DynamicBatching({', '.join(parts)})"


def spec_line(target: Target, candidate: Candidate) -> str:
    """The spec fields that give `candidate`'s settings, as the lines to put in the spec."""
    kind = target.instance_groups[0].kind if target.instance_groups else "CPU"
    preserve = bool(target.batching and target.batching.preserve_ordering)
    batching = batching_line(candidate, preserve)
    groups = f'(InstanceGroup(kind="{kind}", count={candidate.instances}),)'
    if isinstance(target.spec, EnsembleSpec):
        metrics = "" if target.spec.fused.step_metrics else ", step_metrics=False"
        return f'form="fused",\nfused=Fused(dynamic_batching={batching}, instance_groups={groups}{metrics}),'
    return f"dynamic_batching={batching},\ninstance_groups={groups},"


def _fig(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(record: Mapping[str, Any]) -> str:
    """The record's candidates as a Markdown table (medians), the chosen one in bold."""
    low, high = record["rule"]["low_concurrency"], record["rule"]["high_concurrency"]
    lines = [
        f"| candidate | settings | p50 c={low} (ms) | req/s c={low} | req/s c={high} | p50 c={high} (ms) "
        f"| p99 c={high} (ms) | batch c={high} | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for entry in record["candidates"]:
        lo, hi = entry["medians"][str(low)], entry["medians"][str(high)]
        name = f"**{entry['name']}**" if entry["verdict"].startswith("chosen") else entry["name"]
        lines.append(
            f"| {name} | {entry['label']} | {_fig(lo['p50_ms'])} | {_fig(lo['throughput'], 0)} | "
            f"{_fig(hi['throughput'], 0)} | {_fig(hi['p50_ms'])} | {_fig(hi['p99_ms'])} | "
            f"{_fig(hi['average_batch'], 1)} | {entry['verdict']} |"
        )
    return "\n".join(lines)


def make_record(
    target: Target,
    candidates: Sequence[Candidate],
    names: Sequence[str],
    runs: Runs,
    grid: Grid,
    rule: Rule,
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """The record of one sweep: every candidate's medians and repeats, the rule, the choice and
    where it was measured (`settings`: command, repeats, window, inputs, wall time)."""
    _project_import()
    from loadtests.environment import commit, machine_info

    figures = [{c: Figures.of(r) for c, r in per.items()} for per in runs]
    choice = choose(candidates, figures, rule)
    entries = []
    for i, candidate in enumerate(candidates):
        entries.append({
            "name": names[i],
            "label": candidate.label(),
            **dataclasses.asdict(candidate),
            "medians": {str(c): dataclasses.asdict(f) for c, f in figures[i].items()},
            "runs": {str(c): r for c, r in runs[i].items()},
            "verdict": choice.verdicts[i],
        })  # fmt: skip
    return {
        "format": RECORD_FORMAT,
        "model": target.name,
        "form": target.form,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": commit(),
        "machine": machine_info(),
        **dict(settings),
        "grid": grid.to_json(),
        "rule": {"text": rule.describe(), **dataclasses.asdict(rule)},
        "candidates": entries,
        "choice": _choice_entry(target, candidates, names, figures, choice, rule),
    }


def _choice_entry(
    target: Target,
    candidates: Sequence[Candidate],
    names: Sequence[str],
    figures: Sequence[Mapping[int, Figures]],
    choice: Choice,
    rule: Rule,
) -> dict[str, Any] | None:
    """The chosen candidate, its spec line, and its figures against the current settings'."""
    if choice.chosen is None:
        return None
    chosen = candidates[choice.chosen]
    entry: dict[str, Any] = {
        "name": names[choice.chosen],
        "label": chosen.label(),
        "settings": dataclasses.asdict(chosen),
        "spec_line": spec_line(target, chosen),
        "is_current": chosen.current,
        "best_p50_ms": choice.best_p50_ms,
        "best_p99_ms": choice.best_p99_ms,
        "best_throughput": choice.best_throughput,
    }
    current = next((i for i, c in enumerate(candidates) if c.current), None)
    if current is not None and not chosen.current:
        low, high = rule.low_concurrency, rule.high_concurrency
        mine, theirs = figures[choice.chosen], figures[current]
        entry["against_current"] = {
            f"throughput_c{high}": _ratio(mine[high].throughput, theirs[high].throughput),
            f"p99_c{high}": _ratio(mine[high].p99_ms, theirs[high].p99_ms),
            f"p50_c{low}": _ratio(mine[low].p50_ms, theirs[low].p50_ms),
        }
    return entry


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def write_record(record: Mapping[str, Any], folder: Path) -> tuple[Path, Path]:
    """Puts `record` into `folder`'s tuning.json (replacing the entry of the same model and form,
    keeping the others) and rewrites tuning.md from it; returns both paths.

    Raises:
        TuneError: the existing tuning.json is not a record of this format.
    """
    path = Path(folder) / RECORD_FILE
    document: dict[str, Any] = {"format": RECORD_FORMAT, "tunings": []}
    if path.is_file():
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise TuneError(f"{path} is not JSON ({error}); move it away and run again") from error
        if not isinstance(document, dict) or document.get("format") != RECORD_FORMAT or not isinstance(
            document.get("tunings"), list
        ):
            raise TuneError(f"{path} is not a kiln tuning record (format {RECORD_FORMAT}); move it away")
    key = (record["model"], record["form"])
    kept = [t for t in document["tunings"] if (t.get("model"), t.get("form")) != key]
    document["tunings"] = sorted([*kept, dict(record)], key=lambda t: (t["model"], t["form"]))
    path.write_text(json.dumps(document, indent=1) + "\n")
    markdown = Path(folder) / TABLE_FILE
    markdown.write_text(render_markdown(document, Path(folder).name))
    return path, markdown


def within_noise(record: Mapping[str, Any]) -> bool | None:
    """Whether the chosen candidate's throughputs at the high concurrency, over the repeats,
    overlap the current settings' (their difference is within the run's noise); None when there
    is no choice, no current candidate, or the current settings were chosen."""
    choice = record.get("choice")
    high = str(record["rule"]["high_concurrency"])
    by_name = {c["name"]: c for c in record["candidates"]}
    current = next((c for c in record["candidates"] if c["current"]), None)
    if not choice or current is None or choice["name"] == current["name"]:
        return None
    spans = []
    for entry in (by_name[choice["name"]], current):
        values = [r["throughput"] for r in entry["runs"][high] if r["throughput"] is not None]
        if not values:
            return None
        spans.append((min(values), max(values)))
    (low_a, high_a), (low_b, high_b) = spans
    return low_a <= high_b and low_b <= high_a


def _noise_note(record: Mapping[str, Any]) -> str:
    """The sentence `within_noise` gives for the record (empty when it says nothing)."""
    overlap = within_noise(record)
    if overlap is None:
        return ""
    high = record["rule"]["high_concurrency"]
    if overlap:
        return (
            f". The repeats' throughput ranges at c={high} overlap: the throughput difference is "
            "within this run's noise (measure again on a quieter machine before acting on it)."
        )
    return f". The repeats' throughput ranges at c={high} do not overlap."


def _load(machine: Mapping[str, Any]) -> str:
    load = machine.get("load_average")
    return f"{load[0]:.1f}" if load else "?"


def render_markdown(document: Mapping[str, Any], folder: str) -> str:
    """tuning.md: each tuning's context, rule, table and choice."""
    out = [
        f"# Batching chosen by measurement: models/{folder}",
        "",
        f"Generated by `kiln tune` from [{RECORD_FILE}]({RECORD_FILE}) (every repeat is there); do not "
        "edit. See [docs/tuning.md](../../docs/tuning.md).",
    ]
    for record in document["tunings"]:
        machine = record.get("machine", {})
        choice = record.get("choice")
        out += [
            "",
            f"## {record['model']} ({record['form']})",
            "",
            f"{record['date']}, commit {record['commit']}, {machine.get('cpu_model', '?')} "
            f"({machine.get('usable_cpus', '?')} CPUs, load average {_load(machine)} at the end); "
            f"`{record.get('command', '')}`",
            "",
            f"perf_analyzer over gRPC, windows of {record.get('window_ms')} ms, medians of "
            f"{record.get('repeats')} interleaved repeats; inputs: {record.get('inputs')}; "
            f"measured in {record.get('wall_s', 0):.0f} s.",
            "",
            f"Rule: {record['rule']['text']}",
            "",
            table(record),
            "",
        ]
        if choice is None:
            out.append("Chosen: none (no candidate met the bounds).")
        else:
            out += [f"Chosen: {choice['name']} ({choice['label']}); in the spec:", "", "```python",
                    choice["spec_line"], "```"]
            if choice.get("against_current"):
                out += ["", "Against the current settings: " + ", ".join(
                    f"{k} {v:.2f}x" for k, v in choice["against_current"].items() if v is not None
                ) + _noise_note(record)]
    return "\n".join(out) + "\n"


def tune(
    target: Target,
    grid: Grid,
    rule: Rule,
    *,
    repeats: int = DEFAULT_REPEATS,
    window_ms: int = DEFAULT_WINDOW_MS,
    include_current: bool = True,
    command: str = "",
    log: Log = print,
) -> dict[str, Any]:
    """Runs the sweep (a temporary repository, one tritonserver, perf_analyzer) and returns the
    record (`make_record`); writes nothing outside a temporary folder.

    Raises:
        TuneError: a bad grid or rule, a model not built, no inputs, a candidate answering
            otherwise than the others.
        kiln.server.TritonServerError: the server or a candidate failed to start.
    """
    problems = grid.problems(target.spec.max_batch_size) + rule.problems()
    if not _is_int(repeats) or repeats < 1:
        problems.append(f"repeats must be an integer >= 1, got {repeats!r}")
    if not _is_int(window_ms) or window_ms < 50:
        problems.append(f"window must be an integer >= 50 ms, got {window_ms!r}")
    if problems:
        raise TuneError(f"kiln tune {target.name}: " + "; ".join(problems))
    candidates = candidates_for(target, grid, include_current)
    _project_import()
    import tempfile
    import time

    from benchmarks import perf
    from kiln.server import FREE_PORT, TritonServer

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kiln-tune-") as scratch:
        root = Path(scratch)
        names = build_repository(target, candidates, root / "repository")
        log(f"{len(names)} candidates of {target.name} ({target.form}); starting tritonserver")
        with TritonServer(
            root / "repository", http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT,
            log_file=root / "tritonserver.log",
        ) as server:  # fmt: skip
            requests, where = request_inputs(target, server.grpc_url)
            checked = check_answers(server.grpc_url, names, requests)
            log(f"inputs: {where}; {checked} answers equal in every candidate")
            input_file = perf.input_file(requests, root / "inputs.json")
            runs = measure(server.grpc_url, names, input_file, rule, repeats, window_ms, log)
    settings = {
        "command": command,
        "repeats": repeats,
        "window_ms": window_ms,
        "inputs": where,
        "generator": "perf_analyzer (tritonclient 2.51), gRPC, closed loop at a concurrency",
        "wall_s": round(time.monotonic() - started, 1),
    }
    return make_record(target, candidates, names, runs, grid, rule, settings)
