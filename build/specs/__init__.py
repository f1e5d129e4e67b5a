"""The specs of kiln's model repository: one module per model, collected here."""

from kiln.build.specs.digits import DIGITS
from kiln.spec import ModelSpec

SPECS: tuple[ModelSpec, ...] = (DIGITS,)
"""Every model of the committed repository, in the order they are built."""


def by_name(name: str) -> ModelSpec:
    """The spec of model `name`; KeyError lists the known names."""
    for spec in SPECS:
        if spec.name == name:
            return spec
    raise KeyError(f"no model named {name!r} in the spec; known: {', '.join(s.name for s in SPECS)}")
