"""The kiln_pool backend's logic: token embeddings and mask -> sentence embeddings, without Triton.

`MeanPool` averages each text's token embeddings over its real tokens (the attention mask's 1s;
padding never enters) and, with `normalize` on, scales the mean to unit L2 norm. A dynamic batch
is validated request by request, then the valid requests are grouped by sequence length (kiln_text
pads each request to its longest text, or to that text's length bucket, so lengths may differ
between requests) and each group is pooled in one vectorized call. Padding columns carry a mask
of 0 and never enter the mean, so a text's embedding does not depend on how far it was padded.
A request whose mask holds a row of zeros (a text with no token to average) is that request's
error, naming the item; the others are answered normally.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln import tensors
from kiln.serving.errors import ModelLoadError, RequestError
from kiln.serving.params import Param, parse_params

if TYPE_CHECKING:
    from kiln.serving.adapter import Inputs, LoadContext, Outputs

POOL_PARAMS: tuple[Param, ...] = (
    Param("normalize", "bool", True, "scale each mean-pooled embedding to unit L2 norm"),
)
"""kiln_pool's `parameters` (config.pbtxt), all optional."""


@dataclass(frozen=True)
class PoolParams:
    """kiln_pool's `parameters`, parsed (see POOL_PARAMS for each key's meaning)."""

    normalize: bool


class PoolInputError(RequestError):
    """A request's embeddings or mask cannot be pooled; the message names the input and the item.

    Attributes:
        reason: The label of the failure metric ("empty_mask", "bad_input", "non_finite").
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class PoolLoadError(ModelLoadError):
    """The pooling step cannot be served as configured; the message names the model and the cause."""


def mean_pool(
    token_embeddings: np.ndarray, attention_mask: np.ndarray, normalize: bool
) -> np.ndarray:
    """Mask-weighted mean over tokens, optionally L2-normalized: [batch, seq, hidden] -> [batch, hidden].

    Args:
        token_embeddings: FP32 [batch, seq, hidden].
        attention_mask: [batch, seq], 1 on real tokens and 0 on padding; every row needs a 1.
        normalize: Scale each row to unit L2 norm (a zero row stays zero).

    Returns:
        FP32 [batch, hidden].
    """
    weights = attention_mask.astype(np.float32)
    # [batch, 1, seq] @ [batch, seq, hidden]: one batched matrix product, no [batch, seq, hidden] temporary.
    summed = np.matmul(weights[:, np.newaxis, :], token_embeddings.astype(np.float32, copy=False))[:, 0, :]
    pooled = summed / weights.sum(axis=1, keepdims=True)
    if normalize:
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled = pooled / np.where(norms > 0, norms, 1.0)
    return pooled.astype(np.float32, copy=False)


class MeanPool:
    """kiln_pool: token_embeddings FP32 [batch, seq, hidden] and attention_mask INT64 [batch, seq]
    -> embedding FP32 [batch, hidden], the mask-mean-pooled (and L2-normalized) sentence embedding.

    `seq` may differ between the requests of a dynamic batch; `hidden` is the config's.
    """

    def __init__(self, params: PoolParams, hidden_size: int | None = None) -> None:
        self.params = params
        self.hidden_size = hidden_size

    def _validated(self, request: Inputs) -> tuple[np.ndarray, np.ndarray]:
        """One request's (embeddings, mask), or PoolInputError naming what is wrong."""
        emb_name, mask_name = tensors.TEXT_TOKEN_EMBEDDINGS, tensors.TEXT_ATTENTION_MASK
        embeddings, mask = request.get(emb_name), request.get(mask_name)
        for name, array in ((emb_name, embeddings), (mask_name, mask)):
            if array is None:
                raise PoolInputError(f"missing input '{name}'", "bad_input")
        assert embeddings is not None and mask is not None
        if embeddings.dtype != np.float32 or embeddings.ndim != 3:
            raise PoolInputError(
                f"input '{emb_name}' is {embeddings.dtype} {list(embeddings.shape)}; expected float32 "
                "[batch, seq, hidden]",
                "bad_input",
            )
        if self.hidden_size is not None and embeddings.shape[2] != self.hidden_size:
            raise PoolInputError(
                f"input '{emb_name}' has hidden size {embeddings.shape[2]}; expected {self.hidden_size}",
                "bad_input",
            )
        if mask.dtype != np.int64 or mask.shape != embeddings.shape[:2]:
            raise PoolInputError(
                f"input '{mask_name}' is {mask.dtype} {list(mask.shape)}; expected int64 "
                f"{list(embeddings.shape[:2])} (the batch and seq of '{emb_name}')",
                "bad_input",
            )
        if embeddings.shape[0] == 0:
            raise PoolInputError(f"input '{emb_name}' has an empty batch (batch size 0)", "bad_input")
        outside = np.flatnonzero(((mask != 0) & (mask != 1)).any(axis=1))
        if outside.size:
            raise PoolInputError(
                f"input '{mask_name}' item {int(outside[0])} holds values other than 0 and 1",
                "bad_input",
            )
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise PoolInputError(
                f"input '{mask_name}' item {int(empty[0])} is all zeros: the text has no token to pool",
                "empty_mask",
            )
        return embeddings, mask

    def run(self, requests: Sequence[Inputs]) -> list[Outputs | Exception]:
        """One dynamic batch: each request's embedding, or its error."""
        results: list[Outputs | Exception] = [RequestError("not run")] * len(requests)
        groups: dict[int, list[tuple[int, np.ndarray, np.ndarray]]] = {}
        for index, request in enumerate(requests):
            try:
                embeddings, mask = self._validated(request)
            except PoolInputError as error:
                results[index] = error
                continue
            groups.setdefault(mask.shape[1], []).append((index, embeddings, mask))
        for members in groups.values():
            embeddings = np.concatenate([e for _, e, _ in members]) if len(members) > 1 else members[0][1]
            mask = np.concatenate([m for _, _, m in members]) if len(members) > 1 else members[0][2]
            pooled = mean_pool(embeddings, mask, self.params.normalize)
            finite = np.isfinite(pooled).all(axis=1)
            offset = 0
            for index, own, _ in members:
                rows = slice(offset, offset + own.shape[0])
                offset += own.shape[0]
                bad = np.flatnonzero(~finite[rows])
                if bad.size:
                    results[index] = PoolInputError(
                        f"input '{tensors.TEXT_TOKEN_EMBEDDINGS}' item {int(bad[0])} pools to NaN or "
                        "infinity (the encoder's output is not finite)",
                        "non_finite",
                    )
                else:
                    results[index] = {tensors.EMBEDDING: np.ascontiguousarray(pooled[rows])}
        return results


