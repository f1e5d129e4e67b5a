"""text_embedder: UTF-8 text -> kiln_text -> text_encoder -> kiln_pool -> sentence embedding.

Three served models and the ensemble that wires them:
- `text_tokenizer` (kiln_text): TEXT BYTES [1] -> input_ids, attention_mask INT64 [seq], with the
  tokenizer.json the build published beside text_encoder, truncating at text_encoder's
  `max_length` (its position embeddings) and padding each request to the smallest length bucket
  (`LENGTH_BUCKETS`) holding its longest text.
- `text_encoder` (FP32; the model of this folder, `spec.py`): ids and mask -> token embeddings.
- `text_pool` (kiln_pool): token embeddings and the same mask -> mean over real tokens, L2-normalized
  -> EMBEDDING FP32 [HIDDEN_SIZE].
The attention mask has one producer (the tokenizer) and two consumers (the encoder and the pool).

Batching: every step keeps its dynamic batcher at text_encoder's max_batch_size (32), which is
also the ensemble's (the pipeline contract). The tokenizer and the pool are cheap next to the
encoder, so they wait only `STEP_QUEUE_DELAY_US` for others to join a batch.
"""

from __future__ import annotations

from kiln import tensors
from kiln.spec import DynamicBatching, EnsembleSpec, EnsembleStep, InstanceGroup, ModelSpec, TensorSpec

from .spec import HIDDEN_SIZE
from .spec import SPEC as TEXT_ENCODER

TOKENIZER = "text_tokenizer"
"""The kiln_text step's model name."""
POOL = "text_pool"
"""The kiln_pool step's model name."""
MAX_BATCH_SIZE = 32
"""The pipeline contract's batch size; text_encoder's max_batch_size is the same."""
MAX_TEXT_BYTES = 16384
"""Longest text accepted (UTF-8 bytes). 128 tokens of English prose are about 700 bytes, so this
leaves room for any text a client would send whole and truncate, while a 16 KiB text still
tokenizes in about 8 ms here; a larger body is a client error, not a tokenizer's workload."""
STEP_QUEUE_DELAY_US = 100
"""How long the tokenizer and the pool wait for other requests to join a batch."""
LENGTH_BUCKETS = "8,16,24,32,48,64,96"
"""kiln_text's `length_buckets` (128, max_length, is the implicit last): each request is padded to
the smallest bucket holding its longest text, so requests of different token lengths reach
text_encoder in one of eight shapes: those of one bucket share its dynamic batches (Triton batches
only equal shapes) and, within a batch, one ONNX Runtime call (kiln_onnx groups by shape).

Fine buckets, because on the CPU the encoder's time grows with the padded length: in ONNX
Runtime, 18 texts of 36 tokens took 4.32 ms each alone, 3.43 in one call, 4.65 padded to 48 and
6.35 padded to 64 (`benchmarks.text_lengths --inprocess`). Served (`benchmarks.text_lengths`,
docs/pipelines.md "Text batches across lengths"), concurrency 16: on the mixed-length load-test
mix these buckets served as many requests/s as no buckets (median 180 vs 180, repeats spread
+-20%; "16,32,64": 173), and on one-length traffic of 36 tokens about 28% fewer (167 vs 232;
"16,32,64": 115). Without ragged batching (which the spec cannot express yet) the encoder's
average batch on the mix is only 1.22 (1.05 without buckets): Triton closes a batch at each
change of shape."""

assert TEXT_ENCODER.build is not None
_MAX_LENGTH = TEXT_ENCODER.build.source.max_length  # type: ignore[union-attr]
_ids = TensorSpec(tensors.TEXT_INPUT_IDS, "INT64", (-1,))
_mask = TensorSpec(tensors.TEXT_ATTENTION_MASK, "INT64", (-1,))

TOKENIZER_SPEC = ModelSpec(
    name=TOKENIZER,
    description="kiln_text: UTF-8 texts -> WordPiece ids and attention mask for text_encoder",
    backend="kiln_text",
    inputs=(TensorSpec(tensors.TEXT, "BYTES", (1,)),),
    outputs=(_ids, _mask),
    max_batch_size=MAX_BATCH_SIZE,
    dynamic_batching=DynamicBatching(max_queue_delay_us=STEP_QUEUE_DELAY_US),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={
        "tokenizer_model": TEXT_ENCODER.name,
        "max_length": str(_MAX_LENGTH),
        "max_text_bytes": str(MAX_TEXT_BYTES),
        "truncation": "true",
        "length_buckets": LENGTH_BUCKETS,
    },
)

POOL_SPEC = ModelSpec(
    name=POOL,
    description="kiln_pool: token embeddings and mask -> mean-pooled, L2-normalized embedding",
    backend="kiln_pool",
    inputs=(TensorSpec(tensors.TEXT_TOKEN_EMBEDDINGS, "FP32", (-1, HIDDEN_SIZE)), _mask),
    outputs=(TensorSpec(tensors.EMBEDDING, "FP32", (HIDDEN_SIZE,)),),
    max_batch_size=MAX_BATCH_SIZE,
    dynamic_batching=DynamicBatching(max_queue_delay_us=STEP_QUEUE_DELAY_US),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={"normalize": "true"},
)

TEXT_EMBEDDER = EnsembleSpec(
    name=tensors.TEXT_EMBEDDER,
    description="UTF-8 text -> tokenize -> text_encoder (FP32) -> mean-pool, L2-normalize",
    inputs=(TensorSpec(tensors.TEXT, "BYTES", (1,)),),
    outputs=(TensorSpec(tensors.EMBEDDING, "FP32", (HIDDEN_SIZE,)),),
    steps=(
        EnsembleStep(
            TOKENIZER,
            inputs={tensors.TEXT: tensors.TEXT},
            outputs={
                tensors.TEXT_INPUT_IDS: tensors.TEXT_INPUT_IDS,
                tensors.TEXT_ATTENTION_MASK: tensors.TEXT_ATTENTION_MASK,
            },
        ),
        EnsembleStep(
            TEXT_ENCODER.name,
            inputs={
                tensors.TEXT_INPUT_IDS: tensors.TEXT_INPUT_IDS,
                tensors.TEXT_ATTENTION_MASK: tensors.TEXT_ATTENTION_MASK,
            },
            outputs={tensors.TEXT_TOKEN_EMBEDDINGS: tensors.TEXT_TOKEN_EMBEDDINGS},
        ),
        EnsembleStep(
            POOL,
            inputs={
                tensors.TEXT_TOKEN_EMBEDDINGS: tensors.TEXT_TOKEN_EMBEDDINGS,
                tensors.TEXT_ATTENTION_MASK: tensors.TEXT_ATTENTION_MASK,
            },
            outputs={tensors.EMBEDDING: tensors.EMBEDDING},
        ),
    ),
    max_batch_size=MAX_BATCH_SIZE,
)

SPECS = (TOKENIZER_SPEC, POOL_SPEC, TEXT_EMBEDDER)
"""The text_embedder pipeline: its two processing steps and the ensemble."""
