"""Runs the load-test suites headless and reports every SLO gate: `make loadtest`.

    python -m loadtests.run                                  # every suite, every shape, full SLOs,
                                                             # against an embedded server it starts
    python -m loadtests.run --pipeline fraud_scorer --shape step
    python -m loadtests.run --http-url gpu-host:8000 --grpc-url gpu-host:8001   # a running server
    python -m loadtests.run --pipeline image_classifier_int8 --profile smoke

For each suite and shape it runs `python -m locust -f loadtests/locustfile.py --model <pipeline>` with the
HTTP and the gRPC user (or one, `--transport`), writes locust's CSV files and HTML report and the
SLO report (`<suite>-<shape>_slo.json`) into the output folder, prints each gate's verdict, and
finally a summary table (also `summary.md`, `summary.json`). Exit status: 0 when every gate of
every run was met, 1 otherwise, 2 when a run could not start.

The request mixes are built once (`loadtests.inputs`, with the in-process reference's answers)
and handed to every locust process through `KILN_LOADTEST_INPUTS`. Without `--http-url`, the
embedded tritonserver (`kiln.server.TritonServer`) is started on free ports, loading only the
pipelines under test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kiln import paths
from loadtests import environment, generation, inputs, shapes, slo

LOCUST_GRACE_S = 120
"""Extra seconds a locust run may take beyond its shape's length before it is stopped."""
STOP_TIMEOUT_S = 10
"""locust's --stop-timeout: in-flight requests finish when a run ends."""
TRANSPORTS = {"http": ("HttpUser",), "grpc": ("GrpcUser",), "both": ("HttpUser", "GrpcUser")}


USER_PREFIX = "Pipeline"
"""loadtests/locustfile.py's user classes: PipelineHttpUser, PipelineGrpcUser."""


def user_classes(transport: str) -> list[str]:
    """The locustfile's user classes for `transport` (http, grpc, both)."""
    return [f"{USER_PREFIX}{suffix}" for suffix in TRANSPORTS[transport]]


def locust_command(
    model: str,
    shape: str,
    args: argparse.Namespace,
    http_url: str,
    grpc_url: str,
    prefix: Path,
) -> list[str]:
    """The locust command line of one run."""
    slo.suite_of(model)  # a model no suite covers fails here, before locust starts
    command = [
        sys.executable, "-m", "locust",
        "-f", str(paths.ROOT / "loadtests" / "locustfile.py"),
        "--headless", "--only-summary",
        "--host", f"http://{http_url}",
        "--grpc-url", grpc_url,
        "--model", model,
        "--load-shape", shape,
        "--slo-profile", args.profile,
        "--csv", str(prefix),
        "--html", f"{prefix}.html",
        "--stop-timeout", str(STOP_TIMEOUT_S),
        "--loglevel", "WARNING",
    ]  # fmt: skip
    for gate in args.gate:
        command += ["--gate", gate]
    if args.shape_users:
        command += ["--shape-users", args.shape_users]
    if args.shape_seconds:
        command += ["--shape-seconds", args.shape_seconds]
    return command + user_classes(args.transport)


def shape_seconds(model: str, shape: str, args: argparse.Namespace) -> float:
    """How long a run of `shape` lasts."""
    planned = shapes.phases(
        shape,
        slo.load(model, args.profile),
        shapes.parse_list(args.shape_users, int),
        shapes.parse_list(args.shape_seconds, float),
    )
    return sum(p.seconds for p in planned)


