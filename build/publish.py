"""Publish stage: artifacts into the model repository, and the build manifest beside them.

Layout (folders come from `kiln.paths`, or the caller in tests):

    <artifacts>/<model>/checkpoint.pt           trained weights (state_dict)
    <artifacts>/<model>/<precision>.onnx        each variant's artifact: fp32.onnx, fp16.onnx, int8.onnx
    <artifacts>/<model>/manifest.json           the build manifest (every variant)
    <repository>/<served>/<version>/model.onnx  a served variant (a copy of its artifact); <served>
                                                is `kiln.spec.served_name(model, precision)`:
                                                `digits`, `digits_fp16`, `digits_int8`
    <repository>/<served>/<version>/<file>      a source's extra files (tokenizer, statistics)
    <repository>/<served>/<version>/manifest.json  a copy of the manifest, to trace a deployment

A variant that is not served stays in the artifacts folder only.

Every file is written atomically (a temporary file in the same folder, then `os.replace`), so the
server never loads a half-written model and an interrupted build leaves the old artifact in place.

A model is up to date when its manifest's source hash equals the one computed now (the build
spec with its variants and budgets, the tensor signature, the code of the stages that shape the
artifacts, the tool versions) and every variant's artifact, every published copy and every
published extra file still has the sha256 the manifest records. Only the standard library is
imported here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from kiln import paths
from kiln.spec import ModelSpec

VERSION = 1
"""The model-repository version folder artifacts are published into."""
CHECKPOINT_NAME = "checkpoint.pt"
MANIFEST_NAME = "manifest.json"
PUBLISHED_NAME = "model.onnx"
"""File name in the version folder; kiln_onnx's `model_filename` parameter defaults to it."""
RESERVED_NAMES = (PUBLISHED_NAME, MANIFEST_NAME)
"""Names in a version folder that an extra file may not take."""
MANIFEST_FORMAT = 2
"""Bumped when the manifest's layout changes: an older manifest then means "rebuild"."""
BASE_TOOLS = ("torch", "onnx", "onnxruntime", "numpy")
"""Distributions whose versions every build records and hashes (sources add their own)."""
HASH_CHUNK = 1 << 20
"""Bytes read at a time when hashing a file."""
FILE_MODE = 0o666
"""Mode of written files before the umask (temporary files start as 0600, unreadable to a
server running as another user)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def model_artifacts(name: str, artifacts: Path | None = None) -> Path:
    """The build's working folder of model `name`."""
    return Path(artifacts if artifacts is not None else paths.artifacts_dir()) / name


def checkpoint_path(name: str, artifacts: Path | None = None) -> Path:
    """Where the trained weights of model `name` are saved."""
    return model_artifacts(name, artifacts) / CHECKPOINT_NAME


def save_state_dict(model: Any, path: Path) -> Path:
    """Saves a PyTorch module's weights (its state_dict) to `path`, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return path


def load_state_dict(
    spec_or_path: ModelSpec | Path | str, artifacts: Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """A model's saved weights: its checkpoint in the artifacts folder for a spec, or that file.

    Raises:
        FileNotFoundError: no checkpoint; run the build first.
    """
    import torch

    if isinstance(spec_or_path, ModelSpec):
        path = checkpoint_path(spec_or_path.name, artifacts)
    else:
        path = Path(spec_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained checkpoint at {path}; run `kiln build` first")
    return path, torch.load(path, map_location="cpu", weights_only=True)


def export_path(name: str, variant: str, artifacts: Path | None = None) -> Path:
    """Where the exported `variant` (e.g. "fp32") of model `name` is written before publishing."""
    return model_artifacts(name, artifacts) / f"{variant}.onnx"


def manifest_path(name: str, artifacts: Path | None = None) -> Path:
    """The build manifest of model `name`."""
    return model_artifacts(name, artifacts) / MANIFEST_NAME


def version_dir(name: str, repository: Path | None = None, version: int = VERSION) -> Path:
    """The version folder of model `name` in the model repository."""
    root = Path(repository if repository is not None else paths.model_repository())
    return root / name / str(version)


def published_path(name: str, repository: Path | None = None, version: int = VERSION) -> Path:
    """The served artifact of model `name`."""
    return version_dir(name, repository, version) / PUBLISHED_NAME


@contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yields a temporary path beside `dest`; on success it replaces `dest` in one rename.

    On an exception the temporary file is removed and `dest` is left as it was.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, FILE_MODE & ~_umask())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(dest: Path, data: bytes) -> Path:
    """Writes `data` to `dest` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return dest


