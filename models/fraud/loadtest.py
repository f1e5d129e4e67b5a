"""fraud_scorer's load test: its request mix and its service levels.

The mix: transactions of the fraud model's held-out split (`reference.records`), as JSON records
(RECORD) and, for every fifth, as the raw values in the model's feature order (FEATURE_VALUES): a
request sends exactly one of the two. The reference: the PyTorch model deciding at the published
threshold.
"""

from __future__ import annotations

import numpy as np

from kiln import tensors
from loadtests.inputs import Corpus, Item, object_array
from loadtests.slo import SMOKE_LOAD, Gates, Load, PipelineSLO

FRAUD_RECORDS = 200
"""Transactions in the fraud mix (the held-out split's first, about 2% fraud)."""
VALUES_EVERY = 5
"""Every fifth fraud request sends FEATURE_VALUES instead of a RECORD."""

SLOS = {
    tensors.FRAUD_SCORER: PipelineSLO(
        tensors.FRAUD_SCORER,
        gates={
            "full": Gates(p95_ms=100, p99_ms=200, max_failure_ratio=0.001, min_rps=80),
            "smoke": Gates(p95_ms=10000, p99_ms=15000, max_failure_ratio=0.0, min_rps=1),
        },
        load={
            "full": Load(
                users=16,
                duration_s=60,
                step_users=(2, 4, 8, 16, 32, 64),
                step_s=10,
                spike_users=(8, 96),
                spike_s=(10, 10, 15),
                settle_s=3,
            ),
            "smoke": SMOKE_LOAD,
        },
    ),
}


def corpus(model: str, reference: bool = True) -> Corpus:
    """The fraud_scorer mix, with the PyTorch reference's answers when `reference`."""
    from .reference import encode, feature_names, records

    names = feature_names()
    rows = list(records(FRAUD_RECORDS))
    items = []
    for index, record in enumerate(rows):
        if index % VALUES_EVERY == VALUES_EVERY - 1:
            values = np.array([[record[n] for n in names]], dtype=np.float32)
            items.append(Item(f"transaction #{index} as FEATURE_VALUES", {tensors.FEATURE_VALUES: values}))
        else:
            record_bytes = object_array([encode(record)])
            items.append(Item(f"transaction #{index} as RECORD", {tensors.RECORD: record_bytes}))
    mix = Corpus(model, items)
    if reference:
        _reference(mix, rows)
    return mix


def _reference(mix: Corpus, rows: list[dict[str, float]]) -> None:
    from .reference import TorchReference, published_threshold

    # Decide at the threshold the server serves (the build's published one), so that the
    # reference and the response contract agree by construction.
    torch_reference = TorchReference.load(threshold=published_threshold().threshold)
    names = torch_reference.stats.names
    for item, record in zip(mix.items, rows, strict=True):
        if tensors.FEATURE_VALUES in item.inputs:
            scored = torch_reference.score_values(item.inputs[tensors.FEATURE_VALUES])
        else:
            scored = torch_reference.score([{n: record[n] for n in names}])
        item.expected = {tensors.SCORE: scored.scores, tensors.DECISION: scored.decisions}
    mix.reference = "kiln.models.fraud.reference.TorchReference (PyTorch, FP32)"