def run_one(
    model: str, shape: str, args: argparse.Namespace, http_url: str, grpc_url: str, out: Path
) -> dict[str, Any]:
    """One locust run; returns its SLO report (or a description of why it has none)."""
    prefix = out / f"{model}-{shape}"
    command = locust_command(model, shape, args, http_url, grpc_url, prefix)
    timeout = shape_seconds(model, shape, args) + LOCUST_GRACE_S
    print(f"\n== {model}, {shape} shape ({args.profile} profile): {' '.join(command)}", flush=True)
    started = time.monotonic()
    log_path = Path(f"{prefix}.log")
    env = {**os.environ, inputs.INPUTS_ENV: str(out / "inputs"), "PYTHONPATH": _pythonpath()}
    try:
        completed = subprocess.run(
            command, cwd=paths.ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        output, returncode = completed.stdout + completed.stderr, completed.returncode
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"").decode() + (error.stderr or b"").decode()
        returncode = None
    log_path.write_text(output)
    report_path = Path(f"{prefix}_slo.json")
    report: dict[str, Any]
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        block = output[output.find("SLO gates for") :] if "SLO gates for" in output else ""
        print(block.split("\nType ")[0].rstrip(), flush=True)
    else:
        print(output[-3000:], flush=True)
        report = {"model": model, "shape": shape, "passed": False, "verdicts": [], "error": "no SLO report"}
    report.update(
        command=command,
        returncode=returncode,
        wall_s=round(time.monotonic() - started, 1),
        log=str(log_path),
        csv_prefix=str(prefix),
        html=f"{prefix}.html",
    )
    if returncode is None:
        report["passed"] = False
        report["error"] = f"locust did not finish within {timeout:.0f} s"
    elif returncode not in (0, 1):
        report["passed"] = False
        report.setdefault("error", f"locust exited with status {returncode}")
    return report


def served_generation_suites() -> tuple[str, ...]:
    """The generation suites whose model the served specs declare (what `make build-engines`
    builds): part of `--pipeline all`."""
    from kiln import registry

    names = {spec.name for spec in registry.specs()}
    return tuple(name for name in generation.SUITES if name in names)


def run_generation(
    model: str, args: argparse.Namespace, http_url: str, grpc_url: str, out: Path
) -> dict[str, Any]:
    """One generation suite (`loadtests.generation`, its profile's Poisson workload; gRPC streaming, or
    HTTP generate_stream with `--transport http`); returns its report (or why it has none)."""
    transport = "http" if args.transport == "http" else "grpc"
    print(f"\n== {model}, Poisson arrivals ({args.profile} profile, {transport})", flush=True)
    started = time.monotonic()
    try:
        report = generation.run_suite(
            generation.SUITES[model],
            args.profile,
            grpc_url,
            http_url,
            transport,
            generation.parse_overrides(args.generation_gate),
            out=out,
        )
    except Exception as error:  # noqa: BLE001 - the run's failure, reported in the summary
        print(f"{model}: the generation run failed: {type(error).__name__}: {error}", flush=True)
        return {"model": model, "shape": "poisson", "passed": False, "verdicts": [], "error": str(error)}
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join([str(paths.ROOT), *([existing] if existing else [])])


