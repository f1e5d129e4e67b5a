"""kiln_tabular's logic without Triton: the build's standardization, every malformed input, the
dynamic batch (a bad request fails alone), and the load checks."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from kiln import tensors
from kiln.models.fraud import build as fraud
from kiln.models.fraud.spec import SOURCE
from kiln.serving.adapter import LoadContext
from kiln.serving.onnx import ModelLoadError
from kiln.serving.params import ParamError
from kiln.serving.tabular import (
    STATS_FORMAT,
    TABULAR_PARAMS,
    FeatureStandardizer,
    RecordError,
    TabularStep,
    load,
)

SMALL = dataclasses.replace(SOURCE, samples=4000)
"""The spec's data set recipe (16 features, same names), smaller so the split is quick."""
FEATURES = SMALL.features
RECORD = tensors.RECORD
VALUES = tensors.FEATURE_VALUES
OUTPUT = tensors.FRAUD_FEATURES
STATS_MODEL = "fraud"


@pytest.fixture(scope="module")
def split() -> fraud.FraudSplit:
    return fraud.load_split(SMALL)


@pytest.fixture(scope="module")
def stats_file(split, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """features.json as the build writes it (`kiln.models.fraud.build.extra_files`), in a repository
    laid out like the published one: <repo>/fraud/1/features.json."""
    folder = tmp_path_factory.mktemp("repository") / STATS_MODEL / "1"
    folder.mkdir(parents=True)
    written = fraud.extra_files(SMALL, None, folder)
    return written[fraud.FEATURES_FILE]


@pytest.fixture(scope="module")
def step(stats_file: Path) -> TabularStep:
    return TabularStep(
        FeatureStandardizer.read(stats_file), records_input=RECORD, values_input=VALUES, output=OUTPUT
    )


def as_records(*items: bytes | str) -> np.ndarray:
    array = np.empty((len(items), 1), dtype=object)
    array[:, 0] = list(items)
    return array


def good_record(split, index: int = 0) -> dict:
    return dict(zip(split.stats.names, (float(v) for v in split.raw_test[index]), strict=True))


def encode(record: dict) -> bytes:
    return json.dumps(record).encode()


def run_one(step: TabularStep, **inputs):
    (result,) = step.run([inputs])
    return result


# -- agreement with the build -------------------------------------------------------------------


def test_the_statistics_file_reads_as_the_build_wrote_it(stats_file: Path, split) -> None:
    stats = FeatureStandardizer.read(stats_file)
    assert stats.names == fraud.feature_names(SMALL)
    assert stats.names[:3] == ("amount", "hour", "account_age_days")
    np.testing.assert_array_equal(stats.mean, split.stats.mean)
    np.testing.assert_array_equal(stats.std, split.stats.std)
    assert STATS_FORMAT == fraud.FEATURES_FORMAT
    assert {p.name: p.default for p in TABULAR_PARAMS}["stats_file"] == fraud.FEATURES_FILE


def test_records_standardize_exactly_as_the_build(step: TabularStep, split) -> None:
    count = 300
    items = [encode(good_record(split, i)) for i in range(count)]
    result = run_one(step, **{RECORD: as_records(*items)})
    features = result[OUTPUT]
    assert features.dtype == np.float32 and features.shape == (count, FEATURES)
    # Bit for bit: the build's own FeatureStats on the same raw rows (its x_test).
    np.testing.assert_array_equal(features, split.x_test[:count])
    np.testing.assert_array_equal(features, split.stats.standardize(split.raw_test[:count]))


def test_feature_values_standardize_exactly_as_the_build(step: TabularStep, split) -> None:
    values = split.raw_test[:50].astype(np.float32)
    result = run_one(step, **{VALUES: values})
    np.testing.assert_array_equal(result[OUTPUT], split.stats.standardize(values.astype(np.float64)))
    # Within FP32 rounding of the raw values, the same as the float64 records give.
    np.testing.assert_allclose(result[OUTPUT], split.x_test[:50], atol=1e-5)


def test_integers_keys_in_any_order_and_whitespace_are_accepted(step: TabularStep, split) -> None:
    record = good_record(split)
    record["hour"] = 13  # a JSON integer
    text = "  " + json.dumps(dict(reversed(list(record.items()))), indent=1) + "\n"
    result = run_one(step, **{RECORD: as_records(text.encode())})
    raw = split.raw_test[:1].copy()
    raw[0, 1] = 13.0
    np.testing.assert_array_equal(result[OUTPUT], split.stats.standardize(raw))


# -- malformed records --------------------------------------------------------------------------


def _record_with(split, **changes) -> bytes:
    record = good_record(split)
    record.update(changes)
    return encode(record)


def _without(split, *names: str) -> bytes:
    record = good_record(split)
    for name in names:
        del record[name]
    return encode(record)


CASES = [
    ("invalid-json", lambda s: b'{"amount": 12.5,', "invalid_json",
     "input 'record' item 0: not valid JSON (Expecting property name enclosed in double quotes"),
    ("empty", lambda s: b"", "invalid_json", "input 'record' item 0: not valid JSON (Expecting value"),
    ("not-utf8", lambda s: b'{"amount": "\xff"}', "invalid_json", "input 'record' item 0: not UTF-8 text"),
    ("too-deep", lambda s: b"[" * 3000, "invalid_json", "input 'record' item 0: not valid JSON (nested too deeply)"),
    ("huge-integer", lambda s: _record_with(s, amount=0).replace(b'"amount": 0', b'"amount": ' + b"9" * 5000),
     "invalid_json", "input 'record' item 0: not valid JSON (Exceeds the limit (4300 digits)"),
    ("array", lambda s: b"[1, 2]", "invalid_record",
     "input 'record' item 0: expected a JSON object of named features, got an array"),
    ("number", lambda s: b"3.5", "invalid_record",
     "input 'record' item 0: expected a JSON object of named features, got float"),
    ("missing", lambda s: _without(s, "hour"), "missing_feature",
     "input 'record' item 0: missing feature(s) 'hour'; a record holds exactly these 16 features: "
     "amount, hour, account_age_days, distance_km, transactions_24h, merchant_risk, v1, v2, v3, v4, "
     "v5, v6, v7, v8, v9, v10"),
    ("unknown", lambda s: _record_with(s, country=3.0), "unknown_feature",
     "input 'record' item 0: unknown feature(s) 'country'; a record holds exactly these 16 features"),
    ("misspelled", lambda s: _without(s, "amount")[:-1] + b', "amout": 5.0}', "missing_feature",
     "input 'record' item 0: missing feature(s) 'amount'; unknown feature(s) 'amout' (did you mean "
     "'amount'?)"),
    ("duplicate", lambda s: _record_with(s)[:-1] + b', "hour": 3}', "invalid_record",
     "input 'record' item 0: key 'hour' appears more than once in the record"),
    ("string", lambda s: _record_with(s, amount="12.5"), "non_numeric",
     "input 'record' item 0: feature 'amount' must be a number, got a string \"12.5\""),
    ("boolean", lambda s: _record_with(s, merchant_risk=True), "non_numeric",
     "input 'record' item 0: feature 'merchant_risk' must be a number, got the boolean true"),
    ("null", lambda s: _record_with(s, v3=None), "non_numeric",
     "input 'record' item 0: feature 'v3' must be a number, got null"),
    ("nested", lambda s: _record_with(s, v3=[1.0]), "non_numeric",
     "input 'record' item 0: feature 'v3' must be a number, got an array"),
    ("nan", lambda s: _record_with(s, hour=float("nan")), "non_finite",
     "input 'record' item 0: feature 'hour' must be a finite number, got NaN"),
    ("infinity", lambda s: _record_with(s, v1=float("-inf")), "non_finite",
     "input 'record' item 0: feature 'v1' must be a finite number, got -Infinity"),
    ("float-overflow", lambda s: _record_with(s, amount=1.0).replace(b'"amount": 1.0', b'"amount": 1e400'),
     "non_finite", "input 'record' item 0: feature 'amount' must be a finite number, got a number too "
     "large for 64-bit floating point"),
    ("int-overflow", lambda s: _record_with(s, amount=10**400), "non_finite",
     "input 'record' item 0: feature 'amount' must be a finite number, got a number too large"),
    ("fp32-overflow", lambda s: _record_with(s, amount=1e300), "out_of_range",
     "input 'record' item 0: feature 'amount' is 1e+300, too far out of range: standardized with the "
     "build's mean"),
]


@pytest.mark.parametrize(("make", "reason", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_malformed_record_gets_its_own_clear_error(step: TabularStep, split, make, reason, message) -> None:
    result = run_one(step, **{RECORD: as_records(make(split))})
    assert isinstance(result, RecordError), result
    assert message in str(result)
    assert result.reason == reason
    assert isinstance(result, ValueError)  # INVALID_ARG on the wire


def test_an_oversized_record_is_refused_before_parsing(stats_file: Path, split) -> None:
    small = TabularStep(
        FeatureStandardizer.read(stats_file), records_input=RECORD, values_input=None,
        output=OUTPUT, max_record_bytes=100,
    )
    item = encode(good_record(split))
    result = run_one(small, **{RECORD: as_records(item)})
    assert str(result) == (
        f"input 'record' item 0: the record is {len(item)} bytes, over the limit of 100 "
        "(parameter 'max_record_bytes')"
    )


def test_the_error_names_the_bad_item_of_a_request(step: TabularStep, split) -> None:
    items = [encode(good_record(split, i)) for i in range(5)]
    items[3] = _without(split, "distance_km")
    result = run_one(step, **{RECORD: as_records(*items)})
    assert str(result).startswith("input 'record' item 3: missing feature(s) 'distance_km'")


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        (1, np.nan, "input 'feature_values' item 2: feature 'hour' (column 1) must be a finite number, got nan"),
        (7, np.inf, "input 'feature_values' item 2: feature 'v2' (column 7) must be a finite number, got inf"),
        (5, 3e38, "input 'feature_values' item 2: feature 'merchant_risk' (column 5) is 3e+38, too far out of range"),
    ],
    ids=["nan", "inf", "fp32-overflow"],
)
def test_non_finite_feature_values_are_rejected(step: TabularStep, split, column, value, message) -> None:
    values = split.raw_test[:4].astype(np.float32)
    values[2, column] = value
    result = run_one(step, **{VALUES: values})
    assert isinstance(result, RecordError)
    assert message in str(result)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "send exactly one of the inputs 'record' and 'feature_values', got neither"),
        ({RECORD: None, VALUES: None}, "send exactly one of the inputs 'record' and 'feature_values', got neither"),
        ("both", "send exactly one of the inputs 'record' and 'feature_values', got both"),
        ({VALUES: np.zeros((2, FEATURES - 1), np.float32)}, "input 'feature_values' has shape [2, 15]; expected [-1, 16]"),
        ({VALUES: np.zeros((2, FEATURES), np.float64)}, "input 'feature_values' has dtype float64; expected float32"),
        ({RECORD: np.empty((0, 1), dtype=object)}, "input 'record' has an empty batch (batch size 0)"),
        ({RECORD: np.array([[1.5]], dtype=object)}, "input 'record' item 0: expected UTF-8 bytes holding a JSON object, got float"),
    ],
    ids=["neither", "both-none", "both", "values-shape", "values-dtype", "empty-batch", "not-bytes"],
)
def test_the_wrong_inputs_are_refused(step: TabularStep, split, inputs, message: str) -> None:
    if inputs == "both":
        inputs = {RECORD: as_records(encode(good_record(split))), VALUES: split.raw_test[:1].astype(np.float32)}
    (result,) = step.run([inputs])
    assert isinstance(result, ValueError)
    assert str(result) == message


