"""`kiln publish`'s planning (no network): the URL forms Triton takes, which models and files go
up in which order, what is skipped, what is deleted; and a repository URL through TritonServer's
command line. The uploads themselves run against a real S3 server in
tests/integration/test_s3_repository.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kiln import paths
from kiln.cli.serve import repository_arg
from kiln.publish_remote import (
    CHANGED,
    NEW,
    UNCHANGED,
    LocalFile,
    LocalModel,
    PublishError,
    RemoteLocation,
    RemoteObject,
    describe_storage_error,
    environment_endpoint,
    file_action,
    is_published_file,
    model_dependencies,
    needs_hash,
    parse_location,
    plan,
    reads_other_folders,
    scan_configs,
    scan_model,
    select_models,
    upload_order,
)
from kiln.registry import by_name
from kiln.repository import render
from kiln.server import Options, Ports, TritonServer, is_repository_url

ENDPOINT = "http://127.0.0.1:9000"
HERE = RemoteLocation("s3", "models", "prod")
HERE_LOCAL = RemoteLocation("s3", "models", "prod", ENDPOINT)


def local(relative: str, content: bytes = b"x") -> LocalFile:
    import hashlib

    return LocalFile(relative, len(content), hashlib.sha256(content).hexdigest())


def stored(file: LocalFile) -> RemoteObject:
    """The object kiln would have written for `file`."""
    return RemoteObject(file.relative, file.size, file.sha256)


# --- URLs ---


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "endpoint", "triton_url"),
    [
        ("s3://models", "models", "", None, "s3://models"),
        ("s3://models/prod", "models", "prod", None, "s3://models/prod"),
        ("s3://models//team/prod/", "models", "team/prod", None, "s3://models/team/prod"),
        ("s3://http://127.0.0.1:9000/models/prod", "models", "prod", ENDPOINT,
         "s3://http://127.0.0.1:9000/models/prod"),
        ("s3://https://minio.example:8443/models", "models", "", "https://minio.example:8443",
         "s3://https://minio.example:8443/models"),
        # No protocol before HOST:PORT: Triton talks HTTP to it.
        ("s3://127.0.0.1:9000/models/prod", "models", "prod", ENDPOINT,
         "s3://http://127.0.0.1:9000/models/prod"),
    ],
)
def test_the_url_forms_triton_accepts(url, bucket, prefix, endpoint, triton_url) -> None:
    location = parse_location(url)
    assert (location.bucket, location.prefix, location.endpoint) == (bucket, prefix, endpoint)
    assert location.triton_url == triton_url
    assert parse_location(location.triton_url) == location


def test_an_endpoint_flag_goes_into_the_url_triton_needs_with_its_port() -> None:
    # Triton reads no endpoint variable, and its URL regex needs the port.
    assert parse_location("s3://models/prod", "http://localhost").triton_url == (
        "s3://http://localhost:80/models/prod"
    )
    assert parse_location("s3://models", "https://s3.example.com/").endpoint == "https://s3.example.com:443"
    # The same endpoint twice is fine; two different ones are not.
    assert parse_location("s3://http://127.0.0.1:9000/models", ENDPOINT + "/").endpoint == ENDPOINT
    with pytest.raises(PublishError, match="names endpoint http://127.0.0.1:9000, but the endpoint given is http://127.0.0.1:9001"):
        parse_location("s3://http://127.0.0.1:9000/models", "http://127.0.0.1:9001")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "'s3://' names no bucket: use s3://BUCKET/PREFIX"),
        ("model_repository", "'model_repository' is not an object-storage URL: use s3://BUCKET/PREFIX"),
        ("https://models.s3.amazonaws.com/prod", "is not an object-storage URL"),
        ("s3://http://127.0.0.1/models", "Triton needs the endpoint's port in the URL: s3://http://HOST:PORT/BUCKET/PREFIX"),
        ("s3://Models/prod", "'Models' is not a valid bucket name"),
        ("s3://my_models/prod", "'my_models' is not a valid bucket name"),
        ("s3://ab", "'ab' is not a valid bucket name"),
        ("s3://models/../other", "the prefix may not contain '..'"),
        ("s3://http://127.0.0.1:9000/models/my prefix", "prefix segment 'my prefix' has characters Triton's"),
        ("gs://models/prod", "gs:// is not supported by kiln publish yet (google-cloud-storage is not installed); use gsutil rsync"),
        ("as://account/container", "as:// is not supported by kiln publish yet; use az storage blob sync"),
    ],
)
def test_bad_urls_say_what_is_wrong(url, message) -> None:
    with pytest.raises(PublishError, match=_escaped(message)):
        parse_location(url)


def test_bad_endpoints_are_refused() -> None:
    with pytest.raises(PublishError, match="endpoint 'ftp://h:1' must be http://HOST"):
        parse_location("s3://models", "ftp://h:1")
    with pytest.raises(PublishError, match="must have no path"):
        parse_location("s3://models", "http://h:1/models")


def test_the_endpoint_environment_variables_boto3_reads() -> None:
    assert environment_endpoint({}) is None
    assert environment_endpoint({"AWS_ENDPOINT_URL": "http://a:1"}) == "http://a:1"
    assert environment_endpoint({"AWS_ENDPOINT_URL": "http://a:1", "AWS_ENDPOINT_URL_S3": "http://b:2"}) == "http://b:2"


def test_keys_and_relative_paths() -> None:
    assert HERE.key("fraud/config.pbtxt") == "prod/fraud/config.pbtxt"
    assert HERE.relative("prod/fraud/config.pbtxt") == "fraud/config.pbtxt"
    assert HERE.relative("production/fraud/config.pbtxt") is None
    root = RemoteLocation("s3", "models")
    assert root.key("fraud/config.pbtxt") == "fraud/config.pbtxt" == root.relative("fraud/config.pbtxt")
    assert str(HERE_LOCAL) == "s3://models/prod at http://127.0.0.1:9000"


# --- which models ---


def committed_configs() -> dict[str, str | None]:
    """The committed repository's configs (config.pbtxt files are in git; no build needed)."""
    return scan_configs(paths.model_repository())


