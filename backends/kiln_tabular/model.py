"""kiln_tabular: a Python-based Triton backend that turns named numeric features into a model's
standardized FP32 features, with the statistics the build saved.

Selected in a model's config.pbtxt with `backend: "kiln_tabular"`. Tensor contract: two optional
inputs, a request sends exactly one: a BYTES [batch, 1] input of JSON records (each an object of
named numeric features in raw units) and an FP32 [batch, features] input of raw values in the
statistics' order -> one FP32 [batch, features] output, `(raw - mean) / std` per feature.
Dynamic batching: the whole dynamic batch is parsed, stacked into one matrix and standardized in
one call; a malformed record (invalid JSON, not an object, a missing, unknown or repeated
feature, a value that is not a finite number) fails its own request with a message naming the
input, the item and the feature, and the other requests are answered. The logic lives in
`kiln.serving.tabular` (parameters: `TABULAR_PARAMS`: stats_model, stats_file,
max_record_bytes); this file only hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.tabular import load

TritonPythonModel = python_model(load)
"""The Triton model class: the step `load` builds, served through the adapter."""
