"""kiln_onnx: a Python-based Triton backend that runs an ONNX model with ONNX Runtime.

Selected in a model's config.pbtxt with `backend: "kiln_onnx"`; tritonserver runs this file for
every model that names the backend (one generic backend, configured by `parameters`).

Tensor contract: the inputs and outputs are the model config's `input` and `output`, which must
match the ONNX model's names, dtypes and dims (checked at load; a mismatch fails the load naming
the tensor). With `max_batch_size > 0` every tensor has a leading batch dim and Triton's dynamic
batcher may hand several requests to one `execute`: they are validated one by one, concatenated
(grouped by shape), run once per group and split back. A malformed request (wrong dtype or shape,
empty batch, NaN/infinity while `reject_non_finite` is on) gets its own INVALID_ARG error; the
other requests of the batch are answered normally.

Parameters (config.pbtxt `parameters`, all optional): model_filename, intra_op_threads,
inter_op_threads, execution_providers, graph_optimization_level, reject_non_finite; see
`kiln.serving.onnx.ONNX_PARAMS`. Served through `kiln.serving.adapter` like every kiln step, so it
reports the `kiln_step_*` metrics too.
"""

from __future__ import annotations

from kiln.serving.adapter import python_model
from kiln.serving.onnx import load

TritonPythonModel = python_model(load)
"""The Triton model class: the ONNX model `load` builds, served through the adapter."""
