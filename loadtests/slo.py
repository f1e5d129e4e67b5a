"""The service levels every load test enforces, and the load it applies: the schema here, the
values in each model folder's `loadtest.py` (`SLOS`).

Each pipeline has two profiles:

- `full` (`make loadtest`): the service level a 2-core CPU host (no GPU) serving the committed
  repository must hold, at a load that keeps the host busy but below its knee.
- `smoke` (CI, `tests/integration/test_loadtests.py`): a few seconds of light load on a loaded CI
  box. Its latency gates are loose (a shared 2-core runner stalls for seconds), but it tolerates
  no failed request and no wrong answer: it proves the suites, the gates and the pipelines work,
  not how fast they are.

The gates (`Gates`) mean, over the measured window (after the ramp-up):

- `p95_ms`, `p99_ms`: the 95th and 99th latency percentiles, client-side, of every request
  (successful or not), in milliseconds.
- `max_failure_ratio`: failed requests (a transport or server error, or a response whose content
  check failed) over all requests.
- `min_rps`: successful requests per second.

How each shape applies them (`loadtests.shapes`): steady: all four over the steady window; step:
the knee (the step with the highest throughput whose p99 and failure ratio meet the gates) must
exist and meet p95 and min_rps; spike: the failure ratio over the whole run, p95 and p99 over the
base load before and after the spike (the service must recover); the spike's own latency is
reported, not gated. Gate values are overridden per run with `--gate NAME=VALUE` (locust) or
`--gate` in `python -m loadtests.run`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass

PROFILES = ("full", "smoke")
SHAPES = ("steady", "step", "spike")


@dataclass(frozen=True)
class Gates:
    """The service level of one pipeline (see the module docstring for what each gate means)."""

    p95_ms: float
    p99_ms: float
    max_failure_ratio: float
    min_rps: float


GATE_NAMES = tuple(f.name for f in dataclasses.fields(Gates))
GATE_LABELS = {
    "p95_ms": "p95 latency",
    "p99_ms": "p99 latency",
    "max_failure_ratio": "failure ratio",
    "min_rps": "throughput",
}
UPPER_BOUNDS = ("p95_ms", "p99_ms", "max_failure_ratio")
"""Gates the measured value must stay at or below; `min_rps` is a lower bound."""


@dataclass(frozen=True)
class Load:
    """The load a profile applies, in locust users (each a closed loop: one request in flight).

    Attributes:
        users: Users of the steady shape.
        duration_s: Length of the steady shape.
        step_users: The step shape's user counts, one step each, ascending.
        step_s: Length of one step.
        spike_users: (base, peak) users of the spike shape.
        spike_s: Lengths of its (before, spike, after) phases.
        settle_s: Seconds at the start of each phase left out of its measurement (ramp-up).
    """

    users: int
    duration_s: float
    step_users: tuple[int, ...]
    step_s: float
    spike_users: tuple[int, int]
    spike_s: tuple[float, float, float]
    settle_s: float


@dataclass(frozen=True)
class PipelineSLO:
    """A pipeline's gates and load, per profile."""

    pipeline: str
    gates: dict[str, Gates]
    load: dict[str, Load]


SMOKE_LOAD = Load(
    users=2,
    duration_s=8,
    step_users=(1, 2),
    step_s=5,
    spike_users=(1, 4),
    spike_s=(3, 3, 3),
    settle_s=1,
)
"""CI: one HTTP and one gRPC user for 8 s."""

@functools.cache
def _discover() -> tuple[dict[str, PipelineSLO], dict[str, str]]:
    from kiln import registry

    found: dict[str, PipelineSLO] = {}
    aliases: dict[str, str] = {}
    for folder in registry.folders():
        if folder.has("loadtest"):
            module = folder.module("loadtest")
            found.update(getattr(module, "SLOS", {}))
            aliases.update(getattr(module, "ALIASES", {}))
    return found, aliases


def pipelines() -> dict[str, PipelineSLO]:
    """Every load-tested pipeline: the `SLOS` of each model folder's `loadtest.py`. Read on first
    use, not at import: a folder's loadtest.py imports this module for Gates and Load."""
    return _discover()[0]


def aliases() -> dict[str, str]:
    """Served models load-tested with another pipeline's suite and service level (the `ALIASES` of
    the folders' loadtest.py: `image_classifier_int8` -> `image_classifier`)."""
    return _discover()[1]