def generation_table(reports: list[dict[str, Any]]) -> str:
    """The generation suites' rows (`loadtests.generation`): the streamed figures and each gate."""
    lines = [
        "| model | load | requests | req/s | output tokens/s | goodput req/s | TTFT p50 / p95 / p99 (ms) | "
        "ITL p95 (ms) | TPOT p50 (ms) | failures | gates |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for report in reports:
        if "summary" not in report:
            lines.append(f"| {report['model']} | | | | | | | | | | ERROR: {report.get('error')} |")
            continue
        s, w = report["summary"], report["workload"]
        ttft = " / ".join(_num(s["ttft_ms"], k) for k in ("p50", "p95", "p99"))
        gates = "; ".join(
            ("PASS " if v["passed"] else "MISS ") + _short_generation(v) for v in report["verdicts"]
        )
        lines.append(
            f"| {report['model']} | Poisson {w['rate']:g}/s, {w['requests']} requests "
            f"({report['transport']}) | "
            f"{s['requests']} | {_num(s, 'request_throughput')} | {_num(s, 'output_tokens_per_s')} | "
            f"{_num(s, 'goodput')} | {ttft} | {_num(s['itl_ms'], 'p95')} | {_num(s['tpot_ms'], 'p50')} | "
            f"{s['failed']} | {gates} |"
        )
    return "\n".join(lines)


def _short_generation(verdict: dict[str, Any]) -> str:
    measured, gate = verdict["measured"], verdict["gate"]
    if gate == "max_failure_ratio":
        return f"failures {'-' if measured is None else f'{measured:.3%}'} (<= {verdict['limit']:.3%})"
    sign = ">=" if gate == "min_tokens_per_s" else "<="
    shown = "-" if measured is None else f"{measured:.1f}"
    return f"{generation.GATE_LABELS[gate]} {shown} ({sign} {verdict['limit']:g})"


def summary_table(reports: list[dict[str, Any]]) -> str:
    """The Markdown summary: one row per run, its key figures and each gate's verdict (the
    generation suites' runs in a table of their own, `generation_table`)."""
    streamed = [r for r in reports if r.get("shape") == "poisson"]
    reports = [r for r in reports if r.get("shape") != "poisson"]
    if streamed and not reports:
        return generation_table(streamed)
    lines = [
        "| pipeline | shape | requests | throughput (req/s) | p95 (ms) | p99 (ms) | failures | "
        "content checks | gates |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for report in reports:
        if "error" in report and not report.get("verdicts"):
            lines.append(f"| {report['model']} | {report['shape']} | | | | | | | ERROR: {report['error']} |")
            continue
        windows = report.get("windows") or []
        spike = [w for w in windows if w["label"] == "spike"]
        focus = report.get("knee") or (spike or windows or [report.get("overall")])[0]
        overall = report.get("overall") or {}
        checks_ = report.get("content_checks", {})
        gates = "; ".join(("PASS " if v["passed"] else "MISS ") + _short(v) for v in report["verdicts"])
        label = f"{report['shape']}" + (f" (knee at {focus['users']} users)" if report.get("knee") else "")
        label += " (the spike's window)" if spike else ""
        lines.append(
            f"| {report['model']} | {label} | {overall.get('requests', 0)} | {_num(focus, 'rps')} | "
            f"{_num(focus, 'p95_ms')} | {_num(focus, 'p99_ms')} | {overall.get('failures', 0)} | "
            f"{checks_.get('passed', 0)} passed, {checks_.get('failed', 0)} failed | {gates} |"
        )
    return "\n".join(lines) + (f"\n\nGeneration suites:\n\n{generation_table(streamed)}" if streamed else "")


def _num(window: dict[str, Any] | None, key: str) -> str:
    value = (window or {}).get(key)
    return "-" if value is None else f"{value:.1f}"


def _short(verdict: dict[str, Any]) -> str:
    measured = verdict["measured"]
    gate = verdict["gate"]
    if gate == "max_failure_ratio":
        return f"failures {'-' if measured is None else f'{measured:.3%}'} (<= {verdict['limit']:.3%})"
    sign = ">=" if gate == "min_rps" else "<="
    shown = "-" if measured is None else f"{measured:.1f}"
    return f"{slo.GATE_LABELS[gate]} {shown} ({sign} {verdict['limit']:g})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m loadtests.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pipeline",
        default="all",
        help=f"comma-separated served models, or 'all' ({', '.join(slo.PIPELINES)}, and the generation "
        f"suites of the served specs: {', '.join(generation.SUITES)}); also {', '.join(slo.ALIASES)}",
    )
    parser.add_argument(
        "--shape", default="all", help=f"comma-separated shapes or 'all' ({', '.join(slo.SHAPES)})"
    )
    parser.add_argument("--profile", default="full", choices=slo.PROFILES)
    parser.add_argument("--transport", default="both", choices=tuple(TRANSPORTS))
    parser.add_argument("--http-url", default="", help="host:port of a running Triton's HTTP endpoint")
    parser.add_argument("--grpc-url", default="", help="host:port of its gRPC endpoint (with --http-url)")
    parser.add_argument("--repository", type=Path, default=None, help="repository the embedded server serves")
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default results/loadtest-<UTC>-<commit>)"
    )
    parser.add_argument(
        "--gate", action="append", default=[], help="override a gate: NAME=VALUE (repeatable)"
    )
    parser.add_argument(
        "--generation-gate",
        action="append",
        default=[],
        help=f"override a generation suite's gate: NAME=VALUE ({', '.join(generation.GATE_NAMES)})",
    )
    parser.add_argument("--shape-users", default="", help="override the shape's users (see loadtests.shapes)")
    parser.add_argument("--shape-seconds", default="", help="override the shape's lengths")
    parser.add_argument(
        "--inputs",
        type=Path,
        default=None,
        help="a folder of request mixes (<model>.pkl, loadtests.inputs.save) to use instead of building them",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the in-process reference answers (e.g. a GPU host serving FP16 engines)",
    )
    args = parser.parse_args(argv)
    if bool(args.http_url) != bool(args.grpc_url):
        parser.error("give both --http-url and --grpc-url (a running server), or neither (start one)")
    try:
        slo.parse_overrides(args.gate)
        generation.parse_overrides(args.generation_gate)
    except ValueError as error:
        parser.error(str(error))
    return args


