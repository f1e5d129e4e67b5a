"""kiln_threshold: a Python-based Triton backend that turns a probability into a score and a
decision at the spec's threshold.

Selected in a model's config.pbtxt with `backend: "kiln_threshold"`. Tensor contract: one FP32
[batch, 1] input (a probability in [0, 1]) -> an FP32 [batch, 1] output (the score: the
probability unchanged) and a BOOL [batch, 1] output (the decision: score >= threshold, compared in
FP32). Dynamic batching: the whole dynamic batch is decided in one vectorized comparison; a
probability that is NaN, infinite or outside [0, 1] fails its own request, naming the item. The
logic lives in `kiln.serving.threshold` (parameters: `THRESHOLD_PARAMS`: threshold); this file
only hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.threshold import load

TritonPythonModel = python_model(load)
"""The Triton model class: the step `load` builds, served through the adapter."""
