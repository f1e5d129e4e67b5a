"""`kiln add`: a model folder from an ONNX file or a PyTorch factory (`kiln.byom`).

    kiln add NAME --onnx FILE --samples NPZ [--calibration NPZ] [--to DIR] [--max-batch-size N]
    kiln add NAME --factory pkg.mod:fn [--checkpoint FILE] --samples NPZ [...]

Prints what was inferred and decided, what to run next, and the written spec.py. Errors are one
paragraph on stderr naming what was wrong, exit 2; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kiln import paths

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _variable_dims(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`--variable-dim input_ids:0` (repeatable) -> {"input_ids": (0,)}."""
    dims: dict[str, list[int]] = {}
    for value in values or ():
        name, sep, axis = value.rpartition(":")
        if not sep or not name or not axis.isdigit():
            raise ValueError(f"--variable-dim must look like INPUT:AXIS (e.g. input_ids:0), got {value!r}")
        dims.setdefault(name, []).append(int(axis))
    return {name: tuple(axes) for name, axes in dims.items()}


def run_add(args: argparse.Namespace) -> int:
    """The `add` command: 0 written, 2 a bad argument, model, sample or destination."""
    from kiln import byom

    def fail(message: str) -> int:
        print(f"kiln add: nothing was written: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if (args.onnx is None) == (args.factory is None):
        return fail("give --onnx FILE or --factory package.module:function (one of them)")
    if args.onnx is not None and (args.checkpoint or args.output_names or args.variable_dim):
        flags = {"--checkpoint": args.checkpoint, "--output-names": args.output_names,
                 "--variable-dim": args.variable_dim}
        used = [flag for flag, value in flags.items() if value]
        return fail(f"{', '.join(used)} goes with --factory (an ONNX file names its own tensors)")
    common = {
        "dest_dir": Path(args.to),
        "calibration": args.calibration,
        "variants": _variants(args.variants),
        "max_batch_size": byom.DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size,
        "description": args.description,
        "force": args.force,
    }
    try:
        if args.onnx is not None:
            scaffold = byom.add_onnx(args.name, args.onnx, args.samples, **common)
        else:
            # A factory in the user's working directory imports as it would from `python`.
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            scaffold = byom.add_module(
                args.name, args.factory, args.samples, checkpoint=args.checkpoint,
                output_names=[n.strip() for n in args.output_names.split(",")] if args.output_names else None,
                variable_dims=_variable_dims(args.variable_dim), **common,
            )
    except (byom.ByomError, ValueError) as error:
        return fail(str(error))
    print(scaffold.summary)
    print(f"\n--- {scaffold.folder / byom.SPEC_FILE} ---")
    print(scaffold.spec_text, end="")
    return EXIT_OK


def add_add_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `add` on the `kiln` subparsers; sets `func` to `run_add`."""
    parser = subparsers.add_parser(
        "add",
        help="write a model folder from an ONNX file or a PyTorch factory",
        description=(
            "Write a model folder DIR/NAME/ (spec.py, the model, held_out.npz, README.md) from an ONNX "
            "file or a PyTorch factory and sample inputs: the tensors, dtypes, dims and batch axis are "
            "read from the ONNX graph (a PyTorch module is exported to read them), the output kinds "
            "inferred, the samples split into evaluation and INT8 calibration items. Then `kiln "
            "generate` and `kiln build --model NAME` build it (with KILN_MODELS=DIR when DIR is not "
            "the project's models/)."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="model name, also the folder's (a Python identifier)")
    source = parser.add_argument_group("the model (one of)")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX file (copied into the folder)")
    source.add_argument(
        "--factory", metavar="PKG.MOD:FN",
        help="a function returning the untrained torch.nn.Module (importable: installed, on PYTHONPATH "
        "or in the working directory)",
    )
    source.add_argument(
        "--checkpoint", metavar="FILE",
        help="with --factory: its state_dict (torch.save(model.state_dict(), FILE)); without it, the "
        "weights the factory's module has are saved",
    )
    parser.add_argument(
        "--samples", metavar="NPZ", required=True,
        help="sample inputs: an .npz of arrays named after the model's inputs, items first "
        "('calibration/<input>' arrays in it are the calibration set)",
    )
    parser.add_argument(
        "--calibration", metavar="NPZ",
        help="INT8 calibration inputs, laid out as --samples (default: the samples are split at random)",
    )
    parser.add_argument(
        "--to", metavar="DIR", default=str(paths.ROOT / "models"),
        help="folder of model folders to write into (default: %(default)s)",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=None, metavar="N",
        help="largest batch when the model has a symbolic batch axis (default: kiln.byom's "
        "DEFAULT_MAX_BATCH_SIZE, 8; 0: no batching)",
    )
    parser.add_argument(
        "--variants", default="fp32,int8", metavar="LIST",
        help="precisions to build, fp32 first (default: %(default)s)",
    )
    parser.add_argument(
        "--output-names", metavar="LIST",
        help="with --factory: names of the module's outputs, in order (default: output, or output_0, "
        "output_1, ...)",
    )
    parser.add_argument(
        "--variable-dim", action="append", metavar="INPUT:AXIS",
        help="with --factory: a per-item axis of an input whose size varies (e.g. input_ids:0 for a "
        "sequence length; repeatable)",
    )
    parser.add_argument("--description", help="one line for the spec")
    parser.add_argument(
        "--force", action="store_true",
        help="overwrite the files kiln add writes in an existing folder (others are left alone)",
    )
    parser.set_defaults(func=run_add)
    return parser
