"""Calibrates the cluster model (`benchmarks.cluster_sim`) on this machine: one replica's service
times and capacity, measured on real tritonservers with perf_analyzer, stored as JSON so the
simulation runs later without measuring again.

    flock /tmp/kiln-bench.lock .venv/bin/python -m benchmarks.cluster_calibrate   # ~1.5 minutes

What it measures, on `fraud_scorer` (`make bench`'s capacity model, served as the committed
repository builds it: fused, one instance, a dynamic batcher):

1. The load time: `kiln.server.TritonServer.start()` with only that model, process start to ready
   (the simulation's default pod start delay, before any image pull).
2. A concurrency sweep (closed loop, gRPC): at concurrency 1 every request's client latency
   (perf_analyzer's `--profile-export-file`): the empirical service-time distribution; at every
   level the throughput (the measured saturation capacity) and, from Triton's statistics API
   before and after, the executions of each batch size and their mean time (compute input + infer
   + output): the line time(b) = fixed + per_request * b the model's batcher costs batches by.
3. Open loop at a low rate (`OPEN_LOOP_SHARE` of the measured throughput, Poisson), every
   request's client latency: what an isolated request waits outside the instance when the server
   idles between requests (wake-ups a closed loop never shows): the model's per-request overhead
   by default (`cluster_sim --service open`).
4. Held out, for validation only: open-loop Poisson rates on the same server (`--request-rate-range
   R --async --request-distribution poisson`), p50 and p99; the simulation never fits on them
   (`python -m benchmarks.cluster_sim validate` compares).
5. Two tritonservers on this machine, each driven by its own perf_analyzer at the same
   concurrency at once, against one alone. Two replicas on one 2-core host are NOT two nodes: they
   share the same two cores (and the generators share them too), so the aggregate says how much
   CPU contention costs here (a contention factor); it is reported, and the cluster model, which
   puts each replica on its own node, does not use it.

perf_analyzer runs on the same two cores as the server: every figure here includes that
contention, which a replica on its own node with its clients elsewhere would not pay. The
split of a request's time: overhead = mean client latency - mean server execution at concurrency 1
(gRPC, Triton's frontend and queue handoff); the rest of each sampled latency is the instance's
execution. The open-loop run's latencies less that hot execution are the time outside the
instance `cluster_sim --service open` draws per request (`--service closed`: the constant).
Repeated runs on a shared machine differ by up to 3x in the tail (docs/capacity.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import perf
from benchmarks.cluster_sim import CALIBRATION_KIND
from kiln import paths, tensors

MODEL = tensors.FRAUD_SCORER
CONCURRENCIES = (1, 2, 4, 8)
VALIDATION_SHARES = (0.3, 0.6)
"""Held-out rates as shares of the measured saturation throughput."""
OPEN_LOOP_SHARE = 0.1
"""The open-loop service-time run's rate, as a share of the measured saturation throughput: low
enough that requests rarely queue behind each other (and not a held-out rate)."""
PAIR_CONCURRENCY = 4
"""Each of the two servers' perf_analyzer concurrency in the two-server run."""
WINDOW_MS = 2000
STABILITY = 10_000.0
"""perf_analyzer's stability threshold (percent): so high that it always reports its last three
windows; with 100 % it gave up at concurrency 8 on this shared machine ("Failed to obtain stable
measurement") and left no figure. As `make bench`'s capacity probes do."""
RATE_WINDOW_MS = 3000
TRIALS = 3
SAMPLES_KEPT = 4000
"""Concurrency-1 latencies kept in the JSON (a seeded random subset when more were measured)."""
MIN_EXECUTION_SHARE = 0.25
"""A sampled latency less the overhead is kept at no less than this share of the mean execution."""
STATS_TIMEOUT_S = 10.0


def log(text: str) -> None:
    """Progress, to stdout."""
    print(f"[calibrate {time.strftime('%H:%M:%S')}] {text}", flush=True)


