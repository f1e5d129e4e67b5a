"""text_embedder end to end on a real tritonserver, over HTTP and gRPC.

Real texts (short, longer than max_length tokens, accented, CJK and emoji, punctuation, real
docstring prose) go through the ensemble (kiln_text -> text_encoder -> kiln_pool); each embedding
must match the in-process PyTorch reference (`kiln.models.text_encoder.reference`) with cosine >= 0.999.
An empty text, invalid UTF-8 and a text over max_text_bytes, each sent at the same time as good
requests on a server whose tokenizer waits to batch exactly that many requests, must fail alone
with their own message while the good requests in the same dynamic batch succeed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import paths, tensors
from kiln.models.text_encoder import pipeline as pipelines
from kiln.models.text_encoder.build import evaluation_texts
from kiln.models.text_encoder.reference import OrtTextEmbedder, TorchTextEmbedder
from kiln.registry import by_name
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.spec import DynamicBatching, Variant

PIPELINE = tensors.TEXT_EMBEDDER
EMBEDDER = by_name(PIPELINE)
ENCODER = by_name("text_encoder")
TOKENIZER = by_name(pipelines.TOKENIZER)
MAX_LENGTH = ENCODER.build.source.max_length
MAX_TEXT_BYTES = int(TOKENIZER.parameters["max_text_bytes"])
HIDDEN = EMBEDDER.outputs[0].dims[0]
MIN_COSINE = 0.999
PROTOCOLS = ("http", "grpc")

_PROSE = evaluation_texts(ENCODER.build.source)
TEXTS = (
    "Return the sum of the values.",
    "Hi!",
    " ".join(_PROSE[:8]),  # real prose far beyond max_length tokens: truncated
    "Crème brûlée à Zürich — naïve café, Ångström units; 東京 and 😀 emoji.",
    "Wait... what?! (Really) [yes] {no} <maybe> -- 'quoted' \"double\" #1 @home 100% $5 & co.",
    "  tabs\tand\nnewlines   inside  ",
    *_PROSE[8:12],
)
LONG = TEXTS[2]


def make_client(server: TritonServer, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url)
    return grpcclient.InferenceServerClient(server.grpc_url)


def embed(client, texts: Sequence[str | bytes]) -> np.ndarray:
    """Sends `texts` as one request of len(texts) items; returns the embeddings."""
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    items = np.array([t.encode() if isinstance(t, str) else t for t in texts], dtype=object).reshape(-1, 1)
    text = module.InferInput(tensors.TEXT, list(items.shape), "BYTES")
    text.set_data_from_numpy(items)
    result = client.infer(PIPELINE, [text], outputs=[module.InferRequestedOutput(tensors.EMBEDDING)])
    return result.as_numpy(tensors.EMBEDDING)


def embed_concurrently(server: TritonServer, protocol: str, requests: Sequence[Sequence[str | bytes]]) -> list:
    """Sends each list of texts as its own request, all at once, one client per sender (the HTTP
    client is gevent-based). Errors are returned, not raised."""

    def send(texts: Sequence[str | bytes]):
        client = make_client(server, protocol)
        try:
            return embed(client, texts)
        except InferenceServerException as error:
            return error
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        return list(pool.map(send, requests))


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def assert_matches(served: np.ndarray, texts: Sequence[str], reference: dict[str, np.ndarray]) -> None:
    assert served.dtype == np.float32 and served.shape == (len(texts), HIDDEN)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, rtol=1e-5)
    cosines = cosine(served, np.stack([reference[t] for t in texts]))
    assert (cosines >= MIN_COSINE).all(), dict(zip(texts, cosines.round(6), strict=True))


@pytest.fixture(scope="module")
def reference() -> dict[str, np.ndarray]:
    """Each text's PyTorch reference embedding (its own tokenizer, encoder and pooling)."""
    model = TorchTextEmbedder()
    ids, _ = model.encode([LONG])
    assert ids.shape[1] == MAX_LENGTH, "the long text must be cut at max_length tokens"
    texts = [*TEXTS, "ok", "fine", "good"]
    return dict(zip(texts, model.embed(texts), strict=True))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_each_text_sent_alone_matches_the_pytorch_reference(server: TritonServer, protocol: str, reference) -> None:
    results = embed_concurrently(server, protocol, [[t] for t in TEXTS])
    for text, result in zip(TEXTS, results, strict=True):
        assert isinstance(result, np.ndarray), result
        assert_matches(result, [text], reference)
    # Unrelated texts get different embeddings (the check above would pass a constant otherwise).
    stacked = np.concatenate(results)
    assert cosine(stacked[0], stacked[1]) < 0.9 and cosine(stacked[0], stacked[3]) < 0.9


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_request_carrying_a_batch_of_texts(server: TritonServer, protocol: str, reference) -> None:
    client = make_client(server, protocol)
    try:
        assert_matches(embed(client, TEXTS), TEXTS, reference)
        full = [TEXTS[i % len(TEXTS)] for i in range(EMBEDDER.max_batch_size)]
        assert_matches(embed(client, full), full, reference)
        with pytest.raises(InferenceServerException, match=f"batch-size must be <= {EMBEDDER.max_batch_size}"):
            embed(client, [*full, "one too many"])
        with pytest.raises(InferenceServerException) as caught:
            embed(client, ["fine", "ok", ""])  # one bad item fails its request, naming the item
        assert "input 'text' item 2 is an empty text" in caught.value.message()
    finally:
        client.close()


