"""Texts of different token lengths share a batch of text_encoder, on a real tritonserver, with
answers equal to the unpadded reference (issue 13).

kiln_text pads each request to its length bucket (`length_buckets` of the committed tokenizer
spec), so requests of different lengths in one bucket reach the encoder in one shape and Triton's
dynamic batcher puts them in one batch. One temporary repository (the built text_encoder linked
in) serves `text_embedder` as the committed ensemble, but with an encoder that waits up to 2 s to
batch exactly BATCH requests, and `text_embedder_fused`, the same pipeline in the fused form whose
one batcher waits the same way. BATCH requests of BATCH different token lengths, all in one
bucket, sent at once must run in one execution of the model step (Triton's statistics:
execution_count +1, inference_count +BATCH) in both forms, and every answer must equal the
unpadded in-process reference (each text alone, padded nowhere: `OrtTextEmbedder` with batch
size 1, the served ONNX model) within ATOL. In the fused form, the kiln_onnx step must also run
such a batch as one ONNX Runtime call (counted on the real session, loaded in process from the
test repository as kiln_fused loads it). `text_embedder_ragged` runs on a copy of text_encoder
with Triton's `allow_ragged_batch` on its inputs (its config edited here: the spec cannot express
the flag yet): requests of two different buckets must share one execution too, with the same
answers.
"""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from kiln import paths, tensors
from kiln.models.text_encoder import pipeline as pipelines
from kiln.models.text_encoder.build import evaluation_texts
from kiln.models.text_encoder.reference import OrtTextEmbedder, build_tokenizer, prepared_encoder
from kiln.registry import by_name
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.serving import fused as fused_module
from kiln.serving.adapter import LoadContext
from kiln.serving.params import config_parameters, parse_params
from kiln.serving.text import TEXT_PARAMS, TextParams, bucket_of, parse_buckets
from kiln.spec import DynamicBatching, Fused, Variant

ENSEMBLE = tensors.TEXT_EMBEDDER
FUSED = f"{ENSEMBLE}_fused"
RAGGED = f"{ENSEMBLE}_ragged"
ENCODER = by_name("text_encoder")
RAGGED_ENCODER = "text_encoder_ragged"
TOKENIZER = by_name(pipelines.TOKENIZER)
MAX_LENGTH = ENCODER.build.source.max_length
BATCH = 4
WAIT_US = 2_000_000
ATOL = 1e-5
"""Largest difference allowed per component of the L2-normalized embedding against the unpadded
reference: padded keys are masked out of attention (exp of a large negative is exactly 0) and out
of the pool, so only float summation order differs; measured here at most 6e-8
(`benchmarks/text_lengths.py`), the components themselves are about 0.06."""
PROTOCOLS = ("http", "grpc")


def buckets() -> tuple[int, ...]:
    """The committed tokenizer's buckets (the test holds for whatever `pipeline.py` chose)."""
    params = parse_params(TOKENIZER.name, dict(TOKENIZER.parameters), TEXT_PARAMS, TextParams)
    return parse_buckets(params.length_buckets, params.max_length)


def lengths_of(texts: Sequence[str]) -> list[int]:
    encode = prepared_encoder(build_tokenizer(), MAX_LENGTH)
    return [int(encode([t])[1].sum()) for t in texts]


