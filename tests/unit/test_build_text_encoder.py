"""The text_encoder source stage: corpus, WordPiece tokenizer, encoder, export, held-out metric."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kiln import tensors
from kiln.build import check, export
from kiln.models.text_encoder import build as te
from kiln.models.text_encoder.spec import SPEC, TextEncoderSource
from kiln.spec import TensorSpec, validate

SOURCE: TextEncoderSource = SPEC.build.source
SMALL = replace(
    SOURCE, hidden_size=32, layers=2, heads=4, intermediate_size=64, eval_texts=16, calibration_texts=8
)
"""A tiny encoder for tests that need many forward passes but not the served dims."""
SHORT = "Return the sum of the values."
LONG = (
    "The dispatcher looks up the handler registered for the request's method and calls it with the "
    "parsed headers; when no handler matches, it answers with an error response instead."
)
CLS_ID, SEP_ID = 2, 3


@pytest.fixture(scope="module")
def corpus() -> te.Corpus:
    return te.load_corpus()


@pytest.fixture(scope="module")
def tokenizer():
    return te.train_tokenizer(SOURCE)


@pytest.fixture(scope="module")
def encoder() -> te.TextEncoder:
    """The encoder with the spec's dims and seeded weights (what the build serves)."""
    return te.train(SOURCE)


