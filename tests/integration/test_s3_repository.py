"""The model repository in object storage: `kiln publish --to s3://...` against a real S3 server
(moto's server mode: an HTTP server speaking the S3 protocol, on a free loopback port), and a real
tritonserver serving a model it downloads from that bucket.

What is checked: the fraud_scorer pipeline's closure goes up (its steps and the model whose files
they read), Triton lists it from the bucket and answers `fraud` exactly as ONNX Runtime does on
the local file; a second publish uploads nothing; a changed file of the same size is uploaded
again; `--delete` removes stale objects and lists them; a folder without config.pbtxt and a
missing bucket or endpoint fail with a message naming them.

The models that read other models' folders when they load (the fused pipelines fraud_scorer and
text_embedder, and the steps fraud_features and fraud_threshold with a `*_model` parameter) load
from the bucket, where Triton gives each a temporary folder of its own, because
their stubs fetch those folders from the same bucket (`kiln.serving.remote`): their answers equal
those of the same code loaded in process from the local folder; a sibling object missing from
the bucket fails the load naming the URL and the object; `fetch_models` itself (in process,
boto3) fetches a model's folder byte for byte and names a missing model and an unfetchable
scheme.
"""

from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

from kiln import paths
from kiln.cli import main
from kiln.publish_remote import HASH_METADATA, human_bytes
from kiln.server import FREE_PORT, RepositoryApiError, RepositoryNotFoundError, TritonServer

pytest.importorskip(
    "moto.server", reason="moto[server] is not installed: no S3-compatible server to publish to"
)
pytest.importorskip("boto3", reason="boto3 is not installed: kiln publish needs it")

BUCKET = "kiln-models"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "kiln-test-key",
    "AWS_SECRET_ACCESS_KEY": "kiln-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""What both boto3 (kiln publish) and tritonserver's S3 client read; moto accepts any."""
PIPELINE = "fraud_scorer"
PIPELINE_MODELS = {"fraud", "fraud_features", "fraud_threshold", "fraud_scorer"}
MODEL = "fraud"
INPUT, OUTPUT, FEATURES = "features", "probability", 16
BATCH = 8
BUILD_HINT = "run `make build-engines` first"


class S3(NamedTuple):
    endpoint: str
    client: Any

    def url(self, prefix: str, bucket: str = BUCKET) -> str:
        """The repository URL in the form Triton takes (endpoint inside)."""
        return f"s3://{self.endpoint}/{bucket}/{prefix}"

    def keys(self, prefix: str) -> dict[str, dict[str, Any]]:
        listing = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix + "/")
        return {o["Key"][len(prefix) + 1:]: o for o in listing.get("Contents", ())}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def s3(moto_s3) -> S3:
    """moto's S3 server with one bucket (tests/conftest.py's `moto_s3`)."""
    assert moto_s3.bucket == BUCKET
    return S3(moto_s3.endpoint, moto_s3.client)


@pytest.fixture(scope="module")
def built_repository() -> Path:
    repository = paths.model_repository()
    if not (repository / MODEL / "1" / "model.onnx").is_file():
        pytest.fail(f"the model repository {repository} has no built {MODEL!r}; {BUILD_HINT}", pytrace=False)
    return repository


def publish(*argv: str) -> int:
    return main(["publish", *argv])


def fraud_copy(source: Path, tmp_path: Path) -> Path:
    """A repository holding a copy of the built `fraud` folder, to change files in."""
    repository = tmp_path / "repository"
    shutil.copytree(source / MODEL, repository / MODEL)
    return repository


