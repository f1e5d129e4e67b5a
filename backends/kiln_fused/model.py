"""kiln_fused: a Python-based Triton backend that serves a whole pipeline as one model.

Selected with `backend: "kiln_fused"` in the config `kiln generate` writes for a pipeline of form
"fused" (`kiln.spec.EnsembleSpec(form="fused")`). Tensor contract: the pipeline's own inputs and
outputs (the same name, tensors and max batch size as its ensemble form), one dynamic batcher.
At load it builds each step named in the parameter `steps` with that step backend's own `load`,
from the step model's folder and config.pbtxt; per dynamic batch it runs the steps in order in
this one process, feeding each the tensors the wiring names. A request a step refuses fails alone
with the message the ensemble form gives ("in ensemble '<name>', ..."); the other requests are
answered. The logic lives in `kiln.serving.fused` (parameters: `FUSED_PARAMS`: steps,
step_metrics); this file only hands it to the adapter.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.fused import load

TritonPythonModel = python_model(load)
"""The Triton model class: the fused pipeline `load` builds, served through the adapter."""
