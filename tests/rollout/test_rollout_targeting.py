"""Targeting extensions (tether.controller.targeting): version ranges, explicit device ids, exclusions."""

from __future__ import annotations

import pytest

from tether.common import errors
from tether.controller import targeting
from tether.spec import selectors


def matches(doc: dict, device_id: str = "d1", **attributes: str) -> bool:
    return selectors.parse_target(doc).matches(targeting.device_facts(device_id=device_id, attributes=attributes))


def test_version_ranges_select_by_parsed_version() -> None:
    doc = {"matchVersions": {"appVersion": ">=10.2,<11"}}
    assert matches(doc, appVersion="10.10.1") and matches(doc, appVersion="10.2")
    assert not matches(doc, appVersion="10.1.9") and not matches(doc, appVersion="11.0")
    assert not matches(doc) and not matches(doc, appVersion="latest")


def test_device_ids_and_exclusions() -> None:
    doc = {"deviceIds": ["d1", "d2"], "exclude": [{"matchLabels": {"tier": "low"}}, {"deviceIds": ["d2"]}]}
    assert matches(doc, "d1", tier="high")
    assert not matches(doc, "d1", tier="low")
    assert not matches(doc, "d2") and not matches(doc, "d3")


def test_the_normalised_document_is_stable() -> None:
    a = selectors.parse_target({"matchVersions": {"appVersion": ">= 10.2 ,<11"}, "deviceIds": ["b", "a"]})
    b = selectors.parse_target({"deviceIds": ["a", "b"], "matchVersions": {"appVersion": ">=10.2,<11"}})
    assert a.document == b.document


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"matchVersions": {"appVersion": ">=11,<10"}}, "target.matchVersions['appVersion']"),
        ({"matchVersions": {"appVersion": "10.x"}}, "target.matchVersions['appVersion']"),
        ({"deviceIds": []}, "target.deviceIds"),
        ({"exclude": [{}]}, "target.exclude[0]"),
        ({"exclude": [{"exclude": []}]}, "target.exclude[0]"),
        (
            {"exclude": [{"matchExpressions": [{"key": "a", "operator": "Like"}]}]},
            "target.exclude[0].matchExpressions[0].operator",
        ),
    ],
)
def test_bad_targets_are_refused_naming_the_field(doc: dict, field: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        selectors.parse_target(doc)
    assert info.value.field == field
