"""tinylm's served generation model: `tinylm_generate`, text in, a stream of text out.

One decoupled model of backend `kiln_generate` (`kiln.serving.generate`): its engine thread runs
the tinylm ONNX decoder the build published (FP32, `model` parameter) with a preallocated
KV-cache pool and continuous batching, so Triton neither batches nor queues for it
(max_batch_size 0, no dynamic batcher): the engine admits requests between decode steps while
its pool has room. Clients reach it by gRPC streaming, Triton's HTTP `generate` and
`generate_stream`, or kiln's OpenAI-compatible endpoints.

Settings:
- `kv_cache_tokens` 8192: 16 MB of keys and values for tinylm (2 layers x 2 x 4 heads x 32 floats per
  token); at the default `max_tokens` 64 and prompts of tens of tokens that holds the 16 running
  sequences many times over, so the pool bounds memory, not concurrency, here.
- `max_running` 16: the decode batch; beyond it, requests wait in the engine's queue.
- `intra_op_threads` 1: one ONNX Runtime thread, like the other models on these 2-core machines
  (the server, the client and the stub share them).
"""

from __future__ import annotations

from kiln import tensors
from kiln.spec import InstanceGroup, ModelSpec, TensorSpec

GENERATE = ModelSpec(
    name=tensors.TEXT_GENERATOR,
    description="tinylm behind kiln_generate: streamed text generation with a KV cache and "
    "continuous batching",
    backend="kiln_generate",
    decoupled=True,
    inputs=(
        TensorSpec(tensors.TEXT_INPUT, "BYTES", (1,)),
        TensorSpec(tensors.MAX_TOKENS, "INT32", (1,), optional=True),
        TensorSpec(tensors.TEMPERATURE, "FP32", (1,), optional=True),
        TensorSpec(tensors.TOP_K, "INT32", (1,), optional=True),
        TensorSpec(tensors.TOP_P, "FP32", (1,), optional=True),
        TensorSpec(tensors.SEED, "INT64", (1,), optional=True),
        TensorSpec(tensors.STOP, "BYTES", (-1,), optional=True),
        TensorSpec(tensors.STREAM, "BOOL", (1,), optional=True),
    ),
    outputs=(
        TensorSpec(tensors.TEXT_OUTPUT, "BYTES", (1,)),
        TensorSpec(tensors.FINISH_REASON, "BYTES", (1,)),
        TensorSpec(tensors.PROMPT_TOKENS, "INT32", (1,)),
        TensorSpec(tensors.COMPLETION_TOKENS, "INT32", (1,)),
    ),
    max_batch_size=0,
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={
        "model": "tinylm",
        "kv_cache_tokens": "8192",
        "max_running": "16",
        "intra_op_threads": "1",
    },
)

SPECS = (GENERATE,)
