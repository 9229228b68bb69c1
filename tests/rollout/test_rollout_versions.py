"""Version numbers and ranges (tether.spec.versions): ordering, ranges, and refusals naming the field."""

from __future__ import annotations

import pytest

from tether.common import errors
from tether.spec import versions


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("10.1", "10.2"),
        ("10.2", "10.10"),
        ("9.9.9", "10"),
        ("11.0.0-beta", "11.0.0"),
        ("11.0.0-alpha.2", "11.0.0-alpha.10"),
        ("11.0.0-alpha", "11.0.0-beta"),
        ("v1.2", "1.3"),
    ],
)
def test_versions_order_numerically_and_pre_releases_come_first(lower: str, higher: str) -> None:
    a, b = versions.parse_version(lower), versions.parse_version(higher)
    assert a is not None and b is not None and a < b


def test_trailing_zeros_do_not_matter() -> None:
    assert versions.parse_version("10.2") == versions.parse_version("10.2.0.0")


@pytest.mark.parametrize("text", ["", "ten", "10..2", "10.2.x", "-1", "1.2.3.4.5.6.7"])
def test_non_versions_parse_as_none(text: str) -> None:
    assert versions.parse_version(text) is None


@pytest.mark.parametrize(
    ("spec", "inside", "outside"),
    [
        (">=10.2,<11", ["10.2", "10.2.0", "10.9.9", "10.4.1"], ["10.1.9", "11", "11.0.0", "12"]),
        ("==12.1", ["12.1", "12.1.0"], ["12.1.1", "12"]),
        ("!=10.4.1", ["10.4", "10.4.2"], ["10.4.1"]),
        (">10", ["10.0.1", "11"], ["10", "9"]),
        ("<=2", ["2", "1.9", "2.0.0-rc.1"], ["2.0.1"]),
    ],
)
def test_ranges_hold_for_versions_inside_only(spec: str, inside: list[str], outside: list[str]) -> None:
    r = versions.parse_range(spec, field="f")
    assert all(r.contains(v) for v in inside)
    assert not any(r.contains(v) for v in outside)
    assert not r.contains("not-a-version")


def test_a_range_normalises_its_spelling() -> None:
    assert str(versions.parse_range(" >= 10.2.0 , < 11 ", field="f")) == ">=10.2,<11"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("", "must be a version range"),
        ("10.2", "must be an operator"),
        ("=>10", "must be an operator"),
        (">=ten", "is not a version"),
        (">=11,<10", "can never match"),
        ("==1,==2", "can never match"),
        (">1,<1", "can never match"),
        (">=1,<=1,!=1", "can never match"),
        (",".join([">1"] * 9), "clauses"),
    ],
)
def test_invalid_ranges_are_refused_naming_the_field(spec: str, words: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        versions.parse_range(spec, field="spec.target.matchVersions.appVersion")
    assert info.value.field == "spec.target.matchVersions.appVersion"
    assert words in str(info.value)


def test_a_range_pinned_by_bounds_is_satisfiable() -> None:
    assert versions.parse_range(">=1,<=1", field="f").contains("1.0")
