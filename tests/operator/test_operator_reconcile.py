"""decide(): create, no-op, spec change, observed counts, invalid specs; phases; events; status patches."""

from __future__ import annotations

import datetime
import itertools
import json
from typing import Any

import pytest

from tether.common import errors
from tether.operator import conditions as cond
from tether.operator import reconcile
from tether.operator.task_status import ConditionStatus, MLTaskStatus, Phase

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(seconds=30)
DIGEST = "sha256:" + "0" * 64
META = reconcile.Meta(name="digits", namespace="ml", generation=1)


def spec(**changes: Any) -> dict[str, Any]:
    return {"bundle": {"digest": DIGEST}, **changes}


def applied(status: MLTaskStatus = MLTaskStatus(), *, meta: reconcile.Meta = META, version: int = 1, **kw: Any):
    """Decide on a spec and let its ApplyRelease succeed."""
    d = reconcile.decide(spec=kw.pop("doc", spec()), meta=meta, status=status, observed=None, now=T0)
    for action in d.actions:
        d = d.with_outcome(action, reconcile.Applied(version=version, changed=True), now=T0)
    return d.status


def test_create_asks_for_an_apply_with_the_release_documents() -> None:
    doc = spec(
        trigger={"type": "interval", "intervalSeconds": 60},
        target={"matchLabels": {"os": "android"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]},
        aggregation={"tensors": "sum"},
        resources={"timeoutSeconds": 120, "memoryMB": 256, "cpuSeconds": 30},
        paused=True,
    )
    d = reconcile.decide(spec=doc, meta=META, status=MLTaskStatus(), observed=None, now=T0)
    # The action holds typed values (encoded at the gRPC edge); its `*_json` views are the documents sent.
    assert [
        (
            a.release,
            a.generation,
            a.manifest_digest,
            a.target_json,
            a.trigger_json,
            a.aggregation_json,
            a.paused,
            a.resources_json,
            a.rollout_json,
        )
        for a in d.actions
        if isinstance(a, reconcile.ApplyRelease)
    ] == [
        (
            "ml/digits",
            1,
            DIGEST,
            json.dumps(
                {
                    "matchExpressions": [{"key": "tier", "operator": "Exists", "values": []}],
                    "matchLabels": {"os": "android"},
                },
                separators=(",", ":"),
            ),
            '{"seconds":60,"type":"interval"}',
            '{"counts":"sum","metrics":"weightedMean","tensors":"sum"}',
            True,
            '{"cpuSeconds":30,"memoryMB":256,"timeoutSeconds":120}',
            "",
        )
    ]
    assert len(d.actions) == 1
    assert d.status.phase == Phase.PENDING
    assert d.status.observed_generation is None  # not before the controller accepted it
    assert cond.is_true(d.status.conditions, cond.VALID) and cond.is_true(d.status.conditions, cond.PAUSED)


def test_resources_default_as_in_the_crd_and_unset_cpu_seconds_is_left_out() -> None:
    (action,) = reconcile.decide(spec=spec(), meta=META, status=MLTaskStatus(), observed=None, now=T0).actions
    assert json.loads(action.resources_json) == {"timeoutSeconds": 300, "memoryMB": 512}  # type: ignore[union-attr]
    (action,) = reconcile.decide(
        spec=spec(resources={"memoryMB": 64}), meta=META, status=MLTaskStatus(), observed=None, now=T0
    ).actions
    assert json.loads(action.resources_json) == {"timeoutSeconds": 300, "memoryMB": 64}  # type: ignore[union-attr]


def test_a_resources_change_reapplies_with_the_new_resources() -> None:
    status = applied(doc=spec(resources={"timeoutSeconds": 60}))
    meta2 = reconcile.Meta(name="digits", namespace="ml", generation=2)
    d = reconcile.decide(
        spec=spec(resources={"timeoutSeconds": 30, "cpuSeconds": 10}), meta=meta2, status=status, observed=None, now=T1
    )
    (action,) = d.actions
    assert isinstance(action, reconcile.ApplyRelease) and action.generation == 2
    assert json.loads(action.resources_json) == {"timeoutSeconds": 30, "memoryMB": 512, "cpuSeconds": 10}
    done = d.with_outcome(action, reconcile.Applied(version=2, changed=True), now=T1)
    assert (done.actions, done.status.observed_generation, done.status.version) == ((), 2, 2)


