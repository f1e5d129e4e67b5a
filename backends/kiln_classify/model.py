"""kiln_classify: a Python-based Triton backend turning a classifier's logits into answers.

Selected in a model's config.pbtxt with `backend: "kiln_classify"`. Tensor contract: one input
FP32 (or FP16) [batch, C] of logits -> `labels` BYTES [batch, k] (UTF-8), `scores` FP32
[batch, k] (softmax probabilities, or the inputs with apply_softmax false) and `class_indices`
INT64 [batch, k], most likely first. The C labels come from `labels_file` in the model's folder
(written by `kiln generate`; the count is checked at load). Dynamic batching: a whole dynamic batch
is ranked in one vectorized pass; a request with NaN or infinite logits, or of another shape, fails
alone. The logic lives in `kiln.serving.classify` (parameters: `CLASSIFY_PARAMS`); this file only
hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.classify import load

TritonPythonModel = python_model(load)
