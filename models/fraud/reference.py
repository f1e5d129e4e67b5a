"""The fraud_scorer pipeline in one process, no Triton: the yardstick of its end-to-end tests.

Two in-process pipelines over the same records (JSON objects of named raw features):

- `TorchReference`: the build's own code path. Records -> raw matrix -> `FeatureStats` (the
  training split's statistics, recomputed by `kiln.models.fraud.build.load_split`, not read from the
  served file) -> the trained PyTorch MLP (`artifacts/fraud/checkpoint.pt`) -> probability ->
  decision `probability >= threshold` (compared in FP32, as served), the threshold chosen anew by
  the source's rule (`kiln.models.fraud.build.choose_threshold`) from this model's held-out scores, not
  read from the published `decision.json`. Served scores must match it to 1e-5 and decisions must
  be equal (except for a score within 1e-5 of the threshold).
- `OrtPipeline`: the served steps without Triton: kiln_tabular's parser and standardization
  (`kiln.serving.tabular`, with the published `features.json`), the served ONNX model through
  kiln_onnx's loader (`model_repository/fraud/1/model.onnx`), kiln_threshold's decision; batched
  like the server. It is the in-process baseline of issue 6's benchmark (what Triton adds).

Plus the data every consumer shares: `records()` yields realistic transactions (the synthetic
generator's held-out split) as dicts, `labels()` their labels, `threshold_report()` the
precision/recall of a threshold on the held-out split (around the threshold the build chose),
`published_threshold()` the decision document the build published.

`python -m kiln.models.fraud.reference` prints that report for a grid of thresholds.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln import paths, tensors

from . import pipeline as fraud_pipelines
from .spec import SOURCE, FraudMLPSource
from .spec import SPEC as FRAUD

SPLITS = ("test", "train")
"""`records()` takes the held-out split by default: the model never trained on it."""
REPORT_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))
"""Thresholds `python -m kiln.models.fraud.reference` reports, besides the spec's."""

Record = dict[str, float]


@functools.lru_cache(maxsize=2)
def _split(source: FraudMLPSource) -> Any:  # -> kiln.models.fraud.build.FraudSplit
    from .build import load_split

    return load_split(source)


def _rows(split: str, source: FraudMLPSource) -> tuple[np.ndarray, np.ndarray]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    data = _split(source)
    return (data.raw_test, data.y_test) if split == "test" else (data.raw_train, data.y_train)


def feature_names(source: FraudMLPSource = SOURCE) -> tuple[str, ...]:
    """The record keys, in the model's input order."""
    from .build import feature_names as names

    return names(source)


def records(
    limit: int | None = None, *, split: str = "test", source: FraudMLPSource = SOURCE
) -> Iterator[Record]:
    """Yields realistic transactions as dicts of raw features (feature name -> float).

    They come from `kiln.models.fraud.build`'s seeded synthetic generator: by default its held-out test
    split, in order (12,500 transactions for the spec's source, about 2% fraud). The floats are
    exact, so `json.dumps(record)` round-trips them.

    Args:
        limit: At most this many; None for the whole split.
        split: "test" (held out) or "train".
        source: The data set's settings (the fraud spec's by default).
    """
    raw, _ = _rows(split, source)
    names = feature_names(source)
    for row in raw[:limit]:
        yield dict(zip(names, (float(v) for v in row), strict=True))


def labels(limit: int | None = None, *, split: str = "test", source: FraudMLPSource = SOURCE) -> np.ndarray:
    """The labels (int64, 1 = fraud) of the transactions `records()` yields, in the same order."""
    _, y = _rows(split, source)
    return y[:limit].copy()


def encode(record: Mapping[str, float]) -> bytes:
    """A record as the UTF-8 JSON a RECORD item carries."""
    return json.dumps(dict(record)).encode("utf-8")


