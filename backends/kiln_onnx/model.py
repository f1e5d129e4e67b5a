"""kiln_onnx: a Python-based Triton backend that runs an ONNX model with ONNX Runtime.

Selected in a model's config.pbtxt with `backend: "kiln_onnx"`; tritonserver runs this file for
every model that names the backend (one generic backend, configured by `parameters`).
"""

from __future__ import annotations

import json
from pathlib import Path

import triton_python_backend_utils as pb_utils

from kiln.serving.onnx import OnnxModel
from kiln.serving.params import config_parameters


def _error(error: Exception) -> pb_utils.TritonError:
    # TritonError is looked up per call: the stub attaches it to pb_utils only after importing
    # this file, so a module-level lookup finds nothing and every error would be INTERNAL (500).
    invalid_arg = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    message = str(error)
    if invalid_arg is not None and isinstance(error, ValueError):
        return pb_utils.TritonError(message, invalid_arg)
    return pb_utils.TritonError(message)


class TritonPythonModel:
    """Runs `<version>/model.onnx` (or `parameters.model_filename`) with ONNX Runtime.

    Tensor contract: the inputs and outputs are the model config's `input` and `output`, which
    must match the ONNX model's names, dtypes and dims (checked at load; a mismatch fails the load
    naming the tensor). With `max_batch_size > 0` every tensor has a leading batch dim and Triton's
    dynamic batcher may hand several requests to one `execute`: they are validated one by one,
    concatenated (grouped by shape), run once per group and split back. A malformed request (wrong
    dtype or shape, empty batch, NaN/infinity while `reject_non_finite` is on) gets its own
    INVALID_ARG error; the other requests of the batch are answered normally.

    Parameters (config.pbtxt `parameters`, all optional): model_filename, intra_op_threads,
    inter_op_threads, execution_providers, graph_optimization_level, reject_non_finite; see
    kiln.serving.onnx.ONNX_PARAMS.
    """

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.model = OnnxModel.load(
            args["model_name"], version_dir, config, config_parameters(config)
        )

    def execute(self, requests: list) -> list:
        decoded = []
        for request in requests:
            feeds = {}
            for contract in self.model.inputs:
                tensor = pb_utils.get_input_tensor_by_name(request, contract.name)
                feeds[contract.name] = None if tensor is None else tensor.as_numpy()
            decoded.append(feeds)
        responses = []
        for result in self.model.infer(decoded):
            if isinstance(result, Exception):
                responses.append(pb_utils.InferenceResponse(error=_error(result)))
            else:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(n, a) for n, a in result.items()]
                    )
                )
        return responses

    def finalize(self) -> None:
        self.model = None