def test_a_fused_pipeline_brings_its_steps_first() -> None:
    assert select_models(committed_configs(), ["fraud_scorer"]) == (
        "fraud", "fraud_features", "fraud_threshold", "fraud_scorer",
    )


def test_an_ensemble_brings_its_steps_first() -> None:
    ensemble = render(dataclasses.replace(by_name("fraud_scorer"), form="ensemble"))
    assert model_dependencies("fraud_scorer", ensemble) == ("fraud_features", "fraud", "fraud_threshold")
    configs = {**committed_configs(), "fraud_scorer": ensemble}
    assert select_models(configs, ["fraud_scorer"])[-1] == "fraud_scorer"
    assert set(select_models(configs, ["fraud_scorer"])) == {"fraud", "fraud_features", "fraud_threshold", "fraud_scorer"}


def test_a_step_reading_another_models_files_brings_that_model() -> None:
    configs = committed_configs()
    # kiln_tabular's stats_model, kiln_threshold's threshold_model, kiln_text's tokenizer_model,
    # kiln_generate's model.
    assert select_models(configs, ["fraud_features"]) == ("fraud", "fraud_features")
    assert select_models(configs, ["fraud_threshold"]) == ("fraud", "fraud_threshold")
    assert select_models(configs, ["text_tokenizer"]) == ("text_encoder", "text_tokenizer")
    assert select_models(configs, ["tinylm_generate"]) == ("tinylm", "tinylm_generate")
    # A plain model needs nothing; several names are merged, each model once.
    assert select_models(configs, ["fraud"]) == ("fraud",)
    assert select_models(configs, ["fraud_threshold", "fraud_scorer", "fraud"]).count("fraud") == 1


def test_which_models_read_other_models_folders() -> None:
    # What Triton 2.51 cannot load from a bucket (each model gets a temporary folder of its own);
    # measured in docs/operations.md: exactly these 9 of the 30 failed to load from S3.
    configs = committed_configs()
    readers = {name for name, text in configs.items() if text and reads_other_folders(name, text, configs)}
    assert readers == {
        "digits_reader", "fraud_scorer", "image_classifier", "image_classifier_int8", "text_embedder",  # fused
        "fraud_features", "fraud_threshold", "text_tokenizer", "tinylm_generate",  # *_model parameters
    }
    ensemble = render(dataclasses.replace(by_name("digits_reader"), form="ensemble"))
    assert not reads_other_folders("digits_reader", ensemble, configs)  # Triton wires it by name


def test_no_selection_means_every_model_folder() -> None:
    configs = committed_configs()
    selected = select_models(configs)
    assert sorted(selected) == sorted(configs)
    assert selected.index("fraud") < selected.index("fraud_scorer")
    assert selected.index("text_encoder") < selected.index("text_tokenizer") < selected.index("text_embedder")


def test_a_folder_without_config_is_named() -> None:
    configs = {**committed_configs(), "broken": None}
    with pytest.raises(PublishError, match="model folder 'broken' has no config.pbtxt: write it with `kiln generate`"):
        select_models(configs)
    # Not asked for and not needed: fine.
    assert select_models(configs, ["fraud"]) == ("fraud",)
    configs["fraud"] = None
    with pytest.raises(PublishError, match=r"model folder 'fraud' has no config.pbtxt \(model 'fraud_features' needs it\)"):
        select_models(configs, ["fraud_features"])


