"""A request mix encoded once for Triton's HTTP and gRPC APIs, so generators only send bytes.

Encoding happens before any measurement: the HTTP body of every item (KServe v2 JSON header plus
the binary tensor extension for BYTES inputs that are files, such as images; JSON for texts and
records; outputs requested in binary) and the gRPC `InferInput`s of every item. Both the locust
suites and the benchmark's generator use it; it imports neither locust nor gevent's monkey
patching.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import np_to_triton_dtype

from kiln import tensors
from loadtests.inputs import Corpus

BINARY_INPUTS = (tensors.IMAGE,)
"""Inputs sent as binary tensors over HTTP (files are not text); the rest go as JSON."""
HEADER_LENGTH = "Inference-Header-Content-Length"
"""Triton's HTTP header giving the JSON part's length when binary tensors follow it."""


@dataclass
class EncodedMix:
    """Every item of a mix, ready to send.

    Attributes:
        model: The served model the requests are for.
        output_names: The outputs requested (the model's contract).
        http_bodies: Per item: (body, length of its JSON header).
        grpc_inputs: Per item: its `tritonclient.grpc.InferInput`s.
        grpc_outputs: The requested outputs for gRPC.
    """

    model: str
    output_names: tuple[str, ...]
    http_bodies: list[tuple[bytes, int]]
    grpc_inputs: list[list[grpcclient.InferInput]]
    grpc_outputs: list[grpcclient.InferRequestedOutput]

    @property
    def http_path(self) -> str:
        """The inference path of Triton's HTTP API."""
        return f"/v2/models/{self.model}/infer"

    def http_headers(self, index: int) -> dict[str, str]:
        """The headers of item `index`'s HTTP request."""
        return {HEADER_LENGTH: str(self.http_bodies[index][1]), "Content-Type": "application/octet-stream"}


def encode(corpus: Corpus, output_names: Sequence[str], model: str | None = None) -> EncodedMix:
    """Encodes every item of `corpus` for `model` (default: the corpus's model)."""
    http_outputs = [httpclient.InferRequestedOutput(n, binary_data=True) for n in output_names]
    bodies: list[tuple[bytes, int]] = []
    grpc_inputs: list[list[grpcclient.InferInput]] = []
    for item in corpus.items:
        http_in, grpc_in = [], []
        for name, array in item.inputs.items():
            dtype = np_to_triton_dtype(array.dtype)
            http_input = httpclient.InferInput(name, list(array.shape), dtype)
            http_input.set_data_from_numpy(array, binary_data=name in BINARY_INPUTS)
            http_in.append(http_input)
            grpc_input = grpcclient.InferInput(name, list(array.shape), dtype)
            grpc_input.set_data_from_numpy(array)
            grpc_in.append(grpc_input)
        body, json_size = httpclient.InferenceServerClient.generate_request_body(
            http_in, outputs=http_outputs
        )
        bodies.append((body, json_size if json_size is not None else len(body)))
        grpc_inputs.append(grpc_in)
    return EncodedMix(
        model=model or corpus.model,
        output_names=tuple(output_names),
        http_bodies=bodies,
        grpc_inputs=grpc_inputs,
        grpc_outputs=[grpcclient.InferRequestedOutput(n) for n in output_names],
    )


def parse_http(content: bytes, header_length: str | None, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The outputs `names` of a 200 response of Triton's HTTP inference API."""
    result = httpclient.InferResult.from_response_body(
        content, header_length=int(header_length) if header_length else None
    )
    return {name: result.as_numpy(name) for name in names}


def parse_grpc(result: Any, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The outputs `names` of a gRPC `InferResult`."""
    return {name: result.as_numpy(name) for name in names}


def http_error(content: bytes | None) -> str:
    """The error message of a failed HTTP inference (Triton's {"error": ...} body)."""
    import json

    if not content:
        return "(no body)"
    try:
        return str(json.loads(content).get("error", content[:300]))
    except (ValueError, AttributeError):
        return content[:300].decode("utf-8", "replace")
