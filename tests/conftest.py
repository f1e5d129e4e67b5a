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
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

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


# --- an S3-compatible server on loopback (tests/integration/test_s3_repository.py,
# tests/unit/test_deploy_manifests.py) -----------------------------------------------------------

S3_BUCKET = "kiln-models"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kiln-test-key",
    "AWS_SECRET_ACCESS_KEY": "kiln-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""What both boto3 and tritonserver's S3 client read; moto accepts any."""
S3_CLEARED = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")


class MotoS3(NamedTuple):
    endpoint: str
    client: Any
    bucket: str


@pytest.fixture(scope="module")
def moto_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    """moto's S3 server (a real HTTP server speaking S3) on a free loopback port with one bucket;
    the AWS_* credentials set for the module (and no ~/.aws files or endpoint variables of the
    machine in the way). Skips, saying why, where moto's server or boto3 is not installed."""
    moto_server = pytest.importorskip(
        "moto.server", reason="moto[server] (the dev extra) is not installed: no S3-compatible server"
    )
    boto3 = pytest.importorskip("boto3", reason="boto3 (the build and serve extras) is not installed")
    with pytest.MonkeyPatch.context() as env:
        for name, value in S3_CREDENTIALS.items():
            env.setenv(name, value)
        for name in S3_CLEARED:
            env.delenv(name, raising=False)
        nowhere = tmp_path_factory.mktemp("aws") / "none"
        env.setenv("AWS_CONFIG_FILE", str(nowhere))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
        try:
            # moto keeps its buckets in process-wide state, shared by every server it starts in
            # this process: start each module from an empty store, and leave one behind.
            _reset_moto(endpoint)
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=S3_BUCKET)
            yield MotoS3(endpoint, client, S3_BUCKET)
        finally:
            _reset_moto(endpoint)
            server.stop()


def _reset_moto(endpoint: str) -> None:
    """Empties moto's in-process state through its own API (POST /moto-api/reset)."""
    import urllib.request

    with urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST"), timeout=30):
        pass


@pytest.fixture(scope="session")
def tinylm_folder() -> Path:
    """The newest version folder of the published decoder (model.onnx, tokenizer.json,
    generation.json), found as kiln_generate finds it."""
    from kiln import paths
    from kiln.serving.adapter import find_artifact

    try:
        return find_artifact(
            paths.model_repository(), "tinylm", "generation.json", for_model="tinylm_generate"
        ).parent
    except FileNotFoundError as error:
        pytest.fail(str(error), pytrace=False)
