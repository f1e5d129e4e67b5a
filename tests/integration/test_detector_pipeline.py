"""A detector served as a pipeline on a real tritonserver, over HTTP and gRPC (issue 17).

The repository is made in a temp folder by `kiln.repository.generate` from
`kiln.pipelines.detector_pipeline`: a tiny synthetic detector (an ONNX graph, built with
onnx.helper, emitting a fixed YOLOv8-style head [4 + 3 classes, 4 candidates] whatever the image)
served by kiln_onnx, the letterbox step (kiln_image), the kiln_detect step and the ensemble. Real
PNG files go in; the boxes must land where the fixed head's model-pixel boxes map on each
original image (each request's own letterbox), after NMS (two overlapping boxes of one class
become one, a third of another class stays) and the score threshold (a fourth is dropped).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from kiln import paths, pipelines, tensors
from kiln.repository import generate
from kiln.server import FREE_PORT, TritonServer
from kiln.spec import DynamicBatching, InstanceGroup, ModelSpec, TensorSpec

PROTOCOLS = ("http", "grpc")
SIDE = 64
CLASSES = ("person", "car", "dog")
MAX_DETECTIONS = 5
MAX_BATCH = 4
ONNX_OPSET = 13
ONNX_IR_VERSION = 8
ENSEMBLE = "tiny_detector_pipeline"
# The fixed head, in model (64x64 input) pixels: cx, cy, w, h, class, score.
CANDIDATES = (
    (32.0, 32.0, 20.0, 10.0, 0, 0.9),  # kept: (22, 27, 42, 37)
    (33.0, 32.0, 20.0, 10.0, 0, 0.8),  # IoU 0.9 with the first, same class: suppressed
    (33.0, 32.0, 20.0, 10.0, 1, 0.7),  # the same box, another class: kept (23, 27, 43, 37)
    (10.0, 10.0, 4.0, 4.0, 2, 0.1),  # under the score threshold 0.25
)
DETECTOR = ModelSpec(
    name="tiny_detector",
    backend="kiln_onnx",
    inputs=(TensorSpec("images", "FP32", (3, SIDE, SIDE)),),
    outputs=(TensorSpec("output0", "FP32", (4 + len(CLASSES), len(CANDIDATES))),),
    max_batch_size=MAX_BATCH,
    dynamic_batching=DynamicBatching(max_queue_delay_us=100),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={"intra_op_threads": "1"},
)


def fixed_head() -> np.ndarray:
    head = np.zeros((4 + len(CLASSES), len(CANDIDATES)), np.float32)
    for j, (cx, cy, w, h, cls, score) in enumerate(CANDIDATES):
        head[:4, j] = (cx, cy, w, h)
        head[4 + cls, j] = score
    return head


def write_detector_onnx(path: Path) -> None:
    """images [N, 3, 64, 64] -> output0 [N, 7, 4]: the fixed head for every image (the image's mean
    times 0, plus the head: the output depends on the input's batch, not its pixels)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 3, SIDE, SIDE])
    output = helper.make_tensor_value_info(
        "output0", TensorProto.FLOAT, [None, 4 + len(CLASSES), len(CANDIDATES)]
    )
    initializers = [
        numpy_helper.from_array(np.array([-1, 1, 1], np.int64), "shape"),
        numpy_helper.from_array(np.zeros((), np.float32), "zero"),
        numpy_helper.from_array(fixed_head()[None], "head"),
    ]
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape"], ["per_item"]),
        helper.make_node("Mul", ["per_item", "zero"], ["nothing"]),
        helper.make_node("Add", ["nothing", "head"], ["output0"]),
    ]
    graph = helper.make_graph(nodes, "tiny_detector", [images], [output], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("detector_repository")
    steps = pipelines.detector_pipeline(ENSEMBLE, DETECTOR, CLASSES, max_detections=MAX_DETECTIONS)
    generate([DETECTOR, *steps], repository, backends=paths.available_backends())
    write_detector_onnx(repository / DETECTOR.name / "1" / "model.onnx")
    log_file = tmp_path_factory.mktemp("detector_log") / "tritonserver.log"
    with TritonServer(
        repository, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, log_file=log_file
    ) as running:
        yield running


@pytest.fixture(params=PROTOCOLS)
def client(request, server: TritonServer) -> Iterator:
    if request.param == "http":
        client = httpclient.InferenceServerClient(server.http_url)
    else:
        client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 140, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def detect(client, files: list[bytes]):
    module = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    array = np.array([[f] for f in files], dtype=object)
    image = module.InferInput(tensors.IMAGE, list(array.shape), "BYTES")
    image.set_data_from_numpy(array)
    outputs = [module.InferRequestedOutput(name) for name in pipelines.DETECTION_OUTPUTS]
    return client.infer(ENSEMBLE, [image], outputs=outputs)


def test_boxes_land_on_each_original_image_after_nms_and_the_threshold(client) -> None:
    # 640x480: scale 0.1, 8 rows of padding above; 480x640: scale 0.1, 8 columns on the left;
    # 64x64: identity.
    result = detect(client, [png(640, 480), png(480, 640), png(SIDE, SIDE)])
    count = result.as_numpy(pipelines.DETECTION_COUNT)
    boxes = result.as_numpy(pipelines.BOXES)
    assert count.tolist() == [[2], [2], [2]] and count.dtype == np.int32
    assert boxes.shape == (3, MAX_DETECTIONS, 4) and boxes.dtype == np.float32
    np.testing.assert_allclose(boxes[0, :2], [[220, 190, 420, 290], [230, 190, 430, 290]], rtol=1e-6)
    np.testing.assert_allclose(boxes[1, :2], [[140, 270, 340, 370], [150, 270, 350, 370]], rtol=1e-6)
    np.testing.assert_allclose(boxes[2, :2], [[22, 27, 42, 37], [23, 27, 43, 37]], rtol=1e-6)
    np.testing.assert_array_equal(boxes[:, 2:], np.zeros((3, 3, 4), np.float32))
    np.testing.assert_allclose(result.as_numpy(pipelines.DETECTION_SCORES)[:, :3], [[0.9, 0.7, 0.0]] * 3, rtol=1e-6)
    assert result.as_numpy(pipelines.DETECTION_CLASSES).tolist() == [[0, 1, -1, -1, -1]] * 3
    labels = result.as_numpy(pipelines.DETECTION_LABELS)
    assert [[label.decode("utf-8") for label in row] for row in labels] == [["person", "car", "", "", ""]] * 3


def test_a_corrupt_image_fails_its_request_naming_the_image(client) -> None:
    with pytest.raises(InferenceServerException) as caught:
        detect(client, [b"not an image at all"])
    assert (
        f"in ensemble '{ENSEMBLE}', image 0 of the request could not be decoded: it is not a JPEG or "
        "PNG file (it starts with bytes 6e 6f 74 20 61 6e 20 69)"
    ) in str(caught.value)
    assert detect(client, [png(640, 480)]).as_numpy(pipelines.DETECTION_COUNT).tolist() == [[2]]