def test_triton_serves_a_model_published_to_s3(s3, built_repository, tmp_path, capsys) -> None:
    url = s3.url("prod")
    assert publish("--to", url, "--model", PIPELINE) == 0
    out = capsys.readouterr().out
    lines = [line.strip() for line in out.splitlines()]
    # One line per model, what the pipeline needs first, every file new.
    assert [line.split(":")[0] for line in lines[1:5]] == ["fraud", "fraud_features", "fraud_threshold", PIPELINE]
    assert "fraud: 5 files uploaded (" in out and ", 0 unchanged" in out
    assert f"serve it: kiln serve --repository {url}" in out
    assert "note: fraud_features, fraud_threshold, fraud_scorer read other models' folders when they load" in out
    keys = s3.keys("prod")
    assert {key.split("/")[0] for key in keys} == PIPELINE_MODELS
    assert f"{PIPELINE}/1/.gitkeep" in keys  # the empty version folder exists in the bucket

    mount = tmp_path / "mount"  # where Triton downloads each model it loads
    mount.mkdir()
    env = {**CREDENTIALS, "TRITON_AWS_MOUNT_DIRECTORY": str(mount)}
    with TritonServer(
        url, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, env=env,
        model_control_mode="explicit", load_models=[MODEL], log_file=tmp_path / "tritonserver.log",
    ) as server:
        models = server.models()
        assert set(models) == PIPELINE_MODELS, server.log_tail()
        assert models[MODEL] == "READY"
        downloaded = [p for p in mount.iterdir() if (p / "1" / "model.onnx").is_file()]
        assert len(downloaded) == 1, f"no download of {MODEL} under TRITON_AWS_MOUNT_DIRECTORY {mount}"
        assert (downloaded[0] / "1" / "model.onnx").read_bytes() == (
            built_repository / MODEL / "1" / "model.onnx"
        ).read_bytes()
        features = np.random.default_rng(15).normal(size=(BATCH, FEATURES)).astype(np.float32)
        served = infer(server.http_url, features)
    np.testing.assert_allclose(served, reference(built_repository, features), rtol=1e-6, atol=1e-7)
    assert served.shape == (BATCH, 1) and np.all((served >= 0) & (served <= 1))


def infer(url: str, features: np.ndarray) -> np.ndarray:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as client:
        tensor = httpclient.InferInput(INPUT, list(features.shape), "FP32")
        tensor.set_data_from_numpy(features)
        return client.infer(MODEL, [tensor]).as_numpy(OUTPUT)


