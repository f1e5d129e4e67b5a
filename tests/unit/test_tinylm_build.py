"""tinylm's source stage and its built artifacts: corpus, tokenizer, signature, KV cache, gates.

The tests of the trained decoder use what `kiln build` published (`make test` builds first); they
fail, naming the command, when it is missing. Broken exports and quantizations are made here from
the built weights, to show that the build's checks refuse them.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from kiln import paths
from kiln.build import check, export, pipeline, quantize
from kiln.build.export import graph_signature
from kiln.models.tinylm import build as lm
from kiln.models.tinylm.spec import SPEC, TinyLMSource, past_key, past_value, present_key, present_value
from kiln.spec import SpecError, validate

SOURCE: TinyLMSource = SPEC.build.source
INT8 = replace(SPEC, name="tinylm_int8")
UNICODE = "Return naïve café — λx: x ** 2 → 💡\n\tindented\r\n"


def published(model: str, name: str) -> Path:
    """A file the build published into the model repository's version folder of `model`."""
    path = paths.model_repository() / model / "1" / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `.venv/bin/kiln build --model tinylm`", pytrace=False)
    return path


@pytest.fixture(scope="module")
def trained() -> lm.TinyLM:
    try:
        return lm.load_trained(SPEC)
    except FileNotFoundError as error:
        pytest.fail(f"{error}: run `.venv/bin/kiln build --model tinylm`", pytrace=False)


@pytest.fixture(scope="module")
def torch_run(trained: lm.TinyLM) -> lm.Runner:
    return check.torch_runner(trained, SPEC)


@pytest.fixture(scope="module")
def fp32_run() -> lm.Runner:
    return check.artifact_runner(published("tinylm", "model.onnx"), SPEC)


@pytest.fixture(scope="module")
def int8_run() -> lm.Runner:
    return check.artifact_runner(published("tinylm_int8", "model.onnx"), INT8)


def _step(run: lm.Runner, ids, mask, positions, past=None) -> tuple[np.ndarray, list[np.ndarray]]:
    ids = np.asarray(ids, np.int64)
    past = lm.empty_past(SOURCE, len(ids)) if past is None else past
    return lm.decoder_step(run, SOURCE, ids, np.asarray(mask, np.int64), np.asarray(positions, np.int64), past)


# --- corpus, tokenizer, baseline -----------------------------------------------------------------


def test_topics_split_whole_seeded_and_disjoint() -> None:
    split = lm.split_topics(SOURCE)
    texts = lm.topics()
    sets = [set(split.training), set(split.evaluation), set(split.calibration)]
    assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(texts)
    total = sum(map(len, texts.values()))
    assert sum(len(texts[t]) for t in split.evaluation) <= SOURCE.eval_share * total
    assert sum(len(texts[t]) for t in split.calibration) <= SOURCE.calibration_share * total
    assert lm.split_topics(SOURCE) == split
    assert lm.split_topics(replace(SOURCE, seed=SOURCE.seed + 1)) != split


def test_tokenizer_is_byte_level_deterministic_and_marks_document_ends() -> None:
    texts = lm.topics()
    training = [texts[t] for t in lm.split_topics(SOURCE).training]
    first = lm.fit_tokenizer(training, SOURCE.vocab_size)
    assert first.to_str() == lm.fit_tokenizer(training, SOURCE.vocab_size).to_str()
    assert first.get_vocab_size() == SOURCE.vocab_size
    assert first.token_to_id(lm.END_OF_TEXT) == lm.END_OF_TEXT_ID == 0
    ids = first.encode(UNICODE, add_special_tokens=False).ids
    assert first.decode(ids) == UNICODE  # bytes: any text encodes and decodes exactly
    assert 0 not in ids
    stream = lm.encode_documents(first, ["a b", "c"])
    assert stream.tolist() == [*first.encode("a b").ids, 0, *first.encode("c").ids, 0]


def test_published_tokenizer_and_generation_config_are_the_sources() -> None:
    tokenizer = lm.load_tokenizer(published("tinylm", "tokenizer.json"))
    assert tokenizer.to_str() == lm.train_tokenizer(SOURCE).to_str()
    assert published("tinylm_int8", "tokenizer.json").read_bytes() == published("tinylm", "tokenizer.json").read_bytes()
    config = json.loads(published("tinylm", "generation.json").read_text())
    assert config == lm.generation_config(SOURCE)
    assert {k: config[k] for k in ("eos_token_id", "vocab_size", "max_context", "num_layers", "num_heads",
                                   "head_dim", "bos_token_id")} == {
        "eos_token_id": 0, "vocab_size": 1024, "max_context": 256, "num_layers": 2, "num_heads": 4,
        "head_dim": 32, "bos_token_id": None,
    }


