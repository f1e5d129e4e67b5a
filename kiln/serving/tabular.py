"""kiln_tabular's logic: named numeric features -> the model's standardized FP32 features.

A request sends exactly one of two inputs (both are optional in the config):

- records: BYTES [batch, 1], each item a JSON object of named numeric features in raw units,
  e.g. `{"amount": 42.5, "hour": 13.2, ...}`;
- values: FP32 [batch, features], the same features as numbers in the statistics' order.

The output is FP32 [batch, features]: `(raw - mean) / std` per feature, computed in float64 and
cast to float32, with the mean and std the build saved (`features.json`, published beside the
model named by the parameter `stats_model`). That is exactly `kiln.models.fraud.build.FeatureStats`'
standardization; this module re-reads the file without the build's imports (torch, scikit-learn),
which a serving host need not have, and the unit tests check that both agree bit for bit.

Nothing a user sends is silently changed or dropped: a record that is not valid JSON or not an
object, misses a feature, names an unknown one, repeats a key, or holds a value that is not a
finite number (a string, a boolean, null, NaN, Infinity, a number overflowing float64, or one so
far out of range that its standardized value overflows float32) fails its request with a message
naming the input, the item and the feature. The other requests of the dynamic batch are still
answered: the step parses every record of the batch, builds one matrix and standardizes it in one
vectorized operation.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.serving.adapter import Inputs, LoadContext, Outputs
from kiln.serving.batch import RequestError, TensorContract, validate_request
from kiln.serving.onnx import ModelLoadError
from kiln.serving.params import Param, parse_params

STATS_FORMAT = 1
"""The layout of the statistics file this step reads (`kiln.models.fraud.build.FEATURES_FORMAT`)."""
DEFAULT_MAX_RECORD_BYTES = 65_536
"""A record of a few dozen features is a few hundred bytes; this bounds the parser's work."""

TABULAR_PARAMS: tuple[Param, ...] = (
    Param(
        "stats_model", "name", "",
        "repository model whose newest version folder holds the build's statistics file "
        "(required, e.g. fraud)",
    ),
    Param(
        "stats_file", "name", "features.json",
        "the statistics file the build published there: feature names, mean and std",
    ),
    Param(
        "max_record_bytes", "int", DEFAULT_MAX_RECORD_BYTES,
        "largest JSON record accepted, in bytes (a longer one fails its request)", minimum=2,
    ),
)

RECORD_TYPE = "TYPE_STRING"
"""BYTES as Triton writes it in the model config it hands to the backend."""
VALUES_TYPE = "TYPE_FP32"

BYTES = np.dtype(object)
FP32 = np.dtype(np.float32)


@dataclass(frozen=True)
class TabularParams:
    """kiln_tabular's `parameters`, parsed (see TABULAR_PARAMS for each key's meaning)."""

    stats_model: str
    stats_file: str
    max_record_bytes: int


