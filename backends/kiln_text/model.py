"""kiln_text: a Python-based Triton backend that tokenizes UTF-8 texts for a transformer encoder.

Selected in a model's config.pbtxt with `backend: "kiln_text"`. Tensor contract: input `text`
(BYTES [batch, 1], one UTF-8 text per item) -> outputs `input_ids` and `attention_mask` (INT64
[batch, seq], padded with the tokenizer's [PAD] id to the request's longest text, or to the
smallest of `length_buckets` holding it, so requests of different lengths can share the encoder's
batch; seq never above `max_length`). Dynamic batching: a whole dynamic batch is tokenized in one
call; an empty, whitespace-only, invalid-UTF-8 or over-long (`max_text_bytes`) text fails its own
request with a message naming the item, and the other requests are answered. The logic lives in
`kiln.serving.text` (parameters: `TEXT_PARAMS`); this file only hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.text import load

TritonPythonModel = python_model(load)
