"""What kiln serves: the model folders, discovered.

A model folder is one folder per served model or pipeline, found in `kiln.paths.models_dirs()`
(the project's `models/`, then every folder in `KILN_MODELS` or given to `kiln build --models`).
Adding a model is adding a folder; removing one is deleting it. A folder imports as the package
`kiln.models.<folder>` (relative imports work), and may hold:

- `spec.py` (required): `SPEC` (a `ModelSpec`) and/or `SPECS` (a tuple of specs), and the source
  dataclass of a model the build trains (its settings, checked by `kiln.spec.validate`).
- `pipeline.py`: `SPECS`, the pre/postprocessing steps and ensembles built around the model.
- `build.py`: the source stage that trains or loads the model (`kiln.build.pipeline.SourceStage`);
  a spec whose source is `CheckpointSource` or `OnnxFileSource` needs none.
- `reference.py`: the in-process reference pipeline the tests and benchmarks compare against.
- `loadtest.py`: `SLOS` (`loadtests.slo.PipelineSLO` per pipeline) and `items(model)`, the mix.
- `README.md`: the model's page: what it is, its data, its metric, its budgets.

Optional module attributes of `spec.py`: `BUILD_RANK` (an int, default 100: lower builds first,
so cheap models fail fast) and, on a source dataclass, `tools` (distributions whose versions shape
the built model, hashed into its rebuild decision) and `stage` (the source-stage module, default
the folder's `build`).

Nothing outside the build imports the build to learn what is served: the CLI, the load tests, the
benchmarks and the tests ask this module.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from kiln import paths
from kiln.spec import EnsembleSpec, ModelSpec, Spec, SpecError

PACKAGE = "kiln.models"
"""The package every model folder imports under: `kiln.models.<folder>`."""
SPEC_MODULE = "spec"
PIPELINE_MODULE = "pipeline"
STAGE_MODULE = "build"
DEFAULT_RANK = 100
"""`BUILD_RANK` of a folder that sets none: after the built-in models, by name."""


class RegistryError(SpecError):
    """A model folder that cannot be used: no spec, a spec module that fails to import, a name
    that two folders serve."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


@dataclass(frozen=True)
class ModelFolder:
    """One model folder.

    Attributes:
        name: The folder's name, also its package: `kiln.models.<name>`.
        path: Where it is.
        specs: The specs it serves (its `spec.py`, then its `pipeline.py`).
        rank: Its `BUILD_RANK`.
    """

    name: str
    path: Path
    specs: tuple[Spec, ...]
    rank: int = DEFAULT_RANK

    @property
    def package(self) -> str:
        return f"{PACKAGE}.{self.name}"

    def has(self, part: str) -> bool:
        """Whether the folder holds `<part>.py`."""
        return (self.path / f"{part}.py").is_file()

    def module(self, part: str) -> ModuleType:
        """Imports the folder's `<part>.py` (`reference`, `loadtest`, `build`...)."""
        if not self.has(part):
            raise RegistryError(f"model folder {self.name!r} ({self.path}) has no {part}.py")
        return importlib.import_module(f"{self.package}.{part}")


def add_models_dir(path: Path | str) -> Path:
    """Makes the model folders in `path` known to this process and to the processes it starts
    (through `KILN_MODELS`); what `kiln build --models DIR` does."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise RegistryError(f"--models {str(path)!r}: no such folder")
    current = [p for p in os.environ.get(paths.MODELS_ENV, "").split(os.pathsep) if p]
    if str(folder) not in current:
        os.environ[paths.MODELS_ENV] = os.pathsep.join([*current, str(folder)])
    package = importlib.import_module(PACKAGE)
    package.__path__[:] = [str(p) for p in paths.models_dirs()]
    importlib.invalidate_caches()
    folders.cache_clear()
    return folder


def _is_folder(path: Path) -> bool:
    return path.is_dir() and (path / f"{SPEC_MODULE}.py").is_file() and path.name.isidentifier()


def _specs_of(module: ModuleType) -> list[Spec]:
    found = [getattr(module, "SPEC", None), *getattr(module, "SPECS", ())]
    unique: list[Spec] = []
    for spec in found:
        if isinstance(spec, (ModelSpec, EnsembleSpec)) and spec not in unique:
            unique.append(spec)
    return unique


def _load(name: str, path: Path) -> ModelFolder:
    package = f"{PACKAGE}.{name}"
    try:
        spec_module = importlib.import_module(f"{package}.{SPEC_MODULE}")
        specs = _specs_of(spec_module)
        if (path / f"{PIPELINE_MODULE}.py").is_file():
            pipeline = importlib.import_module(f"{package}.{PIPELINE_MODULE}")
            specs += [s for s in _specs_of(pipeline) if s not in specs]
    except SpecError:
        raise
    except Exception as error:
        raise RegistryError(
            f"model folder {name!r} ({path}): its spec failed to import: {type(error).__name__}: {error}"
        ) from error
    if not specs:
        raise RegistryError(
            f"model folder {name!r} ({path}): {SPEC_MODULE}.py defines no SPEC or SPECS "
            "(a kiln.spec.ModelSpec or EnsembleSpec)"
        )
    rank = getattr(spec_module, "BUILD_RANK", DEFAULT_RANK)
    return ModelFolder(name=name, path=path, specs=tuple(specs), rank=int(rank))


@functools.cache
def folders() -> tuple[ModelFolder, ...]:
    """Every model folder, in build order (`BUILD_RANK`, then name).

    Raises RegistryError when a folder's spec cannot be imported or two folders serve the same
    model name (the message names both).
    """
    found: dict[str, Path] = {}
    for root in paths.models_dirs():
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            if not _is_folder(path):
                continue
            if path.name in found:
                raise RegistryError(
                    f"two model folders named {path.name!r}: {found[path.name]} and {path}; "
                    "rename one (a folder's name is its package, kiln.models.<name>)"
                )
            found[path.name] = path
    loaded = [_load(name, path) for name, path in found.items()]
    owner: dict[str, ModelFolder] = {}
    for folder in loaded:
        for spec in folder.specs:
            if spec.name in owner:
                raise RegistryError(
                    f"model {spec.name!r} is served by two model folders: "
                    f"{owner[spec.name].path} and {folder.path}"
                )
            owner[spec.name] = folder
    return tuple(sorted(loaded, key=lambda f: (f.rank, f.name)))


def specs(only: Iterable[str] | None = None) -> tuple[Spec, ...]:
    """Every served spec, in build order; with `only`, the folders of those names."""
    wanted = None if only is None else set(only)
    return tuple(
        spec for folder in folders() if wanted is None or folder.name in wanted for spec in folder.specs
    )


def by_name(name: str) -> Spec:
    """The spec of model `name`; KeyError lists the known names."""
    for spec in specs():
        if spec.name == name:
            return spec
    raise KeyError(f"no model named {name!r} in the spec; known: {', '.join(s.name for s in specs())}")


def folder_of(name: str) -> ModelFolder:
    """The folder serving model `name`; KeyError lists the known names."""
    for folder in folders():
        if any(spec.name == name for spec in folder.specs):
            return folder
    raise KeyError(f"no model named {name!r} in the spec; known: {', '.join(s.name for s in specs())}")


def module_of(name: str, part: str) -> ModuleType | None:
    """The `<part>.py` of the folder serving model `name`, or None when it has none."""
    folder = folder_of(name)
    return folder.module(part) if folder.has(part) else None
