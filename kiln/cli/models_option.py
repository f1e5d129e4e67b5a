"""`--models DIR`: model folders outside the project, for `kiln generate` and `kiln build`."""

from __future__ import annotations

import argparse


def add_models_option(parser: argparse.ArgumentParser) -> None:
    """Registers `--models DIR` (repeatable) on a subcommand."""
    parser.add_argument(
        "--models", dest="models_dirs", action="append", default=[], metavar="DIR",
        help="also use the model folders in DIR (repeatable; like KILN_MODELS; a model folder "
        "is DIR/<name>/spec.py, see docs/models.md)",
    )


def use_models_dirs(args: argparse.Namespace) -> None:
    """Makes `--models` folders known to the registry (and, through KILN_MODELS, to the
    processes this command starts). Raises kiln.registry.RegistryError for a missing folder."""
    from kiln import registry

    for folder in getattr(args, "models_dirs", None) or ():
        registry.add_models_dir(folder)
