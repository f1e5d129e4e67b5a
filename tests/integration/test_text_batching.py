"""Texts of different token lengths share a batch of text_encoder, on a real tritonserver, with
answers equal to the unpadded reference (issue 13).

Two ways let requests of different lengths share the encoder's dynamic batch. **Ragged batching**:
text_encoder's spec sets `allow_ragged_batch` on both inputs (`TensorSpec.allow_ragged_batch`,
rendered into its config.pbtxt), so Triton hands requests of any shapes to one `execute` and
kiln_onnx runs each shape among them as one ONNX Runtime call. **Length buckets**: kiln_text's
`length_buckets` pads each request to its bucket, so requests of one bucket have one shape, which
Triton batches even without the flag.

One temporary repository (the built text_encoder linked in) serves, each encoder with a batcher
that waits up to 2 s to batch exactly BATCH requests (so the counts below do not depend on how
fast this machine is):

- `text_embedder`: the committed pipeline in the ensemble form (committed tokenizer, text_encoder with its committed
  ragged inputs). BATCH requests of BATCH different token lengths (in two buckets of BUCKETS, so
  different shapes whatever the padding) sent at once must run in one execution of text_encoder
  (Triton's statistics: execution_count +1, inference_count +BATCH).
- `text_embedder_unragged`: the same on `text_encoder_unragged`, the encoder's spec with the
  flag off: the same texts never share an execution (the control: the flag is what batches them).
- `text_embedder_bucketed` (ensemble, on the unragged encoder) and `text_embedder_bucketed_fused`
  (the fused form, one batcher waiting the same way): a tokenizer with `length_buckets` BUCKETS;
  BATCH texts of BATCH lengths in one bucket share one execution of the model step, and in the
  fused form the kiln_onnx step runs them as one ONNX Runtime call (counted on the real session,
  loaded in process from the test repository as kiln_fused loads it).
- `text_embedder_committed_batcher`: the committed pipeline, ensemble form, on `text_encoder_committed_batcher`,
  text_encoder exactly as committed (its own 1 ms queue delay): a concurrent burst of BURST texts
  of BURST different lengths must take fewer executions than requests (tried up to BURST_TRIES
  times: on a busy 2-core machine one burst may trickle in one request at a time).

Every answer must equal the unpadded in-process reference (each text alone, padded nowhere:
`OrtTextEmbedder` with batch size 1, the served ONNX model) within ATOL.
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
from kiln.spec import DynamicBatching, EnsembleSpec, Fused, ModelSpec, Variant

ENSEMBLE = tensors.TEXT_EMBEDDER
ENCODER = by_name("text_encoder")
TOKENIZER = by_name(pipelines.TOKENIZER)
MAX_LENGTH = ENCODER.build.source.max_length
UNRAGGED_ENCODER = f"{ENCODER.name}_unragged"
COMMITTED_ENCODER = f"{ENCODER.name}_committed_batcher"
BUCKETED_TOKENIZER = f"{TOKENIZER.name}_bucketed"
UNRAGGED = f"{ENSEMBLE}_unragged"
BUCKETED = f"{ENSEMBLE}_bucketed"
BUCKETED_FUSED = f"{ENSEMBLE}_bucketed_fused"
COMMITTED_BATCHER = f"{ENSEMBLE}_committed_batcher"
BUCKETS = "16,32,64"
"""The bucketed tokenizer's `length_buckets` (whatever `pipeline.py` commits)."""
BATCH = 4
WAIT_US = 2_000_000
BURST = 24
BURST_TRIES = 3
ATOL = 1e-5
"""Largest difference allowed per component of the L2-normalized embedding against the unpadded
reference: padded keys are masked out of attention (exp of a large negative is exactly 0) and out
of the pool, so only float summation order differs; measured here at most 6e-8
(`benchmarks/text_lengths.py`), the components themselves are about 0.06."""
PROTOCOLS = ("http", "grpc")


def bucket_list() -> tuple[int, ...]:
    return parse_buckets(tuple(int(b) for b in BUCKETS.split(",")), MAX_LENGTH)


def committed_buckets() -> tuple[int, ...]:
    """The committed tokenizer's buckets (() when it pads each request to its longest text)."""
    params = parse_params(TOKENIZER.name, dict(TOKENIZER.parameters), TEXT_PARAMS, TextParams)
    return parse_buckets(params.length_buckets, params.max_length)


def lengths_of(texts: Sequence[str]) -> list[int]:
    encode = prepared_encoder(build_tokenizer(), MAX_LENGTH)
    return [int(encode([t])[1].sum()) for t in texts]


def texts_by_bucket() -> dict[int, dict[int, str]]:
    """The evaluation texts: bucket of BUCKETS -> token length -> one text of that length."""
    pool = list(dict.fromkeys(evaluation_texts(ENCODER.build.source)))
    by_bucket: dict[int, dict[int, str]] = {}
    for text, length in zip(pool, lengths_of(pool), strict=True):
        by_bucket.setdefault(bucket_of(length, bucket_list()), {}).setdefault(length, text)
    return by_bucket


