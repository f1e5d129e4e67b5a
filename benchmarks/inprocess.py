"""The in-process reference pipeline at full speed: what an image pipeline costs without Triton.

`kiln.build.reference.image.OrtImageClassifier` with `preprocessing="served"` runs, in this one
Python process, exactly the served steps: kiln_image's own decode and preprocessing code, the
served ONNX file on an ONNX Runtime session with the served model's thread settings, and the
softmax and top-k postprocess, in batches of the pipeline's max_batch_size. Target 1 of the
benchmark compares the served pipeline's saturated throughput with this.

The first pass over the mix is checked against the reference answers (`loadtests.checks`); the
measured window then only computes.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np

from benchmarks.loadgen import CpuProbe, Run
from kiln import tensors
from loadtests import checks
from loadtests.inputs import Corpus

CUDA_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def classifier(model: str, device: str = "cpu") -> Any:
    """The in-process pipeline of `model` (its session on CUDA for device "gpu")."""
    from kiln.build.reference.image import OrtImageClassifier

    pipeline = OrtImageClassifier(model, preprocessing="served")
    if device == "gpu":
        import onnxruntime as ort

        path = pipeline.session._model_path  # noqa: SLF001 - the same file, another provider
        pipeline.session = ort.InferenceSession(
            path, pipeline.session.get_session_options(), providers=CUDA_PROVIDERS
        )
    return pipeline


def _check(pipeline: Any, corpus: Corpus, checker: checks.Checker) -> None:
    files = [item.inputs[tensors.IMAGE][0, 0] for item in corpus.items]
    answers = pipeline.classify(files)
    for row, item in enumerate(corpus.items):
        labels = np.empty((1, len(answers.labels[row])), dtype=object)
        labels[0, :] = [label.encode("utf-8") for label in answers.labels[row]]
        outputs = {
            tensors.LABELS: labels,
            tensors.SCORES: answers.scores[row : row + 1],
            tensors.CLASS_INDICES: answers.indices[row : row + 1],
        }
        checker.check(item, outputs)


def measure(
    pipeline: Any, corpus: Corpus, checker: checks.Checker, duration_s: float, warmup_s: float
) -> Run:
    """Images per second of `pipeline` over the mix, in batches of its max_batch_size.

    Latency figures are per batch (there are no requests in-process).
    """
    _check(pipeline, corpus, checker)
    files = [item.inputs[tensors.IMAGE][0, 0] for item in corpus.items]
    batch = pipeline.pipeline.max_batch_size
    stream = itertools.cycle(files)
    start = time.perf_counter()
    while time.perf_counter() - start < warmup_s:
        pipeline.classify([next(stream) for _ in range(batch)])
    probe = CpuProbe()
    probe.start()
    begin = time.perf_counter()
    images, latencies = 0, []
    while time.perf_counter() - begin < duration_s:
        chunk = [next(stream) for _ in range(batch)]
        t = time.perf_counter()
        pipeline.classify(chunk)
        latencies.append((time.perf_counter() - t) * 1000)
        images += len(chunk)
    window = time.perf_counter() - begin
    own, _ = probe.stop(window)
    lat = np.asarray(latencies)
    return Run(
        throughput=images / window,
        requests=images,
        failures=0,
        p50_ms=float(np.percentile(lat, 50, method="higher")),
        p95_ms=float(np.percentile(lat, 95, method="higher")),
        p99_ms=float(np.percentile(lat, 99, method="higher")),
        mean_ms=float(lat.mean()),
        window_s=window,
        generator_cpu=None,
        server_cpu=own,
    )
