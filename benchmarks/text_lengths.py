"""text_embedder on requests of mixed token lengths vs one length, per way of padding, side by side.

Issue 13: each request used to be padded to its own longest text, so the model step's tensors
differed in shape per request and Triton's dynamic batcher (which batches only equal shapes)
never put two requests of different lengths in one batch of text_encoder. This script serves, on
one tritonserver from one temporary repository (the built text_encoder linked in), one
text_embedder per variant, each with its own tokenizer step (the variant's `length_buckets` and
`pad_batch`), in the ensemble or the fused form, and measures each with perf_analyzer over gRPC
at one concurrency, on two request mixes:

- mixed: the load test's texts (`kiln.models.text_encoder.loadtest.texts()`: queries of 5-12
  tokens, prose of 11-89, two texts truncated at 128, non-ASCII), one text per request;
- single: one text of that mix, the one nearest the mix's mean token count, in every request.

Per cell: throughput, p50/p99, and the model step's average batch (requests per execution,
Triton's statistics of text_encoder as perf_analyzer reports them; for a fused variant, the fused
model's own). The variants run interleaved per repeat; figures are medians of the repeats. Before
measuring, every variant's answer to every text of the mix is checked against the unpadded
in-process encoding (`OrtTextEmbedder`, the served ONNX model), so no variant is faster by being
wrong.

    flock /tmp/kiln-bench.lock .venv/bin/python -m benchmarks.text_lengths --repeats 3
    flock /tmp/kiln-bench.lock .venv/bin/python -m benchmarks.text_lengths --repeats 1 --json r1.json
    .venv/bin/python -m benchmarks.text_lengths --merge r1.json r2.json r3.json   # one table
    flock /tmp/kiln-bench.lock .venv/bin/python -m benchmarks.text_lengths --inprocess

`--inprocess` measures ONNX Runtime alone (no Triton): its time per text for the mix and the
single text under each way of padding, which is what a bucket trades against batching.

Variants: `--variants base,b16,...` (see VARIANTS). Each variant's model step is text_encoder as
the spec declares it, or a copy of that spec (in the temporary repository) with Triton's
`allow_ragged_batch` set otherwise on both inputs (`TensorSpec.allow_ragged_batch`: the committed
text_encoder has it on, so the variants without "r" run on a copy without it) or with another
queue delay.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import perf
from kiln import paths, tensors
from kiln.models.text_encoder import pipeline as text_pipeline
from kiln.registry import by_name
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.spec import EnsembleSpec, EnsembleStep, ModelSpec, Variant

ENCODER = "text_encoder"
MAX_ABS_DIFF = 1e-5
"""The largest difference allowed between a served embedding and the unpadded reference's."""


@dataclass(frozen=True)
class TextVariant:
    """One way of serving text_embedder.

    Attributes:
        name: The variant's label (and the suffix of its models' names).
        buckets: kiln_text's `length_buckets` ("" for none: each request padded to its longest).
        pad_batch: kiln_text's `pad_batch`.
        form: "ensemble" or "fused".
        ragged: The model step's inputs have `allow_ragged_batch` (`TensorSpec`).
        encoder_delay_us: The model step's `max_queue_delay_us` (None: text_encoder's own).
    """

    name: str
    buckets: str = ""
    pad_batch: bool = False
    form: str = "ensemble"
    ragged: bool = False
    encoder_delay_us: int | None = None

    @property
    def pipeline(self) -> str:
        return f"te_{self.name}"

    @property
    def encoder(self) -> str:
        """The model step's name: text_encoder when the committed spec is what this variant
        needs, else the name of its copy (`encoder_spec`)."""
        if self.ragged == committed_ragged() and self.encoder_delay_us is None:
            return ENCODER
        suffix = ("_ragged" if self.ragged else "_unragged") + (
            f"_d{self.encoder_delay_us}" if self.encoder_delay_us is not None else ""
        )
        return ENCODER + suffix


def committed_ragged() -> bool:
    """Whether the committed text_encoder spec sets `allow_ragged_batch` on its inputs."""
    return all(t.allow_ragged_batch for t in by_name(ENCODER).inputs)


def encoder_spec(encoder: ModelSpec, variant: TextVariant) -> ModelSpec:
    """The model step `variant` runs on: `encoder` (fp32 only) under `variant.encoder`, with the
    variant's ragged flag on every input and its queue delay, through the spec as any model."""
    batching = encoder.dynamic_batching
    if variant.encoder_delay_us is not None and batching is not None:
        batching = dataclasses.replace(batching, max_queue_delay_us=variant.encoder_delay_us)
    inputs = tuple(dataclasses.replace(t, allow_ragged_batch=variant.ragged) for t in encoder.inputs)
    return dataclasses.replace(encoder, name=variant.encoder, inputs=inputs, dynamic_batching=batching)


