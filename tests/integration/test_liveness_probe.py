"""`python -m kiln.server.liveness`, the Helm chart's liveness probe, against a real tritonserver:
live while its stubs run; dead (exit 1, naming the stub) once one is killed, which Triton 2.51's
own /v2/health/live does not see."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from kiln import paths
from kiln.server import FREE_PORT, TritonServer
from kiln.server.stubs import StubWatcher

MODEL = "fraud"


def probe(server: TritonServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kiln.server.liveness", "--pid", str(server.pid), "--url", f"http://{server.http_url}"],
        capture_output=True, text=True, timeout=60,
    )


def test_the_probe_fails_once_a_stub_dies_while_triton_still_says_live() -> None:
    if not (paths.model_repository() / MODEL / "1" / "model.onnx").is_file():
        pytest.fail("fraud is not built: run `make build-engines`", pytrace=False)
    server = TritonServer(
        http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, model_control_mode="explicit",
        load_models=[MODEL],
    )
    with server:
        alive = probe(server)
        assert alive.returncode == 0, alive.stdout + alive.stderr
        assert "is live and all its stubs run" in alive.stdout
        stubs = [p for p in StubWatcher().processes(server.pid) if p.model == MODEL]
        assert stubs, "no stub of fraud found under tritonserver"
        os.kill(stubs[0].pid, signal.SIGKILL)
        client = httpclient.InferenceServerClient(server.http_url)
        features = httpclient.InferInput("features", [1, 16], "FP32")
        features.set_data_from_numpy(np.zeros((1, 16), np.float32))
        deadline = time.monotonic() + 30
        while True:  # the kill lands: the model's requests fail, Triton still says live and ready
            try:
                client.infer(MODEL, [features])
            except InferenceServerException as error:
                assert "not healthy" in str(error), error
                break
            assert time.monotonic() < deadline, "requests to fraud still succeed after its stub was killed"
            time.sleep(0.1)
        assert client.is_server_live() and client.is_model_ready(MODEL)
        dead = probe(server)
        assert dead.returncode == 1, dead.stdout + dead.stderr
        assert f"pid {stubs[0].pid}" in dead.stdout and "SIGKILL" in dead.stdout, dead.stdout


def test_the_probe_fails_when_the_server_does_not_answer_and_says_when_it_finds_none() -> None:
    asleep = subprocess.Popen(["sleep", "30"])
    try:
        result = subprocess.run(
            [sys.executable, "-m", "kiln.server.liveness", "--pid", str(asleep.pid), "--url", "http://127.0.0.1:9",
             "--timeout", "1"],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        asleep.kill()
        asleep.wait()
    assert result.returncode == 1 and "does not answer http://127.0.0.1:9/v2/health/live" in result.stdout, result
    gone = subprocess.run(
        [sys.executable, "-m", "kiln.server.liveness", "--pid", "999999999"], capture_output=True, text=True, timeout=60
    )
    assert gone.returncode == 2 and "no tritonserver process found" in gone.stdout, gone