def perf_command(
    url: str, input_file: Path, *args: str, window_ms: int = WINDOW_MS, stability: float = STABILITY
) -> list[str]:
    """perf_analyzer's command line for `MODEL` over gRPC (benchmarks.perf's binary), plus `args`."""
    return [
        str(perf.binary()), "-m", MODEL, "-u", url, "-i", "grpc", "--input-data", str(input_file),
        "-p", str(window_ms), "--max-trials", str(TRIALS), "-s", str(stability), *args,
    ]  # fmt: skip


def run_perf(command: list[str], mode: str, level: float, timeout_s: float = 120.0) -> perf.PerfResult:
    """Runs one perf_analyzer command and parses it with `benchmarks.perf.parse_output`
    (`benchmarks.perf.run` takes no extra arguments: the profile export and the Poisson
    distribution need them)."""
    result = perf.PerfResult(MODEL, mode, level, command=command)
    start = time.monotonic()
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=timeout_s, env=perf.environment()
    )
    result.wall_s = time.monotonic() - start
    perf.parse_output(MODEL, completed.stdout + completed.stderr, result)
    if result.throughput is None:
        lines = [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()]
        result.error = f"no measurement (exit status {completed.returncode}): " + " | ".join(lines[-3:])
    return result


def model_stats(http_url: str) -> dict[int, dict[str, float]]:
    """Triton's statistics of `MODEL`: batch size -> executions and their total time (ns)."""
    with urllib.request.urlopen(f"http://{http_url}/v2/models/{MODEL}/stats", timeout=STATS_TIMEOUT_S) as r:
        stats = json.load(r)["model_stats"][0]
    return {
        int(b["batch_size"]): {
            "count": float(b["compute_infer"]["count"]),
            "ns": float(b["compute_input"]["ns"])
            + float(b["compute_infer"]["ns"])
            + float(b["compute_output"]["ns"]),
        }
        for b in stats.get("batch_stats", [])
    }


def stats_delta(
    before: dict[int, dict[str, float]], after: dict[int, dict[str, float]]
) -> dict[int, dict[str, float]]:
    """Executions of each batch size between two snapshots."""
    delta = {}
    for size, now in after.items():
        was = before.get(size, {"count": 0.0, "ns": 0.0})
        count = now["count"] - was["count"]
        if count > 0:
            delta[size] = {"count": count, "ns": now["ns"] - was["ns"]}
    return delta


