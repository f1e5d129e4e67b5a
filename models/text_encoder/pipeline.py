"""text_embedder: UTF-8 text -> kiln_text -> text_encoder -> kiln_pool -> sentence embedding.

Three served models and the pipeline that runs them (fused: one kiln_fused model running the three
steps in one process; the ensemble form wires the three served models):
- `text_tokenizer` (kiln_text): TEXT BYTES [1] -> input_ids, attention_mask INT64 [seq], with the
  tokenizer.json the build published beside text_encoder, truncating at text_encoder's
  `max_length` (its position embeddings) and padding each request to its own longest text (no
  length buckets: `LENGTH_BUCKETS` says why).
- `text_encoder` (FP32; the model of this folder, `spec.py`): ids and mask -> token embeddings;
  its inputs set `allow_ragged_batch`, so requests of different lengths share its batches.
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
LENGTH_BUCKETS: str | None = None
"""kiln_text's `length_buckets` for text_tokenizer: None, so each request is padded to its own
longest text. Requests of different token lengths share text_encoder's dynamic batches anyway:
its inputs set `allow_ragged_batch` (`spec.py`), Triton hands them to one `execute` and kiln_onnx
runs each length among them as one ONNX Runtime call. Buckets ("8,16,24,32,48,64,96" until
2026-12-04) were the way to batch across lengths before the spec could express ragged batching;
with it they bought nothing on mixed traffic and cost a fifth of one-length traffic (a 36-token
text padded to 48), so they went.

Measured 2026-12-04 on the 2-core AMD EPYC (shared machine; repeats of a cell spread by up to
about +-15%, so differences under about 10% are noise), text_embedder in the ensemble form,
perf_analyzer over gRPC at concurrency 16, medians of 6 repeats: `flock /tmp/kiln-bench.lock
.venv/bin/python -m benchmarks.text_lengths --repeats 3 --variants base,b8,rbase,rb8,rb16 --json
run1.json`, the same with `--variants base,b8,rbase,rb8,rb16,fbase,fb8 --json run2.json`, merged
with `--merge run1.json run2.json`. Mixed: the load-test mix (5 to 128 tokens, one text per
request); single: its 36-token text in every request. Req/s mixed / single, and text_encoder's
average batch on the mix:
- no buckets, not ragged (before issue 13's first step): 210 / 309, batch 1.02;
- "8,16,24,32,48,64,96", not ragged (committed until now): 201 / 230, batch 1.19;
- no buckets, ragged (committed now): 224 / 304, batch 6.93;
- "8,16,24,32,48,64,96", ragged: 225 / 239, batch 7.35;
- "16,32,64", ragged: 206 / 189, batch 7.14.
(Fused form, 3 repeats: no buckets 270 / 300, "8,...,96" 237 / 242.) So ragged batching reaches an
average batch of about 7 on the mix, and without buckets one-length traffic keeps the speed of
the unpadded run (304 vs 309) instead of losing a fifth. Mixed traffic stays at about 0.74x
one-length traffic in the ensemble form (the fused form: 0.90x): on this CPU ONNX Runtime saves
about 20% per text only when texts of one length share a call, which texts of different lengths
cannot without paying it back in padding (buckets' ratio near 1 comes from a slower single run,
not a faster mixed one). On a GPU, where padding is cheap, buckets may win: measure there with
the same script (variants rb8, rb16)."""

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
        **({"length_buckets": LENGTH_BUCKETS} if LENGTH_BUCKETS else {}),
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
    # Fused: the faster form here. `make bench`'s forms table (`python -m benchmarks.run --only 7
    # --repeats 3`, perf_analyzer gRPC, medians of 3; 2-core AMD EPYC, 2026-12-04): p50 at
    # concurrency 1 3.94 ms fused vs 6.57 ms ensemble, 246 vs 205 requests/s at 16; and on mixed
    # lengths (LENGTH_BUCKETS) 0.90x its one-length throughput against the ensemble's 0.74x, one
    # dynamic batch of about 10 texts per execution. The ensemble form keeps text_encoder's ragged
    # batching.
    form="fused",
)

SPECS = (TOKENIZER_SPEC, POOL_SPEC, TEXT_EMBEDDER)
"""The text_embedder pipeline: its two processing steps and the pipeline (fused)."""