FINE = "8,16,24,32,48,64,96"
"""Finer buckets: at most a third of a text's length is padding (past 8 tokens)."""

VARIANTS = {
    v.name: v
    for v in (
        TextVariant("base"),
        TextVariant("b16", "16,32,64"),
        TextVariant("b8", FINE),
        TextVariant("b32", "32,64"),
        TextVariant("b64", "64"),
        TextVariant("b128", "128"),
        TextVariant("b16pb", "16,32,64", pad_batch=True),
        TextVariant("fbase", form="fused"),
        TextVariant("fb16", "16,32,64", form="fused"),
        TextVariant("fb8", FINE, form="fused"),
        TextVariant("fb32", "32,64", form="fused"),
        TextVariant("fb16pb", "16,32,64", pad_batch=True, form="fused"),
        TextVariant("rbase", ragged=True),
        TextVariant("rb16", "16,32,64", ragged=True),
        TextVariant("rb8", FINE, ragged=True),
        TextVariant("rbased0", ragged=True, encoder_delay_us=0),
        TextVariant("rb8d0", FINE, ragged=True, encoder_delay_us=0),
    )
}
DEFAULT_VARIANTS = ("base", "b8", "rbase", "rb8", "rb16")


def variant_specs(variant: TextVariant) -> list[ModelSpec | EnsembleSpec]:
    """The variant's tokenizer step and its pipeline (the pool and encoder are shared)."""
    base_tokenizer = by_name(text_pipeline.TOKENIZER)
    parameters = {
        k: v for k, v in base_tokenizer.parameters.items() if k not in ("length_buckets", "pad_batch")
    }
    if variant.buckets:
        parameters["length_buckets"] = variant.buckets
    parameters["pad_batch"] = "true" if variant.pad_batch else "false"
    tokenizer = dataclasses.replace(
        base_tokenizer, name=f"{variant.pipeline}_tokenizer", parameters=parameters
    )
    pipeline = text_pipeline.TEXT_EMBEDDER
    renamed = {text_pipeline.TOKENIZER: tokenizer.name, ENCODER: variant.encoder}
    steps = tuple(
        EnsembleStep(renamed.get(s.model, s.model), inputs=s.inputs, outputs=s.outputs)
        for s in pipeline.steps
    )
    embedder = dataclasses.replace(pipeline, name=variant.pipeline, steps=steps, form=variant.form)
    return [tokenizer, embedder]


def make_repository(root: Path, variants: Sequence[TextVariant]) -> Path:
    """A repository of the shared encoder and pool, and every variant's tokenizer and pipeline."""
    encoder = by_name(ENCODER)
    fp32_only = dataclasses.replace(encoder.build, variants=(Variant("fp32"),))
    encoder = dataclasses.replace(encoder, build=fp32_only)
    specs: list[Any] = [encoder, by_name(text_pipeline.POOL)]
    copies = {v.encoder: v for v in variants if v.encoder != ENCODER}
    specs.extend(encoder_spec(encoder, variant) for variant in copies.values())
    for variant in variants:
        specs.extend(variant_specs(variant))
    generate(specs, root, backends=paths.available_backends())
    built = paths.model_repository() / ENCODER / "1"
    for name in {ENCODER, *copies}:
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        for path in built.iterdir():
            if path.is_file():
                (root / name / "1" / path.name).symlink_to(path.resolve())
    return root


def nearest_to_mean(texts: Sequence[str], lengths: Sequence[int]) -> str:
    """The text whose token count is nearest the mean of `lengths`."""
    mean = float(np.mean(lengths))
    return texts[int(np.argmin([abs(n - mean) for n in lengths]))]


def request_of(text: str) -> dict[str, np.ndarray]:
    return {tensors.TEXT: np.array([[text.encode("utf-8")]], dtype=object)}