def test_unknown_and_missing_models_are_named() -> None:
    configs = committed_configs()
    with pytest.raises(PublishError, match="no model folder 'fraud_scorre' in the repository; it has: digits, "):
        select_models(configs, ["fraud_scorre"])
    del configs["fraud_threshold"]
    with pytest.raises(PublishError, match="model 'fraud_scorer' needs model 'fraud_threshold', which is not in the repository"):
        select_models(configs, ["fraud_scorer"])


def test_a_config_that_does_not_parse_is_named() -> None:
    with pytest.raises(PublishError, match="model 'bad': config.pbtxt does not parse"):
        select_models({"bad": "name: 'bad'\nnot_a_field: 1\n"})
    fused = 'name: "p"\nbackend: "kiln_fused"\nparameters { key: "steps" value { string_value: "[]" } }\n'
    with pytest.raises(PublishError, match="model 'p': parameter 'steps' must be a non-empty JSON list"):
        select_models({"p": fused})


# --- which files, in which order ---


def test_config_goes_up_last_per_model() -> None:
    files = [local("m/config.pbtxt"), local("m/1/model.onnx"), local("m/labels.txt"), local("m/1/.gitkeep")]
    assert [f.relative for f in upload_order(files)] == [
        "m/1/.gitkeep", "m/1/model.onnx", "m/labels.txt", "m/config.pbtxt",
    ]
    # Only a model's own config.pbtxt counts as its config.
    assert local("m/config.pbtxt").is_config and not local("m/1/config.pbtxt").is_config


def test_skip_logic_compares_size_and_stored_hash() -> None:
    file = local("m/1/model.onnx", b"abcd")
    assert file_action(file, None) == NEW
    assert file_action(file, stored(file)) == UNCHANGED
    assert file_action(file, RemoteObject(file.relative, 5, file.sha256)) == CHANGED
    same_size_other_bytes = local("m/1/model.onnx", b"abce")
    assert file_action(file, stored(same_size_other_bytes)) == CHANGED
    # Written by another tool: no hash, so uploaded again (once).
    assert file_action(file, RemoteObject(file.relative, 4)) == CHANGED
    # Only a same-size object needs its hash read (one HEAD); a different size is known changed.
    assert needs_hash(file, RemoteObject(file.relative, 4))
    assert not needs_hash(file, RemoteObject(file.relative, 5))
    assert not needs_hash(file, None)
    assert not needs_hash(file, stored(file))


def test_plan_orders_models_and_files_and_counts_bytes() -> None:
    step = LocalModel("step", (local("step/config.pbtxt", b"cfg"), local("step/1/model.onnx", b"onnx")))
    pipeline = LocalModel("pipe", (local("pipe/config.pbtxt", b"p"), local("pipe/1/.gitkeep", b"")))
    remote = {"step/1/model.onnx": stored(step.files[1])}
    decided = plan(HERE, [step, pipeline], remote)
    assert [m.model for m in decided.models] == ["step", "pipe"]
    assert [(f.relative, action) for f, action in decided.models[0].uploads] == [("step/config.pbtxt", NEW)]
    assert [f.relative for f in decided.models[0].unchanged] == ["step/1/model.onnx"]
    assert [f.relative for f, _ in decided.models[1].uploads] == ["pipe/1/.gitkeep", "pipe/config.pbtxt"]
    assert (decided.uploads, decided.unchanged, decided.upload_bytes) == (3, 1, 4)
    assert decided.deletions == ()


def test_delete_lists_stale_objects_removed_models_config_first() -> None:
    kept = LocalModel("kept", (local("kept/config.pbtxt"), local("kept/1/model.onnx")))
    remote = {f.relative: stored(f) for f in kept.files} | {
        "kept/1/old.onnx": RemoteObject("kept/1/old.onnx", 1),
        "gone/1/model.onnx": RemoteObject("gone/1/model.onnx", 1),
        "gone/config.pbtxt": RemoteObject("gone/config.pbtxt", 1),
        "gone/": RemoteObject("gone/", 0),  # a folder marker some tools write: not a file
        "README": RemoteObject("README", 1),
    }
    assert plan(HERE, [kept], remote).deletions == ()  # nothing unless asked
    assert plan(HERE, [kept], remote, delete=True).deletions == (
        "gone/config.pbtxt", "README", "gone/1/model.onnx", "kept/1/old.onnx",
    )
    # Some models named: only stale objects inside their folders.
    assert plan(HERE, [kept], remote, delete=True, whole_repository=False).deletions == ("kept/1/old.onnx",)


def test_a_key_triton_cannot_read_from_an_endpoint_url_is_refused() -> None:
    model = LocalModel("m", (local("m/config.pbtxt"), local("m/1/my weights.bin")))
    with pytest.raises(PublishError, match="'m/1/my weights.bin' has a name Triton cannot read from an s3://HOST:PORT/ repository"):
        plan(HERE_LOCAL, [model], {})
    assert plan(HERE, [model], {}).uploads == 2  # AWS form: Triton parses any key


