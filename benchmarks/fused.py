"""fraud_scorer as an ensemble vs fused, and each of its steps alone, side by side with the floor.

One temporary repository (`benchmarks.variants.variant_repository`: the committed specs, the
built fraud model linked in) serves, side by side on one tritonserver:

- `fraud_scorer`: the ensemble form (three Python-based steps: kiln_tabular -> fraud -> kiln_threshold);
- `fraud_scorer_fused`: the same pipeline spec in the fused form (one kiln_fused model);
- `fraud_scorer_fused_nometrics`: the fused form with `Fused(step_metrics=False)`, when asked
  (`--no-metrics-variant`), to show what the per-step counters cost;
- `fraud_scorer_fused_d100`: the fused form with a 100 us queue delay, when asked (`--delay-variant`);
- with `--steps`, each step alone: `fraud_features_alone` (kiln_tabular), `fraud_alone`
  (kiln_onnx) and `fraud_threshold_alone` (kiln_threshold), copies of the step models' folders
  whose dynamic batcher is the floor's (no queue delay, no preferred sizes), so that what they
  add to the floor is the step's code, not its batcher's wait; each is fed the very tensors that
  flow through the pipeline (the mix sent through the steps one by one first);
- `identity`: the floor, a Python-based model copying one FP32 [16] input to its output (the
  python backend alone: no kiln code), with a dynamic batcher like the fused model's.

Every pipeline answer is first checked: each request of the mix (`kiln.models.fraud.loadtest`,
RECORD and every fifth FEATURE_VALUES) goes to both forms and the answers must be equal. Then
perf_analyzer (gRPC, `benchmarks.perf`) measures each model at each concurrency, the models
interleaved within each repeat (repeat 1 of every model, then repeat 2, ...); the figures are the
medians of the repeats, with the ratios to the floor's medians of the same run, and the server's
own split of each model's time (queue, compute input / infer / output: perf_analyzer's
server-side statistics; compute infer is the time in the model's `execute`). Not part of
`make bench`; nothing is written but the temporary repository (and `--json`, when given).

    .venv/bin/python -m benchmarks.fused                       # concurrency 1 and 16, 3 repeats
    .venv/bin/python -m benchmarks.fused --steps               # and each step alone
    .venv/bin/python -m benchmarks.fused --repeats 5 --window-ms 3000 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import floor, perf
from benchmarks.variants import variant_repository
from kiln import paths, tensors
from kiln.spec import DynamicBatching, Fused, Variant

ENSEMBLE = tensors.FRAUD_SCORER
FUSED = f"{ENSEMBLE}_fused"
FUSED_NO_METRICS = f"{ENSEMBLE}_fused_nometrics"
FUSED_DELAY = f"{ENSEMBLE}_fused_d100"
IDENTITY = floor.IDENTITY
IDENTITY_FEATURES = floor.IDENTITY_FEATURES
ALONE_SUFFIX = "_alone"
"""A step served alone gets this suffix (`alone_copy`)."""


def step_models() -> tuple[str, str, str]:
    """fraud_scorer's steps, in order: kiln_tabular, the ONNX model (kiln_onnx), kiln_threshold."""
    from kiln.models.fraud import pipeline as fraud_pipelines

    return (fraud_pipelines.FEATURES_MODEL, fraud_pipelines.FRAUD.name, fraud_pipelines.THRESHOLD_MODEL)


def pipeline_specs(no_metrics: bool, delay: bool) -> list[Any]:
    """fraud (FP32 only), its two processing steps, the ensemble and the fused forms."""
    from kiln.models.fraud import pipeline as fraud_pipelines
    from kiln.registry import by_name

    fraud = by_name("fraud")
    fraud = dataclasses.replace(fraud, build=dataclasses.replace(fraud.build, variants=(Variant("fp32"),)))
    ensemble = dataclasses.replace(fraud_pipelines.FRAUD_SCORER, form="ensemble")
    fused = dataclasses.replace(ensemble, name=FUSED, form="fused")
    specs = [fraud, fraud_pipelines.FEATURES_SPEC, fraud_pipelines.THRESHOLD_SPEC, ensemble, fused]
    if no_metrics:
        specs.append(dataclasses.replace(fused, name=FUSED_NO_METRICS, fused=Fused(step_metrics=False)))
    if delay:
        specs.append(
            dataclasses.replace(
                fused, name=FUSED_DELAY, fused=Fused(dynamic_batching=DynamicBatching(max_queue_delay_us=100))
            )
        )
    return specs


