"""Locust suite of `image_classifier`: an HTTP user and a gRPC user sending a realistic mix.

The mix: photographs of several sizes and colour modes (grey, RGB, RGBA), JPEG and PNG, 128 px to 2
megapixels; each answer's top-5 labels, scores and class indices checked (and against the in-process
reference where it ran). `--model image_classifier_int8` runs it against the INT8 pipeline.

Run it through the runner (`python -m loadtests.run --pipeline image_classifier`), or with locust itself
from the repository root:

    python -m locust -f loadtests/image_classifier.py --headless --host http://127.0.0.1:8000 \
        --grpc-url 127.0.0.1:8001 --load-shape steady --slo-profile full --csv results/image_classifier

The gates and the load are in `loadtests/slo.py`; the options in `loadtests/common.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except (
    ImportError
):  # run as `locust -f loadtests/image_classifier.py` from elsewhere: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln import tensors  # noqa: E402
from loadtests.common import KilnShape, TritonGrpcUser, TritonHttpUser, use_suite  # noqa: E402

use_suite(tensors.IMAGE_CLASSIFIER)

__all__ = ["ImageClassifierHttpUser", "ImageClassifierGrpcUser", "KilnShape"]


class ImageClassifierHttpUser(TritonHttpUser):
    """`image_classifier` over HTTP (KServe v2 REST; binary tensors for files, JSON otherwise)."""


class ImageClassifierGrpcUser(TritonGrpcUser):
    """`image_classifier` over gRPC (tritonclient.grpc, gevent-compatible)."""
