"""Where a pipeline's time goes: the identity floor, the pipeline's own tensor contract with no
work behind it, and the pipeline, side by side.

`make bench` compares every pipeline with `identity` (one FP32 [16] input copied to its output).
Part of the gap is not kiln's code but Triton's Python backend handling the pipeline's tensors:
a BYTES input, optional inputs, two outputs. This script serves, on one tritonserver from one
temporary repository (`benchmarks.variants.variant_repository`, the built models linked in):

- `identity`: the floor (`benchmarks.floor`);
- `<pipeline>_contract`: a bare Python-based model with exactly the pipeline's inputs, outputs,
  max batch size and fused batcher, generated from the pipeline's spec (`contract_floor`), that
  reads each request's first present input and answers zeros of the declared output shapes: the
  python backend's cost for that contract, with no step behind it;
- the pipeline itself, in its default form.

perf_analyzer over gRPC at concurrency 1 and 16, the three interleaved per repeat, medians; the
pipeline's own request mix (`loadtests` corpus) for the pipeline and its contract model. Not part
of `make bench`; nothing is written but the temporary repository (and `--json`).

    flock /tmp/kiln-bench.lock .venv/bin/python -m benchmarks.contract               # fraud_scorer
    flock /tmp/kiln-bench.lock .venv/bin/python -m benchmarks.contract --pipeline digits_reader
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import floor, perf
from benchmarks.variants import variant_repository
from kiln import tensors
from kiln.spec import EnsembleSpec

CONTRACT_SUFFIX = "_contract"
TRITON_TYPES = {
    "BOOL": "TYPE_BOOL",
    "UINT8": "TYPE_UINT8",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "FP16": "TYPE_FP16",
    "FP32": "TYPE_FP32",
    "FP64": "TYPE_FP64",
    "BYTES": "TYPE_STRING",
}
NUMPY_TYPES = {
    "BOOL": "np.bool_",
    "UINT8": "np.uint8",
    "INT32": "np.int32",
    "INT64": "np.int64",
    "FP16": "np.float16",
    "FP32": "np.float32",
    "FP64": "np.float64",
    "BYTES": "np.object_",
}

_MODEL_PY = '''"""{name}: {pipeline}'s tensor contract with no work behind it (benchmarks.contract)."""

import numpy as np
import triton_python_backend_utils as pb_utils

INPUTS = {inputs!r}
OUTPUTS = [{outputs}]


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = 1
            for name in INPUTS:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    rows = tensor.as_numpy().shape[0]
                    break
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(name, np.zeros((rows, *dims), dtype)) for name, dims, dtype in OUTPUTS
            ]))
        return responses
