"""The model repository in object storage: `kiln publish --to s3://BUCKET/PREFIX`.

Triton 2.51 serves a model repository straight from a bucket (`--model-repository=s3://...`): at
each load it downloads the model's folder into a local temporary folder. This module puts kiln's
generated repository there, and is split in two so that the decisions are unit-tested without a
network:

    planning (no I/O)  `parse_location` (the URL forms Triton accepts), `select_models` (the
                       named models plus every model they need: an ensemble's and a fused
                       pipeline's steps, a step's `*_model` parameter), `file_action` and `plan`
                       (which files to upload, in which order, what is unchanged, what is stale)
    doing (I/O)        `scan_configs`, `scan_model` (hashes), `S3Store` (boto3: list, head,
                       upload, delete, with errors translated into `RemoteStorageError`) and
                       `publish`, which runs the plan and reports one line per model

Why the order matters: a Triton polling the bucket (`--model-control-mode poll`) loads a model
as soon as it sees its config.pbtxt, so each model's files go up before its config.pbtxt, and
the models a pipeline needs go up before the pipeline. Deleting runs the other way: a model that
left the repository loses its config.pbtxt first.

Why a hash in the metadata: an object's ETag is an MD5 only for single-part uploads, so each
object kiln writes carries the sha256 of its bytes (`x-amz-meta-kiln-sha256`); an object whose
size and hash equal the local file's is not uploaded again. An object written by another tool
(no hash) is uploaded once more.

Only s3:// is written here (boto3); gs:// and as:// are refused with the tool to use instead,
though `kiln serve` and `TritonServer` serve all three. Models that read other models' folders
at load (fused pipelines, steps with a `*_model` parameter; `reads_other_folders`) fetch those
from the bucket when served from it (`kiln.serving.remote`); the command names them, since that
needs boto3 and read access where tritonserver runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from kiln.build.publish import sha256_file
from kiln.repository import CONFIG_NAME, KEEP_FILE
from kiln.server.process import REMOTE_REPOSITORY_SCHEMES
from kiln.spec import FUSED_BACKEND

S3_SCHEME = "s3"
REMOTE_SCHEMES = tuple(prefix.partition("://")[0] for prefix in REMOTE_REPOSITORY_SCHEMES)
"""Object stores Triton 2.51 serves a repository from: s3, gs, as."""
UNSUPPORTED_HINTS = {
    "gs": "gs:// is not supported by kiln publish yet (google-cloud-storage is not installed); "
    "use gsutil rsync -r model_repository gs://BUCKET/PREFIX (Triton serves gs:// itself)",
    "as": "as:// is not supported by kiln publish yet; use az storage blob sync "
    "(Triton serves as:// itself)",
}
HASH_METADATA = "kiln-sha256"
"""User metadata key holding the sha256 of an object's bytes (x-amz-meta-kiln-sha256)."""
DEPENDENCY_PARAM = re.compile(r"^(?:model|[a-z0-9]+(?:_[a-z0-9]+)*_model)$")
"""Parameters naming another repository model whose files a step reads (stats_model,
threshold_model, tokenizer_model, kiln_generate's model)."""
FUSED_STEPS_PARAM = "steps"
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
"""S3's bucket naming rules (3-63 characters); Triton's endpoint regex takes [0-9a-z.-] too."""
TRITON_KEY_SEGMENT = re.compile(r"^[0-9A-Za-z._\-]+$")
"""Characters Triton's regex allows in each key segment of an s3://http://HOST:PORT/... URL;
a key with others makes Triton misread the URL."""
HOST_PORT = re.compile(r"^[0-9A-Za-z.\-]+:[0-9]+$")
DEFAULT_PORTS = {"http": 80, "https": 443}
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Environment variables boto3 reads for a custom endpoint (the S3-specific one first)."""
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
"""What tritonserver's S3 client reads from its environment (or AWS_PROFILE)."""
SKIPPED_DIRS = ("__pycache__",)
NEW, CHANGED, UNCHANGED = "new", "changed", "unchanged"
PROG = "kiln publish"


