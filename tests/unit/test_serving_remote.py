"""kiln.serving.remote's decisions (no network, no server): when a model counts as loaded from a
copy of a remote repository, where the repository URL comes from, which folder is the stub's own
copy, and that a local repository never takes the remote path, even with KILN_REPOSITORY_URL set.
The fetching itself runs against a real S3 server and a real tritonserver in
tests/integration/test_s3_repository.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kiln.serving import remote
from kiln.serving.adapter import LoadContext, find_artifact
from kiln.serving.errors import ModelLoadError
from kiln.serving.fused import load as load_fused
from kiln.serving.fused import steps_parameter
from kiln.spec import EnsembleStep

URL = "s3://http://127.0.0.1:9/kiln-models/prod"
"""A repository nothing answers at (port 9, discard): fetching from it could only fail."""
TRITON = "/opt/pytriton/tritonserver/bin/tritonserver"


@pytest.fixture(autouse=True)
def no_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(remote.REPOSITORY_URL_ENV, raising=False)


def test_a_models_own_folder_carries_its_name_and_a_triton_copy_does_not() -> None:
    assert not remote.is_copy(Path("/srv/model_repository/fraud"), "fraud")
    assert remote.is_copy(Path("/tmp/folder8AEHNz"), "fraud")


def test_the_url_comes_from_the_variable_first_then_tritonservers_command_line() -> None:
    command = [TRITON, "--model-repository=s3://http://10.0.0.5:9000/models/prod", "--model-control-mode=none"]
    assert remote.repository_url({remote.REPOSITORY_URL_ENV: "gs://other/x"}, command) == "gs://other/x"
    assert remote.repository_url({}, command) == "s3://http://10.0.0.5:9000/models/prod"
    assert remote.repository_url({remote.REPOSITORY_URL_ENV: " "}, command) == "s3://http://10.0.0.5:9000/models/prod"
    assert remote.repository_url({}, [TRITON, "--model-repository", "as://acct/container/prod"]) == (
        "as://acct/container/prod"
    )
    assert remote.repository_url({}, [TRITON, "--model-store=gs://b/p"]) == "gs://b/p"


def test_no_url_when_the_parent_is_not_tritonserver_serves_a_folder_or_several_buckets() -> None:
    assert remote.repository_url({}, ["/usr/bin/python", "--model-repository=s3://b/p"]) is None
    assert remote.repository_url({}, [TRITON, "--model-repository=/srv/model_repository"]) is None
    both = [TRITON, "--model-repository=s3://b/one", "--model-repository=s3://b/two"]
    assert remote.repository_url({}, both) is None  # ambiguous: the error says to set the variable
    assert remote.repository_url({}, []) is None
    assert remote.remote_urls([TRITON, "--model-repository=/m", "--model-repository=s3://b/p"]) == ["s3://b/p"]


def test_the_stubs_own_copy_is_read_from_its_command_line(tmp_path: Path) -> None:
    copy = tmp_path / "folderAbC123"
    (copy / "1").mkdir(parents=True)
    stub = ["/x/backends/python/triton_python_backend_stub", str(copy / "1" / "model.py"), "shm", "1048576"]
    assert remote.own_copy(tmp_path, stub) == copy
    assert remote.own_copy(tmp_path / "elsewhere", stub) is None  # not in the folder asked about
    assert remote.own_copy(tmp_path, ["/usr/bin/python", "-m", "pytest"]) is None


def write_model(repository: Path, name: str, files: dict[str, str], config: dict | None = None) -> Path:
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    for file, text in files.items():
        (folder / "1" / file).write_text(text)
    (folder / "config.pbtxt").write_text(json.dumps(config or {}))
    return folder


def test_a_local_repository_reads_its_siblings_even_with_a_url_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(remote.REPOSITORY_URL_ENV, URL)
    write_model(tmp_path, "fraud", {"features.json": "{}"})
    asking = write_model(tmp_path, "fraud_features", {})
    expected = tmp_path / "fraud" / "1" / "features.json"
    assert find_artifact(tmp_path, "fraud", "features.json", for_model="fraud_features") == expected
    context = LoadContext("fraud_features", asking, asking / "1", {}, {},
                          remote=remote.remote_repository(asking, "fraud_features"))
    assert context.remote is None
    assert context.model_folder("fraud") == tmp_path / "fraud"
    assert context.artifact("fraud", "features.json") == expected


def test_a_copy_with_no_url_known_says_what_to_set(tmp_path: Path) -> None:
    copy = write_model(tmp_path, "folderQx81Lp", {})
    assert remote.remote_repository(copy, "fraud_features") is None  # pytest's parent is no tritonserver
    context = LoadContext("fraud_features", copy, copy / "1", {}, {})
    with pytest.raises(FileNotFoundError) as caught:
        context.artifact("fraud", "features.json")
    assert str(caught.value).startswith(
        f"model 'fraud_features': 'features.json' of model 'fraud' not found under {tmp_path / 'fraud'} "
    )
    assert f"set {remote.REPOSITORY_URL_ENV} to the --model-repository URL" in str(caught.value)
    with pytest.raises(FileNotFoundError, match=f"kiln knows no repository URL .*set {remote.REPOSITORY_URL_ENV}"):
        find_artifact(tmp_path, "tinylm", "generation.json", for_model="tinylm_generate")


def test_a_fused_pipeline_copy_with_no_url_known_fails_naming_the_variable(tmp_path: Path) -> None:
    copy = write_model(tmp_path, "folderZ0p9Qr", {})
    wiring = steps_parameter([EnsembleStep("fraud", {"features": "features"}, {"probability": "probability"})])
    config = {
        "max_batch_size": 8,
        "input": [{"name": "features", "data_type": "TYPE_FP32", "dims": ["16"]}],
        "output": [{"name": "probability", "data_type": "TYPE_FP32", "dims": ["1"]}],
    }
    context = LoadContext("fraud_scorer", copy, copy / "1", config, {"steps": wiring})
    with pytest.raises(ModelLoadError, match=f"model 'fraud_scorer' was loaded from a copy Triton made in {copy}"):
        load_fused(context)


def test_a_bad_model_name_is_refused_before_anything_is_fetched(tmp_path: Path) -> None:
    copy = write_model(tmp_path, "folderAAAAAA", {})
    context = LoadContext("fraud_features", copy, copy / "1", {}, {}, remote=remote.RemoteRepository(URL, copy))
    with pytest.raises(ValueError, match=r"model 'fraud_features': '\.\./etc' is not a model name"):
        context.model_folder("../etc")


def test_gs_and_as_are_named_with_what_they_need() -> None:
    with pytest.raises(remote.RemoteFetchError) as caught:
        remote.fetch_model("as://acct/container/prod", "fraud", for_model="fraud_features")
    assert str(caught.value) == (
        "model 'fraud_features' was loaded from as://acct/container/prod and reads other models' folders, "
        "which kiln fetches only from s3:// so far (as:// needs a store in kiln/serving/remote.py over "
        "azure-storage-blob (credentials: AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY, as Triton's)); "
        "serve it from a local copy"
    )


def test_the_fetch_command_says_how_to_call_it(capsys) -> None:
    assert remote.main(["s3://b/p"]) == 2
    assert "usage: python -m kiln.serving.remote URL INTO FOR_MODEL MODEL..." in capsys.readouterr().err
