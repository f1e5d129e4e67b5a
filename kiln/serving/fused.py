"""kiln_fused's logic: a whole pipeline as one step, its steps run in order in one process.

A pipeline (`kiln.spec.EnsembleSpec`) of form "fused" is served as one Python-based model under
the pipeline's name, with the pipeline's inputs, outputs and max batch size, and one dynamic
batcher. Its config names the steps and their wiring (the parameter `steps`, the
`EnsembleStep`s as JSON: `steps_parameter`); at load, for each step, this module reads that
step model's own `config.pbtxt` from the repository and builds the step's `Step` with the step
backend's own `load` function and a `LoadContext` of the step's folder, version folder, config
and parameters: exactly what the step's own backend does when Triton loads it (so the same
parameter checks, artifacts and load errors). Nothing of a step's logic is copied here.

From a repository in object storage, Triton downloads only the fused model's own folder, so
each step's folder is fetched from the same bucket (`LoadContext.model_folder`,
`kiln.serving.remote`) and the step is loaded from that copy, with the same code.

Per dynamic batch, each step runs once over the requests still alive, fed the tensors the
wiring names (a step input the wiring leaves out, or a pipeline input a request left out, is
None, as in the step's own backend); a request a step fails leaves the pipeline there with that
step's error, and the others go on. The error's message is the one the ensemble form gives the
client: Triton's ensemble scheduler prefixes a step's error with "in ensemble '<name>', ", and so
does this module (`ENSEMBLE_PREFIX`), keeping INVALID_ARG for request errors (a `ValueError`)
and the failure's reason label.

Metrics: the adapter counts the fused model itself (`kiln_step_*{model="<pipeline>"}`); with
`step_metrics` on (the default) each step is also counted under the same families, labeled with
the step's model and the pipeline
(`kiln_step_duration_us_total{model="fraud",pipeline="fraud_scorer"}`, ...): the time each step
takes inside the fused model stays visible under the step's own name (a step's dashboard keeps
working when its pipeline turns fused; the `pipeline` label tells the two apart), and the fused
model's own series count nothing twice. They are pushed to Triton once a second from a thread,
not per batch: each increment of a Triton metric is a round trip to the server that cost about
0.1 ms here (see `StepMetrics`).
"""

from __future__ import annotations

import importlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.serving.adapter import (
    FLUSH_INTERVAL_S,
    CounterBuffer,
    Inputs,
    LoadContext,
    Outputs,
    Step,
    check_model_name,
    failure_reason,
)
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param, ParamError, config_parameters, parse_params
from kiln.serving.remote import is_copy, unknown_url_message

FUSED_PARAMS: tuple[Param, ...] = (
    Param(
        "steps", "str", "",
        "the pipeline's steps in order as JSON, each {\"model\", \"inputs\", \"outputs\"} like an "
        "EnsembleStep (written by `kiln generate`; required)",
    ),
    Param(
        "step_metrics", "bool", True,
        "also count each step's requests, batches, failures and time (kiln_step_* of the step's "
        "model, with the label pipeline)",
    ),
)

ENSEMBLE_PREFIX = "in ensemble '{name}', "
"""What Triton's ensemble scheduler puts before a step's error message; the fused form keeps it,
so a client sees the same message whichever form serves the pipeline."""
CONFIG_NAME = "config.pbtxt"
NATIVE_ONNX_PLATFORM = "onnxruntime_onnx"
ONNX_BACKEND = "kiln_onnx"


@dataclass(frozen=True)
class FusedParams:
    """kiln_fused's `parameters`, parsed (see FUSED_PARAMS)."""

    steps: str
    step_metrics: bool


@dataclass(frozen=True)
class Wiring:
    """One step of the pipeline as the config names it (an `EnsembleStep`).

    Attributes:
        model: The step's repository model.
        inputs: The step model's input name -> the pipeline tensor fed to it.
        outputs: The step model's output name -> the pipeline tensor it becomes.
    """

    model: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]


def steps_parameter(steps: Sequence[Any]) -> str:
    """The parameter `steps` of a fused model: its `EnsembleStep`s as JSON, maps sorted."""
    return json.dumps([
        {
            "model": step.model,
            "inputs": dict(sorted(step.inputs.items())),
            "outputs": dict(sorted(step.outputs.items())),
        }
        for step in steps
    ])


