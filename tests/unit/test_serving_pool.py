"""kiln_pool without Triton: mask-mean pooling and L2 normalization against a computation written
here, requests of different lengths in one dynamic batch, and every bad input failing alone."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln import tensors
from kiln.models.text_encoder.reference import torch_mean_pool
from kiln.serving import pool as pool_module
from kiln.serving.adapter import LoadContext, failure_reason
from kiln.serving.params import ParamError, parse_params
from kiln.serving.pool import (
    POOL_PARAMS,
    MeanPool,
    PoolInputError,
    PoolLoadError,
    PoolParams,
    check_config,
    load,
    mean_pool,
)

HIDDEN = 16
EMB, MASK, OUT = tensors.TEXT_TOKEN_EMBEDDINGS, tensors.TEXT_ATTENTION_MASK, tensors.EMBEDDING


def expected(embeddings: np.ndarray, mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """The pooled embeddings by plain loops in float64: the yardstick, sharing no code with kiln."""
    result = np.zeros((embeddings.shape[0], embeddings.shape[2]))
    for b in range(embeddings.shape[0]):
        real = [embeddings[b, s].astype(np.float64) for s in range(mask.shape[1]) if mask[b, s] == 1]
        mean = sum(real) / len(real)
        if normalize:
            mean = mean / math.sqrt(sum(float(v) ** 2 for v in mean))
        result[b] = mean
    return result


def sample(batch: int, seq: int, seed: int, hidden: int = HIDDEN) -> tuple[np.ndarray, np.ndarray]:
    """Random embeddings and a mask of right-padded rows, each with 1..seq real tokens."""
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(0, 3, size=(batch, seq, hidden)).astype(np.float32)
    lengths = rng.integers(1, seq + 1, size=batch)
    lengths[0] = seq  # like a request padded to its longest text
    mask = (np.arange(seq)[np.newaxis, :] < lengths[:, np.newaxis]).astype(np.int64)
    return embeddings, mask


def request(embeddings: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    return {EMB: embeddings, MASK: mask}


@pytest.fixture
def step() -> MeanPool:
    return MeanPool(PoolParams(normalize=True), HIDDEN)


@pytest.mark.parametrize("normalize", [True, False])
def test_mean_pool_matches_an_independent_computation(normalize: bool) -> None:
    embeddings, mask = sample(7, 11, seed=1)
    pooled = mean_pool(embeddings, mask, normalize)
    assert pooled.dtype == np.float32 and pooled.shape == (7, HIDDEN)
    np.testing.assert_allclose(pooled, expected(embeddings, mask, normalize), rtol=1e-5, atol=1e-6)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, rtol=1e-6)


def test_padding_never_enters_the_pool() -> None:
    embeddings, mask = sample(3, 5, seed=2)
    padded = np.concatenate([embeddings, np.full((3, 4, HIDDEN), 1e6, np.float32)], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((3, 4), np.int64)], axis=1)
    np.testing.assert_allclose(mean_pool(padded, padded_mask, True), mean_pool(embeddings, mask, True), rtol=1e-6)


def test_the_references_torch_pool_matches_the_independent_computation() -> None:
    embeddings, mask = sample(5, 9, seed=3)
    pooled = torch_mean_pool(torch.from_numpy(embeddings), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(pooled, expected(embeddings, mask), rtol=1e-5, atol=1e-6)


def test_requests_of_different_lengths_share_a_dynamic_batch(step: MeanPool, monkeypatch) -> None:
    calls: list[tuple[int, ...]] = []
    real = pool_module.mean_pool

    def counting(embeddings, mask, normalize):
        calls.append(embeddings.shape)
        return real(embeddings, mask, normalize)

    monkeypatch.setattr(pool_module, "mean_pool", counting)
    shapes = [(2, 5), (1, 9), (3, 5), (4, 3), (1, 9)]
    samples = [sample(b, s, seed=10 + i) for i, (b, s) in enumerate(shapes)]
    results = step.run([request(e, m) for e, m in samples])
    for (embeddings, mask), result in zip(samples, results, strict=True):
        assert isinstance(result, dict) and set(result) == {OUT}
        assert result[OUT].dtype == np.float32 and result[OUT].shape == (embeddings.shape[0], HIDDEN)
        np.testing.assert_allclose(result[OUT], expected(embeddings, mask), rtol=1e-5, atol=1e-6)
    # One vectorized call per sequence length: 5 (2+3 rows), 9 (1+1 rows), 3 (4 rows).
    assert sorted(calls) == sorted([(5, 5, HIDDEN), (2, 9, HIDDEN), (4, 3, HIDDEN)])


def test_normalize_off_returns_the_plain_mean() -> None:
    embeddings, mask = sample(2, 4, seed=4)
    result = MeanPool(PoolParams(normalize=False), HIDDEN).run([request(embeddings, mask)])[0]
    np.testing.assert_allclose(result[OUT], expected(embeddings, mask, normalize=False), rtol=1e-5, atol=1e-6)


def test_an_all_zero_mask_fails_its_own_request(step: MeanPool) -> None:
    good, good_mask = sample(2, 6, seed=5)
    bad, bad_mask = sample(3, 6, seed=6)
    bad_mask[2] = 0
    results = step.run([request(good, good_mask), request(bad, bad_mask), request(good, good_mask)])
    error = results[1]
    assert isinstance(error, PoolInputError) and isinstance(error, ValueError)
    assert str(error) == "input 'attention_mask' item 2 is all zeros: the text has no token to pool"
    assert failure_reason(error) == "empty_mask"
    for index in (0, 2):
        np.testing.assert_allclose(results[index][OUT], expected(good, good_mask), rtol=1e-5, atol=1e-6)


def _bad_requests() -> list[tuple[str, dict, str]]:
    embeddings, mask = sample(2, 4, seed=7)
    not_binary = mask.copy()
    not_binary[1, 0] = 2
    nan = embeddings.copy()
    nan[1, 0, 3] = np.nan
    return [
        ("missing-mask", {EMB: embeddings}, "missing input 'attention_mask'"),
        ("fp64", request(embeddings.astype(np.float64), mask),
         "input 'token_embeddings' is float64 [2, 4, 16]; expected float32 [batch, seq, hidden]"),
        ("rank", request(embeddings[:, 0], mask), "input 'token_embeddings' is float32 [2, 16]; expected"),
        ("hidden", request(embeddings[:, :, :8].copy(), mask),
         "input 'token_embeddings' has hidden size 8; expected 16"),
        ("mask-shape", request(embeddings, mask[:, :3]),
         "input 'attention_mask' is int64 [2, 3]; expected int64 [2, 4] (the batch and seq of 'token_embeddings')"),
        ("mask-dtype", request(embeddings, mask.astype(np.int32)), "input 'attention_mask' is int32 [2, 4]"),
        ("mask-values", request(embeddings, not_binary), "input 'attention_mask' item 1 holds values other than 0 and 1"),
        ("empty-batch", request(embeddings[:0], mask[:0]), "input 'token_embeddings' has an empty batch"),
        ("nan", request(nan, mask), "input 'token_embeddings' item 1 pools to NaN or infinity"),
    ]


@pytest.mark.parametrize(("inputs", "message"), [c[1:] for c in _bad_requests()], ids=[c[0] for c in _bad_requests()])
def test_bad_inputs_get_clear_errors_and_the_batch_goes_on(step: MeanPool, inputs: dict, message: str) -> None:
    good, good_mask = sample(2, 4, seed=8)
    results = step.run([inputs, request(good, good_mask)])
    assert isinstance(results[0], PoolInputError)
    assert message in str(results[0])
    np.testing.assert_allclose(results[1][OUT], expected(good, good_mask), rtol=1e-5, atol=1e-6)


def config_json(hidden_in: str = "16", hidden_out: str = "16", mask_type: str = "TYPE_INT64") -> dict:
    return {
        "max_batch_size": 32,
        "input": [
            {"name": EMB, "data_type": "TYPE_FP32", "dims": ["-1", hidden_in]},
            {"name": MASK, "data_type": mask_type, "dims": ["-1"]},
        ],
        "output": [{"name": OUT, "data_type": "TYPE_FP32", "dims": [hidden_out]}],
    }


def test_config_checks_and_the_hidden_size_it_fixes() -> None:
    assert check_config("pool", config_json()) == 16
    assert check_config("pool", config_json(hidden_in="-1", hidden_out="-1")) is None
    with pytest.raises(PoolLoadError, match=r"'token_embeddings' has hidden size 16 but output 'embedding' has 8"):
        check_config("pool", config_json(hidden_out="8"))
    with pytest.raises(PoolLoadError, match=r"must declare input 'attention_mask' of TYPE_INT64 with 1 dim"):
        check_config("pool", config_json(mask_type="TYPE_INT32"))


def test_load_parses_params_and_config(tmp_path: Path) -> None:
    context = LoadContext("pool", tmp_path, tmp_path / "1", config_json(), {"normalize": "false"})
    step = load(context)
    assert step.params == PoolParams(normalize=False) and step.hidden_size == 16
    with pytest.raises(ParamError, match=r"model 'pool': parameter 'normalize' must be true or false, got 'maybe'"):
        parse_params("pool", {"normalize": "maybe"}, POOL_PARAMS, PoolParams)
