"""Other models' folders for a model Triton loaded from a repository in object storage.

Some kiln models read another model's folder when they load: `kiln_tabular`, `kiln_threshold`,
`kiln_text` and `kiln_generate` read files the build published beside another model
(`LoadContext.artifact`, `find_artifact`), and a fused pipeline reads each step's config.pbtxt
and version folder (`kiln.serving.fused`). From a local repository those are sibling folders.
From a bucket they are not, and this module fetches them from the same bucket instead.

What Triton 2.51 does with a repository URL (measured with moto's S3 server; see
tests/integration/test_s3_repository.py): at each load it downloads that one model's folder
into a fresh `mkdtemp` folder, `$TRITON_AWS_MOUNT_DIRECTORY/folderXXXXXX` (`/tmp/folderXXXXXX`
without that variable), hands the stub that folder as `args["model_repository"]`, and deletes it
when the model unloads, fails to load or the server stops. The folder's name is not the model's,
no other model is ever downloaded beside it (one loaded earlier sits in its own `folderXXXXXX`),
and the load order changes nothing, so neither the mount directory's layout nor an order of
loads can give a model its siblings. What a stub can rely on: its parent process is
tritonserver, and it inherits tritonserver's environment (the AWS_* credentials Triton itself
downloads with).

So: a model knows it was loaded from a copy when its folder is not named after it (`is_copy`;
a local repository's folders always are, so nothing here runs for one). The repository's URL is
`KILN_REPOSITORY_URL` (which `kiln.server.TritonServer` sets for a URL repository), else the one
object-storage `--model-repository` on the parent tritonserver's command line (so a tritonserver
started without kiln works too). The sibling's folder (every object under `<prefix>/<model>/`,
as Triton would download it) is fetched once per stub process into `.kiln-siblings/<model>`
inside the asking model's own copy (`fetch_models`), which Triton removes with that copy. Every
load fetches afresh (a reload is a new stub process), so a model never reads an older sibling
than the bucket holds when it loads.

Stores: s3:// (every URL form Triton takes, read by `kiln.publish_remote.parse_location`), with
boto3 and the credentials in the stub's environment. Where the stub's interpreter cannot import
boto3, the environment's own Python fetches (`_download_in_subprocess`: on this project's
machines the stub cannot `import ssl`). gs:// and as:// are recognized but not fetched yet: each
needs a `_Store` here over its own client (google-cloud-storage with
GOOGLE_APPLICATION_CREDENTIALS; azure-storage-blob with AZURE_STORAGE_ACCOUNT /
AZURE_STORAGE_KEY, the variables Triton reads); until then such a model fails its load with a
message saying so, and the models that read no other folder serve from them as from s3://.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from kiln.serving.errors import ModelLoadError

REPOSITORY_URL_ENV = "KILN_REPOSITORY_URL"
"""The URL of the repository Triton serves, for the stubs (set by `kiln.server.TritonServer`)."""
REMOTE_SCHEMES = ("s3://", "gs://", "as://")
"""Object stores tritonserver 2.51 reads a repository from: kiln.server.process's
REMOTE_REPOSITORY_SCHEMES (not imported: kiln.server imports this module)."""
REPOSITORY_FLAGS = ("--model-repository", "--model-store")
"""tritonserver's flags naming a repository (--model-store is the older spelling)."""
TRITONSERVER = "tritonserver"
CACHE_NAME = ".kiln-siblings"
"""The folder, inside the asking model's own copy, holding the models its stub fetched."""
CACHE_PREFIX = "kiln-siblings-"
"""A temporary folder of fetched models where the asking model's copy is not known."""


class RemoteFetchError(ModelLoadError):
    """Another model's folder could not be fetched from the repository in object storage; the
    message names the model asking, the URL and the object or prefix."""


def is_copy(model_dir: Path, model_name: str) -> bool:
    """Whether Triton loaded the model from a copy of a remote repository: its folder is
    Triton's temporary `folderXXXXXX`, not `<repository>/<model name>`."""
    return Path(model_dir).name != model_name


def remote_urls(command: Sequence[str]) -> list[str]:
    """The object-storage URLs among the repositories a tritonserver command line names."""
    found: list[str] = []
    for index, arg in enumerate(command):
        for flag in REPOSITORY_FLAGS:
            if arg.startswith(flag + "="):
                found.append(arg[len(flag) + 1:])
            elif arg == flag and index + 1 < len(command):
                found.append(command[index + 1])
    return [url for url in found if url.startswith(REMOTE_SCHEMES)]


