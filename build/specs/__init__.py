"""The specs of kiln's model repository: one module per model (defining `SPEC`) or per pipeline
(defining `SPECS`, a tuple of its pre/postprocessing models and ensembles).

Modules are discovered (any module of this package with a `SPEC` or `SPECS`), so adding a model is
adding a file. `SPECS` orders built models by `BUILD_ORDER`, then everything else by name.
"""

from __future__ import annotations

import importlib
import pkgutil

from kiln.spec import EnsembleSpec, ModelSpec, Spec

BUILD_ORDER = ("digits", "fraud", "text_encoder", "resnet50")
"""Cheap models first, so a broken build fails fast; models not listed come after, by name."""


def _discover() -> tuple[Spec, ...]:
    specs: list[Spec] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found = [getattr(module, "SPEC", None), *getattr(module, "SPECS", ())]
        specs += [s for s in found if isinstance(s, (ModelSpec, EnsembleSpec))]
    rank = {name: i for i, name in enumerate(BUILD_ORDER)}
    return tuple(sorted(specs, key=lambda s: (rank.get(s.name, len(rank)), s.name)))


SPECS: tuple[Spec, ...] = _discover()
"""Every model of the committed repository, in build order."""


def by_name(name: str) -> Spec:
    """The spec of model `name`; KeyError lists the known names."""
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no model named {name!r} in the spec; known: {', '.join(s.name for s in SPECS)}")