def alone_copy(repository: Path, step: str) -> str:
    """Serves a copy of `step`'s folder as `<step>_alone` with the floor's dynamic batcher (no
    queue delay, no preferred batch sizes); its version files are symlinks to the step's.
    Returns the copy's name."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    name = step + ALONE_SUFFIX
    source, dest = repository / step, repository / name
    config = text_format.Parse((source / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    config.name = name
    config.dynamic_batching.Clear()
    config.dynamic_batching.SetInParent()
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.name != "config.pbtxt":
            target = dest / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(path.resolve(), target)
    (dest / "config.pbtxt").write_text(text_format.MessageToString(config))
    return name


def build(root: Path, no_metrics: bool, delay: bool, steps: bool) -> tuple[Path, Path]:
    """The repository under `root` (the pipelines, the identity floor of `benchmarks.floor`, the
    steps alone when asked) and the backends folder to serve it with (kiln's own)."""
    repository = variant_repository(root / "repository", specs=pipeline_specs(no_metrics, delay))
    floor.write(repository)
    if steps:
        for step in step_models():
            alone_copy(repository, step)
    return repository, paths.backends_dir()


def _infer(client: Any, model: str, inputs: Mapping[str, np.ndarray]) -> Any:
    """One gRPC request of `inputs` (BYTES for object arrays, FP32 otherwise) to `model`."""
    import tritonclient.grpc as grpcclient

    tensors_in = []
    for name, array in inputs.items():
        dtype = "BYTES" if array.dtype == object else "FP32"
        tensor = grpcclient.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array)
        tensors_in.append(tensor)
    return client.infer(model, tensors_in)


def check_answers(grpc_url: str, items: Sequence[Any], models: Sequence[str]) -> int:
    """Sends every request of the mix to each pipeline model; all answers must equal the
    ensemble's. Returns the number of requests checked per model."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        for item in items:
            answers = []
            for model in models:
                result = _infer(client, model, item.inputs)
                answers.append((result.as_numpy(tensors.SCORE), result.as_numpy(tensors.DECISION)))
            for model, (scores, decisions) in zip(models[1:], answers[1:], strict=True):
                if not (np.array_equal(scores, answers[0][0]) and np.array_equal(decisions, answers[0][1])):
                    raise AssertionError(f"{model} answers {item.name} otherwise than {models[0]}")
    finally:
        client.close()
    return len(items)


def step_inputs(grpc_url: str, items: Sequence[Any]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The tensors each step receives inside the pipeline, per request of the mix: the mix sent
    through the steps alone, one after another. The last step's answers must equal the ensemble's.
    Returns `<step>_alone` -> one input dict per request."""
    import tritonclient.grpc as grpcclient

    features_model, model, threshold_model = (s + ALONE_SUFFIX for s in step_models())
    fed: dict[str, list[dict[str, np.ndarray]]] = {features_model: [], model: [], threshold_model: []}
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        for item in items:
            fed[features_model].append(dict(item.inputs))
            features = _infer(client, features_model, item.inputs).as_numpy(tensors.FRAUD_FEATURES)
            fed[model].append({tensors.FRAUD_FEATURES: features})
            probability = _infer(client, model, {tensors.FRAUD_FEATURES: features})
            probability = probability.as_numpy(tensors.FRAUD_PROBABILITY)
            fed[threshold_model].append({tensors.FRAUD_PROBABILITY: probability})
            steps = _infer(client, threshold_model, {tensors.FRAUD_PROBABILITY: probability})
            ensemble = _infer(client, ENSEMBLE, item.inputs)
            if not np.array_equal(steps.as_numpy(tensors.SCORE), ensemble.as_numpy(tensors.SCORE)):
                raise AssertionError(f"the steps alone answer {item.name} otherwise than {ENSEMBLE}")
    finally:
        client.close()
    return fed


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _ratio(value: float | None, floor: float | None) -> str:
    return f"{value / floor:.2f}x" if value and floor else "n/a"


