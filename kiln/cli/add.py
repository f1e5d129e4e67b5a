"""`kiln add`: a model folder from an ONNX file or a PyTorch factory (`kiln.byom`).

    kiln add NAME --onnx FILE --samples NPZ [--calibration NPZ] [--to DIR] [--max-batch-size N]
                  [--dims INPUT=D1,D2,...] [--kind OUTPUT=KIND] [--variants LIST] [--optional LIST]
                  [--int8 FIELD=VALUE]
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


def _assignments(values: list[str] | None, flag: str, example: str) -> list[tuple[str, str]]:
    """`--flag NAME=VALUE` (repeatable) -> [(name, value)]; the name is what precedes the last '='
    (`--kind`, `--dims`) or the first ('--int8': values may hold '=')."""
    pairs = []
    for value in values or ():
        name, sep, text = value.partition("=") if flag == "--int8" else value.rpartition("=")
        if not sep or not name.strip() or not text.strip():
            raise ValueError(f"{flag} must look like {example}, got {value!r}")
        pairs.append((name.strip(), text.strip()))
    return pairs


def _kinds(values: list[str] | None) -> dict[str, str]:
    """`--kind output0=detections` (repeatable) -> {"output0": "detections"}."""
    kinds: dict[str, str] = {}
    for name, kind in _assignments(values, "--kind", "OUTPUT=KIND (e.g. output0=detections)"):
        if name in kinds and kinds[name] != kind:
            raise ValueError(f"--kind gives output {name!r} two kinds: {kinds[name]} and {kind}")
        kinds[name] = kind
    return kinds


def _dims(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`--dims images=3,320,320` (repeatable) -> {"images": (3, 320, 320)}."""
    dims = {}
    for name, text in _assignments(values, "--dims", "INPUT=D1,D2,... (e.g. images=3,320,320)"):
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ValueError(
                f"--dims {name}={text}: the dims must be sizes, comma-separated (e.g. 3,320,320)"
            )
        dims[name] = tuple(int(p) for p in parts)
    return dims


def _int8(values: list[str] | None) -> dict[str, str] | None:
    """`--int8 FIELD=VALUE` (repeatable) -> {field: value}; a list field given twice gathers both."""
    from kiln.byom import INT8_FIELDS

    settings: dict[str, str] = {}
    lists = ("op_types_to_quantize", "exclude_op_types", "nodes_to_exclude")
    for field, text in _assignments(values, "--int8", "FIELD=VALUE (e.g. nodes_to_exclude='/model.22/*')"):
        if field not in INT8_FIELDS:
            raise ValueError(
                f"--int8 {field}=...: {field!r} is no field of kiln.spec.Int8Options "
                f"({', '.join(INT8_FIELDS)})"
            )
        if field in settings and field not in lists:
            raise ValueError(f"--int8 gives {field} twice")
        settings[field] = f"{settings[field]},{text}" if field in settings else text
    return settings or None


def run_add(args: argparse.Namespace) -> int:
    """The `add` command: 0 written, 2 a bad argument, model, sample or destination."""
    from kiln import byom

    def fail(message: str) -> int:
        print(f"kiln add: nothing was written: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

    if (args.onnx is None) == (args.factory is None):
        return fail("give --onnx FILE or --factory package.module:function (one of them)")
    if args.factory is not None and args.dims:
        return fail("--dims goes with --onnx (a PyTorch module's dims are its samples'; --variable-dim "
                    "marks one that varies)")
    if args.onnx is not None and (args.checkpoint or args.output_names or args.variable_dim):
        flags = {"--checkpoint": args.checkpoint, "--output-names": args.output_names,
                 "--variable-dim": args.variable_dim}
        used = [flag for flag, value in flags.items() if value]
        return fail(f"{', '.join(used)} goes with --factory (an ONNX file names its own tensors)")
    batch = byom.DEFAULT_MAX_BATCH_SIZE if args.max_batch_size is None else args.max_batch_size
    try:
        common = {
            "dest_dir": Path(args.to),
            "calibration": args.calibration,
            "variants": byom.variants_from(_variants(args.variants), _variants(args.optional or "")),
            "max_batch_size": batch,
            "description": args.description,
            "force": args.force,
            "output_kinds": _kinds(args.kind),
            "int8": _int8(args.int8),
        }
        if args.onnx is not None:
            scaffold = byom.add_onnx(
                args.name, args.onnx, args.samples, input_dims=_dims(args.dims), **common
            )
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
    _add_model_arguments(parser)
    _add_data_arguments(parser)
    _add_choice_arguments(parser)
    parser.set_defaults(func=run_add)
    return parser


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`add`'s NAME and the model it is made from (--onnx, or --factory with --checkpoint)."""
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


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """`add`'s samples, destination, batch size and variants."""
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
        "--optional", metavar="LIST",
        help="variants (of --variants) whose refusal by their gates is reported, not fatal: the others "
        "are published (e.g. int8)",
    )


def _add_choice_arguments(parser: argparse.ArgumentParser) -> None:
    """`add`'s declared choices (kinds, dims, INT8, output names, variable dims), description, --force."""
    parser.add_argument(
        "--kind", action="append", metavar="OUTPUT=KIND",
        help="declare what an output means instead of the inferred kind (class_scores, probabilities, "
        "regression, embedding, detections; e.g. output0=detections; repeatable)",
    )
    parser.add_argument(
        "--dims", action="append", metavar="INPUT=D1,D2,...",
        help="with --onnx: fix an input's per-item dims where the graph's are symbolic (e.g. "
        "images=3,320,320 for a detector trained at 320; the server then refuses other shapes; "
        "repeatable)",
    )
    parser.add_argument(
        "--int8", action="append", metavar="FIELD=VALUE",
        help="an INT8 setting, any field of kiln.spec.Int8Options (method=percentile, "
        "op_types_to_quantize=Conv, exclude_op_types=Sigmoid,Concat, nodes_to_exclude='/model.22/*': "
        "patterns are matched against the graph's node names; repeatable)",
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
