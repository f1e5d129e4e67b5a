"""Source stage of `fraud`: an MLP scoring card transactions, trained on a SYNTHETIC data set.

There is no real transaction data here, and none is downloaded: the data set is generated at
build time, seeded, by scikit-learn's `make_classification` (an imbalanced two-class problem with
informative, redundant and pure-noise columns, clustered classes and a little label noise), and
then given plausible raw scales (an "amount" that is log-normal, an "hour" of day in [0, 24), ...)
so that standardization matters, as it does for real tabular data. Nothing learned from it says
anything about real fraud; it is a stand-in workload with the shape of one.

Features, in the order of the model's input (`feature_names`): the first `NAMED_COLUMNS` (as many
as `source.features` asks for), then anonymised columns "v1", "v2", ... (as in public card-fraud
data sets, whose columns are PCA components). These names are the JSON record keys a tabular
preprocessing backend accepts.

The served model takes STANDARDIZED features (`kiln.tensors.FRAUD_FEATURES`):
`(raw - mean) / std` per feature, with the mean and the (population) standard deviation of the
TRAINING split only. Those statistics are written at build time to `features.json`
(`extra_files`), which the pipeline publishes beside the model; a client or preprocessing step
applies them to raw records (`FeatureStats.standardize`).

The model is an MLP (Linear/ReLU per hidden size, a Linear to one logit, and a Sigmoid), so its
output is the fraud probability (`kiln.tensors.FRAUD_PROBABILITY`, FP32 [batch, 1]). It is
trained with Adam on BCE-with-logits, positives weighted by the negative/positive ratio of the
training split; the output bias is then shifted back by log(weight), which undoes the prior shift
that weighting causes, so the probabilities stay close to calibrated (ROC-AUC is unaffected: the
shift is monotone). Training is deterministic for a seed on one CPU, as in `kiln.models.digits.build`.

The decision threshold is derived here too, never written into the spec: `derived` scores the
held-out split with the trained model and publishes `decision.json` (`choose_threshold`: the
highest threshold on the source's `threshold_step` grid whose held-out recall is at least its
`min_recall`), which kiln_threshold reads. Trained weights differ in the last digits between CPUs
(oneDNN picks other kernels), so a threshold chosen once on one machine need not keep its recall on
another; the rule does.

The stage interface the pipeline uses (see `kiln.build.pipeline.SourceStage`): `train`,
`save_checkpoint`, `held_out`, and the optional `extra_files` and `derived`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.special import ndtr
from sklearn.datasets import make_classification
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from torch import nn

from kiln.build.check import HeldOut
from kiln.build.publish import atomic_path, load_state_dict, save_state_dict
from kiln.build.training import seeded
from kiln.serving.threshold import DECISION_FILE, DecisionThreshold
from kiln.spec import ModelSpec

from .spec import FraudMLPSource

METRIC = "ROC-AUC"
FEATURES_FILE = "features.json"
"""The standardization statistics, published beside the model (see `extra_files`)."""
FEATURES_FORMAT = 1
"""Bumped when the layout of `features.json` changes."""

# The synthetic data set (make_classification). Shares are of `source.features`.
INFORMATIVE_SHARE = 0.5
"""Columns that carry the class signal."""
MIN_INFORMATIVE = 3
"""At least this many informative columns (when there are that many features): room for the
clusters below (make_classification needs 2**informative >= classes * clusters per class)."""
REDUNDANT_SHARE = 0.25
"""Random linear combinations of the informative columns; the rest are pure noise."""
CLUSTERS_PER_CLASS = 4
"""Several fraud patterns and several kinds of normal behaviour: far from linearly separable (a
logistic regression reaches about 0.91 ROC-AUC on the spec's data set where the MLP reaches about
0.96). Fewer when too few informative columns leave no room for them."""
CLASS_SEP = 1.5
"""Distance of the class clusters (make_classification's hypercube side / 2)."""
FLIP_Y = 0.002
"""Share of labels assigned at random (label noise: caps the achievable ROC-AUC below 1). Half of
them land on the fraud class, so the realised fraud share is about
fraud_rate * (1 - FLIP_Y) + FLIP_Y / 2."""

# Raw scales of the anonymised columns "v1", "v2", ...: affine, seeded per column.
ANON_PREFIX = "v"
ANON_LOG10_SCALE = (-2.0, 3.0)
"""log10 of their standard deviations is drawn uniformly from this range."""
ANON_OFFSET_SCALES = (-3.0, 3.0)
"""Their means are drawn uniformly from this range, in units of their standard deviation."""

MIN_PER_CLASS = 2
"""A stratified split needs at least one transaction of each class on either side."""

LOGNORMAL = "lognormal"
UNIFORM = "uniform"
AFFINE = "affine"


@dataclass(frozen=True)
class RawColumn:
    """How one generated column `z` (rescaled to mean 0, variance 1) becomes a raw feature.

    Attributes:
        name: The feature's name (a JSON record key).
        kind: "lognormal": exp(location + scale*z); "uniform": location + scale*Phi(z) (Phi the
            standard normal CDF: values in [location, location + scale), uniform where z is
            normal); "affine": location + scale*z.
        location: See `kind`.
        scale: See `kind`.
    """

    name: str
    kind: str
    location: float
    scale: float

    def apply(self, z: np.ndarray) -> np.ndarray:
        """The raw feature for standardized values `z`."""
        if self.kind == LOGNORMAL:
            return np.exp(self.location + self.scale * z)
        if self.kind == UNIFORM:
            return self.location + self.scale * ndtr(z)
        if self.kind == AFFINE:
            return self.location + self.scale * z
        raise ValueError(
            f"column {self.name!r}: kind must be one of {LOGNORMAL}, {UNIFORM}, {AFFINE}, "
            f"got {self.kind!r}"
        )


NAMED_COLUMNS = (
    RawColumn("amount", LOGNORMAL, location=math.log(50.0), scale=0.8),  # around 50, long tail
    RawColumn("hour", UNIFORM, location=0.0, scale=24.0),  # hour of day
    RawColumn("account_age_days", LOGNORMAL, location=math.log(400.0), scale=0.6),
    RawColumn("distance_km", LOGNORMAL, location=math.log(10.0), scale=0.8),  # from home
    RawColumn("transactions_24h", LOGNORMAL, location=math.log(3.0), scale=0.5),
    RawColumn("merchant_risk", UNIFORM, location=0.0, scale=1.0),  # a score in [0, 1)
)
"""The first features, in order; columns beyond these are anonymised ("v1", "v2", ...)."""

TRAIN_THREADS = 1
"""PyTorch threads while training: the MLP is too small to gain from more, one thread avoids
stalls on a busy machine, and the result does not depend on the machine's core count."""

Progress = Callable[[str], None]


def _anonymous_columns(count: int, seed: int) -> tuple[RawColumn, ...]:
    rng = np.random.default_rng(seed)
    columns = []
    for k in range(1, count + 1):
        std = 10.0 ** rng.uniform(*ANON_LOG10_SCALE)
        mean = std * rng.uniform(*ANON_OFFSET_SCALES)
        columns.append(RawColumn(f"{ANON_PREFIX}{k}", AFFINE, location=mean, scale=std))
    return tuple(columns)


def raw_columns(source: FraudMLPSource) -> tuple[RawColumn, ...]:
    """The raw-scale recipe of every feature, in input order (seeded by `source.seed`)."""
    named = NAMED_COLUMNS[: source.features]
    return named + _anonymous_columns(source.features - len(named), source.seed)


def feature_names(source: FraudMLPSource) -> tuple[str, ...]:
    """The features' names in the model's input order: `NAMED_COLUMNS`, then "v1", "v2", ..."""
    return tuple(column.name for column in raw_columns(source))


def column_mix(features: int) -> tuple[int, int, int]:
    """(informative, redundant, noise) column counts for `features` columns."""
    informative = min(features, max(MIN_INFORMATIVE, round(features * INFORMATIVE_SHARE)))
    redundant = min(features - informative, round(features * REDUNDANT_SHARE))
    return informative, redundant, features - informative - redundant


def clusters_per_class(informative: int) -> int:
    """`CLUSTERS_PER_CLASS`, or fewer where `informative` columns leave no room (two classes need
    2 * clusters <= 2**informative hypercube vertices)."""
    return min(CLUSTERS_PER_CLASS, 2**informative // 2)


def make_transactions(source: FraudMLPSource) -> tuple[np.ndarray, np.ndarray]:
    """The SYNTHETIC data set: raw features float64 [samples, features], labels int64 (1 = fraud).

    Args:
        source: Gives seed, samples, features and fraud_rate.
    """
    informative, redundant, _ = column_mix(source.features)
    z, y = make_classification(
        n_samples=source.samples,
        n_features=source.features,
        n_informative=informative,
        n_redundant=redundant,
        n_repeated=0,
        n_classes=2,
        n_clusters_per_class=clusters_per_class(informative),
        weights=[1.0 - source.fraud_rate, source.fraud_rate],
        flip_y=FLIP_Y,
        class_sep=CLASS_SEP,
        shuffle=True,  # rows and columns: the informative columns land anywhere
        random_state=source.seed,
    )
    # A fixed reparametrisation that is part of generating the data (not of the model's
    # preprocessing): unit-variance columns, then each given its raw scale.
    z = (z - z.mean(axis=0)) / z.std(axis=0)
    raw = np.column_stack([c.apply(z[:, i]) for i, c in enumerate(raw_columns(source))])
    return raw, y.astype(np.int64)


@dataclass(frozen=True)
class FeatureStats:
    """The standardization the model's input expects: (raw - mean) / std, per feature.

    Attributes:
        names: Feature names, in input order.
        mean: Per-feature mean of the training split (float64).
        std: Per-feature population standard deviation of the training split (float64, > 0).
    """

    names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, names: Sequence[str], raw: np.ndarray) -> FeatureStats:
        """Statistics of `raw` (the training split) per column.

        Raises:
            ValueError: a column is constant (it cannot be standardized).
        """
        mean = raw.mean(axis=0)
        std = raw.std(axis=0)
        constant = [n for n, s in zip(names, std, strict=True) if not s > 0]
        if constant:
            raise ValueError(f"feature(s) {', '.join(constant)} are constant in the training split")
        return cls(tuple(names), mean, std)

    def standardize(self, raw: np.ndarray) -> np.ndarray:
        """Raw features [N, features] -> the model's FP32 input (computed in float64)."""
        return np.ascontiguousarray(((raw - self.mean) / self.std).astype(np.float32))

    def to_json(self) -> dict[str, Any]:
        """The `features.json` document."""
        return {
            "format": FEATURES_FORMAT,
            "standardization": "features[i] = (raw[i] - mean[i]) / std[i]",
            "features": list(self.names),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> FeatureStats:
        """Reads a `features.json` document.

        Raises:
            ValueError: an unknown format, or names, means and stds of different lengths.
        """
        if document.get("format") != FEATURES_FORMAT:
            raise ValueError(
                f"{FEATURES_FILE}: format must be {FEATURES_FORMAT}, got {document.get('format')!r}"
            )
        names = tuple(document["features"])
        mean = np.asarray(document["mean"], dtype=np.float64)
        std = np.asarray(document["std"], dtype=np.float64)
        if not len(names) == len(mean) == len(std):
            raise ValueError(
                f"{FEATURES_FILE}: {len(names)} features but {len(mean)} means and {len(std)} stds"
            )
        return cls(names, mean, std)


@dataclass(frozen=True)
class FraudSplit:
    """The seeded, stratified train/test split of the synthetic data set.

    Attributes:
        stats: Standardization statistics of the training split.
        raw_train: Raw training features, float64 [N_train, features].
        raw_test: Raw test features, float64 [N_test, features].
        x_train: Standardized training features, float32 (the model's input).
        x_test: Standardized test features, float32.
        y_train: Training labels, int64 (1 = fraud).
        y_test: Test labels, int64.
    """

    stats: FeatureStats
    raw_train: np.ndarray
    raw_test: np.ndarray
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray


def load_split(source: FraudMLPSource) -> FraudSplit:
    """Generates the data set and splits it, stratified by label, with `source.seed`; the
    standardization statistics come from the training split only."""
    raw, y = make_transactions(source)
    counts = np.bincount(y, minlength=2)
    if counts.min() < MIN_PER_CLASS:
        raise ValueError(
            f"the data set has {counts[1]} fraud and {counts[0]} normal transactions; the split "
            f"needs {MIN_PER_CLASS} of each: raise samples ({source.samples}) or fraud_rate "
            f"({source.fraud_rate})"
        )
    raw_train, raw_test, y_train, y_test = train_test_split(
        raw, y, test_size=source.test_fraction, random_state=source.seed, stratify=y
    )
    stats = FeatureStats.fit(feature_names(source), raw_train)
    return FraudSplit(
        stats=stats,
        raw_train=raw_train,
        raw_test=raw_test,
        x_train=stats.standardize(raw_train),
        x_test=stats.standardize(raw_test),
        y_train=np.ascontiguousarray(y_train),
        y_test=np.ascontiguousarray(y_test),
    )


class FraudMLP(nn.Module):
    """Standardized features FP32 [N, features] -> fraud probability FP32 [N, 1].

    Attributes:
        body: Linear/ReLU per hidden size, then a Linear to one logit.
    """

    def __init__(self, features: int, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = features
        for hidden in hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.body = nn.Sequential(*layers)

    @property
    def output_layer(self) -> nn.Linear:
        """The final Linear (its output is the logit)."""
        last = self.body[-1]
        assert isinstance(last, nn.Linear)
        return last

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The pre-sigmoid score [N, 1] (what training's loss takes)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(x))


def build_model(source: FraudMLPSource) -> FraudMLP:
    """The untrained MLP of `source` (features, hidden_sizes)."""
    return FraudMLP(source.features, source.hidden_sizes)


def predict_proba(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Fraud probabilities [N] for standardized features `x`."""
    with torch.inference_mode():
        out = model.eval()(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    return out[:, 0].numpy()


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC of `scores` for binary `labels` (1 = fraud)."""
    return float(roc_auc_score(labels, scores))


def positive_weight(labels: np.ndarray) -> float:
    """Negatives per positive: the BCE weight that balances the classes.

    Raises:
        ValueError: the labels lack one of the classes.
    """
    positives = int(np.count_nonzero(labels == 1))
    negatives = int(labels.size - positives)
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"the training split needs both classes; it has {positives} fraud and {negatives} "
            "normal transactions"
        )
    return negatives / positives


def train(
    source: FraudMLPSource,
    progress: Progress | None = None,
    split: FraudSplit | None = None,
) -> FraudMLP:
    """Trains the MLP with Adam on weighted BCE over the training split; returns it in eval mode.

    Args:
        source: Seed, hidden sizes, epochs, batch size and learning rate.
        progress: Receives one line per epoch (epoch k/N, mean weighted loss, train ROC-AUC).
        split: The split to train on; generated from `source` when None.
    """
    split = split if split is not None else load_split(source)
    x = torch.from_numpy(split.x_train)
    y = torch.from_numpy(split.y_train.astype(np.float32)).unsqueeze(1)
    weight = positive_weight(split.y_train)
    with seeded(source.seed, deterministic=True, threads=TRAIN_THREADS):
        model = build_model(source)
        shuffle = torch.Generator().manual_seed(source.seed)
        optimizer = torch.optim.Adam(model.parameters(), lr=source.learning_rate)
        loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([weight]))
        width = len(str(source.epochs))
        for epoch in range(1, source.epochs + 1):
            model.train()
            order = torch.randperm(len(x), generator=shuffle)
            total_loss = 0.0
            for start in range(0, len(x), source.batch_size):
                idx = order[start : start + source.batch_size]
                loss = loss_fn(model.logits(x[idx]), y[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total_loss += loss.item() * len(idx)
            if progress is not None:
                with torch.inference_mode():
                    scores = model.eval().logits(x)[:, 0].numpy()
                progress(
                    f"epoch {epoch:>{width}}/{source.epochs}  loss {total_loss / len(x):.4f}  "
                    f"train {METRIC} {roc_auc(split.y_train, scores):.4f}"
                )
        # Weighting positives by w trains the logit towards log(w * p / (1 - p)): subtracting
        # log(w) gives back the logit of p, so the served probability is not inflated.
        with torch.no_grad():
            model.output_layer.bias -= math.log(weight)
    return model.eval()


save_checkpoint = save_state_dict
"""SourceStage: saves the weights (state_dict), atomically."""


def _shape_of(state: Mapping[str, torch.Tensor], path: Path) -> tuple[int, tuple[int, ...]]:
    """(features, hidden_sizes) of the MLP whose state_dict is `state`."""
    weights = [v for k, v in state.items() if k.endswith(".weight") and v.ndim == 2]
    if not weights or weights[-1].shape[0] != 1:
        raise ValueError(f"{path} is not a fraud MLP checkpoint (no Linear layers ending in 1 output)")
    return int(weights[0].shape[1]), tuple(int(w.shape[0]) for w in weights[:-1])


def load_trained(spec_or_path: ModelSpec | Path | str, artifacts: Path | None = None) -> FraudMLP:
    """The trained MLP from its saved checkpoint, in eval mode.

    Args:
        spec_or_path: The model's spec (its checkpoint in the artifacts folder; the layer sizes
            must be the spec's) or a checkpoint file (the layer sizes are read from it).
        artifacts: The artifacts folder when a spec is given; `kiln.paths.artifacts_dir()` when
            None.

    Raises:
        FileNotFoundError: no checkpoint; run the build first.
        ValueError: the checkpoint is not a fraud MLP, or not of the spec's layer sizes.
    """
    path, state = load_state_dict(spec_or_path, artifacts)
    features, hidden = _shape_of(state, path)
    if isinstance(spec_or_path, ModelSpec):
        source = spec_or_path.build.source if spec_or_path.build is not None else None
        if not isinstance(source, FraudMLPSource):
            raise ValueError(f"model {spec_or_path.name!r} is not built from a FraudMLPSource")
        if (features, hidden) != (source.features, tuple(source.hidden_sizes)):
            raise ValueError(
                f"{path} holds an MLP with {features} features and hidden sizes {hidden}; the "
                f"spec asks for {source.features} and {tuple(source.hidden_sizes)}: rebuild it"
            )
    model = FraudMLP(features, hidden)
    model.load_state_dict(state)
    return model.eval()


def extra_files(
    source: FraudMLPSource, model: nn.Module | None, workdir: Path
) -> dict[str, Path]:
    """Files published beside the model: `features.json`, the input's standardization.

    Args:
        source: The data set's settings (the statistics are recomputed from its training split).
        model: The trained model (unused: the statistics depend on the data alone).
        workdir: Where to write the files.

    Returns:
        File name in the served version folder -> the written file.
    """
    stats = load_split(source).stats
    path = Path(workdir) / FEATURES_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(stats.to_json(), indent=2) + "\n")
    return {FEATURES_FILE: path}


def read_feature_stats(path: Path) -> FeatureStats:
    """Reads a `features.json` written by `extra_files`."""
    return FeatureStats.from_json(json.loads(Path(path).read_text()))


def held_out(source: FraudMLPSource) -> HeldOut:
    """The standardized test split, scored by ROC-AUC of the probability against the labels;
    calibration inputs are the first `source.calibration_size` standardized training rows.

    Raises:
        ValueError: `calibration_size` exceeds the training rows.
    """
    split = load_split(source)
    if source.calibration_size > len(split.x_train):
        raise ValueError(
            f"calibration_size {source.calibration_size} exceeds the {len(split.x_train)} training "
            f"rows (samples {source.samples}, test_fraction {source.test_fraction})"
        )
    labels = split.y_test

    def score(outputs: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
        return roc_auc(labels, np.asarray(outputs[0])[:, 0])

    return HeldOut(
        inputs=(split.x_test,),
        calibration=(split.x_train[: source.calibration_size],),
        metric=METRIC,
        score=score,
    )


@dataclass(frozen=True)
class ThresholdChoice:
    """The threshold `choose_threshold` picked, and how it decides the held-out split.

    Attributes:
        threshold: The chosen threshold (a multiple of `step`).
        min_recall: The rule's recall floor.
        step: The rule's grid.
        items: Held-out transactions scored.
        positives: Frauds among them.
        flagged: Transactions decided fraud at `threshold`.
        caught: Frauds decided fraud at `threshold`.
        next_recall: Recall one grid step higher (below `min_recall`, or None at the top of the
            grid): shows the choice is the highest that meets the rule.
    """

    threshold: float
    min_recall: float
    step: float
    items: int
    positives: int
    flagged: int
    caught: int
    next_recall: float | None

    @property
    def recall(self) -> float:
        """Share of held-out frauds flagged."""
        return self.caught / self.positives

    @property
    def precision(self) -> float:
        """Share of flagged held-out transactions that are fraud (1.0 when none is flagged)."""
        return self.caught / self.flagged if self.flagged else 1.0

    @property
    def rule(self) -> str:
        """The rule, in words."""
        return (
            f"the highest threshold on a {self.step:g} grid whose recall on the held-out split is "
            f"at least {self.min_recall:g} (decision: probability >= threshold, compared in FP32)"
        )

    def document(self, scored_by: str) -> DecisionThreshold:
        """The published decision document; `scored_by` names the model that scored the split."""
        return DecisionThreshold(
            threshold=self.threshold,
            rule=self.rule,
            evidence={
                "min_recall": self.min_recall,
                "step": self.step,
                "scored_by": scored_by,
                "held_out_items": self.items,
                "frauds": self.positives,
                "flagged": self.flagged,
                "caught": self.caught,
                "recall": round(self.recall, 6),
                "precision": round(self.precision, 6),
                "recall_one_step_higher": (
                    None if self.next_recall is None else round(self.next_recall, 6)
                ),
            },
        )


def threshold_grid(step: float) -> np.ndarray:
    """The thresholds the rule considers: step, 2*step, ... up to 1 (float64, rounded to the
    grid so that 0.21 is 0.21 and not 0.21000000000000002)."""
    count = int(math.floor(1.0 / step + 1e-9))
    decimals = max(0, -math.floor(math.log10(step))) + 2
    return np.round(np.arange(1, count + 1) * step, decimals)


def choose_threshold(
    scores: np.ndarray, labels: np.ndarray, *, min_recall: float, step: float
) -> ThresholdChoice:
    """The highest threshold on the `step` grid whose recall on (`scores`, `labels`) is at least
    `min_recall`, deciding `score >= threshold` in FP32 as kiln_threshold does.

    Args:
        scores: Fraud probabilities [N] (or [N, 1]).
        labels: Labels [N], 1 = fraud.
        min_recall: The recall floor, in (0, 1].
        step: The grid, in (0, 1).

    Raises:
        ValueError: no fraud among the labels, the shapes differ, or no threshold on the grid
            reaches `min_recall` (the message gives the best recall the grid offers).
    """
    flat = np.asarray(scores, dtype=np.float32).reshape(-1)
    truth = np.asarray(labels).reshape(-1) == 1
    if flat.shape != truth.shape:
        raise ValueError(f"{flat.size} scores but {truth.size} labels")
    positives = int(truth.sum())
    if positives == 0:
        raise ValueError("the held-out split has no fraud: no recall can be measured")
    grid = threshold_grid(step)
    fraud_scores = np.sort(flat[truth])
    all_scores = np.sort(flat)
    # >= in FP32: count the scores at or above each threshold, as float32(threshold).
    cuts = grid.astype(np.float32)
    caught = positives - np.searchsorted(fraud_scores, cuts, side="left")
    recalls = caught / positives
    meets = np.flatnonzero(recalls >= min_recall)
    if meets.size == 0:
        raise ValueError(
            f"no threshold on the {step:g} grid reaches held-out recall {min_recall:g}: the "
            f"lowest, {grid[0]:g}, catches {int(caught[0])} of {positives} frauds "
            f"(recall {recalls[0]:.4f}); lower min_recall or threshold_step"
        )
    k = int(meets[-1])  # recall falls as the threshold rises: the last that meets the floor
    flagged = int(all_scores.size - np.searchsorted(all_scores, cuts[k], side="left"))
    return ThresholdChoice(
        threshold=float(grid[k]),
        min_recall=min_recall,
        step=step,
        items=int(flat.size),
        positives=positives,
        flagged=flagged,
        caught=int(caught[k]),
        next_recall=float(recalls[k + 1]) if k + 1 < grid.size else None,
    )


SCORED_BY = "the trained FP32 PyTorch model"


def derived(
    source: FraudMLPSource, model: nn.Module | None, workdir: Path
) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Values the build derives from the trained model and publishes: `decision.json`, the
    decision threshold chosen by the source's rule on the held-out split (`choose_threshold`).

    Args:
        source: The data set's settings and the rule (`min_recall`, `threshold_step`).
        model: The trained model.
        workdir: Where to write the file.

    Returns:
        File name in the served version folder -> (the written file, its document for the
        manifest).

    Raises:
        ValueError: no model was trained, or the rule cannot be met (see `choose_threshold`).
    """
    if model is None:
        raise ValueError("the decision threshold is chosen from the trained model's scores")
    split = load_split(source)
    choice = choose_threshold(
        predict_proba(model, split.x_test), split.y_test,
        min_recall=source.min_recall, step=source.threshold_step,
    )
    document = choice.document(SCORED_BY).to_json()
    path = Path(workdir) / DECISION_FILE
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    return {DECISION_FILE: (path, document)}