def test_a_successful_apply_records_generation_release_and_version() -> None:
    status = applied(version=3)
    assert status.observed_generation == 1
    assert status.release == "ml/digits" and status.version == 3 and status.manifest_digest == DIGEST
    assert status.stage == "1/1"
    assert cond.get(status.conditions, cond.APPLIED).reason == "ReleaseApplied"  # type: ignore[union-attr]
    assert status.phase == Phase.PENDING  # no device targeted yet
    assert cond.get(status.conditions, cond.COMPLETE).reason == "AwaitingDevices"  # type: ignore[union-attr]


def test_an_unchanged_object_is_a_no_op() -> None:
    status = applied()
    again = reconcile.decide(spec=spec(), meta=META, status=status, observed=None, now=T1)
    assert again.actions == ()
    assert again.status == status
    assert reconcile.status_patch(status, again.status) == {}
    assert reconcile.transition_events(status, again.status) == []


def test_an_unchanged_observation_is_a_no_op_too() -> None:
    obs = reconcile.Observation(release="ml/digits", version=1, targeted=4, notified=4, installed=2)
    status = reconcile.decide(spec=spec(), meta=META, status=applied(), observed=obs, now=T0).status
    again = reconcile.decide(spec=spec(), meta=META, status=status, observed=obs, now=T1)
    assert again.status == status and again.actions == ()


def test_a_spec_change_reapplies_with_the_new_generation() -> None:
    status = applied()
    meta2 = reconcile.Meta(name="digits", namespace="ml", generation=2)
    d = reconcile.decide(spec=spec(paused=True), meta=meta2, status=status, observed=None, now=T1)
    assert [type(a) for a in d.actions] == [reconcile.ApplyRelease]
    assert d.actions[0].generation == 2 and d.actions[0].paused  # type: ignore[union-attr]
    done = d.with_outcome(d.actions[0], reconcile.Applied(version=1, changed=False), now=T1)
    assert done.actions == ()
    assert done.status.observed_generation == 2
    assert cond.get(done.status.conditions, cond.PAUSED).last_transition_time == "2025-01-01T00:00:30Z"  # type: ignore[union-attr]


def test_a_new_version_resets_the_per_version_counts() -> None:
    obs = reconcile.Observation(release="ml/digits", version=1, targeted=4, notified=4, succeeded=4, results=4)
    status = reconcile.decide(spec=spec(), meta=META, status=applied(), observed=obs, now=T0).status
    assert status.phase == Phase.SUCCEEDED
    meta2 = reconcile.Meta(name="digits", namespace="ml", generation=2)
    d = reconcile.decide(
        spec=spec(bundle={"digest": "sha256:" + "1" * 64}), meta=meta2, status=status, observed=None, now=T1
    )
    done = d.with_outcome(d.actions[0], reconcile.Applied(version=2, changed=True), now=T1)
    assert (done.status.version, done.status.targeted, done.status.succeeded, done.status.results) == (2, 4, 0, 0)
    assert done.status.phase == Phase.PROGRESSING


@pytest.mark.parametrize(
    ("counts", "phase", "reason"),
    [
        ({}, Phase.PENDING, "AwaitingDevices"),
        ({"targeted": 3, "notified": 3}, Phase.PROGRESSING, "InProgress"),
        ({"targeted": 3, "installed": 3, "succeeded": 2}, Phase.PROGRESSING, "InProgress"),
        ({"targeted": 3, "succeeded": 3}, Phase.SUCCEEDED, "AllSucceeded"),
        ({"targeted": 3, "succeeded": 2, "failed": 1}, Phase.FAILED, "DevicesFailed"),
        ({"targeted": 3, "succeeded": 2, "refused": 1}, Phase.FAILED, "DevicesFailed"),
    ],
)
def test_observed_counts_drive_completion_and_phase(counts: dict[str, int], phase: Phase, reason: str) -> None:
    obs = reconcile.Observation(release="ml/digits", version=1, **counts)
    d = reconcile.decide(spec=spec(), meta=META, status=applied(), observed=obs, now=T1)
    assert d.status.phase == phase
    assert cond.get(d.status.conditions, cond.COMPLETE).reason == reason  # type: ignore[union-attr]
    for key, value in counts.items():
        assert getattr(d.status, key) == value


