"""INT8 settings are a model's own choice in its spec (BuildSpec.int8), validated with the spec
and recorded in the manifest."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest

from kiln import paths
from kiln.build import pipeline
from kiln.models.digits.spec import SPEC as DIGITS
from kiln.spec import Int8Options, SpecError, Variant, validate

FAST = replace(
    DIGITS,
    build=replace(
        DIGITS.build,
        source=replace(DIGITS.build.source, epochs=2),
        min_accuracy=None,
        variants=(Variant("fp32"), Variant("int8", max_metric_drop=1.0)),
    ),
)


def test_the_spec_s_int8_options_are_used_and_recorded(tmp_path: Path) -> None:
    options = Int8Options(method="percentile", per_channel=False, exclude_op_types=("Gemm",))
    spec = replace(FAST, build=replace(FAST.build, int8=options))
    out = io.StringIO()
    pipeline.build(
        [spec], out=out, artifacts=tmp_path / "a", repository=tmp_path / "r",
        backends=paths.available_backends(),
    )
    manifest = json.loads((tmp_path / "a" / "digits" / "manifest.json").read_text())
    recorded = manifest["variants"]["int8"]["int8"]
    assert (recorded["method"], recorded["per_channel"], recorded["exclude_op_types"]) == (
        "percentile", False, ["Gemm"]
    )
    assert recorded["reduce_range"] is True  # not set in the spec: the default stays
    assert "int8: calibrating on 256 held-out calibration items (percentile," in out.getvalue()


def test_int8_options_are_validated_with_the_spec() -> None:
    bad = Int8Options(method="kl", weight_type="int4", per_channel="yes", exclude_op_types="Gemm", batch_size=0)
    with pytest.raises(SpecError) as error:
        validate([replace(FAST, build=replace(FAST.build, int8=bad))], paths.available_backends())
    text = str(error.value)
    assert "field 'build.int8.method' must be one of minmax, percentile, entropy, got 'kl'" in text
    assert "field 'build.int8.weight_type' must be one of quint8, qint8, got 'int4'" in text
    assert "field 'build.int8.per_channel' must be true or false, got 'yes'" in text
    assert "field 'build.int8.exclude_op_types' must be a tuple of names, got 'Gemm'" in text
    assert "field 'build.int8.batch_size' must be an integer >= 1, got 0" in text
