"""text_embedder in one Python process, no Triton: the yardstick of the served pipeline.

The served ensemble is tokenize (kiln_text) -> text_encoder (ONNX Runtime) -> pool (kiln_pool).
Two in-process twins:

- `TorchTextEmbedder`, the reference: `kiln.models.text_encoder.build.encode` with the build's
  tokenizer.json, the PyTorch encoder loaded from `artifacts/text_encoder/checkpoint.pt`, and a
  mask-mean-pool and L2 normalization written here in torch (`torch_mean_pool`), independent of
  `kiln.serving.pool`. The end-to-end tests compare served embeddings with it (cosine >= 0.999).
- `OrtTextEmbedder`, the in-process baseline for the benchmark: the same tokenizer (configured
  once, as `encode` configures it on every call), the served ONNX model run by ONNX Runtime in
  batches, and the served pool's numpy code: what the pipeline computes, minus Triton.

Both take a list of texts and return FP32 [texts, hidden]; each batch is padded to its longest
text, which does not change a text's embedding (padded keys are masked out of attention and out
of the pool).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kiln import paths, tensors
from kiln.build.publish import model_artifacts, published_path
from kiln.registry import by_name
from kiln.spec import ModelSpec

from .spec import TextEncoderSource

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

TEXT_ENCODER = "text_encoder"
"""The encoder model the text pipeline runs."""


def _encoder_spec(spec: ModelSpec | None) -> tuple[ModelSpec, TextEncoderSource]:
    spec = spec if spec is not None else by_name(TEXT_ENCODER)  # type: ignore[assignment]
    assert isinstance(spec, ModelSpec) and spec.build is not None
    source = spec.build.source
    if not isinstance(source, TextEncoderSource):
        raise TypeError(f"model {spec.name!r} is not a text encoder (its source is {type(source).__name__})")
    return spec, source


def build_tokenizer(spec: ModelSpec | None = None, artifacts: Path | None = None) -> Tokenizer:
    """The tokenizer the build saved for `spec` (`artifacts/<name>/tokenizer.json`)."""
    from .build import TOKENIZER_FILE, load_tokenizer

    spec, _ = _encoder_spec(spec)
    return load_tokenizer(model_artifacts(spec.name, artifacts) / TOKENIZER_FILE)


def torch_mean_pool(
    token_embeddings: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
) -> torch.Tensor:
    """Mean of each text's real-token embeddings, L2-normalized: [batch, seq, hidden] -> [batch, hidden].

    Written in torch on purpose: the yardstick must not share code with `kiln.serving.pool`.
    """
    import torch

    weights = attention_mask.to(token_embeddings.dtype).unsqueeze(-1)
    pooled = (token_embeddings * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=1) if normalize else pooled


def _batches(texts: Sequence[str], size: int) -> list[list[str]]:
    if not texts:
        raise ValueError("embed() needs at least one text, got none")
    return [list(texts[i : i + size]) for i in range(0, len(texts), size)]


class TorchTextEmbedder:
    """The PyTorch reference of text_embedder: build tokenizer -> PyTorch encoder -> torch pool.

    Args:
        spec: The encoder's spec (default: the repository's text_encoder).
        artifacts: The build's artifacts folder (default: `kiln.paths.artifacts_dir()`).
        batch_size: Texts per forward pass (default: the encoder's max_batch_size).
    """

    def __init__(
        self, spec: ModelSpec | None = None, artifacts: Path | None = None, batch_size: int | None = None
    ) -> None:
        from .build import load_trained

        self.spec, self.source = _encoder_spec(spec)
        self.tokenizer = build_tokenizer(self.spec, artifacts)
        self.model = load_trained(self.spec, artifacts)
        self.batch_size = batch_size or max(self.spec.max_batch_size, 1)

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) of `texts`: `kiln.models.text_encoder.build.encode` itself."""
        from .build import encode

        return encode(self.tokenizer, list(texts), self.source.max_length)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """FP32 [len(texts), hidden]: each text's mean-pooled, L2-normalized embedding."""
        import torch

        parts = []
        for batch in _batches(texts, self.batch_size):
            ids, mask = self.encode(batch)
            with torch.inference_mode():
                ids_t, mask_t = torch.from_numpy(ids), torch.from_numpy(mask)
                parts.append(torch_mean_pool(self.model(ids_t, mask_t), mask_t).numpy())
        return np.concatenate(parts).astype(np.float32, copy=False)


Encode = Callable[[Sequence[str]], tuple[np.ndarray, np.ndarray]]
"""texts -> (input_ids, attention_mask), int64 [texts, longest]."""


def prepared_encoder(tokenizer: Tokenizer, max_length: int) -> Encode:
    """`kiln.models.text_encoder.build.encode(tokenizer, texts, max_length)` with the tokenizer copied and
    configured once instead of on every call (the copy costs about 2 ms a call here)."""
    from tokenizers import Tokenizer

    from .build import MIN_ENCODED_LENGTH, PAD_ID, PAD_TOKEN

    if max_length < MIN_ENCODED_LENGTH:
        raise ValueError(f"max_length must be at least {MIN_ENCODED_LENGTH}, got {max_length}")
    local = Tokenizer.from_str(tokenizer.to_str())
    local.enable_truncation(max_length)
    local.enable_padding(pad_id=PAD_ID, pad_token=PAD_TOKEN)

    def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        encodings = local.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        return ids, mask

    return encode


class OrtTextEmbedder:
    """text_embedder in-process on ONNX Runtime: the benchmark's no-Triton baseline.

    Args:
        spec: The encoder's spec (default: the repository's text_encoder).
        onnx_path: The ONNX model (default: the served one, `<repository>/<name>/1/model.onnx`).
        artifacts: The build's artifacts folder, for the tokenizer.
        batch_size: Texts per ONNX Runtime run (default: the encoder's max_batch_size).
        intra_op_threads: ONNX Runtime threads inside an operator (0: ONNX Runtime chooses).
        inter_op_threads: ONNX Runtime threads across operators (0: ONNX Runtime chooses).
    """

    def __init__(
        self,
        spec: ModelSpec | None = None,
        onnx_path: Path | None = None,
        artifacts: Path | None = None,
        batch_size: int | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        from kiln.serving.pool import mean_pool

        self.spec, self.source = _encoder_spec(spec)
        self.encode = prepared_encoder(build_tokenizer(self.spec, artifacts), self.source.max_length)
        path = onnx_path or published_path(self.spec.name, paths.model_repository())
        if not Path(path).is_file():
            raise FileNotFoundError(f"no ONNX model at {path}; run `kiln build` first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.batch_size = batch_size or max(self.spec.max_batch_size, 1)
        self._pool = mean_pool

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """FP32 [len(texts), hidden]: each text's mean-pooled, L2-normalized embedding."""
        parts = []
        for batch in _batches(texts, self.batch_size):
            ids, mask = self.encode(batch)
            (hidden,) = self.session.run(
                [tensors.TEXT_TOKEN_EMBEDDINGS],
                {tensors.TEXT_INPUT_IDS: ids, tensors.TEXT_ATTENTION_MASK: mask},
            )
            parts.append(self._pool(hidden, mask, normalize=True))
        return np.concatenate(parts)