def write_json_atomic(dest: Path, document: Mapping[str, Any]) -> Path:
    """Writes `document` as indented JSON to `dest` atomically."""
    text = json.dumps(document, indent=2, sort_keys=False) + "\n"
    return write_bytes_atomic(dest, text.encode())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def tool_versions(extra: Iterable[str] = ()) -> dict[str, str]:
    """Versions of Python and of the distributions that shape or check an artifact."""
    versions = {"python": platform.python_version()}
    for dist in (*BASE_TOOLS, *extra):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _plain(value: Any) -> Any:
    """A dataclass tree as JSON-able data; each dataclass records its type name."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **fields}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def plain_data(value: Any) -> Any:
    """A dataclass tree as JSON-able data (each dataclass records its type name)."""
    return _plain(value)


SERVING_ONLY_TENSOR_FIELDS = ("allow_ragged_batch",)
"""`TensorSpec` fields that only tell Triton how to batch requests: they never change the artifact,
so they stay out of the source hash (setting one rebuilds nothing, and a model built before the
field existed stays up to date)."""


def _tensors(tensors: Any) -> list[Any]:
    """A model's tensors as hashed: `_plain`, without SERVING_ONLY_TENSOR_FIELDS."""
    return [
        {k: v for k, v in entry.items() if k not in SERVING_ONLY_TENSOR_FIELDS}
        if isinstance(entry, dict) else entry
        for entry in _plain(tensors)
    ]