class PublishError(Exception):
    """The request cannot be done as given: a bad URL, a missing config.pbtxt, an unknown model.
    Nothing was written."""


class RemoteStorageError(PublishError):
    """The object store refused or could not be reached; the message names the bucket and the
    endpoint."""


# --- where: the URL ---


@dataclass(frozen=True)
class RemoteLocation:
    """A model repository in a bucket.

    Attributes:
        scheme: "s3".
        bucket: The bucket.
        prefix: The key prefix of the repository, without leading or trailing '/' ("" for the
            bucket's root).
        endpoint: An S3-compatible server ("http://127.0.0.1:9000"), None for AWS itself.
    """

    scheme: str
    bucket: str
    prefix: str = ""
    endpoint: str | None = None

    def key(self, relative: str) -> str:
        """The object key of a repository-relative path ("fraud/config.pbtxt")."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str | None:
        """The repository-relative path of an object key; None outside the prefix."""
        if not self.prefix:
            return key
        head = self.prefix + "/"
        return key[len(head):] if key.startswith(head) else None

    @property
    def list_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    @property
    def triton_url(self) -> str:
        """The --model-repository value Triton needs: a custom endpoint goes inside the URL
        (`s3://http://HOST:PORT/BUCKET/PREFIX`), since Triton reads no endpoint variable."""
        where = f"{self.endpoint}/" if self.endpoint else ""
        return f"{self.scheme}://{where}{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")

    def __str__(self) -> str:
        url = f"{self.scheme}://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        return url + (f" at {self.endpoint}" if self.endpoint else "")


def normalize_endpoint(url: str) -> str:
    """`scheme://host:port` of an endpoint URL, the port spelled out (Triton needs it).

    Raises:
        PublishError: not an http(s) URL with a host, or it has a path.
    """
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise PublishError(f"endpoint {url!r} must be http://HOST[:PORT] or https://HOST[:PORT]")
    if parts.path.strip("/") or parts.query:
        raise PublishError(f"endpoint {url!r} must have no path (the bucket goes in --to)")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as error:
        raise PublishError(f"endpoint {url!r}: {error}") from None
    return f"{parts.scheme}://{parts.hostname}:{port}"


def parse_location(url: str, endpoint_url: str | None = None) -> RemoteLocation:
    """Reads the forms of a repository URL Triton 2.51 accepts.

    `s3://BUCKET[/PREFIX]` (AWS; the endpoint may come from `endpoint_url`),
    `s3://http://HOST:PORT/BUCKET[/PREFIX]`, `s3://https://HOST:PORT/...` and
    `s3://HOST:PORT/BUCKET[/PREFIX]` (an S3-compatible server over HTTP). Extra slashes are
    dropped, as Triton does.

    Args:
        url: The URL.
        endpoint_url: An S3-compatible server (--endpoint-url, AWS_ENDPOINT_URL); it must agree
            with an endpoint written in the URL.

    Raises:
        PublishError: not s3://, no bucket, a bad bucket name or key segment, an endpoint
            without a port, or two different endpoints; gs:// and as:// say what to use instead.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in REMOTE_SCHEMES:
        raise PublishError(
            f"{url!r} is not an object-storage URL: use s3://BUCKET/PREFIX, or "
            "s3://http://HOST:PORT/BUCKET/PREFIX for an S3-compatible server"
        )
    if scheme != S3_SCHEME:
        raise PublishError(UNSUPPORTED_HINTS[scheme])
    endpoint = None
    for protocol in ("http://", "https://"):
        if rest.startswith(protocol):
            host, _, rest = rest[len(protocol):].partition("/")
            if not HOST_PORT.match(host):
                raise PublishError(
                    f"{url!r}: Triton needs the endpoint's port in the URL: "
                    f"s3://{protocol}HOST:PORT/BUCKET/PREFIX"
                )
            endpoint = protocol + host
            break
    else:
        host, _, after = rest.partition("/")
        if HOST_PORT.match(host):  # Triton reads s3://HOST:PORT/... as an HTTP endpoint
            endpoint, rest = "http://" + host, after
    segments = [s for s in rest.split("/") if s]
    if not segments:
        raise PublishError(f"{url!r} names no bucket: use s3://BUCKET/PREFIX")
    bucket, keys = segments[0], segments[1:]
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise PublishError(
            f"{url!r}: {bucket!r} is not a valid bucket name (3-63 characters: a-z, 0-9, '.', "
            "'-'; starting and ending with a letter or digit)"
        )
    for segment in keys:
        if segment in (".", ".."):
            raise PublishError(f"{url!r}: the prefix may not contain {segment!r}")
        if endpoint is not None and not TRITON_KEY_SEGMENT.match(segment):
            raise PublishError(
                f"{url!r}: prefix segment {segment!r} has characters Triton's s3://HOST:PORT/ URL "
                "does not take (only A-Z a-z 0-9 . _ -)"
            )
    if endpoint_url:
        given = normalize_endpoint(endpoint_url)
        if endpoint is not None and normalize_endpoint(endpoint) != given:
            raise PublishError(f"{url!r} names endpoint {endpoint}, but the endpoint given is {given}")
        endpoint = given
    elif endpoint is not None:
        endpoint = normalize_endpoint(endpoint)
    return RemoteLocation(S3_SCHEME, bucket, "/".join(keys), endpoint)