def _run(model: torch.nn.Module, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


# --- corpus ---------------------------------------------------------------------------------------


def test_paragraphs_keeps_prose_and_drops_code_fragments_and_directives() -> None:
    docstring = """Summary line that is long enough to be kept as a text here.

        Continuation paragraph   with
        irregular    whitespace across lines, kept as one text.

        >>> example(1, 2)
        3

        Too short.

        .. versionadded:: 3.2 with enough words to pass the length filter

        Args:
            value: an argument description in an indented block, dropped here.
        """
    assert te.paragraphs(docstring) == [
        "Summary line that is long enough to be kept as a text here.",
        "Continuation paragraph with irregular whitespace across lines, kept as one text.",
    ]


def test_pools_are_disjoint_large_enough_and_from_their_modules(corpus: te.Corpus) -> None:
    pools = {"training": corpus.training, "evaluation": corpus.evaluation, "calibration": corpus.calibration}
    for name, pool in pools.items():
        assert list(pool) == sorted(set(pool)), f"{name} is not sorted and unique"
    assert not set(corpus.training) & set(corpus.evaluation)
    assert not set(corpus.training) & set(corpus.calibration)
    assert not set(corpus.evaluation) & set(corpus.calibration)
    assert len(corpus.evaluation) >= SOURCE.eval_texts
    assert len(corpus.calibration) >= SOURCE.calibration_texts
    assert len(corpus.training) > 5 * len(corpus.evaluation)
    assert not {*te.TRAINING_MODULES} & {*te.EVALUATION_MODULES, *te.CALIBRATION_MODULES}
    assert not {*te.EVALUATION_MODULES} & {*te.CALIBRATION_MODULES}
    assert set(te.module_texts(te.EVALUATION_MODULES[0])) <= set(corpus.evaluation)
    assert set(te.module_texts(te.CALIBRATION_MODULES[0])) - set(corpus.evaluation) <= set(
        corpus.calibration
    )
    for text in corpus.evaluation:
        assert te.MIN_TEXT_CHARS <= len(text) <= te.MAX_TEXT_CHARS and "  " not in text


def test_evaluation_and_calibration_draws_are_seeded_and_disjoint(corpus: te.Corpus) -> None:
    evaluation = te.evaluation_texts(SOURCE)
    calibration = te.calibration_texts(SOURCE)
    assert len(evaluation) == len(set(evaluation)) == SOURCE.eval_texts
    assert len(calibration) == len(set(calibration)) == SOURCE.calibration_texts
    assert set(evaluation) <= set(corpus.evaluation)
    assert set(calibration) <= set(corpus.calibration)
    assert te.evaluation_texts(SOURCE) == evaluation
    assert te.evaluation_texts(replace(SOURCE, seed=SOURCE.seed + 1)) != evaluation


def test_asking_for_more_texts_than_the_corpus_has_names_the_field(corpus: te.Corpus) -> None:
    too_many = replace(SOURCE, eval_texts=len(corpus.evaluation) + 1)
    with pytest.raises(te.CorpusError) as error:
        te.evaluation_texts(too_many)
    assert str(error.value) == (
        f"field 'build.source.eval_texts' asks for {len(corpus.evaluation) + 1} texts but the "
        f"offline corpus has {len(corpus.evaluation)}; use at most {len(corpus.evaluation)}"
    )


# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_training_is_deterministic_on_the_training_pool_only(corpus: te.Corpus, tokenizer) -> None:
    # tokenizers' own WordPiece trainer gives a different vocabulary on most runs (issue #1794);
    # fit_tokenizer must not, and train_tokenizer must be exactly the fit on the training pool.
    fits = {
        te.fit_tokenizer(corpus.training, SOURCE.vocab_size, SOURCE.max_length).to_str()
        for _ in range(3)
    }
    assert fits == {tokenizer.to_str()}


def test_tokenizer_vocabulary_and_special_tokens(tokenizer) -> None:
    assert tokenizer.get_vocab_size() == SOURCE.vocab_size
    assert [tokenizer.token_to_id(t) for t in te.SPECIAL_TOKENS] == [0, 1, CLS_ID, SEP_ID, 4]
    assert te.SPECIAL_TOKENS[te.PAD_ID] == "[PAD]"
    encoding = tokenizer.encode("Return the Value of the FILE name.")  # lowercased, split, wrapped
    assert encoding.tokens == ["[CLS]", "return", "the", "value", "of", "the", "file", "name", ".", "[SEP]"]
    # a word outside the training pool ("difflib" is an evaluation module) splits into "##" pieces,
    # which are ordinary vocabulary entries: decoding joins them and drops only [CLS] and [SEP]
    assert tokenizer.encode("difflib").tokens == ["[CLS]", "dif", "##fl", "##ib", "[SEP]"]
    assert tokenizer.decode(tokenizer.encode("difflib").ids) == "difflib"
    assert tokenizer.decode([tokenizer.token_to_id("##m")]) == "##m"


def test_a_vocabulary_too_small_for_the_alphabet_is_refused(corpus: te.Corpus) -> None:
    with pytest.raises(te.CorpusError, match=r"field 'build\.source\.vocab_size' must be at least \d+"):
        te.fit_tokenizer(corpus.training[:50], 20, SOURCE.max_length)


def test_encode_pads_to_the_longest_text_with_cls_and_sep(tokenizer) -> None:
    ids, mask = te.encode(tokenizer, [SHORT, LONG], SOURCE.max_length)
    short = tokenizer.encode(SHORT).ids
    long = tokenizer.encode(LONG).ids
    assert ids.dtype == np.int64 and mask.dtype == np.int64
    assert ids.shape == mask.shape == (2, len(long))
    assert ids[1].tolist() == long and mask[1].tolist() == [1] * len(long)
    assert ids[0].tolist() == short + [te.PAD_ID] * (len(long) - len(short))
    assert mask[0].tolist() == [1] * len(short) + [0] * (len(long) - len(short))
    assert short[0] == CLS_ID and short[-1] == SEP_ID


def test_encode_truncates_at_max_length_keeping_sep_and_leaves_the_tokenizer_alone(tokenizer) -> None:
    max_length = 8
    ids, mask = te.encode(tokenizer, [LONG, SHORT], max_length)
    assert ids.shape == (2, max_length)
    assert ids[0, 0] == CLS_ID and ids[0, -1] == SEP_ID
    assert ids[0, 1:-1].tolist() == tokenizer.encode(LONG).ids[1 : max_length - 1]
    assert mask[0].tolist() == [1] * max_length
    assert tokenizer.truncation["max_length"] == SOURCE.max_length
    with pytest.raises(ValueError, match="at least one text"):
        te.encode(tokenizer, [], max_length)


def test_extra_files_round_trip(tmp_path: Path, tokenizer) -> None:
    files = te.extra_files(SOURCE, None, tmp_path)
    assert files == {"tokenizer.json": tmp_path / "tokenizer.json", "vocab.txt": tmp_path / "vocab.txt"}
    lines = files["vocab.txt"].read_text().splitlines()
    assert len(lines) == SOURCE.vocab_size
    assert lines[: len(te.SPECIAL_TOKENS)] == list(te.SPECIAL_TOKENS)
    assert all(tokenizer.token_to_id(token) == i for i, token in enumerate(lines))
    for where in (files["tokenizer.json"], tmp_path):
        loaded = te.load_tokenizer(where)
        np.testing.assert_array_equal(
            te.encode(loaded, [SHORT, LONG], SOURCE.max_length)[0],
            te.encode(tokenizer, [SHORT, LONG], SOURCE.max_length)[0],
        )
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        te.load_tokenizer(tmp_path / "missing")


# --- model ----------------------------------------------------------------------------------------


def test_encoder_maps_ids_and_mask_to_fp32_token_embeddings(encoder, tokenizer) -> None:
    ids, mask = te.encode(tokenizer, [SHORT, LONG, "Three"], SOURCE.max_length)
    out = _run(encoder, ids, mask)
    assert out.shape == (3, ids.shape[1], SOURCE.hidden_size) and out.dtype == np.float32
    assert np.isfinite(out).all()
    assert sum(p.numel() for p in encoder.parameters()) == 4_240_896


def test_train_is_seeded_untrained_and_leaves_the_global_rng_alone() -> None:
    rng = torch.get_rng_state()
    lines: list[str] = []
    first = te.train(SMALL, lines.append).state_dict()
    assert torch.equal(torch.get_rng_state(), rng)
    second = te.train(SMALL).state_dict()
    other = te.train(replace(SMALL, seed=SMALL.seed + 1)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["token_embeddings.weight"], other["token_embeddings.weight"])
    std = float(first["layers.0.intermediate.weight"].std())
    assert abs(std - te.INIT_STD) < 0.1 * te.INIT_STD
    assert len(lines) == 3 and lines[-1].endswith("seeded (seed 0), untrained")


def test_a_texts_embeddings_do_not_depend_on_its_padding(encoder, tokenizer) -> None:
    alone_ids, alone_mask = te.encode(tokenizer, [SHORT], SOURCE.max_length)
    ids, mask = te.encode(tokenizer, [SHORT, LONG], SOURCE.max_length)
    length = alone_ids.shape[1]
    assert ids.shape[1] > length  # SHORT is padded in the batch
    alone = _run(encoder, alone_ids, alone_mask)[0]
    padded = _run(encoder, ids, mask)[0]
    np.testing.assert_allclose(padded[:length], alone, atol=1e-5)
    np.testing.assert_allclose(
        te.mean_pool(padded[None], mask[:1]), te.mean_pool(alone[None], alone_mask), atol=1e-6
    )
    # the same batch with the mask ignored changes the short text's embeddings: the mask is what
    # makes the padding harmless
    unmasked = _run(encoder, ids, np.ones_like(mask))[0]
    assert np.abs(unmasked[:length] - alone).max() > 1e-2


def test_the_mask_bias_survives_half_precision(encoder, tokenizer) -> None:
    assert np.isfinite(np.float16(te.MASK_BIAS)) and np.exp(np.float16(te.MASK_BIAS)) == 0
    ids, mask = te.encode(tokenizer, [SHORT, LONG], SOURCE.max_length)
    full = _run(encoder, ids, mask)
    half = te.TextEncoder(SOURCE.vocab_size, SOURCE.hidden_size, SOURCE.layers, SOURCE.heads,
                          SOURCE.intermediate_size, SOURCE.max_length)
    half.load_state_dict(encoder.state_dict())
    out = _run(half.half().eval(), ids, mask).astype(np.float32)
    assert np.isfinite(out).all()
    assert te.pooled_cosine(out, full, mask).min() > 0.999


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    model = te.train(SMALL)
    spec = replace(SPEC, build=replace(SPEC.build, source=SMALL))
    path = te.save_checkpoint(model, tmp_path / "model.pt")
    loaded = te.load_trained(spec, checkpoint=path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    with pytest.raises(FileNotFoundError, match="run `kiln build` first"):
        te.load_trained(spec, checkpoint=tmp_path / "none.pt")


# --- export ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(encoder, tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    example = te.encode(tokenizer, [SHORT, LONG], SOURCE.max_length)
    path = tmp_path_factory.mktemp("text_encoder") / "model.onnx"
    return export.export_onnx(encoder, SPEC, export.example_inputs(SPEC, example), path)


def test_export_has_symbolic_batch_and_sequence_axes(exported: Path) -> None:
    signature = export.graph_signature(onnx.load(str(exported)))
    (ids_type, ids_dims), (mask_type, mask_dims) = (
        signature["inputs"][tensors.TEXT_INPUT_IDS],
        signature["inputs"][tensors.TEXT_ATTENTION_MASK],
    )
    out_type, out_dims = signature["outputs"][tensors.TEXT_TOKEN_EMBEDDINGS]
    assert ids_type == mask_type == onnx.TensorProto.INT64 and out_type == onnx.TensorProto.FLOAT
    assert ids_dims[0] == mask_dims[0] == out_dims[0] == export.BATCH_DIM
    assert isinstance(ids_dims[1], str) and isinstance(mask_dims[1], str) and isinstance(out_dims[1], str)
    assert out_dims[2] == SOURCE.hidden_size and len(ids_dims) == len(mask_dims) == 2


@pytest.mark.parametrize("texts", [[SHORT], [SHORT, LONG, "A third text for the batch."]])
def test_served_onnx_matches_pytorch_at_other_lengths(exported: Path, encoder, tokenizer, texts) -> None:
    ids, mask = te.encode(tokenizer, texts, SOURCE.max_length)
    run = check.load_served(SPEC, exported).run  # kiln_onnx's loader and its load-time checks
    got = run({tensors.TEXT_INPUT_IDS: ids, tensors.TEXT_ATTENTION_MASK: mask})
    want = {tensors.TEXT_TOKEN_EMBEDDINGS: _run(encoder, ids, mask)}
    comparison = check.assert_close(SPEC.name, got, want, SPEC.build.tolerance)
    assert comparison.max_abs < SPEC.build.tolerance.atol


# --- held-out data and metric ---------------------------------------------------------------------


def test_mean_pool_averages_real_tokens_only() -> None:
    embeddings = np.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=np.float32)
    np.testing.assert_array_equal(te.mean_pool(embeddings, np.array([[1, 1, 0]])), [[2.0, 3.0]])


def test_held_out_layout(corpus: te.Corpus) -> None:
    held = te.held_out(SMALL)
    ids, mask = held.inputs
    assert held.metric == "cosine similarity to FP32" and held.size == SMALL.eval_texts
    assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
    assert ids.shape[1] == mask.sum(axis=1).max() <= SMALL.max_length  # padded to the longest
    assert np.all(ids[:, 0] == CLS_ID) and np.all((ids == te.PAD_ID) == (mask == 0))
    cal_ids, cal_mask = held.calibration
    assert cal_ids.shape == cal_mask.shape and cal_ids.shape[0] == SMALL.calibration_texts


def test_score_is_one_against_itself_blind_to_padding_and_lower_when_perturbed() -> None:
    held = te.held_out(SMALL)
    ids, mask = held.inputs
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(*ids.shape, 8)).astype(np.float32)
    assert held.score([reference], [reference]) == pytest.approx(1.0, abs=1e-12)
    padding_changed = np.where(mask[..., None] == 0, 1e3, reference).astype(np.float32)
    assert held.score([padding_changed], [reference]) == pytest.approx(1.0, abs=1e-12)
    noisy = reference + rng.normal(scale=0.5, size=reference.shape).astype(np.float32)
    expected = np.mean(te.pooled_cosine(noisy, reference, mask))
    assert held.score([noisy], [reference]) == pytest.approx(expected) and expected < 0.99
    broken = reference.copy()
    broken[0, 0, 0] = np.nan
    want = (te.WORST_COSINE + (len(ids) - 1)) / len(ids)
    assert held.score([broken], [reference]) == pytest.approx(want)


def test_spec_is_valid_and_matches_the_tensor_contract() -> None:
    validate([SPEC])
    assert [(t.name, t.dtype, t.dims) for t in SPEC.inputs] == [
        (tensors.TEXT_INPUT_IDS, "INT64", (-1,)),
        (tensors.TEXT_ATTENTION_MASK, "INT64", (-1,)),
    ]
    assert SPEC.outputs == (TensorSpec(tensors.TEXT_TOKEN_EMBEDDINGS, "FP32", (-1, SOURCE.hidden_size)),)
    assert SPEC.warmup == () and SPEC.max_batch_size == 32
    assert [v.precision for v in SPEC.build.variants] == ["fp32", "fp16", "int8"]
