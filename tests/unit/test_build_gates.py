"""Per-output gates: each output measured by what it means, and no variant with a dead output.

The two failures that reached users (issue 17) are reproduced here: an INT8 detector whose class
scores were all 0 passed a whole-tensor cosine of 0.9995, and a perfect FP16 face network was
refused because ten landmark regressions were read as class scores.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from kiln import paths, tensors
from kiln import repository as repository_files
from kiln.build import gates, pipeline, publish, quantize
from kiln.build.check import BuildError
from kiln.build.gates import OutputGateError
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import (
    BuildSpec,
    ModelSpec,
    OnnxFileSource,
    OutputCheck,
    SpecError,
    TensorSpec,
    Tolerance,
    Variant,
    validate,
)

RNG = np.random.default_rng(0)
ANCHORS, CLASSES, IMAGES = 400, 18, 16
"""A YOLO-style head: [4 + classes, anchors] per image (cx, cy, w, h in pixels, then scores)."""


def _spec(outputs: tuple[TensorSpec, ...], checks: tuple[OutputCheck, ...] = ()) -> ModelSpec:
    return ModelSpec(
        name="net",
        backend="kiln_onnx",
        inputs=(TensorSpec("images", "FP32", (3, 8, 8)),),
        outputs=outputs,
        max_batch_size=8,
        build=BuildSpec(
            source=OnnxFileSource("net.onnx", "held.npz"), outputs=checks,
            variants=(Variant("fp32"), Variant("int8", max_metric_drop=0.05)),
        ),
    )


def _detections() -> np.ndarray:
    boxes = RNG.uniform(20, 300, size=(IMAGES, 4, ANCHORS))
    scores = RNG.uniform(0, 0.2, size=(IMAGES, CLASSES, ANCHORS))
    for image in range(IMAGES):  # a few confident detections per photo, as a trained detector gives
        hits = RNG.choice(ANCHORS, size=8, replace=False)
        scores[image, RNG.integers(0, CLASSES, size=8), hits] = RNG.uniform(0.6, 0.95, size=8)
    return np.concatenate([boxes, scores], axis=1).astype(np.float32)


DETECTOR = TensorSpec("output0", "FP32", (4 + CLASSES, ANCHORS))


def test_a_dead_score_column_is_refused_though_the_whole_tensor_cosine_is_near_one() -> None:
    fp32 = _detections()
    int8 = fp32.copy()
    int8[:, 4:, :] = 0.0  # every class score dead, boxes intact: what the broken INT8 detector did
    # The old gate: one cosine over the whole output, boxes (20-300) swamping the scores (0-1).
    assert gates.cosine_per_item(int8.reshape(IMAGES, 1, -1), fp32.reshape(IMAGES, 1, -1)) > 0.999
    spec = _spec((DETECTOR,))
    with pytest.raises(OutputGateError) as error:
        gates.check_variant(spec, "int8", {"output0": int8}, {"output0": fp32}, default_budget=0.05, gated=True)
    message = str(error.value)
    assert "variant int8: output 'output0': dead: 18 of 22 columns (per-item axis 0: 4, 5, 6" in message
    assert "vary in FP32 but not in the variant" in message and "constant near 0" in message
    assert "budget: range at least 0.01x FP32's" in message
    assert error.value.output == "output0" and error.value.variant == "int8"


def test_a_detection_output_is_scored_by_recall_of_fp32_boxes() -> None:
    fp32 = _detections()
    check = OutputCheck("output0", "detections", max_drop=0.1)
    output = gates.resolve(_spec((DETECTOR,), (check,)))[0]
    assert gates.score(output, fp32, fp32) == 1.0
    shifted = fp32.copy()
    shifted[:, 0, :] += 2.0  # boxes 2 px to the right: every box still matches at IoU 0.5
    assert gates.score(output, shifted, fp32) == 1.0
    dead = fp32.copy()
    dead[:, 4:, :] *= 0.1  # scores collapse under the threshold: nothing found
    assert gates.score(output, dead, fp32) == 0.0
    wrong_class = fp32.copy()
    wrong_class[:, 4:, :] = np.roll(fp32[:, 4:, :], 1, axis=1)  # same boxes, other classes
    assert gates.score(output, wrong_class, fp32) == 0.0


def test_tiny_differences_of_landmark_regressions_pass_as_regression() -> None:
    landmarks = TensorSpec("landmarks", "FP32", (10,))
    # Ten coordinates of five landmarks per face: across faces they span the image, within one face
    # they lie close together, so an argmax over them is decided by a hair.
    face = RNG.uniform(0.2, 0.8, size=(40, 1))
    fp32 = (face + RNG.normal(0, 0.0003, size=(40, 10))).astype(np.float32)
    fp16 = fp32 + RNG.uniform(-0.00067, 0.00067, size=fp32.shape).astype(np.float32)
    # The old gate read (k,) outputs as class scores: argmax over coordinates flips on 0.00067.
    assert gates.top1_agreement(fp16, fp32) < 0.98
    output = gates.resolve(_spec((landmarks,)))[0]
    assert (output.check.kind, output.declared) == ("regression", False)
    scores = gates.check_variant(
        _spec((landmarks,)), "fp16", {"landmarks": fp16}, {"landmarks": fp32}, default_budget=0.01, gated=True
    )
    assert scores[0].value > 0.99 and scores[0].budget == 0.01


def test_a_regression_beyond_its_budget_names_output_metric_value_and_budget() -> None:
    fp32 = RNG.uniform(0, 10, size=(30, 4)).astype(np.float32)
    off = fp32.copy()
    off[:, 2] += 1.5  # column 2 off by 15% of its range
    spec = _spec((TensorSpec("pose", "FP32", (4,)),), (OutputCheck("pose", "regression", max_drop=0.1),))
    with pytest.raises(OutputGateError) as error:
        gates.check_variant(spec, "int8", {"pose": off}, {"pose": fp32}, default_budget=0.5, gated=False)
    message = str(error.value)
    assert message.startswith("model 'net', stage 'gate': variant int8: output 'pose': 1 - worst column's max abs error / its FP32 range 0.8")
    assert "more than its budget 0.1 (regression, declared)" in message


def test_nan_where_fp32_is_finite_and_a_saturated_column_are_refused() -> None:
    fp32 = RNG.normal(size=(20, 5)).astype(np.float32)
    spec = _spec((TensorSpec("logits", "FP32", (5,)),))
    nan = fp32.copy()
    nan[3, 1] = np.nan
    with pytest.raises(OutputGateError, match=r"1 of 100 values are NaN or infinite where FP32's are finite"):
        gates.check_variant(spec, "fp16", {"logits": nan}, {"logits": fp32}, default_budget=1.0, gated=False)
    saturated = fp32.copy()
    saturated[:, 4] = 65504.0  # FP16's largest value, everywhere
    with pytest.raises(OutputGateError, match=r"dead: 1 of 5 columns \(per-item axis 0: 4\)"):
        gates.check_variant(spec, "fp16", {"logits": saturated}, {"logits": fp32}, default_budget=1.0, gated=False)


def test_a_column_constant_in_fp32_too_is_not_dead() -> None:
    fp32 = RNG.normal(size=(20, 3)).astype(np.float32)
    fp32[:, 0] = 1.0  # a bias-only output FP32 itself holds constant
    spec = _spec((TensorSpec("y", "FP32", (3,)),))
    scores = gates.check_variant(spec, "int8", {"y": fp32.copy()}, {"y": fp32}, default_budget=0.0, gated=True)
    assert scores[0].value == 1.0


@pytest.mark.parametrize(
    ("tensor", "kind"),
    [
        (TensorSpec("logits", "FP32", (10,)), "class_scores"),
        (TensorSpec("class_probs", "FP32", (3,)), "class_scores"),
        (TensorSpec("landmarks", "FP32", (10,)), "regression"),
        (TensorSpec("output", "FP32", (1000,)), "regression"),
        (TensorSpec("scores", "FP32", (1,)), "regression"),
        (TensorSpec("token_embeddings", "FP32", (-1, 256)), "embedding"),
        (TensorSpec("output0", "FP32", (22, 2100)), "regression"),
    ],
)
def test_the_inference_rule(tensor: TensorSpec, kind: str) -> None:
    assert gates.infer_kind(tensor) == kind


def test_the_columns_of_each_kind() -> None:
    detector = np.zeros((2, 22, 2100))
    assert gates.column_axis(OutputCheck("o", "regression"), detector) == 1  # the 22 channels
    assert gates.column_axis(OutputCheck("o", "detections"), np.zeros((2, 2100, 22))) == 2
    assert gates.column_axis(OutputCheck("o", "embedding"), np.zeros((2, 7, 256))) == 2
    assert gates.column_axis(OutputCheck("o", "regression", column_axis=1), detector) == 2


def test_output_checks_are_validated_with_the_spec() -> None:
    outputs = (TensorSpec("logits", "FP32", (10,)),)
    checks = (
        OutputCheck("nope", "regression"),
        OutputCheck("logits", "boxes"),
        OutputCheck("logits", "class_scores", max_drop=2.0, column_axis=3),
        OutputCheck("logits", "detections"),
    )
    with pytest.raises(SpecError) as error:
        validate([replace(_spec(outputs, checks), backend="kiln_onnx")], paths.available_backends())
    text = str(error.value)
    assert "field 'build.outputs[0].name' must name an output (logits), got 'nope'" in text
    assert "field 'build.outputs[1].kind' must be one of class_scores, probabilities, regression, embedding, detections, got 'boxes'" in text
    assert "field 'build.outputs[2].max_drop' must be a number in 0..1 or None, got 2.0" in text
    assert "field 'build.outputs[2].column_axis' must be a per-item axis of 'logits' (0..0), got 3" in text
    assert "field 'build.outputs[3].kind' detections needs a 2-D output" in text


# --- through the build pipeline ------------------------------------------------------------------


def _with_dead_column(source: Path, dest: Path, output: str, column: int, width: int) -> None:
    """`source` with `output`'s column `column` multiplied by 0 (what a broken quantizer does)."""
    model = onnx.load(source)
    raw = f"{output}_before_gate_test"
    for node in model.graph.node:
        node.output[:] = [raw if name == output else name for name in node.output]
    mask = np.ones((width,), np.float32)
    mask[column] = 0.0
    model.graph.initializer.append(numpy_helper.from_array(mask, "dead_column_mask"))
    model.graph.node.append(helper.make_node("Mul", [raw, "dead_column_mask"], [output]))
    onnx.save(model, dest)


