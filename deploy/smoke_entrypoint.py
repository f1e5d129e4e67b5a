"""Runs deploy/entrypoint.sh for real, without a container or a cluster, and checks what it serves.

The embedded tritonserver (nvidia-pytriton's, Triton 2.51, the release of the image's
nvcr.io/nvidia/tritonserver:24.10) stands in for the image's, with a backend directory laid out as
the image's /opt/tritonserver/backends (Triton's python backend beside kiln's backends, assembled
by kiln.server as for `kiln serve`). Only the binary and that folder differ from the image: the
entrypoint, its flags, the repository key and (with --s3) the copy from S3 are the image's own.

    .venv/bin/python deploy/smoke_entrypoint.py           # the built repository, the image's models
    .venv/bin/python deploy/smoke_entrypoint.py --s3      # kiln publish to moto's S3 server, copy, serve
    .venv/bin/python deploy/smoke_entrypoint.py --models fraud_scorer,text_embedder

It prints, and checks: the time to ready (strict readiness: every model loaded), each model's
readiness, one answer of fraud_scorer and of text_embedder where they are loaded, the repository
index refused without the key (403) and answered with it, the resident memory of tritonserver's
process group, and that SIGTERM drains and exits 0 within the exit timeout. Exit status 0 when every
check passed. --s3 needs the dev and build extras (moto's server, boto3) and `kiln publish`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kiln import paths
from kiln.server import find_tritonserver, pick_free_ports
from kiln.server.binary import assemble_backend_directory, python_backend_root, triton_environment

DEPLOY = Path(__file__).resolve().parent
ENTRYPOINT = DEPLOY / "entrypoint.sh"
HOST = "127.0.0.1"
KEY = "smoke-test-key-0123456789abcdef"
KEY_HEADER = "kiln-repository-key"
EXIT_TIMEOUT_S = 10
READY_TIMEOUT_S = 600.0
BUCKET = "kiln-models"
S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "smoke", "AWS_SECRET_ACCESS_KEY": "smoke", "AWS_DEFAULT_REGION": "us-east-1",
}
"""What boto3 (kiln publish, the copy) sends; moto's server accepts any."""
FRAUD_FEATURES = 16


def image_models() -> list[str]:
    """The models the image loads by default (deploy/Dockerfile's KILN_LOAD_MODELS)."""
    match = re.search(r'KILN_LOAD_MODELS="([^"]+)"', (DEPLOY / "Dockerfile").read_text())
    if match is None:
        raise SystemExit("deploy/Dockerfile sets no KILN_LOAD_MODELS")
    return match.group(1).split(",")


class Checks:
    """Prints each check as it is made and remembers whether all passed."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, ok: bool, what: str) -> bool:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok:
            self.failed.append(what)
        return ok


def request(
    port: int, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int | None, Any]:
    """GET `path`, or POST `body` as JSON: (HTTP status, the parsed JSON answer or its bytes);
    (None, b"") when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    url = f"http://{HOST}:{port}{path}"
    method = "GET" if data is None else "POST"
    call = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(call, timeout=10) as answer:
            status, raw = answer.status, answer.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    except OSError:
        return None, b""
    try:
        return status, json.loads(raw) if raw else None
    except ValueError:
        return status, raw


@contextmanager
def s3_repository(models: list[str], workdir: Path) -> Iterator[dict[str, str]]:
    """moto's S3 server on a free loopback port, the models published to it with `kiln publish`;
    yields the entrypoint's environment for the copy."""
    import boto3
    from moto.server import ThreadedMotoServer

    from kiln.cli import main as kiln

    os.environ.update(S3_CREDENTIALS)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    (port,) = pick_free_ports(HOST, 1)
    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://{HOST}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        url = f"s3://{endpoint}/{BUCKET}/repository"
        named = [arg for model in models if model != "*" for arg in ("--model", model)]
        if kiln(["publish", "--to", url, *named]) != 0:
            raise SystemExit(f"kiln publish --to {url} {' '.join(named)} failed")
        copy = str(workdir / "copy")
        yield {**S3_CREDENTIALS, "KILN_MODEL_REPOSITORY": url, "KILN_REPOSITORY_COPY_TO": copy}
    finally:
        server.stop()


