"""kiln_pool: a Python-based Triton backend that pools token embeddings into sentence embeddings.

Selected in a model's config.pbtxt with `backend: "kiln_pool"`. Tensor contract: inputs
`token_embeddings` (FP32 [batch, seq, hidden]) and `attention_mask` (INT64 [batch, seq]) ->
output `embedding` (FP32 [batch, hidden]): the mean over each text's real tokens, L2-normalized
unless `normalize` is false. Dynamic batching: requests of a batch may have different `seq`; each
group of equal `seq` is pooled in one vectorized call; a mask row of all zeros fails its own
request. The logic lives in `kiln.serving.pool` (parameters: `POOL_PARAMS`).
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.pool import load

TritonPythonModel = python_model(load)
