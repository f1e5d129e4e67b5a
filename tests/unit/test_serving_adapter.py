"""The processing-step adapter's Triton-free parts: artifact lookup, spec files, failure labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln.serving.adapter import LoadContext, failure_reason
from kiln.serving.batch import RequestError


def context(repository: Path) -> LoadContext:
    model_dir = repository / "text_tokenize"
    (model_dir / "1").mkdir(parents=True)
    return LoadContext("text_tokenize", model_dir, model_dir / "1", {}, {})


def test_artifact_comes_from_the_newest_version_that_has_it(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    for version in ("1", "2", "10"):
        (tmp_path / "text_encoder" / version).mkdir(parents=True)
    (tmp_path / "text_encoder" / "2" / "tokenizer.json").write_text("{}")
    (tmp_path / "text_encoder" / "1" / "tokenizer.json").write_text("{}")
    assert ctx.artifact("text_encoder", "tokenizer.json") == tmp_path / "text_encoder" / "2" / "tokenizer.json"


def test_missing_artifact_names_the_file_the_model_and_the_fix(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'tokenizer.json' of model 'text_encoder' not found.*make build-engines"):
        ctx.artifact("text_encoder", "tokenizer.json")


@pytest.mark.parametrize("name", ["..", "../etc", "/etc", "a/b", ""])
def test_artifact_model_names_cannot_leave_the_repository(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="is not a model name"):
        context(tmp_path).artifact(name, "passwd")


def test_model_file_is_read_from_the_model_folder_only(tmp_path: Path) -> None:
    ctx = context(tmp_path)
    (ctx.model_dir / "labels.txt").write_text("a\nb\n")
    assert ctx.model_file("labels.txt").read_text() == "a\nb\n"
    with pytest.raises(FileNotFoundError, match="file '../labels.txt' not found"):
        ctx.model_file("../labels.txt")
    with pytest.raises(FileNotFoundError, match="written by `kiln generate`"):
        ctx.model_file("missing.txt")


def test_failure_reason_labels() -> None:
    class DecodeError(RequestError):
        reason = "decode"

    assert failure_reason(DecodeError("bad")) == "decode"
    assert failure_reason(RequestError("bad")) == "invalid_input"
    assert failure_reason(RuntimeError("boom")) == "internal"


@pytest.mark.parametrize("name", ["../tokenizer.json", "/etc/passwd", "a/b", ".."])
def test_artifact_file_names_cannot_leave_the_model_folder(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="is not a file name"):
        context(tmp_path).artifact("text_encoder", name)