def test_bigram_is_a_distribution_and_scores_the_held_out_targets() -> None:
    toy = lm.Bigram(np.array([1, 2, 1, 2, 3, 1, 2]), vocab_size=5)
    for previous in range(5):  # seen (1, 2, 3) and never seen (0, 4) previous tokens
        total = np.exp(toy.log_prob(np.full(5, previous), np.arange(5))).sum()
        assert total == pytest.approx(1.0)
    # Witten-Bell: after 1 (seen 3 times, always followed by 2): lam = 3 / (3 + 1).
    assert math.exp(toy.log_prob(np.array([1]), np.array([2]))[0]) == pytest.approx(
        0.75 * 1.0 + 0.25 * toy.unigram[2]
    )
    held = lm.evaluation(SOURCE)
    baseline = lm.bigram(SOURCE)
    assert held.bigram_perplexity == pytest.approx(
        math.exp(-baseline.log_prob(held.inputs.reshape(-1), held.targets.reshape(-1)).mean())
    )
    assert 20 < held.bigram_perplexity < 80  # 40.6 on Python 3.11


# --- the built artifacts --------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tinylm", "tinylm_int8"])
def test_onnx_signature_as_built(model: str) -> None:
    signature = graph_signature(onnx.load(str(published(model, "model.onnx"))))
    heads, dim, vocab = SOURCE.heads, SOURCE.head_dim, SOURCE.vocab_size
    inputs, outputs = signature["inputs"], signature["outputs"]
    cache_in = [name for layer in range(SOURCE.layers) for name in (past_key(layer), past_value(layer))]
    cache_out = [name for layer in range(SOURCE.layers) for name in (present_key(layer), present_value(layer))]
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", *cache_in]
    assert list(outputs) == ["logits", *cache_out]
    int64, fp32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    for name in ("input_ids", "attention_mask", "position_ids"):
        elem, dims = inputs[name]
        assert elem == int64 and dims[0] == "batch" and isinstance(dims[1], str) and len(dims) == 2
    for name in cache_in:
        elem, dims = inputs[name]
        assert elem == fp32 and dims[0] == "batch" and dims[1] == heads and dims[3] == dim
        assert isinstance(dims[2], str)
    elem, dims = outputs["logits"]
    assert elem == fp32 and dims[0] == "batch" and isinstance(dims[1], str) and dims[2] == vocab
    for name in cache_out:
        elem, dims = outputs[name]
        assert elem == fp32 and [dims[0], dims[1], dims[3]] == ["batch", heads, dim]


def test_prefill_takes_a_zero_length_past_and_present_appends_to_past(fp32_run: lm.Runner) -> None:
    tokens = lm.evaluation(SOURCE).inputs[0, :12]
    logits, present = _step(fp32_run, [tokens[:8]], np.ones((1, 8)), [np.arange(8)])
    assert logits.shape == (1, 8, SOURCE.vocab_size) and all(p.shape == (1, 4, 8, 32) for p in present)
    more, present2 = _step(fp32_run, [tokens[8:]], np.ones((1, 12)), [np.arange(8, 12)], present)
    assert more.shape == (1, 4, SOURCE.vocab_size) and all(p.shape == (1, 4, 12, 32) for p in present2)
    for old, new in zip(present, present2, strict=True):
        np.testing.assert_array_equal(new[:, :, :8], old)  # concat(past, new) along the sequence axis


def test_fp32_cache_and_greedy_match_pytorch_whole_sequence(fp32_run, torch_run) -> None:
    record = lm.verify_variant("fp32", fp32_run, torch_run, "PyTorch", SOURCE, SPEC.build.tolerance)
    prompts = SOURCE.verify_prompts
    assert record["greedy_tokens_equal"] + record["greedy_near_ties"] >= prompts * 8
    assert record["greedy_tokens_equal"] >= prompts * SOURCE.decode_tokens // 2
    assert max(record["max_abs_error"].values()) <= SPEC.build.tolerance.atol


def test_greedy_tokens_with_and_without_cache_are_identical(fp32_run) -> None:
    tokens, prompt = lm.verify_prompts(SOURCE)[0]
    with_cache = lm.greedy(fp32_run, SOURCE, tokens[:prompt], 32, cache=True)
    without = lm.greedy(fp32_run, SOURCE, tokens[:prompt], 32, cache=False)
    assert with_cache.tokens == without.tokens
    assert len(set(with_cache.tokens)) > 3  # a real continuation, not one token repeated


def test_int8_cache_and_padded_batch_match_its_own_whole_sequence(int8_run) -> None:
    record = lm.verify_variant("int8", int8_run, int8_run, "int8", SOURCE, lm.INT8_SELF_TOLERANCE)
    assert max(record["max_abs_error"].values()) <= lm.INT8_SELF_TOLERANCE.atol


