"""Locust suite of `text_embedder`: an HTTP user and a gRPC user sending a realistic mix.

The mix: short queries, prose paragraphs, long texts past the encoder's 128 tokens and non-ASCII
text; each embedding's shape, norm and cosine to the PyTorch reference checked.

Run it through the runner (`python -m loadtests.run --pipeline text_embedder`), or with locust itself
from the repository root:

    python -m locust -f loadtests/text_embedder.py --headless --host http://127.0.0.1:8000 \
        --grpc-url 127.0.0.1:8001 --load-shape steady --slo-profile full --csv results/text_embedder

The gates and the load are in `loadtests/slo.py`; the options in `loadtests/common.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import loadtests  # noqa: F401
except ImportError:  # run as `locust -f loadtests/text_embedder.py` from elsewhere: find the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kiln import tensors  # noqa: E402
from loadtests.common import KilnShape, TritonGrpcUser, TritonHttpUser, use_suite  # noqa: E402

use_suite(tensors.TEXT_EMBEDDER)

__all__ = ["TextEmbedderHttpUser", "TextEmbedderGrpcUser", "KilnShape"]


class TextEmbedderHttpUser(TritonHttpUser):
    """`text_embedder` over HTTP (KServe v2 REST; binary tensors for files, JSON otherwise)."""


class TextEmbedderGrpcUser(TritonGrpcUser):
    """`text_embedder` over gRPC (tritonclient.grpc, gevent-compatible)."""