def test_an_observation_of_another_release_is_ignored() -> None:
    obs = reconcile.Observation(release="ml/other", version=9, targeted=3)
    d = reconcile.decide(spec=spec(), meta=META, status=applied(), observed=obs, now=T1)
    assert d.status.targeted == 0 and d.status.version == 1


def test_the_aggregate_is_summarised() -> None:
    body = {"results": 5, "devices": 3, "samples": 640, "metrics": {"loss": 0.25, "acc": 0.9}, "tensors": {}}
    obs = reconcile.Observation(release="ml/digits", version=1, targeted=3, aggregate=body, aggregate_round=2)
    status = reconcile.decide(spec=spec(), meta=META, status=applied(), observed=obs, now=T1).status
    assert status.aggregate is not None
    assert status.aggregate.to_json() == {
        "round": 2,
        "results": 5,
        "samples": 640,
        "metrics": {"acc": 0.9, "loss": 0.25},
    }


def test_an_invalid_spec_sends_nothing_and_says_which_field() -> None:
    doc = spec(rollout={"stages": [{"percent": 60}, {"percent": 30}, {"percent": 100}]})
    d = reconcile.decide(spec=doc, meta=META, status=MLTaskStatus(), observed=None, now=T0)
    assert d.actions == ()
    assert d.status.phase == Phase.INVALID
    assert d.status.observed_generation == 1
    valid = cond.get(d.status.conditions, cond.VALID)
    assert valid is not None and valid.status == ConditionStatus.FALSE and valid.reason == "InvalidSpec"
    assert valid.message.startswith("spec.rollout.stages[1].percent: must be greater than the previous stage's 60")
    events = reconcile.transition_events(MLTaskStatus(), d.status)
    assert reconcile.Event(type="Warning", reason="InvalidSpec", message=valid.message) in events
    assert reconcile.decide_delete(meta=META, status=d.status) == ()


def test_invalid_then_fixed_applies() -> None:
    bad = reconcile.decide(
        spec=spec(bundle={"digest": "nope"}), meta=META, status=MLTaskStatus(), observed=None, now=T0
    )
    meta2 = reconcile.Meta(name="digits", namespace="ml", generation=2)
    d = reconcile.decide(spec=spec(), meta=meta2, status=bad.status, observed=None, now=T1)
    assert len(d.actions) == 1
    valid = cond.get(d.status.conditions, cond.VALID)
    assert valid is not None and valid.status == ConditionStatus.TRUE and valid.last_transition_time.endswith(":30Z")


def test_a_valid_spec_turned_invalid_keeps_the_release_and_reports() -> None:
    status = applied()
    meta2 = reconcile.Meta(name="digits", namespace="ml", generation=2)
    d = reconcile.decide(spec=spec(trigger={"type": "interval"}), meta=meta2, status=status, observed=None, now=T1)
    assert d.actions == () and d.status.phase == Phase.INVALID and d.status.release == "ml/digits"
    assert reconcile.decide_delete(meta=meta2, status=d.status) == (reconcile.DeleteRelease(release="ml/digits"),)


