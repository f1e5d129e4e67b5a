"""The one bridge between kiln's processing steps and Triton's Python backend.

Every kiln backend is a `Step` (`kiln_onnx` too: `kiln.serving.onnx.OnnxStep`): plain Python over
numpy arrays, testable without Triton. A backend's `model.py` is then one line,
`TritonPythonModel = python_model(load)`, where `load` builds the step from a `LoadContext`. The
adapter

- reads each request's inputs by the names in the model config (an absent optional input is None),
- hands the whole dynamic batch to the step in one call (so a step can vectorize across requests),
- turns each per-request exception into that request's error (a `ValueError`, `RequestError`
  included, is INVALID_ARG; anything else INTERNAL), so one bad request never fails its batch,
- and keeps Triton custom metrics per model: requests, items, failures by reason, and the time
  spent in the step (see METRICS), served on Triton's /metrics beside its own.

`triton_python_backend_utils` exists only inside the backend stub, so it is imported when a
model class is made, never at import time.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln.serving.params import config_parameters

Inputs = dict[str, "np.ndarray | None"]
Outputs = dict[str, np.ndarray]

METRICS = {
    "kiln_step_requests_total": "Requests a kiln processing step received",
    "kiln_step_failures_total": "Requests a kiln processing step answered with an error, by reason",
    "kiln_step_duration_us_total": "Microseconds a kiln processing step spent executing batches",
    "kiln_step_batches_total": "Batches (execute calls) a kiln processing step ran",
}
"""Custom metric families (all counters, labeled by model; failures also by reason). Time per
request is duration / requests; rate() them in Prometheus."""

_VERSION = re.compile(r"^[0-9]+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class Step(Protocol):
    """A processing step: one call per dynamic batch, one result per request, in order."""

    def run(self, requests: Sequence[Inputs]) -> list[Outputs | Exception]:
        """Each request's outputs by name, or the exception that is that request's error."""
        ...


def failure_reason(error: Exception) -> str:
    """The `reason` label of a failure: the error's own `reason` attribute when it has one,
    "invalid_input" for any other ValueError, "internal" for the rest."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    return "invalid_input" if isinstance(error, ValueError) else "internal"


@dataclass(frozen=True)
class LoadContext:
    """What a step needs at load: the model's name, folders, config and raw parameters.

    Attributes:
        model_name: The model's name in the repository.
        model_dir: `<repository>/<model>`, where config.pbtxt and the spec's `files` live.
        version_dir: `<model_dir>/<version>` being loaded.
        config: The model config as Triton passes it (parsed JSON).
        parameters: The config's `parameters` as str -> str.
    """

    model_name: str
    model_dir: Path
    version_dir: Path
    config: Mapping[str, Any]
    parameters: Mapping[str, str]

    @property
    def repository(self) -> Path:
        """The model repository holding this model."""
        return self.model_dir.parent

    def model_file(self, name: str) -> Path:
        """A file the spec's `files` put into this model's folder; FileNotFoundError names it."""
        path = self.model_dir / name
        if not _MODEL_NAME.match(name) or not path.is_file():
            raise FileNotFoundError(
                f"model '{self.model_name}': file {name!r} not found in {self.model_dir} "
                "(it is written by `kiln generate` from the spec's files)"
            )
        return path

    def artifact(self, model: str, name: str) -> Path:
        """`name` in the newest version folder of another repository model (e.g. the tokenizer
        the build published beside text_encoder); see `find_artifact`."""
        return find_artifact(self.repository, model, name, for_model=self.model_name)


