"""Devices that stay silent after being notified, in the operator (issue 14, class 5).

The rollout's `reportDeadlineSeconds` travels in the rollout document; each
stage's `notReporting` count reaches `status.rollout.stages[]`; gates
`notReporting` (a count) and `notReportingRate` (a share of the devices told)
can pause or roll back, however few devices report.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_rollout_machine import DIGEST, Driver, health, ro

from tether.operator import validate
from tether.operator.task_status import GateState, RolloutPhase, StagePhase


def silent_spec(gates: list[dict[str, Any]], **rollout: Any) -> dict[str, Any]:
    stages = [
        {"name": "canary", "percent": 10, "bakeSeconds": 600, "gates": gates},
        {"name": "full", "percent": 100},
    ]
    return {"bundle": {"digest": DIGEST}, "rollout": {"stages": stages, **rollout}}


def silent(stage: int, *, not_reporting: int, **kw: Any) -> dict[str, Any]:
    doc = health(stage, **kw)
    for s in doc["stages"]:
        s["notReporting"] = not_reporting
    return doc


def test_the_deadline_reaches_the_controller_in_the_rollout_document() -> None:
    drv = Driver(silent_spec([{"metric": "errorRate", "max": 0.1}], reportDeadlineSeconds=120))
    drv.started()
    assert drv.sent[-1]["reportDeadlineSeconds"] == 120
    plain = Driver(silent_spec([{"metric": "errorRate", "max": 0.1}]))
    plain.started()
    assert "reportDeadlineSeconds" not in plain.sent[-1]  # unset: the controller's default, document unchanged


def test_not_reporting_is_shown_per_stage() -> None:
    drv = Driver(silent_spec([{"metric": "errorRate", "max": 0.5}]))
    drv.started()
    status = drv.step(silent(0, not_reporting=3), seconds=1)
    assert ro(status).stages[0].not_reporting == 3
    assert status.to_json()["rollout"]["stages"][0]["notReporting"] == 3


def test_a_not_reporting_gate_pauses_even_while_too_few_devices_report() -> None:
    gates = [{"metric": "devicesReporting", "min": 5}, {"metric": "notReporting", "max": 2}]
    drv = Driver(silent_spec(gates))
    drv.started()
    status = drv.step(silent(0, not_reporting=2, succeeded=1), seconds=1)
    assert [g.state for g in ro(status).stages[0].gates] == [GateState.WAITING, GateState.PASSED]
    status = drv.step(silent(0, not_reporting=3, succeeded=1), seconds=1)  # 3 devices went silent
    assert ro(status).phase == RolloutPhase.PAUSED and ro(status).stages[0].phase == StagePhase.FAILED
    assert "notReporting is 3, must be <= 2" in ro(status).message


def test_a_not_reporting_rate_gate_rolls_back_over_the_devices_told() -> None:
    gates = [{"metric": "notReportingRate", "max": 0.25}]
    doc = silent_spec(gates)
    doc["rollout"]["stages"][0]["onGateFailure"] = "Rollback"
    drv = Driver(doc)
    drv.started()
    status = drv.step(silent(0, not_reporting=2), seconds=1)  # 2 of 10 told: 0.2
    assert ro(status).stages[0].gates[0].value == pytest.approx(0.2)
    assert ro(status).phase == RolloutPhase.PROGRESSING
    status = drv.step(silent(0, not_reporting=3), seconds=1)  # 0.3
    assert ro(status).phase == RolloutPhase.ROLLED_BACK and drv.sent[-1]["action"] == "rollback"


@pytest.mark.parametrize(
    ("rollout", "field", "words"),
    [
        ({"reportDeadlineSeconds": 0}, "spec.rollout.reportDeadlineSeconds", "must be at least 1"),
        ({"reportDeadlineSeconds": 10**9}, "spec.rollout.reportDeadlineSeconds", "must be at most 604800"),
    ],
)
def test_a_bad_deadline_is_refused_naming_the_field(rollout: dict[str, Any], field: str, words: str) -> None:
    _refused(silent_spec([{"metric": "errorRate", "max": 0.1}], **rollout), field, words)


@pytest.mark.parametrize(
    ("gate", "field", "words"),
    [
        ({"metric": "notReportingRate", "max": 1.5}, "spec.rollout.stages[0].gates[0].max", "between 0 and 1"),
        ({"metric": "notReporting", "max": -1}, "spec.rollout.stages[0].gates[0].max", "at least 0"),
    ],
)
def test_bad_silence_gates_are_refused_naming_the_field(gate: dict[str, Any], field: str, words: str) -> None:
    _refused(silent_spec([gate]), field, words)


def _refused(doc: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(validate.SpecInvalid) as info:
        validate.validate(doc)
    assert any(i.field == field and words in i.message for i in info.value.issues), info.value.issues


def test_silence_gates_and_the_deadline_are_accepted() -> None:
    spec = validate.validate(silent_spec([{"metric": "notReporting", "max": 0}], reportDeadlineSeconds=30))
    assert spec.rollout.report_deadline_seconds == 30
