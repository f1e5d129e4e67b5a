"""`kiln generate`: validate the spec and write every model's config.pbtxt (or --check them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln import paths
from kiln.cli import served_specs
from kiln.cli.models_option import add_models_option, use_models_dirs


def run_generate(args: argparse.Namespace) -> int:
    """The `generate` command: 0 written or up to date, 1 a config differs (--check), 2 a bad spec."""
    from kiln.build.publish import refused_served_names
    from kiln.repository import generate, stale
    from kiln.spec import SpecError

    repository = Path(args.repository)
    try:
        use_models_dirs(args)
        specs = served_specs()
        refused = refused_served_names(specs)  # optional variants the last build refused: no config
        if args.check:
            problems = stale(specs, repository, args.target, refused)
            if problems:
                print(
                    f"kiln generate --check: {len(problems)} config(s) differ from the spec; "
                    "run `make generate` and commit the result:",
                    file=sys.stderr,
                )
                for problem in problems:
                    print(problem, file=sys.stderr)
                return 1
            print(f"kiln generate --check: {len(specs)} config(s) in {repository} match the spec")
            return 0
        written = generate(specs, repository, args.target, paths.available_backends(), refused)
    except SpecError as error:
        print(f"kiln generate: {error}", file=sys.stderr)
        return 2
    for path in written:
        print(f"kiln generate: wrote {path}")
    return 0


def add_generate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `generate` on the `kiln` subparsers; sets `func` to `run_generate`."""
    parser = subparsers.add_parser(
        "generate",
        help="write each model's config.pbtxt from the spec",
        description="Validate the spec (the model folders) and write config.pbtxt for every model.",
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
    add_models_option(parser)
    parser.set_defaults(func=run_generate)
    return parser