def environment_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The custom endpoint boto3 would take from the environment (ENDPOINT_ENV), if any."""
    environ = os.environ if environ is None else environ
    return next((environ[name] for name in ENDPOINT_ENV if environ.get(name)), None)


# --- what: models, their dependencies, their files ---


@dataclass(frozen=True)
class LocalFile:
    """A file of the local repository.

    Attributes:
        relative: Its path in the repository, '/'-separated ("fraud/1/model.onnx").
        size: Bytes.
        sha256: Hex sha256 of its bytes.
    """

    relative: str
    size: int
    sha256: str

    @property
    def is_config(self) -> bool:
        """Whether it is a model's config.pbtxt (uploaded last, deleted first)."""
        return self.relative.count("/") == 1 and self.relative.endswith("/" + CONFIG_NAME)


@dataclass(frozen=True)
class LocalModel:
    """A model folder of the local repository and its files (config.pbtxt among them)."""

    name: str
    files: tuple[LocalFile, ...]


@dataclass(frozen=True)
class RemoteObject:
    """An object under the repository's prefix.

    Attributes:
        relative: Its key relative to the prefix.
        size: Bytes.
        sha256: The hash kiln stored in its metadata; None when unknown (not read because the
            size already differs, or written by another tool).
    """

    relative: str
    size: int
    sha256: str | None = None


