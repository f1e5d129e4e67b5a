"""`kiln serve --demo`: one real prediction from the served digits model, and the curl for it."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import numpy as np

from kiln import tensors
from kiln.server import TritonServer

DEMO_IMAGES = 3
"""How many held-out test digits the demo classifies."""


def curl_command(http_url: str, model: str, name: str, pixels: np.ndarray) -> str:
    """A curl line sending `pixels` to `model` over Triton's KServe v2 HTTP/JSON protocol."""
    body = {
        "inputs": [
            {
                "name": name,
                "shape": list(pixels.shape),
                "datatype": "FP32",
                "data": [round(float(v), 4) for v in pixels.ravel()],
            }
        ]
    }
    return f"curl -s http://{http_url}/v2/models/{model}/infer -d '{json.dumps(body)}'"


def digits_demo(server: TritonServer, out: TextIO = sys.stdout) -> None:
    """Classifies a few held-out digits through the running server and prints the results."""
    import tritonclient.http as httpclient

    from kiln.build.digits import load_split
    from kiln.build.specs import by_name

    spec = by_name("digits")
    if server.models().get(spec.name) != "READY":
        print(f"demo: skipped: this repository serves no ready model {spec.name!r}", file=out)
        return
    split = load_split(spec.build.source)
    images = split.x_test[:DEMO_IMAGES]
    with httpclient.InferenceServerClient(server.http_url) as client:
        request = httpclient.InferInput(tensors.DIGITS_PIXELS, list(images.shape), "FP32")
        request.set_data_from_numpy(images)
        logits = client.infer(spec.name, [request]).as_numpy(tensors.DIGITS_LOGITS)
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    print(f"demo: {spec.name} on {DEMO_IMAGES} held-out test digits over HTTP:", file=out)
    truths = split.y_test[:DEMO_IMAGES]
    for i, (truth, probs) in enumerate(zip(truths, probabilities, strict=True)):
        guess = int(probs.argmax())
        print(
            f"  test image {i}: label {int(truth)} -> predicted {guess} "
            f"(p={probs[guess]:.3f}) {'ok' if guess == truth else 'WRONG'}",
            file=out,
        )
    print("demo: the same request for one image with curl:", file=out)
    print("  " + curl_command(server.http_url, spec.name, tensors.DIGITS_PIXELS, images[:1]), file=out)
