"""Condition semantics: same status and reason change nothing; lastTransitionTime follows the status."""

from __future__ import annotations

import datetime

from tether.operator import conditions as cond
from tether.operator.task_status import ConditionStatus

T0 = datetime.datetime(2025, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)


def test_setting_a_new_condition_stamps_it_now() -> None:
    out = cond.set_condition([], cond.SPEC_VALID, now=T0)
    assert len(out) == 1
    assert out[0].type == cond.VALID and out[0].status == ConditionStatus.TRUE
    assert out[0].reason == "SpecValid" and out[0].last_transition_time == "2025-01-01T12:00:00Z"


def test_same_status_and_reason_changes_nothing_not_even_the_message() -> None:
    first = cond.set_condition([], cond.RELEASE_APPLIED, now=T0, release="ns/a")
    again = cond.set_condition(first, cond.RELEASE_APPLIED, now=T1, release="ns/b")
    assert again == first


def test_a_new_reason_with_the_same_status_keeps_the_transition_time() -> None:
    first = cond.set_condition([], cond.CONTROLLER_UNAVAILABLE, now=T0, error="down")
    second = cond.set_condition(first, cond.MANIFEST_NOT_FOUND, now=T1, error="unknown", digest="sha256:x")
    assert second[0].reason == "ManifestNotFound"
    assert second[0].status == ConditionStatus.FALSE
    assert second[0].last_transition_time == first[0].last_transition_time
    assert "sha256:x" in second[0].message


def test_a_status_change_moves_the_transition_time() -> None:
    first = cond.set_condition([], cond.CONTROLLER_UNAVAILABLE, now=T0, error="down")
    second = cond.set_condition(first, cond.RELEASE_APPLIED, now=T1, release="ns/a")
    assert second[0].status == ConditionStatus.TRUE
    assert second[0].last_transition_time == "2025-01-01T12:05:00Z"


def test_refresh_message_updates_the_message_only() -> None:
    first = cond.set_condition([], cond.INVALID_SPEC, now=T0, error="spec.a: bad")
    second = cond.set_condition(first, cond.INVALID_SPEC, now=T1, refresh_message=True, error="spec.b: bad")
    assert second[0].message == "spec.b: bad"
    assert second[0].last_transition_time == first[0].last_transition_time
    assert cond.set_condition(second, cond.INVALID_SPEC, now=T1, refresh_message=True, error="spec.b: bad") == second


def test_one_condition_per_type_in_a_stable_order() -> None:
    out = cond.set_condition([], cond.NOT_PAUSED, now=T0)
    out = cond.set_condition(out, cond.SPEC_VALID, now=T0)
    out = cond.set_condition(out, cond.IN_PROGRESS, now=T0)
    out = cond.set_condition(out, cond.RELEASE_APPLIED, now=T0, release="ns/a")
    out = cond.set_condition(out, cond.PAUSED_BY_SPEC, now=T1)
    assert [c.type for c in out] == [cond.VALID, cond.APPLIED, cond.PAUSED, cond.COMPLETE]
    assert cond.is_true(out, cond.PAUSED)


def test_every_reason_is_unique_and_belongs_to_a_known_type() -> None:
    reasons = [v for v in vars(cond).values() if isinstance(v, cond.Reason)]
    assert len({r.reason for r in reasons}) == len(reasons)
    assert {r.type for r in reasons} == set(cond.TYPES)
    assert {r.reason for r in reasons} >= cond.PERMANENT_FAILURES