def check_answers(server: TritonServer, variants: Sequence[TextVariant], texts: Sequence[str]) -> float:
    """Every variant's embedding of every text against the unpadded in-process one; returns the
    largest difference seen.

    Raises:
        AssertionError: a difference over MAX_ABS_DIFF.
    """
    import tritonclient.grpc as grpcclient

    from kiln.models.text_encoder.reference import OrtTextEmbedder

    reference = OrtTextEmbedder(intra_op_threads=1, inter_op_threads=1, batch_size=1).embed(texts)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    worst = 0.0
    try:
        for variant in variants:
            for text, want in zip(texts, reference, strict=True):
                item = grpcclient.InferInput(tensors.TEXT, [1, 1], "BYTES")
                item.set_data_from_numpy(request_of(text)[tensors.TEXT])
                got = client.infer(variant.pipeline, [item]).as_numpy(tensors.EMBEDDING)[0]
                diff = float(np.abs(got - want).max())
                assert diff <= MAX_ABS_DIFF, f"{variant.name}: {text[:40]!r} differs by {diff:.2e}"
                worst = max(worst, diff)
    finally:
        client.close()
    return worst


def model_step_batch(result: perf.PerfResult, variant: TextVariant) -> float | None:
    """The model step's average batch: text_encoder's in an ensemble, the fused model's own."""
    if variant.form == "fused":
        return result.server.average_batch if result.server else None
    for step in result.composing:
        if step.model == variant.encoder:
            return step.average_batch
    return None


@contextmanager
def serving(variants: Sequence[TextVariant]) -> Iterator[TritonServer]:
    with tempfile.TemporaryDirectory(prefix="kiln-text-lengths-") as folder:
        repository = make_repository(Path(folder) / "repository", variants)
        with TritonServer(
            repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT,
            log_file=Path(folder) / "tritonserver.log",
        ) as server:
            yield server


def measure(args: argparse.Namespace, variants: Sequence[TextVariant]) -> dict[str, Any]:
    """Checks every answer, then the cells: repeats x variants x mixes, interleaved."""
    from kiln.models.text_encoder import loadtest
    from kiln.models.text_encoder.reference import build_tokenizer, prepared_encoder

    texts = loadtest.texts()
    encode = prepared_encoder(build_tokenizer(), by_name(ENCODER).build.source.max_length)
    lengths = [int(encode([t])[1].sum()) for t in texts]
    single = nearest_to_mean(texts, lengths)
    cells: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiln-text-inputs-") as folder, serving(variants) as server:
        worst = check_answers(server, variants, texts)
        inputs = {
            "mixed": perf.input_file([request_of(t) for t in texts], Path(folder) / "mixed.json"),
            "single": perf.input_file([request_of(single)], Path(folder) / "single.json"),
        }
        for repeat in range(args.repeats):
            for variant in variants:
                for mix, path in inputs.items():
                    result = perf.run(
                        variant.pipeline, server.grpc_url, path, concurrency=args.concurrency,
                        measurement_ms=args.window_ms, max_trials=args.max_trials,
                    )
                    cell = {
                        "throughput": result.throughput, "p50_ms": result.p50_ms,
                        "p99_ms": result.p99_ms, "model_batch": model_step_batch(result, variant),
                        "error": result.error,
                    }
                    cells.setdefault(f"{variant.name}/{mix}", []).append(cell)
                    print(f"repeat {repeat + 1} {variant.name:7s} {mix:6s} {json.dumps(cell)}", flush=True)
    return {
        "lengths": dict(zip(texts, lengths, strict=True)), "single": single,
        "single_length": lengths[texts.index(single)], "max_abs_diff": worst, "cells": cells,
    }


def _median(cells: Sequence[dict[str, Any]], key: str) -> float | None:
    values = [c[key] for c in cells if c.get(key) is not None]
    return statistics.median(values) if values else None


