"""kiln_text without Triton: the build's encoding exactly, padding and truncation, every bad text
failing its own request, parameters and load checks; and the text_embedder specs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from kiln import paths, registry, tensors
from kiln.models.text_encoder import build as te
from kiln.models.text_encoder import pipeline as pipelines
from kiln.models.text_encoder.reference import prepared_encoder
from kiln.registry import by_name
from kiln.repository import render
from kiln.serving.adapter import LoadContext, failure_reason
from kiln.serving.params import ParamError, parse_params
from kiln.serving.text import (
    TEXT_PARAMS,
    TextInputError,
    TextLoadError,
    TextParams,
    TextTokenizer,
    bucket_of,
    check_config,
    check_text_params,
    load,
    parse_buckets,
)
from kiln.spec import SpecError, validate

SPECS = registry.specs()

ENCODER = by_name("text_encoder")
SOURCE = ENCODER.build.source
MAX_LENGTH = SOURCE.max_length
LONG = " ".join(
    ["The dispatcher looks up the handler registered for the request's method and calls it;"] * 20
)
TEXTS = (
    "Return the sum of the values.",
    LONG,
    "Crème brûlée, naïve café, Ångström: ÉTÉ à Zürich!",
    "中文字符 and emoji 😀🚀 mixed with ASCII",
    "Punctuation... lots of it?! (yes) [really] {braces} <angle> -- dashes; semi:colons 'quotes' \"double\"",
    "  leading and trailing whitespace\tand\ttabs\nand newlines  ",
    "x",
    "UPPER lower MiXeD 12345 3.14159 1e-10 #hash @at $dollar %percent ^caret &amp *star",
    "Zero\u200bwidth space and the Greek λόγος and Cyrillic слово",
)
"""Short, long beyond max_length, accents, CJK and emoji, punctuation, whitespace, one letter,
case and digits, zero-width and non-Latin scripts."""


@pytest.fixture(scope="module")
def tokenizer():
    """The build's tokenizer for the spec (the tokenizer.json the build publishes)."""
    return te.train_tokenizer(SOURCE)


@pytest.fixture(scope="module")
def tokenizer_file(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text_encoder_1")
    return te.save_tokenizer(tokenizer, folder)[te.TOKENIZER_FILE]


def params(**overrides: str) -> TextParams:
    return parse_params("text_tokenizer", overrides, TEXT_PARAMS, TextParams)


@pytest.fixture(scope="module")
def step(tokenizer_file: Path) -> TextTokenizer:
    return TextTokenizer.from_file(tokenizer_file, params(max_length=str(MAX_LENGTH)))


def request(*texts: str | bytes) -> dict[str, np.ndarray]:
    items = [t.encode() if isinstance(t, str) else t for t in texts]
    return {tensors.TEXT: np.array(items, dtype=object).reshape(-1, 1)}


def outputs(result) -> tuple[np.ndarray, np.ndarray]:
    assert isinstance(result, dict), result
    assert set(result) == {tensors.TEXT_INPUT_IDS, tensors.TEXT_ATTENTION_MASK}
    return result[tensors.TEXT_INPUT_IDS], result[tensors.TEXT_ATTENTION_MASK]


# -- the build's encoding, exactly ----------------------------------------------------------------


def test_one_request_of_texts_equals_the_builds_encode(step: TextTokenizer, tokenizer) -> None:
    ids, mask = outputs(step.run([request(*TEXTS)])[0])
    want_ids, want_mask = te.encode(tokenizer, TEXTS, MAX_LENGTH)
    assert ids.dtype == mask.dtype == np.int64
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)


def test_each_request_of_a_dynamic_batch_is_encoded_and_padded_on_its_own(step, tokenizer) -> None:
    groups = [TEXTS[0:1], TEXTS[1:3], TEXTS[3:7], TEXTS[7:]]
    results = step.run([request(*g) for g in groups])
    for group, result in zip(groups, results, strict=True):
        ids, mask = outputs(result)
        want_ids, want_mask = te.encode(tokenizer, group, MAX_LENGTH)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(mask, want_mask)
        assert ids.shape[1] == int(mask.sum(axis=1).max())  # padded to this request's longest only