@pytest.mark.parametrize("variant", ["fp32", "int8"])
def test_padding_anywhere_in_a_batch_gives_each_sequence_its_result_alone(request, variant: str) -> None:
    run = request.getfixturevalue(f"{variant}_run")
    tolerance = SPEC.build.tolerance if variant == "fp32" else lm.INT8_SELF_TOLERANCE
    stream = lm.evaluation(SOURCE).inputs
    short, long = stream[1, :5], stream[2, :9]
    alone_short = _step(run, [short], np.ones((1, 5)), [np.arange(5)])[0][0]
    alone_long = _step(run, [long], np.ones((1, 9)), [np.arange(9)])[0][0]
    # Row 0 left-padded by 2 and right-padded by 2; row 1 unpadded; row 2 all padding.
    ids = np.zeros((3, 9), np.int64)
    mask = np.zeros((3, 9), np.int64)
    positions = np.zeros((3, 9), np.int64)
    ids[0, 2:7], mask[0, 2:7], positions[0, 2:7] = short, 1, np.arange(5)
    ids[1], mask[1], positions[1] = long, 1, np.arange(9)
    logits, present = _step(run, ids, mask, positions)
    assert np.isfinite(logits).all() and all(np.isfinite(p).all() for p in present)  # row 2: no NaN
    check.assert_close("tinylm", {"logits": logits[0, 2:7]}, {"logits": alone_short}, tolerance)
    check.assert_close("tinylm", {"logits": logits[1]}, {"logits": alone_long}, tolerance)
    # One decode step on that ragged past: row 0's next token sees its 5 real keys only.
    following = stream[1, 5]
    step_ids = np.array([[following], [stream[2, 9]], [0]])
    mask = np.concatenate([mask, np.ones((3, 1), np.int64)], axis=1)
    decoded = _step(run, step_ids, mask, [[5], [9], [0]], present)[0]
    alone_next = _step(run, [stream[1, :6]], np.ones((1, 6)), [np.arange(6)])[0][0, -1]
    check.assert_close("tinylm", {"logits": decoded[0, 0]}, {"logits": alone_next}, tolerance)
    assert np.isfinite(decoded).all()


def test_manifest_records_the_checks_and_the_perplexities() -> None:
    manifest = json.loads((paths.artifacts_dir() / "tinylm" / "manifest.json").read_text())
    verified = manifest["verify"]
    assert set(verified["kv_cache"]) == {"fp32", "int8"}
    ppl = verified["perplexity"]
    assert ppl["fp32"] == pytest.approx(ppl["pytorch"], rel=1e-4)
    metric = manifest["variants"]["int8"]["metrics"][lm.METRIC]["onnxruntime"]
    assert metric == pytest.approx(1 - ppl["int8"] / ppl["bigram"], abs=1e-6)
    assert ppl["pytorch"] <= (1 - SPEC.build.min_accuracy) * ppl["bigram"]
    assert "Witten-Bell" in ppl["rule"]


# --- the gates refuse what they must --------------------------------------------------------------


