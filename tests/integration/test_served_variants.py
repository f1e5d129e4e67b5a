"""Every served variant, queried through tritonserver, reproduces the metric its build recorded.

For each model of the spec, the held-out inputs go over gRPC to each served variant; the outputs
are scored with the model's own metric against the FP32 reference (the PyTorch model where its
stage can load it, else the FP32 ONNX the build checked against it) and compared with the
ONNX Runtime metric in the build manifest. This ties the accuracy table to what is actually served.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from kiln import paths, registry
from kiln.build import check
from kiln.build.pipeline import held_out_of, reference_runner
from kiln.server import TritonServer
from kiln.spec import ModelSpec

SPECS = registry.specs()

BUILT = [spec for spec in SPECS if spec.build is not None]
FLOAT_SLACK = 1e-9
"""Rounding in a metric's own arithmetic (a cosine of identical vectors is 1 - 1e-14)."""


@pytest.fixture(scope="module")
def client(server: TritonServer) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def served_outputs(
    client: grpcclient.InferenceServerClient, model: str, spec: ModelSpec, inputs: tuple
) -> list[np.ndarray]:
    """The outputs of served `model` on `inputs`, sent in requests of max_batch_size items."""
    step = spec.max_batch_size
    chunks: list[list[np.ndarray]] = [[] for _ in spec.outputs]
    for start in range(0, len(inputs[0]), step):
        request = []
        for tensor, array in zip(spec.inputs, inputs, strict=True):
            part = np.ascontiguousarray(array[start : start + step])
            item = grpcclient.InferInput(tensor.name, list(part.shape), np_to_triton_dtype(part.dtype))
            item.set_data_from_numpy(part)
            request.append(item)
        result = client.infer(model, request)
        for i, tensor in enumerate(spec.outputs):
            chunks[i].append(result.as_numpy(tensor.name))
    return [np.concatenate(parts) for parts in chunks]


@pytest.mark.parametrize("spec", BUILT, ids=[s.name for s in BUILT])
def test_each_served_variant_reproduces_its_build_metric(client, spec: ModelSpec) -> None:
    manifest = json.loads((paths.artifacts_dir() / spec.name / "manifest.json").read_text())
    held = held_out_of(spec)
    _, reference_run = reference_runner(spec)
    reference_by_name = check.run_batched(reference_run, spec, held.inputs)
    reference = [reference_by_name[t.name] for t in spec.outputs]
    # Dynamic batching may group items differently from the build: allow one held-out item's worth.
    allowed = max(1e-4, 1.0 / held.size)

    served_variants = [v for v in manifest["variants"].values() if v["serve"]]
    refused = manifest.get("refused") or {}  # optional variants the build refused: not served
    assert [v["precision"] for v in served_variants] == [
        v.precision for v in spec.build.variants if v.serve and v.precision not in refused
    ]
    for variant in served_variants:
        outputs = served_outputs(client, variant["served_as"], spec, held.inputs)
        for tensor, array in zip(spec.outputs, outputs, strict=True):
            assert array.shape[0] == held.size, (variant["served_as"], tensor.name, array.shape)
            assert np.isfinite(array).all(), f"{variant['served_as']}: non-finite {tensor.name}"
        metric = held.score(outputs, reference)
        built = variant["metrics"][held.metric]["onnxruntime"]
        assert abs(metric - built) <= allowed, (
            f"{variant['served_as']}: served {held.metric} {metric:.6f}, build recorded {built:.6f}"
        )
        floor = variant["metrics"][held.metric]["reference"] - variant["max_metric_drop"]
        assert metric >= floor - FLOAT_SLACK, f"{variant['served_as']}: {metric} below {floor}"