def test_a_step_with_only_a_records_input_asks_for_it(stats_file: Path) -> None:
    only = TabularStep(FeatureStandardizer.read(stats_file), records_input=RECORD, values_input=None, output=OUTPUT)
    assert str(run_one(only)) == "missing input 'record'"


# -- the dynamic batch --------------------------------------------------------------------------


def test_bad_requests_fail_alone_and_the_batch_is_standardized_together(step: TabularStep, split) -> None:
    requests = [
        {RECORD: as_records(*(encode(good_record(split, i)) for i in range(3)))},
        {RECORD: as_records(_without(split, "merchant_risk"))},
        {VALUES: split.raw_test[3:5].astype(np.float32)},
        {RECORD: as_records(_record_with(split, amount=float("nan")))},
        {RECORD: as_records(encode(good_record(split, 5)))},
        {},
    ]
    results = step.run(requests)
    np.testing.assert_array_equal(results[0][OUTPUT], split.x_test[:3])
    assert "missing feature(s) 'merchant_risk'" in str(results[1])
    np.testing.assert_array_equal(
        results[2][OUTPUT], split.stats.standardize(split.raw_test[3:5].astype(np.float32).astype(np.float64))
    )
    assert "feature 'amount' must be a finite number, got NaN" in str(results[3])
    np.testing.assert_array_equal(results[4][OUTPUT], split.x_test[5:6])
    assert "got neither" in str(results[5])