def report(results: dict[str, Any], variants: Sequence[TextVariant], concurrency: int) -> str:
    """A markdown table: medians per variant, mixed / single of the same variant and of `base`."""
    cells = results["cells"]
    base_single = _median(cells.get("base/single", []), "throughput")
    lines = [
        f"concurrency {concurrency}; single = {results['single'][:40]!r} "
        f"({results['single_length']} tokens); largest difference to the unpadded reference "
        f"{results['max_abs_diff']:.1e}",
        "",
        "| variant | buckets | pad_batch | form | mixed req/s | single req/s | mixed/single | "
        "mixed/base single | mixed p50 / p99 ms | model batch mixed | model batch single |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for v in variants:
        mixed, single = cells.get(f"{v.name}/mixed", []), cells.get(f"{v.name}/single", [])
        m, s = _median(mixed, "throughput"), _median(single, "throughput")
        ratio = f"{m / s:.2f}" if m and s else "-"
        vs_base = f"{m / base_single:.2f}" if m and base_single else "-"
        p50, p99 = _median(mixed, "p50_ms"), _median(mixed, "p99_ms")
        bm, bs = _median(mixed, "model_batch"), _median(single, "model_batch")
        form = v.form + (" ragged" if v.ragged else "") + (
            f" delay {v.encoder_delay_us} us" if v.encoder_delay_us is not None else ""
        )
        lines.append(
            f"| {v.name} | {v.buckets or '-'} | {v.pad_batch} | {form} | {m or 0:.0f} | {s or 0:.0f} | "
            f"{ratio} | {vs_base} | {p50 or 0:.1f} / {p99 or 0:.1f} | {bm or 0:.2f} | {bs or 0:.2f} |"
        )
    return "\n".join(lines)


def inprocess_costs(repeats: int = 3) -> dict[str, list[float]]:
    """ONNX Runtime's time per text in process (the served model, 1 thread as served), for the
    mix under each way of padding and for the single text: what padding costs apart from Triton.
    Returns each case's milliseconds per text, one figure per repeat (each the median of 5 passes)."""
    import onnxruntime as ort

    from kiln.models.text_encoder import loadtest
    from kiln.models.text_encoder.reference import build_tokenizer, prepared_encoder
    from kiln.serving.text import bucket_of

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    path = paths.model_repository() / ENCODER / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    encode = prepared_encoder(build_tokenizer(), by_name(ENCODER).build.source.max_length)
    texts = loadtest.texts()
    single = nearest_to_mean(texts, [int(encode([t])[1].sum()) for t in texts])

    def calls(chosen: Sequence[str], buckets: Sequence[int] | None, together: bool) -> list[tuple]:
        groups: dict[Any, list[tuple[np.ndarray, np.ndarray]]] = {}
        for index, text in enumerate(chosen):
            ids, mask = encode([text])
            width = bucket_of(ids.shape[1], buckets or ())
            extra = ((0, 0), (0, width - ids.shape[1]))
            padded = (np.pad(ids, extra), np.pad(mask, extra))
            groups.setdefault(width if together else index, []).append(padded)
        return [tuple(np.concatenate(part) for part in zip(*g, strict=True)) for g in groups.values()]

    cases = {
        "mix, each alone unpadded": calls(texts, None, False),
        f"mix, buckets {FINE}, one call per bucket": calls(texts, [*map(int, FINE.split(",")), 128], True),
        "mix, buckets 16,32,64, one call per bucket": calls(texts, (16, 32, 64, 128), True),
        "mix, all padded to 128, one call": calls(texts, (128,), True),
        "single, each alone": calls([single] * len(texts), None, False),
        "single, one call": calls([single] * len(texts), None, True),
        "single padded to 48, one call": calls([single] * len(texts), (48,), True),
        "single padded to 64, one call": calls([single] * len(texts), (64,), True),
    }

    def per_text_ms(feeds: list[tuple]) -> float:
        passes = []
        for _ in range(5):
            start = time.perf_counter()
            for ids, mask in feeds:
                session.run(None, {tensors.TEXT_INPUT_IDS: ids, tensors.TEXT_ATTENTION_MASK: mask})
            passes.append(time.perf_counter() - start)
        return statistics.median(passes) / len(texts) * 1e3

    for feeds in cases.values():
        per_text_ms(feeds)  # warm-up
    return {name: [per_text_ms(feeds) for _ in range(repeats)] for name, feeds in cases.items()}


def merged(files: Sequence[Path]) -> dict[str, Any]:
    """The results of several runs (`--json`) as one: each cell's repeats joined."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    results = dict(runs[0], cells={}, max_abs_diff=max(r["max_abs_diff"] for r in runs))
    for run in runs:
        for key, repeats in run["cells"].items():
            results["cells"].setdefault(key, []).extend(repeats)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--window-ms", type=int, default=2000)
    parser.add_argument("--max-trials", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every repeat of every cell here")
    parser.add_argument(
        "--inprocess", action="store_true", help="only ONNX Runtime's time per text in process, per padding"
    )
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="only report: the cells of these --json files together"
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if "base" not in names:
        names.insert(0, "base")  # the yardstick of every ratio
    variants = [VARIANTS[n] for n in names]
    if args.inprocess:
        for case, figures in inprocess_costs(args.repeats).items():
            each = ", ".join(f"{f:.2f}" for f in figures)
            print(f"{case}: {statistics.median(figures):.2f} ms per text ({each})")
        return 0
    if args.merge:
        results = merged(args.merge)
        measured = [v for v in variants if f"{v.name}/mixed" in results["cells"]]
        print(report(results, measured, args.concurrency))
        return 0
    results = measure(args, variants)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(report(results, variants, args.concurrency))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
