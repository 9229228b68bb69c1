"""What the controller serves each device during a staged rollout (tether.controller.rollouts), and fan-out."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tether.common import errors
from tether.controller import releases, rollouts, stage_health, targeting
from tether.spec import selectors, staging

DIGEST1 = "sha256:" + "1" * 64
DIGEST2 = "sha256:" + "2" * 64
STAGES = [{"cohort": {"matchLabels": {"cohort": "beta"}}}, {"percent": 50}, {"percent": 100}]


def release(
    *,
    stage: int = 0,
    action: str = "progress",
    version: int = 2,
    stable: bool = True,
    paused: bool = False,
    doc_version: int | None = None,
    target: dict | None = None,
) -> releases.Release:
    doc = {
        "version": version if doc_version is None else doc_version,
        "salt": "ml/t",
        "stage": stage,
        "action": action,
        "stages": STAGES,
    }
    spec = releases.parse_spec(
        release="ml/t",
        generation=1,
        manifest_digest=DIGEST2,
        target_json=json.dumps(target or {"matchLabels": {"os": "android"}}),
        trigger_json="",
        aggregation_json="",
        paused=paused,
        rollout_json=json.dumps(doc),
    )
    ro = staging.parse_rollout(spec.rollout)
    state = rollouts.advance_state(
        rollouts.RolloutState(),
        ro,
        version=version,
        population=[f"d{i}" for i in range(100)],
        now="2026-01-01T00:00:00",
    )
    st = (
        rollouts.Stable(version=1, manifest_digest=DIGEST1, target=selectors.parse_target({}), trigger={})
        if stable
        else None
    )
    return releases.Release(
        spec=spec,
        version=version,
        target=selectors.parse_target(spec.target),
        rollout=ro,
        rollout_state=state,
        stable=st,
    )


def facts(device_id: str, **attributes: str) -> selectors.Facts:
    return targeting.device_facts(device_id=device_id, attributes={"os": "android", **attributes})


def version_of(rel: releases.Release, f: selectors.Facts, *, delivered: bool = True) -> tuple[int, bool] | None:
    s = rollouts.served(rel, f, delivered=delivered)
    return None if s is None else (s.version, s.rollback)


def in_half(device_id: str) -> bool:
    first = rollouts.stage_of(release(stage=1), facts(device_id))
    return first is not None and first <= 1


def test_stage_zero_serves_only_the_cohort_and_the_others_keep_the_stable_version() -> None:
    rel = release(stage=0)
    assert version_of(rel, facts("d1", cohort="beta")) == (2, False)
    assert version_of(rel, facts("d1")) == (1, True)
    assert version_of(rel, targeting.device_facts(device_id="d1", attributes={"os": "ios"})) == (1, True)


def test_a_first_release_serves_nothing_outside_the_stage() -> None:
    rel = release(stage=0, stable=False)
    assert version_of(rel, facts("d1")) is None
    assert version_of(rel, facts("d1", cohort="beta")) == (2, False)


def test_stage_one_reaches_half_of_the_population_by_rank_and_keeps_the_cohort() -> None:
    rel = release(stage=1)
    reached = [i for i in range(100) if version_of(rel, facts(f"d{i}")) == (2, False)]
    assert len(reached) == 50
    assert version_of(rel, facts("zzz-not-counted", cohort="beta")) == (2, False)


def test_complete_serves_every_targeted_device_and_rollback_serves_the_stable_version() -> None:
    complete = release(stage=2, action="complete")
    assert all(version_of(complete, facts(f"d{i}")) == (2, False) for i in range(100))
    back = release(stage=1, action="rollback")
    assert all(version_of(back, facts(f"d{i}", cohort="beta")) == (1, True) for i in range(100))
    first = release(stage=1, action="rollback", stable=False)
    assert all(version_of(first, facts(f"d{i}")) is None for i in range(100))  # uninstalled


def test_a_document_for_another_version_counts_as_stage_zero() -> None:
    rel = release(stage=2, action="complete", doc_version=1)  # the operator has not seen version 2 yet
    assert rollouts.effective(rel).stage == 0 and rollouts.effective(rel).action is rollouts.Action.PROGRESS  # type: ignore[union-attr]
    assert version_of(rel, facts("d1")) == (1, True)


def test_pause_reaches_no_new_device_but_keeps_those_that_have_it() -> None:
    rel = release(stage=1, paused=True)
    member = next(f"d{i}" for i in range(100) if in_half(f"d{i}"))
    assert version_of(rel, facts(member), delivered=True) == (2, False)
    assert version_of(rel, facts(member), delivered=False) == (1, True)


def test_change_pushes_stage_entries_and_rollbacks_and_nothing_else() -> None:
    member = next(f"d{i}" for i in range(100) if in_half(f"d{i}"))
    outsider = next(f"d{i}" for i in range(100) if not in_half(f"d{i}"))
    s0, s1 = release(stage=0), release(stage=1)
    assert rollouts.change(before=s0, after=s1, facts=facts(member)).notify.version == 2  # type: ignore[union-attr]
    assert rollouts.change(before=s0, after=s1, facts=facts(outsider)) == rollouts.Change()
    back = release(stage=1, action="rollback")
    n = rollouts.change(before=s1, after=back, facts=facts(member)).notify
    assert n is not None and n.version == 1 and n.rollback
    first_back = release(stage=1, action="rollback", stable=False)
    assert rollouts.change(before=release(stage=1, stable=False), after=first_back, facts=facts(member)).revoke
    paused = release(stage=1, paused=True)
    assert rollouts.change(before=s0, after=paused, facts=facts(member)) == rollouts.Change()
    assert rollouts.change(before=paused, after=s1, facts=facts(member)).notify is not None  # unpause


def test_next_stable_is_the_previous_version_only_when_its_rollout_completed() -> None:
    assert rollouts.next_stable(release(action="complete")).version == 2  # type: ignore[union-attr]
    assert rollouts.next_stable(release(action="progress")).version == 1  # type: ignore[union-attr]
    assert rollouts.next_stable(release(action="rollback")).version == 1  # type: ignore[union-attr]
    assert rollouts.next_stable(release(action="progress", stable=False)) is None
    assert rollouts.next_stable(None) is None


def test_edited_stages_or_a_new_version_start_the_thresholds_over() -> None:
    rel = release(stage=1)
    assert not rollouts.needs_population(rel.rollout_state, rel.rollout, 2)
    assert rollouts.needs_population(rel.rollout_state, rel.rollout, 3)
    edited = dataclasses.replace(rel.rollout, stages=(staging.StageRule(percent=100),), stage=0)  # type: ignore[arg-type]
    assert rollouts.needs_population(rel.rollout_state, edited, 2)


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ({"salt": "s", "stages": [{"percent": 100}], "stage": 1}, "rollout.stage", "integer in [0, 0]"),
        ({"salt": "s", "stages": [{"percent": 101}]}, "rollout.stages[0].percent", "[1, 100]"),
        ({"salt": "s", "stages": [{"percent": 10, "count": 5}]}, "rollout.stages[0]", "not both"),
        ({"salt": "s", "stages": [{}]}, "rollout.stages[0]", "needs a percent"),
        ({"salt": "s", "stages": [{"cohort": {}}]}, "rollout.stages[0].cohort", "every device"),
        ({"salt": "s", "stages": [{"percent": 100}], "action": "yolo"}, "rollout.action", "not one of"),
        ({"stages": [{"percent": 100}]}, "rollout.salt", "non-empty"),
        ({"salt": "s", "stages": [{"percent": 100}], "extra": 1}, "rollout", "unknown fields"),
        (
            {"salt": "s", "stages": [{"cohort": {"matchExpressions": [{"key": "a", "operator": "Near"}]}}]},
            "rollout.stages[0].cohort.matchExpressions[0].operator",
            "not one of",
        ),
    ],
)
def test_bad_rollout_documents_are_refused_naming_the_field(doc: dict, field: str, words: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        staging.parse_rollout(doc)
    assert info.value.field == field and words in str(info.value)


def test_health_counts_stages_cumulatively_with_rates_latency_metrics_and_coverage() -> None:
    rel = release(stage=1)
    devices = [
        stage_health.DeviceRecord(device_id="a", stage=0, version=2, state="succeeded", installed_at=10.0),
        stage_health.DeviceRecord(device_id="b", stage=1, version=2, state="failed", installed_at=20.0),
        stage_health.DeviceRecord(
            device_id="c", stage=1, version=2, state="installed", installed_at=30.0, waiting=True
        ),
        stage_health.DeviceRecord(device_id="d", stage=2, version=1, state="succeeded"),
        stage_health.DeviceRecord(device_id="e", stage=None, version=1, state="succeeded"),
    ]
    results = [
        stage_health.ResultRecord(device_id="a", duration_s=1.0, metrics={"accuracy": 0.9}),
        stage_health.ResultRecord(device_id="b", duration_s=3.0, metrics={"accuracy": 0.5}),
    ]
    doc = stage_health.health(rel, devices=devices, results=results, stage_started={0: 0.0, 1: 15.0})
    s0, s1, s2 = doc["stages"]
    assert (s0["eligible"], s0["succeeded"], s0["successRate"], s0["metrics"]) == (1, 1, 1.0, {"accuracy": 0.9})
    assert (s1["eligible"], s1["installed"], s1["failed"], s1["waiting"]) == (3, 2, 1, 1)
    assert s1["errorRate"] == 0.5 and s1["p95LatencySeconds"] == 3.0
    assert s1["coverageSeconds"] == {"p50": 5.0, "p90": 15.0, "p99": 15.0}
    assert s2["eligible"] == 4 and doc["onStable"] == 2 and doc["stableVersion"] == 1


def test_participation_conditions_hold_unless_the_device_says_otherwise() -> None:
    assert stage_health.conditions_met({"charging": True}, {"charging": "true"})
    assert not stage_health.conditions_met({"charging": True}, {"charging": "false"})
    assert stage_health.conditions_met({"charging": True}, {})  # cannot tell: not held back
    assert stage_health.conditions_met({"charging": False}, {"charging": "false"})
