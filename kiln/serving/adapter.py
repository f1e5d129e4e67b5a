"""The one bridge between kiln's processing steps and Triton's Python backend.

Every kiln backend is a `Step` (`kiln_onnx` too: `kiln.serving.onnx.OnnxStep`): plain Python over
numpy arrays, testable without Triton. A backend's `model.py` is then one line,
`TritonPythonModel = python_model(load)`, where `load` builds the step from a `LoadContext`. The
adapter

- reads each request's inputs by the names in the model config (an absent optional input is None),
- hands the whole dynamic batch to the step in one call (so a step can vectorize across requests),
- turns each per-request exception into that request's error (a `ValueError`, `RequestError`
  included, is INVALID_ARG; anything else INTERNAL), so one bad request never fails its batch,
- and keeps Triton custom metrics per model: requests, batches, failures by reason, and the time
  spent in the step (see METRICS), served on Triton's /metrics beside its own. They are counted
  in memory and pushed by a thread within `FLUSH_INTERVAL_S` (a push is a round trip to the
  server, as costly as a good part of the step itself), and at once for a batch with a failed
  request (see `StepCounters`).

A model Triton loaded from a repository in object storage gets only its own folder (a temporary
copy), so what a step reads from other models' folders (`LoadContext.artifact`, `model_folder`,
`find_artifact`) is fetched from the same bucket there (`kiln.serving.remote`).

`triton_python_backend_utils` exists only inside the backend stub, so it is imported when a
model class is made, never at import time.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln.serving.params import config_parameters
from kiln.serving.remote import (
    RemoteRepository,
    fetch_model,
    is_copy,
    own_copy,
    remote_repository,
    repository_url,
    unknown_url_message,
)

Inputs = dict[str, "np.ndarray | None"]
Outputs = dict[str, np.ndarray]

METRICS = {
    "kiln_step_requests_total": "Requests a kiln processing step received",
    "kiln_step_failures_total": "Requests a kiln processing step answered with an error, by reason",
    "kiln_step_duration_us_total": "Microseconds a kiln processing step spent executing batches",
    "kiln_step_batches_total": "Batches (execute calls) a kiln processing step ran",
}
"""Custom metric families (all counters, labeled by model; failures also by reason). Time per
request is duration / requests; rate() them in Prometheus. They lag by up to `FLUSH_INTERVAL_S`
(see `CounterBuffer`)."""

_VERSION = re.compile(r"^[0-9]+$")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


class Step(Protocol):
    """A processing step: one call per dynamic batch, one result per request, in order. A step
    that holds something to release (a fused pipeline's per-step counters) may also have a
    `close()`, which the adapter calls at finalize."""

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
        model_dir: `<repository>/<model>`, where config.pbtxt and the spec's `files` live; for a
            model Triton loaded from object storage, Triton's temporary copy of that folder.
        version_dir: `<model_dir>/<version>` being loaded.
        config: The model config as Triton passes it (parsed JSON).
        parameters: The config's `parameters` as str -> str.
        remote: The repository in object storage the model came from (`kiln.serving.remote`):
            other models' folders are fetched from there, since Triton puts none beside the
            copy. None for a local repository (they are sibling folders).
    """

    model_name: str
    model_dir: Path
    version_dir: Path
    config: Mapping[str, Any]
    parameters: Mapping[str, str]
    remote: RemoteRepository | None = None

    @property
    def repository(self) -> Path:
        """The model repository holding this model (for a remote one: the folder holding the
        local copies; use `model_folder` for another model's folder)."""
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

    def model_folder(self, model: str) -> Path:
        """Another repository model's folder: its sibling folder in a local repository, or
        fetched from the bucket the model was loaded from (`remote`).

        Raises:
            ValueError: `model` is not one path segment.
            RemoteFetchError: it cannot be fetched (the message names the URL and the object).
        """
        check_model_name(model, self.model_name)
        if self.remote is not None:
            return self.remote.model_folder(model, for_model=self.model_name)
        return self.repository / model

    def artifact(self, model: str, name: str) -> Path:
        """`name` in the newest version folder of another repository model (e.g. the tokenizer
        the build published beside text_encoder); see `find_artifact`."""
        _check_file_name(name, self.model_name)
        folder = self.model_folder(model)
        source = f"{self.remote.url.rstrip('/')}/{model}/" if self.remote is not None else None
        hint = unknown_url_message(self.model_dir, self.model_name) if (
            self.remote is None and is_copy(self.model_dir, self.model_name)
        ) else None
        return _newest_artifact(folder, model, name, for_model=self.model_name, source=source, hint=hint)


def check_model_name(model: str, for_model: str) -> None:
    """ValueError unless `model` is one path segment (nothing outside the repository)."""
    if not _MODEL_NAME.match(model) or model in (".", ".."):
        raise ValueError(f"model '{for_model}': {model!r} is not a model name")


def _check_file_name(name: str, for_model: str) -> None:
    if not _MODEL_NAME.match(name):
        raise ValueError(f"model '{for_model}': {name!r} is not a file name (one path segment)")


def find_artifact(repository: Path, model: str, name: str, *, for_model: str) -> Path:
    """`name` in the newest version folder of `model` in `repository` that holds it: where a
    step finds what the build published beside another model. The model name must be one path
    segment, so nothing outside the repository can be reached.

    A model Triton loaded from object storage sits alone in a temporary folder (its parent is
    what a stub takes for `repository`), so when the asking model was loaded from such a copy
    (the stub's own folder, `kiln.serving.remote.own_copy`, is not named after it; outside a
    stub: `repository` holds no folder of `for_model`) and the repository URL is known
    (`kiln.serving.remote.repository_url`), `model`'s folder is fetched from that URL instead.
    A local repository holds the asking model's folder under its name and never takes that path.

    Args:
        repository: The model repository.
        model: The model whose version folders hold the file.
        name: The file's name (one path segment).
        for_model: The model asking (named in the messages).

    Raises:
        ValueError: `model` or `name` is not one path segment.
        FileNotFoundError: no version folder holds the file (the message says to build).
        RemoteFetchError: the model's folder cannot be fetched from the bucket.
    """
    check_model_name(model, for_model)
    _check_file_name(name, for_model)
    folder, source, hint = Path(repository) / model, None, None
    own = own_copy(Path(repository))  # in a stub: the folder Triton loaded for_model from
    copied = is_copy(own, for_model) if own is not None else not (Path(repository) / for_model).is_dir()
    if copied:
        url = repository_url()
        if url:
            folder = fetch_model(url, model, for_model=for_model, home=own)
            source = f"{url.rstrip('/')}/{model}/"
        else:
            hint = unknown_url_message(Path(repository), for_model)
    return _newest_artifact(folder, model, name, for_model=for_model, source=source, hint=hint)


def _newest_artifact(
    folder: Path, model: str, name: str, *, for_model: str, source: str | None, hint: str | None
) -> Path:
    """`folder/<newest version holding name>/name`; FileNotFoundError naming where it looked
    (`source`: the URL the folder was fetched from) and, with `hint`, why that may be."""
    versions = sorted(
        (int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name))
        if folder.is_dir() else ()
    )
    for version in reversed(versions):
        path = folder / str(version) / name
        if path.is_file():
            return path
    if source is not None:
        raise FileNotFoundError(
            f"model '{for_model}': {name!r} of model '{model}' is in no version folder of {source} "
            "(the build publishes it: run `make build-engines`, then `kiln publish` again)"
        )
    raise FileNotFoundError(
        f"model '{for_model}': {name!r} of model '{model}' not found under {folder} "
        "(the build publishes it: run `make build-engines`)" + (f"; {hint}" if hint else "")
    )


