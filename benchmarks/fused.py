"""fraud_scorer as an ensemble vs fused, side by side on one tritonserver, with the identity floor.

One temporary repository (`benchmarks.variants.variant_repository`: the committed specs, the
built fraud model linked in) serves, side by side:

- `fraud_scorer`: the ensemble form (three Python-based steps: kiln_tabular -> fraud -> kiln_threshold);
- `fraud_scorer_fused`: the same pipeline spec in the fused form (one kiln_fused model);
- `fraud_scorer_fused_nometrics`: the fused form with `Fused(step_metrics=False)`, when asked
  (`--no-metrics-variant`), to show what the per-step counters cost;
- `fraud_scorer_fused_d100`: the fused form with a 100 us queue delay, when asked (`--delay-variant`);
- `identity`: the floor, a Python-based model copying one FP32 [16] input to its output (the
  python backend alone: no kiln code), with a dynamic batcher like the fused model's.

Every pipeline answer is first checked: each request of the mix (`kiln.models.fraud.loadtest`,
RECORD and every fifth FEATURE_VALUES) goes to both forms and the answers must be equal. Then
perf_analyzer (gRPC, `benchmarks.perf`) measures each model at each concurrency, the models
interleaved within each repeat (repeat 1 of every model, then repeat 2, ...); the figures are the
medians of the repeats. Not part of `make bench`; nothing is written but the temporary repository
(and `--json`, when given).

    .venv/bin/python -m benchmarks.fused                       # concurrency 1 and 16, 3 repeats
    .venv/bin/python -m benchmarks.fused --repeats 5 --window-ms 3000 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import perf
from benchmarks.variants import variant_repository
from kiln import paths, tensors
from kiln.spec import DynamicBatching, Fused, Variant

ENSEMBLE = tensors.FRAUD_SCORER
FUSED = f"{ENSEMBLE}_fused"
FUSED_NO_METRICS = f"{ENSEMBLE}_fused_nometrics"
FUSED_DELAY = f"{ENSEMBLE}_fused_d100"
IDENTITY = "identity"
IDENTITY_BACKEND = "kiln_bench_identity"
IDENTITY_FEATURES = 16
IDENTITY_MODEL_PY = '''"""The benchmark's floor: one FP32 input copied to one output, nothing else."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
'''
IDENTITY_CONFIG = f'''name: "{IDENTITY}"
backend: "{IDENTITY_BACKEND}"
max_batch_size: 256
input {{ name: "x" data_type: TYPE_FP32 dims: {IDENTITY_FEATURES} }}
output {{ name: "y" data_type: TYPE_FP32 dims: {IDENTITY_FEATURES} }}
instance_group {{ kind: KIND_CPU count: 1 }}
dynamic_batching {{ }}
'''


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


def build(root: Path, no_metrics: bool, delay: bool) -> tuple[Path, Path]:
    """The repository and a backends folder (kiln's backends plus the identity one) under `root`."""
    repository = variant_repository(root / "repository", specs=pipeline_specs(no_metrics, delay))
    (repository / IDENTITY / "1").mkdir(parents=True)
    (repository / IDENTITY / "config.pbtxt").write_text(IDENTITY_CONFIG)
    backends = root / "backends"

    shutil.copytree(paths.backends_dir(), backends, ignore=shutil.ignore_patterns("__pycache__"))
    (backends / IDENTITY_BACKEND).mkdir()
    (backends / IDENTITY_BACKEND / "model.py").write_text(IDENTITY_MODEL_PY)
    return repository, backends


def check_answers(grpc_url: str, items: Sequence[Any], models: Sequence[str]) -> int:
    """Sends every request of the mix to each pipeline model; all answers must equal the
    ensemble's. Returns the number of requests checked per model."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        for item in items:
            answers = []
            for model in models:
                inputs = []
                for name, array in item.inputs.items():
                    dtype = "BYTES" if array.dtype == object else "FP32"
                    tensor = grpcclient.InferInput(name, list(array.shape), dtype)
                    tensor.set_data_from_numpy(array)
                    inputs.append(tensor)
                result = client.infer(model, inputs)
                answers.append((result.as_numpy(tensors.SCORE), result.as_numpy(tensors.DECISION)))
            for model, (scores, decisions) in zip(models[1:], answers[1:], strict=True):
                if not (np.array_equal(scores, answers[0][0]) and np.array_equal(decisions, answers[0][1])):
                    raise AssertionError(f"{model} answers {item.name} otherwise than {models[0]}")
    finally:
        client.close()
    return len(items)


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main(argv: Sequence[str] | None = None) -> int:
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
    parser.add_argument("--json", type=Path, help="write every run here")
    args = parser.parse_args(argv)

    from kiln.models.fraud.loadtest import corpus
    from kiln.server import FREE_PORT, TritonServer

    pipelines = [ENSEMBLE, FUSED]
    if args.no_metrics_variant:
        pipelines.append(FUSED_NO_METRICS)
    if args.delay_variant:
        pipelines.append(FUSED_DELAY)
    models = [IDENTITY, *pipelines]
    with tempfile.TemporaryDirectory(prefix="kiln-fused-bench-") as scratch:
        root = Path(scratch)
        repository, backends = build(root, args.no_metrics_variant, args.delay_variant)
        mix = corpus(ENSEMBLE, reference=False)
        pipeline_input = perf.input_file([item.inputs for item in mix.items], root / "fraud.json")
        identity_input = perf.input_file(
            [{"x": np.zeros((1, IDENTITY_FEATURES), np.float32)}], root / "identity.json"
        )
        runs: dict[tuple[str, int], list[perf.PerfResult]] = {}
        with TritonServer(
            repository, backends_dir=backends, http_port=FREE_PORT, grpc_port=FREE_PORT,
            metrics_port=FREE_PORT, log_file=root / "tritonserver.log",
        ) as server:
            checked = check_answers(server.grpc_url, mix.items, pipelines)
            print(f"answers: {checked} requests (RECORD and FEATURE_VALUES), equal in {', '.join(pipelines)}")
            started = time.monotonic()
            for repeat in range(args.repeats):
                for concurrency in args.concurrency:
                    for model in models:
                        result = perf.run(
                            model, server.grpc_url,
                            identity_input if model == IDENTITY else pipeline_input,
                            concurrency=concurrency, measurement_ms=args.window_ms,
                        )
                        runs.setdefault((model, concurrency), []).append(result)
                        figures = (
                            f"{result.throughput:.0f}/s p50 {result.p50_ms} ms p99 {result.p99_ms} ms"
                            if result.error is None else result.error
                        )
                        print(f"[{repeat + 1}/{args.repeats}] {model} c={concurrency}: {figures}", flush=True)
            print(f"measured in {time.monotonic() - started:.0f} s; last command: {' '.join(result.command)}")
    floor = {c: runs[(IDENTITY, c)] for c in args.concurrency}
    print()
    print("| model | concurrency | req/s | p50 (ms) | p99 (ms) | p50 / floor | req/s / floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for concurrency in args.concurrency:
        floor_p50 = median([r.p50_ms for r in floor[concurrency]])
        floor_tput = median([r.throughput for r in floor[concurrency]])
        for model in models:
            results = runs[(model, concurrency)]
            tput = median([r.throughput for r in results])
            p50 = median([r.p50_ms for r in results])
            p99 = median([r.p99_ms for r in results])
            print(
                f"| {model} | {concurrency} | {tput or 0:.0f} | {p50 or 0:.3f} | {p99 or 0:.3f} | "
                f"{(p50 / floor_p50) if p50 and floor_p50 else float('nan'):.2f}x | "
                f"{(tput / floor_tput) if tput and floor_tput else float('nan'):.2f}x |"
            )
    if args.json:
        args.json.write_text(json.dumps(
            {f"{m}@{c}": [r.to_json() for r in rs] for (m, c), rs in runs.items()}, indent=1
        ))
    return 0


if __name__ == "__main__":
    sys.exit(main())