def test_perplexity_gate_refuses_an_untrained_model(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(lm, "train", lambda source, progress=None: lm.untrained(source))
    with pytest.raises(pipeline.AccuracyError) as caught:
        pipeline.build(
            [SPEC], out=io.StringIO(), artifacts=tmp_path / "a", repository=tmp_path / "r",
            backends=("kiln_onnx",),
        )
    message = str(caught.value)
    assert message.startswith(f"model 'tinylm', stage 'train': PyTorch {lm.METRIC} -")
    assert "is below build.min_accuracy 0.2" in message
    assert not (tmp_path / "r" / "tinylm").exists()


class _PositionsFromIndex(lm.TinyLM):
    """The classic cache bug: positions counted from 0 in every call (the tensor index)."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return super().forward(input_ids, attention_mask, position_ids - position_ids[:, :1], *past)


class _MaskIgnored(lm.TinyLM):
    """Causal attention only: padding is attended."""

    def forward(self, input_ids, attention_mask, position_ids, *past):
        return super().forward(input_ids, attention_mask * 0 + 1, position_ids, *past)


def _broken_export(kind: type[lm.TinyLM], trained: lm.TinyLM, path: Path) -> lm.Runner:
    broken = kind(
        SOURCE.vocab_size, SOURCE.width, SOURCE.layers, SOURCE.heads, SOURCE.mlp_width, SOURCE.max_context
    )
    broken.load_state_dict(trained.state_dict())
    held = lm.held_out(SOURCE)
    export.export_onnx(broken.eval(), SPEC, export.example_inputs(SPEC, held.inputs), path)
    return check.artifact_runner(path, SPEC)


def test_kv_check_catches_positions_taken_from_the_index(trained, torch_run, tmp_path: Path) -> None:
    run = _broken_export(_PositionsFromIndex, trained, tmp_path / "model.onnx")
    # The prefill the check stage compares is right: only the cached path shows the bug.
    tokens = lm.evaluation(SOURCE).inputs[0, :16]
    np.testing.assert_allclose(
        lm.whole_sequence(run, SOURCE, tokens)[0], lm.whole_sequence(torch_run, SOURCE, tokens)[0],
        atol=1e-4, rtol=1e-3,
    )
    with pytest.raises(lm.KVCacheError, match=r"variant fp32: \(a\) cache vs whole sequence, prompt 0 .*: "
                       r"logits differs from PyTorch at token \d+"):
        lm.verify_variant("fp32", run, torch_run, "PyTorch", SOURCE, SPEC.build.tolerance)


def test_kv_check_catches_an_ignored_attention_mask(trained, torch_run, tmp_path: Path) -> None:
    run = _broken_export(_MaskIgnored, trained, tmp_path / "model.onnx")
    with pytest.raises(lm.KVCacheError, match=r"variant fp32: \(c\) padded batch of 4 .* vs alone, prompt \d"):
        lm.verify_variant("fp32", run, torch_run, "PyTorch", SOURCE, SPEC.build.tolerance)


@pytest.fixture(scope="module")
def int8_reference(trained: lm.TinyLM) -> pipeline._Reference:
    """The FP32 reference the pipeline gates variants against, as `_trained_reference` makes it."""
    held = lm.held_out(SOURCE)
    outputs = check.run_batched(check.torch_runner(trained, SPEC), SPEC, held.inputs)
    listed = [outputs[t.name] for t in SPEC.outputs]
    return pipeline._Reference(
        held, outputs, held.score(listed, listed), pipeline.REFERENCE_TORCH, trained, None, "torchscript"
    )


def _int8_variant(monkeypatch, tmp_path: Path, reference, settings: quantize.Int8Settings):
    """The pipeline's INT8 stage (quantize, evaluate, gate) with `settings`."""
    monkeypatch.setattr(lm, "int8_settings", lambda source: settings)
    return pipeline._build_variant(
        SPEC, SPEC.build.variants[1], 1, stage=lm, reference=reference,
        fp32=published("tinylm", "model.onnx"), log=pipeline._Log(io.StringIO()), artifacts=tmp_path,
    )


def test_int8_gate_refuses_a_quantization_past_its_budget(monkeypatch, tmp_path: Path, int8_reference) -> None:
    # Every op quantized: the -1e4 mask bias sets the attention scores' scale.
    with pytest.raises(check.BudgetError) as caught:
        _int8_variant(monkeypatch, tmp_path, int8_reference, quantize.INT8_DEFAULTS)
    error = caught.value
    assert error.variant == "int8" and error.budget == SPEC.build.variants[1].max_metric_drop
    assert error.drop > 5 * error.budget
    assert str(error).startswith(f"model 'tinylm', stage 'budget': variant int8: {lm.METRIC} ")


def test_kv_check_catches_an_int8_that_breaks_only_the_cache(monkeypatch, tmp_path: Path, int8_reference) -> None:
    # Mask-bias ops kept in FP32 but the cache Concat quantized with scales calibrated on an empty
    # past: the perplexity (prefill) stays within budget, the cached path does not.
    settings = quantize.Int8Settings(exclude_op_types=("Add", "Softmax"))
    built = _int8_variant(monkeypatch, tmp_path, int8_reference, settings)
    assert built.drop <= SPEC.build.variants[1].max_metric_drop
    run = check.artifact_runner(built.artifact, INT8)
    with pytest.raises(lm.KVCacheError, match=r"variant int8: \(a\) cache vs whole sequence"):
        lm.verify_variant("int8", run, run, "int8", SOURCE, lm.INT8_SELF_TOLERANCE)


# --- spec -----------------------------------------------------------------------------------------


def test_source_rules_name_the_fields() -> None:
    bad = replace(SPEC, build=replace(SPEC.build, source=replace(SOURCE, heads=3, prompt_tokens=250)))
    with pytest.raises(SpecError) as caught:
        validate([bad], ("kiln_onnx",))
    assert "field 'build.source.heads' must divide width 128, got 3" in str(caught.value)
    assert "'decode_tokens' must fit max_context 256, got 250 + 32" in str(caught.value)


def test_untrained_model_is_seeded_and_finite_on_padding() -> None:
    first, second = lm.untrained(SOURCE), lm.untrained(SOURCE)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    ids = torch.zeros(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    with torch.inference_mode():
        logits = first(ids, mask, torch.zeros_like(ids), *first.empty_past(2))[0]
    assert torch.isfinite(logits).all()
