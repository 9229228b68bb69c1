"""Bad rollout policy is refused with a message naming the field, and a running rollout is left untouched."""

from __future__ import annotations

import datetime
from typing import Any

import pytest

from tether.operator import conditions as cond
from tether.operator import reconcile, validate
from tether.operator.task_status import MLTaskStatus, Phase

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
DIGEST = "sha256:" + "0" * 64


def spec(stages: list[dict[str, Any]] | None = None, **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"bundle": {"digest": DIGEST}, **changes}
    if stages is not None:
        doc["rollout"] = {"stages": stages}
    return doc


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        (spec([{"percent": 10, "count": 5}, {"percent": 100}]), "spec.rollout.stages[0]", "both percent and count"),
        (spec([{"name": "x"}, {"percent": 100}]), "spec.rollout.stages[0]", "needs a percent, a count or a cohort"),
        (spec([{"percent": 20}, {"percent": 20}, {"percent": 100}]), "spec.rollout.stages[1].percent", "greater"),
        (spec([{"percent": 0}, {"percent": 100}]), "spec.rollout.stages[0].percent", "at least 1"),
        (spec([{"percent": 120}]), "spec.rollout.stages[0].percent", "at most 100"),
        (spec([{"count": 50}, {"count": 10}, {"percent": 100}]), "spec.rollout.stages[1].count", "greater"),
        (spec([{"percent": 10}, {"count": 500}, {"percent": 100}]), "spec.rollout.stages[1].count", "after a percent"),
        (spec([{"percent": 10}, {"percent": 50}]), "spec.rollout.stages[1].percent", "last stage must reach 100"),
        (
            spec([{"name": "a", "percent": 10}, {"name": "a", "percent": 100}]),
            "spec.rollout.stages[1].name",
            "repeats the name",
        ),
        (
            spec([{"cohort": {"matchLabels": {"c": "b"}}}, {"cohort": {"matchLabels": {"c": "b"}}}, {"percent": 100}]),
            "spec.rollout.stages[1].cohort",
            "overlaps stages[0]",
        ),
        (
            spec([{"percent": 10}, {"cohort": {"matchLabels": {"c": "b"}}}, {"percent": 100}]),
            "spec.rollout.stages[1].cohort",
            "must come before",
        ),
        (spec([{"cohort": {}}, {"percent": 100}]), "spec.rollout.stages[0].cohort", "every device"),
        (
            spec([{"percent": 100, "gates": [{"metric": "sucessRate", "min": 0.9}]}]),
            "spec.rollout.stages[0].gates[0].metric",
            "not a known metric",
        ),
        (
            spec([{"percent": 100, "gates": [{"metric": "successRate", "min": 1.5}]}]),
            "spec.rollout.stages[0].gates[0].min",
            "rate between 0 and 1",
        ),
        (
            spec([{"percent": 100, "gates": [{"metric": "errorRate", "min": 0.5, "max": 0.1}]}]),
            "spec.rollout.stages[0].gates[0]",
            "can never pass",
        ),
        (
            spec([{"percent": 100, "gates": [{"metric": "task.accuracy"}]}]),
            "spec.rollout.stages[0].gates[0]",
            "needs a min and/or a max",
        ),
        (
            spec([{"percent": 100, "onGateFailure": "Explode"}]),
            "spec.rollout.stages[0].onGateFailure",
            "must be one of",
        ),
        (
            spec(target={"matchExpressions": [{"key": "os", "operator": "Near", "values": ["a"]}]}),
            "spec.target.matchExpressions[0].operator",
            "must be one of",
        ),
        (
            spec(target={"matchVersions": {"appVersion": ">=11,<10"}}),
            "spec.target.matchVersions.appVersion",
            "can never match",
        ),
        (
            spec(target={"matchVersions": {"appVersion": "newest"}}),
            "spec.target.matchVersions.appVersion",
            "operator",
        ),
        (spec(target={"exclude": [{}]}), "spec.target.exclude[0]", "exclude every device"),
        (spec(trigger={"conditions": {"sunny": True}}), "spec.trigger.conditions.sunny", "not a known field"),
    ],
)
def test_bad_policy_is_refused_naming_the_field(doc: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(validate.SpecInvalid) as info:
        validate.validate(doc)
    fields = [i.field for i in info.value.issues]
    assert field in fields, fields
    assert any(words in i.message for i in info.value.issues if i.field == field), info.value.issues


def test_a_good_policy_passes() -> None:
    typed = validate.validate(
        spec(
            [
                {"name": "beta", "cohort": {"deviceIds": ["d1", "d2"]}, "bakeSeconds": 60},
                {"count": 100, "gates": [{"metric": "devicesReporting", "min": 10}]},
                {"percent": 100, "gates": [{"metric": "p95LatencySeconds", "max": 2}], "onGateFailure": "Rollback"},
            ],
            target={"matchVersions": {"appVersion": ">=10.2,<11"}, "exclude": [{"matchLabels": {"tier": "low"}}]},
            trigger={"conditions": {"charging": True, "unmeteredNetwork": True}},
        )
    )
    assert [s.name for s in typed.rollout.stages] == ["beta", None, None]


def test_an_invalid_edit_leaves_a_running_rollout_untouched() -> None:
    good = spec([{"percent": 10, "bakeSeconds": 60}, {"percent": 100}])
    meta = reconcile.Meta(name="t", namespace="ml", generation=1)
    d = reconcile.decide(spec=good, meta=meta, status=MLTaskStatus(), observed=None, now=T0)
    for a in d.actions:
        d = d.with_outcome(a, reconcile.Applied(version=1, changed=True), now=T0)
    running = d.status
    assert running.rollout is not None and running.rollout.current_stage == 0

    bad = spec([{"percent": 50}, {"percent": 10}, {"percent": 100}])
    later = T0 + datetime.timedelta(hours=1)  # long past the bake: a valid spec would have moved on
    meta2 = reconcile.Meta(name="t", namespace="ml", generation=2)
    observed = reconcile.Observation(release="ml/t", version=1)
    d2 = reconcile.decide(spec=bad, meta=meta2, status=running, observed=observed, now=later)
    assert d2.actions == ()  # nothing reaches the controller
    assert d2.status.rollout == running.rollout  # stage, timers, applied document: all as they were
    assert d2.status.phase == Phase.INVALID
    valid = cond.get(d2.status.conditions, cond.VALID)
    assert valid is not None and valid.message.startswith("spec.rollout.stages[1].percent")