class CountingTokenizer:
    """Wraps a tokenizer and records each encode_batch call's texts."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.calls: list[list[str]] = []

    def encode_batch(self, texts: Sequence[str]):
        self.calls.append(list(texts))
        return self.inner.encode_batch(texts)


def test_a_dynamic_batch_is_tokenized_in_one_encode_batch_call(tokenizer_file: Path) -> None:
    step = TextTokenizer.from_file(tokenizer_file, params())
    spy = step.tokenizer = CountingTokenizer(step.tokenizer)
    results = step.run([request(TEXTS[0]), request(""), request(*TEXTS[1:4]), request(TEXTS[4])])
    assert spy.calls == [[TEXTS[0], *TEXTS[1:4], TEXTS[4]]]  # the bad request never reaches it
    assert [isinstance(r, dict) for r in results] == [True, False, True, True]


def test_padding_uses_the_pad_id_and_a_zero_mask(step: TextTokenizer, tokenizer) -> None:
    ids, mask = outputs(step.run([request("short", "a somewhat longer text than the first one")])[0])
    length = int(mask[0].sum())
    assert tokenizer.token_to_id(te.PAD_TOKEN) == te.PAD_ID
    assert (ids[0, length:] == te.PAD_ID).all() and (mask[0, length:] == 0).all()
    assert (mask[0, :length] == 1).all() and (mask[1] == 1).all()
    assert ids[0, 0] == tokenizer.token_to_id(te.CLS_TOKEN)
    assert ids[0, length - 1] == tokenizer.token_to_id(te.SEP_TOKEN)


def test_texts_over_max_length_tokens_are_truncated_keeping_sep(tokenizer_file: Path, tokenizer) -> None:
    short = TextTokenizer.from_file(tokenizer_file, params(max_length="8"))
    ids, mask = outputs(short.run([request(LONG, "tiny")])[0])
    assert ids.shape == (2, 8)
    assert ids[0, -1] == tokenizer.token_to_id(te.SEP_TOKEN) and mask[0].all()
    want_ids, want_mask = te.encode(tokenizer, [LONG, "tiny"], 8)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)


def test_the_served_length_never_exceeds_max_length(step: TextTokenizer) -> None:
    ids, _ = outputs(step.run([request(LONG * 3)])[0])
    assert ids.shape == (1, MAX_LENGTH)


def test_with_truncation_off_a_too_long_text_fails_its_own_request(tokenizer_file: Path, tokenizer) -> None:
    strict = TextTokenizer.from_file(tokenizer_file, params(max_length="8", truncation="false"))
    results = strict.run([request("tiny", LONG), request("tiny")])
    untruncated = tokenizer.__class__.from_str(tokenizer.to_str())
    untruncated.no_truncation()
    full = len(untruncated.encode(LONG).ids)
    assert full > 8
    assert isinstance(results[0], TextInputError)
    assert str(results[0]).startswith(f"input 'text' item 1 is {full} tokens long")
    assert "over max_length 8, and truncation is off" in str(results[0])
    assert results[0].reason == "too_many_tokens"
    ids, _ = outputs(results[1])
    np.testing.assert_array_equal(ids, te.encode(tokenizer, ["tiny"], 8)[0])


def test_the_references_prepared_encoder_equals_encode(tokenizer) -> None:
    encode = prepared_encoder(tokenizer, MAX_LENGTH)
    for texts in (TEXTS, TEXTS[:1], TEXTS[2:5]):
        for got, want in zip(encode(texts), te.encode(tokenizer, texts, MAX_LENGTH), strict=True):
            np.testing.assert_array_equal(got, want)


# -- length buckets: requests of different lengths leave in a few shapes -----------------------------

BUCKETS = "16,32,64"


def bucketed(tokenizer_file: Path, **overrides: str) -> TextTokenizer:
    return TextTokenizer.from_file(tokenizer_file, params(**{"length_buckets": BUCKETS, **overrides}))


def test_each_request_is_padded_to_the_smallest_bucket_holding_its_longest_text(tokenizer_file, tokenizer) -> None:
    step = bucketed(tokenizer_file)
    assert step.buckets == (16, 32, 64, MAX_LENGTH)  # max_length is always the last bucket
    groups = [TEXTS[6:7], TEXTS[0:1], TEXTS[2:5], TEXTS[1:2], (LONG[:150],), (LONG[:300],)]
    for group, result in zip(groups, step.run([request(*g) for g in groups]), strict=True):
        ids, mask = outputs(result)
        want_ids, want_mask = te.encode(tokenizer, group, MAX_LENGTH)  # the unpadded encoding
        longest = want_ids.shape[1]
        seq = min(b for b in step.buckets if b >= longest)
        assert ids.shape == mask.shape == (len(group), seq), (group, longest)
        np.testing.assert_array_equal(ids[:, :longest], want_ids)
        np.testing.assert_array_equal(mask[:, :longest], want_mask)
        assert (ids[:, longest:] == te.PAD_ID).all() and (mask[:, longest:] == 0).all()
    shapes = {outputs(r)[0].shape[1] for r in step.run([request(t) for t in TEXTS])}
    assert shapes <= set(step.buckets) and len(shapes) < len(TEXTS)


def test_a_bucket_wider_than_every_text_of_the_batch_is_padded_with_pad_and_zero_mask(tokenizer_file, tokenizer) -> None:
    ids, mask = outputs(bucketed(tokenizer_file, length_buckets="40").run([request("x", "tiny")])[0])
    want_ids, want_mask = te.encode(tokenizer, ["x", "tiny"], MAX_LENGTH)
    assert ids.shape == (2, 40) and want_ids.shape[1] < 40
    np.testing.assert_array_equal(ids[:, : want_ids.shape[1]], want_ids)
    np.testing.assert_array_equal(mask[:, : want_ids.shape[1]], want_mask)
    assert (ids[:, want_ids.shape[1] :] == te.PAD_ID).all() and not mask[:, want_ids.shape[1] :].any()


def test_pad_batch_gives_every_request_of_a_batch_the_bucket_of_its_longest_text(tokenizer_file, tokenizer) -> None:
    step = bucketed(tokenizer_file, pad_batch="true")
    results = step.run([request("x"), request(""), request(TEXTS[0], TEXTS[2]), request(TEXTS[4])])
    assert isinstance(results[1], TextInputError)  # a bad request still fails alone
    longest = max(te.encode(tokenizer, [t], MAX_LENGTH)[0].shape[1] for t in ("x", *TEXTS[0:5:2]))
    seq = min(b for b in step.buckets if b >= longest)
    for index, texts in ((0, ("x",)), (2, (TEXTS[0], TEXTS[2])), (3, (TEXTS[4],))):
        ids, mask = outputs(results[index])
        want_ids, want_mask = te.encode(tokenizer, texts, MAX_LENGTH)
        assert ids.shape == (len(texts), seq)
        np.testing.assert_array_equal(ids[:, : want_ids.shape[1]], want_ids)
        np.testing.assert_array_equal(mask[:, : want_ids.shape[1]], want_mask)
        assert not mask[:, want_ids.shape[1]:].any()


def test_pad_batch_without_buckets_pads_to_the_batchs_longest_text(tokenizer_file, tokenizer) -> None:
    step = TextTokenizer.from_file(tokenizer_file, params(pad_batch="true"))
    results = step.run([request("x"), request(TEXTS[4])])
    width = te.encode(tokenizer, [TEXTS[4]], MAX_LENGTH)[0].shape[1]
    assert [outputs(r)[0].shape for r in results] == [(1, width), (1, width)]


def test_with_buckets_a_truncation_off_error_still_fails_its_own_request(tokenizer_file) -> None:
    strict = TextTokenizer.from_file(
        tokenizer_file, params(max_length="8", truncation="false", length_buckets="3")
    )
    results = strict.run([request("tiny", LONG), request("x")])
    assert isinstance(results[0], TextInputError) and "item 1 is" in str(results[0])
    assert "over max_length 8, and truncation is off" in str(results[0])
    assert outputs(results[1])[0].shape == (1, 3)  # [CLS] x [SEP] fills the bucket 3


BUCKET_KIND = "parameter 'length_buckets' must be a comma-separated list of integers, each >= 3"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("16,abc", f"{BUCKET_KIND}, got '16,abc'"),
        ("8,x", f"{BUCKET_KIND}, got '8,x'"),
        ("0", f"{BUCKET_KIND}, got '0'"),
        ("2,16", f"{BUCKET_KIND}, got '2,16'"),
        ("8.5", f"{BUCKET_KIND}, got '8.5'"),
        (" , ", f"{BUCKET_KIND}, got ' , '"),
        ("16,256", "parameter 'length_buckets' holds 256 in '16,256'; each bucket must be between 3 "
         "and max_length 128"),
        ("16,8", "parameter 'length_buckets' must be strictly increasing, got '16,8'"),
        ("16,16", "parameter 'length_buckets' must be strictly increasing, got '16,16'"),
    ],
    ids=["not-an-integer", "letter", "zero", "below-3", "not-whole", "no-item", "over-max-length",
         "decreasing", "repeated"],
)
def test_kiln_generate_and_the_load_refuse_bad_length_buckets_with_one_message(
    tokenizer_file: Path, tmp_path: Path, value: str, message: str
) -> None:
    spec = by_name(pipelines.TOKENIZER)
    spec = dataclasses.replace(spec, parameters={**spec.parameters, "length_buckets": value})
    # `kiln generate`: the spec's validation names the model, the key and the value
    with pytest.raises(SpecError) as caught:
        validate([spec], paths.available_backends())
    assert caught.value.problems == (
        f"model '{spec.name}': field 'parameters': model '{spec.name}': {message}",
    )
    # the backend's initialize (kiln_text's load, on the config kiln generate would write) says the same
    published = tmp_path / "text_encoder" / "1"
    published.mkdir(parents=True)
    (published / te.TOKENIZER_FILE).write_bytes(tokenizer_file.read_bytes())
    model_dir = tmp_path / spec.name
    context = LoadContext(spec.name, model_dir, model_dir / "1", config_json(), dict(spec.parameters))
    with pytest.raises((ParamError, TextLoadError)) as loaded:
        load(context)
    assert str(loaded.value) == f"model '{spec.name}': {message}"


@pytest.mark.parametrize(
    ("buckets", "message"),
    [
        ((2, 16), r"parameter 'length_buckets' holds 2 in '2,16'; each bucket must be between 3 and max_length 128"),
        ((16, 256), r"parameter 'length_buckets' holds 256 in '16,256'; each bucket must be between 3 and max_length 128"),
        ((32, 16), r"parameter 'length_buckets' must be strictly increasing, got '32,16'"),
    ],
    ids=["below-3", "over-max-length", "decreasing"],
)
def test_buckets_given_past_the_parameters_still_fail_the_tokenizer(tokenizer_file, buckets, message: str) -> None:
    bad = dataclasses.replace(params(), length_buckets=buckets)  # not through the "ints" kind
    with pytest.raises(TextLoadError, match=rf"^model 'tok': {message}$"):
        TextTokenizer.from_file(tokenizer_file, bad, "tok")


def test_bucket_parameters_parse_and_malformed_ones_are_param_errors() -> None:
    assert params().length_buckets == () and params().pad_batch is False
    assert params(length_buckets=" 16, 32 ,64").length_buckets == (16, 32, 64)
    assert params(length_buckets="16,").length_buckets == (16,)
    assert parse_buckets((16, 32, 64), 128) == (16, 32, 64, 128)
    assert parse_buckets((16, 128), 128) == (16, 128)
    assert parse_buckets((), 128) == ()
    assert [bucket_of(n, (16, 32, 128)) for n in (3, 16, 17, 33, 128)] == [16, 16, 32, 128, 128]
    assert bucket_of(7, ()) == 7 and bucket_of(200, (16, 128)) == 200
    with pytest.raises(ParamError, match=rf"{BUCKET_KIND}, got ' , '"):
        params(length_buckets=" , ")
    with pytest.raises(ParamError, match=r"parameter 'pad_batch' must be true or false, got 'maybe'"):
        params(pad_batch="maybe")
    check_text_params("tok", {"length_buckets": (8, 16), "max_length": 16})  # 16 = max_length is fine
    with pytest.raises(TextLoadError, match=r"^model 'tok': parameter 'length_buckets' holds 32 in '8,32'"):
        check_text_params("tok", {"length_buckets": (8, 32), "max_length": 16})


# -- bad texts: each fails its own request, naming the item ----------------------------------------

LIMIT = 64


@pytest.mark.parametrize(
    ("bad", "message", "reason"),
    [
        (b"", "input 'text' item 1 is an empty text", "empty_text"),
        (b" \t\n \xc2\xa0", "input 'text' item 1 is only whitespace (6 bytes)", "empty_text"),
        (b"caf\xc3", "input 'text' item 1 is not valid UTF-8: unexpected end of data at byte 3 (0xc3) of 4",
         "invalid_utf8"),
        (b"ok \xff then", "input 'text' item 1 is not valid UTF-8: invalid start byte at byte 3 (0xff) of 9",
         "invalid_utf8"),
        (b"\xed\xa0\x80 surrogate", "item 1 is not valid UTF-8: invalid continuation byte at byte 0", "invalid_utf8"),
        (b"a" * (LIMIT + 1), f"input 'text' item 1 is too long: {LIMIT + 1} bytes of UTF-8, over the limit of "
         f"{LIMIT} bytes (parameter max_text_bytes)", "text_too_long"),
        ("é".encode() * (LIMIT // 2 + 1), f"item 1 is too long: {LIMIT + 2} bytes", "text_too_long"),
        ("\u200b\u200b".encode(), "input 'text' item 1 has no token left after normalization", "empty_text"),
        (b"\x00\x01\x02", "input 'text' item 1 has no token left after normalization", "empty_text"),
    ],
    ids=["empty", "whitespace", "truncated-utf8", "invalid-start-byte", "surrogate", "over-max-bytes",
         "over-max-bytes-multibyte", "zero-width-only", "control-only"],
)
def test_a_bad_text_fails_its_own_request_and_the_batch_goes_on(
    tokenizer_file: Path, tokenizer, bad: bytes, message: str, reason: str
) -> None:
    step = TextTokenizer.from_file(tokenizer_file, params(max_text_bytes=str(LIMIT)))
    results = step.run([request("first good"), request("fine", bad, "also fine"), request("last good")])
    error = results[1]
    assert isinstance(error, TextInputError) and isinstance(error, ValueError)
    assert message in str(error)
    assert error.reason == reason and failure_reason(error) == reason
    for index, text in ((0, "first good"), (2, "last good")):
        ids, _ = outputs(results[index])
        np.testing.assert_array_equal(ids, te.encode(tokenizer, [text], MAX_LENGTH)[0])


def test_a_text_of_exactly_max_text_bytes_is_accepted(tokenizer_file: Path) -> None:
    step = TextTokenizer.from_file(tokenizer_file, params(max_text_bytes=str(LIMIT)))
    ids, _ = outputs(step.run([request("é" * (LIMIT // 2))])[0])
    assert ids.shape[0] == 1


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "missing input 'text'"),
        ({tensors.TEXT: np.array([[b"a", b"b"]], dtype=object)}, "input 'text' has shape [1, 2]; expected [-1, 1]"),
        ({tensors.TEXT: np.zeros((0, 1), dtype=object)}, "input 'text' has shape [0, 1]"),
        ({tensors.TEXT: np.array([[3]], dtype=object)}, "input 'text' item 0 must be UTF-8 bytes, got a int"),
    ],
    ids=["missing", "wrong-shape", "empty-batch", "not-bytes"],
)
def test_malformed_requests_get_clear_errors(step: TextTokenizer, inputs, message: str) -> None:
    results = step.run([inputs, request("good")])
    assert isinstance(results[0], TextInputError)
    assert message in str(results[0])
    outputs(results[1])


# -- parameters, config and load --------------------------------------------------------------------


def test_params_defaults_and_errors() -> None:
    parsed = params()
    assert (parsed.tokenizer_model, parsed.tokenizer_file) == ("text_encoder", te.TOKENIZER_FILE)
    assert (parsed.max_length, parsed.truncation, parsed.pad_token) == (128, True, te.PAD_TOKEN)
    with pytest.raises(ParamError, match=r"parameter 'max_length' must be an integer >= 3, got '2'"):
        params(max_length="2")
    with pytest.raises(ParamError, match=r"parameter 'max_text_bytes' must be an integer >= 1, got 'lots'"):
        params(max_text_bytes="lots")
    with pytest.raises(ParamError, match=r"unknown parameter 'lowercase'; allowed: length_buckets, max_length"):
        params(lowercase="true")


def test_a_pad_token_missing_from_the_vocabulary_fails_the_load(tokenizer_file: Path) -> None:
    with pytest.raises(TextLoadError, match=r"model 'tok': the tokenizer has no token '<pad>'"):
        TextTokenizer.from_file(tokenizer_file, params(pad_token="<pad>"), "tok")


def test_an_unreadable_tokenizer_file_fails_the_load(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(TextLoadError, match=r"model 'tok': cannot load the tokenizer .*tokenizer.json"):
        TextTokenizer.from_file(bad, params(), "tok")


def config_json(text_type: str = "TYPE_STRING", ids_name: str = tensors.TEXT_INPUT_IDS) -> dict:
    return {
        "max_batch_size": 32,
        "input": [{"name": tensors.TEXT, "data_type": text_type, "dims": ["1"]}],
        "output": [
            {"name": ids_name, "data_type": "TYPE_INT64", "dims": ["-1"]},
            {"name": tensors.TEXT_ATTENTION_MASK, "data_type": "TYPE_INT64", "dims": ["-1"]},
        ],
    }


def test_load_finds_the_published_tokenizer_beside_the_encoder(tokenizer_file: Path, tmp_path: Path) -> None:
    published = tmp_path / "text_encoder" / "1"
    published.mkdir(parents=True)
    (published / te.TOKENIZER_FILE).write_bytes(tokenizer_file.read_bytes())
    model_dir = tmp_path / "text_tokenizer"
    context = LoadContext(
        "text_tokenizer", model_dir, model_dir / "1", config_json(), {"max_length": "16"}
    )
    step = load(context)
    assert step.params.max_length == 16
    ids, _ = outputs(step.run([request(LONG)])[0])
    assert ids.shape == (1, 16)


def test_config_must_declare_the_backends_tensors() -> None:
    check_config("tok", config_json())
    with pytest.raises(TextLoadError, match=r"must declare input 'text' of TYPE_STRING"):
        check_config("tok", config_json(text_type="TYPE_INT64"))
    with pytest.raises(TextLoadError, match=r"must declare output 'input_ids' of TYPE_INT64"):
        check_config("tok", config_json(ids_name="ids"))


# -- the specs -------------------------------------------------------------------------------------


def test_text_pipeline_specs_validate_and_honor_the_pipeline_contract() -> None:
    validate(SPECS, paths.available_backends())
    embedder = by_name(tensors.TEXT_EMBEDDER)
    assert [(t.name, t.dtype, t.dims) for t in embedder.inputs] == [(tensors.TEXT, "BYTES", (1,))]
    assert [(t.name, t.dtype, t.dims) for t in embedder.outputs] == [(tensors.EMBEDDING, "FP32", (256,))]
    assert embedder.max_batch_size == 32
    assert [s.model for s in embedder.steps] == [pipelines.TOKENIZER, ENCODER.name, pipelines.POOL]
    for name in (pipelines.TOKENIZER, pipelines.POOL):
        model = by_name(name)
        assert model.dynamic_batching is not None
        assert embedder.max_batch_size <= model.max_batch_size <= ENCODER.max_batch_size
    tokenizer_params = params(**by_name(pipelines.TOKENIZER).parameters)
    assert tokenizer_params.max_length == SOURCE.max_length
    assert tokenizer_params.tokenizer_model == ENCODER.name


def test_the_ensemble_feeds_one_mask_to_the_encoder_and_the_pool() -> None:
    text = render(dataclasses.replace(by_name(tensors.TEXT_EMBEDDER), form="ensemble"))
    assert 'platform: "ensemble"' in text
    assert text.count(f'value: "{tensors.TEXT_ATTENTION_MASK}"') == 3  # produced once, consumed twice
    tokenizer_config = render(by_name(pipelines.TOKENIZER))
    assert 'backend: "kiln_text"' in tokenizer_config and "TYPE_STRING" in tokenizer_config


def test_a_tokenizer_spec_with_a_too_short_max_length_fails_validation() -> None:
    spec = dataclasses.replace(by_name(pipelines.TOKENIZER), parameters={"max_length": "2"})
    with pytest.raises(Exception, match=r"parameter 'max_length' must be an integer >= 3, got '2'"):
        validate([spec], paths.available_backends())
