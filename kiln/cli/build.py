"""`kiln build`: the build pipeline (`kiln.build.pipeline.build`) from the command line.

Errors are one paragraph on stderr, no traceback: exit 2 for a bad spec, an unknown model or a
missing build extra, 1 for a failed stage (`kiln.build.pipeline`'s EXIT_* codes).
"""

from __future__ import annotations

import argparse
import sys

from kiln.build import pipeline
from kiln.cli import served_specs
from kiln.cli.models_option import add_models_option, use_models_dirs
from kiln.spec import SpecError


def run_build(args: argparse.Namespace) -> int:
    """`kiln build`: returns the exit code; errors are one paragraph on stderr, no traceback."""
    try:
        use_models_dirs(args)
        pipeline.build(served_specs(), force=args.force, only=args.models)
    except SpecError as error:
        print(f"kiln build: nothing was built: {error}", file=sys.stderr)
        return pipeline.EXIT_BAD_INPUT
    except pipeline.SelectionError as error:
        print(f"kiln build: {error}", file=sys.stderr)
        return pipeline.EXIT_BAD_INPUT
    except pipeline.BuildError as error:
        print(f"kiln build: failed: {error}", file=sys.stderr)
        return pipeline.EXIT_BUILD_FAILED
    except ModuleNotFoundError as error:
        if error.name not in pipeline.BUILD_EXTRA_MODULES:
            raise
        print(
            f"kiln build: needs the build extra ({error.name} is missing): "
            "pip install 'kiln[build]'",
            file=sys.stderr,
        )
        return pipeline.EXIT_BAD_INPUT
    return pipeline.EXIT_OK


def add_build_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `build` on the `kiln` command's subparsers; sets `func(args) -> exit code`."""
    parser = subparsers.add_parser(
        "build",
        help="train, export, quantize, check and publish every model with a build section",
        description=(
            "Validate the spec (the model folders), then per model: train, export to ONNX, check ONNX "
            "Runtime against PyTorch, build the FP16/INT8 variants and gate each on its accuracy "
            "budget, publish every served variant into the model repository with a build "
            "manifest. A model whose spec, code and tools are unchanged is not rebuilt."
        ),
    )
    parser.add_argument(
        "--force", action="store_true", help="rebuild even the models that are up to date"
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help="build only this model (repeatable); all specs are still validated",
    )
    add_models_option(parser)
    parser.set_defaults(func=run_build)
    return parser
