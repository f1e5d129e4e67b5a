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
import dataclasses
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import floor, perf
from benchmarks.variants import variant_repository
from kiln import tensors
from kiln.spec import EnsembleSpec
from loadtests.checks import NUMPY_TYPES

CONTRACT_SUFFIX = "_contract"
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
    """config.pbtxt of the contract model of `spec`: the fused model's config as `kiln generate`
    writes it (inputs with their optional flags, outputs, max batch size, the fused batcher and
    instances) under the contract's name, on the bare python backend, without the steps.

    Raises:
        ValueError: an output has a variable dim (no fixed zeros to answer).
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    from kiln.repository import config_dict

    for t in spec.outputs:
        if any(d < 0 for d in t.dims):
            raise ValueError(f"{spec.name}: output {t.name!r} has a variable dim {t.dims}: no fixed answer")
    config = config_dict(dataclasses.replace(spec, form="fused"))
    config.update(name=contract_name(spec.name), backend="python")
    config.pop("parameters", None)
    return text_format.MessageToString(json_format.ParseDict(config, model_config_pb2.ModelConfig()))


def contract_model_py(spec: EnsembleSpec) -> str:
    """model.py of the contract model: reads the first present input, answers zeros."""
    outputs = ", ".join(
        f"({t.name!r}, {tuple(t.dims)!r}, np.dtype({np.dtype(NUMPY_TYPES[t.dtype]).name!r}))"
        for t in spec.outputs
    )
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