def test_json_body_with_strings_as_curl_sends_it(server: TritonServer, reference) -> None:
    body = {"inputs": [{"name": tensors.TEXT, "datatype": "BYTES", "shape": [2, 1], "data": list(TEXTS[:2])}]}
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{PIPELINE}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (tensors.EMBEDDING, "FP32", [2, HIDDEN])
    assert_matches(np.array(output["data"], dtype=np.float32).reshape(2, HIDDEN), TEXTS[:2], reference)


# -- bad texts inside a shared dynamic batch ---------------------------------------------------------

BATCH = 4
"""Requests the slow-batching tokenizer waits for: 3 good, 1 bad."""


@pytest.fixture(scope="module")
def slow_batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """text_embedder in the ensemble form with a tokenizer that waits up to 2 s to batch exactly
    BATCH requests, so concurrent requests are sure to share one execute() of that step (the
    fused form's shared batches: test_text_batching.py)."""
    repository = tmp_path_factory.mktemp("text_slow_batching")
    tokenizer = dataclasses.replace(
        TOKENIZER, dynamic_batching=DynamicBatching(preferred_batch_sizes=(BATCH,), max_queue_delay_us=2_000_000)
    )
    encoder = dataclasses.replace(ENCODER, build=dataclasses.replace(ENCODER.build, variants=(Variant("fp32"),)))
    embedder = dataclasses.replace(EMBEDDER, form="ensemble")
    generate([encoder, tokenizer, by_name(pipelines.POOL), embedder], repository, backends=paths.available_backends())
    shutil.copytree(paths.model_repository() / ENCODER.name / "1", repository / ENCODER.name / "1", dirs_exist_ok=True)
    with TritonServer(repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT) as server:
        yield server


def _failures(server: TritonServer, reason: str) -> float:
    """The tokenizer step's kiln_step_failures_total for `reason` (0 before the first failure)."""
    return server.metric("kiln_step_failures_total", model=TOKENIZER.name, reason=reason)


def _stats(server: TritonServer) -> tuple[int, int]:
    """(executions, inferences) of the tokenizer step so far."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{TOKENIZER.name}/stats", timeout=10) as r:
        model = json.load(r)["model_stats"][0]
    return int(model["execution_count"]), int(model["inference_count"])


BAD_TEXTS = {
    "empty": (b"", "input 'text' item 0 is an empty text", "empty_text"),
    "invalid-utf8": (b"caf\xc3\xa9 \xff\xfe latte", "input 'text' item 0 is not valid UTF-8: invalid start byte at "
                     "byte 6 (0xff) of 14", "invalid_utf8"),
    "over-max-text-bytes": (b"word " * (MAX_TEXT_BYTES // 5 + 1), f"input 'text' item 0 is too long: "
                            f"{5 * (MAX_TEXT_BYTES // 5 + 1)} bytes of UTF-8, over the limit of {MAX_TEXT_BYTES} "
                            "bytes (parameter max_text_bytes)", "text_too_long"),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_TEXTS))
def test_a_bad_text_in_a_dynamic_batch_fails_alone(
    slow_batching_server: TritonServer, reference, protocol: str, case: str
) -> None:
    bad, message, reason = BAD_TEXTS[case]
    goods = ["ok", TEXTS[0], LONG]  # different lengths: the pool sees different seq in one batch too
    before = _stats(slow_batching_server)
    failures = _failures(slow_batching_server, reason)

    results = embed_concurrently(slow_batching_server, protocol, [[goods[0]], [bad], [goods[1]], [goods[2]]])

    assert _stats(slow_batching_server) == (before[0] + 1, before[1] + BATCH), "the requests did not share a batch"
    error = results[1]
    assert isinstance(error, InferenceServerException), error
    assert f"in ensemble '{PIPELINE}', {message}" in error.message()
    assert "INVALID_ARG" in str(error.status()) or error.status() == "400"
    for text, result in zip(goods, (results[0], results[2], results[3]), strict=True):
        assert isinstance(result, np.ndarray), result
        assert_matches(result, [text], reference)
    assert _failures(slow_batching_server, reason) == failures + 1  # the operator sees why it failed


def test_the_in_process_onnx_runtime_baseline_matches_the_reference(reference) -> None:
    # The benchmark's no-Triton baseline must compute the same embeddings as the yardstick.
    baseline = OrtTextEmbedder(intra_op_threads=1, inter_op_threads=1, batch_size=4)
    assert_matches(baseline.embed(TEXTS), TEXTS, reference)