def test_the_build_refuses_a_variant_with_a_dead_column_and_publishes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.models.digits import build as digits

    fast = replace(DIGITS, build=replace(DIGITS.build, source=replace(DIGITS.build.source, epochs=3), min_accuracy=None))
    artifacts, repository = tmp_path / "artifacts", tmp_path / "repo"
    pipeline.build([replace(fast, build=replace(fast.build, variants=(Variant("fp32"),)))],
                   artifacts=artifacts, repository=repository, out=open(tmp_path / "log", "w"),
                   backends=paths.available_backends())
    held = digits.held_out(fast.build.source)
    npz = tmp_path / "held.npz"
    np.savez(npz, **{tensors.DIGITS_PIXELS: held.inputs[0], f"calibration/{tensors.DIGITS_PIXELS}": held.calibration[0]})
    user = replace(
        fast, name="mine",
        build=BuildSpec(
            source=OnnxFileSource(str(artifacts / "digits" / "fp32.onnx"), str(npz)),
            tolerance=Tolerance(atol=1e-4, rtol=1e-3),
            variants=(Variant("fp32"), Variant("int8", max_metric_drop=0.5)),
        ),
    )
    real_to_int8 = quantize.to_int8

    def broken_int8(fp32: Path, dest: Path, *args: object, **kwargs: object) -> Path:
        real_to_int8(fp32, dest, *args, **kwargs)
        _with_dead_column(Path(dest), Path(dest), tensors.DIGITS_LOGITS, 3, 10)
        return Path(dest)

    monkeypatch.setattr(quantize, "to_int8", broken_int8)
    with pytest.raises(BuildError) as error:
        pipeline.build([user], artifacts=artifacts, repository=repository, out=open(tmp_path / "log2", "w"),
                       backends=paths.available_backends())
    assert isinstance(error.value, OutputGateError)
    assert "model 'mine', stage 'gate': variant int8: output 'logits': dead: 1 of 10 columns (per-item axis 0: 3)" in str(error.value)
    assert not (repository / "mine").exists() and not (repository / "mine_int8").exists()