def parent_command(pid: int | None = None) -> list[str]:
    """The parent process's command line (Linux /proc); [] when it cannot be read."""
    pid = os.getppid() if pid is None else pid
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def repository_url(
    environ: Mapping[str, str] | None = None, command: Sequence[str] | None = None
) -> str | None:
    """The URL of the remote repository this stub's model came from, or None when unknown.

    `KILN_REPOSITORY_URL` first; else the one object-storage `--model-repository` of the parent
    process when that is tritonserver (several are ambiguous: None, and the error says to set
    the variable).

    Args:
        environ: The environment; default os.environ.
        command: The parent's command line; default read from /proc.
    """
    environ = os.environ if environ is None else environ
    url = environ.get(REPOSITORY_URL_ENV, "").strip()
    if url:
        return url
    command = parent_command() if command is None else list(command)
    if not command or Path(command[0]).name != TRITONSERVER:
        return None
    urls = remote_urls(command)
    return urls[0] if len(urls) == 1 else None


class _Store(Protocol):
    """One object store, read-only: what `download_model` needs of it."""

    def key(self, relative: str) -> str:
        """The object key of a repository-relative path ("fraud/config.pbtxt")."""
        ...

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(key, size) of every object under `prefix` (which ends with '/')."""
        ...

    def download(self, key: str, path: Path) -> None:
        """The object's bytes into the file `path`."""
        ...

    def describe(self, error: BaseException, what: str) -> str:
        """One sentence for a failure of the store's client: what was tried, where, why."""
        ...


class _S3Store:
    """An S3 bucket through boto3 (the client kiln publish uses: path-style addressing for an
    S3-compatible endpoint, bounded retries), errors in `describe_storage_error`'s words."""

    def __init__(self, url: str) -> None:
        from kiln.publish_remote import make_client, parse_location

        self.location = parse_location(url)
        self.where = f"bucket {self.location.bucket!r} at {self.location.endpoint or 'AWS S3'}"
        self.client = make_client(self.location.endpoint)

    def key(self, relative: str) -> str:
        return self.location.key(relative)

    def list(self, prefix: str) -> list[tuple[str, int]]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.location.bucket, Prefix=prefix
        )
        return [(entry["Key"], int(entry["Size"])) for page in pages for entry in page.get("Contents", ())]

    def download(self, key: str, path: Path) -> None:
        self.client.download_file(self.location.bucket, key, str(path))

    def describe(self, error: BaseException, what: str) -> str:
        from kiln.publish_remote import describe_storage_error

        return describe_storage_error(error, what, self.where)


STORE_NEEDS = {
    "gs": "google-cloud-storage (credentials: GOOGLE_APPLICATION_CREDENTIALS, as Triton's)",
    "as": "azure-storage-blob (credentials: AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY, as Triton's)",
}
"""What fetching from the stores kiln does not fetch from yet would need."""


class ClientUnavailableError(RemoteFetchError):
    """The store's client library cannot be imported by this interpreter."""


def _open_store(url: str, for_model: str) -> _Store:
    scheme = url.partition("://")[0]
    if scheme != "s3":
        raise RemoteFetchError(
            f"model '{for_model}' was loaded from {url} and reads other models' folders, which kiln "
            f"fetches only from s3:// so far ({scheme}:// needs a store in kiln/serving/remote.py "
            f"over {STORE_NEEDS.get(scheme, 'its client library')}); serve it from a local copy"
        )
    try:
        return _S3Store(url)
    except ImportError as error:  # not installed, or (ssl) not loadable by this interpreter
        raise ClientUnavailableError(
            f"model '{for_model}' was loaded from {url} and reads other models' folders, which "
            f"kiln fetches with boto3, which {sys.executable or 'Python'} cannot import ({error}): "
            "pip install boto3"
        ) from error
    except Exception as error:  # kiln.publish_remote.PublishError: a URL Triton took, kiln cannot
        raise RemoteFetchError(
            f"model '{for_model}': cannot read the repository URL {url}: {error}"
        ) from None


