"""The publish stage: atomic writes, the source hash, the manifest, the up-to-date check."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from kiln.build import publish
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import DynamicBatching

TOOLS = {"python": "3.11.7", "torch": "2.13.0", "onnx": "1.22.0"}


@pytest.fixture
def code(tmp_path: Path) -> dict[str, Path]:
    source = tmp_path / "code" / "source.py"
    source.parent.mkdir()
    source.write_text("def train(): ...\n")
    return {"source:source.py": source}


def test_atomic_write_replaces_whole_file_and_cleans_up_on_error(tmp_path: Path) -> None:
    dest = tmp_path / "d" / "model.onnx"
    publish.write_bytes_atomic(dest, b"first")
    assert dest.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="boom"):
        with publish.atomic_path(dest) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("boom")
    assert dest.read_bytes() == b"first"
    assert [p.name for p in dest.parent.iterdir()] == ["model.onnx"]


def test_written_files_are_readable_by_a_server_of_another_user(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = publish.write_bytes_atomic(tmp_path / "model.onnx", b"x")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_sha256_file_is_the_sha256_of_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * publish.HASH_CHUNK + 7)
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert publish.sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_tool_versions_record_python_and_the_named_distributions() -> None:
    versions = publish.tool_versions(("scikit-learn", "no-such-distribution-kiln"))
    assert set(versions) == {"python", *publish.BASE_TOOLS, "scikit-learn", "no-such-distribution-kiln"}
    assert versions["no-such-distribution-kiln"] == "not installed"
    assert versions["torch"].startswith("2.")


def test_source_hash_changes_with_what_shapes_the_artifact(code: dict[str, Path]) -> None:
    base = publish.source_hash(publish.hash_inputs(DIGITS, code, TOOLS))
    assert publish.source_hash(publish.hash_inputs(DIGITS, code, TOOLS)) == base

    source = replace(DIGITS.build.source, epochs=DIGITS.build.source.epochs + 1)
    more_epochs = replace(DIGITS, build=replace(DIGITS.build, source=source))
    assert publish.source_hash(publish.hash_inputs(more_epochs, code, TOOLS)) != base

    other_opset = replace(DIGITS, build=replace(DIGITS.build, opset=18))
    assert publish.source_hash(publish.hash_inputs(other_opset, code, TOOLS)) != base

    other_torch = {**TOOLS, "torch": "2.14.0"}
    assert publish.source_hash(publish.hash_inputs(DIGITS, code, other_torch)) != base

    other_exporter = publish.hash_inputs(DIGITS, code, TOOLS, settings={"exporter": "dynamo"})
    assert publish.source_hash(other_exporter) != base

    path = code["source:source.py"]
    path.write_text(path.read_text() + "# changed\n")
    assert publish.source_hash(publish.hash_inputs(DIGITS, code, TOOLS)) != base


def test_serving_only_settings_do_not_change_the_source_hash(code: dict[str, Path]) -> None:
    base = publish.source_hash(publish.hash_inputs(DIGITS, code, TOOLS))
    tuned = replace(
        DIGITS,
        dynamic_batching=DynamicBatching(preferred_batch_sizes=(8,), max_queue_delay_us=100),
        description="other words",
        inputs=tuple(replace(t, allow_ragged_batch=True) for t in DIGITS.inputs),
    )
    assert publish.source_hash(publish.hash_inputs(tuned, code, TOOLS)) == base
    # ...and a model built before `allow_ragged_batch` existed hashes as it did then
    assert "allow_ragged_batch" not in json.dumps(publish.hash_inputs(tuned, code, TOOLS))


def test_publish_artifact_copies_into_the_version_folder(tmp_path: Path) -> None:
    artifact = tmp_path / "art" / "fp32.onnx"
    artifact.parent.mkdir()
    artifact.write_bytes(b"onnx bytes")
    repository = tmp_path / "repo"
    published = publish.publish_artifact("digits", artifact, repository=repository)
    assert published.path == repository / "digits" / str(publish.VERSION) / "model.onnx"
    assert published.path.read_bytes() == b"onnx bytes"
    assert published.relative == f"digits/{publish.VERSION}/model.onnx"
    assert published.sha256 == hashlib.sha256(b"onnx bytes").hexdigest()
    assert published.size_bytes == len(b"onnx bytes")


def _published_build(tmp_path: Path, code: dict[str, Path]) -> tuple[str, Path, Path]:
    artifacts, repository = tmp_path / "art", tmp_path / "repo"
    artifact = artifacts / "digits" / "fp32.onnx"
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"onnx bytes")
    published = publish.publish_artifact("digits", artifact, repository=repository)
    inputs = publish.hash_inputs(DIGITS, code, TOOLS)
    document = publish.manifest_document(
        DIGITS,
        inputs=inputs,
        variants={"fp32": {"published": published.relative, "sha256": published.sha256}},
        timings_s={"train": 1.23456},
        now=lambda: datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
    )
    publish.write_manifest("digits", document, artifacts=artifacts, repository=repository)
    return publish.source_hash(inputs), artifacts, repository


def test_manifest_is_written_twice_with_hash_date_tools_and_timings(
    tmp_path: Path, code: dict[str, Path]
) -> None:
    expected_hash, artifacts, repository = _published_build(tmp_path, code)
    main = json.loads((artifacts / "digits" / "manifest.json").read_text())
    beside = json.loads(
        (repository / "digits" / str(publish.VERSION) / "manifest.json").read_text()
    )
    assert main == beside
    assert main["source_hash"] == expected_hash
    assert main["built_at"] == "2026-01-02T03:04:05+00:00"
    assert main["tools"] == TOOLS
    assert main["timings_s"] == {"train": 1.235}
    assert main["variants"]["fp32"]["published"] == "digits/1/model.onnx"


def test_freshness_up_to_date_only_with_same_hash_and_untouched_artifact(
    tmp_path: Path, code: dict[str, Path]
) -> None:
    expected_hash, artifacts, repository = _published_build(tmp_path, code)
    kwargs = {"artifacts": artifacts, "repository": repository}

    fresh = publish.freshness("digits", expected_hash, **kwargs)
    assert (fresh.up_to_date, fresh.reason) == (True, "up to date")

    stale = publish.freshness("digits", "0" * 64, **kwargs)
    assert (stale.up_to_date, stale.reason) == (False, "spec, code or tool versions changed")

    published = repository / "digits" / "1" / "model.onnx"
    published.write_bytes(b"edited by hand")
    changed = publish.freshness("digits", expected_hash, **kwargs)
    assert not changed.up_to_date
    assert changed.reason == f"published fp32 artifact {published} changed since the build"

    published.unlink()
    missing = publish.freshness("digits", expected_hash, **kwargs)
    assert missing.reason == f"published fp32 artifact {published} is missing"

    (artifacts / "digits" / "manifest.json").write_text("{not json")
    assert publish.freshness("digits", expected_hash, **kwargs).reason == "no build manifest"


def _variant_build(tmp_path: Path, code: dict[str, Path]) -> tuple[str, Path, Path]:
    """A manifest with a served fp32 (plus an extra file) and an int8 kept in artifacts only."""
    artifacts, repository = tmp_path / "art", tmp_path / "repo"
    for precision in ("fp32", "int8"):
        path = artifacts / "digits" / f"{precision}.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"{precision} bytes".encode())
    labels = artifacts / "digits" / "labels.txt"
    labels.write_text("0\n1\n")
    copy = publish.publish_artifact("digits", artifacts / "digits" / "fp32.onnx", repository=repository)
    files = publish.publish_files("digits", {"labels.txt": labels}, repository=repository)
    inputs = publish.hash_inputs(DIGITS, code, TOOLS)
    variants = {
        "fp32": {
            "precision": "fp32",
            "artifact": "digits/fp32.onnx",
            "sha256": copy.sha256,
            "published": copy.relative,
            "files": {"labels.txt": {"published": files["labels.txt"].relative, "sha256": files["labels.txt"].sha256}},
        },
        "int8": {
            "precision": "int8",
            "artifact": "digits/int8.onnx",
            "sha256": publish.sha256_file(artifacts / "digits" / "int8.onnx"),
        },
    }
    document = publish.manifest_document(DIGITS, inputs=inputs, variants=variants, timings_s={})
    publish.write_manifest("digits", document, artifacts=artifacts, repository=repository)
    return publish.source_hash(inputs), artifacts, repository


def test_freshness_covers_every_variant_artifact_and_extra_file(
    tmp_path: Path, code: dict[str, Path]
) -> None:
    expected_hash, artifacts, repository = _variant_build(tmp_path, code)
    kwargs = {"artifacts": artifacts, "repository": repository}
    assert publish.freshness("digits", expected_hash, **kwargs).up_to_date

    int8 = artifacts / "digits" / "int8.onnx"
    int8.write_bytes(b"other")
    assert publish.freshness("digits", expected_hash, **kwargs).reason == (
        f"int8 artifact {int8} changed since the build"
    )
    int8.write_bytes(b"int8 bytes")
    labels = repository / "digits" / "1" / "labels.txt"
    labels.write_text("9\n")
    assert publish.freshness("digits", expected_hash, **kwargs).reason == (
        f"published fp32 file 'labels.txt' {labels} changed since the build"
    )
    labels.unlink()
    assert publish.freshness("digits", expected_hash, **kwargs).reason == (
        f"published fp32 file 'labels.txt' {labels} is missing"
    )


def test_publish_files_copies_beside_the_model_and_refuses_bad_names(tmp_path: Path) -> None:
    source = tmp_path / "tokenizer.json"
    source.write_text("{}")
    published = publish.publish_files("text_int8", {"tokenizer.json": source}, repository=tmp_path / "repo")
    entry = published["tokenizer.json"]
    assert entry.path == tmp_path / "repo" / "text_int8" / "1" / "tokenizer.json"
    assert entry.path.read_text() == "{}" and entry.relative == "text_int8/1/tokenizer.json"
    assert entry.sha256 == hashlib.sha256(b"{}").hexdigest() and entry.size_bytes == 2
    for bad, rule in (
        ("../x", "must be one plain file name (no folders)"),
        ("a/b.txt", "must be one plain file name (no folders)"),
        ("", "must be one plain file name (no folders)"),
        ("model.onnx", "is reserved (kiln writes model.onnx, manifest.json into the version folder)"),
        ("manifest.json", "is reserved"),
    ):
        with pytest.raises(ValueError) as info:
            publish.publish_files("text", {bad: source}, repository=tmp_path / "repo")
        assert str(info.value).startswith(f"model 'text': extra file name {bad!r} ")
        assert rule in str(info.value)
    assert not (tmp_path / "repo" / "text").exists()


def test_write_manifest_puts_a_copy_beside_each_served_variant(tmp_path: Path) -> None:
    document = {"model": "digits", "variants": {}}
    main = publish.write_manifest(
        "digits", document, artifacts=tmp_path / "art", repository=tmp_path / "repo",
        served=["digits", "digits_int8"],
    )
    assert main == tmp_path / "art" / "digits" / "manifest.json"
    for served in ("digits", "digits_int8"):
        assert json.loads((tmp_path / "repo" / served / "1" / "manifest.json").read_text()) == document
    assert not (tmp_path / "repo" / "digits_fp16").exists()


def test_remove_published_removes_only_the_named_files_and_empty_version_folders(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    version = repository / "digits_fp16" / "1"
    version.mkdir(parents=True)
    for name in ("model.onnx", "manifest.json"):
        (version / name).write_text(name)
    (repository / "digits_fp16" / "config.pbtxt").write_text("config")
    kept = repository / "digits" / "1" / "model.onnx"
    kept.parent.mkdir(parents=True)
    kept.write_text("kept")
    removed = publish.remove_published(
        ["digits_fp16/1/model.onnx", "digits_fp16/1/manifest.json", "digits_fp16/1/gone.txt"],
        repository=repository,
    )
    assert removed == [version / "model.onnx", version / "manifest.json"]
    assert not version.exists()
    assert (repository / "digits_fp16" / "config.pbtxt").read_text() == "config"
    assert kept.read_text() == "kept"
