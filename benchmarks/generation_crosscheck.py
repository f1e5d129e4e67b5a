"""The generation load generator against an independent tool: NVIDIA's aiperf, same workload, same server.

    python -m benchmarks.generation_crosscheck --aiperf .venv-aiperf/bin/aiperf            # starts a server
    python -m benchmarks.generation_crosscheck --aiperf ... --http-url H:8000 --grpc-url H:8001

aiperf 0.13.0 does not install beside kiln (it would downgrade pillow, psutil, pyzmq and rich in
kiln's environment and pulls about 80 packages: transformers, datasets, pandas, kubernetes...), so
it lives in its own virtual environment:

    python3.11 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0

What is compared (one point: `loadtests.generation`'s seeded Poisson workload at `--rate`):

1. aiperf, HTTP: Triton's `/v2/models/tinylm_generate/generate_stream` (server-sent events)
   through aiperf's `template` endpoint (a Jinja payload `{"text_input", "max_tokens",
   "temperature": 0, "stream": true}`, `response_field` `text_output`), the workload's own prompts
   and `max_tokens` replayed at its own arrival times (`--custom-dataset-type single_turn` with
   `timestamp`s, `--fixed-schedule`), tinylm's tokenizer.json as aiperf's tokenizer.
2. kiln's generator over the same HTTP endpoint (`HttpSse`), the same requests and times.
3. kiln's generator over gRPC streaming (`GrpcStream`), the same requests and times.

TTFT and E2E are compared per request as each tool defines them (aiperf: from its send; kiln: from
the scheduled arrival, the same at a load the client keeps up with), and the delivery gaps
(aiperf's inter-chunk latency, kiln's ITL). aiperf counts output tokens by re-tokenizing the text,
kiln uses the server's count, so per-token figures (aiperf's TPOT-like "inter token latency",
tokens/s) differ by the ratio of the two counts, which is reported. Percentiles of both tools are
recomputed here the same way (numpy, method "higher") from per-request records
(`profile_export.jsonl` for aiperf).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from benchmarks import generation
from kiln import paths, tensors
from loadtests import environment
from loadtests import generation as load

AIPERF_TIMEOUT_S = 600
TEMPLATE = (
    f'{{"{tensors.TEXT_INPUT}": {{{{ text|tojson }}}}, "{tensors.MAX_TOKENS}": {{{{ max_tokens }}}}, '
    f'"{tensors.TEMPERATURE}": 0.0, "{tensors.STREAM}": true}}'
)
"""aiperf's payload: the request's prompt and max_tokens, greedy, streamed (a file: aiperf's
`--extra-inputs` splits its values at commas)."""


def aiperf_inputs(requests: list[load.PlannedRequest], folder: Path, tokenizer_json: Path) -> dict[str, Path]:
    """aiperf's input file (one `single_turn` line per request: text, output_length, timestamp in
    ms), the payload template and a tokenizer folder (tokenizer.json, a fast-tokenizer config)."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = folder / "requests.jsonl"
    dataset.write_text(
        "".join(
            json.dumps({"text": r.prompt, "output_length": r.max_tokens, "timestamp": r.arrival * 1e3}) + "\n"
            for r in requests
        )
    )
    template = folder / "kiln_generate.jinja"
    template.write_text(TEMPLATE)
    tokenizer = folder / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    shutil.copyfile(tokenizer_json, tokenizer / "tokenizer.json")
    (tokenizer / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})
    )
    return {"dataset": dataset, "template": template, "tokenizer": tokenizer}


def aiperf_command(aiperf: str, http_url: str, model: str, files: dict[str, Path], out: Path) -> list[str]:
    return [
        aiperf, "profile",
        "--model", model,
        "--url", f"http://{http_url}",
        "--endpoint", f"/v2/models/{model}/generate_stream",
        "--endpoint-type", "template",
        "--streaming",
        "--extra-inputs", f"payload_template:{files['template']}",
        "--extra-inputs", f"response_field:{tensors.TEXT_OUTPUT}",
        "--tokenizer", str(files["tokenizer"]),
        "--input-file", str(files["dataset"]),
        "--custom-dataset-type", "single_turn",
        "--fixed-schedule",
        "--output-artifact-dir", str(out),
        "--ui-type", "none",
        "--no-auto-plot",
    ]  # fmt: skip


