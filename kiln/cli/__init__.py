"""The `kiln` command: generate, build, serve, publish.

One module per subcommand, each with its `add_<command>_command(subparsers)` and run function:

    generate  `kiln generate`: write (or --check) every model's config.pbtxt from the spec
    build     `kiln build`: the build pipeline (`kiln.build.pipeline.build`) from the command line
    serve     `kiln serve`: the embedded tritonserver until Ctrl-C, watching its backend stubs
    add       `kiln add`: a model folder from an ONNX file or a PyTorch factory (`kiln.byom`)
    tune      `kiln tune`: sweep a model's dynamic batching with perf_analyzer (`kiln.tune`)
    publish   `kiln publish`: upload the model repository to an S3 bucket (`kiln.publish_remote`)

`served_specs()` is the one place the CLI learns which specs kiln serves. `python -m kiln.cli`
runs the command too.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.spec import Spec


def served_specs() -> tuple[Spec, ...]:
    """Every spec kiln serves, in build order: what `generate` writes and `build` builds."""
    from kiln import registry

    return registry.specs()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `kiln` with every subcommand registered."""
    from kiln.cli import add, build, generate, publish, serve, tune

    parser = argparse.ArgumentParser(
        prog="kiln", description="Build, quantize and serve PyTorch models on Triton."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate.add_generate_command(subparsers)
    build.add_build_command(subparsers)
    serve.add_demo_flag(serve.add_serve_command(subparsers))
    add.add_add_command(subparsers)
    tune.add_tune_command(subparsers)
    publish.add_publish_command(subparsers)
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
