"""`kiln tune MODEL`: sweep a model's dynamic batcher and instance count, choose by a stated rule.

Prints every candidate's medians, the choice and the spec line that gives it (`kiln.tune`); with
`--write`, records the sweep in the model folder (`tuning.json`, `tuning.md`). Never edits a spec.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

from kiln.cli.models_option import add_models_option, use_models_dirs


def run_tune(args: argparse.Namespace) -> int:
    """The `tune` command: 0 a candidate was chosen, 1 none met the bounds, 2 bad input or the
    sweep could not run."""
    import json

    from kiln import tune
    from kiln.server import TritonServerError
    from kiln.spec import SpecError

    if threading.current_thread() is threading.main_thread():  # SIGTERM stops the server too
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    low, high = args.concurrency
    rule = tune.Rule(low, high, args.p50_slack, args.p99_factor, args.p99_ms, args.tie)
    command = _command(args)
    try:
        use_models_dirs(args)
        target = tune.resolve(args.model, args.form)
        grid = tune.Grid.parse(args.grid or "", high)
        record = tune.tune(
            target, grid, rule, repeats=args.repeats, window_ms=args.window_ms,
            include_current=not args.no_current, command=command,
            log=lambda line: print(f"[tune] {line}", flush=True),
        )  # fmt: skip
    except (tune.TuneError, SpecError, TritonServerError) as error:
        print(f"kiln tune: {error}", file=sys.stderr)
        return 2
    print()
    print(tune.table(record))
    print()
    print(f"Rule: {record['rule']['text']}")
    choice = record["choice"]
    if choice is None:
        print("Chosen: none: no candidate met the bounds (see the verdicts).")
    else:
        print(f"Chosen: {choice['name']} ({choice['label']}). In {target.name}'s spec:\n")
        print("    " + choice["spec_line"].replace("\n", "\n    "))
        overlap = tune.within_noise(record)
        if overlap is not None:
            ranges = "overlap: within this run's noise" if overlap else "do not overlap"
            print(f"\nThe chosen and the current settings' throughputs over the repeats {ranges}.")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"\nkiln tune: wrote {args.json}")
    if args.write:
        for path in tune.write_record(record, target.folder):
            print(f"kiln tune: wrote {path}")
    return 0 if choice is not None else 1


def _command(args: argparse.Namespace) -> str:
    """The command line that repeats this sweep, every setting spelled out."""
    parts = ["kiln", "tune", args.model]
    if args.form:
        parts += ["--form", args.form]
    if args.grid:
        parts += ["--grid", args.grid]
    parts += ["--repeats", str(args.repeats), "--window-ms", str(args.window_ms)]
    parts += ["--concurrency", ",".join(map(str, args.concurrency))]
    parts += ["--p50-slack", f"{args.p50_slack:g}", "--p99-factor", f"{args.p99_factor:g}"]
    parts += ["--tie", f"{args.tie:g}"]
    if args.p99_ms is not None:
        parts += ["--p99-ms", f"{args.p99_ms:g}"]
    if args.no_current:
        parts.append("--no-current")
    return shlex.join(parts)


def _concurrencies(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be LOW,HIGH (integers), got {text!r}") from None
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"must be two concurrencies LOW,HIGH, got {text!r}")
    return values


def add_tune_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `tune` on the `kiln` subparsers; sets `func` to `run_tune`."""
    from kiln import tune

    parser = subparsers.add_parser(
        "tune",
        help="sweep a model's dynamic batching with perf_analyzer and choose by a stated rule",
        description=(
            "Serve every candidate batching setting of MODEL side by side on one tritonserver, "
            "measure each with perf_analyzer at a low and a high concurrency (interleaved repeats, "
            "medians), choose by the rule printed with the table, and print the spec line. "
            "See docs/tuning.md."
        ),
    )
    parser.add_argument("model", help="a served model (e.g. fraud, fraud_int8) or a pipeline (--form fused)")
    parser.add_argument(
        "--form", choices=("fused", "model"),
        help="tune a pipeline in its fused form (an ensemble has no batcher of its own)",
    )
    parser.add_argument(
        "--grid", metavar="SPEC",
        help="the sweep's axes, e.g. 'delays=0,100,500,2000;preferred=none/8,16;instances=1,2' "
        "(an axis left out keeps its default: that example, with 8,16 half and all of HIGH)",
    )
    parser.add_argument("--repeats", type=int, default=tune.DEFAULT_REPEATS, help="default: %(default)s")
    parser.add_argument(
        "--window-ms", type=int, default=tune.DEFAULT_WINDOW_MS,
        help="perf_analyzer's measurement window (default: %(default)s)",
    )
    parser.add_argument(
        "--concurrency", type=_concurrencies, default=list(tune.DEFAULT_CONCURRENCIES), metavar="LOW,HIGH",
        help="where latency and throughput are measured (default: 1,16)",
    )
    parser.add_argument("--p50-slack", type=float, default=tune.Rule.p50_slack, help="default: %(default)s")
    parser.add_argument("--p99-factor", type=float, default=tune.Rule.p99_factor, help="default: %(default)s")
    parser.add_argument("--p99-ms", type=float, default=None, help="an absolute p99 bound at HIGH")
    parser.add_argument("--tie", type=float, default=tune.Rule.tie, help="default: %(default)s")
    parser.add_argument("--no-current", action="store_true", help="leave the spec's current settings out")
    parser.add_argument("--json", metavar="PATH", help="also write the record here")
    parser.add_argument(
        "--write", action="store_true",
        help=f"record the sweep in the model's folder ({tune.RECORD_FILE}, {tune.TABLE_FILE})",
    )
    add_models_option(parser)
    parser.set_defaults(func=run_tune)
    return parser