def test_an_all_bad_batch_returns_only_errors(step: TabularStep) -> None:
    results = step.run([{RECORD: as_records(b"{}")}, {}])
    assert all(isinstance(r, RecordError) for r in results)


# -- the statistics file and loading ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "'format' must be 1, got 2"),
        ({"features": ["a", "a"]}, "'features' must be a list of unique names"),
        ({"mean": [0.0]}, "'mean' must be 16 finite numbers (one per feature)"),
        ({"std": [1.0] * 15 + [0.0]}, "every 'std' must be > 0"),
        ({"std": [1.0] * 15 + [float("nan")]}, "'std' must be 16 finite numbers"),
    ],
    ids=["format", "duplicate-names", "mean-length", "zero-std", "nan-std"],
)
def test_a_malformed_statistics_document_is_refused(split, change, message: str) -> None:
    document = {**split.stats.to_json(), **change}
    with pytest.raises(ValueError, match="features.json: ") as caught:
        FeatureStandardizer.from_document(document, "features.json")
    assert message in str(caught.value)


def config(inputs=None, outputs=None, mbs: int = 256, **params: str) -> dict:
    return {
        "max_batch_size": mbs,
        "input": inputs if inputs is not None else [
            {"name": RECORD, "data_type": "TYPE_STRING", "dims": ["1"], "optional": True},
            {"name": VALUES, "data_type": "TYPE_FP32", "dims": [str(FEATURES)], "optional": True},
        ],
        "output": outputs if outputs is not None else [
            {"name": OUTPUT, "data_type": "TYPE_FP32", "dims": [str(FEATURES)]},
        ],
        "parameters": {k: {"string_value": v} for k, v in params.items()},
    }