def _selection(text: str, known: tuple[str, ...]) -> list[str]:
    return list(known) if text == "all" else [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    """Runs the suites; returns the exit status."""
    args = parse_args(argv)
    command_line = " ".join(["python -m loadtests.run", *(sys.argv[1:] if argv is None else argv)])
    selected = _selection(args.pipeline, (*slo.PIPELINES, *served_generation_suites()))
    streamed = [m for m in selected if m in generation.SUITES]
    models = [m for m in selected if m not in generation.SUITES]
    shape_names = _selection(args.shape, slo.SHAPES)
    try:
        for model in models:
            slo.suite_of(model)
        for shape in shape_names if models else ():
            shapes.phases(shape, slo.load(models[0], args.profile))
    except (KeyError, ValueError) as error:
        print(f"loadtests: {error}", file=sys.stderr)
        return 2
    out = args.out or paths.ROOT / "results" / f"loadtest-{environment.utc_stamp()}-{environment.commit()}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"loadtests: results go to {out}", flush=True)
    if not _save_mixes(models, args, out):
        return 2
    server = None
    http_url, grpc_url = args.http_url, args.grpc_url
    if not http_url:
        server = _start_server([*models, *streamed], args.repository, out)
        http_url, grpc_url = server.http_url, server.grpc_url
    reports = []
    try:
        for model in models:
            for shape in shape_names:
                reports.append(run_one(model, shape, args, http_url, grpc_url, out))
        for model in streamed:
            reports.append(run_generation(model, args, http_url, grpc_url, out))
    finally:
        if server is not None:
            server.stop()
    passed = _write_summary(reports, args.profile, command_line, out)
    if any("error" in r for r in reports):
        return 2 if not any(r.get("verdicts") for r in reports) else 1
    return 0 if passed else 1


def _save_mixes(models: list[str], args: argparse.Namespace, out: Path) -> bool:
    """Builds (or loads, with --inputs) each model's request mix into `out/inputs`; False, with the
    reason on stderr, when one cannot be had."""
    for model in models:
        try:
            if args.inputs is not None:
                corpus = inputs.load(args.inputs / f"{model}.pkl")
            else:
                corpus = inputs.build(model, reference=not args.no_reference)
        except (OSError, ValueError) as error:
            print(f"loadtests: cannot get the request mix of {model}: {error}", file=sys.stderr)
            return False
        inputs.save(corpus, out / "inputs" / f"{model}.pkl")
        print("request mix: " + "\n  ".join([corpus.summary(), *corpus.notes]), flush=True)
    return True


def _start_server(models: list[str], repository: Path | None, out: Path) -> Any:
    """The embedded tritonserver on free ports, loading `models`; its log is `out/tritonserver.log`."""
    from kiln.server import FREE_PORT, TritonServer

    print(f"loadtests: starting the embedded tritonserver for {', '.join(models)} ...", flush=True)
    server = TritonServer(
        repository,
        http_port=FREE_PORT,
        grpc_port=FREE_PORT,
        metrics_port=FREE_PORT,
        model_control_mode="explicit",
        load_models=models,
        log_file=out / "tritonserver.log",
    )
    server.start()
    print(f"loadtests: serving on http {server.http_url}, grpc {server.grpc_url}", flush=True)
    return server


def _write_summary(reports: list[dict[str, Any]], profile: str, command_line: str, out: Path) -> bool:
    """Writes `summary.json` and `summary.md`, prints the table; returns whether every gate passed."""
    table = summary_table(reports)
    passed = all(r.get("passed") for r in reports)
    machine = environment.machine_info()
    (out / "summary.json").write_text(
        json.dumps(
            {
                "passed": passed,
                "commit": environment.commit(),
                "machine": machine,
                "command": command_line,
                "runs": reports,
            },
            indent=2,
        )
        + "\n"
    )
    (out / "summary.md").write_text(
        f"# Load tests ({profile} profile), commit {environment.commit()}\n\n"
        f"{environment.describe_machine(machine)}\n\nCommand: `{command_line}`\n\n{table}\n"
    )
    print(f"\n{table}\n\nloadtests: {'PASS' if passed else 'MISS'}; results in {out}", flush=True)
    return passed


if __name__ == "__main__":
    sys.exit(main())
