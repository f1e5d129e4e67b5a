"""`kiln serve --demo`: real predictions from the served digits model (and the curl for it), then one
request to each pipeline through the client SDK."""

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

    from kiln.models.digits.build import load_split
    from kiln.registry import by_name

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


def pipelines_demo(server: TritonServer, out: TextIO = sys.stdout) -> None:
    """The digits model, then one request to each pipeline through the client SDK (`kiln.clients`),
    each skipped with a line when this repository does not serve it ready."""
    digits_demo(server, out)
    ready = {name for name, state in server.models().items() if state == "READY"}
    url = f"grpc://{server.grpc_url}"
    demos = (
        (tensors.DIGITS_READER, _digits_reader_demo),
        (tensors.IMAGE_CLASSIFIER, _image_classifier_demo),
        (tensors.TEXT_EMBEDDER, _text_embedder_demo),
        (tensors.FRAUD_SCORER, _fraud_scorer_demo),
        (tensors.TEXT_GENERATOR, _text_generator_demo),
    )
    for name, demo in demos:
        if name not in ready:
            print(f"demo: {name}: skipped: this repository serves no ready model {name!r}", file=out)
            continue
        demo(url, out)


def _digits_reader_demo(url: str, out: TextIO) -> None:
    from kiln.clients import DigitsReader
    from kiln.models.digits.build import load_split
    from kiln.registry import by_name

    split = load_split(by_name("digits").build.source)
    # The 8x8 test digits as the grey images a scanner would send (0..16 -> 0..255).
    images = [np.rint(x[0] * 255).astype(np.uint8) for x in split.x_test[:DEMO_IMAGES]]
    with DigitsReader(url) as reader:
        results = reader.classify_batch(images)
    shown = ", ".join(
        f"{int(t)} -> {r.label} (p={r.score:.3f})" for t, r in zip(split.y_test, results, strict=False)
    )
    print(f"demo: {tensors.DIGITS_READER} (PNG files via kiln.clients, gRPC): {shown}", file=out)


def _image_classifier_demo(url: str, out: TextIO) -> None:
    import skimage.data

    from kiln.clients import ImageClassifier

    with ImageClassifier(url) as classifier:
        result = classifier.classify(skimage.data.coffee())
    pairs = zip(result.labels, result.scores, strict=True)
    top = ", ".join(f"{label} {score:.3f}" for label, score in pairs)
    print(
        f"demo: {tensors.IMAGE_CLASSIFIER} (scikit-image's coffee photograph; seeded weights, so "
        f"the classes mean nothing): top-5 {top} in {result.latency_s * 1e3:.0f} ms",
        file=out,
    )


def _text_embedder_demo(url: str, out: TextIO) -> None:
    from kiln.clients import TextEmbedder

    texts = ["Return the sum of the values.", "Add up all the numbers."]
    with TextEmbedder(url) as embedder:
        vectors = embedder.embed(texts).vectors
    print(
        f"demo: {tensors.TEXT_EMBEDDER}: {len(texts)} texts -> {vectors.shape[0]} x {vectors.shape[1]} "
        f"embeddings, cosine {float(vectors[0] @ vectors[1]):.3f}",
        file=out,
    )


def _fraud_scorer_demo(url: str, out: TextIO) -> None:
    from kiln.clients import FraudScorer
    from kiln.models.fraud.reference import labels, records

    # Held-out transactions 80-82 of the synthetic set (81 is a fraud).
    items = list(records(83))[80:]
    truth = labels(83)[80:]
    with FraudScorer(url) as scorer:
        scores = scorer.score_batch(items)
    shown = ", ".join(
        f"{'fraud' if t else 'legit'} -> {s.score:.3f} {'FLAG' if s.decision else 'pass'}"
        for t, s in zip(truth, scores, strict=True)
    )
    print(f"demo: {tensors.FRAUD_SCORER} (held-out records): {shown}", file=out)


def _text_generator_demo(url: str, out: TextIO) -> None:
    from kiln.clients import TextGenerator

    prompt = "The return value of"
    print(f"demo: {tensors.TEXT_GENERATOR} (streamed over gRPC, greedy): {prompt!r} ->", end="", file=out)
    with TextGenerator(url) as generator, generator.stream(prompt, max_tokens=32, temperature=0.0) as stream:
        last = None
        for delta in stream:
            print(delta.text.replace("\n", " "), end="", flush=True, file=out)
            last = delta
    if last is not None:
        print(
            f"\n  ({last.finish_reason}, {last.completion_tokens} tokens; the model is tiny and "
            "trained for a minute on Python's docs: expect docs-flavoured babble)",
            file=out,
        )