def report(runs: Mapping[tuple[str, int], Sequence[perf.PerfResult]], models: Sequence[str],
           concurrencies: Sequence[int]) -> list[str]:
    """The markdown tables: medians and ratios to the floor; the server's split of each model's
    time (microseconds per request, medians; average batch = requests per execute)."""
    lines = [
        "| model | concurrency | req/s | p50 (ms) | p99 (ms) | p50 / floor | p99 / floor | req/s / floor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    split = [
        "",
        "| model | concurrency | queue (us) | compute input (us) | compute infer (us) | compute output (us) "
        "| avg batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in concurrencies:
        floor = runs[(IDENTITY, concurrency)]
        floor_p50 = median([r.p50_ms for r in floor])
        floor_p99 = median([r.p99_ms for r in floor])
        floor_tput = median([r.throughput for r in floor])
        for model in models:
            results = runs[(model, concurrency)]
            tput = median([r.throughput for r in results])
            p50 = median([r.p50_ms for r in results])
            p99 = median([r.p99_ms for r in results])
            lines.append(
                f"| {model} | {concurrency} | {tput or 0:.0f} | {p50 or 0:.3f} | {p99 or 0:.3f} | "
                f"{_ratio(p50, floor_p50)} | {_ratio(p99, floor_p99)} | {_ratio(tput, floor_tput)} |"
            )
            servers = [r.server for r in results if r.server is not None]
            cells = [
                median([getattr(s, field) for s in servers])
                for field in ("queue_us", "compute_input_us", "compute_infer_us", "compute_output_us")
            ]
            batch = median([s.average_batch for s in servers])
            split.append(
                f"| {model} | {concurrency} | "
                + " | ".join("n/a" if c is None else f"{c:.0f}" for c in cells)
                + f" | {'n/a' if batch is None else f'{batch:.2f}'} |"
            )
    return lines + split


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=2000, help="perf_analyzer's measurement window")
    parser.add_argument(
        "--no-metrics-variant", action="store_true", help="also serve the fused form without per-step metrics"
    )
    parser.add_argument(
        "--delay-variant", action="store_true", help="also serve the fused form with a 100 us queue delay"
    )
    parser.add_argument(
        "--steps", action="store_true", help="also measure each step alone, fed the pipeline's own tensors"
    )
    parser.add_argument(
        "--no-pipelines", action="store_true", help="measure only the floor (and the steps with --steps)"
    )
    parser.add_argument("--json", type=Path, help="write every run here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from kiln.models.fraud.loadtest import corpus
    from kiln.server import FREE_PORT, TritonServer

    pipelines = [ENSEMBLE, FUSED]
    if args.no_metrics_variant:
        pipelines.append(FUSED_NO_METRICS)
    if args.delay_variant:
        pipelines.append(FUSED_DELAY)
    steps = [s + ALONE_SUFFIX for s in step_models()] if args.steps else []
    models = [IDENTITY, *([] if args.no_pipelines else pipelines), *steps]
    with tempfile.TemporaryDirectory(prefix="kiln-fused-bench-") as scratch:
        root = Path(scratch)
        repository, backends = build(root, args.no_metrics_variant, args.delay_variant, args.steps)
        mix = corpus(ENSEMBLE, reference=False)
        zeros = np.zeros((1, IDENTITY_FEATURES), np.float32)
        inputs = {IDENTITY: perf.input_file([{"x": zeros}], root / "identity.json")}
        records = perf.input_file([i.inputs for i in mix.items], root / "fraud.json")
        inputs.update(dict.fromkeys(pipelines, records))
        with TritonServer(
            repository, backends_dir=backends, http_port=FREE_PORT, grpc_port=FREE_PORT,
            metrics_port=FREE_PORT, log_file=root / "tritonserver.log",
        ) as server:
            checked = check_answers(server.grpc_url, mix.items, pipelines)
            print(f"answers: {checked} requests (RECORD and FEATURE_VALUES), equal in {', '.join(pipelines)}")
            if steps:
                for step, fed in step_inputs(server.grpc_url, mix.items).items():
                    inputs[step] = perf.input_file(fed, root / f"{step}.json")
                print(f"steps alone: fed the pipeline's tensors of {checked} requests, answers equal")
            runs = measure(server.grpc_url, models, inputs, args)
    print()
    print("\n".join(report(runs, models, args.concurrency)))
    if args.json:
        args.json.write_text(json.dumps(
            {f"{m}@{c}": [r.to_json() for r in rs] for (m, c), rs in runs.items()}, indent=1
        ))
    return 0


def measure(grpc_url: str, models: Sequence[str], inputs: Mapping[str, Path],
            args: argparse.Namespace) -> dict[tuple[str, int], list[perf.PerfResult]]:
    """perf_analyzer on every model at every concurrency, the models interleaved per repeat."""
    runs: dict[tuple[str, int], list[perf.PerfResult]] = {}
    started = time.monotonic()
    result = None
    for repeat in range(args.repeats):
        for concurrency in args.concurrency:
            for model in models:
                result = perf.run(
                    model, grpc_url, inputs[model], concurrency=concurrency, measurement_ms=args.window_ms,
                )
                runs.setdefault((model, concurrency), []).append(result)
                figures = (
                    f"{result.throughput:.0f}/s p50 {result.p50_ms} ms p99 {result.p99_ms} ms"
                    if result.error is None else result.error
                )
                print(f"[{repeat + 1}/{args.repeats}] {model} c={concurrency}: {figures}", flush=True)
    if result is not None:
        print(f"measured in {time.monotonic() - started:.0f} s; last command: {' '.join(result.command)}")
    return runs


if __name__ == "__main__":
    sys.exit(main())