def hash_inputs(
    spec: ModelSpec,
    code: Mapping[str, Path],
    tools: Mapping[str, str],
    settings: Mapping[str, Any] | None = None,
    data: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Everything the artifact depends on, as JSON-able data (hashed into the source hash).

    Args:
        spec: The model; its `build`, tensors and batching are included (serving-only settings
            such as instance groups, dynamic batching or a tensor's `allow_ragged_batch` are not:
            they never change the artifact).
        code: Source files of the stages that shape the artifact, by a stable label.
        tools: Tool versions, from `tool_versions`.
        settings: Pipeline choices that shape the artifact (e.g. the exporter, the variants).
        data: The user's files the model is made from (a checkpoint, an ONNX file, the held-out
            .npz, the factory's module), by a stable label: their content is hashed, so a file
            overwritten at the same path rebuilds the model.
    """
    return {
        "format": MANIFEST_FORMAT,
        "build": _plain(spec.build),
        "inputs": _tensors(spec.inputs),
        "outputs": _tensors(spec.outputs),
        "batched": spec.max_batch_size > 0,
        "settings": _plain(dict(settings or {})),
        "code": {label: sha256_file(path) for label, path in sorted(code.items())},
        "tools": dict(sorted(tools.items())),
        "data": {label: sha256_file(path) for label, path in sorted((data or {}).items())},
    }


def what_changed(before: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """Which parts of two `hash_inputs` differ, for the build log ("data held_out, code
    source:build.py"); "spec, code or tool versions changed" when the old one is unreadable."""
    if not isinstance(before, Mapping):
        return "spec, code or tool versions changed"
    changed = []
    for part in ("build", "inputs", "outputs", "batched", "settings", "format"):
        if before.get(part) != now.get(part):
            changed.append("spec" if part in ("build", "inputs", "outputs", "batched") else part)
    for part in ("code", "tools", "data"):
        old, new = before.get(part) or {}, now.get(part) or {}
        labels = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if labels:
            changed.append(f"{part} {', '.join(labels)}")
    unique = list(dict.fromkeys(changed))
    return "changed: " + "; ".join(unique) if unique else "spec, code or tool versions changed"


def source_hash(inputs: Mapping[str, Any]) -> str:
    """Hex sha256 of `hash_inputs(...)` in canonical JSON."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Freshness:
    """Whether a model needs building, and why.

    Attributes:
        up_to_date: Nothing to do.
        reason: Why it must be (re)built, or "up to date".
        manifest: The current manifest, when it could be read.
    """

    up_to_date: bool
    reason: str
    manifest: dict[str, Any] | None = None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest at `path`, or None when it is missing or unreadable."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def refused_served_names(specs: Iterable[Any], artifacts: Path | None = None) -> dict[str, str]:
    """The served names of the optional variants each model's last build refused (its manifest's
    `refused`), each with why: those have no model, so no config is written for them and
    `kiln.repository.stale` expects none (`kiln build` removes one left from before).

    Args:
        specs: The repository's specs; those without a build section have no manifest.
        artifacts: The build's working folder; `kiln.paths.artifacts_dir()` when None.
    """
    from kiln.spec import served_name

    refused: dict[str, str] = {}
    for spec in specs:
        if getattr(spec, "build", None) is None:
            continue
        manifest = read_manifest(manifest_path(spec.name, artifacts)) or {}
        for precision, why in dict(manifest.get("refused") or {}).items():
            refused[served_name(spec.name, precision)] = str(why)
    return refused


def _file_state(path: Path, sha256: Any, what: str) -> str | None:
    """Why `path` is not the recorded file, or None when it is."""
    if not path.is_file():
        return f"{what} {path} is missing"
    if sha256_file(path) != sha256:
        return f"{what} {path} changed since the build"
    return None


def recorded_files(
    precision: str, entry: Mapping[str, Any], artifacts_root: Path, repository_root: Path
) -> list[tuple[str, Path, Any]]:
    """The files a manifest's variant entry records: (description, path, sha256) each.

    The variant's artifact in the artifacts folder (`artifact`, relative to it), its published
    copy (`published`, relative to the model repository, absent when not served) and its
    published extra files (`files`: name -> {"published", "sha256"}).
    """
    found = []
    if entry.get("artifact"):
        found.append((f"{precision} artifact", artifacts_root / str(entry["artifact"]), entry.get("sha256")))
    if entry.get("published"):
        published = repository_root / str(entry["published"])
        found.append((f"published {precision} artifact", published, entry.get("sha256")))
    for file_name, file_entry in dict(entry.get("files") or {}).items():
        found.append(
            (
                f"published {precision} file {file_name!r}",
                repository_root / str(file_entry.get("published", "")),
                file_entry.get("sha256"),
            )
        )
    return found


def freshness(
    name: str,
    expected_hash: str,
    *,
    artifacts: Path | None = None,
    repository: Path | None = None,
    expected_inputs: Mapping[str, Any] | None = None,
) -> Freshness:
    """Compares the manifest of model `name` with `expected_hash` and the files it records.

    Returns:
        up_to_date True only when the manifest's source hash equals `expected_hash` and, for every
        variant it lists, the artifact, the published copy (of a served variant) and the
        published extra files exist with the recorded sha256.
    """
    manifest = read_manifest(manifest_path(name, artifacts))
    if manifest is None:
        return Freshness(False, "no build manifest")
    if manifest.get("source_hash") != expected_hash:
        if expected_inputs is None:
            return Freshness(False, "spec, code or tool versions changed", manifest)
        return Freshness(False, what_changed(manifest.get("hash_inputs"), expected_inputs), manifest)
    variants = manifest.get("variants")
    if not isinstance(variants, dict) or not variants:
        return Freshness(False, "the manifest lists no artifact", manifest)
    root = Path(repository if repository is not None else paths.model_repository())
    artifacts_root = Path(artifacts if artifacts is not None else paths.artifacts_dir())
    for precision, entry in variants.items():
        if not isinstance(entry, dict):
            return Freshness(False, f"the manifest's {precision} entry is unreadable", manifest)
        if not entry.get("artifact") and not entry.get("published"):
            return Freshness(False, f"the manifest records no file for {precision}", manifest)
        for what, path, sha256 in recorded_files(precision, entry, artifacts_root, root):
            problem = _file_state(path, sha256, what)
            if problem is not None:
                return Freshness(False, problem, manifest)
    return Freshness(True, "up to date", manifest)


@dataclass(frozen=True)
class Published:
    """Where a published artifact went.

    Attributes:
        path: The served file in the model repository.
        sha256: Its hex sha256.
        size_bytes: Its size.
        relative: Its path relative to the model repository (recorded in the manifest).
    """

    path: Path
    sha256: str
    size_bytes: int
    relative: str


def publish_artifact(
    name: str, artifact: Path, *, repository: Path | None = None, version: int = VERSION
) -> Published:
    """Copies `artifact` into `<repository>/<name>/<version>/model.onnx`, atomically."""
    dest = published_path(name, repository, version)
    write_bytes_atomic(dest, Path(artifact).read_bytes())
    root = Path(repository if repository is not None else paths.model_repository())
    return Published(
        path=dest,
        sha256=sha256_file(dest),
        size_bytes=dest.stat().st_size,
        relative=dest.relative_to(root).as_posix(),
    )


def check_extra_name(model: str, file_name: str) -> None:
    """Refuses an extra file name that is not one plain file name, or that a kiln file uses.

    Raises:
        ValueError: naming the model, the file name and the rule it breaks.
    """
    plain = (
        isinstance(file_name, str)
        and file_name not in ("", ".", "..")
        and Path(file_name).name == file_name
        and "\\" not in file_name
    )
    if not plain:
        raise ValueError(
            f"model '{model}': extra file name {file_name!r} must be one plain file name "
            "(no folders)"
        )
    if file_name in RESERVED_NAMES:
        raise ValueError(
            f"model '{model}': extra file name {file_name!r} is reserved (kiln writes "
            f"{', '.join(RESERVED_NAMES)} into the version folder)"
        )


def publish_files(
    name: str,
    files: Mapping[str, Path],
    *,
    repository: Path | None = None,
    version: int = VERSION,
) -> dict[str, Published]:
    """Copies each extra file into `<repository>/<name>/<version>/<file name>`, atomically.

    Args:
        name: The served model's name.
        files: File name in the version folder -> source file.
        repository: The model repository.
        version: The version folder.

    Raises:
        ValueError: a file name is not allowed (see `check_extra_name`).
        FileNotFoundError: a source file is missing.
    """
    root = Path(repository if repository is not None else paths.model_repository())
    published = {}
    for file_name, source in files.items():
        check_extra_name(name, file_name)
        dest = version_dir(name, repository, version) / file_name
        write_bytes_atomic(dest, Path(source).read_bytes())
        published[file_name] = Published(
            path=dest,
            sha256=sha256_file(dest),
            size_bytes=dest.stat().st_size,
            relative=dest.relative_to(root).as_posix(),
        )
    return published


def remove_published(relatives: Iterable[str], *, repository: Path | None = None) -> list[Path]:
    """Removes files a previous build published (paths relative to the repository), and version
    folders left empty; never a config.pbtxt or anything not named.

    Returns:
        The files removed.
    """
    root = Path(repository if repository is not None else paths.model_repository())
    removed = []
    folders = set()
    for relative in relatives:
        path = root / relative
        if path.is_file():
            path.unlink()
            removed.append(path)
            folders.add(path.parent)
    for folder in sorted(folders, reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed


def manifest_document(
    spec: ModelSpec,
    *,
    inputs: Mapping[str, Any],
    variants: Mapping[str, Mapping[str, Any]],
    timings_s: Mapping[str, float],
    now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
) -> dict[str, Any]:
    """The build manifest of `spec`.

    Args:
        spec: The model built.
        inputs: `hash_inputs(...)` of this build (the source hash is computed from it).
        variants: Per precision ("fp32", "fp16", "int8"): `precision`, `artifact` (path relative
            to the artifacts folder) and `sha256`; `published` (path relative to the model
            repository) for a served variant and `files` for its extra files (see
            `recorded_files`); plus size, metrics, budget, check and latency.
        timings_s: Seconds per stage.
        now: Clock, for tests.
    """
    return {
        "model": spec.name,
        "version": VERSION,
        "source_hash": source_hash(inputs),
        "built_at": now().isoformat(timespec="seconds"),
        "tools": dict(inputs["tools"]),
        "variants": {k: dict(v) for k, v in variants.items()},
        "timings_s": {k: round(v, 3) for k, v in timings_s.items()},
        "hash_inputs": dict(inputs),
    }


def write_manifest(
    name: str,
    document: Mapping[str, Any],
    *,
    artifacts: Path | None = None,
    repository: Path | None = None,
    version: int = VERSION,
    served: Iterable[str] | None = None,
) -> Path:
    """Writes the manifest into the artifacts folder and a copy beside each served artifact.

    Args:
        name: The model's name (its artifacts folder).
        document: The manifest.
        artifacts: The artifacts folder.
        repository: The model repository.
        version: The version folder.
        served: The served names to write a copy for; `[name]` when None.

    Returns:
        The manifest in the artifacts folder (the one `freshness` reads).
    """
    for served_name in [name] if served is None else served:
        write_json_atomic(version_dir(served_name, repository, version) / MANIFEST_NAME, document)
    return write_json_atomic(manifest_path(name, artifacts), document)
