"""The specs of kiln's model repository: one module per model, each defining `SPEC`.

Modules are discovered (any module of this package with a `SPEC`), so adding a model is adding a
file. `SPECS` orders them by `BUILD_ORDER`, then by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from kiln.spec import ModelSpec

BUILD_ORDER = ("digits", "fraud", "text_encoder", "resnet50")
"""Cheap models first, so a broken build fails fast; models not listed come after, by name."""


def _discover() -> tuple[ModelSpec, ...]:
    specs = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        spec = getattr(module, "SPEC", None)
        if isinstance(spec, ModelSpec):
            specs.append(spec)
    rank = {name: i for i, name in enumerate(BUILD_ORDER)}
    return tuple(sorted(specs, key=lambda s: (rank.get(s.name, len(rank)), s.name)))


SPECS: tuple[ModelSpec, ...] = _discover()
"""Every model of the committed repository, in build order."""


def by_name(name: str) -> ModelSpec:
    """The spec of model `name`; KeyError lists the known names."""
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no model named {name!r} in the spec; known: {', '.join(s.name for s in SPECS)}")
