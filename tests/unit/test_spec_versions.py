"""A model's version policy in the spec: validated, and rendered into config.pbtxt's version_policy.

The rendered config is parsed back through Triton's own ModelConfig schema, so a policy Triton
would not read fails here. (Serving two versions and switching between them under load is tested
against a real tritonserver in tests/integration/test_reliability_updates.py.)
"""

from __future__ import annotations

import dataclasses

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from kiln import paths, registry
from kiln.registry import by_name
from kiln.repository import render
from kiln.spec import SpecError, VersionPolicy, served_specs, validate

SPECS = registry.specs()

BACKENDS = tuple(sorted(paths.available_backends()))
FRAUD = by_name("fraud")


def with_policy(policy: VersionPolicy | None):
    """The fraud model's spec with `policy`, served as fp32 only (one served config)."""
    build = dataclasses.replace(FRAUD.build, variants=FRAUD.build.variants[:1])
    return dataclasses.replace(FRAUD, version_policy=policy, build=build)


def parsed(spec) -> model_config_pb2.ModelConfig:
    return text_format.Parse(render(spec), model_config_pb2.ModelConfig())


def problems_of(spec) -> tuple[str, ...]:
    with pytest.raises(SpecError) as caught:
        validate([spec], BACKENDS)
    return caught.value.problems


def test_no_policy_writes_nothing_and_leaves_tritons_default() -> None:
    config = parsed(with_policy(None))
    assert not config.HasField("version_policy")
    assert "version_policy" not in render(with_policy(None))
    # The committed specs declare none: their configs (checked by `kiln generate --check`) are
    # unchanged by the field's existence.
    assert all(getattr(spec, "version_policy", None) is None for spec in SPECS)


@pytest.mark.parametrize("count", [1, 2, 5])
def test_latest_n(count: int) -> None:
    spec = with_policy(VersionPolicy.latest(count))
    validate([spec], BACKENDS)
    policy = parsed(spec).version_policy
    assert policy.WhichOneof("policy_choice") == "latest"
    assert policy.latest.num_versions == count


def test_all_versions() -> None:
    spec = with_policy(VersionPolicy.all())
    validate([spec], BACKENDS)
    policy = parsed(spec).version_policy
    assert policy.WhichOneof("policy_choice") == "all"
    assert "version_policy {\n  all {\n  }\n}" in render(spec)


def test_specific_versions_keep_their_order() -> None:
    spec = with_policy(VersionPolicy.specific(3, 1))
    validate([spec], BACKENDS)
    policy = parsed(spec).version_policy
    assert policy.WhichOneof("policy_choice") == "specific"
    assert list(policy.specific.versions) == [3, 1]


def test_the_rest_of_the_config_is_untouched() -> None:
    plain, pinned = parsed(with_policy(None)), parsed(with_policy(VersionPolicy.specific(2)))
    pinned.ClearField("version_policy")
    assert pinned == plain


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        (
            VersionPolicy("newest"),
            "field 'version_policy.kind' must be one of latest, all, specific, got 'newest'",
        ),
        (
            VersionPolicy.latest(0),
            "field 'version_policy.num_versions' must be an integer >= 1, got 0",
        ),
        (
            VersionPolicy("latest", num_versions=True),
            "field 'version_policy.num_versions' must be an integer >= 1, got True",
        ),
        (
            VersionPolicy.specific(),
            "field 'version_policy.versions' must be a non-empty tuple of version numbers >= 1, "
            "got ()",
        ),
        (
            VersionPolicy.specific(1, 0),
            "field 'version_policy.versions' must be a non-empty tuple of version numbers >= 1, "
            "got (1, 0)",
        ),
        (
            VersionPolicy("specific", versions=[1, 2]),
            "field 'version_policy.versions' must be a non-empty tuple of version numbers >= 1, "
            "got [1, 2]",
        ),
        (VersionPolicy.specific(2, 2), "field 'version_policy.versions' repeats a version, got (2, 2)"),
        (
            VersionPolicy("all", versions=(1,)),
            "field 'version_policy.versions' is only allowed with kind 'specific', got kind 'all' "
            "and versions (1,)",
        ),
    ],
)
def test_invalid_policies_are_named(policy: VersionPolicy, expected: str) -> None:
    assert problems_of(with_policy(policy)) == (f"model 'fraud': {expected}",)


def test_a_policy_that_is_not_a_version_policy() -> None:
    spec = dataclasses.replace(with_policy(None), version_policy="latest")
    assert problems_of(spec) == (
        "model 'fraud': field 'version_policy' must be a VersionPolicy, got str",
    )


def test_every_served_variant_carries_the_policy() -> None:
    spec = dataclasses.replace(FRAUD, version_policy=VersionPolicy.latest(2))
    served = served_specs([spec])
    assert len(served) == len([v for v in FRAUD.build.variants if v.serve]) > 1
    for variant in served:
        assert parsed(variant).version_policy.latest.num_versions == 2