class RecordError(RequestError):
    """One request's records or values are malformed; `reason` labels the failure metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class FeatureStandardizer:
    """The build's standardization: features[i] = (raw[i] - mean[i]) / std[i].

    Attributes:
        names: Feature names, in the model's input order (the JSON record keys).
        mean: Per-feature mean of the build's training split (float64).
        std: Per-feature standard deviation (float64, > 0).
    """

    names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def from_document(cls, document: Any, where: str) -> FeatureStandardizer:
        """Reads the statistics document (`features.json`) the build wrote.

        Raises:
            ValueError: naming `where` and the field: an unknown format, names that are not
                unique strings, means or stds of another length, or non-finite or non-positive
                values.
        """
        if not isinstance(document, dict) or document.get("format") != STATS_FORMAT:
            got = document.get("format") if isinstance(document, dict) else type(document).__name__
            raise ValueError(f"{where}: 'format' must be {STATS_FORMAT}, got {got!r}")
        names = document.get("features")
        if (
            not isinstance(names, list) or not names
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)
        ):
            raise ValueError(f"{where}: 'features' must be a list of unique names, got {names!r}")
        arrays = {}
        for key in ("mean", "std"):
            values = document.get(key)
            if (
                not isinstance(values, list) or len(values) != len(names)
                or not all(type(v) in (int, float) and math.isfinite(v) for v in values)
            ):
                raise ValueError(
                    f"{where}: '{key}' must be {len(names)} finite numbers (one per feature), "
                    f"got {values!r}"
                )
            arrays[key] = np.asarray(values, dtype=np.float64)
        if not (arrays["std"] > 0).all():
            raise ValueError(f"{where}: every 'std' must be > 0, got {document['std']!r}")
        return cls(tuple(names), arrays["mean"], arrays["std"])

    @classmethod
    def read(cls, path: Path) -> FeatureStandardizer:
        """Reads a statistics file; ValueError names the file and what is wrong with it."""
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: cannot read the feature statistics: {error}") from error
        return cls.from_document(document, str(path))

    @property
    def features(self) -> int:
        """How many features a record holds."""
        return len(self.names)

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        """Raw features [N, features] -> FP32 [N, features] (computed in float64; a value beyond
        the FP32 range becomes infinite, which `TabularStep` reports as that item's error)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return np.ascontiguousarray(((raw - self.mean) / self.std).astype(np.float32))


class _Constant:
    """A JSON NaN, Infinity or -Infinity (Python's json reads them; a record must not hold one)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


_DECODER = json.JSONDecoder(parse_constant=_Constant, object_pairs_hook=_no_duplicates)
_JSON_KINDS = {str: "a string", list: "an array", dict: "an object", type(None): "null"}


def _describe(value: Any) -> str:
    """A JSON value in words, for error messages."""
    if isinstance(value, bool):
        return f"the boolean {'true' if value else 'false'}"
    if isinstance(value, _Constant):
        return value.text
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string {json.dumps(shown)}"
    return _JSON_KINDS.get(type(value), type(value).__name__)


def _listing(names: Sequence[str]) -> str:
    return ", ".join(f"'{n}'" for n in names)


class TabularStep:
    """Standardizes a dynamic batch of records or value rows with the build's statistics.

    Attributes:
        stats: The build's standardization.
        records_input: Name of the BYTES input of JSON records, or None when not configured.
        values_input: Name of the FP32 input of raw value rows, or None when not configured.
        output: Name of the FP32 output of standardized features.
        max_record_bytes: Largest record accepted.
    """

    def __init__(
        self,
        stats: FeatureStandardizer,
        *,
        records_input: str | None,
        values_input: str | None,
        output: str,
        max_record_bytes: int = DEFAULT_MAX_RECORD_BYTES,
    ) -> None:
        if records_input is None and values_input is None:
            raise ValueError("kiln_tabular needs a records input, a values input, or both")
        self.stats = stats
        self.records_input = records_input
        self.values_input = values_input
        self.output = output
        self.max_record_bytes = max_record_bytes
        self._names = stats.names
        self._known = frozenset(stats.names)
        self._inputs = tuple(n for n in (records_input, values_input) if n is not None)
        self._records = TensorContract(records_input or "", BYTES, (1,))
        self._values = TensorContract(values_input or "", FP32, (stats.features,))

    # -- one request ------------------------------------------------------------------------

    def _chosen(self, request: Inputs) -> tuple[str, np.ndarray]:
        """The one input a request sent and its array; RecordError when it sent both or none."""
        sent = [name for name in self._inputs if request.get(name) is not None]
        if len(sent) != 1:
            if len(self._inputs) == 1:
                raise RecordError(f"missing input '{self._inputs[0]}'", "bad_inputs")
            raise RecordError(
                f"send exactly one of the inputs {' and '.join(repr(n) for n in self._inputs)}, "
                f"got {'both' if sent else 'neither'}",
                "bad_inputs",
            )
        name = sent[0]
        contract = self._records if name == self.records_input else self._values
        validate_request({name: request[name]}, [contract], batched=True, reject_non_finite=False)
        return name, request[name]  # type: ignore[return-value]

    def parse_record(self, data: Any, where: str) -> list[float]:
        """One JSON record -> its raw values in feature order (float64-exact Python floats).

        Args:
            data: The item: UTF-8 bytes (or str) holding a JSON object.
            where: Names the item in messages, e.g. "input 'record' item 3".

        Raises:
            RecordError: naming `where` and what is wrong (and the feature, where one is).
        """
        document = self._record_object(self._record_text(data, where), where)
        return self._record_row(document, where)

    def _record_text(self, data: Any, where: str) -> str:
        """The item as text: UTF-8 bytes (or a str) of at most `max_record_bytes`."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            size = len(data)
            if size > self.max_record_bytes:
                raise self._too_large(where, size)
            try:
                text = bytes(data).decode("utf-8")
            except UnicodeDecodeError as error:
                raise RecordError(f"{where}: not UTF-8 text ({error})", "invalid_json") from None
        elif isinstance(data, str):
            text = data
            if len(text) > self.max_record_bytes and len(text.encode("utf-8")) > self.max_record_bytes:
                raise self._too_large(where, len(text.encode("utf-8")))
        else:
            raise RecordError(
                f"{where}: expected UTF-8 bytes holding a JSON object, got {type(data).__name__}",
                "invalid_json",
            )
        return text

    def _record_object(self, text: str, where: str) -> dict[str, Any]:
        """The JSON object the text holds, with exactly the model's feature names as keys."""
        try:
            document = _DECODER.decode(text)
        except _DuplicateKey as error:
            raise RecordError(
                f"{where}: key '{error.key}' appears more than once in the record", "invalid_record"
            ) from None
        except json.JSONDecodeError as error:
            raise RecordError(f"{where}: not valid JSON ({error})", "invalid_json") from None
        except RecursionError:
            raise RecordError(f"{where}: not valid JSON (nested too deeply)", "invalid_json") from None
        except ValueError as error:  # e.g. an integer literal beyond Python's 4300-digit limit
            raise RecordError(f"{where}: not valid JSON ({error})", "invalid_json") from None
        if not isinstance(document, dict):
            raise RecordError(
                f"{where}: expected a JSON object of named features, got {_describe(document)}",
                "invalid_record",
            )
        if len(document) != len(self._names) or not self._known.issuperset(document):
            self._wrong_keys(document, where)
        return document

    def _record_row(self, document: dict[str, Any], where: str) -> list[float]:
        """The object's values in feature order, as finite floats."""
        row = [document[name] for name in self._names]
        for i, value in enumerate(row):
            kind = type(value)
            if kind is float:
                if not math.isfinite(value):  # NaN/Infinity literals arrive as _Constant
                    raise self._overflow(where, self._names[i])
            elif kind is int:
                try:
                    row[i] = float(value)
                except OverflowError:
                    raise self._overflow(where, self._names[i]) from None
            else:
                non_finite = isinstance(value, _Constant)
                raise RecordError(
                    f"{where}: feature '{self._names[i]}' must be a "
                    f"{'finite ' if non_finite else ''}number, got {_describe(value)}",
                    "non_finite" if non_finite else "non_numeric",
                )
        return row

    def _too_large(self, where: str, size: int) -> RecordError:
        return RecordError(
            f"{where}: the record is {size} bytes, over the limit of {self.max_record_bytes} "
            "(parameter 'max_record_bytes')",
            "record_too_large",
        )

    def _overflow(self, where: str, name: str) -> RecordError:
        return RecordError(
            f"{where}: feature '{name}' must be a finite number, got a number too large for "
            "64-bit floating point (beyond +-1.8e308)",
            "non_finite",
        )

    def _wrong_keys(self, document: Mapping[str, Any], where: str) -> None:
        missing = [n for n in self._names if n not in document]
        unknown = [k for k in document if k not in self._known]
        parts = []
        reason = "missing_feature"
        if missing:
            parts.append(f"missing feature(s) {_listing(missing)}")
        if unknown:
            reason = "unknown_feature" if not missing else reason
            hints = []
            for key in unknown:
                # Only a missing feature can be what an unknown key meant.
                close = difflib.get_close_matches(key, missing, n=1) if missing else []
                hints.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            parts.append(f"unknown feature(s) {', '.join(hints)}")
        raise RecordError(
            f"{where}: {'; '.join(parts)}; a record holds exactly these {len(self._names)} "
            f"features: {', '.join(self._names)}",
            reason,
        )

    def _rows(self, name: str, array: np.ndarray) -> np.ndarray:
        """A request's raw values, float64 [items, features]."""
        if name == self.values_input:
            return array.astype(np.float64)
        rows = [self.parse_record(item, f"input '{name}' item {i}") for i, item in enumerate(array[:, 0])]
        return np.asarray(rows, dtype=np.float64)

    def _bad_row(self, name: str, item: int, raw: np.ndarray, standardized: np.ndarray) -> RecordError:
        """The error of a row whose standardized values are not all finite."""
        column = int(np.flatnonzero(~np.isfinite(standardized))[0])
        feature = self._names[column]
        where = f"input '{name}' item {item}: feature '{feature}'"
        if name == self.values_input:
            where += f" (column {column})"
        value = raw[column]
        if not math.isfinite(value):
            return RecordError(f"{where} must be a finite number, got {value}", "non_finite")
        return RecordError(
            f"{where} is {value:g}, too far out of range: standardized with the build's mean "
            f"{self.stats.mean[column]:g} and std {self.stats.std[column]:g} it overflows FP32",
            "out_of_range",
        )

    # -- the batch --------------------------------------------------------------------------

    def run(self, requests: Sequence[Inputs]) -> list[Outputs | Exception]:
        """One result per request: its standardized features, or the error of its bad input.

        Every request is parsed on its own (so a bad one fails alone); the valid rows of the
        whole batch are standardized as one matrix.
        """
        results: list[Outputs | Exception] = [RecordError("not run", "internal")] * len(requests)
        parts: list[np.ndarray] = []
        members: list[tuple[int, str, int]] = []  # (request index, input name, rows)
        for index, request in enumerate(requests):
            try:
                name, array = self._chosen(request)
                rows = self._rows(name, array)
            except RequestError as error:
                results[index] = error
                continue
            except Exception as error:  # a bug here still fails only this request (INTERNAL)
                results[index] = RuntimeError(f"kiln_tabular failed on this request: {error!r}")
                continue
            parts.append(rows)
            members.append((index, name, len(rows)))
        if not parts:
            return results
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        standardized = self.stats.standardize(raw)
        finite = np.isfinite(standardized).all(axis=1)
        all_finite = bool(finite.all())  # the common case: no per-request search for a bad row
        offset = 0
        for index, name, size in members:
            block = slice(offset, offset + size)
            bad = () if all_finite else np.flatnonzero(~finite[block])
            if len(bad):
                row = offset + int(bad[0])
                results[index] = self._bad_row(name, int(bad[0]), raw[row], standardized[row])
            else:
                results[index] = {self.output: standardized[block]}
            offset += size
        return results


def _tensors(config: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    return list(config.get(key) or ())


def load(context: LoadContext) -> TabularStep:
    """Builds the step from a model's config and parameters (see the module doc).

    The BYTES input (dims [1]) takes JSON records, the FP32 input (dims [features]) raw values;
    the one output is FP32 [features], with `features` the statistics' count.

    Raises:
        ParamError: a parameter is unknown or not allowed.
        ModelLoadError: no `stats_model`, the statistics file is missing or malformed, or the
            config's tensors do not fit the contract or the statistics.
    """
    name = context.model_name
    params = parse_params(name, context.parameters, TABULAR_PARAMS, TabularParams)
    stats, path = _read_stats(context, params)
    records, values = _input_names(context.config, name, stats.features, path)
    output = _output_name(context.config, name, stats.features, path)
    if int(context.config.get("max_batch_size", 0)) < 1:
        raise ModelLoadError(f"model '{name}': kiln_tabular needs max_batch_size >= 1")
    return TabularStep(
        stats,
        records_input=records,
        values_input=values,
        output=output,
        max_record_bytes=params.max_record_bytes,
    )


def _read_stats(context: LoadContext, params: TabularParams) -> tuple[FeatureStandardizer, Path]:
    """The statistics the `stats_model`'s build published, and the file's path."""
    name = context.model_name
    if not params.stats_model:
        raise ModelLoadError(
            f"model '{name}': parameter 'stats_model' is required: the repository model whose "
            f"build published '{params.stats_file}' (e.g. fraud)"
        )
    try:
        path = context.artifact(params.stats_model, params.stats_file)
        stats = FeatureStandardizer.read(path)
    except FileNotFoundError as error:  # LoadContext.artifact names the model already
        raise ModelLoadError(str(error)) from error
    except ValueError as error:
        raise ModelLoadError(f"model '{name}': {error}") from error
    return stats, path


def _input_names(
    config: Mapping[str, Any], name: str, width: int, path: Path
) -> tuple[str | None, str | None]:
    """(the BYTES [1] records input, the FP32 [width] values input), at least one of them."""
    records = values = None
    for tensor in _tensors(config, "input"):
        dtype, dims = tensor.get("data_type"), [int(d) for d in tensor.get("dims", ())]
        if dtype == RECORD_TYPE and dims == [1] and records is None:
            records = tensor["name"]
        elif dtype == VALUES_TYPE and dims == [width] and values is None:
            values = tensor["name"]
        else:
            raise ModelLoadError(
                f"model '{name}': input '{tensor.get('name')}' is {dtype} {dims}; kiln_tabular takes "
                f"one BYTES [1] input of JSON records and/or one FP32 [{width}] input of raw values "
                f"({width} features in {path})"
            )
    if records is None and values is None:
        raise ModelLoadError(f"model '{name}': kiln_tabular needs a records or a values input")
    return records, values


def _output_name(config: Mapping[str, Any], name: str, width: int, path: Path) -> str:
    """The one output, FP32 [width]."""
    outputs = _tensors(config, "output")
    if (
        len(outputs) != 1 or outputs[0].get("data_type") != VALUES_TYPE
        or [int(d) for d in outputs[0].get("dims", ())] != [width]
    ):
        got = ", ".join(
            f"{o.get('name')} {o.get('data_type')} {[int(d) for d in o.get('dims', ())]}" for o in outputs
        )
        raise ModelLoadError(
            f"model '{name}': kiln_tabular has one output, FP32 [{width}] ({width} features in "
            f"{path}); the config declares {got or 'none'}"
        )
    return outputs[0]["name"]