def fit_batches(executions: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Least squares (weighted by sqrt(count)) of mean execution time on batch size. None figures
    when fewer than two batch sizes ran (then the model does not batch)."""
    sizes = sorted(executions)
    means = [executions[b]["ns"] / executions[b]["count"] / 1e3 for b in sizes]
    table = [
        {"batch": b, "executions": int(executions[b]["count"]), "mean_us": round(m, 1)}
        for b, m in zip(sizes, means, strict=True)
    ]
    if len(sizes) < 2:
        return {"fixed_us": None, "per_request_us": None, "table": table}
    weights = np.sqrt([executions[b]["count"] for b in sizes])
    per_request, fixed = np.polyfit(sizes, means, 1, w=weights)
    if per_request < 0 or fixed + per_request <= 0:  # a batch costing less than one: no batching cost shape
        return {
            "fixed_us": None,
            "per_request_us": None,
            "table": table,
            "rejected": [float(fixed), float(per_request)],
        }
    return {"fixed_us": float(fixed), "per_request_us": float(per_request), "table": table}


def latencies_us(profile: Path) -> np.ndarray:
    """Each request's client latency (first response - send) from a perf_analyzer profile export."""
    data = json.loads(profile.read_text())
    requests = data["experiments"][-1]["requests"]
    return np.array(
        [(r["response_timestamps"][0] - r["timestamp"]) / 1e3 for r in requests if r["response_timestamps"]]
    )


def figures(result: perf.PerfResult) -> dict[str, Any]:
    """What the calibration keeps of one perf_analyzer run."""
    server = result.server
    return {
        "mode": result.mode,
        "level": result.level,
        "throughput": result.throughput,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "server_queue_us": server.queue_us if server else None,
        "server_execution_us": (
            (server.compute_input_us or 0) + (server.compute_infer_us or 0) + (server.compute_output_us or 0)
            if server
            else None
        ),
        "average_batch": server.average_batch if server else None,
        "send_rate": result.send_rate,
        "delayed_share": result.delayed_share,
        "command": " ".join(result.command),
        "error": result.error,
    }


def start_server(log_file: Path) -> tuple[Any, float]:
    """A tritonserver on free ports serving only `MODEL` from the committed repository; its
    start-to-ready time."""
    from kiln.server import FREE_PORT, TritonServer

    server = TritonServer(
        http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT,
        model_control_mode="explicit", load_models=[MODEL], log_file=log_file,
    )  # fmt: skip
    started = time.monotonic()
    server.start()
    return server, time.monotonic() - started


def calibrate(work: Path, seed: int = 0) -> dict[str, Any]:
    """Measures everything the docstring lists; returns the calibration (without machine/command)."""
    from loadtests import inputs

    corpus = inputs.build(MODEL, reference=False)
    input_file = perf.input_file([item.inputs for item in corpus.items], work / f"{MODEL}.json")
    log(f"request mix: {corpus.summary()}")
    first, load_s = start_server(work / "tritonserver-1.log")
    servers = [first]
    out: dict[str, Any] = {"model": MODEL, "load_time_s": round(load_s, 2), "notes": []}
    try:
        log(f"server 1 ready in {load_s:.2f} s ({first.grpc_url}); warming up")
        run_perf(
            perf_command(first.grpc_url, input_file, "--concurrency-range", "1", window_ms=1000),
            "concurrency",
            1,
        )
        out.update(_model_config(first))
        sweep, executions, samples = _concurrency_sweep(first, input_file, work)
        measured_mu = _closed_loop_fit(out, sweep, executions, samples, seed)
        _open_loop_service(out, first, input_file, work, measured_mu, seed)
        out["validation"] = _held_out_rates(first, input_file, measured_mu)
        second, load2 = start_server(work / "tritonserver-2.log")
        servers.append(second)
        log(f"server 2 ready in {load2:.2f} s; both driven at concurrency {PAIR_CONCURRENCY} each")
        out["two_servers"] = two_servers(servers, input_file, sweep)
    finally:
        for server in servers:
            server.stop()
    return out


def _model_config(server: Any) -> dict[str, Any]:
    """The served model's instances and batcher settings, from its configuration on `server`."""
    config = server.model_config(MODEL)
    instances = sum(int(g.get("count", 1)) for g in config.get("instance_group", [])) or 1
    batcher = config.get("dynamic_batching")
    return {
        "instances": instances,
        "max_batch_size": int(config.get("max_batch_size", 0)),
        "preferred_batch_sizes": [int(x) for x in (batcher or {}).get("preferred_batch_size", [])],
        "dynamic_batching": batcher is not None,
    }


def _concurrency_sweep(
    server: Any, input_file: Path, work: Path
) -> tuple[list[dict[str, Any]], dict[int, dict[str, float]], np.ndarray | None]:
    """The closed-loop sweep over `CONCURRENCIES`: each level's figures, the executions of each batch
    size summed over all levels, and the concurrency-1 client latencies (None without a figure)."""
    sweep: list[dict[str, Any]] = []
    executions: dict[int, dict[str, float]] = {}
    samples = None
    for c in CONCURRENCIES:
        before = model_stats(server.http_url)
        extra = ["--profile-export-file", str(work / f"profile-c{c}.json")] if c == 1 else []
        result = run_perf(
            perf_command(server.grpc_url, input_file, "--concurrency-range", str(c), *extra),
            "concurrency",
            c,
        )
        delta = stats_delta(before, model_stats(server.http_url))
        for size, d in delta.items():
            acc = executions.setdefault(size, {"count": 0.0, "ns": 0.0})
            acc["count"] += d["count"]
            acc["ns"] += d["ns"]
        entry = figures(result) | {"batches": {str(k): int(v["count"]) for k, v in sorted(delta.items())}}
        sweep.append(entry)
        log(
            f"concurrency {c}: {result.throughput} req/s, p50 {result.p50_ms} ms, "
            f"p99 {result.p99_ms} ms, server execution {entry['server_execution_us']} us, "
            f"average batch {entry['average_batch']}"
        )
        if c == 1 and result.error is None:
            samples = latencies_us(work / "profile-c1.json")
    return sweep, executions, samples


def _closed_loop_fit(
    out: dict[str, Any],
    sweep: list[dict[str, Any]],
    executions: dict[int, dict[str, float]],
    samples: np.ndarray | None,
    seed: int,
) -> float:
    """Adds the sweep, the closed-loop service distribution and the batch fit to `out`; returns the
    measured saturation capacity (the sweep's highest throughput)."""
    if samples is None or sweep[0]["server_execution_us"] is None:
        raise RuntimeError(f"the concurrency-1 run has no figure: {sweep[0]['error']}")
    service = service_samples(
        samples,
        float(sweep[0]["server_execution_us"]),
        "client latency at concurrency 1, closed loop (perf_analyzer --profile-export-file), less "
        "the overhead",
        seed,
    )
    measured_mu = max((e["throughput"] or 0.0) for e in sweep)
    fit = fit_batches(executions)
    out.update(
        concurrency=sweep,
        measured_capacity=measured_mu,
        service=service,
        batching={
            "max_batch": out["max_batch_size"] or 1,
            "preferred": out["preferred_batch_sizes"],
            **fit,
            "source": "Triton's statistics API (batch_stats) before and after each concurrency level, summed",
        },
    )
    log(
        f"closed loop: overhead {service['overhead_us']:.0f} us, execution mean "
        f"{service['server_execution_mean_us']:.0f} us; batch fit {fit}"
    )
    return measured_mu


def _open_loop_service(
    out: dict[str, Any], server: Any, input_file: Path, work: Path, measured_mu: float, seed: int
) -> None:
    """Adds the open-loop service distribution at `OPEN_LOOP_SHARE` of `measured_mu` to `out` (or a
    note when that run has no figure)."""
    rate = round(measured_mu * OPEN_LOOP_SHARE, -1)
    profile = work / "profile-open.json"
    command = perf_command(
        server.grpc_url, input_file, "--request-rate-range", f"{rate:g}", "--async",
        "--request-distribution", "poisson", "--profile-export-file", str(profile),
        window_ms=RATE_WINDOW_MS,
    )  # fmt: skip
    result = run_perf(command, "rate", rate)
    entry = figures(result)
    if result.error is None and entry["server_execution_us"] is not None:
        out["service_open"] = service_samples(
            latencies_us(profile),
            float(entry["server_execution_us"]),
            f"client latency of Poisson arrivals at {rate:g}/s ({OPEN_LOOP_SHARE:.0%} of the measured "
            "capacity, where requests rarely meet), less the overhead",
            seed,
        ) | {"run": entry}
        log(
            f"open loop at {rate:g}/s: overhead {out['service_open']['overhead_us']:.0f} us, execution "
            f"mean {entry['server_execution_us']:.0f} us, p50 {result.p50_ms} ms, p99 {result.p99_ms} ms"
        )
    else:
        out["notes"].append(f"the open-loop service run at {rate:g}/s has no figure: {result.error}")


def _held_out_rates(server: Any, input_file: Path, measured_mu: float) -> list[dict[str, Any]]:
    """The held-out open-loop Poisson runs at `VALIDATION_SHARES` of `measured_mu`, for validation."""
    validation = []
    for share in VALIDATION_SHARES:
        rate = round(measured_mu * share, -1)
        command = perf_command(
            server.grpc_url, input_file, "--request-rate-range", f"{rate:g}", "--async",
            "--request-distribution", "poisson", window_ms=RATE_WINDOW_MS,
        )  # fmt: skip
        result = run_perf(command, "rate", rate)
        validation.append(figures(result) | {"rate": rate, "share_of_measured_capacity": share})
        log(f"held-out rate {rate:g}/s: p50 {result.p50_ms} ms, p99 {result.p99_ms} ms, "
            f"sent late {result.delayed_share}")  # fmt: skip
    return validation


def service_samples(samples: np.ndarray, execution_us: float, source: str, seed: int) -> dict[str, Any]:
    """A service-time distribution from client latencies: overhead = mean latency - the server's
    mean execution (a constant), each sample less it (kept at no less than
    `MIN_EXECUTION_SHARE` of the execution), at most `SAMPLES_KEPT` of them."""
    mean_latency = float(np.mean(samples))
    overhead = max(mean_latency - execution_us, 0.0)
    service = np.maximum(samples - overhead, MIN_EXECUTION_SHARE * execution_us)
    rng = np.random.default_rng(seed)
    kept = rng.choice(service, SAMPLES_KEPT, replace=False) if len(service) > SAMPLES_KEPT else service
    return {
        "source": source,
        "requests_measured": int(len(samples)),
        "client_latency_us": {str(q): float(np.percentile(samples, q)) for q in (50, 90, 99, 99.9)},
        "client_mean_us": mean_latency,
        "server_execution_mean_us": execution_us,
        "overhead_us": overhead,
        "samples_us": [round(float(x), 1) for x in kept],
    }


def two_servers(servers: Sequence[Any], input_file: Path, sweep: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Both servers at `PAIR_CONCURRENCY` at once, each with its own perf_analyzer; the aggregate
    against one server alone at that concurrency (from the sweep)."""
    commands = [
        perf_command(s.grpc_url, input_file, "--concurrency-range", str(PAIR_CONCURRENCY)) for s in servers
    ]
    processes = [
        subprocess.Popen(
            c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=perf.environment()
        )
        for c in commands
    ]
    results = []
    for command, process in zip(commands, processes, strict=True):
        text, _ = process.communicate(timeout=120)
        result = perf.PerfResult(MODEL, "concurrency", PAIR_CONCURRENCY, command=command)
        perf.parse_output(MODEL, text, result)
        results.append(figures(result))
    alone = next((e["throughput"] for e in sweep if e["level"] == PAIR_CONCURRENCY), None)
    total = sum(r["throughput"] or 0.0 for r in results)
    factor = total / (2 * alone) if alone else None
    log(f"two servers: {total:.0f} req/s together against {alone} alone: contention factor {factor}")
    return {
        "per_server": results,
        "aggregate_throughput": total,
        "one_server_throughput": alone,
        "contention_factor": factor,
        "meaning": (
            "aggregate / (2 x one server alone), both on this machine's same cores with their generators: "
            "1.0 would be two independent nodes, 0.5 no gain at all. Not used by the cluster model, "
            "which places one replica per node."
        ),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cluster_calibrate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, help="results folder (default results/)")
    parser.add_argument("--seed", type=int, default=0, help="which concurrency-1 samples are kept")
    args = parser.parse_args(argv)
    from loadtests import environment

    stamp = environment.utc_stamp()
    folder = args.out or paths.ROOT / "results"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cluster-calibration-{stamp}.json"
    machine = environment.machine_info()
    log(environment.describe_machine(machine))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kiln-cluster-calibrate-") as work:
        measured = calibrate(Path(work), seed=args.seed)
    data = {
        "kind": CALIBRATION_KIND,
        "date_utc": stamp,
        "commit": environment.commit(),
        "command": "python -m benchmarks.cluster_calibrate "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine,
        "load_average_end": list(os.getloadavg()),
        **measured,
        "wall_s": round(time.monotonic() - started, 1),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"calibration written: {path} ({data['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