def test_an_optional_variant_its_gates_refuse_is_reported_and_the_others_are_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import json

    fast = replace(DIGITS, build=replace(
        DIGITS.build, source=replace(DIGITS.build.source, epochs=3), min_accuracy=None,
        variants=(Variant("fp32"), Variant("fp16", max_metric_drop=0.5),
                  Variant("int8", max_metric_drop=0.5, optional=True)),
    ))
    real_to_int8 = quantize.to_int8

    def broken_int8(fp32: Path, dest: Path, *args: object, **kwargs: object) -> Path:
        real_to_int8(fp32, dest, *args, **kwargs)
        _with_dead_column(Path(dest), Path(dest), tensors.DIGITS_LOGITS, 3, 10)
        return Path(dest)

    monkeypatch.setattr(quantize, "to_int8", broken_int8)
    artifacts, repository = tmp_path / "artifacts", tmp_path / "repo"

    def build() -> tuple[list, str]:
        out = io.StringIO()
        results = pipeline.build([fast], artifacts=artifacts, repository=repository, out=out,
                                 backends=paths.available_backends())
        return results, out.getvalue()

    # A config for every variant from before (`kiln generate`): the refused one's must go.
    repository_files.write([fast], repository)
    assert (repository / "digits_int8" / "config.pbtxt").is_file()
    results, log = build()
    assert [(r.variant, r.status) for r in results] == [("fp32", "built"), ("fp16", "built"), ("int8", "refused")]
    assert "[digits] int8: REFUSED and not published (an optional variant; the others are): " in log
    assert "output 'logits': dead: 1 of 10 columns" in results[2].reason
    assert (repository / "digits" / "1" / "model.onnx").is_file()
    assert (repository / "digits_fp16" / "1" / "model.onnx").is_file()
    assert not (repository / "digits_int8" / "1" / "model.onnx").exists()
    manifest = json.loads((artifacts / "digits" / "manifest.json").read_text())
    assert list(manifest["variants"]) == ["fp32", "fp16"] and "dead" in manifest["refused"]["int8"]
    # No config for the refused variant (the server would fail to load it), and the drift check
    # agrees once it knows what the last build refused.
    assert (repository / "digits" / "config.pbtxt").is_file()
    assert (repository / "digits_fp16" / "config.pbtxt").is_file()
    assert not (repository / "digits_int8").exists()
    refused = publish.refused_served_names([fast], artifacts)
    assert list(refused) == ["digits_int8"] and "dead" in refused["digits_int8"]
    assert repository_files.stale([fast], repository, refused=refused) == []
    assert any("digits_int8" in p and "missing" in p for p in repository_files.stale([fast], repository))
    repository_files.write([fast], repository)  # a generate that ignored the refusal...
    assert "the last build refused this optional variant" in repository_files.stale(
        [fast], repository, refused=refused
    )[0]  # ...is caught, and the next write that knows removes it again
    repository_files.write([fast], repository, refused=refused)
    assert not (repository / "digits_int8").exists()
    # Up to date next time, and the refusal is still reported.
    results, log = build()
    assert [(r.variant, r.status) for r in results][-1] == ("int8", "refused (last build)")
    assert "digits (int8): refused (last build), not published: " in log


