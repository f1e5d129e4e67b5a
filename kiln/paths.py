"""Where kiln's folders are, resolved once from the source tree (no magic paths elsewhere).

Every location can be overridden through the environment, so an installed kiln can point at a
checkout or a deployment's own folders.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(os.environ.get("KILN_ROOT", Path(__file__).resolve().parent.parent))
"""The project root: the folder holding `kiln/`, `build/`, `backends/`, `models/` and `model_repository/`."""


def backends_dir() -> Path:
    """Folder of kiln's Python-based Triton backends, one sub-folder each."""
    return Path(os.environ.get("KILN_BACKENDS", ROOT / "backends"))


def model_repository() -> Path:
    """The Triton model repository the generator writes and the server serves."""
    return Path(os.environ.get("KILN_MODEL_REPOSITORY", ROOT / "model_repository"))


MODELS_ENV = "KILN_MODELS"
"""Extra folders of model folders (os.pathsep-separated), searched after the project's `models/`."""


ENTRY_POINT_GROUP = "kiln.models"
"""Installed distributions name a package whose folder holds model folders:
`[project.entry-points."kiln.models"] mine = "my_package.kiln_models"`."""


def _entry_point_dirs() -> list[Path]:
    """The folders of the packages named in the `kiln.models` entry-point group (not imported:
    their location is read from the import system)."""
    import importlib.metadata
    import importlib.util

    found = []
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        spec = importlib.util.find_spec(entry.module)
        if spec is not None and spec.submodule_search_locations:
            found += [Path(p).resolve() for p in spec.submodule_search_locations]
    return found


def models_dirs() -> tuple[Path, ...]:
    """Folders holding model folders: the project's `models/`, those `KILN_MODELS` names, then
    those of installed `kiln.models` entry points.

    `kiln.registry` discovers every model folder in them; `kiln build --models DIR` adds DIR for
    one command (and passes it on to the processes it starts through `KILN_MODELS`).
    """
    extra = [Path(p).expanduser().resolve() for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p]
    found: list[Path] = []
    for path in (ROOT / "models", *extra, *_entry_point_dirs()):
        if path not in found:
            found.append(path)
    return tuple(found)


def artifacts_dir() -> Path:
    """The build pipeline's working folder: checkpoints, exported models, manifests."""
    return Path(os.environ.get("KILN_ARTIFACTS", ROOT / "artifacts"))


def available_backends() -> tuple[str, ...]:
    """Names of the backends in `backends_dir()` (folders holding a `model.py`)."""
    root = backends_dir()
    if not root.is_dir():
        return ()
    return tuple(sorted(p.name for p in root.iterdir() if (p / "model.py").is_file()))