def texts_in_two_buckets() -> list[str]:
    """BATCH texts of BATCH different lengths: half in the smallest bucket, half in the next one."""
    by_bucket = texts_by_bucket()
    found = [list(by_bucket[b].values()) for b in sorted(by_bucket) if len(by_bucket[b]) >= BATCH // 2]
    assert len(found) >= 2, f"the evaluation texts fill fewer than two buckets of {BUCKETS}"
    return found[0][: BATCH // 2] + found[1][: BATCH - BATCH // 2]


def texts_in_one_bucket() -> list[str]:
    """BATCH texts of BATCH different token lengths that all pad to one bucket."""
    for _, found in sorted(texts_by_bucket().items()):
        if len(found) >= BATCH:
            return [found[n] for n in sorted(found)[:: max(1, len(found) // BATCH)][:BATCH]]
    raise AssertionError(f"no bucket of {BUCKETS} holds {BATCH} texts of different lengths")


def texts_of_different_lengths(count: int) -> list[str]:
    """`count` texts of `count` different token lengths, each in its own committed bucket when
    the committed tokenizer has buckets (so no two share a shape without ragged batching)."""
    pool = list(dict.fromkeys(evaluation_texts(ENCODER.build.source)))
    shapes: dict[int, str] = {}
    for text, length in zip(pool, lengths_of(pool), strict=True):
        shapes.setdefault(bucket_of(length, committed_buckets()), text)
    assert len(shapes) >= count, f"the evaluation texts have only {len(shapes)} padded shapes"
    return [shapes[n] for n in sorted(shapes)][:count]


def with_ragged(spec: ModelSpec, on: bool) -> tuple:
    return tuple(dataclasses.replace(t, allow_ragged_batch=on) for t in spec.inputs)


def renamed(pipeline: EnsembleSpec, name: str, models: dict[str, str], **change: Any) -> EnsembleSpec:
    steps = tuple(dataclasses.replace(s, model=models.get(s.model, s.model)) for s in pipeline.steps)
    return dataclasses.replace(pipeline, name=name, steps=steps, **change)


def specs() -> list[Any]:
    waiting = DynamicBatching(preferred_batch_sizes=(BATCH,), max_queue_delay_us=WAIT_US)
    fp32 = dataclasses.replace(ENCODER.build, variants=(Variant("fp32"),))
    encoder = dataclasses.replace(ENCODER, dynamic_batching=waiting, build=fp32)  # its spec's flags
    unragged = dataclasses.replace(encoder, name=UNRAGGED_ENCODER, inputs=with_ragged(ENCODER, False))
    committed = dataclasses.replace(ENCODER, name=COMMITTED_ENCODER, build=fp32)
    tokenizer = dataclasses.replace(
        TOKENIZER, name=BUCKETED_TOKENIZER, parameters={**TOKENIZER.parameters, "length_buckets": BUCKETS}
    )
    embedder = by_name(ENSEMBLE)
    bucketed = {TOKENIZER.name: BUCKETED_TOKENIZER, ENCODER.name: UNRAGGED_ENCODER}
    return [
        encoder, unragged, committed, TOKENIZER, tokenizer, by_name(pipelines.POOL),
        renamed(embedder, ENSEMBLE, {}, form="ensemble"),
        renamed(embedder, UNRAGGED, {ENCODER.name: UNRAGGED_ENCODER}, form="ensemble"),
        renamed(embedder, BUCKETED, bucketed, form="ensemble"),
        renamed(embedder, BUCKETED_FUSED, bucketed, form="fused", fused=Fused(waiting)),
        renamed(embedder, COMMITTED_BATCHER, {ENCODER.name: COMMITTED_ENCODER}, form="ensemble"),
    ]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    built = paths.model_repository() / ENCODER.name / "1"
    if not (built / "model.onnx").is_file():
        pytest.fail(f"text_encoder is not built ({built} holds no model.onnx); run `make build-engines` first")
    root = tmp_path_factory.mktemp("text_batching")
    generate(specs(), root, backends=paths.available_backends())
    for name in (ENCODER.name, UNRAGGED_ENCODER, COMMITTED_ENCODER):
        (root / name / "1").mkdir(exist_ok=True)
        for path in built.iterdir():
            if path.is_file():
                (root / name / "1" / path.name).symlink_to(path.resolve())
    return root


@pytest.fixture(scope="module")
def server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    log = tmp_path_factory.mktemp("text_batching_log") / "tritonserver.log"
    with TritonServer(
        repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, log_file=log
    ) as running:
        yield running


def reference_of(texts: Sequence[str]) -> np.ndarray:
    """Each text alone, padded nowhere, through the served ONNX model in process."""
    return OrtTextEmbedder(intra_op_threads=1, inter_op_threads=1, batch_size=1).embed(texts)


def stats(server: TritonServer, model: str) -> tuple[int, int]:
    """(execution_count, inference_count) of `model` so far."""
    with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/stats", timeout=10) as r:
        entry = json.load(r)["model_stats"][0]
    return int(entry["execution_count"]), int(entry["inference_count"])


def stats_after(
    server: TritonServer, model: str, before: tuple[int, int], count: int = BATCH, timeout: float = 10.0
) -> tuple[int, int]:
    """(executions, inferences) of `model` since `before`, once `count` more inferences are
    counted: Triton counts an execution when the backend returns, which may be after the client
    has its answer."""
    deadline = time.monotonic() + timeout
    while True:
        executions, inferences = stats(server, model)
        if inferences - before[1] >= count or time.monotonic() > deadline:
            return executions - before[0], inferences - before[1]
        time.sleep(0.05)


def send_at_once(
    server: TritonServer, protocol: str, model: str, texts: Sequence[str], senders: int | None = None
) -> list[np.ndarray]:
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

    with ThreadPoolExecutor(max_workers=senders or len(texts)) as pool:
        return list(pool.map(send, texts))


def assert_unpadded(texts: Sequence[str], answers: Sequence[np.ndarray], reference: np.ndarray) -> None:
    for text, got, want in zip(texts, answers, reference, strict=True):
        assert got.shape == want.shape == (want.shape[0],)
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL, err_msg=text[:60])
    # Different texts, different embeddings (a constant answer would pass the batch count).
    assert np.abs(answers[0] - answers[-1]).max() > 100 * ATOL


def test_the_committed_encoder_config_asks_for_ragged_batches(repository: Path) -> None:
    for name in (ENCODER.name, COMMITTED_ENCODER):
        assert (repository / name / "config.pbtxt").read_text().count("allow_ragged_batch: true") == 2
    assert "allow_ragged_batch" not in (repository / UNRAGGED_ENCODER / "config.pbtxt").read_text()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_with_ragged_batching_texts_of_different_lengths_share_one_batch(server: TritonServer, protocol: str) -> None:
    texts = texts_in_two_buckets()
    lengths = lengths_of(texts)
    assert len(set(lengths)) == BATCH and len({bucket_of(n, bucket_list()) for n in lengths}) == 2
    before = stats(server, ENCODER.name)
    answers = send_at_once(server, protocol, ENSEMBLE, texts)
    assert stats_after(server, ENCODER.name, before) == (1, BATCH), "the texts did not share a batch"
    assert_unpadded(texts, answers, reference_of(texts))


def test_without_ragged_batching_texts_of_different_shapes_never_share_a_batch(server: TritonServer) -> None:
    texts = texts_in_two_buckets()
    shapes = {bucket_of(n, committed_buckets()) for n in lengths_of(texts)}  # the committed padding
    assert len(shapes) >= 2
    before = stats(server, UNRAGGED_ENCODER)
    answers = send_at_once(server, "grpc", UNRAGGED, texts)
    executions, inferences = stats_after(server, UNRAGGED_ENCODER, before)
    assert inferences == BATCH and executions >= len(shapes), (executions, inferences)
    assert_unpadded(texts, answers, reference_of(texts))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("model", "step"), [(BUCKETED, UNRAGGED_ENCODER), (BUCKETED_FUSED, BUCKETED_FUSED)], ids=["ensemble", "fused"]
)
def test_with_length_buckets_texts_of_one_bucket_share_one_batch(
    server: TritonServer, protocol: str, model: str, step: str
) -> None:
    texts = texts_in_one_bucket()
    lengths = lengths_of(texts)
    assert len(set(lengths)) == BATCH, lengths  # different lengths: unpadded, they never share a batch
    assert len({bucket_of(n, bucket_list()) for n in lengths}) == 1
    before = stats(server, step)
    answers = send_at_once(server, protocol, model, texts)
    assert stats_after(server, step, before) == (1, BATCH), "the texts did not share a batch"
    assert_unpadded(texts, answers, reference_of(texts))


def test_the_fused_onnx_step_runs_one_bucket_as_one_onnx_runtime_call(repository: Path) -> None:
    texts = texts_in_one_bucket()
    config, version_dir = fused_module.read_step_config(repository, BUCKETED_FUSED, for_model=BUCKETED_FUSED)
    context = LoadContext(BUCKETED_FUSED, repository / BUCKETED_FUSED, version_dir, config, config_parameters(config))
    step = fused_module.load(context)
    (onnx_stage,) = [s for s in step.stages if s.model == UNRAGGED_ENCODER]
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
    for result, want in zip(results, reference_of(texts), strict=True):
        assert isinstance(result, dict), result
        np.testing.assert_allclose(result[tensors.EMBEDDING][0], want, rtol=0, atol=ATOL)


def test_with_the_committed_batcher_a_burst_of_different_lengths_shares_batches(server: TritonServer) -> None:
    texts = texts_of_different_lengths(BURST)
    reference = reference_of(texts)
    seen = []
    for _ in range(BURST_TRIES):
        before = stats(server, COMMITTED_ENCODER)
        answers = send_at_once(server, "grpc", COMMITTED_BATCHER, texts, senders=BURST)
        assert_unpadded(texts, answers, reference)
        executions, inferences = stats_after(server, COMMITTED_ENCODER, before, count=BURST)
        assert inferences == BURST
        seen.append(executions)
        if executions < inferences:
            break
    assert min(seen) < BURST, f"{BURST} requests of different lengths took {seen} executions: none shared"