def download_model(url: str, model: str, into: Path, *, for_model: str) -> int:
    """Downloads every object under `<prefix>/<model>/` of the repository at `url` into the
    (empty) folder `into`, keeping the key's path below the prefix; returns how many.

    Raises:
        ClientUnavailableError: this interpreter cannot import the store's client (boto3).
        RemoteFetchError: the store cannot be used, the model has no object there, or an
            object cannot be read (the message names the URL and the object).
    """
    store = _open_store(url, for_model)
    prefix = store.key(model) + "/"
    source = f"{url.rstrip('/')}/{model}/"
    try:
        objects = store.list(prefix)
    except Exception as error:
        raise RemoteFetchError(
            f"model '{for_model}' needs model '{model}' from {url}: {store.describe(error, 'list')}"
        ) from error
    if not objects:
        raise RemoteFetchError(
            f"model '{for_model}' needs model '{model}', which is not in the repository {url} "
            f"(no object under {source}): publish it (`kiln publish --to URL --model {for_model}` "
            "publishes every model it needs)"
        )
    count = 0
    for key, _size in objects:
        relative = PurePosixPath(key[len(prefix):])
        if key.endswith("/") or not relative.parts:
            continue  # a "folder" marker some tools write
        if any(part in ("", ".", "..") for part in relative.parts):
            raise RemoteFetchError(f"model '{for_model}': object {key!r} under {source} is not a file path")
        target = Path(into).joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            store.download(key, target)
        except Exception as error:
            raise RemoteFetchError(
                f"model '{for_model}' needs {source}{relative}: {store.describe(error, 'read')}"
            ) from error
        count += 1
    if not count:
        raise RemoteFetchError(
            f"model '{for_model}' needs model '{model}', which is not in the repository {url} "
            f"(only folder markers under {source}): publish it"
        )
    return count


def _download_in_subprocess(
    url: str, models: Sequence[str], into: Path, *, for_model: str, why: str
) -> None:
    """`download_model` of each model into `into/<model>`, run by this environment's own Python
    (`sys.executable`: the Python first on PATH, which Triton started the stub with), in one
    process for all of them.

    Why: the stub embeds the libpython it was built against, which need not be the build of the
    Python whose standard library it loads. On this project's machines it embeds Debian's 3.11.2
    while the virtual environment's library is pyenv's 3.11.7, whose `_ssl` module needs a symbol
    3.11.2 lacks (`_PyModule_Add`): `import ssl`, and so boto3 (urllib3), fails inside a stub and
    works in that Python itself.
    """
    if not sys.executable:
        raise RemoteFetchError(why)
    command = [sys.executable, "-m", __name__, url, str(into), for_model, *models]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False)
    if done.returncode == 0:
        return
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if done.returncode == FETCH_FAILED and lines:
        raise RemoteFetchError(lines[-1])
    raise RemoteFetchError(
        f"model '{for_model}' needs {', '.join(models)} from {url}: `{' '.join(command[:3])}` exited "
        f"{done.returncode}: {' | '.join(lines[-3:]) or 'no output'} (in the stub itself: {why})"
    )


FETCH_FAILED = 3
"""The exit status of `python -m kiln.serving.remote` when the fetch failed (message on stderr)."""
_fetched: dict[str, dict[str, Path]] = {}
_cache: list[Path] = []


def _cache_root(home: Path | None) -> Path:
    """This process's folder for fetched models (the first call decides it).

    Inside the asking model's own copy (`home/.kiln-siblings`) when it is known: Triton removes
    that copy, and so what was fetched, when the model unloads, fails to load or the server stops.
    (An atexit hook is not enough: measured here, of 9 stubs that had fetched, 8 left their
    folders behind at the server's stop.) Elsewhere (in-process use), a temporary folder
    removed at exit.
    """
    if not _cache:
        if home is not None and Path(home).is_dir():
            root = Path(home) / CACHE_NAME
            root.mkdir(exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix=CACHE_PREFIX))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
        _cache.append(root)
    return _cache[0]


def own_copy(repository: Path, command: Sequence[str] | None = None) -> Path | None:
    """The folder Triton copied this stub's model into, when it lies in `repository`: the stub's
    second argument is `<copy>/<version>/model.py` (kiln.server.stubs reads it the same way)."""
    if command is None:
        try:
            raw = Path("/proc/self/cmdline").read_bytes()
        except OSError:
            return None
        command = [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]
    if len(command) < 2 or not command[1].endswith(".py"):
        return None
    copy = Path(command[1]).parent.parent
    return copy if copy.parent == Path(repository) and copy.is_dir() else None