@pytest.mark.parametrize(
    ("error", "reason", "phase"),
    [
        (errors.FailedPrecondition("unknown manifest"), "ManifestNotFound", Phase.FAILED),
        (errors.InvalidSpec("bad", field="target"), "ControllerRejected", Phase.FAILED),
        (errors.Unauthenticated("bad token"), "ControllerRejected", Phase.FAILED),
        (ConnectionRefusedError("refused"), "ControllerUnavailable", Phase.PENDING),
    ],
)
def test_a_failed_apply_is_a_condition_and_is_retried(error: Exception, reason: str, phase: Phase) -> None:
    d = reconcile.decide(spec=spec(), meta=META, status=MLTaskStatus(), observed=None, now=T0)
    failed = d.with_outcome(d.actions[0], reconcile.failed_from_any(error), now=T0)
    applied_c = cond.get(failed.status.conditions, cond.APPLIED)
    assert applied_c is not None and applied_c.status == ConditionStatus.FALSE and applied_c.reason == reason
    assert failed.status.phase == phase
    retry = reconcile.decide(spec=spec(), meta=META, status=failed.status, observed=None, now=T1)
    assert len(retry.actions) == 1  # same generation, but not applied yet: try again
    same = retry.with_outcome(retry.actions[0], reconcile.failed_from_any(error), now=T1)
    assert same.status == failed.status  # a repeated failure writes nothing
    ok = retry.with_outcome(retry.actions[0], reconcile.Applied(version=1, changed=True), now=T1)
    assert ok.status.phase == Phase.PENDING and cond.is_true(ok.status.conditions, cond.APPLIED)


def test_delete_of_an_applied_task_deletes_the_release() -> None:
    assert reconcile.decide_delete(meta=META, status=applied()) == (reconcile.DeleteRelease(release="ml/digits"),)


# ------------------------------------------------------------------ phase table


def _conditions(valid: str | None, applied_reason: str | None, complete_reason: str | None) -> MLTaskStatus:
    by_reason = {r.reason: r for r in vars(cond).values() if isinstance(r, cond.Reason)}
    cs: list[Any] = []
    for reason in (valid, applied_reason, complete_reason):
        if reason is not None:
            cs = cond.set_condition(cs, by_reason[reason], now=T0, error="e", release="r", digest="d")
    return MLTaskStatus(conditions=cs)


VALID = [None, "SpecValid", "InvalidSpec"]
APPLIED = [None, "ReleaseApplied", "ControllerUnavailable", "ManifestNotFound", "ControllerRejected"]
COMPLETE = [None, "AwaitingDevices", "InProgress", "AllSucceeded", "DevicesFailed"]


def expected_phase(valid: str | None, applied_reason: str | None, complete_reason: str | None) -> Phase:
    if valid == "InvalidSpec":
        return Phase.INVALID
    if applied_reason is None or applied_reason == "ControllerUnavailable":
        return Phase.PENDING
    if applied_reason in ("ManifestNotFound", "ControllerRejected"):
        return Phase.FAILED
    return {
        None: Phase.PENDING,
        "AwaitingDevices": Phase.PENDING,
        "InProgress": Phase.PROGRESSING,
        "AllSucceeded": Phase.SUCCEEDED,
        "DevicesFailed": Phase.FAILED,
    }[complete_reason]


@pytest.mark.parametrize(
    ("valid", "applied_reason", "complete_reason"), list(itertools.product(VALID, APPLIED, COMPLETE))
)
def test_derive_phase_for_every_combination(
    valid: str | None, applied_reason: str | None, complete_reason: str | None
) -> None:
    status = _conditions(valid, applied_reason, complete_reason)
    assert reconcile.derive_phase(status) == expected_phase(valid, applied_reason, complete_reason)


# ------------------------------------------------------------------ status I/O


def test_status_patch_sets_changed_keys_and_nulls_removed_ones() -> None:
    old = MLTaskStatus(phase=Phase.PENDING, release="ml/a", targeted=1)
    new = MLTaskStatus(phase=Phase.PROGRESSING, targeted=1)
    assert reconcile.status_patch(old, new) == {"phase": "Progressing", "release": None}


def test_parse_status_reads_what_it_wrote_and_tolerates_junk() -> None:
    status = applied()
    assert reconcile.parse_status(status.to_json()) == status
    assert reconcile.parse_status({"kopf": {"progress": {}}, "phase": "Pending"}).phase == Phase.PENDING
    assert reconcile.parse_status({"targeted": "many"}) == MLTaskStatus()
    assert reconcile.parse_status(None) == MLTaskStatus()


def test_events_on_creation_apply_and_phase_change() -> None:
    status = applied(version=7)
    events = reconcile.transition_events(MLTaskStatus(), status)
    assert [(e.type, e.reason) for e in events] == [("Normal", "ReleaseApplied"), ("Normal", "PhasePending")]
    assert "version 7" in events[0].message
