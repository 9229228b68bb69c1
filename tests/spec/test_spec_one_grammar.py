"""The operator's validation and the controller refuse the same targets, naming the same field (one parser)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tether.common import errors
from tether.controller import releases
from tether.operator import validate

DIGEST = "sha256:" + "0" * 64


def controller_refusal(target: dict[str, Any]) -> errors.InvalidSpec:
    with pytest.raises(errors.InvalidSpec) as info:
        releases.parse_spec(
            release="ml/t",
            generation=1,
            manifest_digest=DIGEST,
            target_json=json.dumps(target),
            trigger_json="",
            aggregation_json="",
            paused=False,
        )
    return info.value


def operator_issues(target: dict[str, Any]) -> list[validate.Issue]:
    with pytest.raises(validate.SpecInvalid) as info:
        validate.validate({"bundle": {"digest": DIGEST}, "target": target})
    return list(info.value.issues)


@pytest.mark.parametrize(
    ("target", "field"),
    [
        ({"matchExpressions": [{"key": "os", "operator": "In"}]}, "target.matchExpressions[0].values"),
        (
            {"matchExpressions": [{"key": "os", "operator": "Exists", "values": ["a"]}]},
            "target.matchExpressions[0].values",
        ),
        ({"exclude": [{}]}, "target.exclude[0]"),
        (
            {"exclude": [{"matchExpressions": [{"key": "a", "operator": "DoesNotExist", "values": ["x"]}]}]},
            "target.exclude[0].matchExpressions[0].values",
        ),
        ({"matchLabels": {"bad key": "x"}}, "target.matchLabels['bad key']"),
        ({"matchVersions": {"appVersion": ">=11,<10"}}, "target.matchVersions['appVersion']"),
    ],
)
def test_both_sides_refuse_the_same_target(target: dict[str, Any], field: str) -> None:
    refused = controller_refusal(target)
    assert refused.field == field
    reason = str(refused).removeprefix(f"{field}: ")
    operator_field = "spec." + field.replace("['", ".").replace("']", "")
    assert [(i.field, i.message) for i in operator_issues(target)] == [(operator_field, reason)]


def test_the_operator_adds_its_own_rules_on_top() -> None:
    issues = operator_issues(
        {"deviceIds": ["d1", "d1"], "matchExpressions": [{"key": "k", "operator": "In", "values": ["a", "a"]}]}
    )
    assert [i.field for i in issues] == ["spec.target.matchExpressions[0].values", "spec.target.deviceIds"]
    releases.parse_spec(  # the controller takes them (the values are a set)
        release="ml/t",
        generation=1,
        manifest_digest=DIGEST,
        target_json=json.dumps({"deviceIds": ["d1", "d1"]}),
        trigger_json="",
        aggregation_json="",
        paused=False,
    )
