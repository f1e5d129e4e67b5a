"""text_embedder's load test: its request mix and its service levels.

The mix: short queries, prose paragraphs of varied length (held-out docstrings of the text
encoder's evaluation pool), long texts past the encoder's 128 tokens (truncated by the server) and
non-ASCII text. The reference: the PyTorch encoder, mean-pooled.
"""

from __future__ import annotations

import numpy as np

from kiln import tensors
from loadtests.inputs import Corpus, Item, object_array
from loadtests.slo import SMOKE_LOAD, Gates, Load, PipelineSLO

SHORT_TEXTS = (
    "reset my password",
    "How do I read a file line by line?",
    "timeout while connecting to the mail server",
    "parse a date string",
)
"""Search-box queries: a few words each."""
NON_ASCII_TEXTS = (
    "Résumé du café: la crème brûlée était très sucrée, naïve et délicieuse.",
    "Größenänderung der Datei fehlgeschlagen: Zugriff verweigert (Fehlercode 13).",
)
PARAGRAPHS = 10
"""Prose paragraphs, spread over the pool's lengths."""
LONG_TEXT_PARAGRAPHS = 8
"""Paragraphs joined into each long text (well past 128 tokens: the server truncates)."""
LONG_TEXTS = 2

SLOS = {
    tensors.TEXT_EMBEDDER: PipelineSLO(
        tensors.TEXT_EMBEDDER,
        gates={
            "full": Gates(p95_ms=400, p99_ms=600, max_failure_ratio=0.001, min_rps=30),
            "smoke": Gates(p95_ms=10000, p99_ms=15000, max_failure_ratio=0.0, min_rps=1),
        },
        load={
            "full": Load(
                users=16,
                duration_s=60,
                step_users=(2, 4, 8, 16, 32, 64),
                step_s=10,
                spike_users=(8, 64),
                spike_s=(10, 10, 15),
                settle_s=3,
            ),
            "smoke": SMOKE_LOAD,
        },
    ),
}


def texts() -> list[str]:
    """The text mix (see the module docstring)."""
    from .build import load_corpus

    pool = sorted(load_corpus().evaluation, key=len)
    picks = [pool[round(i * (len(pool) - 1) / (PARAGRAPHS - 1))] for i in range(PARAGRAPHS)]
    long_texts = [
        " ".join(pool[-(LONG_TEXT_PARAGRAPHS * (k + 1)) : len(pool) - LONG_TEXT_PARAGRAPHS * k])
        for k in range(LONG_TEXTS)
    ]
    return [*SHORT_TEXTS, *picks, *long_texts, *NON_ASCII_TEXTS]


def corpus(model: str, reference: bool = True) -> Corpus:
    """The text_embedder mix, with the PyTorch reference's embeddings when `reference`."""
    items = []
    for text in texts():
        data = text.encode("utf-8")
        label = text if len(text) <= 40 else text[:37] + "..."
        items.append(Item(f"text {len(data)} B: {label!r}", {tensors.TEXT: object_array([data])}))
    mix = Corpus(model, items)
    if reference:
        from .reference import TorchTextEmbedder

        embeddings = TorchTextEmbedder().embed(texts())
        for item, embedding in zip(mix.items, embeddings, strict=True):
            item.expected = {tensors.EMBEDDING: embedding[np.newaxis, :]}
        mix.reference = "kiln.models.text_encoder.reference.TorchTextEmbedder (PyTorch, FP32)"
    return mix
