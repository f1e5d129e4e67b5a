"""Locust suite of `fraud_scorer`: an HTTP user and a gRPC user sending a realistic mix.

The mix: held-out transactions as JSON records (RECORD) and as raw values (FEATURE_VALUES); each
score's range, its decision at the spec's threshold and the PyTorch reference's score (1e-5)
checked.

Run it through the runner (`python -m loadtests.run --pipeline fraud_scorer`), or with locust itself
from the repository root:

    python -m locust -f loadtests/fraud_scorer.py --headless --host http://127.0.0.1:8000 \
        --grpc-url 127.0.0.1:8001 --load-shape steady --slo-profile full --csv results/fraud_scorer

The gates and the load are in `loadtests/slo.py`; the options in `loadtests/common.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except ImportError:  # run as `locust -f loadtests/fraud_scorer.py` from elsewhere: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln import tensors  # noqa: E402
from loadtests.common import KilnShape, TritonGrpcUser, TritonHttpUser, use_suite  # noqa: E402

use_suite(tensors.FRAUD_SCORER)

__all__ = ["FraudScorerHttpUser", "FraudScorerGrpcUser", "KilnShape"]


class FraudScorerHttpUser(TritonHttpUser):
    """`fraud_scorer` over HTTP (KServe v2 REST; binary tensors for files, JSON otherwise)."""


class FraudScorerGrpcUser(TritonGrpcUser):
    """`fraud_scorer` over gRPC (tritonclient.grpc, gevent-compatible)."""
