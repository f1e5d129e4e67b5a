"""The locust suite of every load-tested pipeline: an HTTP user and a gRPC user sending its mix.

`--model NAME` picks the pipeline: its request mix and its service levels come from the
`loadtest.py` of the model folder serving it (`models/<folder>/loadtest.py`: `corpus()`, `SLOS`);
each answer is checked against the pipeline's contract and, where it ran, the in-process
reference. Run it through the runner (`python -m loadtests.run --pipeline fraud_scorer`), or with
locust itself from the repository root:

    python -m locust -f loadtests/locustfile.py --headless --host http://127.0.0.1:8000 \
        --grpc-url 127.0.0.1:8001 --model fraud_scorer --load-shape steady --slo-profile full \
        --csv results/fraud_scorer

The options are in `loadtests/common.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except ImportError:  # run as `locust -f loadtests/locustfile.py` from elsewhere: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtests.common import KilnShape, TritonGrpcUser, TritonHttpUser  # noqa: E402

__all__ = ["PipelineHttpUser", "PipelineGrpcUser", "KilnShape"]


class PipelineHttpUser(TritonHttpUser):
    """The pipeline over HTTP (KServe v2 REST; binary tensors for files, JSON otherwise)."""


class PipelineGrpcUser(TritonGrpcUser):
    """The pipeline over gRPC (tritonclient.grpc, gevent-compatible)."""
