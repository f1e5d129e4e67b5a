"""image_classifier, image_classifier_int8 and digits_reader end to end on a real tritonserver,
over HTTP and gRPC, against the in-process reference pipelines (`kiln.build.reference.image`).

- digits_reader on every held-out test digit of the build's split, rendered as an 8x8 PNG: the
  served accuracy equals the PyTorch reference's, and so does every item's label.
- image_classifier on scikit-image photographs of different sizes and colour modes (grey, RGB,
  RGBA, one large enough for JPEG draft decoding), JPEG and PNG: the top-5 equals the PyTorch
  reference's; image_classifier_int8's equals ONNX Runtime's in-process run of the INT8 model.
- Corrupt files (random bytes, a truncated JPEG) inside a dynamic batch of good requests fail
  alone with "could not be decoded"; a decompression-bomb PNG is rejected from its header; the
  failures are counted on /metrics.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from kiln import paths, tensors
from kiln.build.reference.image import OrtImageClassifier, TopK, TorchImageClassifier
from kiln.models.digits import pipeline as digits_pipeline
from kiln.models.digits.build import PIXEL_SCALE, load_split
from kiln.models.resnet50 import pipeline as resnet50_pipeline
from kiln.registry import by_name
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.serving.fused import FLUSH_INTERVAL_S
from kiln.spec import DynamicBatching, Variant

PROTOCOLS = ("http", "grpc")
DIGITS = by_name("digits")
DIGITS_BATCH = digits_pipeline.DIGITS_READER_MAX_BATCH
LOGIT_TIE = 1e-4
"""Two classes whose reference logits differ by less than this (the export check's atol) may
swap places between PyTorch and ONNX Runtime; every other position must agree exactly."""
MAX_TIED_ITEMS = 1
TIED_SHARE = 0.01
"""At most this many items (or this share) may hold a near-tie, or the comparison says little."""
SCORE_ATOL = 1e-4
"""Softmax probabilities: served vs reference."""
PHOTOS = ("camera", "astronaut", "coffee", "chelsea")
"""Grey 512x512, RGB 512x512, RGB 600x400, RGB 451x300."""
BIG_SIDE = 1600
"""astronaut is also sent resized to 1600x1600: JPEG draft mode decodes it at 1/4 scale."""
BOMB_SIDE = 30_000
"""A 30000x30000 PNG: 900 megapixels in about 100 kB."""
GREY_LEVELS = 255
ZLIB_HEADER = b"\x78\xda"
"""A zlib stream's header: deflate, 32 KiB window, best compression."""
BURST = 6
"""Requests sent together into digits_preprocess's batch (2 corrupt, 4 good)."""


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def digit_levels(pixels: np.ndarray) -> np.ndarray:
    """A test digit ([1, 8, 8]: scikit-learn's grey levels v in 0..16, divided by 16) as 8-bit
    grey levels round(v * 255 / 16)."""
    return np.rint(pixels[0] * PIXEL_SCALE * GREY_LEVELS / PIXEL_SCALE).astype(np.uint8)


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit grey PNG of side x side zero pixels: a decompression bomb (~110 MB of pixel
    rows in ~100 kB). Built fast: a block of rows is deflated once, ending in a full flush (which
    makes the compressed block independent of what precedes it), and repeated."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows_per_block = 1000
    blocks, rest = divmod(side, rows_per_block)
    assert rest == 0, f"side must be a multiple of {rows_per_block}"
    block = bytes(1 + (side + 7) // 8) * rows_per_block  # per row: filter byte 0, packed bits
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate
    unit = deflate.compress(block) + deflate.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(blocks):
        checksum = zlib.adler32(block, checksum)
    stream = ZLIB_HEADER + unit * blocks + deflate.flush() + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


def make_client(server: TritonServer, protocol: str):
    if protocol == "http":
        return httpclient.InferenceServerClient(server.http_url, concurrency=BURST)
    return grpcclient.InferenceServerClient(server.grpc_url)


def image_input(client, files: list[bytes]):
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    array = np.array([[f] for f in files], dtype=object)
    tensor = module.InferInput(tensors.IMAGE, list(array.shape), "BYTES")
    tensor.set_data_from_numpy(array)
    return [tensor]


def answers(result) -> TopK:
    labels = result.as_numpy(tensors.LABELS)
    return TopK(
        labels=[[b.decode("utf-8") for b in row] for row in labels],
        scores=result.as_numpy(tensors.SCORES),
        indices=result.as_numpy(tensors.CLASS_INDICES),
    )


def classify(client, model: str, files: list[bytes], batch: int) -> TopK:
    """Sends `files` in requests of `batch` images; the answers, concatenated."""
    parts = [answers(client.infer(model, image_input(client, files[i : i + batch])))
             for i in range(0, len(files), batch)]
    return TopK(
        labels=[row for p in parts for row in p.labels],
        scores=np.concatenate([p.scores for p in parts]),
        indices=np.concatenate([p.indices for p in parts]),
    )


def assert_same_ranking(served: TopK, reference: TopK) -> None:
    """Every item's top-k equals the reference's, except where the reference's own logits tie
    within LOGIT_TIE (float rounding may order those either way, and does differently on other
    CPUs); labels follow the indices; scores agree to SCORE_ATOL."""
    assert served.indices.shape == reference.indices.shape
    gaps = np.log(reference.scores[:, :-1]) - np.log(reference.scores[:, 1:])  # logit gaps
    tied = np.zeros_like(served.indices, dtype=bool)
    tied[:, :-1] |= gaps < LOGIT_TIE
    tied[:, 1:] |= gaps < LOGIT_TIE
    allowed = max(MAX_TIED_ITEMS, int(TIED_SHARE * len(tied)))
    assert tied.any(axis=1).sum() <= allowed, f"{tied.sum()} near-tied positions: the comparison says little"
    np.testing.assert_array_equal(served.indices[~tied], reference.indices[~tied])
    np.testing.assert_allclose(served.scores, reference.scores, atol=SCORE_ATOL)
    np.testing.assert_array_equal(np.array(served.labels)[~tied], np.array(reference.labels)[~tied])


@pytest.fixture(params=PROTOCOLS)
def client(request, server: TritonServer) -> Iterator:
    client = make_client(server, request.param)
    yield client
    client.close()


# -- digits_reader --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_files() -> tuple[list[bytes], np.ndarray]:
    """Every test digit of the build's split as a PNG, and the labels."""
    split = load_split(DIGITS.build.source)
    return [png_bytes(digit_levels(x)) for x in split.x_test], split.y_test


@pytest.fixture(scope="module")
def digits_reference(digit_files) -> TopK:
    return TorchImageClassifier(tensors.DIGITS_READER).classify(digit_files[0])


def test_digits_reader_accuracy_and_every_label_equal_the_reference(client, digit_files, digits_reference) -> None:
    files, truth = digit_files
    served = classify(client, tensors.DIGITS_READER, files, DIGITS_BATCH)
    served_top1 = np.array([int(row[0]) for row in served.labels])
    reference_top1 = np.array([int(row[0]) for row in digits_reference.labels])
    assert len(served_top1) == len(truth) == 360
    # Equal top-1 except where the reference's top two tie within LOGIT_TIE (the ranking check
    # below), so the accuracies differ by at most those items.
    near_tie = np.log(digits_reference.scores[:, 0]) - np.log(digits_reference.scores[:, 1]) < LOGIT_TIE
    np.testing.assert_array_equal(served_top1[~near_tie], reference_top1[~near_tie])
    served_accuracy = float(np.mean(served_top1 == truth))
    assert abs(served_accuracy - float(np.mean(reference_top1 == truth))) <= near_tie.sum() / len(truth)
    assert served_accuracy > 0.95
    assert_same_ranking(served, digits_reference)
    assert all(label in [str(i) for i in range(10)] for row in served.labels for label in row)


# -- image_classifier -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photo_files() -> list[bytes]:
    """JPEG and PNG files of photographs: grey, RGB of three sizes, RGBA (an opaque logo and a
    photograph with an alpha gradient), and a 1600x1600 JPEG that is decoded in draft mode."""
    import skimage.data

    files = []
    for name in PHOTOS:
        pixels = np.asarray(getattr(skimage.data, name)())
        files += [jpeg_bytes(pixels), png_bytes(pixels)]
    files.append(png_bytes(np.asarray(skimage.data.logo())))
    chelsea = np.asarray(skimage.data.chelsea())
    alpha = np.broadcast_to(np.linspace(40, 255, chelsea.shape[1]).astype(np.uint8), chelsea.shape[:2])
    files.append(png_bytes(np.dstack([chelsea, alpha])))
    big = Image.fromarray(skimage.data.astronaut()).resize((BIG_SIDE, BIG_SIDE), Image.Resampling.BICUBIC)
    files.append(jpeg_bytes(np.asarray(big)))
    return files


@pytest.fixture(scope="module")
def torch_reference(photo_files) -> TopK:
    return TorchImageClassifier(tensors.IMAGE_CLASSIFIER).classify(photo_files)


@pytest.fixture(scope="module")
def int8_reference(photo_files) -> TopK:
    return OrtImageClassifier(tensors.IMAGE_CLASSIFIER_INT8).classify(photo_files)


def test_image_classifier_top5_equals_the_pytorch_reference(client, photo_files, torch_reference) -> None:
    served = classify(client, tensors.IMAGE_CLASSIFIER, photo_files, resnet50_pipeline.IMAGE_CLASSIFIER_MAX_BATCH)
    assert served.indices.shape == (len(photo_files), resnet50_pipeline.IMAGE_TOP_K)
    assert_same_ranking(served, torch_reference)
    assert served.labels[0] == [f"class_{i:04d}" for i in served.indices[0]]
    assert len({tuple(row) for row in served.indices.tolist()}) > 3, "the photos should not all rank alike"


def test_image_classifier_int8_top5_equals_onnx_runtime_in_process(client, photo_files, int8_reference) -> None:
    served = classify(client, tensors.IMAGE_CLASSIFIER_INT8, photo_files, 4)
    assert_same_ranking(served, int8_reference)


# -- bad files ----------------------------------------------------------------------------------------


METRICS_WAIT_S = 10.0
"""A fused pipeline pushes its steps' counters once a second (`kiln.serving.fused.FLUSH_INTERVAL_S`)."""


def failure_count(server: TritonServer, model: str, reason: str) -> float:
    """The step's failures of `reason`, served alone and inside fused pipelines (label `pipeline`)."""
    return server.metric("kiln_step_failures_total", model=model, reason=reason)


def wait_for_count(server: TritonServer, model: str, reason: str, expected: float) -> float:
    """The count once it reaches `expected`, or at METRICS_WAIT_S (fused steps' counts lag)."""
    deadline = time.monotonic() + METRICS_WAIT_S
    while (count := failure_count(server, model, reason)) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return count


def test_corrupt_and_bomb_files_fail_alone_and_are_counted(client, server: TritonServer, photo_files) -> None:
    good = photo_files[0]
    corrupt = {
        "random bytes": np.random.default_rng(1).bytes(5000),
        "truncated JPEG": photo_files[2][: len(photo_files[2]) // 3],
    }
    preprocess = resnet50_pipeline.RESNET50_PREPROCESS
    time.sleep(FLUSH_INTERVAL_S + 0.5)  # the earlier tests' counts are pushed by now
    decode_before = failure_count(server, preprocess, "decode")
    large_before = failure_count(server, preprocess, "too_large")
    for what, data in corrupt.items():
        with pytest.raises(InferenceServerException) as caught:
            client.infer(tensors.IMAGE_CLASSIFIER, image_input(client, [good, data]))
        assert "image 1 of the request could not be decoded: " in caught.value.message(), what
    bomb = bomb_png()
    assert len(bomb) < 200_000
    with pytest.raises(InferenceServerException) as caught:
        client.infer(tensors.IMAGE_CLASSIFIER, image_input(client, [bomb]))
    assert (
        f"image 0 of the request is too large: its PNG header says {BOMB_SIDE}x{BOMB_SIDE} = "
        f"{BOMB_SIDE**2} pixels, over max_pixels {resnet50_pipeline.RESNET50_MAX_PIXELS} (rejected before decoding)"
    ) in caught.value.message()
    assert wait_for_count(server, preprocess, "decode", decode_before + len(corrupt)) == decode_before + len(corrupt)
    assert wait_for_count(server, preprocess, "too_large", large_before + 1) == large_before + 1
    assert server.returncode is None
    answer = answers(client.infer(tensors.IMAGE_CLASSIFIER, image_input(client, [good])))
    assert answer.indices.shape == (1, resnet50_pipeline.IMAGE_TOP_K)


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory) -> Iterator[TritonServer]:
    """digits_reader in the ensemble form with a digits_preprocess that waits up to 2 s for exactly
    BURST requests, so the burst is sure to share one dynamic batch of that step (a real server,
    only the queue settings differ; the fused form's shared batch: test_fused_pipeline.py)."""
    repository = tmp_path_factory.mktemp("image_batching")
    model = dataclasses.replace(
        DIGITS, warmup=(), build=dataclasses.replace(DIGITS.build, variants=(Variant("fp32"),))
    )
    preprocess = dataclasses.replace(
        digits_pipeline.DIGITS_PREPROCESS_SPEC,
        dynamic_batching=DynamicBatching(preferred_batch_sizes=(BURST,), max_queue_delay_us=2_000_000),
    )
    reader = dataclasses.replace(digits_pipeline.DIGITS_READER, form="ensemble")
    specs = [model, preprocess, digits_pipeline.DIGITS_CLASSIFY_SPEC, reader]
    generate(specs, repository, backends=paths.available_backends())
    shutil.copytree(paths.model_repository() / DIGITS.name / "1", repository / DIGITS.name / "1", dirs_exist_ok=True)
    with TritonServer(repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT) as server:
        yield server


def _executions(client, model: str) -> tuple[int, int]:
    stats = client.get_inference_statistics(model)
    if not isinstance(stats, dict):
        from google.protobuf.json_format import MessageToDict

        stats = MessageToDict(stats, preserving_proto_field_name=True)
    entry = stats["model_stats"][0]
    return int(entry.get("execution_count", 0)), int(entry.get("inference_count", 0))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_corrupt_image_in_a_dynamic_batch_fails_alone(
    batching_server: TritonServer, protocol: str, digit_files, digits_reference
) -> None:
    files, _ = digit_files
    split = load_split(DIGITS.build.source)
    jpeg = jpeg_bytes(np.kron(digit_levels(split.x_test[4]), np.ones((8, 8), np.uint8)))
    burst = [files[0], np.random.default_rng(2).bytes(300), files[1], jpeg[: len(jpeg) // 2], files[2], files[3]]
    bad = {1, 3}
    stats_client = make_client(batching_server, protocol)
    before = _executions(stats_client, digits_pipeline.DIGITS_PREPROCESS)

    def send(data: bytes):
        client = make_client(batching_server, protocol)
        try:
            return answers(client.infer(tensors.DIGITS_READER, image_input(client, [data])))
        except InferenceServerException as error:
            return error
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=BURST) as pool:
        results = list(pool.map(send, burst))

    after = _executions(stats_client, digits_pipeline.DIGITS_PREPROCESS)
    stats_client.close()
    assert after == (before[0] + 1, before[1] + BURST), "the burst did not share one batch"
    good_index = iter(range(4))
    for i, result in enumerate(results):
        if i in bad:
            assert isinstance(result, InferenceServerException), result
            assert "image 0 of the request could not be decoded: " in result.message()
        else:
            assert isinstance(result, TopK), result
            j = next(good_index)  # its own answer: the reference's top class and scores
            assert result.indices[0][0] == digits_reference.indices[j][0]
            np.testing.assert_allclose(result.scores[0], digits_reference.scores[j], atol=SCORE_ATOL)
