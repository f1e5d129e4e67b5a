"""kiln_generate: a decoupled Python-based Triton backend that streams generated text.

Selected in a model's config.pbtxt with `backend: "kiln_generate"` and
`model_transaction_policy { decoupled: true }`. It loads the ONNX decoder, `tokenizer.json` and
`generation.json` the build published beside the model named by its `model` parameter, and runs
them in an engine thread with a KV cache and continuous batching. Tensor contract, parameters and
metrics: `kiln.serving.generate_triton` and `kiln.serving.generate`; this file only hands them
to Triton.
"""

from __future__ import annotations

from kiln.serving.generate_triton import decoupled_model

TritonPythonModel = decoupled_model()
