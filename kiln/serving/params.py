"""Declared backend parameters, parsed once into a frozen dataclass.

A backend declares its `parameters` keys as a tuple of `Param`. The same declaration validates a
spec before `kiln generate` writes anything, and parses `config.pbtxt` in the backend's
`initialize`, so both fail with the same message: the model, the key, what is allowed, what was
given.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ParamError(ValueError):
    """A backend parameter is unknown or has a value outside what is allowed."""


def _parse_int(text: str, minimum: float | None) -> int:
    value = int(text.strip())
    if minimum is not None and value < minimum:
        raise ValueError
    return value


def _parse_float(text: str, minimum: float | None) -> float:
    value = float(text.strip())
    if not math.isfinite(value) or (minimum is not None and value < minimum):
        raise ValueError
    return value


def _parse_floats(text: str, _: float | None) -> tuple[float, ...]:
    values = tuple(float(item) for item in text.split(",") if item.strip())
    if not values or not all(math.isfinite(v) for v in values):
        raise ValueError
    return values


def _parse_ints(text: str, minimum: float | None) -> tuple[int, ...]:
    values = tuple(int(item.strip()) for item in text.split(",") if item.strip())
    if not values or (minimum is not None and any(v < minimum for v in values)):
        raise ValueError
    return values


def _parse_bool(text: str, _: float | None) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError


def _parse_str(text: str, _: float | None) -> str:
    return text.strip()


_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
"""One path segment: a file or model name that cannot name a parent folder or another path."""


def _parse_name(text: str, _: float | None) -> str:
    value = text.strip()
    if not _SEGMENT.match(value):
        raise ValueError
    return value


def _parse_list(text: str, _: float | None) -> tuple[str, ...]:
    items = tuple(item.strip() for item in text.split(",") if item.strip())
    if not items:
        raise ValueError
    return items


_PARSERS: dict[str, tuple[Callable[[str, float | None], Any], str]] = {
    "int": (_parse_int, "an integer"),
    "float": (_parse_float, "a finite number"),
    "floats": (_parse_floats, "a comma-separated list of finite numbers"),
    "ints": (_parse_ints, "a comma-separated list of integers"),
    "bool": (_parse_bool, "true or false"),
    "str": (_parse_str, "a string"),
    "name": (_parse_name, "one path segment (a file or model name: letters, digits, '_', '.', '-'; "
             "not starting with '.')"),
    "list": (_parse_list, "a comma-separated list"),
}


@dataclass(frozen=True)
class Param:
    """One `parameters` key a backend accepts.

    Attributes:
        name: The key in `config.pbtxt` `parameters` (and the dataclass field it fills).
        kind: "int", "float", "bool", "str", "name" (one path segment: a file or model name, so a
            parameter can never point outside the folder it is read from), "list" (comma-separated,
            parsed to a tuple of str), "floats" (comma-separated, parsed to a tuple of float) or
            "ints" (comma-separated, parsed to a tuple of int, `minimum` applying to each item).
        default: Value used when the key is absent.
        help: One line for docs and error messages.
        choices: Allowed values (for "list", allowed items); None allows any.
        minimum: Smallest allowed value for "int" and "float"; for "ints", of each item.
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None

    def describe(self) -> str:
        """What the value must be, in words, for error messages."""
        _, words = _PARSERS[self.kind]
        if self.choices is not None:
            joined = ", ".join(self.choices)
            return f"one of {joined}" if self.kind != "list" else f"a comma-separated list of {joined}"
        if self.minimum is not None:
            each = ", each" if self.kind == "ints" else ""
            return f"{words}{each} >= {self.minimum:g}"
        return words

    def parse(self, model: str, text: str) -> Any:
        """Parses `text`, raising ParamError naming the model, the key and what is allowed."""
        parser, _ = _PARSERS[self.kind]
        try:
            value = parser(text, self.minimum)
        except ValueError:
            value = None
        items = value if isinstance(value, tuple) else (value,)
        if value is None or (
            self.choices is not None and any(item not in self.choices for item in items)
        ):
            raise ParamError(
                f"model '{model}': parameter '{self.name}' must be {self.describe()}, got {text!r}"
            )
        return value


def check_params(model: str, raw: Mapping[str, str], schema: Sequence[Param]) -> dict[str, Any]:
    """Validates `raw` against `schema` and returns every declared key with its parsed value."""
    known = {p.name: p for p in schema}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ParamError(
            f"model '{model}': unknown parameter {', '.join(repr(k) for k in unknown)}; "
            f"allowed: {', '.join(sorted(known))}"
        )
    values = {p.name: p.default for p in schema}
    for key, text in raw.items():
        values[key] = known[key].parse(model, text)
    return values


def parse_params(model: str, raw: Mapping[str, str], schema: Sequence[Param], into: type[T]) -> T:
    """Parses `raw` into the frozen dataclass `into`, whose fields are the schema's names."""
    fields = {f.name for f in dataclasses.fields(into)}  # type: ignore[arg-type]
    missing = {p.name for p in schema} ^ fields
    if missing:
        raise TypeError(f"{into.__name__} and its schema disagree on {sorted(missing)}")
    return into(**check_params(model, raw, schema))


def config_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """The `parameters` of a model config (as Triton passes it, JSON) as a plain str->str dict."""
    params = model_config.get("parameters") or {}
    return {key: value.get("string_value", "") for key, value in params.items()}