# --- the local files ---


def test_which_local_files_are_published(tmp_path: Path) -> None:
    assert is_published_file(Path("1/.gitkeep"))  # what makes an empty version folder exist
    assert is_published_file(Path("1/model.onnx"))
    assert not is_published_file(Path("1/.model.onnx.a1b2c3.tmp"))  # kiln's atomic writer
    assert not is_published_file(Path("1/__pycache__/x.pyc"))
    folder = tmp_path / "m"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text('name: "m"\n')
    (folder / "1" / "model.onnx").write_bytes(b"abcd")
    (folder / "1" / ".model.onnx.x.tmp").write_bytes(b"half")
    model = scan_model(tmp_path, "m")
    assert [(f.relative, f.size) for f in model.files] == [("m/1/model.onnx", 4), ("m/config.pbtxt", 10)]
    assert model.files[0].sha256 == local("x", b"abcd").sha256
    (folder / "2").mkdir()
    with pytest.raises(PublishError, match="version folder m/2 is empty: a bucket has no empty folders, so Triton would not see version 2"):
        scan_model(tmp_path, "m")
    (folder / "2" / ".gitkeep").write_bytes(b"")
    assert scan_model(tmp_path, "m").files[1].relative == "m/2/.gitkeep"
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "no_config").mkdir()
    assert scan_configs(tmp_path) == {"m": 'name: "m"\n', "no_config": None}
    with pytest.raises(PublishError, match=f"model repository {tmp_path / 'nope'} is not a folder"):
        scan_configs(tmp_path / "nope")


# --- what a refusal of the store says ---


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("404", "cannot use bucket 'models' at http://127.0.0.1:9000: the bucket does not exist (create it first)"),
        ("NoSuchBucket", "the bucket does not exist"),
        ("403", "cannot use bucket 'models' at http://127.0.0.1:9000: access denied (403); check the credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"),
        ("InvalidAccessKeyId", "access denied (InvalidAccessKeyId: The key is unknown)"),
        ("SlowDown", "cannot use bucket 'models' at http://127.0.0.1:9000: SlowDown: The key is unknown"),
    ],
)
def test_a_refusal_names_the_bucket_the_endpoint_and_the_cause(code, message) -> None:
    from botocore.exceptions import ClientError

    error = ClientError({"Error": {"Code": code, "Message": "The key is unknown" if code not in ("404", "403") else ""}}, "HeadBucket")
    assert message in describe_storage_error(error, "use", "bucket 'models' at http://127.0.0.1:9000")


def test_unreachable_and_anonymous_are_told_apart() -> None:
    from botocore.exceptions import EndpointConnectionError, NoCredentialsError

    where = "bucket 'models' at http://127.0.0.1:1"
    assert describe_storage_error(EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), "use", where) == (
        "cannot use bucket 'models' at http://127.0.0.1:1: the endpoint does not answer (Could not connect to the "
        'endpoint URL: "http://127.0.0.1:1"); check --endpoint-url'
    )
    assert describe_storage_error(NoCredentialsError(), "upload to", where) == (
        "cannot upload to bucket 'models' at http://127.0.0.1:1: no AWS credentials (Unable to locate credentials); "
        "set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION or AWS_PROFILE"
    )


# --- serving from a URL ---


def test_a_repository_url_reaches_tritonserver_as_written(tmp_path: Path) -> None:
    url = "s3://http://127.0.0.1:9000/models/prod"
    assert is_repository_url(url) and is_repository_url("gs://b/p") and is_repository_url("as://a/c")
    assert not is_repository_url(Path("s3://b")) and not is_repository_url("model_repository")
    server = TritonServer(url, env={"AWS_ACCESS_KEY_ID": "k"})
    assert server.repository == url and server.env == {"AWS_ACCESS_KEY_ID": "k"}
    assert isinstance(TritonServer(tmp_path).repository, Path)
    options = Options(
        repository=url, host="127.0.0.1", ports=Ports(http=1, grpc=2, metrics=3), model_control_mode="none",
        load_models=(), exit_timeout=1, log_verbose=0, restricted_args=(), extra_args=(),
    )
    assert f"--model-repository={url}" in options.command(Path("tritonserver"), tmp_path, "p")
    folder = dataclasses.replace(options, repository=tmp_path / "." / "repo")
    assert f"--model-repository={(tmp_path / 'repo').resolve()}" in folder.command(Path("t"), tmp_path, "p")
    # kiln serve --repository keeps a URL whole (a Path would collapse its '//').
    assert repository_arg(url) == url and repository_arg("model_repository") == Path("model_repository")


def _escaped(text: str) -> str:
    import re

    return re.escape(text)