def read_inputs(request: Any, names: Sequence[str], pb_utils: Any) -> Inputs:
    """One request's input arrays by name (None where the request left an input out)."""
    inputs: Inputs = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        inputs[name] = None if tensor is None else tensor.as_numpy()
    return inputs


FLUSH_INTERVAL_S = 1.0
"""How often counts held in memory are pushed to Triton (see `CounterBuffer`)."""


class CounterBuffer:
    """Triton custom counters (the METRICS families), added to in memory and pushed to Triton by
    a daemon thread every `interval` seconds, or at once by `flush`; a no-op where the stub has
    no metrics API.

    Why: each increment of a Triton custom metric is a round trip from the stub process to the
    server (about 0.1 ms on this project's 2-core machines; benchmarks/fused.py and
    docs/performance.md). Four increments per batch made a kiln step cost about 0.3 ms more than
    the identity floor at concurrency 1. Here a batch costs a few dictionary additions under a
    lock; the thread pushes each series' sum once per interval, so the series on /metrics lag by
    up to `interval`, and `close` pushes what is left (nothing is lost at finalize).

    Counts are keyed by (family, labels); labels are (name, value) pairs, in a fixed order.
    """

    def __init__(self, pb_utils: Any, name: str, interval: float | None = FLUSH_INTERVAL_S) -> None:
        self._families: dict[str, Any] = {}
        self._metrics: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        self._pending: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._lock = threading.Lock()  # guards _pending (the request path and the thread)
        self._push_lock = threading.Lock()  # one push at a time: the thread and a direct flush
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        family_type = getattr(pb_utils, "MetricFamily", None)
        if family_type is None:
            return
        for family, description in METRICS.items():
            self._families[family] = family_type(
                name=family, description=description, kind=family_type.COUNTER
            )
        if interval is not None:
            self._thread = threading.Thread(
                target=self._loop, args=(interval,), name=f"kiln-metrics-{name}", daemon=True
            )
            self._thread.start()

    @property
    def enabled(self) -> bool:
        """Whether the stub has Triton's metrics API (otherwise nothing is counted)."""
        return bool(self._families)

    def add(self, counts: Sequence[tuple[str, tuple[tuple[str, str], ...], float]]) -> None:
        """Adds (family, labels, value) counts in memory; nothing is sent to Triton here."""
        if not self._families:
            return
        with self._lock:
            pending = self._pending
            for family, labels, value in counts:
                key = (family, labels)
                pending[key] = pending.get(key, 0.0) + value

    def flush(self) -> None:
        """Pushes the counts added since the last push to Triton (one increment per series)."""
        with self._push_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            for key, value in pending.items():
                if value <= 0:
                    continue
                metric = self._metrics.get(key)
                if metric is None:
                    family, labels = key
                    metric = self._metrics[key] = self._families[family].Metric(labels=dict(labels))
                metric.increment(value)

    def close(self) -> None:
        """Stops the thread, then pushes what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        self.flush()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.flush()
            except Exception:  # metrics never take the model down (that push's counts are lost)
                continue


class StepCounters:
    """The kiln_step_* counts of one served model (labels: model; failures also reason).

    A batch's counts go into a `CounterBuffer` (pushed within `FLUSH_INTERVAL_S`), except that a
    batch with a failed request is pushed at once, before its responses leave: failures are rare,
    and an operator (or a test) who sees a request fail finds it, and every count before it, on
    /metrics. The success path never waits for Triton.
    """

    def __init__(self, buffer: CounterBuffer, model: str) -> None:
        self.buffer = buffer
        self._labels = (("model", model),)
        self._failure_labels: dict[str, tuple[tuple[str, str], ...]] = {}

    def batch(self, requests: int, failures: Sequence[Exception], seconds: float) -> None:
        """One execute over `requests` requests, of which `failures` failed, taking `seconds`."""
        if not self.buffer.enabled:
            return
        labels = self._labels
        counts = [
            ("kiln_step_requests_total", labels, requests),
            ("kiln_step_batches_total", labels, 1),
            ("kiln_step_duration_us_total", labels, seconds * 1e6),
        ]
        for failure in failures:
            reason = failure_reason(failure)
            failure_labels = self._failure_labels.get(reason)
            if failure_labels is None:
                failure_labels = self._failure_labels[reason] = (*labels, ("reason", reason))
            counts.append(("kiln_step_failures_total", failure_labels, 1))
        self.buffer.add(counts)
        if failures:
            with contextlib.suppress(Exception):  # metrics never fail a batch (that push is lost)
                self.buffer.flush()

    def close(self) -> None:
        """Pushes what is left and stops the thread (at finalize)."""
        self.buffer.close()


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
                remote=remote_repository(model_dir, args["model_name"]),
            )
            self.input_names = [t["name"] for t in config.get("input", ())]
            self.step = load(context)
            self.metrics = StepCounters(CounterBuffer(pb_utils, context.model_name), context.model_name)

        def execute(self, requests: list) -> list:
            start = time.perf_counter()
            names = self.input_names
            decoded = [read_inputs(r, names, pb_utils) for r in requests]
            try:
                results = self.step.run(decoded)
            except Exception as error:  # the step itself failed: every request of the batch
                failure = RuntimeError(f"step failed on a batch of {len(requests)}: {error}")
                failure.__cause__ = error
                results = [failure] * len(requests)
            response_type, tensor_type = pb_utils.InferenceResponse, pb_utils.Tensor
            responses = []
            failures: list[Exception] = []
            for result in results:
                if isinstance(result, Exception):
                    failures.append(result)
                    responses.append(response_type(error=to_error(result)))
                else:
                    tensors = [tensor_type(name, array) for name, array in result.items()]
                    responses.append(response_type(output_tensors=tensors))
            self.metrics.batch(len(requests), failures, time.perf_counter() - start)
            return responses

        def finalize(self) -> None:
            # The counts still held in memory reach Triton: the step's own (a fused pipeline's
            # per-step counters), then the model's.
            close = getattr(getattr(self, "step", None), "close", None)
            if callable(close):
                close()
            metrics = getattr(self, "metrics", None)
            if metrics is not None:
                metrics.close()
            self.step = None

    return TritonPythonModel
