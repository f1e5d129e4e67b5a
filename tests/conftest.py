"""Suite-wide hooks: the numeric-variation pass (`scripts/numeric_variation.py`).

With KILN_TEST_ORT_VARIATION=1 every ONNX Runtime session the tests open (the build's checks,
kiln_onnx's loader, the references) runs with one intra-op thread and only the basic graph
optimizations: other fusions and another work split, so other float rounding. The tests must hold
under it, as they must on another CPU; a test that assumed one kernel's exact digits fails here
first. The PyTorch side of the pass is set by the environment the script starts pytest with
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, OMP_NUM_THREADS).
"""

from __future__ import annotations

import os
from typing import Any

ORT_VARIATION_ENV = "KILN_TEST_ORT_VARIATION"


def _vary_onnxruntime() -> None:
    import onnxruntime as ort

    original = ort.InferenceSession.__init__
    if getattr(original, "_kiln_varied", False):
        return

    def __init__(self: Any, path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any) -> None:
        options = sess_options if sess_options is not None else ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        original(self, path_or_bytes, options, *args, **kwargs)

    __init__._kiln_varied = True  # type: ignore[attr-defined]
    ort.InferenceSession.__init__ = __init__  # type: ignore[method-assign]


def pytest_configure(config: Any) -> None:
    if os.environ.get(ORT_VARIATION_ENV) == "1":
        _vary_onnxruntime()


def pytest_report_header(config: Any) -> list[str]:
    if os.environ.get(ORT_VARIATION_ENV) != "1":
        return []
    keys = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")
    torch_side = ", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ)
    return [
        "numeric variation: ONNX Runtime with 1 intra-op thread and basic graph optimizations; "
        f"PyTorch with {torch_side or 'its defaults'}"
    ]