def fetch_models(
    url: str, models: Sequence[str], *, for_model: str, home: Path | None = None
) -> dict[str, Path]:
    """The folders of `models` in the repository at `url`, fetched (every object under
    `<prefix>/<model>/`, as Triton downloads a model) into this process's cache; each fetched
    once per process (a stub serves one model instance, and a reload is a new process, so it is
    never stale for the model asking). Each is `<cache>/<model>`: a repository-shaped folder, so
    a fused pipeline's step finds its own siblings the same way. Where this interpreter cannot
    import boto3, the environment's own Python fetches them, in one process
    (`_download_in_subprocess`).

    Args:
        url: The repository URL (Triton's --model-repository).
        models: The models whose folders are needed (one path segment each, checked by the
            callers).
        for_model: The model asking (named in the messages).
        home: The asking model's own copy (Triton's `folderXXXXXX`), where the fetched folders
            go (see `_cache_root`).

    Raises:
        RemoteFetchError: the store cannot be used, a model has no object there, or an object
            cannot be read (the message names the URL and the object).
    """
    wanted = list(dict.fromkeys(models))
    missing = [m for m in wanted if not (m in _fetched.get(url, {}) and _fetched[url][m].is_dir())]
    if missing:
        root = _cache_root(home)
        partial = Path(tempfile.mkdtemp(prefix=".fetching-", dir=root))
        try:
            try:
                for model in missing:
                    download_model(url, model, partial / model, for_model=for_model)
            except ClientUnavailableError as error:
                _download_in_subprocess(url, missing, partial, for_model=for_model, why=str(error))
            for model in missing:
                folder = root / model
                shutil.rmtree(folder, ignore_errors=True)
                (partial / model).rename(folder)
                _fetched.setdefault(url, {})[model] = folder
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return {model: _fetched[url][model] for model in wanted}


def fetch_model(url: str, model: str, *, for_model: str, home: Path | None = None) -> Path:
    """One model's folder (see `fetch_models`)."""
    return fetch_models(url, [model], for_model=for_model, home=home)[model]


@dataclass(frozen=True)
class RemoteRepository:
    """The repository in object storage a model was loaded from, for its siblings' folders.

    Attributes:
        url: Triton's --model-repository URL.
        home: The model's own copy (Triton's `folderXXXXXX`); fetched folders go inside it.
    """

    url: str
    home: Path | None = None

    def model_folder(self, model: str, *, for_model: str) -> Path:
        """`model`'s folder, fetched (see `fetch_models`)."""
        return fetch_model(self.url, model, for_model=for_model, home=self.home)

    def prefetch(self, models: Sequence[str], *, for_model: str) -> None:
        """Fetches several models' folders at once (one process where a subprocess fetches)."""
        fetch_models(self.url, models, for_model=for_model, home=self.home)


def remote_repository(model_dir: Path, model_name: str) -> RemoteRepository | None:
    """The remote repository of a model Triton loaded from a copy (`is_copy`) when its URL is
    known (`repository_url`); None for a model of a local repository, or when unknown (reading a
    sibling then fails with `unknown_url_message`)."""
    if not is_copy(model_dir, model_name):
        return None
    url = repository_url()
    return RemoteRepository(url, Path(model_dir)) if url else None


def unknown_url_message(model_dir: Path, for_model: str) -> str:
    """Why a model loaded from a copy cannot find another model's folder."""
    return (
        f"model '{for_model}' was loaded from a copy Triton made in {model_dir} (a repository in "
        "object storage), so other models' folders are not beside it, and kiln knows no repository "
        f"URL to fetch them from: set {REPOSITORY_URL_ENV} to the --model-repository URL in "
        "tritonserver's environment (kiln serve and kiln.server.TritonServer set it)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m kiln.serving.remote URL INTO FOR_MODEL MODEL...`: `download_model` of each
    model into INTO/MODEL, in a process of its own (see `_download_in_subprocess`); a failure's
    message is the last line on stderr (exit status FETCH_FAILED)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4:
        print("usage: python -m kiln.serving.remote URL INTO FOR_MODEL MODEL...", file=sys.stderr)
        return 2
    url, into, for_model, *models = args
    try:
        for model in models:
            download_model(url, model, Path(into) / model, for_model=for_model)
    except RemoteFetchError as error:
        print(str(error).replace("\n", " "), file=sys.stderr)
        return FETCH_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