def aiperf_figures(out: Path) -> dict[str, Any]:
    """TTFT, E2E and inter-chunk percentiles (ms) and the counts, from aiperf's per-request records
    (`profile_export.jsonl`) and its summary (`profile_export_aiperf.json`)."""
    ttft, e2e, chunks, tokens, chunk_counts, errors = [], [], [], [], [], 0
    for line in (out / "profile_export.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("metadata", {}).get("benchmark_phase") not in (None, "profiling"):
            continue
        metrics = record.get("metrics") or {}
        if record.get("error") or "request_latency" not in metrics:
            errors += 1
            continue
        ttft.append(metrics["time_to_first_token"]["value"])
        e2e.append(metrics["request_latency"]["value"])
        chunks += list(metrics.get("inter_chunk_latency", {}).get("value") or [])
        tokens.append(metrics.get("output_token_count", {}).get("value"))
        chunk_counts.append(metrics.get("http_req_chunks_received", {}).get("value"))
    summary = json.loads((out / "profile_export_aiperf.json").read_text())
    return {
        "requests": len(ttft) + errors,
        "failed": errors,
        "ttft_ms": load.percentiles(ttft),
        "e2e_ms": load.percentiles(e2e),
        "itl_ms": load.percentiles(chunks),
        "request_throughput": (summary.get("request_throughput") or {}).get("avg"),
        "output_tokens": sum(t for t in tokens if t),
        "duration_s": (summary.get("benchmark_duration") or {}).get("avg"),
    }


AIPERF, KILN_HTTP, KILN_GRPC = "aiperf (HTTP SSE)", "kiln generator (HTTP SSE)", "kiln generator (gRPC)"


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median over repeats of every figure (percentile dicts key by key)."""
    out: dict[str, Any] = {}
    for key, first in runs[0].items():
        if isinstance(first, dict):
            out[key] = {
                k: median(v) if (v := [r[key][k] for r in runs if r[key][k] is not None]) else None
                for k in first
            }
        else:
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = median(values) if values else None
    return out


def kiln_figures(target: load.Target, requests: list[load.PlannedRequest]) -> dict[str, Any]:
    records = asyncio.run(load.run_open(target, requests))
    summary = load.summarize(records)
    return {
        key: summary[key]
        for key in (
            "requests",
            "failed",
            "ttft_ms",
            "e2e_ms",
            "itl_ms",
            "request_throughput",
            "output_tokens",
            "duration_s",
        )
    }


def table(columns: dict[str, dict[str, Any]]) -> str:
    """The figures side by side, each tool's against aiperf's."""
    names = list(columns)
    lines = [
        "| figure | " + " | ".join(names) + " | " + " | ".join(f"{n} / {names[0]}" for n in names[1:]) + " |",
        "| --- |" + " ---: |" * (2 * len(names) - 1),
    ]
    rows: list[tuple[str, Callable[[dict[str, Any]], Any]]] = [
        ("requests (failed)", lambda c: f"{c['requests']} ({c['failed']})"),
        ("duration s", lambda c: c["duration_s"]),
        ("request throughput /s", lambda c: c["request_throughput"]),
        ("output tokens (the tool's count)", lambda c: c["output_tokens"]),
    ]
    for figure in ("ttft_ms", "e2e_ms", "itl_ms"):
        for q in ("p50", "p95", "p99"):
            rows.append((f"{figure[:-3].upper()} {q} ms", lambda c, f=figure, q=q: c[f][q]))
    for label, get in rows:
        values = [get(columns[n]) for n in names]
        ratios = [
            f"{v / values[0]:.2f}"
            if isinstance(v, float | int) and isinstance(values[0], float | int) and values[0]
            else "-"
            for v in values[1:]
        ]
        shown = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in values]
        lines.append(f"| {label} | " + " | ".join(shown) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generation_crosscheck", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--aiperf", default="", help="aiperf's executable (default: .venv-aiperf/bin/aiperf, then PATH)"
    )
    parser.add_argument(
        "--http-url", default="", help="a running server's HTTP host:port (default: start one)"
    )
    parser.add_argument("--grpc-url", default="", help="its gRPC host:port")
    parser.add_argument(
        "--artifacts", type=Path, default=None, help="the model folder (default: the built tinylm)"
    )
    parser.add_argument("--rate", type=float, default=4.0, help="Poisson arrivals per second")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (medians are quoted)")
    parser.add_argument(
        "--out", type=Path, default=None, help="default results/crosscheck-generation-<UTC>-<commit>"
    )
    args = parser.parse_args(argv)
    if bool(args.http_url) != bool(args.grpc_url):
        parser.error("give both --http-url and --grpc-url, or neither")
    return args


def find_aiperf(given: str) -> str:
    for candidate in (
        given,
        str(paths.ROOT / ".venv-aiperf" / "bin" / "aiperf"),
        shutil.which("aiperf") or "",
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit(
        "aiperf not found: python3.11 -m venv .venv-aiperf && .venv-aiperf/bin/pip install aiperf==0.13.0 "
        "(or pass --aiperf PATH)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    aiperf = find_aiperf(args.aiperf)
    commit = environment.commit()
    out = args.out or paths.ROOT / "results" / f"crosscheck-generation-{environment.utc_stamp()}-{commit}"
    out.mkdir(parents=True, exist_ok=True)
    artifacts = args.artifacts or generation.default_artifacts()

    def log(text: str) -> None:
        print(f"[crosscheck {time.strftime('%H:%M:%S')}] {text}", flush=True)

    workload = load.Workload(rate=args.rate, requests=args.requests, seed=args.seed)
    requests = generation.fit_context(load.plan(workload), artifacts)
    files = aiperf_inputs(requests, out / "aiperf_inputs", artifacts / "tokenizer.json")
    stack: list[Callable[[], None]] = []
    try:
        http_url, grpc_url = args.http_url, args.grpc_url
        if not http_url:
            server = generation.start_server(artifacts, out, log, stack)
            http_url, grpc_url = server.http_url, server.grpc_url
        runs, command = _interleaved_runs(aiperf, http_url, grpc_url, requests, files, out, args.repeats, log)
        columns = {name: median_figures(found) for name, found in runs.items()}
    finally:
        for stop in reversed(stack):
            stop()
    text = _report_markdown(commit, workload, len(requests), artifacts, args.repeats, command, columns)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(
        json.dumps({"workload": str(workload), "columns": columns, "runs": runs}, indent=2) + "\n"
    )
    print(text, flush=True)
    log(f"results in {out}")
    return 0


def _interleaved_runs(
    aiperf: str,
    http_url: str,
    grpc_url: str,
    requests: list[load.PlannedRequest],
    files: dict[str, Path],
    out: Path,
    repeats: int,
    log: Callable[[str], None],
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """After a warm-up, `repeats` rounds of aiperf, kiln over HTTP SSE and kiln over gRPC on the same
    requests; each tool's figures per round, and the last aiperf command line."""
    runs: dict[str, list[dict[str, Any]]] = {AIPERF: [], KILN_HTTP: [], KILN_GRPC: []}
    command: list[str] = []
    model = tensors.TEXT_GENERATOR
    asyncio.run(load.run_open(load.GrpcStream(grpc_url, model), requests[:4]))  # warm-up
    for repeat in range(repeats):
        folder = out / f"aiperf-{repeat + 1}"
        command = aiperf_command(aiperf, http_url, model, files, folder)
        log(f"[{repeat + 1}/{repeats}] aiperf: " + " ".join(command))
        started = time.monotonic()
        completed = subprocess.run(command, capture_output=True, text=True, timeout=AIPERF_TIMEOUT_S)
        (folder.parent / f"aiperf-{repeat + 1}.log").write_text(completed.stdout + completed.stderr)
        if completed.returncode != 0:
            raise RuntimeError(f"aiperf exited with {completed.returncode}; see {folder}.log")
        log(f"[{repeat + 1}/{repeats}] aiperf done in {time.monotonic() - started:.0f} s")
        runs[AIPERF].append(aiperf_figures(folder))
        log(f"[{repeat + 1}/{repeats}] kiln generator, HTTP SSE")
        runs[KILN_HTTP].append(kiln_figures(load.HttpSse(http_url, model), requests))
        log(f"[{repeat + 1}/{repeats}] kiln generator, gRPC streaming")
        runs[KILN_GRPC].append(kiln_figures(load.GrpcStream(grpc_url, model), requests))
    return runs, command


def _report_markdown(
    commit: str,
    workload: load.Workload,
    count: int,
    artifacts: Path,
    repeats: int,
    command: list[str],
    columns: dict[str, dict[str, Any]],
) -> str:
    """results.md: the machine, the workload, the aiperf command and the comparison table."""
    machine = environment.machine_info()
    return "\n".join(
        [
            f"# Generation cross-check: aiperf against kiln's generator, {environment.utc_stamp()}, "
            f"commit {commit}\n",
            f"- Machine: {environment.describe_machine(machine)}",
            f"- Workload: {workload} ({count} requests, the same prompts, max_tokens and arrival "
            "times for all three)",
            f"- Model: {artifacts}",
            f"- Repeats: {repeats}, interleaved (aiperf, kiln over HTTP, kiln over gRPC, then again); "
            "each figure is the median of the repeats",
            f"- aiperf: `{' '.join(command)}`",
            "",
            table(columns),
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
