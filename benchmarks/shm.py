"""When does system shared memory pay off? `python -m benchmarks.shm` measures it.

Starts its own tritonserver on a private repository holding `resnet50` (linked from the built
model repository) and `identity`, a tiny kiln_onnx model that returns its FP32 input (rows of
1 MiB, batch up to 256), so transport cost is measured without model compute. For each payload
it times `Client.infer` over HTTP and gRPC, each with and without `shared_memory=True` (pooled
regions: registration happens once, in the warm-up), and prints a Markdown table of the medians
to stdout.

Payloads: resnet50 FP32 inputs of batch 1..16 (0.6-9.6 MB in, 4-64 kB out), and identity inputs of
1..64 MiB by default (the same size back out).

Example:
    .venv/bin/python -m benchmarks.shm --repeats 11 --batches 1 4 16 --sizes-mb 1 4 16 64
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from kiln import paths, tensors
from kiln.clients import Client
from kiln.server import TritonServer

RESNET50 = "resnet50"
IDENTITY = "identity"
IDENTITY_INPUT = "x"
IDENTITY_OUTPUT = "y"
IDENTITY_ROW = 262_144
"""FP32 values per identity item: 1 MiB, so a payload of n MiB is a batch of n rows."""
IDENTITY_MAX_BATCH = 256
IMAGE_SHAPE = (3, 224, 224)
RESNET50_CLASSES = 1000
DEFAULT_BATCHES = (1, 2, 4, 8, 16)
DEFAULT_SIZES_MB = (1, 4, 16, 64)
DEFAULT_REPEATS = 11
MB = 1 << 20
ONNX_OPSET = 13
ONNX_IR_VERSION = 8
TIMEOUT_S = 300.0


def write_identity_model(root: Path) -> None:
    """`identity`: y = x, FP32 [batch, IDENTITY_ROW], served by kiln_onnx (needs the onnx package).

    Fixed-size rows, so the client knows the output's size and can place it in shared memory too.
    """
    import onnx
    from google.protobuf import text_format
    from onnx import TensorProto, helper
    from tritonclient.grpc import model_config_pb2

    x = helper.make_tensor_value_info(IDENTITY_INPUT, TensorProto.FLOAT, ["n", IDENTITY_ROW])
    y = helper.make_tensor_value_info(IDENTITY_OUTPUT, TensorProto.FLOAT, ["n", IDENTITY_ROW])
    graph = helper.make_graph(
        [helper.make_node("Identity", [IDENTITY_INPUT], [IDENTITY_OUTPUT])], IDENTITY, [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    (root / IDENTITY / "1").mkdir(parents=True)
    onnx.save(model, root / IDENTITY / "1" / "model.onnx")
    config = model_config_pb2.ModelConfig(
        name=IDENTITY, backend="kiln_onnx", max_batch_size=IDENTITY_MAX_BATCH
    )
    for name, field in ((IDENTITY_INPUT, config.input), (IDENTITY_OUTPUT, config.output)):
        field.add(name=name, data_type=model_config_pb2.TYPE_FP32).dims.append(IDENTITY_ROW)
    config.instance_group.add(kind=model_config_pb2.ModelInstanceGroup.KIND_CPU, count=1)
    (root / IDENTITY / "config.pbtxt").write_text(text_format.MessageToString(config))


def measure(
    clients: dict[str, Client], model: str, inputs: dict[str, np.ndarray], repeats: int
) -> dict[str, float]:
    """Median latency in ms per (protocol, shm) for one payload; checks shm and plain agree.

    The four ways are timed round-robin, one call each per round, so a noisy neighbour slows
    them alike instead of skewing whichever ran during the noise.
    """
    ways: dict[str, Callable[[], object]] = {}
    outputs = {}
    for protocol, client in clients.items():
        for use_shm in (False, True):
            key = f"{protocol}{'+shm' if use_shm else ''}"
            ways[key] = lambda c=client, s=use_shm: c.infer(model, inputs, shared_memory=s)
            outputs[key] = next(iter(ways[key]().outputs.values()))  # warm-up and check
    reference = outputs["http"]
    for key, value in outputs.items():
        np.testing.assert_allclose(value, reference, rtol=1e-4, atol=1e-4, err_msg=key)
    times: dict[str, list[float]] = {key: [] for key in ways}
    for _ in range(repeats):
        for key, call in ways.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) * 1e3 for key, values in times.items()}


def table(rows: Sequence[tuple[str, float, float, dict[str, float]]]) -> str:
    lines = [
        "| payload | in MB | out MB | HTTP ms | HTTP+shm ms | shm speedup (HTTP) | gRPC ms | gRPC+shm ms "
        "| shm speedup (gRPC) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, in_mb, out_mb, t in rows:
        lines.append(
            f"| {name} | {in_mb:.2f} | {out_mb:.3f} | {t['http']:.1f} | {t['http+shm']:.1f} | "
            f"{t['http'] / t['http+shm']:.2f}x | {t['grpc']:.1f} | {t['grpc+shm']:.1f} | "
            f"{t['grpc'] / t['grpc+shm']:.2f}x |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="timed calls per cell (median)")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="*",
        default=list(DEFAULT_BATCHES),
        help="resnet50 batch sizes (none: skip resnet50)",
    )
    parser.add_argument(
        "--sizes-mb",
        type=int,
        nargs="*",
        default=list(DEFAULT_SIZES_MB),
        help=f"identity payload sizes in MiB, 1..{IDENTITY_MAX_BATCH} (none: skip)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kiln-shm-bench-") as tmp:
        repository = Path(tmp)
        models = []
        if args.batches:
            (repository / RESNET50).symlink_to(paths.model_repository() / RESNET50, target_is_directory=True)
            models.append(RESNET50)
        if args.sizes_mb:
            write_identity_model(repository)
            models.append(IDENTITY)
        print(f"starting tritonserver with {', '.join(models)} ...", file=sys.stderr)
        with TritonServer(
            repository,
            http_port=0,
            grpc_port=0,
            metrics_port=0,
            model_control_mode="explicit",
            load_models=models,
            exit_timeout=5,
        ) as server:
            rows = measure_payloads(server, args.batches, args.sizes_mb, args.repeats)
    print(
        f"Shared memory vs plain requests, `Client.infer`, median of {args.repeats} calls after a "
        f"warm-up, the four ways interleaved ({platform.machine()}, {os.cpu_count()} CPUs, server and "
        "client on one host):\n"
    )
    print(table(rows))
    return 0


def measure_payloads(
    server: TritonServer, batches: Sequence[int], sizes_mb: Sequence[int], repeats: int
) -> list[tuple[str, float, float, dict[str, float]]]:
    """The table's rows: resnet50 at each batch size, then identity at each size in MiB, each
    timed four ways (`measure`) through one HTTP and one gRPC client."""
    clients = {
        "http": Client(f"http://{server.http_url}", timeout=TIMEOUT_S),
        "grpc": Client(f"grpc://{server.grpc_url}", timeout=TIMEOUT_S),
    }
    rows = []
    try:
        rng = np.random.default_rng(0)
        for batch in batches:
            images = rng.random((batch, *IMAGE_SHAPE), dtype=np.float32)
            print(f"resnet50 batch {batch} ...", file=sys.stderr)
            times = measure(clients, RESNET50, {tensors.RESNET50_IMAGES: images}, repeats)
            out_mb = batch * RESNET50_CLASSES * 4 / MB
            rows.append((f"resnet50 FP32 batch {batch}", images.nbytes / MB, out_mb, times))
        for size in sizes_mb:
            values = rng.random((size, IDENTITY_ROW), dtype=np.float32)
            print(f"identity {size} MiB ...", file=sys.stderr)
            times = measure(clients, IDENTITY, {IDENTITY_INPUT: values}, repeats)
            rows.append((f"identity {size} MiB", values.nbytes / MB, values.nbytes / MB, times))
    finally:
        for client in clients.values():
            client.close()
    return rows


if __name__ == "__main__":
    sys.exit(main())