def raw_matrix(items: Sequence[Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
    """Records -> raw float64 [N, features] in `names` order.

    Raises:
        ValueError: a record misses a feature or holds one not in `names` (naming the item).
    """
    known = set(names)
    for index, record in enumerate(items):
        if set(record) != known:
            raise ValueError(
                f"record {index}: missing {sorted(known - set(record))}, "
                f"unknown {sorted(set(record) - known)}"
            )
    return np.array([[record[n] for n in names] for record in items], dtype=np.float64).reshape(
        len(items), len(names)
    )


@dataclass(frozen=True)
class Scored:
    """A pipeline's answers for N transactions, shaped as the served outputs.

    Attributes:
        scores: FP32 [N, 1], the fraud probability (`kiln.tensors.SCORE`).
        decisions: BOOL [N, 1], score >= threshold (`kiln.tensors.DECISION`).
    """

    scores: np.ndarray
    decisions: np.ndarray


def decide(scores: np.ndarray, threshold: float) -> np.ndarray:
    """score >= threshold, compared in FP32 (as kiln_threshold compares)."""
    return np.asarray(scores, dtype=np.float32) >= np.float32(threshold)


class TorchReference:
    """The fraud_scorer pipeline with the build's code and the PyTorch model (see the module doc).

    Attributes:
        stats: The build's `FeatureStats` (recomputed from the training split).
        model: The trained `FraudMLP`, in eval mode.
        threshold: The decision threshold (by default chosen by the source's rule, see `load`).
    """

    def __init__(self, stats: Any, model: Any, threshold: float) -> None:
        self.stats = stats
        self.model = model
        self.threshold = threshold

    @classmethod
    def load(cls, artifacts: Path | None = None, threshold: float | None = None) -> TorchReference:
        """The trained checkpoint of the fraud spec (from `artifacts`, default
        `kiln.paths.artifacts_dir()`) and the statistics of its source's training split.

        Args:
            artifacts: The artifacts folder.
            threshold: The decision threshold; None chooses it as the build does
                (`kiln.models.fraud.build.choose_threshold` with the source's `min_recall` and
                `threshold_step`) from this model's scores on the held-out split.

        Raises:
            FileNotFoundError: no checkpoint; run `kiln build` first.
        """
        from .build import load_trained

        source = FRAUD.build.source
        reference = cls(_split(source).stats, load_trained(FRAUD, artifacts), 0.0)
        if threshold is None:
            threshold = reference.choose_threshold().threshold
        reference.threshold = threshold
        return reference

    def choose_threshold(self, source: FraudMLPSource = SOURCE) -> Any:  # -> ThresholdChoice
        """The threshold the build's rule picks from this model's held-out scores."""
        from .build import choose_threshold

        raw, y = _rows("test", source)
        scores = self.probabilities(self.stats.standardize(raw))
        return choose_threshold(
            scores, y, min_recall=source.min_recall, step=source.threshold_step
        )

    def features(self, items: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Records -> the model's standardized FP32 input, by `FeatureStats.standardize`."""
        return self.stats.standardize(raw_matrix(items, self.stats.names))

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """Standardized features [N, features] -> FP32 [N, 1] probabilities (PyTorch, FP32)."""
        import torch

        with torch.inference_mode():
            out = self.model.eval()(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)))
        return out.numpy().astype(np.float32, copy=False)

    def score_features(self, features: np.ndarray) -> Scored:
        """Standardized features -> scores and decisions."""
        scores = self.probabilities(features)
        return Scored(scores, decide(scores, self.threshold))

    def score(self, items: Sequence[Mapping[str, float]]) -> Scored:
        """Records -> scores and decisions (what fraud_scorer answers for RECORD)."""
        return self.score_features(self.features(items))

    def score_values(self, values: np.ndarray) -> Scored:
        """Raw values [N, features] in feature order -> scores and decisions (what fraud_scorer
        answers for FEATURE_VALUES; FP32 values are widened to float64 before standardizing)."""
        return self.score_features(self.stats.standardize(np.asarray(values).astype(np.float64)))


class OrtPipeline:
    """The served steps in one process: kiln_tabular, fraud on ONNX Runtime, kiln_threshold.

    Batched like the server: `score_records` runs chunks of `max_batch_size` records, each chunk
    through the three steps once. No Triton, no network: issue 6's in-process baseline.

    Attributes:
        tabular: kiln_tabular's step (`kiln.serving.tabular.TabularStep`).
        model: kiln_onnx's model (`kiln.serving.onnx.OnnxModel`).
        threshold: kiln_threshold's step (`kiln.serving.threshold.ThresholdStep`).
        max_batch_size: Records per chunk.
    """

    def __init__(self, tabular: Any, model: Any, threshold: Any, max_batch_size: int) -> None:
        self.tabular = tabular
        self.model = model
        self.threshold = threshold
        self.max_batch_size = max_batch_size

    @classmethod
    def load(cls, repository: Path | None = None) -> OrtPipeline:
        """Loads the published model and statistics from `repository` (default: the model
        repository) with the specs' configs and parameters, through the backends' own loaders
        (so their load checks run, as in the server).

        Raises:
            ModelLoadError: the model or the statistics are not published, or do not fit.
        """
        from kiln.serving.adapter import LoadContext
        from kiln.serving.onnx import OnnxModel
        from kiln.serving.tabular import load as load_tabular
        from kiln.serving.threshold import load as load_threshold

        root = Path(repository) if repository is not None else paths.model_repository()

        def context(spec: Any) -> LoadContext:
            return LoadContext(
                model_name=spec.name,
                model_dir=root / spec.name,
                version_dir=root / spec.name / VERSION,
                config=triton_config(spec),
                parameters=dict(spec.parameters),
            )

        model = OnnxModel.load(
            FRAUD.name, root / FRAUD.name / VERSION, triton_config(FRAUD), dict(FRAUD.parameters)
        )
        return cls(
            load_tabular(context(fraud_pipelines.FEATURES_SPEC)),
            model,
            load_threshold(context(fraud_pipelines.THRESHOLD_SPEC)),
            fraud_pipelines.MAX_BATCH_SIZE,
        )

    def _run(self, request: dict[str, np.ndarray | None]) -> Scored:
        """One request through the three steps; a step's error is raised."""
        for run in (self.tabular.run, self.model.infer, self.threshold.run):
            (result,) = run([request])
            if isinstance(result, Exception):
                raise result
            request = result
        return Scored(request[tensors.SCORE], request[tensors.DECISION])  # type: ignore[arg-type]

    def score_batch(self, items: Sequence[bytes | str | Mapping[str, float]]) -> Scored:
        """One batch (1..max_batch_size records: JSON bytes, str or dicts) through the steps.

        Raises:
            ValueError: a record is malformed (kiln_tabular's message), or the batch size.
        """
        if not 1 <= len(items) <= self.max_batch_size:
            raise ValueError(f"a batch holds 1..{self.max_batch_size} records, got {len(items)}")
        data = np.empty((len(items), 1), dtype=object)
        data[:, 0] = [item if isinstance(item, (bytes, str)) else encode(item) for item in items]
        return self._run({self.tabular.records_input: data})

    def score_values(self, values: np.ndarray) -> Scored:
        """Raw FP32 values [N <= max_batch_size, features] through the steps (FEATURE_VALUES)."""
        return self._run({self.tabular.values_input: np.ascontiguousarray(values, dtype=np.float32)})

    def score_records(self, items: Sequence[bytes | str | Mapping[str, float]]) -> Scored:
        """Any number of records, in chunks of `max_batch_size`."""
        parts = [
            self.score_batch(items[start : start + self.max_batch_size])
            for start in range(0, len(items), self.max_batch_size)
        ]
        return Scored(
            np.concatenate([p.scores for p in parts]), np.concatenate([p.decisions for p in parts])
        )


VERSION = "1"
"""The version folder the build publishes into."""


def triton_config(spec: Any) -> dict[str, Any]:
    """The model config of `spec` as Triton hands it to a Python backend: the generated
    config.pbtxt's message as JSON (BYTES as TYPE_STRING, int64 dims as strings)."""
    from google.protobuf.json_format import MessageToDict

    from kiln.repository import model_config

    return MessageToDict(model_config(spec), preserving_proto_field_name=True)


@dataclass(frozen=True)
class ThresholdReport:
    """How a threshold decides a split's transactions (1 = fraud is the positive class).

    Attributes:
        threshold: The decision threshold.
        split: "test" or "train".
        items: Transactions scored.
        positives: Frauds among them.
        flagged: Transactions decided fraud.
        true_positives: Frauds decided fraud.
    """

    threshold: float
    split: str
    items: int
    positives: int
    flagged: int
    true_positives: int

    @property
    def false_positives(self) -> int:
        """Normal transactions decided fraud (false alarms)."""
        return self.flagged - self.true_positives

    @property
    def precision(self) -> float:
        """Share of flagged transactions that are fraud (1.0 when none is flagged)."""
        return self.true_positives / self.flagged if self.flagged else 1.0

    @property
    def recall(self) -> float:
        """Share of frauds flagged."""
        return self.true_positives / self.positives if self.positives else 0.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        total = self.precision + self.recall
        return 2 * self.precision * self.recall / total if total else 0.0

    def line(self) -> str:
        """One line for a table."""
        return (
            f"{self.threshold:9.2f}  {self.flagged:7d} ({self.flagged / self.items:6.2%})  "
            f"{self.true_positives:4d}/{self.positives:<4d}  {self.false_positives:5d}  "
            f"{self.precision:9.3f}  {self.recall:6.3f}  {self.f1:6.3f}"
        )


REPORT_HEADER = "threshold  flagged            frauds     false  precision  recall      F1"


def threshold_report(
    thresholds: Sequence[float],
    *,
    split: str = "test",
    reference: TorchReference | None = None,
) -> list[ThresholdReport]:
    """Precision and recall of each threshold on a split, scored by the PyTorch reference.

    Args:
        thresholds: The thresholds to report.
        split: "test" (the build's held-out split) or "train".
        reference: The pipeline scoring the split; `TorchReference.load()` when None.
    """
    reference = reference if reference is not None else TorchReference.load()
    source = FRAUD.build.source
    y = labels(split=split, source=source)
    raw, _ = _rows(split, source)
    scores = reference.probabilities(reference.stats.standardize(raw))
    fraud = y[:, None] == 1
    reports = []
    for threshold in thresholds:
        flagged = decide(scores, threshold)
        reports.append(
            ThresholdReport(
                threshold=threshold, split=split, items=len(y), positives=int(fraud.sum()),
                flagged=int(flagged.sum()), true_positives=int((flagged & fraud).sum()),
            )
        )
    return reports


def published_threshold(repository: Path | None = None) -> Any:  # -> DecisionThreshold
    """The decision document the build published beside fraud (in `repository`, default the
    model repository).

    Raises:
        FileNotFoundError: not published; run `kiln build`.
        kiln.serving.threshold.ThresholdSourceError: the file is not a decision document.
    """
    from kiln.serving.adapter import find_artifact
    from kiln.serving.threshold import DecisionThreshold

    # Found as kiln_threshold finds it: the newest version folder of fraud that holds it.
    root = Path(repository) if repository is not None else paths.model_repository()
    spec = fraud_pipelines.THRESHOLD_SPEC
    path = find_artifact(root, FRAUD.name, fraud_pipelines.DECISION_FILE, for_model=spec.name)
    return DecisionThreshold.read(path)


def main() -> None:
    """Prints the threshold report on both splits, the published threshold marked."""
    reference = TorchReference.load()
    published = published_threshold()
    chosen = published.threshold
    step = SOURCE.threshold_step
    print(f"published threshold {chosen:g}: {published.rule}")
    grid = sorted({*REPORT_GRID, chosen, round(chosen + step, 6), round(chosen - step, 6)})
    for split in SPLITS:
        print(f"{split} split, scored by {paths.artifacts_dir() / FRAUD.name} (PyTorch):")
        print(REPORT_HEADER)
        for report in threshold_report(grid, split=split, reference=reference):
            mark = "  <- published threshold" if report.threshold == chosen else ""
            print(report.line() + mark)
        print()


if __name__ == "__main__":
    main()