def parse_steps(model: str, text: str) -> tuple[Wiring, ...]:
    """The parameter `steps` read back.

    Raises:
        ModelLoadError: not a non-empty JSON list of {"model": str, "inputs": {str: str},
            "outputs": {str: str}}.
    """
    def names(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
        )

    try:
        document = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"model '{model}': parameter 'steps' is not valid JSON ({error})") from None
    if not isinstance(document, list) or not document or not all(
        isinstance(s, dict) and set(s) == {"model", "inputs", "outputs"}
        and isinstance(s["model"], str) and s["model"] and names(s["inputs"]) and names(s["outputs"])
        for s in document
    ):
        raise ModelLoadError(
            f"model '{model}': parameter 'steps' must be a non-empty JSON list of "
            '{"model": name, "inputs": {step input: tensor}, "outputs": {step output: tensor}} '
            f"(written by `kiln generate`), got {text[:200]!r}"
        )
    return tuple(Wiring(s["model"], dict(s["inputs"]), dict(s["outputs"])) for s in document)


@dataclass(frozen=True)
class Stage:
    """One step of a fused pipeline, loaded.

    Attributes:
        model: The step's repository model (the `model` label of its metrics).
        step: The step's logic, built by its backend's own `load`.
        feeds: For each input of the step's config, in order: (its name, the pipeline tensor fed
            to it, or None when the wiring leaves it out).
        produces: (step output, pipeline tensor) for each output the wiring keeps.
    """

    model: str
    step: Step
    feeds: tuple[tuple[str, str | None], ...]
    produces: tuple[tuple[str, str], ...]


