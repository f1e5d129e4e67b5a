"""The benchmark's floor: what this tritonserver does for a Python-based model that does nothing.

`identity` is a bare Python-based model (Triton's own `python` backend, no kiln code) that copies
one FP32 [16] input `x` to its output `y`, under a dynamic batcher like a fused pipeline's. Every
kiln figure is also reported as a ratio to this model's, measured in the same run, with the same
generator at the same concurrency or rate (issue 13): absolute times on a shared 2-core machine
are not stable, ratios to the floor measured side by side are.

- `write(repository)`: adds the model to a (variant) repository: `identity/config.pbtxt` and
  `identity/1/model.py`; the python backend is in every backend directory `kiln.server` assembles.
- `corpus()` / `Checker`: the floor's request mix and answer check for `benchmarks.loadgen` (every
  answer must equal the request), so the Python generator drives it exactly like a pipeline.
- `input_file(path)`: perf_analyzer's `--input-data` for it.
- `ratio(value, floor)` and `judge(ratio, limit, at_most)`: a figure against the floor's and the
  verdict of a ratio target (PASS/MISS, and by how much when missed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import perf
from loadtests.inputs import Corpus, Item

IDENTITY = "identity"
"""The floor model's name in the repository."""
IDENTITY_FEATURES = 16
IDENTITY_INPUT = "x"
IDENTITY_OUTPUT = "y"
IDENTITY_MAX_BATCH = 256
IDENTITY_MODEL_PY = f'''"""The benchmark's floor: one FP32 input copied to one output, nothing else."""

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(
                        "{IDENTITY_OUTPUT}",
                        pb_utils.get_input_tensor_by_name(r, "{IDENTITY_INPUT}").as_numpy(),
                    )
                ]
            )
            for r in requests
        ]
'''
IDENTITY_CONFIG = f'''name: "{IDENTITY}"
backend: "python"
max_batch_size: {IDENTITY_MAX_BATCH}
input {{ name: "{IDENTITY_INPUT}" data_type: TYPE_FP32 dims: {IDENTITY_FEATURES} }}
output {{ name: "{IDENTITY_OUTPUT}" data_type: TYPE_FP32 dims: {IDENTITY_FEATURES} }}
instance_group {{ kind: KIND_CPU count: 1 }}
dynamic_batching {{ }}
'''


def write(repository: Path) -> Path:
    """Adds the identity model to `repository` (its config and `1/model.py`); returns its folder.

    Raises:
        FileExistsError: the repository already has a model named `identity`.
    """
    folder = Path(repository) / IDENTITY
    if folder.exists():
        raise FileExistsError(f"{folder} exists: the repository already has a model named {IDENTITY!r}")
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(IDENTITY_CONFIG)
    (folder / "1" / "model.py").write_text(IDENTITY_MODEL_PY)
    return folder


def request() -> dict[str, np.ndarray]:
    """The floor's one request: a batch-1 FP32 row (not zeros, so a copy that drops data shows)."""
    return {IDENTITY_INPUT: np.arange(IDENTITY_FEATURES, dtype=np.float32).reshape(1, IDENTITY_FEATURES)}


def corpus() -> Corpus:
    """The floor's request mix for `benchmarks.loadgen`: one request, its answer expected equal."""
    inputs = request()
    expected = {IDENTITY_OUTPUT: inputs[IDENTITY_INPUT]}
    item = Item(f"{IDENTITY} x[1,{IDENTITY_FEATURES}] FP32", inputs, expected)
    return Corpus(IDENTITY, [item], reference="the request itself (identity)")


class Checker:
    """Checks an identity answer: `y` equals the request's `x` (a `loadtests.checks.Checker` twin)."""

    def check(self, item: Item, outputs: Mapping[str, np.ndarray]) -> None:
        """Raises AssertionError naming the model when the answer differs from the request."""
        got = outputs.get(IDENTITY_OUTPUT)
        sent = item.inputs[IDENTITY_INPUT]
        if got is None or got.shape != sent.shape or not np.array_equal(got, sent):
            raise AssertionError(
                f"{IDENTITY}: output {IDENTITY_OUTPUT!r} is not the input {IDENTITY_INPUT!r} "
                f"(got {None if got is None else got.tolist()}, sent {sent.tolist()})"
            )


def input_file(path: Path) -> Path:
    """perf_analyzer's `--input-data` JSON for the floor (the one request)."""
    return perf.input_file([request()], path)


def ratio(value: float | None, floor: float | None) -> float | None:
    """`value / floor`; None when either figure is missing or the floor is not positive."""
    if value is None or floor is None or floor <= 0:
        return None
    return value / floor


@dataclass(frozen=True)
class Verdict:
    """A ratio target's outcome.

    Attributes:
        ratio: The measured ratio (None: no figure).
        limit: The target's bound.
        at_most: True for "ratio <= limit" (latency against the floor), False for ">= limit".
    """

    ratio: float | None
    limit: float
    at_most: bool

    @property
    def passed(self) -> bool | None:
        """True (PASS), False (MISS), None (no figure: not judged)."""
        if self.ratio is None:
            return None
        return self.ratio <= self.limit if self.at_most else self.ratio >= self.limit

    @property
    def shortfall(self) -> float | None:
        """How far a miss is from the bound, as a share of the bound (0.25: 25% past it)."""
        if self.passed is not False or self.ratio is None:
            return None
        return abs(self.ratio - self.limit) / self.limit

    def describe(self) -> str:
        """One line: "1.32x <= 1.5x: PASS", "1.92x > 1.5x: MISS by 28%", or that there is no figure."""
        sign = "<=" if self.at_most else ">="
        if self.ratio is None:
            return f"no figure (target {sign} {self.limit:g}x)"
        if self.passed:
            return f"{self.ratio:.2f}x {sign} {self.limit:g}x: PASS"
        missed = ">" if self.at_most else "<"
        return f"{self.ratio:.2f}x {missed} {self.limit:g}x: MISS by {self.shortfall:.0%}"


def judge(value: float | None, limit: float, at_most: bool = False) -> Verdict:
    """The verdict of ratio `value` against `limit` (`at_most`: the ratio must not exceed it).

    Raises:
        ValueError: `limit` is not positive.
    """
    if limit <= 0:
        raise ValueError(f"a ratio target's limit must be > 0, got {limit!r}")
    return Verdict(value, limit, at_most)
