"""The model registry: folders found in models/, KILN_MODELS, --models and entry points; clear
errors for a folder that cannot be used."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiln import paths, registry
from kiln.cli import main

SPEC_PY = '''
from kiln.spec import DynamicBatching, InstanceGroup, ModelSpec, TensorSpec

SPEC = ModelSpec(
    name="{name}",
    backend="kiln_classify",
    inputs=(TensorSpec("logits", "FP32", (3,)),),
    outputs=(
        TensorSpec("labels", "BYTES", (1,)),
        TensorSpec("scores", "FP32", (1,)),
        TensorSpec("class_indices", "INT64", (1,)),
    ),
    max_batch_size=4,
    dynamic_batching=DynamicBatching(),
    instance_groups=(InstanceGroup(kind="CPU", count=1),),
    parameters={{"top_k": "1", "labels_file": "labels.txt"}},
    files={{"labels.txt": "a\\nb\\nc\\n"}},
)
'''


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test's KILN_MODELS and registry, restored afterwards."""
    monkeypatch.delenv(paths.MODELS_ENV, raising=False)
    package = importlib.import_module(registry.PACKAGE)
    saved = list(package.__path__)
    registry.folders.cache_clear()
    yield
    os.environ.pop(paths.MODELS_ENV, None)
    package.__path__[:] = saved
    for name in [m for m in sys.modules if m.startswith(f"{registry.PACKAGE}.user_")]:
        del sys.modules[name]
    registry.folders.cache_clear()


def _folder(root: Path, name: str, model: str | None = None, text: str | None = None) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "spec.py").write_text(text if text is not None else SPEC_PY.format(name=model or name))
    return folder


def test_a_folder_given_with_models_is_generated_like_a_built_in_one(
    tmp_path: Path, isolated_registry: None, capsys: pytest.CaptureFixture[str]
) -> None:
    _folder(tmp_path / "mine", "user_top1")
    repository = tmp_path / "repo"
    assert main(["generate", "--models", str(tmp_path / "mine"), "--repository", str(repository)]) == 0
    assert (repository / "user_top1" / "config.pbtxt").is_file()
    assert (repository / "user_top1" / "labels.txt").read_text() == "a\nb\nc\n"
    assert (repository / "digits" / "config.pbtxt").is_file()  # the project's folders too
    assert registry.folder_of("user_top1").path == tmp_path / "mine" / "user_top1"
    assert str(tmp_path / "mine") in os.environ[paths.MODELS_ENV]  # handed to child processes


def test_two_folders_of_one_model_name_are_refused_naming_both(
    tmp_path: Path, isolated_registry: None
) -> None:
    first = _folder(tmp_path / "a", "user_one", model="user_same")
    second = _folder(tmp_path / "b", "user_two", model="user_same")
    registry.add_models_dir(tmp_path / "a")
    registry.add_models_dir(tmp_path / "b")
    with pytest.raises(registry.RegistryError) as error:
        registry.folders()
    assert str(error.value).endswith(
        f"model 'user_same' is served by two model folders: {first} and {second}"
    )


def test_a_spec_that_fails_to_import_names_its_folder(tmp_path: Path, isolated_registry: None) -> None:
    folder = _folder(tmp_path, "user_broken", text="import no_such_module_anywhere\n")
    registry.add_models_dir(tmp_path)
    with pytest.raises(registry.RegistryError) as error:
        registry.folders()
    assert (
        f"model folder 'user_broken' ({folder}): its spec failed to import: "
        "ModuleNotFoundError: No module named 'no_such_module_anywhere'"
    ) in str(error.value)


def test_a_spec_without_spec_or_specs_is_refused(tmp_path: Path, isolated_registry: None) -> None:
    _folder(tmp_path, "user_empty", text="X = 1\n")
    registry.add_models_dir(tmp_path)
    with pytest.raises(registry.RegistryError, match="spec.py defines no SPEC or SPECS"):
        registry.folders()


def test_a_missing_models_dir_is_a_clear_error(tmp_path: Path, isolated_registry: None) -> None:
    with pytest.raises(registry.RegistryError, match=r"--models '.*nowhere': no such folder"):
        registry.add_models_dir(tmp_path / "nowhere")


def test_an_installed_entry_point_names_a_folder_of_model_folders(
    tmp_path: Path, isolated_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "site" / "user_pkg_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    _folder(package, "user_from_entry_point")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    entry = importlib.metadata.EntryPoint("mine", "user_pkg_models", paths.ENTRY_POINT_GROUP)
    monkeypatch.setattr(
        importlib.metadata, "entry_points",
        lambda group=None: [entry] if group == paths.ENTRY_POINT_GROUP else [],
    )
    assert package.resolve() in paths.models_dirs()
    importlib.import_module(registry.PACKAGE).__path__[:] = [str(p) for p in paths.models_dirs()]
    assert registry.by_name("user_from_entry_point").name == "user_from_entry_point"
