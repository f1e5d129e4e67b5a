"""The `kiln` command: generate, build, serve."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kiln import paths


def _generate(args: argparse.Namespace) -> int:
    from kiln.build.specs import SPECS
    from kiln.repository import generate, stale
    from kiln.spec import SpecError

    repository = Path(args.repository)
    try:
        if args.check:
            problems = stale(SPECS, repository, args.target)
            if problems:
                print(
                    f"kiln generate --check: {len(problems)} config(s) differ from the spec; "
                    "run `make generate` and commit the result:",
                    file=sys.stderr,
                )
                for problem in problems:
                    print(problem, file=sys.stderr)
                return 1
            print(f"kiln generate --check: {len(SPECS)} config(s) in {repository} match the spec")
            return 0
        written = generate(SPECS, repository, args.target, paths.available_backends())
    except SpecError as error:
        print(f"kiln generate: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"kiln generate: wrote {path}")
    return 0


def _add_generate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="write each model's config.pbtxt from the spec",
        description="Validate the spec (build/specs/) and write config.pbtxt for every model.",
    )
    parser.add_argument(
        "--repository", default=str(paths.model_repository()),
        help="model repository to write (default: %(default)s)",
    )
    parser.add_argument(
        "--target", choices=("embedded", "ngc"), default="embedded",
        help="embedded: the tritonserver of the nvidia-pytriton wheel (kiln_onnx backend); "
        "ngc: the NGC tritonserver container (native onnxruntime backend)",
    )
    parser.add_argument(
        "--check", action="store_true",
        help="write nothing; exit 1 when a config differs from what the spec generates",
    )
    parser.set_defaults(func=_generate)


def _serve(args: argparse.Namespace) -> int:
    from kiln.server_cli import run_serve

    on_ready = None
    if args.demo:
        from kiln.demo import pipelines_demo

        on_ready = pipelines_demo
    return run_serve(args, on_ready=on_ready)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `kiln` with every subcommand registered."""
    from kiln.build.pipeline import add_build_command
    from kiln.server_cli import add_serve_command

    parser = argparse.ArgumentParser(
        prog="kiln", description="Build, quantize and serve PyTorch models on Triton."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate_command(subparsers)
    add_build_command(subparsers)
    serve = add_serve_command(subparsers)
    serve.add_argument(
        "--demo", action="store_true",
        help="once ready, classify a few held-out digits through the server and print a curl "
        "line for the same request",
    )
    serve.set_defaults(func=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the `kiln` command line; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `kiln build | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's exit-time flush must not raise again
        return 0


if __name__ == "__main__":
    sys.exit(main())