def context(stats_file: Path, model_config: dict) -> LoadContext:
    repository = stats_file.parent.parent.parent
    params = {k: v["string_value"] for k, v in model_config["parameters"].items()}
    return LoadContext("fraud_features", repository / "fraud_features", repository / "fraud_features" / "1",
                       model_config, params)


def test_load_reads_the_published_statistics(stats_file: Path, split) -> None:
    step = load(context(stats_file, config(stats_model=STATS_MODEL)))
    assert (step.records_input, step.values_input, step.output) == (RECORD, VALUES, OUTPUT)
    np.testing.assert_array_equal(step.stats.mean, split.stats.mean)
    assert step.max_record_bytes == 65_536


@pytest.mark.parametrize(
    ("model_config", "error", "message"),
    [
        (config(), ModelLoadError, "model 'fraud_features': parameter 'stats_model' is required"),
        (config(stats_model="nothing"), ModelLoadError, "model 'fraud_features': 'features.json' of model 'nothing' not found"),
        (config(stats_model=STATS_MODEL, stats_file="other.json"), ModelLoadError, "'other.json' of model 'fraud' not found"),
        (config(stats_model=STATS_MODEL, colour="red"), ParamError, "model 'fraud_features': unknown parameter 'colour'; allowed: max_record_bytes, stats_file, stats_model"),
        (config(stats_model=STATS_MODEL, max_record_bytes="1"), ParamError, "parameter 'max_record_bytes' must be an integer >= 2, got '1'"),
        (config(outputs=[{"name": OUTPUT, "data_type": "TYPE_FP32", "dims": ["8"]}], stats_model=STATS_MODEL),
         ModelLoadError, "kiln_tabular has one output, FP32 [16] (16 features in"),
        (config(inputs=[{"name": VALUES, "data_type": "TYPE_FP32", "dims": ["8"]}], stats_model=STATS_MODEL),
         ModelLoadError, "input 'feature_values' is TYPE_FP32 [8]; kiln_tabular takes one BYTES [1] input"),
        (config(inputs=[], stats_model=STATS_MODEL), ModelLoadError, "kiln_tabular needs a records or a values input"),
        (config(mbs=0, stats_model=STATS_MODEL), ModelLoadError, "kiln_tabular needs max_batch_size >= 1"),
    ],
    ids=["no-stats-model", "unknown-model", "unknown-file", "unknown-param", "bad-limit", "output-dims",
         "input-dims", "no-inputs", "unbatched"],
)
def test_load_fails_with_a_clear_message(stats_file: Path, model_config, error, message: str) -> None:
    with pytest.raises(error) as caught:
        load(context(stats_file, model_config))
    assert message in str(caught.value)


def test_load_accepts_a_records_only_model(stats_file: Path) -> None:
    inputs = [{"name": "transaction", "data_type": "TYPE_STRING", "dims": ["1"]}]
    step = load(context(stats_file, config(inputs=inputs, stats_model=STATS_MODEL)))
    assert (step.records_input, step.values_input) == ("transaction", None)
