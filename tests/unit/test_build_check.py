"""The check stage: ONNX Runtime against PyTorch within the spec's tolerance."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from kiln import tensors
from kiln.build import check, export
from kiln.models.digits import build as digits
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import TensorSpec, Tolerance

TOL = DIGITS.build.tolerance
LOGITS = tensors.DIGITS_LOGITS


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return digits.build_model().eval()


@pytest.fixture(scope="module")
def held() -> check.HeldOut:
    return digits.held_out(DIGITS.build.source)


@pytest.fixture(scope="module")
def reference(model: torch.nn.Module, held: check.HeldOut) -> dict[str, np.ndarray]:
    return check.run_batched(check.torch_runner(model, DIGITS), DIGITS, held.inputs)


@pytest.fixture(scope="module")
def good_export(
    model: torch.nn.Module, held: check.HeldOut, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("check") / "fp32.onnx"
    return export.export_onnx(model, DIGITS, export.example_inputs(DIGITS, held.inputs), path)


def _perturbed(source: Path, dest: Path, delta: float) -> Path:
    """A copy of `source` with `delta` added to one bias of the last layer (class 3)."""
    model = onnx.load(str(source))
    last_bias = [i for i in model.graph.initializer if i.name.endswith("bias")][-1]
    values = numpy_helper.to_array(last_bias).copy()
    values[3] += delta
    last_bias.CopyFrom(numpy_helper.from_array(values, last_bias.name))
    onnx.save(model, str(dest))
    return dest


def test_compare_identical_outputs_is_exact() -> None:
    a = {LOGITS: np.arange(6, dtype=np.float32).reshape(2, 3)}
    result = check.compare(a, a, TOL)
    assert result.ok
    assert (result.max_abs, result.max_rel, result.worst.violations) == (0.0, 0.0, 0)


def test_compare_measures_errors_and_finds_the_worst_item() -> None:
    ref = np.array([[1.0, 2.0], [4.0, 0.0], [10.0, 10.0]], dtype=np.float32)
    cand = ref.copy()
    cand[1, 0] += 0.5  # abs 0.5, rel 0.125: the worst against atol + rtol*|ref|
    cand[2, 1] += 0.02  # abs 0.02, rel 0.002: also out of tolerance (bound 0.011)
    result = check.compare({LOGITS: cand}, {LOGITS: ref}, Tolerance(atol=1e-3, rtol=1e-3))
    diff = result.worst
    assert not result.ok
    assert diff.name == LOGITS
    assert diff.max_abs == pytest.approx(0.5)
    assert diff.max_rel == pytest.approx(0.125)
    assert diff.worst_item == 1
    assert diff.worst_ratio == pytest.approx(0.5 / (1e-3 + 1e-3 * 4.0))
    assert (diff.violations, diff.elements) == (2, 6)
    loose = check.compare({LOGITS: cand}, {LOGITS: ref}, Tolerance(atol=0.6, rtol=0.0))
    assert loose.ok


def test_compare_picks_the_worst_of_several_outputs() -> None:
    ref = {"a": np.zeros((2, 2), np.float32), "b": np.ones((2, 2), np.float32)}
    cand = {"a": ref["a"] + 1e-6, "b": ref["b"].copy()}
    cand["b"][1, 1] = 2.0
    result = check.compare(cand, ref, TOL)
    assert result.worst.name == "b"
    assert result.worst.worst_item == 1
    assert [t.violations for t in result.tensors] == [0, 1]


def test_nan_is_never_within_tolerance() -> None:
    ref = np.ones((2, 2), np.float32)
    cand = ref.copy()
    cand[0, 1] = np.nan
    diff = check.compare({LOGITS: cand}, {LOGITS: ref}, Tolerance(atol=1e9, rtol=1e9)).worst
    assert diff.violations == 1
    assert math.isinf(diff.max_abs) and diff.worst_item == 0


def test_compare_refuses_missing_outputs_and_other_shapes() -> None:
    ref = {LOGITS: np.zeros((2, 10), np.float32)}
    with pytest.raises(ValueError, match=r"output\(s\) logits missing from the candidate"):
        check.compare({}, ref, TOL)
    with pytest.raises(ValueError, match=r"output 'logits' has shape \[2, 9\], the reference \[2, 10\]"):
        check.compare({LOGITS: np.zeros((2, 9), np.float32)}, ref, TOL)
    with pytest.raises(check.CheckError, match=r"model 'm', stage 'check': .*shape \[2, 9\]"):
        check.assert_close("m", {LOGITS: np.zeros((2, 9), np.float32)}, ref, TOL)


def test_assert_close_message_names_model_tensor_errors_tolerance_and_item() -> None:
    ref = np.zeros((4, 10), np.float32)
    cand = ref.copy()
    cand[2, 7] = 0.25
    with pytest.raises(check.CheckError) as info:
        check.assert_close("digits", {LOGITS: cand}, {LOGITS: ref}, TOL)
    message = str(info.value)
    assert message.startswith("model 'digits', stage 'check': ONNX Runtime output 'logits'")
    assert "max abs error 0.25" in message
    assert "max rel error inf" in message
    assert "worst at batch item 2" in message
    assert "1 of 40 elements" in message
    assert f"atol={TOL.atol:g}, rtol={TOL.rtol:g}" in message
    assert info.value.model == "digits" and info.value.stage == "check"
    assert isinstance(info.value, check.BuildError)


def test_check_passes_on_a_good_export(
    good_export: Path, held: check.HeldOut, reference: dict[str, np.ndarray]
) -> None:
    candidate = check.run_batched(check.artifact_runner(good_export, DIGITS), DIGITS, held.inputs)
    result = check.assert_close(DIGITS.name, candidate, reference, TOL)
    assert result.ok
    assert result.max_abs <= TOL.atol + TOL.rtol * float(np.abs(reference[LOGITS]).max())
    assert held.score([candidate[LOGITS]], [reference[LOGITS]]) == held.score(
        [reference[LOGITS]], [reference[LOGITS]]
    )


def test_check_fails_on_a_perturbed_export(
    good_export: Path, held: check.HeldOut, reference: dict[str, np.ndarray], tmp_path: Path
) -> None:
    delta = 0.01
    broken = _perturbed(good_export, tmp_path / "broken.onnx", delta)
    candidate = check.run_batched(check.artifact_runner(broken, DIGITS), DIGITS, held.inputs)
    ref = reference[LOGITS].astype(np.float64)
    ratio = np.abs(candidate[LOGITS] - ref) / (TOL.atol + TOL.rtol * np.abs(ref))
    worst_item = int(np.unravel_index(np.argmax(ratio), ratio.shape)[0])
    with pytest.raises(check.CheckError) as info:
        check.assert_close(DIGITS.name, candidate, reference, TOL)
    message = str(info.value)
    assert "model 'digits', stage 'check'" in message
    assert "output 'logits' differs from PyTorch" in message
    assert "max abs error 0.01" in message
    assert "max rel error" in message
    assert f"worst at batch item {worst_item}" in message
    assert f"{held.size} of {held.size * 10} elements out of tolerance" in message
    assert "atol=0.0001, rtol=0.001" in message


def test_check_fails_against_a_different_model(
    good_export: Path, held: check.HeldOut
) -> None:
    torch.manual_seed(1)
    other = digits.build_model().eval()
    other_ref = check.run_batched(check.torch_runner(other, DIGITS), DIGITS, held.inputs)
    candidate = check.run_batched(check.artifact_runner(good_export, DIGITS), DIGITS, held.inputs)
    with pytest.raises(check.CheckError, match="differs from PyTorch beyond the tolerance"):
        check.assert_close(DIGITS.name, candidate, other_ref, TOL)


def test_kiln_onnx_load_failure_is_a_check_error(good_export: Path) -> None:
    wrong = replace(DIGITS, inputs=(TensorSpec(tensors.DIGITS_PIXELS, "FP32", (1, 8, 9)),))
    with pytest.raises(check.CheckError, match=r"model 'digits', stage 'check': kiln_onnx cannot load"):
        check.load_served(wrong, good_export)


def test_plain_onnx_runner_for_other_backends(
    good_export: Path, held: check.HeldOut, reference: dict[str, np.ndarray]
) -> None:
    other = replace(DIGITS, backend="some_other_backend", parameters={})
    candidate = check.run_batched(check.artifact_runner(good_export, other), other, held.inputs)
    assert check.compare(candidate, reference, TOL).ok


def test_run_batched_chunks_by_max_batch_size_and_keeps_order() -> None:
    x = np.arange(150, dtype=np.float32).reshape(150, 1, 1, 1)
    sizes: list[int] = []

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = feed[tensors.DIGITS_PIXELS]
        sizes.append(len(batch))
        return {LOGITS: batch.reshape(len(batch), 1) * 2}

    out = check.run_batched(run, DIGITS, (x,))
    assert sizes == [64, 64, 22]
    np.testing.assert_array_equal(out[LOGITS][:, 0], np.arange(150) * 2)


def test_run_batched_without_a_batch_dim_runs_item_by_item() -> None:
    spec = replace(DIGITS, max_batch_size=0, dynamic_batching=None)
    x = np.arange(3, dtype=np.float32).reshape(3, 1)
    shapes: list[tuple[int, ...]] = []

    def run(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes.append(feed[tensors.DIGITS_PIXELS].shape)
        return {LOGITS: feed[tensors.DIGITS_PIXELS] + 1}

    out = check.run_batched(run, spec, (x,))
    assert shapes == [(1,)] * 3
    np.testing.assert_array_equal(out[LOGITS], x + 1)


def test_latency_runs_single_items_warmup_then_timed() -> None:
    seen: list[tuple[int, ...]] = []

    def run(feed: dict[str, np.ndarray]) -> None:
        seen.append(feed[tensors.DIGITS_PIXELS].shape)

    x = np.zeros((10, 1, 8, 8), np.float32)
    ms = check.latency_ms(run, DIGITS, (x,), warmup=2, runs=5)
    assert len(seen) == 7 and set(seen) == {(1, 1, 8, 8)}
    assert 0 <= ms < 1000


def test_latency_at_a_larger_batch_and_refused_batches() -> None:
    seen: list[tuple[int, ...]] = []

    def run(feed: dict[str, np.ndarray]) -> None:
        seen.append(feed[tensors.DIGITS_PIXELS].shape)

    x = np.zeros((10, 1, 8, 8), np.float32)
    check.latency_ms(run, DIGITS, (x,), batch=8, warmup=1, runs=2)
    assert seen == [(8, 1, 8, 8)] * 3
    with pytest.raises(ValueError, match=r"model 'digits': latency batch must be in 1..10 \(max_batch_size 64, 10 items given\), got 11"):
        check.latency_ms(run, DIGITS, (x,), batch=11)
    unbatched = replace(DIGITS, max_batch_size=0, dynamic_batching=None)
    with pytest.raises(ValueError, match=r"latency batch must be in 1..1 \(max_batch_size 0, 10 items given\), got 2"):
        check.latency_ms(run, unbatched, (x,), batch=2)


def test_budget_passes_within_and_exactly_at_the_budget() -> None:
    assert check.check_budget("digits", "int8", "test accuracy", 0.98, 0.98, 0.0) == 0.0
    assert check.check_budget("digits", "int8", "test accuracy", 0.99, 0.98, 0.0) == pytest.approx(-0.01)
    # 0.99 - 0.985 is 0.0050000000000000044 in floats: a drop equal to the budget still passes
    assert check.check_budget("digits", "int8", "test accuracy", 0.985, 0.99, 0.005) == pytest.approx(0.005)


def test_budget_error_names_model_variant_metric_values_drop_and_budget() -> None:
    with pytest.raises(check.BudgetError) as info:
        check.check_budget(
            "digits", "int8", "test accuracy", 0.9694, 0.9861, 0.005, detail="build.variants[2]"
        )
    error = info.value
    assert str(error) == (
        "model 'digits', stage 'budget': variant int8: test accuracy 0.9694 is 0.0167 below the "
        "FP32 PyTorch model's 0.9861, more than its budget max_metric_drop 0.005; build.variants[2]"
    )
    assert (error.model, error.stage, error.variant, error.metric) == ("digits", "budget", "int8", "test accuracy")
    assert (error.value, error.reference, error.budget) == (0.9694, 0.9861, 0.005)
    assert error.drop == pytest.approx(0.0167)
    assert isinstance(error, check.BuildError)
    with pytest.raises(check.BudgetError, match=r"variant fp16: top-1 agreement nan is nan below the FP32 source ONNX model's 1\.0000"):
        check.check_budget("m", "fp16", "top-1 agreement", float("nan"), 1.0, 1.0, reference_name="FP32 source ONNX")