def smoke(models: list[str], use_s3: bool) -> int:
    """Runs the entrypoint on `models` (from a copy of an S3 bucket with `use_s3`); 0 when every
    check passed."""
    checks = Checks()
    workdir = Path(tempfile.mkdtemp(prefix="kiln-smoke-"))
    binary = find_tritonserver()
    triton_root = python_backend_root(binary)
    backends = workdir / "backends"
    assemble_backend_directory(backends, triton_root, paths.backends_dir(), paths.available_backends())
    http, grpc, metrics = pick_free_ports(HOST, 3)
    env = {
        **triton_environment(triton_root),
        "KILN_TRITONSERVER": str(binary),
        "KILN_BACKEND_DIRECTORY": str(backends),
        "KILN_PYTHON": sys.executable,
        "KILN_MODEL_REPOSITORY": str(paths.model_repository()),
        "KILN_LOAD_MODELS": ",".join(models),
        "KILN_HTTP_PORT": str(http),
        "KILN_GRPC_PORT": str(grpc),
        "KILN_METRICS_PORT": str(metrics),
        "KILN_REPOSITORY_KEY": KEY,
        "KILN_EXIT_TIMEOUT_S": str(EXIT_TIMEOUT_S),
    }
    with s3_repository(models, workdir) if use_s3 else _nothing() as s3_env:
        env.update(s3_env or {})
        log_path = workdir / "entrypoint.log"
        print(f"kiln smoke: {ENTRYPOINT} on {env['KILN_MODEL_REPOSITORY']}", flush=True)
        # The image listens on every interface; here only on loopback.
        bind = [f"--{name}-address={HOST}" for name in ("http", "grpc", "metrics")]
        start = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                ["bash", str(ENTRYPOINT), *bind], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            if _wait_ready(checks, process, http, start, log_path):
                _check_serving(checks, process, binary, http, models, log_path if use_s3 else None)
                _check_stop(checks, process)
        finally:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    failed = len(checks.failed)
    if failed:
        print(f"kiln smoke: {failed} check(s) failed; kept {workdir}")
        return 1
    shutil.rmtree(workdir, ignore_errors=True)  # the backend directory and the copy (MBs)
    print("kiln smoke: all checks passed")
    return 0


def _wait_ready(
    checks: Checks, process: subprocess.Popen[bytes], port: int, start: float, log_path: Path
) -> bool:
    while request(port, "/v2/health/ready")[0] != 200:
        if process.poll() is not None or time.monotonic() - start > READY_TIMEOUT_S:
            tail = log_path.read_text()[-2000:]
            return checks.check(False, f"ready (exit status {process.poll()}); log tail:\n{tail}")
        time.sleep(0.2)
    return checks.check(True, f"ready after {time.monotonic() - start:.1f} s")


def _check_serving(
    checks: Checks, process: subprocess.Popen[bytes], binary: Path, port: int, models: list[str],
    copy_log: Path | None,
) -> None:
    command = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")[0].decode()
    checks.check(command == str(binary), f"the entrypoint exec'ed tritonserver (pid {process.pid})")
    if copy_log is not None:
        copied = [line for line in copy_log.read_text().splitlines() if line.startswith("kiln fetch:")]
        checks.check(bool(copied), copied[0] if copied else "kiln fetch: no copy reported")
    _check_models(checks, port, models)
    status, _ = request(port, "/v2/repository/index", body={})
    checks.check(status == 403, f"repository index without the key: {status}")
    status, index = request(port, "/v2/repository/index", body={}, headers={KEY_HEADER: KEY})
    checks.check(status == 200, f"repository index with the key: {status}, {len(index or ())} models")
    group = subprocess.run(["pgrep", "-g", str(process.pid)], capture_output=True, text=True, check=False)
    pids = group.stdout.split()
    print(f"  info {len(pids)} processes, {sum(map(_rss_kb, pids)) / 1024:.0f} MiB resident", flush=True)


def _check_stop(checks: Checks, process: subprocess.Popen[bytes]) -> None:
    stop = time.monotonic()
    process.send_signal(signal.SIGTERM)
    status = process.wait(EXIT_TIMEOUT_S + 10)
    checks.check(status == 0, f"SIGTERM: exit status {status} after {time.monotonic() - stop:.1f} s")


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


def _rss_kb(pid: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith("VmRSS:")), 0)
    except OSError:
        return 0


def _check_models(checks: Checks, port: int, models: list[str]) -> None:
    index = request(port, "/v2/repository/index", body={}, headers={KEY_HEADER: KEY})[1] or ()
    loaded = {m["name"] for m in index if m.get("state") == "READY"}
    for model in models if models != ["*"] else sorted(loaded):
        checks.check(request(port, f"/v2/models/{model}/ready")[0] == 200, f"{model} ready")
    if "fraud_scorer" in loaded:
        body = {"inputs": [{"name": "feature_values", "shape": [1, FRAUD_FEATURES], "datatype": "FP32",
                            "data": [0.0] * FRAUD_FEATURES}]}
        status, answer = request(port, "/v2/models/fraud_scorer/infer", body)
        outputs = {o["name"]: o["data"] for o in (answer or {}).get("outputs", ())} if status == 200 else {}
        checks.check(set(outputs) == {"score", "decision"}, f"fraud_scorer answers: {status} {outputs}")
    if "text_embedder" in loaded:
        body = {"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a cat"]}]}
        status, answer = request(port, "/v2/models/text_embedder/infer", body)
        size = len(answer["outputs"][0]["data"]) if status == 200 else 0
        checks.check(size > 0, f"text_embedder answers: {status}, a {size}-d vector")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/smoke_entrypoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(image_models()),
                        help="KILN_LOAD_MODELS (default: the image's, %(default)s)")
    parser.add_argument(
        "--s3", action="store_true",
        help="publish the models to moto's S3 server; the entrypoint copies them into the 'pod'",
    )
    args = parser.parse_args(argv)
    return smoke([m.strip() for m in args.models.split(",") if m.strip()], args.s3)


if __name__ == "__main__":
    sys.exit(main())
