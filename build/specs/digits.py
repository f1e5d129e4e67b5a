"""digits: a small CNN trained at build time on scikit-learn's handwritten digits.

The high-QPS, tiny-compute workload: 8x8 grey images in, 10 logits out. Dynamic batching gathers
concurrent requests into one ONNX Runtime run.
"""

from kiln import tensors
from kiln.spec import (
    BuildSpec,
    DigitsCNNSource,
    DynamicBatching,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    Tolerance,
    Variant,
    Warmup,
)

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
