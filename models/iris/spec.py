"""iris: a tiny MLP trained at build time on scikit-learn's iris flowers (the example model folder).

Four measurements in centimetres (sepal length and width, petal length and width) in, three class
logits out (setosa, versicolor, virginica). It exists to show what adding a model takes: this
folder and nothing else (docs/models.md walks through it).
"""

from dataclasses import dataclass, field
from typing import ClassVar

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

BUILD_RANK = 15
"""A few seconds to build: right after digits."""

MEASUREMENTS = "measurements"
"""FP32 [batch, 4]: sepal length, sepal width, petal length, petal width, in centimetres."""
LOGITS = "logits"
"""FP32 [batch, 3]: unnormalized scores of setosa, versicolor, virginica."""


@dataclass(frozen=True)
class IrisMLPSource:
    """An MLP trained on scikit-learn's 150 iris flowers (a seeded, stratified split).

    Attributes:
        seed: Seeds the split, the weights and shuffling.
        test_fraction: Share of the flowers held out for evaluation.
        hidden: Width of the hidden layer.
        epochs: Training epochs (full batch).
        learning_rate: Adam's learning rate.
    """

    tools: ClassVar[tuple[str, ...]] = ("scikit-learn",)
    """The data set ships inside scikit-learn: its version shapes the model."""

    seed: int = field(default=0, metadata=source_range(0, 2**32 - 1))
    test_fraction: float = field(default=0.4, metadata=source_range(0.1, 0.9, integer=False))
    hidden: int = field(default=16, metadata=source_range(1, 1024))
    epochs: int = field(default=300, metadata=source_range(1, 100_000))
    learning_rate: float = field(default=0.02, metadata=source_range(1e-6, 1.0, integer=False))


SPEC = ModelSpec(
    name="iris",
    description="MLP on scikit-learn's iris flowers (the example model folder; trained at build time)",
    backend="kiln_onnx",
    inputs=(TensorSpec(MEASUREMENTS, "FP32", (4,)),),
    outputs=(TensorSpec(LOGITS, "FP32", (3,)),),
    max_batch_size=64,
    dynamic_batching=DynamicBatching(max_queue_delay_us=200),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    warmup=(Warmup(name="zeros", batch_size=1, data="zero"),),
    parameters={"intra_op_threads": "1", "inter_op_threads": "1"},
    build=BuildSpec(
        source=IrisMLPSource(),
        tolerance=Tolerance(atol=1e-4, rtol=1e-3),
        # Iris is nearly linearly separable: a working MLP classifies 90% or more of the 60
        # held-out flowers; a broken one (constant or scrambled logits) about a third.
        min_accuracy=0.85,
        variants=(
            Variant("fp32"),
            # INT8 may misclassify 3 more of the 60 held-out flowers than FP32.
            Variant("int8", max_metric_drop=0.05),
        ),
    ),
)