class PipelineRequestError(RequestError):
    """A step refused one request's input: the step's message behind the ensemble's prefix
    (INVALID_ARG); `reason` is the step's failure reason, `step` the step's model."""

    def __init__(self, message: str, reason: str, step: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.step = step


class PipelineStepError(RuntimeError):
    """A step failed on one request for another reason than its input (INTERNAL)."""

    def __init__(self, message: str, reason: str, step: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.step = step


class StepMetrics:
    """Counts each step of a fused model under the adapter's kiln_step_* families, labeled
    `model` (the step's model) and `pipeline` (the fused model); a no-op without Triton's metrics
    API.

    An increment of a Triton custom metric is a round trip from the stub to the server (about
    0.1 ms on this project's 2-core machines; in one run of benchmarks/fused.py, 9 increments per
    batch made the fused fraud_scorer's p50 1.7 ms instead of 0.9 ms). So `record` only adds to
    counters in memory (the adapter's `CounterBuffer`), and its thread pushes what accumulated
    every `interval` seconds: the request path pays a few dictionary additions, and the per-step
    series lag by up to `interval` (failures too: unlike the fused model's own series, which the
    adapter pushes at once for a batch with a failure). `close` pushes what is left.
    """

    def __init__(self, pb_utils: Any, pipeline: str, interval: float | None = FLUSH_INTERVAL_S) -> None:
        self._pipeline = pipeline
        self._buffer = CounterBuffer(pb_utils, f"{pipeline}-steps", interval)
        self._labels: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {}

    def _labels_of(self, step: str, reason: str = "") -> tuple[tuple[str, str], ...]:
        labels = self._labels.get((step, reason))
        if labels is None:
            labels = (("model", step), ("pipeline", self._pipeline))
            if reason:
                labels = (*labels, ("reason", reason))
            self._labels[(step, reason)] = labels
        return labels

    def record(self, step: str, requests: int, failures: Sequence[Exception], seconds: float) -> None:
        """One run of `step` over `requests` requests, of which `failures` failed."""
        if not self._buffer.enabled:
            return
        labels = self._labels_of(step)
        self._buffer.add([
            ("kiln_step_requests_total", labels, requests),
            ("kiln_step_batches_total", labels, 1),
            ("kiln_step_duration_us_total", labels, seconds * 1e6),
            *(("kiln_step_failures_total", self._labels_of(step, failure_reason(f)), 1) for f in failures),
        ])

    def flush(self) -> None:
        """Pushes the counts accumulated since the last flush to Triton."""
        self._buffer.flush()

    def close(self) -> None:
        """Stops the flushing thread after a last flush."""
        self._buffer.close()


class FusedStep:
    """A pipeline as one `Step`: its stages run in order over one dynamic batch.

    Attributes:
        name: The fused model's name (the pipeline's), named in error messages.
        stages: The steps, in order.
        outputs: The pipeline's output tensors, returned per request.
        metrics: Per-step counters (`StepMetrics`), or None.
    """

    def __init__(
        self,
        name: str,
        stages: Sequence[Stage],
        outputs: Sequence[str],
        metrics: StepMetrics | None = None,
    ) -> None:
        self.name = name
        self.stages = tuple(stages)
        self.outputs = tuple(outputs)
        self.metrics = metrics
        self._prefix = ENSEMBLE_PREFIX.format(name=name)

    def _error(self, stage: Stage, error: Exception) -> Exception:
        """A step's error for one request, as the ensemble form reports it."""
        message = self._prefix + (str(error) or type(error).__name__)
        kind = PipelineRequestError if isinstance(error, ValueError) else PipelineStepError
        wrapped = kind(message, failure_reason(error), stage.model)
        wrapped.__cause__ = error
        return wrapped

    def close(self) -> None:
        """Pushes the per-step counts still held in memory (the adapter calls it at finalize)."""
        if self.metrics is not None:
            self.metrics.close()

    def run(self, requests: Sequence[Inputs]) -> list[Outputs | Exception]:
        """One result per request: the pipeline's outputs, or the error of the step that
        refused it (the other requests of the batch are answered)."""
        results: list[Outputs | Exception] = [RequestError("not run")] * len(requests)
        tensors: list[dict[str, Any]] = [dict(request) for request in requests]
        alive = list(range(len(requests)))
        for stage in self.stages:
            if not alive:
                break
            batch = [
                {name: tensors[i].get(source) if source else None for name, source in stage.feeds}
                for i in alive
            ]
            start = time.perf_counter()
            try:
                answers = stage.step.run(batch)
                if len(answers) != len(batch):
                    raise RuntimeError(f"it returned {len(answers)} results for {len(batch)} requests")
            except Exception as error:  # the step itself failed: every request it was given
                failure = RuntimeError(f"step failed on a batch of {len(batch)}: {error}")
                failure.__cause__ = error
                answers = [failure] * len(batch)
            seconds = time.perf_counter() - start
            still: list[int] = []
            failures: list[Exception] = []
            for index, answer in zip(alive, answers, strict=True):
                if not isinstance(answer, Exception):
                    try:
                        for output, tensor in stage.produces:
                            tensors[index][tensor] = answer[output]
                    except KeyError as missing:
                        answer = RuntimeError(f"step '{stage.model}' returned no output {missing}")
                if isinstance(answer, Exception):
                    failures.append(answer)
                    results[index] = self._error(stage, answer)
                else:
                    still.append(index)
            if self.metrics is not None:
                self.metrics.record(stage.model, len(batch), failures, seconds)
            alive = still
        for index in alive:
            results[index] = {name: tensors[index][name] for name in self.outputs}
        return results


# -- loading ----------------------------------------------------------------------------------


def step_loader(backend: str, *, for_model: str, step: str) -> Callable[[LoadContext], Step]:
    """The `load` function of a kiln backend (the module `kiln.spec.BACKEND_PARAMS` names for it).

    Raises:
        ModelLoadError: the backend is not a kiln backend a fused model can run.
    """
    from kiln.spec import BACKEND_PARAMS, FUSED_BACKEND

    where = BACKEND_PARAMS.get(backend)
    if where is None or backend == FUSED_BACKEND:
        fusable = ", ".join(sorted(b for b in BACKEND_PARAMS if b != FUSED_BACKEND))
        raise ModelLoadError(
            f"model '{for_model}': step '{step}' has backend {backend!r}; a fused pipeline runs only "
            f"steps of the kiln backends {fusable}"
        )
    return importlib.import_module(where.split(":")[0]).load


def read_step_config(repository: Path, step: str, *, for_model: str) -> tuple[dict[str, Any], Path]:
    """A step model's config (as Triton hands it to a Python backend: the config.pbtxt message as
    JSON) and the version folder Triton would load for it (the highest one its version policy
    serves).

    Raises:
        ModelLoadError: the step's folder, config or version folder is missing or unreadable.
    """
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    folder = Path(repository) / step
    path = folder / CONFIG_NAME
    try:
        message = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except FileNotFoundError:
        raise ModelLoadError(
            f"model '{for_model}': step '{step}' has no {path}; a fused pipeline loads its steps "
            "from their own folders (run `kiln generate`)"
        ) from None
    except (OSError, text_format.ParseError) as error:
        raise ModelLoadError(f"model '{for_model}': step '{step}': cannot read {path}: {error}") from error
    config = json_format.MessageToDict(message, preserving_proto_field_name=True)
    versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    policy = config.get("version_policy") or {}
    if "specific" in policy:
        allowed = {int(v) for v in policy["specific"].get("versions", ())}
        versions = [v for v in versions if v in allowed]
    if not versions:
        raise ModelLoadError(f"model '{for_model}': step '{step}' has no version folder under {folder}")
    return config, folder / str(versions[-1])


def step_backend(config: Mapping[str, Any]) -> tuple[str, dict[str, str]]:
    """The kiln backend and parameters that serve a step config.

    A config of `kiln generate --target ngc` names the native ONNX Runtime platform instead of
    kiln_onnx for an ONNX model (and NGC's own keys for the thread counts); the fused model still
    runs such a step with kiln_onnx's code, with the parameters translated back.
    """
    parameters = config_parameters(config)
    if not config.get("backend") and config.get("platform") == NATIVE_ONNX_PLATFORM:
        from kiln.repository import _NGC_ONNX_PARAMS

        native = {v: k for k, v in _NGC_ONNX_PARAMS.items()}
        kiln = {native[k]: v for k, v in parameters.items() if k in native}
        kiln["model_filename"] = str(config.get("default_model_filename") or "model.onnx")
        return ONNX_BACKEND, kiln
    return str(config.get("backend", "")), parameters


def _names(tensors: Any) -> list[str]:
    return [t["name"] for t in tensors or ()]


def load_stage(
    context: LoadContext, wiring: Wiring, available: set[str]
) -> Stage:
    """Loads one step as its own backend would, and checks its wiring against its config and the
    tensors `available` so far."""
    name = context.model_name
    try:
        folder = context.model_folder(wiring.model)  # a sibling folder, or fetched from the bucket
    except ValueError as error:
        raise ModelLoadError(str(error)) from None
    if context.remote is None and is_copy(context.model_dir, name) and not (folder / CONFIG_NAME).is_file():
        raise ModelLoadError(unknown_url_message(context.model_dir, name))
    config, version_dir = read_step_config(folder.parent, wiring.model, for_model=name)
    backend, parameters = step_backend(config)
    loader = step_loader(backend, for_model=name, step=wiring.model)
    inputs, outputs = _names(config.get("input")), _names(config.get("output"))
    for role, mapped, declared in (("input", wiring.inputs, inputs), ("output", wiring.outputs, outputs)):
        unknown = sorted(set(mapped) - set(declared))
        if unknown:
            raise ModelLoadError(
                f"model '{name}': step '{wiring.model}' has no {role}(s) {unknown} (its {role}s: "
                f"{', '.join(declared)})"
            )
    unfed = sorted(t for t in wiring.inputs.values() if t not in available)
    if unfed:
        raise ModelLoadError(
            f"model '{name}': step '{wiring.model}' is fed {unfed}, which are neither inputs of "
            "the pipeline nor outputs of an earlier step"
        )
    step_context = LoadContext(
        model_name=wiring.model,
        model_dir=folder,
        version_dir=version_dir,
        config=config,
        parameters=parameters,
        remote=context.remote,
    )
    try:
        step = loader(step_context)
    except (ModelLoadError, ParamError, FileNotFoundError, ValueError) as error:
        raise ModelLoadError(f"model '{name}': step '{wiring.model}' cannot load: {error}") from error
    return Stage(
        model=wiring.model,
        step=step,
        feeds=tuple((i, wiring.inputs.get(i)) for i in inputs),
        produces=tuple(wiring.outputs.items()),
    )


def _triton_metrics(model: str) -> StepMetrics | None:
    """Per-step counters inside Triton's Python backend stub; None elsewhere (unit tests)."""
    try:
        import triton_python_backend_utils as pb_utils  # type: ignore[import-not-found]
    except ImportError:
        return None
    return StepMetrics(pb_utils, model)


def load(context: LoadContext) -> FusedStep:
    """Builds the fused pipeline from its config: each step from its own folder, in order.

    Raises:
        ParamError: a parameter is unknown or not allowed.
        ModelLoadError: `steps` is malformed, a step's config or version folder is missing, a
            step is not a kiln backend, its wiring does not fit its config, a step fails to load
            (its own message, behind the fused model's and the step's names), or a pipeline output
            is produced by no step.
    """
    name = context.model_name
    params = parse_params(name, context.parameters, FUSED_PARAMS, FusedParams)
    wirings = parse_steps(name, params.steps)
    if int(context.config.get("max_batch_size", 0)) < 1:
        raise ModelLoadError(f"model '{name}': kiln_fused needs max_batch_size >= 1")
    available = set(_names(context.config.get("input")))
    if context.remote is not None:  # every step's folder from the bucket, in one go
        try:
            for wiring in wirings:
                check_model_name(wiring.model, name)
        except ValueError as error:
            raise ModelLoadError(str(error)) from None
        context.remote.prefetch([w.model for w in wirings], for_model=name)
    stages = []
    for wiring in wirings:
        stages.append(load_stage(context, wiring, available))
        available |= set(wiring.outputs.values())
    outputs = _names(context.config.get("output"))
    unmade = [o for o in outputs if o not in available]
    if unmade:
        raise ModelLoadError(f"model '{name}': output(s) {unmade} are produced by no step")
    metrics = _triton_metrics(name) if params.step_metrics else None
    return FusedStep(name, stages, outputs, metrics)
