"""kiln: build, quantize and serve PyTorch models on NVIDIA Triton Inference Server.

This package stays light at import time: the client SDK (`kiln.clients`) imports it on machines
that have only `tritonclient` and `numpy`.
"""

__version__ = "0.1.0"