def check_config(model: str, config: Mapping[str, Any]) -> int | None:
    """Checks the config declares kiln_pool's tensors; returns the hidden size it fixes (or None).

    Raises:
        PoolLoadError: naming the tensor that is missing or of another type or rank.
    """
    want = {
        "input": {
            tensors.TEXT_TOKEN_EMBEDDINGS: ("TYPE_FP32", 2),
            tensors.TEXT_ATTENTION_MASK: ("TYPE_INT64", 1),
        },
        "output": {tensors.EMBEDDING: ("TYPE_FP32", 1)},
    }
    dims: dict[str, list[int]] = {}
    for role, expected in want.items():
        declared = {t["name"]: t for t in config.get(role, ())}
        for name, (dtype, rank) in expected.items():
            tensor = declared.get(name)
            if tensor is None or tensor.get("data_type") != dtype or len(tensor.get("dims", ())) != rank:
                raise PoolLoadError(
                    f"model '{model}': config.pbtxt must declare {role} '{name}' of {dtype} with "
                    f"{rank} dim(s); its {role}s are {sorted(declared) or 'none'}"
                )
            dims[name] = [int(d) for d in tensor["dims"]]
    hidden_in = dims[tensors.TEXT_TOKEN_EMBEDDINGS][1]
    hidden_out = dims[tensors.EMBEDDING][0]
    if -1 not in (hidden_in, hidden_out) and hidden_in != hidden_out:
        raise PoolLoadError(
            f"model '{model}': input '{tensors.TEXT_TOKEN_EMBEDDINGS}' has hidden size {hidden_in} "
            f"but output '{tensors.EMBEDDING}' has {hidden_out}"
        )
    hidden = max(hidden_in, hidden_out)
    return hidden if hidden > 0 else None


def load(context: LoadContext) -> MeanPool:
    """Builds the step from the model's config and parameters."""
    params = parse_params(context.model_name, context.parameters, POOL_PARAMS, PoolParams)
    return MeanPool(params, check_config(context.model_name, context.config))