def _parse_config(name: str, config_text: str) -> Any:
    """The config as a ModelConfig message; PublishError naming the model if it does not parse."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    try:
        return text_format.Parse(config_text, model_config_pb2.ModelConfig())
    except text_format.ParseError as error:
        raise PublishError(f"model {name!r}: {CONFIG_NAME} does not parse: {error}") from None


def _parameter_models(name: str, config: Any, available: Iterable[str]) -> list[str]:
    """Models in `available` that a `model` / `*_model` parameter names (whose files it reads)."""
    known = set(available)
    keys = [key for key in sorted(config.parameters) if DEPENDENCY_PARAM.match(key)]
    values = (config.parameters[key].string_value for key in keys)
    return [value for value in values if value in known and value != name]


def model_dependencies(name: str, config_text: str, available: Iterable[str] = ()) -> tuple[str, ...]:
    """The models `name` needs in the same repository, in the order its config names them.

    An ensemble's steps (ensemble_scheduling) and a fused pipeline's steps (parameter `steps`)
    are always needed; a `model` or `*_model` parameter (a step reading another model's files,
    e.g. stats_model) is when it names a model in `available`.

    Raises:
        PublishError: the config does not parse, or a fused pipeline's `steps` is malformed.
    """
    config = _parse_config(name, config_text)
    needed = [step.model_name for step in config.ensemble_scheduling.step]
    if config.backend == FUSED_BACKEND:
        from kiln.serving.errors import ModelLoadError
        from kiln.serving.fused import parse_steps

        steps = config.parameters.get(FUSED_STEPS_PARAM)
        text = steps.string_value if steps is not None else ""
        try:
            needed += [wiring.model for wiring in parse_steps(name, text)]
        except ModelLoadError as error:
            raise PublishError(str(error)) from None
    needed += _parameter_models(name, config, available)
    return tuple(dict.fromkeys(needed))


def reads_other_folders(name: str, config_text: str, available: Iterable[str] = ()) -> bool:
    """Whether the model reads other models' folders when it loads: a fused pipeline (its steps'
    configs and files) or a step with a `*_model` parameter. Triton 2.51 downloads each model of
    a bucket into a temporary folder of its own, so served from a bucket such a model fetches
    those folders from it (`kiln.serving.remote`; docs/operations.md, "Model repository in
    object storage"); an ensemble, which Triton wires by name, does not need to."""
    config = _parse_config(name, config_text)
    return config.backend == FUSED_BACKEND or bool(_parameter_models(name, config, available))


def select_models(
    configs: Mapping[str, str | None], wanted: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The models to publish, each after the models it needs (ties in name order).

    Args:
        configs: Every model folder of the repository -> its config.pbtxt text (None: it has
            none).
        wanted: Models asked for (None or empty: every folder).

    Raises:
        PublishError: a model asked for is not in the repository, a model to publish has no
            config.pbtxt, or a pipeline needs a model that is not there (each named).
    """
    available = sorted(configs)
    unknown = [name for name in wanted or () if name not in configs]
    if unknown:
        raise PublishError(
            f"no model folder {', '.join(map(repr, unknown))} in the repository; it has: "
            + (", ".join(available) or "(nothing)")
        )
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str, needed_by: str | None) -> None:
        if name in order:
            return
        if name in visiting:
            raise PublishError(f"models need each other in a cycle: {' -> '.join(visiting + [name])}")
        if name not in configs:
            raise PublishError(f"model {needed_by!r} needs model {name!r}, which is not in the repository")
        text = configs[name]
        if text is None:
            raise PublishError(
                f"model folder {name!r} has no {CONFIG_NAME}"
                + (f" (model {needed_by!r} needs it)" if needed_by else "")
                + ": write it with `kiln generate`, or remove the folder"
            )
        visiting.append(name)
        for dependency in model_dependencies(name, text, available):
            visit(dependency, name)
        visiting.pop()
        order.append(name)

    for name in sorted(wanted) if wanted else available:
        visit(name, None)
    return tuple(order)


def upload_order(files: Iterable[LocalFile]) -> tuple[LocalFile, ...]:
    """A model's files in upload order: every other file by path, its config.pbtxt last."""
    return tuple(sorted(files, key=lambda f: (f.is_config, f.relative)))


def file_action(local: LocalFile, remote: RemoteObject | None) -> str:
    """NEW (no object), UNCHANGED (same size and stored hash) or CHANGED (anything else)."""
    if remote is None:
        return NEW
    if remote.size == local.size and remote.sha256 == local.sha256:
        return UNCHANGED
    return CHANGED


def needs_hash(local: LocalFile, remote: RemoteObject | None) -> bool:
    """Whether telling CHANGED from UNCHANGED needs the object's stored hash (one HEAD): only
    when an object of the same size exists."""
    return remote is not None and remote.size == local.size and remote.sha256 is None


@dataclass(frozen=True)
class ModelPlan:
    """What publishing does for one model.

    Attributes:
        model: Its name.
        uploads: Files to upload, in order (config.pbtxt last), each with NEW or CHANGED.
        unchanged: Files already there with the same size and hash.
    """

    model: str
    uploads: tuple[tuple[LocalFile, str], ...]
    unchanged: tuple[LocalFile, ...]

    @property
    def upload_bytes(self) -> int:
        return sum(f.size for f, _ in self.uploads)


@dataclass(frozen=True)
class Plan:
    """Everything `publish` does, decided before any write.

    Attributes:
        location: Where.
        models: Per model, in publishing order (what a pipeline needs first).
        deletions: Repository-relative keys of stale objects to delete (with --delete), each
            removed model's config.pbtxt first.
    """

    location: RemoteLocation
    models: tuple[ModelPlan, ...]
    deletions: tuple[str, ...] = ()

    @property
    def uploads(self) -> int:
        return sum(len(m.uploads) for m in self.models)

    @property
    def unchanged(self) -> int:
        return sum(len(m.unchanged) for m in self.models)

    @property
    def upload_bytes(self) -> int:
        return sum(m.upload_bytes for m in self.models)


def plan(
    location: RemoteLocation,
    models: Sequence[LocalModel],
    remote: Mapping[str, RemoteObject],
    *,
    delete: bool = False,
    whole_repository: bool = True,
) -> Plan:
    """Decides what to upload, skip and delete.

    Args:
        location: The repository's bucket and prefix.
        models: The models to publish, in publishing order (`select_models`).
        remote: Objects under the prefix by relative key (hashes read where `needs_hash` said).
        delete: Delete stale objects: those no local file of the published models matches.
        whole_repository: Every model is published, so stale means anything under the prefix;
            False (some models named): only objects inside the published models' folders.

    Raises:
        PublishError: a key has characters Triton's s3://HOST:PORT/ URL form cannot read.
    """
    model_plans = []
    local_keys: set[str] = set()
    for model in models:
        uploads, unchanged = [], []
        for file in upload_order(model.files):
            if location.endpoint is not None:
                bad = [s for s in file.relative.split("/") if not TRITON_KEY_SEGMENT.match(s)]
                if bad:
                    raise PublishError(
                        f"{file.relative!r} has a name Triton cannot read from an "
                        f"s3://HOST:PORT/ repository (only A-Z a-z 0-9 . _ -): {bad[0]!r}"
                    )
            local_keys.add(file.relative)
            action = file_action(file, remote.get(file.relative))
            if action == UNCHANGED:
                unchanged.append(file)
            else:
                uploads.append((file, action))
        model_plans.append(ModelPlan(model.name, tuple(uploads), tuple(unchanged)))
    deletions: tuple[str, ...] = ()
    if delete:
        scope = {m.name for m in models}
        stale = [
            key for key in remote
            if key not in local_keys and not key.endswith("/")
            and (whole_repository or key.split("/", 1)[0] in scope)
        ]
        removed_configs = {key for key in stale if key.count("/") == 1 and key.endswith("/" + CONFIG_NAME)}
        deletions = tuple(sorted(stale, key=lambda k: (k not in removed_configs, k)))
    return Plan(location, tuple(model_plans), deletions)


# --- the local repository (reads files) ---


def scan_configs(repository: Path) -> dict[str, str | None]:
    """Every model folder of `repository` -> its config.pbtxt text, None where it has none.

    Hidden folders (.ipynb_checkpoints, ...) are not model folders and are not published.

    Raises:
        PublishError: `repository` is not a folder.
    """
    if not repository.is_dir():
        raise PublishError(f"model repository {repository} is not a folder (build it: `kiln build`)")
    configs: dict[str, str | None] = {}
    for folder in sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config = folder / CONFIG_NAME
        configs[folder.name] = config.read_text() if config.is_file() else None
    return configs


def is_published_file(relative: Path) -> bool:
    """Whether a file of a model folder belongs in the bucket: not a __pycache__ or a leftover
    temporary file of kiln's atomic writer (`.<name>.<random>.tmp`). Kept: KEEP_FILE, which is
    what makes an otherwise empty version folder exist in a bucket (buckets have no folders)."""
    name = relative.name
    if any(part in SKIPPED_DIRS for part in relative.parts):
        return False
    return name == KEEP_FILE or not (name.startswith(".") and name.endswith(".tmp"))


def scan_model(repository: Path, name: str) -> LocalModel:
    """The files of model folder `name`, hashed.

    Raises:
        PublishError: a version folder holds no file to publish: a bucket has no empty folders,
            so Triton would not see that version (kiln generate writes 1/.gitkeep for this).
    """
    folder = repository / name
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(repository)
        if is_published_file(relative.relative_to(name)):
            files.append(LocalFile(relative.as_posix(), path.stat().st_size, sha256_file(path)))
    for version in sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.isdigit()):
        if not any(f.relative.startswith(f"{name}/{version}/") for f in files):
            raise PublishError(
                f"version folder {name}/{version} is empty: a bucket has no empty folders, so "
                f"Triton would not see version {version}; put a file in it (e.g. {KEEP_FILE})"
            )
    return LocalModel(name, tuple(files))


# --- the bucket (boto3) ---


class S3Store:
    """The bucket of a `RemoteLocation` through boto3, errors translated into
    `RemoteStorageError` naming the bucket and the endpoint.

    Args:
        location: Where.
        client: A boto3 S3 client; default one for `location.endpoint` (path-style addressing
            there, which S3-compatible servers need) with boto3's usual credential chain.
    """

    def __init__(self, location: RemoteLocation, client: Any | None = None) -> None:
        self.location = location
        self.client = client if client is not None else make_client(location.endpoint)

    @property
    def where(self) -> str:
        return f"bucket {self.location.bucket!r} at {self.location.endpoint or 'AWS S3'}"

    def check(self) -> None:
        """HEAD the bucket: fails early with what is wrong (no bucket, access, endpoint)."""
        self._call("use", self.client.head_bucket, Bucket=self.location.bucket)

    def list(self) -> dict[str, RemoteObject]:
        """Objects under the prefix by relative key (sizes; hashes not read)."""
        found: dict[str, RemoteObject] = {}
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(Bucket=self.location.bucket, Prefix=self.location.list_prefix)
        for page in self._call("list", lambda: list(pages)):
            for entry in page.get("Contents", ()):
                relative = self.location.relative(entry["Key"])
                if relative:
                    found[relative] = RemoteObject(relative, int(entry["Size"]))
        return found

    def stored_hash(self, relative: str) -> str | None:
        """The sha256 kiln stored with the object (None if it has none)."""
        head = self._call("read", self.client.head_object, Bucket=self.location.bucket,
                          Key=self.location.key(relative))
        return head.get("Metadata", {}).get(HASH_METADATA)

    def upload(self, repository: Path, file: LocalFile) -> None:
        self._call(
            "upload to", self.client.upload_file, str(repository / file.relative),
            self.location.bucket, self.location.key(file.relative),
            ExtraArgs={"Metadata": {HASH_METADATA: file.sha256}},
        )

    def delete(self, relative: str) -> None:
        self._call("delete from", self.client.delete_object, Bucket=self.location.bucket,
                   Key=self.location.key(relative))

    def _call(self, what: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except Exception as error:  # botocore's and boto3's own exception types, translated
            raise RemoteStorageError(describe_storage_error(error, what, self.where)) from error


def make_client(endpoint: str | None) -> Any:
    """A boto3 S3 client: bounded retries and timeouts (a wrong endpoint fails in seconds)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=60,
        s3={"addressing_style": "path"} if endpoint else None,
    )
    # A session of its own: boto3's default session keeps the credentials it first resolved, so a
    # process that publishes twice would not see changed AWS_* variables.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def describe_storage_error(error: BaseException, what: str, where: str) -> str:
    """One sentence for a boto3 failure: what was tried, on which bucket and endpoint, why,
    and what to check."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    if isinstance(error, S3UploadFailedError) and isinstance(error.__context__, ClientError):
        error = error.__context__
    if isinstance(error, EndpointConnectionError):
        return f"cannot {what} {where}: the endpoint does not answer ({error}); check --endpoint-url"
    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return (
            f"cannot {what} {where}: no AWS credentials ({error}); set "
            f"{', '.join(CREDENTIAL_ENV)} or AWS_PROFILE"
        )
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = error.response.get("Error", {}).get("Message") or ""
        if code in ("404", "NoSuchBucket"):
            return f"cannot {what} {where}: the bucket does not exist (create it first)"
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
                    "ExpiredToken"):
            return (
                f"cannot {what} {where}: access denied ({code}{': ' + message if message else ''}); "
                f"check the credentials ({', '.join(CREDENTIAL_ENV[:2])} or AWS_PROFILE) and the "
                "bucket's policy"
            )
        return f"cannot {what} {where}: {code or type(error).__name__}: {message or error}"
    return f"cannot {what} {where}: {type(error).__name__}: {error}"


# --- the command ---


@dataclass(frozen=True)
class Outcome:
    """What `publish` did (or, with dry_run, would do).

    Attributes:
        plan: The plan it ran.
        dry_run: Whether nothing was written.
        seconds: Wall time.
        readers: Published models that read other models' folders at load, fetched from the
            bucket when served from it (`reads_other_folders`).
    """

    plan: Plan
    dry_run: bool
    seconds: float
    readers: tuple[str, ...] = ()


def human_bytes(count: int) -> str:
    """1234567 -> '1.2 MB' (decimal units, as S3 consoles show)."""
    size = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")  # pragma: no cover


def publish(
    repository: Path,
    location: RemoteLocation,
    *,
    models: Sequence[str] | None = None,
    delete: bool = False,
    dry_run: bool = False,
    store: S3Store | None = None,
    out: TextIO | None = None,
) -> Outcome:
    """Uploads the repository (or `models` and what they need) to `location`.

    Reads and checks everything first (configs, the bucket, the objects there), then uploads
    per model in `plan` order and deletes stale objects last, one line per model on `out`.

    Raises:
        PublishError: bad input (nothing written).
        RemoteStorageError: the store refused or could not be reached (objects uploaded before
            stay; running again uploads only what is missing).
    """
    started = time.monotonic()
    configs = scan_configs(repository)
    names = select_models(configs, models)
    local = [scan_model(repository, name) for name in names]
    store = store if store is not None else S3Store(location)
    store.check()
    remote = store.list()
    for model in local:
        for file in model.files:
            current = remote.get(file.relative)
            if current is not None and needs_hash(file, current):
                remote[file.relative] = dataclasses.replace(current, sha256=store.stored_hash(file.relative))
    decided = plan(location, local, remote, delete=delete, whole_repository=not models)
    verb = "to upload" if dry_run else "uploaded"
    for model_plan in decided.models:
        if not dry_run:
            for file, _ in model_plan.uploads:
                store.upload(repository, file)
        _say(out, f"  {model_plan.model}: {len(model_plan.uploads)} files {verb} "
                  f"({human_bytes(model_plan.upload_bytes)}), {len(model_plan.unchanged)} unchanged")
    for relative in decided.deletions:
        if not dry_run:
            store.delete(relative)
        _say(out, f"  {'would delete' if dry_run else 'deleted'} "
                  f"{location.scheme}://{location.bucket}/{location.key(relative)}")
    available = sorted(configs)
    readers = tuple(n for n in names if reads_other_folders(n, configs[n] or "", available))
    return Outcome(decided, dry_run, time.monotonic() - started, readers)


def _say(out: TextIO | None, line: str) -> None:
    if out is not None:
        print(line, file=out, flush=True)


__all__ = [
    "CHANGED", "HASH_METADATA", "NEW", "REMOTE_SCHEMES", "UNCHANGED", "LocalFile", "LocalModel",
    "ModelPlan", "Outcome", "Plan", "PublishError", "RemoteLocation", "RemoteObject",
    "RemoteStorageError", "S3Store", "environment_endpoint", "file_action",
    "model_dependencies", "needs_hash", "parse_location", "plan", "publish", "reads_other_folders",
    "scan_configs", "scan_model", "select_models", "upload_order",
]