'''


def contract_name(pipeline: str) -> str:
    return f"{pipeline}{CONTRACT_SUFFIX}"


def contract_config(spec: EnsembleSpec) -> str:
    """config.pbtxt of the contract model of `spec`: its inputs (optional ones too), outputs, max
    batch size and the fused form's batcher and instances.

    Raises:
        ValueError: a tensor has a variable dim (no fixed zeros to answer) or an unknown dtype.
    """
    lines = [
        f'name: "{contract_name(spec.name)}"',
        'backend: "python"',
        f"max_batch_size: {spec.max_batch_size}",
    ]
    for kind, tensors_ in (("input", spec.inputs), ("output", spec.outputs)):
        for t in tensors_:
            if t.dtype not in TRITON_TYPES:
                raise ValueError(
                    f"{spec.name}: {kind} {t.name!r} has dtype {t.dtype!r}, not one of {sorted(TRITON_TYPES)}"
                )
            if kind == "output" and any(d < 0 for d in t.dims):
                raise ValueError(
                    f"{spec.name}: output {t.name!r} has a variable dim {t.dims}: no fixed answer"
                )
            dims = " ".join(f"dims: {d}" for d in t.dims)
            optional = " optional: true" if t.optional else ""
            lines.append(f'{kind} {{ name: "{t.name}" data_type: {TRITON_TYPES[t.dtype]} {dims}{optional} }}')
    groups = spec.fused.instance_groups
    count = sum(g.count for g in groups) or 1
    lines.append(f"instance_group {{ kind: KIND_CPU count: {count} }}")
    batching = spec.fused.dynamic_batching
    preferred = "".join(f" preferred_batch_size: {s}" for s in batching.preferred_batch_sizes)
    lines.append(
        f"dynamic_batching {{{preferred} max_queue_delay_microseconds: {batching.max_queue_delay_us} }}"
    )
    return "\n".join(lines) + "\n"


def contract_model_py(spec: EnsembleSpec) -> str:
    """model.py of the contract model: reads the first present input, answers zeros."""
    outputs = ", ".join(f"({t.name!r}, {tuple(t.dims)!r}, {NUMPY_TYPES[t.dtype]})" for t in spec.outputs)
    return _MODEL_PY.format(
        name=contract_name(spec.name),
        pipeline=spec.name,
        inputs=[t.name for t in spec.inputs],
        outputs=outputs,
    )


def write_contract(spec: EnsembleSpec, repository: Path) -> Path:
    """Adds the contract model of `spec` to `repository`; returns its folder."""
    folder = Path(repository) / contract_name(spec.name)
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(contract_config(spec))
    (folder / "1" / "model.py").write_text(contract_model_py(spec))
    return folder


def measure(pipeline: str, repeats: int, window_ms: int, levels: Sequence[int]) -> dict[str, Any]:
    """The three models at each concurrency, interleaved per repeat; medians per model and level."""
    from kiln.registry import by_name
    from kiln.server import FREE_PORT, TritonServer
    from loadtests import checks, inputs

    spec = checks.served(pipeline)
    if not isinstance(spec, EnsembleSpec):
        raise ValueError(f"{pipeline!r} is not a pipeline")
    with tempfile.TemporaryDirectory(prefix="kiln-contract-") as tmp:
        steps = [by_name(step.model) for step in spec.steps]
        repository = variant_repository(Path(tmp) / "repository", specs=[*steps, spec])
        floor.write(repository)
        write_contract(spec, repository)
        files = {
            floor.IDENTITY: floor.input_file(Path(tmp) / "identity.json"),
            contract_name(pipeline): perf.input_file(
                [item.inputs for item in inputs.build(pipeline, reference=False).items],
                Path(tmp) / "mix.json",
            ),
        }
        files[pipeline] = files[contract_name(pipeline)]
        runs: dict[tuple[str, int], list[perf.PerfResult]] = {}
        with TritonServer(
            repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT
        ) as server:
            for repeat in range(repeats):
                for c in levels:
                    for model, data in files.items():
                        result = perf.run(
                            model, server.grpc_url, data, concurrency=c, measurement_ms=window_ms
                        )
                        runs.setdefault((model, c), []).append(result)
                        print(
                            f"[contract] r{repeat + 1} {model} c={c}: "
                            f"{result.throughput}/s p50 {result.p50_ms} ms",
                            file=sys.stderr,
                            flush=True,
                        )
    table: dict[str, Any] = {}
    for (model, c), results in runs.items():
        tput = [r.throughput for r in results if r.throughput]
        p50 = [r.p50_ms for r in results if r.p50_ms]
        table[f"{model}@{c}"] = {
            "throughput": statistics.median(tput) if tput else None,
            "p50_ms": statistics.median(p50) if p50 else None,
            "repeats": len(tput),
        }
    return table


def report(pipeline: str, table: dict[str, Any], levels: Sequence[int]) -> str:
    """A markdown table: per model and level, throughput and p50, and throughput / the floor's."""
    lines = [
        "| model | concurrency | req/s | p50 ms | req/s / floor |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in levels:
        base = table.get(f"{floor.IDENTITY}@{c}", {}).get("throughput")
        for model in (floor.IDENTITY, contract_name(pipeline), pipeline):
            row = table.get(f"{model}@{c}", {})
            tput, p50 = row.get("throughput"), row.get("p50_ms")
            ratio = f"{tput / base:.2f}x" if tput and base else "-"
            lines.append(
                f"| {model} | {c} | {tput:.0f} | {p50:.3f} | {ratio} |"
                if tput and p50
                else f"| {model} | {c} | - | - | - |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.contract", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--pipeline", default=tensors.FRAUD_SCORER)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window-ms", type=int, default=1500)
    parser.add_argument("--concurrency", default="1,16", help="comma-separated levels")
    parser.add_argument("--json", type=Path, default=None, help="also write the medians here")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    table = measure(args.pipeline, args.repeats, args.window_ms, levels)
    print(report(args.pipeline, table, levels))
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
