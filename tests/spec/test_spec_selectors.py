"""The one selector grammar (tether.spec.selectors): both callers' field paths, shared messages, matching."""

from __future__ import annotations

from typing import Any

import pytest

from tether.common import errors
from tether.spec import selectors, staging


def facts(device_id: str = "d1", **attributes: str) -> selectors.Facts:
    out = {k: frozenset((v,)) for k, v in attributes.items()}
    out[selectors.DEVICE_ID_KEY] = frozenset((device_id,))
    return out


@pytest.mark.parametrize(
    ("doc", "subscript_field", "dotted_field"),
    [
        ({"matchLabels": {"bad key": "x"}}, "target.matchLabels['bad key']", "target.matchLabels.bad key"),
        ({"matchVersions": {"appVersion": ">=11,<10"}}, "target.matchVersions['appVersion']", None),
        ({"exclude": [{"matchVersions": {"os": "x"}}]}, "target.exclude[0].matchVersions['os']", None),
    ],
)
def test_map_keys_are_named_the_callers_way(
    doc: dict[str, Any], subscript_field: str, dotted_field: str | None
) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        selectors.parse_target(doc)
    assert info.value.field == subscript_field
    with pytest.raises(errors.InvalidSpec) as info:
        selectors.parse_target(doc, field="spec.target", keyed=selectors.dotted)
    expected = dotted_field or subscript_field.replace("['", ".").replace("']", "")
    assert info.value.field == "spec." + expected


@pytest.mark.parametrize(
    ("expression", "fragments"),
    [
        ({"key": "os", "operator": "In"}, ("at least one value",)),
        ({"key": "os", "operator": "Exists", "values": ["a"]}, ("must be empty", "takes no values")),
        ({"key": "os", "operator": "Like", "values": ["a"]}, ("is not one of",)),
    ],
)
def test_expression_messages_serve_both_sides(expression: dict[str, Any], fragments: tuple[str, ...]) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        selectors.parse_target({"matchExpressions": [expression]})
    assert all(f in str(info.value) for f in fragments), str(info.value)


def test_a_selector_has_no_exclusions_of_its_own() -> None:
    with pytest.raises(errors.InvalidSpec, match="unknown fields") as info:
        selectors.parse_selector({"exclude": []}, field="cohort")
    assert info.value.field == "cohort"
    assert selectors.parse_target({"exclude": [{"deviceIds": ["d2"]}]}).exclude[0].device_ids == {"d2"}


def test_an_empty_cohort_is_refused_with_the_callers_path() -> None:
    with pytest.raises(errors.InvalidSpec, match="every device") as info:
        staging.parse_cohort({}, field="spec.rollout.stages[0].cohort", keyed=selectors.dotted)
    assert info.value.field == "spec.rollout.stages[0].cohort"


def test_matching_semantics() -> None:
    target = selectors.parse_target(
        {
            "matchLabels": {"os": "android"},
            "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["low"]}],
            "matchVersions": {"appVersion": ">=10"},
            "exclude": [{"deviceIds": ["d9"]}],
        }
    )
    assert target.matches(facts(os="android", appVersion="10.1"))
    assert not target.matches(facts(os="android", appVersion="9"))
    assert not target.matches(facts(os="android", appVersion="10.1", tier="low"))
    assert not target.matches(facts("d9", os="android", appVersion="10.1"))
    assert selectors.parse_target({}).matches_everything and selectors.parse_target(None).matches(facts())


def test_equivalent_spellings_are_equal_values_with_one_document() -> None:
    a = selectors.parse_target({"matchExpressions": [{"key": "t", "operator": "In", "values": ["y", "x"]}]})
    b = selectors.parse_target({"matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y", "x"]}]})
    assert a == b and a.document == b.document == {
        "matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]}]
    }
