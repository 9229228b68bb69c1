"""Silent devices of an unstaged release (issue 14): counted in status and said by the Degraded condition.

A staged release has per-stage `notReporting` and gates; one without staging
(the default single 100 % stage) has no gates, so the count goes to
`status.notReporting` and the Degraded condition (`DevicesNotReporting`,
a Warning event) says so, cleared when no device is silent any more.
"""

from __future__ import annotations

import datetime

from tether.operator import conditions as cond
from tether.operator import reconcile
from tether.operator.task_status import ConditionStatus, MLTaskStatus

T0 = datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(seconds=30)
T2 = T1 + datetime.timedelta(seconds=30)
DIGEST = "sha256:" + "0" * 64
META = reconcile.Meta(name="digits", namespace="ml", generation=1)
SPEC = {"bundle": {"digest": DIGEST}, "rollout": {"reportDeadlineSeconds": 120}}


def _applied() -> MLTaskStatus:
    d = reconcile.decide(spec=SPEC, meta=META, status=MLTaskStatus(), observed=None, now=T0)
    for action in d.actions:
        d = d.with_outcome(action, reconcile.Applied(version=1, changed=True), now=T0)
    return d.status


def _observe(status: MLTaskStatus, silent: int, *, now: datetime.datetime, spec=SPEC) -> MLTaskStatus:
    obs = reconcile.Observation(
        release="ml/digits",
        version=1,
        targeted=5,
        notified=5,
        installed=5 - silent,
        not_reporting=silent,
        report_deadline_s=120,
    )
    return reconcile.decide(spec=spec, meta=META, status=status, observed=obs, now=now).status


def test_the_deadline_for_the_status_request_comes_from_the_spec() -> None:
    assert reconcile.report_deadline(SPEC) == 120
    assert reconcile.report_deadline({"bundle": {"digest": DIGEST}}) is None  # the controller's default
    assert reconcile.report_deadline({"bundle": {"digest": "nope"}}) is None  # invalid: nothing to ask


def test_silent_devices_of_an_unstaged_release_are_counted_and_degrade_it_until_they_report() -> None:
    start = _applied()
    quiet = _observe(start, 0, now=T0)
    assert cond.get(quiet.conditions, cond.DEGRADED) is None  # never silent: no such condition at all
    assert quiet.to_json().get("notReporting", 0) == 0

    silent = _observe(quiet, 2, now=T1)
    assert silent.not_reporting == 2 and silent.to_json()["notReporting"] == 2
    degraded = cond.get(silent.conditions, cond.DEGRADED)
    assert degraded is not None and degraded.status == ConditionStatus.TRUE
    assert degraded.reason == "DevicesNotReporting"
    assert degraded.message.startswith("2 device(s) told about version 1 have not reported for 120 s")
    events = reconcile.transition_events(quiet, silent)
    assert [(e.type, e.reason) for e in events if e.reason == "DevicesNotReporting"] == [
        ("Warning", "DevicesNotReporting")
    ]
    assert (
        reconcile.decide(spec=SPEC, meta=META, status=silent, observed=_obs_again(silent), now=T2).status == silent
    )  # the same observation changes nothing

    healed = _observe(silent, 0, now=T2)
    cleared = cond.get(healed.conditions, cond.DEGRADED)
    assert cleared is not None and (cleared.status, cleared.reason) == (ConditionStatus.FALSE, "DevicesReporting")
    assert healed.not_reporting == 0


def _obs_again(status: MLTaskStatus) -> reconcile.Observation:
    return reconcile.Observation(
        release="ml/digits",
        version=1,
        targeted=5,
        notified=5,
        installed=5 - status.not_reporting,
        not_reporting=status.not_reporting,
        report_deadline_s=120,
    )


def test_a_staged_release_leaves_degraded_to_its_gates() -> None:
    staged = {
        "bundle": {"digest": DIGEST},
        "rollout": {"stages": [{"percent": 10, "bakeSeconds": 600}, {"percent": 100}]},
    }
    d = reconcile.decide(spec=staged, meta=META, status=MLTaskStatus(), observed=None, now=T0)
    for action in d.actions:
        d = d.with_outcome(action, reconcile.Applied(version=1, changed=True), now=T0)
    status = _observe(d.status, 3, now=T1, spec=staged)
    assert status.not_reporting == 3  # the count is there...
    degraded = cond.get(status.conditions, cond.DEGRADED)
    assert degraded is not None and degraded.reason == cond.HEALTHY.reason  # ...the gates decide Degraded