def find_artifact(repository: Path, model: str, name: str, *, for_model: str) -> Path:
    """`name` in the newest version folder of `model` in `repository` that holds it: where a
    step finds what the build published beside another model. The model name must be one path
    segment, so nothing outside the repository can be reached.

    Args:
        repository: The model repository.
        model: The model whose version folders hold the file.
        name: The file's name (one path segment).
        for_model: The model asking (named in the messages).

    Raises:
        ValueError: `model` or `name` is not one path segment.
        FileNotFoundError: no version folder holds the file (the message says to build).
    """
    if not _MODEL_NAME.match(model) or model in (".", ".."):
        raise ValueError(f"model '{for_model}': {model!r} is not a model name")
    if not _MODEL_NAME.match(name):
        raise ValueError(f"model '{for_model}': {name!r} is not a file name (one path segment)")
    folder = Path(repository) / model
    versions = sorted(
        (int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name))
        if folder.is_dir() else ()
    )
    for version in reversed(versions):
        path = folder / str(version) / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"model '{for_model}': {name!r} of model '{model}' not found under {folder} "
        "(the build publishes it: run `make build-engines`)"
    )

def read_inputs(request: Any, names: Sequence[str], pb_utils: Any) -> Inputs:
    """One request's input arrays by name (None where the request left an input out)."""
    inputs: Inputs = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        inputs[name] = None if tensor is None else tensor.as_numpy()
    return inputs


class _Metrics:
    """Triton custom metrics for one model; a no-op where the stub has no metrics API."""

    def __init__(self, pb_utils: Any, model: str) -> None:
        self._model = model
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, str], Any] = {}
        family_type = getattr(pb_utils, "MetricFamily", None)
        if family_type is None:
            return
        for name, description in METRICS.items():
            self._families[name] = family_type(
                name=name, description=description, kind=family_type.COUNTER
            )

    def add(self, name: str, value: float, reason: str = "") -> None:
        family = self._families.get(name)
        if family is None or value <= 0:
            return
        key = (name, reason)
        metric = self._metrics.get(key)
        if metric is None:
            labels = {"model": self._model}
            if reason:
                labels["reason"] = reason
            metric = self._metrics[key] = family.Metric(labels=labels)
        metric.increment(value)


def python_model(load: Callable[[LoadContext], Step]) -> type:
    """A `TritonPythonModel` class running the step that `load` builds (see the module doc)."""
    import triton_python_backend_utils as pb_utils

    def to_error(error: Exception) -> Any:
        # Looked up per call: the stub attaches TritonError (and the InferenceResponse machinery)
        # to the module only after model.py has been imported, so it is absent at class creation.
        error_type = pb_utils.TritonError
        invalid_arg = getattr(error_type, "INVALID_ARG", None)
        message = str(error) or type(error).__name__
        if invalid_arg is not None and isinstance(error, ValueError):
            return error_type(message, invalid_arg)
        return error_type(message)

    class TritonPythonModel:
        """A kiln processing step served by Triton's Python backend."""

        def initialize(self, args: dict) -> None:
            config = json.loads(args["model_config"])
            model_dir = Path(args["model_repository"])
            context = LoadContext(
                model_name=args["model_name"],
                model_dir=model_dir,
                version_dir=model_dir / args["model_version"],
                config=config,
                parameters=config_parameters(config),
            )
            self.input_names = [t["name"] for t in config.get("input", ())]
            self.step = load(context)
            self.metrics = _Metrics(pb_utils, context.model_name)

        def execute(self, requests: list) -> list:
            start = time.perf_counter()
            decoded = [read_inputs(r, self.input_names, pb_utils) for r in requests]
            try:
                results = self.step.run(decoded)
            except Exception as error:  # the step itself failed: every request of the batch
                failure = RuntimeError(f"step failed on a batch of {len(requests)}: {error}")
                failure.__cause__ = error
                results = [failure] * len(requests)
            responses = []
            for result in results:
                if isinstance(result, Exception):
                    self.metrics.add("kiln_step_failures_total", 1, failure_reason(result))
                    responses.append(pb_utils.InferenceResponse(error=to_error(result)))
                else:
                    tensors = [pb_utils.Tensor(name, array) for name, array in result.items()]
                    responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            self.metrics.add("kiln_step_requests_total", len(requests))
            self.metrics.add("kiln_step_batches_total", 1)
            self.metrics.add("kiln_step_duration_us_total", (time.perf_counter() - start) * 1e6)
            return responses

        def finalize(self) -> None:
            self.step = None

    return TritonPythonModel