def test_fp32_cannot_be_optional() -> None:
    spec = replace(DIGITS, build=replace(DIGITS.build, variants=(Variant("fp32", optional=True),)))
    with pytest.raises(SpecError, match=r"'build.variants\[0\].optional' cannot be true for fp32"):
        validate([spec], paths.available_backends())


def median_relative_error_score(candidate: np.ndarray, reference: np.ndarray) -> float:
    """A user's metric for the test below: 1 - the median relative error."""
    return float(1.0 - np.median(np.abs(candidate - reference) / (np.abs(reference) + 1e-6)))


def test_a_user_metric_replaces_the_kind_s_and_liveness_still_holds() -> None:
    spec = _spec(
        (TensorSpec("pose", "FP32", (4,)),),
        (OutputCheck("pose", "regression", max_drop=0.05, metric=f"{__name__}:median_relative_error_score"),),
    )
    fp32 = RNG.uniform(1, 10, size=(30, 4)).astype(np.float32)
    close = fp32 * 1.01
    scores = gates.check_variant(spec, "int8", {"pose": close}, {"pose": fp32}, default_budget=0.0, gated=False)
    assert scores[0].value == pytest.approx(0.99, abs=1e-3)
    assert gates.metric_name(scores[0].output) == f"{__name__}:median_relative_error_score (the user's metric)"
    far = fp32 * 1.2
    with pytest.raises(OutputGateError, match=r"median_relative_error_score \(the user's metric\) 0\.8000, 0\.2000 below"):
        gates.check_variant(spec, "int8", {"pose": far}, {"pose": fp32}, default_budget=0.0, gated=False)
    dead = fp32.copy()
    dead[:, 1] = 5.0
    with pytest.raises(OutputGateError, match="dead: 1 of 4 columns"):
        gates.check_variant(spec, "int8", {"pose": dead}, {"pose": fp32}, default_budget=0.0, gated=False)
    missing = _spec((TensorSpec("pose", "FP32", (4,)),), (OutputCheck("pose", "regression", metric="no_such_mod:f"),))
    with pytest.raises(OutputGateError, match=r"output 'pose': its metric 'no_such_mod:f' cannot be loaded"):
        gates.check_variant(missing, "int8", {"pose": fp32}, {"pose": fp32}, default_budget=0.0, gated=False)