def texts_in_two_buckets() -> list[str]:
    """BATCH texts of different lengths: half in the smallest bucket, half in the next one."""
    pool = list(dict.fromkeys(evaluation_texts(ENCODER.build.source)))
    by_bucket: dict[int, dict[int, str]] = {}
    for text, length in zip(pool, lengths_of(pool), strict=True):
        by_bucket.setdefault(bucket_of(length, buckets()), {}).setdefault(length, text)
    found = [list(by_bucket[b].values()) for b in sorted(by_bucket) if len(by_bucket[b]) >= BATCH // 2]
    assert len(found) >= 2, f"the evaluation texts fill fewer than two buckets of {buckets()}"
    return found[0][: BATCH // 2] + found[1][: BATCH - BATCH // 2]


def texts_in_one_bucket() -> list[str]:
    """BATCH texts of BATCH different token lengths that all pad to one bucket."""
    pool = list(dict.fromkeys(evaluation_texts(ENCODER.build.source)))
    by_bucket: dict[int, dict[int, str]] = {}
    for text, length in zip(pool, lengths_of(pool), strict=True):
        by_bucket.setdefault(bucket_of(length, buckets()), {}).setdefault(length, text)
    for _, found in sorted(by_bucket.items()):
        if len(found) >= BATCH:
            return [found[n] for n in sorted(found)[:: max(1, len(found) // BATCH)][:BATCH]]
    raise AssertionError(f"no bucket of {buckets()} holds {BATCH} texts of different lengths")


def specs() -> list[Any]:
    waiting = DynamicBatching(preferred_batch_sizes=(BATCH,), max_queue_delay_us=WAIT_US)
    encoder = dataclasses.replace(
        ENCODER,
        dynamic_batching=waiting,
        build=dataclasses.replace(ENCODER.build, variants=(Variant("fp32"),)),
    )
    embedder = by_name(ENSEMBLE)
    fused = dataclasses.replace(embedder, name=FUSED, form="fused", fused=Fused(waiting))
    ragged_steps = tuple(
        dataclasses.replace(s, model=RAGGED_ENCODER) if s.model == ENCODER.name else s for s in embedder.steps
    )
    ragged = dataclasses.replace(embedder, name=RAGGED, steps=ragged_steps)
    return [
        encoder, dataclasses.replace(encoder, name=RAGGED_ENCODER), TOKENIZER, by_name(pipelines.POOL),
        embedder, fused, ragged,
    ]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = paths.model_repository() / ENCODER.name / "1"
    if not (built / "model.onnx").is_file():
        pytest.fail(f"text_encoder is not built ({built} holds no model.onnx); run `make build-engines` first")
    root = tmp_path_factory.mktemp("text_batching")
    generate(specs(), root, backends=paths.available_backends())
    for name in (ENCODER.name, RAGGED_ENCODER):
        (root / name / "1").mkdir(exist_ok=True)
        for path in built.iterdir():
            if path.is_file():
                (root / name / "1" / path.name).symlink_to(path.resolve())
    # Triton's ragged batching, which the spec cannot express yet: requests of any shapes share a
    # batch of the encoder, and kiln_onnx runs each shape among them as one ONNX Runtime call.
    config = root / RAGGED_ENCODER / "config.pbtxt"
    config.write_text(config.read_text().replace("input {\n", "input {\n  allow_ragged_batch: true\n"))
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("text_batching_log") / "tritonserver.log"
    with TritonServer(
        repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, log_file=log
    ) as running:
        yield running


@pytest.fixture(scope="module")
def texts() -> list[str]:
    chosen = texts_in_one_bucket()
    lengths = lengths_of(chosen)
    assert len(set(lengths)) == BATCH, lengths  # different lengths: unpadded, they never share a batch
    assert len({bucket_of(n, buckets()) for n in lengths}) == 1
    return chosen


@pytest.fixture(scope="module")
def reference(texts) -> np.ndarray:
    """Each text alone, padded nowhere, through the served ONNX model in process."""
    return OrtTextEmbedder(intra_op_threads=1, inter_op_threads=1, batch_size=1).embed(texts)


def stats(server: TritonServer, model: str) -> tuple[int, int]:
    """(execution_count, inference_count) of `model` so far."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        entry = json.load(r)["model_stats"][0]
    return int(entry["execution_count"]), int(entry["inference_count"])


def stats_after(server: TritonServer, model: str, before: tuple[int, int], timeout: float = 10.0) -> tuple[int, int]:
    """(executions, inferences) of `model` since `before`, once BATCH more inferences are counted:
    Triton counts an execution when the backend returns, which may be after the client has its
    answer."""
    deadline = time.monotonic() + timeout
    while True:
        executions, inferences = stats(server, model)
        if inferences - before[1] >= BATCH or time.monotonic() > deadline:
            return executions - before[0], inferences - before[1]
        time.sleep(0.05)


def send_at_once(server: TritonServer, protocol: str, model: str, texts: Sequence[str]) -> list[np.ndarray]:
    """One request per text, all at once (one client per sender); the embeddings in order."""
    module = httpclient if protocol == "http" else grpcclient

    def send(text: str) -> np.ndarray:
        url = server.http_url if protocol == "http" else server.grpc_url
        client = module.InferenceServerClient(url)
        try:
            item = module.InferInput(tensors.TEXT, [1, 1], "BYTES")
            item.set_data_from_numpy(np.array([[text.encode("utf-8")]], dtype=object))
            return client.infer(model, [item]).as_numpy(tensors.EMBEDDING)[0]
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=len(texts)) as pool:
        return list(pool.map(send, texts))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(("model", "step"), [(ENSEMBLE, ENCODER.name), (FUSED, FUSED)], ids=["ensemble", "fused"])
def test_texts_of_different_lengths_share_one_batch_and_match_the_unpadded_reference(
    server: TritonServer, texts, reference, protocol: str, model: str, step: str
) -> None:
    before = stats(server, step)
    answers = send_at_once(server, protocol, model, texts)
    assert stats_after(server, step, before) == (1, BATCH), "the texts did not share a batch"
    for text, got, want in zip(texts, answers, reference, strict=True):
        assert got.shape == want.shape == (want.shape[0],)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=text[:60])
    # Different texts, different embeddings (a constant answer would pass the batch count).
    assert np.abs(answers[0] - answers[-1]).max() > 100 * ATOL


def test_the_fused_onnx_step_runs_one_bucket_as_one_onnx_runtime_call(repository: Path, texts, reference) -> None:
    config, version_dir = fused_module.read_step_config(repository, FUSED, for_model=FUSED)
    context = LoadContext(FUSED, repository / FUSED, version_dir, config, config_parameters(config))
    step = fused_module.load(context)
    (onnx_stage,) = [s for s in step.stages if s.model == ENCODER.name]
    model = onnx_stage.step.model
    calls: list[dict[str, tuple[int, ...]]] = []
    session = model.session

    class CountingSession:
        """The real session; each run's input shapes are recorded."""

        def __getattr__(self, name: str) -> Any:
            return getattr(session, name)

        def run(self, names: Any, feed: dict[str, np.ndarray], *args: Any) -> Any:
            calls.append({k: tuple(v.shape) for k, v in feed.items()})
            return session.run(names, feed, *args)

    model.session = CountingSession()
    requests = [{tensors.TEXT: np.array([[t.encode("utf-8")]], dtype=object)} for t in texts]
    results = step.run(requests)
    assert len(calls) == 1, calls
    assert calls[0][tensors.TEXT_INPUT_IDS][0] == BATCH
    for result, want in zip(results, reference, strict=True):
        assert isinstance(result, dict), result
        np.testing.assert_allclose(result[tensors.EMBEDDING][0], want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_with_ragged_batching_texts_of_different_buckets_share_one_batch(server: TritonServer, protocol: str) -> None:
    texts = texts_in_two_buckets()
    assert len({bucket_of(n, buckets()) for n in lengths_of(texts)}) == 2
    reference = OrtTextEmbedder(intra_op_threads=1, inter_op_threads=1, batch_size=1).embed(texts)
    before = stats(server, RAGGED_ENCODER)
    answers = send_at_once(server, protocol, RAGGED, texts)
    assert stats_after(server, RAGGED_ENCODER, before) == (1, BATCH), "the texts did not share a batch"
    for text, got, want in zip(texts, answers, reference, strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=text[:60])
