"""text_encoder: a small BERT-style encoder (BERT-mini dims) with a WordPiece tokenizer.

The transformer workload: token ids and an attention mask in, per-token embeddings out; the
`kiln_text` preprocess tokenizes with the published tokenizer.json and the `kiln_pool` postprocess
mean-pools with the mask. Batch and sequence dims are both variable (a request's texts are padded
to their longest), so there is no warmup request (Triton's warmup needs fixed dims). The tokenizer
is trained at build time on Python standard-library docstrings; the weights are seeded and
untrained (`kiln.build.text_encoder` says why).

Budgets, measured here (AMD EPYC, 2 cores; Python 3.11.7, onnxruntime 1.31) on the 128 evaluation
texts with the metric "cosine similarity to FP32" (per text, cosine of the mask-mean-pooled
embeddings against the FP32 PyTorch model's, averaged):
- fp32, ONNX Runtime vs PyTorch: max abs error 1.7e-6 on embeddings of magnitude up to 4.9, so
  atol 1e-4 / rtol 1e-3 holds with a margin of about 60x; cosine 1.000000. `min_accuracy` 0.999
  is the end-to-end yardstick (FP32 as served must keep cosine >= 0.999).
- fp16: cosine drop 2e-7. Budget 0.001: the yardstick again (a served FP16 model keeps cosine
  >= 0.999); a real FP16 fault is far beyond it (a NaN scores -1, an ignored attention mask drops
  the cosine by 0.13, elementwise noise of 0.1 by 0.004).
- int8 (`kiln.build.quantize` defaults: static QDQ, per-channel weights, MinMax calibration on the
  64 calibration texts): cosine drop 0.0035 (worst text 0.9916). Budget 0.02: about 6x the
  measured drop, leaving room for other CPUs' kernels and other quantizer settings (0.0026 to
  0.0035 here), while an ignored mask (0.13) or a broken calibration still fails.
"""

from __future__ import annotations

from kiln import tensors
from kiln.spec import (
    BuildSpec,
    DynamicBatching,
    InstanceGroup,
    ModelSpec,
    TensorSpec,
    TextEncoderSource,
    Tolerance,
    Variant,
)

HIDDEN_SIZE = 256
"""Width of the token embeddings (BERT-mini: 4 layers, 256 wide, 4 heads, 1024 feed-forward)."""

SPEC = ModelSpec(
    name="text_encoder",
    description=(
        "BERT-mini-sized encoder (seeded, untrained weights) with a WordPiece tokenizer trained "
        "at build time on Python standard-library docstrings"
    ),
    backend="kiln_onnx",
    inputs=(
        TensorSpec(tensors.TEXT_INPUT_IDS, "INT64", (-1,)),
        TensorSpec(tensors.TEXT_ATTENTION_MASK, "INT64", (-1,)),
    ),
    outputs=(TensorSpec(tensors.TEXT_TOKEN_EMBEDDINGS, "FP32", (-1, HIDDEN_SIZE)),),
    max_batch_size=32,
    dynamic_batching=DynamicBatching(preferred_batch_sizes=(8, 16, 32), max_queue_delay_us=1000),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={"intra_op_threads": "1", "inter_op_threads": "1"},
    build=BuildSpec(
        source=TextEncoderSource(
            seed=0,
            vocab_size=4096,
            hidden_size=HIDDEN_SIZE,
            layers=4,
            heads=4,
            intermediate_size=1024,
            max_length=128,
            eval_texts=128,
            calibration_texts=64,
        ),
        tolerance=Tolerance(atol=1e-4, rtol=1e-3),
        min_accuracy=0.999,
        variants=(
            Variant("fp32"),
            Variant("fp16", max_metric_drop=0.001),
            Variant("int8", max_metric_drop=0.02),
        ),
    ),
)
