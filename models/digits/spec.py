"""digits: a small CNN trained at build time on scikit-learn's handwritten digits.

The high-QPS, tiny-compute workload: 8x8 grey images in, 10 logits out. Dynamic batching gathers
concurrent requests into one ONNX Runtime run.
"""

from dataclasses import dataclass, field
from typing import ClassVar

from kiln import tensors
from kiln.spec import (
    BuildSpec,
    DynamicBatching,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    Tolerance,
    Variant,
    Warmup,
    source_range,
)

BUILD_RANK = 10
"""Builds before folders of a higher rank (kiln.registry): cheap models first, so a broken build
fails fast."""


@dataclass(frozen=True)
class DigitsCNNSource:
    """A small CNN trained at build time on scikit-learn's handwritten digits (8x8, 10 classes).

    Attributes:
        seed: Seeds the train/test split, weight init and shuffling.
        test_fraction: Share of the 1,797 images held out for evaluation.
        epochs: Training epochs.
        batch_size: Training batch size.
        learning_rate: Adam's learning rate.
        calibration_size: Training images used to calibrate INT8 (never test images).
    """

    tools: ClassVar[tuple[str, ...]] = ("scikit-learn",)
    """Distributions whose versions shape the built model (hashed into its rebuild decision)."""

    seed: int = field(default=0, metadata=source_range(0, 2**32 - 1))
    test_fraction: float = field(default=0.2, metadata=source_range(0.05, 0.95, integer=False))
    epochs: int = field(default=30, metadata=source_range(1, 1000))
    batch_size: int = field(default=32, metadata=source_range(1, 4096))
    learning_rate: float = field(default=2e-3, metadata=source_range(1e-6, 1.0, integer=False))
    calibration_size: int = field(default=256, metadata=source_range(1, 1437))


INT8_MAX_DROP = 0.005
"""The issue's budget: digits INT8 at most 0.5 points of test accuracy under FP32."""
FP16_MAX_DROP = 0.005

SPEC = ModelSpec(
    name="digits",
    description="CNN on scikit-learn's 8x8 handwritten digits (trained at build time)",
    backend="kiln_onnx",
    inputs=(TensorSpec(tensors.DIGITS_PIXELS, "FP32", (1, 8, 8)),),
    outputs=(TensorSpec(tensors.DIGITS_LOGITS, "FP32", (10,)),),
    max_batch_size=64,
    dynamic_batching=DynamicBatching(preferred_batch_sizes=(16, 32, 64), max_queue_delay_us=500),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    warmup=(Warmup(name="zeros", batch_size=1, data="zero"),),
    parameters={"intra_op_threads": "1", "inter_op_threads": "1"},
    build=BuildSpec(
        source=DigitsCNNSource(seed=0, test_fraction=0.2, epochs=30, batch_size=32),
        tolerance=Tolerance(atol=1e-4, rtol=1e-3),
        min_accuracy=0.95,
        variants=(
            Variant("fp32"),
            Variant("fp16", max_metric_drop=FP16_MAX_DROP),
            Variant("int8", max_metric_drop=INT8_MAX_DROP),
        ),
    ),
)
