"""The controller's view of waiting devices: the agent's own waiting report wins over guessing from raw state."""

from __future__ import annotations

from tether.controller import stage_health
from tether.spec import triggers


def test_device_state_keeps_the_waiting_report_bounded_and_drops_the_rest() -> None:
    kept = stage_health.check_device_state(
        {"charging": "unknown", "batteryLevel": "40", "waiting": "ns/a: charging unknown " + "x" * 900, "gps": "on"}
    )
    assert set(kept) == {"charging", "batteryLevel", "waiting"}
    assert len(kept["waiting"]) == triggers.MAX_WAITING_CHARS and kept["charging"] == "unknown"


def test_an_agent_that_reports_waiting_releases_is_taken_at_its_word() -> None:
    needs = {"charging": True}
    # The agent runs unknown conditions (--conditions-unknown run): nothing waits although charging is unknown.
    assert stage_health.conditions_met(needs, {"charging": "unknown", "waiting": ""}, release="ns/a")
    state = {"charging": "true", "waiting": "ns/a: idle unknown | ns/b: not charging"}
    assert not stage_health.conditions_met(needs, state, release="ns/a")
    assert not stage_health.conditions_met(needs, state, release="ns/b")
    assert stage_health.conditions_met(needs, state, release="ns/c")
    # Older agents report no waiting key: the raw state decides, a key it does not report does not hold it back.
    assert not stage_health.conditions_met(needs, {"charging": "unknown"}, release="ns/a")
    assert stage_health.conditions_met(needs, {}, release="ns/a")


def test_waiting_summaries_round_trip() -> None:
    summary = triggers.waiting_summary({"ns/b": "not idle", "ns/a": "charging unknown; not idle", "ns/c": ""})
    assert summary == "ns/a: charging unknown; not idle | ns/b: not idle"
    assert triggers.waiting_releases(summary) == {"ns/a", "ns/b"} and triggers.waiting_releases("") == set()
