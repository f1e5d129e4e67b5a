"""kiln_detect's logic without Triton: NMS, decoding a synthetic YOLO head through the whole step
(thresholds, the class filter, max_detections, padding and count, mapping back through the
letterbox transform and clipping), every request and load error as a whole message, and the
detector pipeline's specs (validated by `kiln.spec.validate`, then run in-process: an image
through the letterbox step, a synthetic head, the detect step).

The expected boxes are written out by hand from the synthetic heads, never computed with
`kiln.serving.detect`.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kiln import paths, pipelines, tensors
from kiln.repository import config_dict
from kiln.serving.adapter import LoadContext, failure_reason
from kiln.serving.detect import (
    DETECT_PARAMS,
    DetectInputError,
    DetectLoadError,
    Detector,
    DetectParams,
    check_config,
    detect_params,
    load,
    nms,
)
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.image import from_config
from kiln.serving.params import ParamError
from kiln.spec import DynamicBatching, ModelSpec, SpecError, TensorSpec, validate

CLASSES = 3
LABELS = ("person", "car", "dog")
CANDIDATES = 8
HEAD = "output0"
TRANSFORM = "letterbox"
IDENTITY = (1.0, 1.0, 0.0, 0.0, 640.0, 640.0)
"""A transform that keeps model pixels (a 640x640 image, no padding)."""
LETTERBOX_640x480 = (0.5, 0.5, 0.0, 40.0, 640.0, 480.0)
"""A 640x480 image letterboxed into 320x320."""


def head(*candidates: tuple, classes: int = CLASSES, count: int = CANDIDATES) -> np.ndarray:
    """A YOLOv8 head item [4 + classes, count]: each candidate (cx, cy, w, h, class, score) in
    its own column (the others score 0 everywhere)."""
    out = np.zeros((4 + classes, count), np.float32)
    for j, (cx, cy, w, h, cls, score) in enumerate(candidates):
        out[:4, j] = (cx, cy, w, h)
        out[4 + cls, j] = score
    return out


def config(
    max_detections: int = 5,
    head_dims: tuple = (4 + CLASSES, CANDIDATES),
    head_type: str = "TYPE_FP32",
    outputs: list | None = None,
    transform: dict | None = None,
) -> dict:
    m = max_detections
    return {
        "input": [
            {"name": HEAD, "data_type": head_type, "dims": list(head_dims)},
            transform or {"name": TRANSFORM, "data_type": "TYPE_FP32", "dims": [6]},
        ],
        "output": outputs if outputs is not None else [
            {"name": "boxes", "data_type": "TYPE_FP32", "dims": [m, 4]},
            {"name": "scores", "data_type": "TYPE_FP32", "dims": [m]},
            {"name": "classes", "data_type": "TYPE_INT64", "dims": [m]},
            {"name": "labels", "data_type": "TYPE_STRING", "dims": [m]},
            {"name": "count", "data_type": "TYPE_INT32", "dims": [1]},
        ],
    }


def detector(max_detections: int = 5, head_dims=(4 + CLASSES, CANDIDATES), **raw: str) -> Detector:
    params = detect_params("m", {"max_detections": str(max_detections), **raw})
    return Detector(LABELS, params, check_config("m", config(max_detections, head_dims), params))


def request(*items: np.ndarray, transform=IDENTITY) -> dict:
    heads = np.stack(items)
    return {HEAD: heads, TRANSFORM: np.array([transform] * len(items), np.float32)}


def one(step: Detector, item: np.ndarray, transform=IDENTITY) -> dict:
    result = step.run([request(item, transform=transform)])[0]
    assert not isinstance(result, Exception), result
    return {name: array[0] for name, array in result.items()}


def real(result: dict) -> tuple[np.ndarray, np.ndarray, list[int], list[str]]:
    """The real rows: boxes, scores, classes, labels."""
    n = int(result["count"][0])
    return result["boxes"][:n], result["scores"][:n], result["classes"][:n].tolist(), [
        label.decode("utf-8") for label in result["labels"][:n]
    ]


# -- NMS ------------------------------------------------------------------------------------------


def test_nms_keeps_the_best_of_overlapping_boxes_per_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60]], np.float64)
    scores = np.array([0.8, 0.9, 0.7, 0.6])
    # Same class: box 1 (0.9) suppresses 0 (IoU 9/11) and 2; 3 does not overlap.
    assert nms(boxes, scores, np.array([0, 0, 0, 0]), 0.5, 10).tolist() == [1, 3]
    # Box 2 of another class is kept though it covers box 0 exactly.
    assert nms(boxes, scores, np.array([0, 0, 1, 0]), 0.5, 10).tolist() == [1, 2, 3]
    assert nms(boxes, scores, None, 0.5, 10).tolist() == [1, 3]
    assert nms(boxes, scores, None, 0.5, 1).tolist() == [1]
    # IoU 9/11 = 0.818: suppressed only above the threshold.
    assert nms(boxes[:2], scores[:2], None, 9 / 11 + 1e-9, 10).tolist() == [1, 0]
    assert nms(np.empty((0, 4)), np.empty(0), None, 0.5, 10).tolist() == []
    # IoU exactly 50 / 150: a box is dropped only when its IoU is above the threshold.
    halves = np.array([[0, 0, 10, 10], [5, 0, 15, 10]], np.float64)
    assert nms(halves, np.array([0.9, 0.8]), None, 1 / 3, 10).tolist() == [0, 1]
    assert nms(halves, np.array([0.9, 0.8]), None, 0.33, 10).tolist() == [0]


def test_nms_per_class_holds_for_negative_coordinates_and_ties_go_to_the_lower_index() -> None:
    boxes = np.array([[-100, -100, -50, -50], [-100, -100, -50, -50], [-99, -100, -50, -50]], np.float64)
    assert nms(boxes, np.array([0.5, 0.5, 0.5]), np.array([1, 0, 1]), 0.5, 10).tolist() == [0, 1]


# -- the step --------------------------------------------------------------------------------------


def test_two_overlapping_boxes_of_one_class_become_one() -> None:
    item = head((100, 100, 50, 50, 0, 0.9), (104, 100, 50, 50, 0, 0.8))
    boxes, scores, classes, labels = real(one(detector(), item))
    np.testing.assert_array_equal(boxes, [[75, 75, 125, 125]])
    np.testing.assert_array_equal(scores, np.float32([0.9]))
    assert classes == [0] and labels == ["person"]


def test_two_overlapping_boxes_of_different_classes_both_stay() -> None:
    item = head((100, 100, 50, 50, 0, 0.9), (104, 100, 50, 50, 1, 0.8))
    boxes, scores, classes, labels = real(one(detector(), item))
    np.testing.assert_array_equal(boxes, [[75, 75, 125, 125], [79, 75, 129, 125]])
    np.testing.assert_array_equal(scores, np.float32([0.9, 0.8]))
    assert classes == [0, 1] and labels == ["person", "car"]
    # One NMS across classes: the car goes.
    assert real(one(detector(class_agnostic="true"), item))[2] == [0]


def test_the_score_threshold_filters_and_the_count_and_padding_say_what_is_real() -> None:
    item = head((100, 100, 20, 20, 2, 0.25), (300, 300, 20, 20, 1, 0.2499), (500, 500, 20, 20, 0, 0.7))
    result = one(detector(score_threshold="0.25"), item)
    assert result["count"].tolist() == [2] and result["count"].dtype == np.int32
    boxes, scores, classes, labels = real(result)
    np.testing.assert_array_equal(boxes, [[490, 490, 510, 510], [90, 90, 110, 110]])
    assert classes == [0, 2] and labels == ["person", "dog"]
    assert result["boxes"].shape == (5, 4) and result["boxes"].dtype == np.float32
    np.testing.assert_array_equal(result["boxes"][2:], np.zeros((3, 4), np.float32))
    np.testing.assert_array_equal(result["scores"][2:], np.zeros(3, np.float32))
    assert result["classes"].dtype == np.int64 and result["classes"][2:].tolist() == [-1, -1, -1]
    assert result["labels"][2:].tolist() == [b"", b"", b""]
    empty = one(detector(score_threshold="0.8"), item)
    assert empty["count"].tolist() == [0] and empty["classes"].tolist() == [-1] * 5


def test_max_detections_keeps_the_most_confident() -> None:
    item = head(*[(50 + 100 * i, 50, 20, 20, 0, 0.3 + 0.1 * i) for i in range(6)])
    result = one(detector(max_detections=3), item)
    boxes, scores, classes, _ = real(result)
    assert result["count"].tolist() == [3]
    np.testing.assert_array_equal(boxes, [[540, 40, 560, 60], [440, 40, 460, 60], [340, 40, 360, 60]])
    np.testing.assert_array_equal(scores, np.float32([0.8, 0.7, 0.6]))


def test_the_classes_filter_keeps_only_those_classes() -> None:
    item = head((100, 100, 20, 20, 0, 0.9), (300, 300, 20, 20, 1, 0.8), (500, 500, 20, 20, 2, 0.7))
    _, _, classes, labels = real(one(detector(classes="2,1"), item))
    assert classes == [1, 2] and labels == ["car", "dog"]
    # A candidate whose best class is filtered out is dropped, not demoted to its second class.
    both = head((100, 100, 20, 20, 0, 0.9))
    both[4 + 2, 0] = 0.6
    assert one(detector(classes="2"), both)["count"].tolist() == [0]


def test_boxes_are_mapped_back_through_the_letterbox_and_clipped_to_the_image() -> None:
    item = head(
        (160, 160, 100, 60, 0, 0.9),  # the middle: original (220, 180, 420, 300)
        (20, 60, 60, 60, 1, 0.8),  # x from -10 (left of the image), y from 30 (in the top padding)
        (300, 270, 60, 40, 2, 0.7),  # y2 = 290: below 280, the bottom padding's edge
    )
    boxes, _, classes, _ = real(one(detector(), item, LETTERBOX_640x480))
    assert classes == [0, 1, 2]
    np.testing.assert_allclose(boxes, [[220, 180, 420, 300], [0, 0, 100, 100], [540, 420, 640, 480]])


def test_candidates_first_layout_and_fp16_heads_decode_the_same() -> None:
    item = head((100, 100, 50, 50, 0, 0.9), (104, 100, 50, 50, 1, 0.8), (400, 400, 10, 10, 2, 0.5))
    expected = one(detector(), item)
    transposed = detector(head_dims=(CANDIDATES, 4 + CLASSES), layout="candidates_first")
    for name, array in one(transposed, item.T.copy()).items():
        np.testing.assert_array_equal(array, expected[name])
    params = detect_params("m", {"max_detections": "5"})
    half = Detector(LABELS, params, check_config("m", config(head_type="TYPE_FP16"), params))
    result = one(half, item.astype(np.float16))
    np.testing.assert_array_equal(result["boxes"], expected["boxes"])
    np.testing.assert_array_equal(result["classes"], expected["classes"])


def test_a_dynamic_batch_decodes_each_item_with_its_own_transform_and_bad_requests_fail_alone() -> None:
    item = head((160, 160, 100, 60, 0, 0.9))
    nan = item.copy()
    nan[0, 3] = np.nan
    step = detector()
    requests = [
        request(item, item, transform=IDENTITY),
        request(item, nan),
        request(item, transform=LETTERBOX_640x480),
        {HEAD: np.stack([item]), TRANSFORM: None},
    ]
    results = step.run(requests)
    np.testing.assert_array_equal(results[0]["boxes"][:, 0], [[110, 130, 210, 190]] * 2)
    np.testing.assert_array_equal(results[0]["count"], [[1], [1]])
    assert str(results[1]) == (
        "input 'output0' item(s) 1 hold NaN or infinity; the model's output cannot be decoded"
    )
    assert failure_reason(results[1]) == "non_finite"
    np.testing.assert_array_equal(results[2]["boxes"][0, 0], [220, 180, 420, 300])
    assert str(results[3]) == "missing input 'letterbox'"
    assert failure_reason(results[3]) == "invalid_input"


def test_requests_with_variable_candidates_are_grouped_by_shape() -> None:
    step = detector(head_dims=(4 + CLASSES, -1))
    small = head((100, 100, 20, 20, 1, 0.9), count=2)
    large = head((100, 100, 20, 20, 2, 0.9), count=30)
    results = step.run([request(small), request(large), request(small)])
    assert [r["classes"][0, 0] for r in results] == [1, 2, 1]


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({HEAD: np.zeros((1, 7, 8), np.float64)}, "input 'output0' has dtype float64; expected float32"),
        (
            {HEAD: np.zeros((1, 8, 7), np.float32)},
            "input 'output0' has shape [1, 8, 7]; expected [-1, 7, 8] (per item: 4 box values cx, cy, "
            "w, h and 3 class scores for each candidate, layout attributes_first)",
        ),
        (
            {HEAD: np.zeros((7, 8), np.float32)},
            "input 'output0' has shape [7, 8]; expected [-1, 7, 8] (per item: 4 box values cx, cy, "
            "w, h and 3 class scores for each candidate, layout attributes_first)",
        ),
        (
            {HEAD: np.zeros((2, 7, 8), np.float32), TRANSFORM: np.ones((1, 6), np.float32)},
            "input 'letterbox' has shape [1, 6] and dtype float32; expected [2, 6] float32 (one "
            "transform per item of 'output0')",
        ),
        (
            {HEAD: np.zeros((2, 7, 8), np.float32), TRANSFORM: np.array([IDENTITY, (0.5, 0, 0, 0, 9, 9)], np.float32)},
            "input 'letterbox' item 1 is not an image transform (scale_x, scale_y, pad_x, pad_y, width, "
            "height): the scales must be > 0 and the width and height >= 1, got [0.5, 0.0, 0.0, 0.0, 9.0, 9.0]",
        ),
        ({TRANSFORM: np.ones((1, 6), np.float32)}, "missing input 'output0'"),
    ],
)
def test_malformed_requests_are_named_whole(inputs: dict, message: str) -> None:
    request_inputs = {TRANSFORM: np.array([IDENTITY], np.float32), **inputs}
    result = detector().run([request_inputs])[0]
    assert isinstance(result, DetectInputError) and isinstance(result, RequestError)
    assert str(result) == message


# -- parameters and load ----------------------------------------------------------------------------


def test_params_defaults() -> None:
    assert detect_params("m", {}) == DetectParams(
        layout="attributes_first", score_threshold=0.25, iou_threshold=0.45, max_detections=100,
        classes=(), class_agnostic=False, labels_file="labels.txt",
    )
    assert detect_params("m", {"classes": "5, 2,2"}).classes == (2, 5)
    assert {p.name for p in DETECT_PARAMS} == set(DetectParams.__dataclass_fields__)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"layout": "nchw"}, "model 'm': parameter 'layout' must be one of attributes_first, candidates_first, got 'nchw'"),
        ({"score_threshold": "1.5"}, "model 'm': parameter 'score_threshold' must be in 0..1, got '1.5'"),
        ({"iou_threshold": "-0.1"}, "model 'm': parameter 'iou_threshold' must be a finite number >= 0, got '-0.1'"),
        ({"max_detections": "0"}, "model 'm': parameter 'max_detections' must be an integer >= 1, got '0'"),
        ({"classes": "1.5"}, "model 'm': parameter 'classes' must be class indices (integers >= 0), got '1.5'"),
        ({"classes": "person"}, "model 'm': parameter 'classes' must be a comma-separated list of finite numbers, got 'person'"),
        ({"labels_file": "../labels.txt"}, "model 'm': parameter 'labels_file' must be one path segment"),
        ({"top_k": "5"}, "model 'm': unknown parameter 'top_k'; allowed: class_agnostic, classes, iou_threshold, "
                         "labels_file, layout, max_detections, score_threshold"),
    ],
)
def test_bad_params_are_named(raw: dict, message: str) -> None:
    with pytest.raises(ParamError) as caught:
        detect_params("m", raw)
    if raw.get("labels_file"):
        assert str(caught.value).startswith(message)
    else:
        assert str(caught.value) == message


def context(tmp_path: Path, cfg: dict, labels: str | None, **params: str) -> LoadContext:
    model_dir = tmp_path / "detect"
    (model_dir / "1").mkdir(parents=True)
    if labels is not None:
        (model_dir / "labels.txt").write_text(labels)
    return LoadContext("detect", model_dir, model_dir / "1", cfg, {"max_detections": "5", **params})


def test_load_reads_params_config_and_labels(tmp_path: Path) -> None:
    step = load(context(tmp_path, config(), "person\ncar\ndog\n", score_threshold="0.5"))
    assert step.params.score_threshold == 0.5 and step.tensors.classes == CLASSES
    assert step.tensors.outputs == {
        "boxes": "boxes", "scores": "scores", "classes": "classes", "labels": "labels", "count": "count",
    }
    _, _, _, labels = real(one(step, head((10, 10, 4, 4, 2, 0.9))))
    assert labels == ["dog"]


BOXES_5 = {"name": "boxes", "data_type": "TYPE_FP32", "dims": [5, 4]}
CONTRACT_5 = (
    "boxes TYPE_FP32 [5, 4], scores TYPE_FP32 [5], classes TYPE_INT64 [5], labels TYPE_STRING [5], "
    "count TYPE_INT32 [1]"
)


@pytest.mark.parametrize(
    ("cfg", "labels", "params", "message"),
    [
        (config(), "a\nb\n", {}, "model 'detect': labels file {folder}/labels.txt has 2 label(s) but the input has 3 classes (one label per line, in class order)"),
        (config(), None, {}, "model 'detect': file 'labels.txt' not found in {folder} (it is written by `kiln generate` from the spec's files)"),
        (config(), "a\nb\nc\n", {"classes": "0,3,7"}, "model 'detect': parameter 'classes' names class(es) 3, 7, but the head has 3 classes (0..2)"),
        (
            config(head_dims=(4, 8)), "", {},
            "model 'detect': input 'output0' has dims [4, 8]; layout attributes_first needs [4 + classes, candidates] with a fixed 4 + classes of at least 5",
        ),
        (
            config(head_dims=(8, 4)), "a\nb\nc\n", {"layout": "candidates_first"},
            "model 'detect': input 'output0' has dims [8, 4]; layout candidates_first needs [candidates, 4 + classes] with a fixed 4 + classes of at least 5",
        ),
        (
            config(transform={"name": TRANSFORM, "data_type": "TYPE_FP32", "dims": [4]}), "", {},
            "model 'detect': kiln_detect needs two inputs, the head (TYPE_FP32 or TYPE_FP16, two dims) and the transform (TYPE_FP32 dims [6]), got output0 TYPE_FP32 [7, 8], letterbox TYPE_FP32 [4]",
        ),
        (
            config(outputs=[BOXES_5, {"name": "n", "data_type": "TYPE_INT64", "dims": [1]}]), "", {},
            f"model 'detect': output n TYPE_INT64 [1] is none of kiln_detect's outputs (max_detections 5): {CONTRACT_5}",
        ),
        (
            config(outputs=[BOXES_5]), "", {},
            f"model 'detect': config.pbtxt declares no output for scores, classes, labels, count; kiln_detect needs {CONTRACT_5} (max_detections 5; any names)",
        ),
        (
            config(outputs=[BOXES_5, {**BOXES_5, "name": "more_boxes"}]), "", {},
            "model 'detect': outputs 'boxes' and 'more_boxes' are both kiln_detect's boxes output; declare each output once",
        ),
        (
            config(max_detections=10), "a\nb\nc\n", {},
            f"model 'detect': output boxes TYPE_FP32 [10, 4] is none of kiln_detect's outputs (max_detections 5): {CONTRACT_5}",
        ),
    ],
)
def test_load_errors_are_named_whole(tmp_path: Path, cfg: dict, labels, params: dict, message: str) -> None:
    with pytest.raises(DetectLoadError) as caught:
        load(context(tmp_path, cfg, labels, **params))
    assert isinstance(caught.value, ModelLoadError)
    assert str(caught.value) == message.format(folder=tmp_path / "detect")


# -- the detector pipeline's specs -----------------------------------------------------------------------


DETECTOR_CLASSES = 18
DETECTOR = ModelSpec(
    name="detector",
    backend="kiln_onnx",
    inputs=(TensorSpec("images", "FP32", (3, 320, 320)),),
    outputs=(TensorSpec(HEAD, "FP32", (4 + DETECTOR_CLASSES, 2100)),),
    max_batch_size=8,
    dynamic_batching=DynamicBatching(max_queue_delay_us=500),
)
DETECTOR_LABELS = [f"thing_{i}" for i in range(DETECTOR_CLASSES)]


def test_detector_pipeline_validates_and_is_wired_through_the_letterbox() -> None:
    preprocess, detect_step, ensemble = pipelines.detector_pipeline(
        "object_detector", DETECTOR, DETECTOR_LABELS, max_detections=20, classes=(0, 3)
    )
    validate([DETECTOR, preprocess, detect_step, ensemble], paths.available_backends())
    assert (preprocess.name, detect_step.name, ensemble.max_batch_size) == (
        "object_detector_preprocess", "object_detector_detect", 8,
    )
    assert [(t.name, t.dtype, t.dims) for t in preprocess.outputs] == [
        ("images", "FP32", (3, 320, 320)), (pipelines.LETTERBOX, "FP32", (6,)),
    ]
    assert preprocess.parameters["resize_mode"] == "letterbox" and preprocess.parameters["pad_value"] == "114"
    assert [(t.name, t.dtype, t.dims) for t in detect_step.inputs] == [
        (HEAD, "FP32", (22, 2100)), (pipelines.LETTERBOX, "FP32", (6,)),
    ]
    assert detect_step.parameters["classes"] == "0,3"
    assert detect_step.files["labels.txt"].splitlines() == DETECTOR_LABELS
    assert [(t.name, t.dtype, t.dims) for t in ensemble.outputs] == [
        (pipelines.BOXES, "FP32", (20, 4)), (pipelines.DETECTION_SCORES, "FP32", (20,)),
        (pipelines.DETECTION_CLASSES, "INT64", (20,)), (pipelines.DETECTION_LABELS, "BYTES", (20,)),
        (pipelines.DETECTION_COUNT, "INT32", (1,)),
    ]
    assert [step.model for step in ensemble.steps] == [preprocess.name, "detector", detect_step.name]
    assert ensemble.steps[2].inputs == {HEAD: HEAD, pipelines.LETTERBOX: pipelines.LETTERBOX}


def test_detector_pipeline_on_a_model_without_its_steps_fails_validation() -> None:
    preprocess, _, ensemble = pipelines.detector_pipeline("object_detector", DETECTOR, DETECTOR_LABELS)
    with pytest.raises(SpecError) as caught:
        validate([DETECTOR, preprocess, ensemble], paths.available_backends())
    assert caught.value.problems[0] == (
        "ensemble 'object_detector': field 'steps[2].model' must name another served model; "
        "'object_detector_detect' is not one (known: detector, object_detector_preprocess)"
    )
    assert caught.value.problems[1:] == tuple(
        f"ensemble 'object_detector': field 'outputs[{i}]' '{name}' is produced by no step"
        for i, name in enumerate(pipelines.DETECTION_OUTPUTS)
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": ["a"]}, "model 'object_detector_detect': 1 labels for 18 classes"),
        ({"layout": "candidates_first", "dims": (2100, 4)}, "model 'detector': output 'output0' [2100, 4] holds no class scores in layout candidates_first (needs 4 + classes >= 5 attributes)"),
        ({"dims": (22,)}, "model 'detector': a detector's first output must have two dims, got [22]"),
        ({"layout": "nhwc"}, "model 'detector': layout must be one of attributes_first, candidates_first, got 'nhwc'"),
    ],
)
def test_detector_pipeline_refuses_labels_or_layouts_that_do_not_fit(kwargs: dict, message: str) -> None:
    labels = kwargs.pop("labels", DETECTOR_LABELS)
    model = DETECTOR
    if "dims" in kwargs:
        model = dataclasses.replace(DETECTOR, outputs=(TensorSpec(HEAD, "FP32", kwargs.pop("dims")),))
    with pytest.raises(ValueError) as caught:
        pipelines.detector_pipeline("object_detector", model, labels, **kwargs)
    assert str(caught.value) == message


def test_the_generated_steps_run_an_image_to_boxes_on_the_original(tmp_path: Path) -> None:
    """The two steps built from their generated configs (as Triton would), in process: a 640x480
    PNG through the letterbox step, a synthetic head standing in for the model, the detect step."""
    preprocess, detect_step, _ = pipelines.detector_pipeline("object_detector", DETECTOR, DETECTOR_LABELS)
    image_step = from_config(preprocess.name, config_dict(preprocess), dict(preprocess.parameters))
    model_dir = tmp_path / detect_step.name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "labels.txt").write_text(detect_step.files["labels.txt"])
    detect_cfg = config_dict(detect_step)
    step = load(LoadContext(detect_step.name, model_dir, model_dir / "1", detect_cfg, dict(detect_step.parameters)))

    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (40, 90, 160)).save(buffer, "PNG")
    prepared = image_step.run([{tensors.IMAGE: np.array([[buffer.getvalue()]], dtype=object)}])[0]
    assert prepared["images"].shape == (1, 3, 320, 320)
    raw = np.zeros((1, 4 + DETECTOR_CLASSES, 2100), np.float32)
    raw[0, :4, 7] = (160, 160, 100, 60)  # model pixels (110, 130, 210, 190)
    raw[0, 4 + 5, 7] = 0.9
    answer = step.run([{HEAD: raw, pipelines.LETTERBOX: prepared[pipelines.LETTERBOX]}])[0]
    assert answer[pipelines.DETECTION_COUNT].tolist() == [[1]]
    np.testing.assert_array_equal(answer[pipelines.BOXES][0, 0], [220, 180, 420, 300])
    assert answer[pipelines.DETECTION_LABELS][0, 0] == b"thing_5"
    assert answer[pipelines.DETECTION_CLASSES][0, 0] == 5