def reference(repository: Path, features: np.ndarray) -> np.ndarray:
    """The same model file run in this process by ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(repository / MODEL / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: features})[0]


def test_publish_skips_unchanged_uploads_changed_deletes_stale(s3, built_repository, tmp_path, capsys) -> None:
    repository = fraud_copy(built_repository, tmp_path)
    url = s3.url("sync")
    args = ("--to", url, "--repository", str(repository))
    assert publish(*args) == 0
    first = s3.keys("sync")
    assert len(first) == 5
    assert all(
        s3.client.head_object(Bucket=BUCKET, Key=f"sync/{key}")["Metadata"][HASH_METADATA]
        for key in first
    )
    capsys.readouterr()

    assert publish(*args) == 0
    out = capsys.readouterr().out
    assert "fraud: 0 files uploaded (0 B), 5 unchanged" in out
    assert {k: o["LastModified"] for k, o in s3.keys("sync").items()} == {k: o["LastModified"] for k, o in first.items()}

    # Same size, other bytes: only the hash tells, and only that file goes up again.
    decision = repository / MODEL / "1" / "decision.json"
    original = decision.read_bytes()
    changed = original[:-1] + (b" " if original[-1:] != b" " else b"\n")
    decision.write_bytes(changed)
    assert publish(*args) == 0
    assert f"fraud: 1 files uploaded ({human_bytes(len(changed))}), 4 unchanged" in capsys.readouterr().out
    body = s3.client.get_object(Bucket=BUCKET, Key=f"sync/{MODEL}/1/decision.json")["Body"].read()
    assert body == changed

    # A file gone locally and an object nobody publishes: kept without --delete, listed and
    # removed with it.
    (repository / MODEL / "1" / "manifest.json").unlink()
    s3.client.put_object(Bucket=BUCKET, Key="sync/old_model/config.pbtxt", Body=b"name: 'old_model'")
    assert publish(*args) == 0
    assert "sync/fraud/1/manifest.json" in {f"sync/{k}" for k in s3.keys("sync")}
    capsys.readouterr()
    assert publish(*args, "--delete", "--dry-run") == 0
    assert f"would delete s3://{BUCKET}/sync/old_model/config.pbtxt" in capsys.readouterr().out
    assert "old_model/config.pbtxt" in s3.keys("sync")
    assert publish(*args, "--delete") == 0
    out = capsys.readouterr().out
    assert f"deleted s3://{BUCKET}/sync/old_model/config.pbtxt" in out
    assert f"deleted s3://{BUCKET}/sync/fraud/1/manifest.json" in out
    assert ", 2 deleted" in out
    assert sorted(s3.keys("sync")) == sorted(
        f"{MODEL}/{p.relative_to(repository / MODEL).as_posix()}" for p in (repository / MODEL).rglob("*") if p.is_file()
    )


def test_a_folder_without_config_is_refused_by_name(s3, built_repository, tmp_path, capsys) -> None:
    repository = fraud_copy(built_repository, tmp_path)
    (repository / "half_built" / "1").mkdir(parents=True)
    (repository / "half_built" / "1" / "model.onnx").write_bytes(b"onnx")
    assert publish("--to", s3.url("refused"), "--repository", str(repository)) == 2
    err = capsys.readouterr().err
    assert "kiln publish: error: nothing was uploaded: model folder 'half_built' has no config.pbtxt" in err
    assert s3.keys("refused") == {}


def test_a_missing_bucket_endpoint_or_credentials_is_named(s3, built_repository, tmp_path, capsys, monkeypatch) -> None:
    repository = fraud_copy(built_repository, tmp_path)
    assert publish("--to", s3.url("prod", bucket="no-such-bucket"), "--repository", str(repository)) == 1
    err = capsys.readouterr().err
    assert f"cannot use bucket 'no-such-bucket' at {s3.endpoint}: the bucket does not exist" in err

    closed = f"http://127.0.0.1:{free_port()}"
    assert publish("--to", f"s3://{BUCKET}/prod", "--endpoint-url", closed, "--repository", str(repository)) == 1
    err = capsys.readouterr().err
    assert f"cannot use bucket '{BUCKET}' at {closed}: the endpoint does not answer" in err

    assert publish("--to", "gs://kiln-models/prod", "--repository", str(repository)) == 2
    assert "gs:// is not supported by kiln publish yet" in capsys.readouterr().err

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask either
    assert publish("--to", s3.url("prod"), "--repository", str(repository)) == 1
    assert f"cannot use bucket '{BUCKET}' at {s3.endpoint}: no AWS credentials" in capsys.readouterr().err



def test_kiln_serve_serves_from_the_bucket_with_the_callers_credentials(s3, built_repository, capsys) -> None:
    # The AWS_* variables reach tritonserver from kiln's own environment (the s3 fixture set them).
    url = s3.url("serve")
    assert publish("--to", url, "--model", MODEL) == 0
    from kiln.cli import build_parser
    from kiln.cli.serve import run_serve

    args = build_parser().parse_args([
        "serve", "--repository", url, "--free-ports", "--model-control-mode", "explicit",
        "--load-model", MODEL, "--no-openai", "--quiet",
    ])
    features = np.random.default_rng(16).normal(size=(BATCH, FEATURES)).astype(np.float32)
    served: list[np.ndarray] = []

    def on_ready(server: TritonServer) -> None:
        served.append(infer(server.http_url, features))
        raise KeyboardInterrupt  # what Ctrl-C does: kiln serve stops Triton and exits 0

    assert run_serve(args, on_ready=on_ready) == 0
    out = capsys.readouterr().out
    assert "is ready (pid " in out and f"serving {url}\n" in out
    assert f"{MODEL} (READY)" in out
    np.testing.assert_allclose(served[0], reference(built_repository, features), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("bucket", "prefix", "reason"),
    [
        ("no-such-bucket", "prod", "Unable to create S3 filesystem client"),
        (BUCKET, "nothing-here", "repository path is not a valid directory"),
    ],
)
def test_a_repository_url_triton_cannot_read_fails_the_start_with_the_url(s3, tmp_path, bucket, prefix, reason) -> None:
    # Serving on when a model fails (kiln serve's default) makes Triton run on, never ready, when
    # it cannot read the bucket: the start must still fail at once, naming the URL, not at the deadline.
    url = s3.url(prefix, bucket=bucket)
    server = TritonServer(
        url, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, env=CREDENTIALS,
        keep_serving_on_model_failure=True, startup_timeout=60, log_file=tmp_path / "tritonserver.log",
    )
    started = time.monotonic()
    with pytest.raises(RepositoryNotFoundError, match=f"tritonserver cannot read the model repository {url}: ") as failure:
        server.start()
    assert time.monotonic() - started < 30
    assert not server.running
    assert reason in str(failure.value)


# --- models that read other models' folders (kiln.serving.remote) ---

READERS = ("fraud_scorer", "text_embedder", "fraud_features", "fraud_threshold")
"""Served from the bucket and compared: the two fused pipelines (inside them fraud_features,
fraud_threshold and text_tokenizer read `fraud`'s and `text_encoder`'s files from the fetched
folders) and two steps on their own, whose `*_model` parameter names another model (text_tokenizer
on its own takes the same path)."""
GENERATOR = "tinylm_generate"
"""Also served from the bucket: kiln_generate finds `tinylm` through `find_artifact` with only the
parent of its folder, the other way a stub learns it was loaded from a copy (its own command
line). Its text is compared with a folder server's in docs/operations.md's one-off run, not here
(the in-process engine is another test's reference)."""
TEXTS = ("a cat sat on the mat", "Triton serves models from a bucket", "naïve café ☕", "x " * 300)
RECORDS = 24


def requests_for(repository: Path) -> dict[str, list[dict[str, np.ndarray]]]:
    """Each model's requests (inputs by name; an optional input left out is absent)."""
    from kiln.models.fraud import reference as fraud_reference

    records = np.array([[fraud_reference.encode(r)] for r in fraud_reference.records(RECORDS)], dtype=np.object_)
    values = np.random.default_rng(17).normal(size=(RECORDS, FEATURES)).astype(np.float32)
    values[:, 2] = np.abs(values[:, 2]) * 100  # one column on another scale
    texts = np.array([[t.encode("utf-8")] for t in TEXTS], dtype=np.object_)
    probabilities = np.linspace(0, 1, 33, dtype=np.float32).reshape(-1, 1)
    return {
        "fraud_scorer": [{"record": records}, {"feature_values": values}],
        "fraud_features": [{"record": records}, {"feature_values": values}],
        "fraud_threshold": [{"probability": probabilities}],
        "text_embedder": [{"text": texts}],
    }


def in_process(repository: Path, name: str) -> Any:
    """The model's step loaded in this process from the local folder, as its backend loads it."""
    from kiln.serving import fused
    from kiln.serving.adapter import LoadContext
    from kiln.spec import FUSED_BACKEND

    config, version_dir = fused.read_step_config(repository, name, for_model=name)
    backend, parameters = fused.step_backend(config)
    load = fused.load if backend == FUSED_BACKEND else fused.step_loader(backend, for_model=name, step=name)
    return load(LoadContext(name, repository / name, version_dir, config, parameters))


def infer_model(url: str, name: str, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    import tritonclient.http as httpclient

    tensors = []
    for tensor_name, array in inputs.items():
        tensor = httpclient.InferInput(tensor_name, list(array.shape), "BYTES" if array.dtype == object else "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    with httpclient.InferenceServerClient(url) as client:
        result = client.infer(name, tensors)
    return {output: result.as_numpy(output) for output in outputs}


def test_models_reading_other_models_folders_serve_from_s3_as_from_the_folder(
    s3, built_repository, tmp_path, capsys
) -> None:
    from kiln.serving.remote import CACHE_NAME

    url = s3.url("siblings")
    assert publish("--to", url, "--model", "fraud_scorer", "--model", "text_embedder", "--model", GENERATOR) == 0
    out = capsys.readouterr().out
    assert "read other models' folders when they load: served from a bucket, they fetch them from it" in out
    requests = requests_for(built_repository)
    expected: dict[str, list[dict[str, np.ndarray]]] = {}
    for name, sent in requests.items():
        step = in_process(built_repository, name)
        inputs = [t["name"] for t in step_inputs(built_repository, name)]
        answers = step.run([{i: request.get(i) for i in inputs} for request in sent])
        assert not [a for a in answers if isinstance(a, Exception)], answers
        expected[name] = answers

    mount = tmp_path / "mount"
    mount.mkdir()
    env = {**CREDENTIALS, "TRITON_AWS_MOUNT_DIRECTORY": str(mount)}
    with TritonServer(
        url, http_port=FREE_PORT, grpc_port=FREE_PORT, metrics_port=FREE_PORT, env=env,
        model_control_mode="explicit", load_models=(*READERS, GENERATOR), log_file=tmp_path / "tritonserver.log",
    ) as server:
        states = server.models()
        loaded = {name: states[name] for name in (*READERS, GENERATOR)}
        assert loaded == dict.fromkeys(loaded, "READY"), server.failed_models()
        # Triton gave each model a temporary folder of its own (none named after a model), and each
        # stub fetched the folders it reads into its own model's copy.
        copies = list(mount.iterdir())
        assert len(copies) == len(loaded) and not {p.name for p in copies} & set(states)
        fetched = {p.name: sorted(m.name for m in (p / CACHE_NAME).iterdir()) for p in copies}
        assert sorted(fetched.values()) == sorted([
            ["fraud"], ["fraud"], ["fraud", "fraud_features", "fraud_threshold"],
            ["text_encoder", "text_pool", "text_tokenizer"], ["tinylm"],
        ])
        assert generate(server.http_url, "The return value of")
        for name, sent in requests.items():
            for request, want in zip(sent, expected[name], strict=True):
                got = infer_model(server.http_url, name, request, sorted(want))
                for output, array in want.items():
                    if array.dtype.kind == "f":
                        np.testing.assert_allclose(got[output], array, rtol=1e-6, atol=1e-7, err_msg=f"{name}.{output}")
                    else:
                        np.testing.assert_array_equal(got[output], array, err_msg=f"{name}.{output}")

        # Each load fetches afresh: with fraud's decision.json gone from the bucket, fraud_threshold
        # no longer loads, and says which object of which repository it lacks.
        server.unload_model("fraud_threshold")
        s3.client.delete_object(Bucket=BUCKET, Key="siblings/fraud/1/decision.json")
        with pytest.raises(RepositoryApiError, match="in no version folder of ") as failure:
            server.load_model("fraud_threshold")
        message = str(failure.value)
        assert f"model 'fraud_threshold': 'decision.json' of model 'fraud' is in no version folder of {url}/fraud/" in message
    # Triton removed its copies, and with them what the stubs fetched.
    assert list(mount.iterdir()) == []


def generate(url: str, prompt: str) -> str:
    """Greedy text from Triton's HTTP generate endpoint."""
    import json
    import urllib.request

    body = json.dumps({"text_input": prompt, "max_tokens": 8, "temperature": 0}).encode()
    address = url if url.startswith("http") else f"http://{url}"
    request = urllib.request.Request(f"{address.rstrip('/')}/v2/models/{GENERATOR}/generate", data=body)
    with urllib.request.urlopen(request, timeout=60) as answer:
        return json.loads(answer.read())["text_output"]


def step_inputs(repository: Path, name: str) -> list[dict[str, Any]]:
    from kiln.serving.fused import read_step_config

    return list(read_step_config(repository, name, for_model=name)[0].get("input", ()))


def test_fetch_models_copies_a_model_folder_and_names_what_is_missing(s3, built_repository) -> None:
    # In this process boto3 imports (in a stub on this machine it cannot: kiln.serving.remote
    # then fetches through the environment's own Python, which the test above exercises).
    from kiln.serving import remote

    url = s3.url("fetch")
    assert publish("--to", url, "--model", MODEL) == 0
    folders = remote.fetch_models(url, [MODEL], for_model="test")
    copy = folders[MODEL]
    assert copy.name == MODEL and copy.is_dir()
    local = sorted(p.relative_to(built_repository / MODEL) for p in (built_repository / MODEL).rglob("*") if p.is_file())
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == local
    assert all((copy / p).read_bytes() == (built_repository / MODEL / p).read_bytes() for p in local)
    assert remote.fetch_model(url, MODEL, for_model="test") == copy  # once per process

    with pytest.raises(remote.RemoteFetchError) as missing:
        remote.fetch_model(url, "no_such_model", for_model="fraud_scorer")
    assert str(missing.value) == (
        f"model 'fraud_scorer' needs model 'no_such_model', which is not in the repository {url} "
        f"(no object under {url}/no_such_model/): publish it (`kiln publish --to URL --model fraud_scorer` "
        "publishes every model it needs)"
    )
    with pytest.raises(remote.RemoteFetchError, match="cannot list bucket 'no-such-bucket'"):
        remote.fetch_model(s3.url("fetch", bucket="no-such-bucket"), MODEL, for_model="test")
    with pytest.raises(remote.RemoteFetchError, match=r"fetches only from s3:// so far \(gs:// needs .*google-cloud-storage"):
        remote.fetch_model("gs://kiln-models/prod", MODEL, for_model="fraud_scorer")