def __getattr__(name: str) -> object:
    # `slo.PIPELINES` and `slo.ALIASES`, the names before the model folders: the same dicts.
    if name == "PIPELINES":
        return pipelines()
    if name == "ALIASES":
        return aliases()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def suite_of(model: str) -> str:
    """The load-test suite (and SLO entry) serving `model`."""
    name = aliases().get(model, model)
    if name not in pipelines():
        raise KeyError(f"no load-test suite for {model!r}; known: {', '.join(pipelines())}")
    return name


def gates(pipeline: str, profile: str, overrides: dict[str, float] | None = None) -> Gates:
    """The gates of `pipeline` (or a model it stands for) in `profile`, with `overrides` applied.

    Raises:
        KeyError: an unknown pipeline or profile, or an override naming no gate.
    """
    entry = pipelines()[suite_of(pipeline)]
    if profile not in entry.gates:
        raise KeyError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    unknown = set(overrides or {}) - set(GATE_NAMES)
    if unknown:
        raise KeyError(f"unknown gate(s) {sorted(unknown)}; gates: {', '.join(GATE_NAMES)}")
    return dataclasses.replace(entry.gates[profile], **(overrides or {}))


def load(pipeline: str, profile: str) -> Load:
    """The load `profile` applies to `pipeline` (or a model it stands for)."""
    entry = pipelines()[suite_of(pipeline)]
    if profile not in entry.load:
        raise KeyError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    return entry.load[profile]


def parse_overrides(items: Sequence[str] | None, names: Sequence[str] = GATE_NAMES) -> dict[str, float]:
    """`["p99_ms=250", "min_rps=10"]` -> {"p99_ms": 250.0, "min_rps": 10.0}; `names`: the gates
    that may be set (`Gates`' by default; the generation suite passes its own).

    Raises:
        ValueError: an item is not NAME=NUMBER, or NAME is not a gate.
    """
    overrides: dict[str, float] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in names:
            raise ValueError(
                f"--gate takes NAME=NUMBER with NAME one of {', '.join(names)}, got {item!r}"
            )
        try:
            overrides[name] = float(value)
        except ValueError:
            raise ValueError(f"--gate {name}: {value!r} is not a number") from None
    return overrides


@dataclass(frozen=True)
class Verdict:
    """One gate checked against one measurement."""

    gate: str
    limit: float
    measured: float | None
    passed: bool

    @property
    def label(self) -> str:
        """The gate's name for people ("p99 latency")."""
        return GATE_LABELS[self.gate]

    def describe(self) -> str:
        """One line: PASS/MISS, the measured value, the gate, and by how much it was missed."""
        unit = _UNITS[self.gate]
        status = "PASS" if self.passed else "MISS"
        if self.measured is None:
            return f"{status}  {self.label:<14} no measurement (no request completed in the window)"
        upper = self.gate in UPPER_BOUNDS
        relation = ("<=" if self.passed else ">") if upper else (">=" if self.passed else "<")
        text = (
            f"{status}  {self.label:<14} {_fmt(self.gate, self.measured)}{unit} {relation} gate "
            f"{_fmt(self.gate, self.limit)}{unit}"
        )
        if not self.passed:
            text += f"  ({self.shortfall()})"
        return text

    def shortfall(self) -> str:
        """By how much the gate was missed, e.g. "over by 12.5 ms (+8.3%)"."""
        if self.measured is None:
            return "no measurement"
        unit = _UNITS[self.gate]
        gap = self.measured - self.limit if self.gate in UPPER_BOUNDS else self.limit - self.measured
        word = "over" if self.gate in UPPER_BOUNDS else "under"
        relative = f" ({gap / self.limit:+.1%})" if self.limit else ""
        return f"{word} by {_fmt(self.gate, gap)}{unit}{relative}"


_UNITS = {"p95_ms": " ms", "p99_ms": " ms", "max_failure_ratio": "", "min_rps": " req/s"}


def _fmt(gate: str, value: float) -> str:
    if gate == "max_failure_ratio":
        return f"{value:.3%}"
    return f"{value:.1f}"


def check(
    gates_: Gates, measured: dict[str, float | None], only: tuple[str, ...] = GATE_NAMES
) -> list[Verdict]:
    """Each gate in `only` against `measured` (keys: the gate names; None: not measured).

    A gate with no measurement misses: a run that completed no request proves nothing.
    """
    verdicts = []
    for name in only:
        limit = getattr(gates_, name)
        value = measured.get(name)
        if value is None:
            passed = False
        elif name in UPPER_BOUNDS:
            passed = value <= limit
        else:
            passed = value >= limit
        verdicts.append(Verdict(name, limit, value, passed))
    return verdicts
