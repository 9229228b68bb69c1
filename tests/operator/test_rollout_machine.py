"""The rollout state machine (tether.operator.progression) and its place in decide(): every transition pair,
gates passing and failing, pause / resume / promote / abort, rollback, a spec edited mid-rollout, and a
restart mid-stage (state comes only from the stored status)."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
from typing import Any

import pytest

from tether.operator import conditions as cond
from tether.operator import progression, reconcile
from tether.operator.model import MLTaskSpec
from tether.operator.task_status import GateState, MLTaskStatus, Phase, RolloutPhase, StagePhase, StageStatus

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
DIGEST = "sha256:" + "0" * 64
P, S = RolloutPhase, progression.Signal


def spec_doc(**rollout_changes: Any) -> dict[str, Any]:
    stages = [
        {
            "name": "beta",
            "cohort": {"matchLabels": {"cohort": "beta"}},
            "bakeSeconds": 600,
            "gates": [{"metric": "devicesReporting", "min": 2}, {"metric": "successRate", "min": 0.9}],
        },
        {
            "name": "gray",
            "percent": 10,
            "bakeSeconds": 60,
            "gates": [{"metric": "errorRate", "max": 0.1}, {"metric": "task.accuracy", "min": 0.8}],
        },
        {"name": "full", "percent": 100, "gates": [{"metric": "errorRate", "max": 0.1}], "onGateFailure": "Rollback"},
    ]
    return {"bundle": {"digest": DIGEST}, "rollout": {"stages": stages, **rollout_changes}}


def health(
    stage: int,
    *,
    version: int = 1,
    succeeded: int = 5,
    failed: int = 0,
    accuracy: float = 0.9,
    action: str = "progress",
) -> dict[str, Any]:
    reporting = succeeded + failed
    stages = [
        {
            "index": j,
            "eligible": 10 * (j + 1),
            "notified": 10 * (j + 1),
            "installed": reporting,
            "succeeded": succeeded,
            "failed": failed,
            "reporting": reporting,
            "successRate": succeeded / reporting if reporting else None,
            "errorRate": failed / reporting if reporting else None,
            "p95LatencySeconds": 0.5,
            "metrics": {"accuracy": accuracy},
            "coverageSeconds": {"p50": 3.0},
        }
        for j in range(3)
    ]
    return {"version": version, "stage": stage, "action": action, "stableVersion": 0, "stages": stages}


@dataclasses.dataclass
class Driver:
    """decide() against a fake controller that records the rollout documents it is sent."""

    doc: dict[str, Any]
    version: int = 1
    now: datetime.datetime = T0
    annotations: dict[str, str] = dataclasses.field(default_factory=dict)
    status_json: dict[str, Any] = dataclasses.field(default_factory=dict)
    sent: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    events: list[reconcile.Event] = dataclasses.field(default_factory=list)
    generation: int = 1

    @property
    def status(self) -> MLTaskStatus:
        return reconcile.parse_status(self.status_json)

    def step(self, observed_health: dict[str, Any] | None = None, *, seconds: float = 0) -> MLTaskStatus:
        self.now += datetime.timedelta(seconds=seconds)
        current = self.status
        meta = reconcile.Meta(name="t", namespace="ml", generation=self.generation, annotations=dict(self.annotations))
        observed = None
        if current.release:
            observed = reconcile.Observation(release="ml/t", version=self.version, health=observed_health)
        d = reconcile.decide(spec=self.doc, meta=meta, status=current, observed=observed, now=self.now)
        while d.actions:
            action = d.actions[0]
            assert isinstance(action, reconcile.ApplyRelease)
            self.sent.append(json.loads(action.rollout_json) if action.rollout_json else {})
            d = d.with_outcome(action, reconcile.Applied(version=self.version, changed=False), now=self.now)
        self.events.extend(reconcile.transition_events(current, d.status))
        self.status_json = d.status.to_json()  # a restart loses nothing that is not in here
        return self.status

    def started(self) -> MLTaskStatus:
        """Created, applied, and the controller caught up with stage 0."""
        self.step()
        return self.step(health(0))


def ro(status: MLTaskStatus):
    assert status.rollout is not None
    return status.rollout


# ------------------------------------------------------------------ the transition table


EXPECTED = {
    P.PROGRESSING: {
        S.NEW_VERSION: P.PROGRESSING,
        S.STAGES_EDITED: P.PROGRESSING,
        S.STAGE_PASSED: P.PROGRESSING,
        S.LAST_STAGE_PASSED: P.COMPLETED,
        S.GATE_FAILED_PAUSE: P.PAUSED,
        S.GATE_FAILED_ROLLBACK: P.ROLLED_BACK,
        S.PAUSE: P.PAUSED,
        S.PROMOTE: P.PROGRESSING,
        S.PROMOTE_LAST: P.COMPLETED,
        S.ABORT: P.ROLLED_BACK,
    },
    P.PAUSED: {
        S.NEW_VERSION: P.PROGRESSING,
        S.STAGES_EDITED: P.PAUSED,
        S.RESUME: P.PROGRESSING,
        S.PROMOTE: P.PROGRESSING,
        S.PROMOTE_LAST: P.COMPLETED,
        S.ABORT: P.ROLLED_BACK,
    },
    P.COMPLETED: {S.NEW_VERSION: P.PROGRESSING, S.ABORT: P.ROLLED_BACK},
    P.ROLLED_BACK: {S.NEW_VERSION: P.PROGRESSING},
}


@pytest.mark.parametrize(("phase", "signal"), list(itertools.product(P, S)))
def test_every_phase_signal_pair(phase: RolloutPhase, signal: progression.Signal) -> None:
    assert progression.transition(phase, signal) == EXPECTED[phase].get(signal)


# ------------------------------------------------------------------ stages and gates


def test_a_new_version_starts_at_stage_one_and_tells_the_controller() -> None:
    drv = Driver(spec_doc())
    status = drv.started()
    assert (ro(status).phase, ro(status).current_stage, status.stage, status.phase) == (
        P.PROGRESSING,
        0,
        "1/3",
        Phase.PROGRESSING,
    )
    assert drv.sent[-1] == {
        "version": 1,
        "salt": "ml/t",
        "stage": 0,
        "action": "progress",
        "stages": [{"cohort": {"matchLabels": {"cohort": "beta"}}}, {"percent": 10}, {"percent": 100}],
    }
    assert cond.get(status.conditions, cond.PROGRESSING).reason == "StageProgressing"  # type: ignore[union-attr]


def test_gates_wait_for_enough_devices_then_the_bake_then_the_stage_passes() -> None:
    drv = Driver(spec_doc())
    drv.started()
    status = drv.step(health(0, succeeded=1), seconds=700)  # bake over, but one device reporting < 2
    assert ro(status).current_stage == 0
    assert [g.state for g in ro(status).stages[0].gates] == [GateState.WAITING, GateState.WAITING]
    status = drv.step(health(0, succeeded=5), seconds=1)
    assert ro(status).current_stage == 1 and ro(status).stages[0].phase == StagePhase.PASSED
    assert drv.sent[-1]["stage"] == 1
    assert "StagePassed" in [e.reason for e in drv.events]


def test_a_stage_holds_until_its_bake_ends_even_with_passing_gates() -> None:
    drv = Driver(spec_doc())
    drv.started()
    status = drv.step(health(0), seconds=599)
    assert ro(status).current_stage == 0 and all(g.state == GateState.PASSED for g in ro(status).stages[0].gates)
    assert ro(drv.step(health(0), seconds=1)).current_stage == 1


def test_stale_health_never_passes_a_stage() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    status = drv.step(health(0), seconds=3600)  # the controller still reports stage 0: gray's gates wait
    assert ro(status).current_stage == 1
    assert {g.state for g in ro(status).stages[1].gates} == {GateState.WAITING}
    status = drv.step(health(1, version=99), seconds=1)  # health of another version is ignored too
    assert ro(status).current_stage == 1


def test_a_failing_gate_pauses_at_once_and_reports_why() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    status = drv.step(health(1, succeeded=4, failed=1), seconds=1)  # errorRate 0.2 > 0.1, bake not over
    assert ro(status).phase == P.PAUSED and ro(status).stages[1].phase == StagePhase.FAILED
    assert status.phase == Phase.PAUSED
    assert cond.get(status.conditions, cond.PAUSED).reason == "PausedByGate"  # type: ignore[union-attr]
    degraded = cond.get(status.conditions, cond.DEGRADED)
    assert degraded is not None and degraded.status == "True" and "errorRate is 0.2, must be <= 0.1" in degraded.message
    assert ("Warning", "GateFailed") in [(e.type, e.reason) for e in drv.events]
    assert drv.sent[-1]["action"] == "progress" and drv.sent[-1]["stage"] == 1  # paused holds, nothing rolls back


def test_a_task_metric_gate_fails_on_low_accuracy() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    status = drv.step(health(1, accuracy=0.5), seconds=1)
    assert ro(status).phase == P.PAUSED
    assert [g.state for g in ro(status).stages[1].gates] == [GateState.PASSED, GateState.FAILED]


def test_resume_after_a_gate_failure_restarts_the_bake_and_judges_at_its_end() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    drv.step(health(1, failed=1, succeeded=4), seconds=1)
    drv.annotations[progression.RESUME_ANNOTATION] = "r1"
    status = drv.step(health(1, failed=1, succeeded=4), seconds=1)
    assert ro(status).phase == P.PROGRESSING and not ro(status).fail_fast and ro(status).handled["resume"] == "r1"
    status = drv.step(health(1, failed=1, succeeded=4), seconds=30)
    assert ro(status).phase == P.PROGRESSING  # still failing, but judged only when the bake ends
    status = drv.step(health(1, failed=1, succeeded=4), seconds=31)
    assert ro(status).phase == P.PAUSED
    status = drv.step(health(1, failed=1, succeeded=4), seconds=31)
    assert ro(status).phase == P.PAUSED  # the same annotation value does not resume twice


def test_promote_skips_the_bake_and_the_gates_and_then_completes() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.annotations[progression.PROMOTE_ANNOTATION] = "p1"
    status = drv.step(health(0, succeeded=0), seconds=1)
    assert ro(status).current_stage == 1 and ro(status).stages[0].phase == StagePhase.PROMOTED
    drv.annotations[progression.PROMOTE_ANNOTATION] = "p2"
    assert ro(drv.step(health(1), seconds=1)).current_stage == 2
    drv.annotations[progression.PROMOTE_ANNOTATION] = "p3"
    status = drv.step(health(2), seconds=1)
    assert ro(status).phase == P.COMPLETED and drv.sent[-1]["action"] == "complete"
    assert cond.get(status.conditions, cond.PROGRESSING).reason == "RolloutComplete"  # type: ignore[union-attr]
    assert "RolloutComplete" in [e.reason for e in drv.events]


def test_spec_paused_holds_the_stage_and_clearing_it_resumes() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.doc = {**spec_doc(), "paused": True}
    status = drv.step(health(0), seconds=700)
    assert ro(status).phase == P.PAUSED and ro(status).current_stage == 0 and status.phase == Phase.PAUSED
    assert cond.get(status.conditions, cond.PAUSED).reason == "PausedBySpec"  # type: ignore[union-attr]
    drv.doc = spec_doc()
    status = drv.step(health(0), seconds=1)
    assert ro(status).phase == P.PROGRESSING and ro(status).current_stage == 0  # bake restarted at resume
    assert ro(drv.step(health(0), seconds=600)).current_stage == 1


def test_abort_rolls_back_and_a_first_release_is_uninstalled() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.annotations[progression.ABORT_ANNOTATION] = "a1"
    status = drv.step(health(0), seconds=1)
    assert ro(status).phase == P.ROLLED_BACK and status.phase == Phase.ROLLED_BACK
    assert drv.sent[-1]["action"] == "rollback"
    rolled = cond.get(status.conditions, cond.ROLLED_BACK)
    assert rolled is not None and rolled.reason == "Aborted" and "first release is uninstalled" in rolled.message
    assert ("Warning", "RolledBack") in [(e.type, e.reason) for e in drv.events]


def test_a_failing_gate_with_rollback_rolls_back_and_a_new_version_starts_over() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    drv.step(health(1), seconds=61)
    status = drv.step(health(2, failed=3, succeeded=7), seconds=1)
    assert ro(status).phase == P.ROLLED_BACK and drv.sent[-1]["action"] == "rollback"
    assert cond.get(status.conditions, cond.ROLLED_BACK).reason == "GateRollback"  # type: ignore[union-attr]
    status = drv.step(health(2, succeeded=0, action="rollback"), seconds=60)  # the devices left version 1
    assert (ro(status).stages[2].failed, ro(status).stages[2].error_rate) == (3, 0.3)  # the evidence stays
    # A fixed bundle is a new version: stage 1 again; the abort/promote history does not carry over.
    drv.version, drv.generation = 2, 2
    drv.doc = {**spec_doc(), "bundle": {"digest": "sha256:" + "1" * 64}}
    status = drv.step(health(2, version=1, action="rollback"), seconds=1)
    assert (ro(status).version, ro(status).phase, ro(status).current_stage) == (2, P.PROGRESSING, 0)
    assert drv.sent[-1]["version"] == 2 and drv.sent[-1]["action"] == "progress"


def test_a_stage_list_edited_mid_rollout_is_detected_and_the_stage_restarts() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    before = ro(drv.status).stages_hash
    edited = spec_doc()
    edited["rollout"]["stages"][1] = {**edited["rollout"]["stages"][1], "percent": 20, "bakeSeconds": 120}
    drv.doc, drv.generation = edited, 2
    status = drv.step(health(1), seconds=100)
    assert ro(status).stages_hash != before and ro(status).current_stage == 1
    assert ro(status).stage_started_at == reconcile.cond.format_time(drv.now)  # its bake restarted
    assert drv.sent[-1]["stages"][1] == {"percent": 20}
    assert {"StagesEdited", "StageRestarted"} <= {e.reason for e in drv.events}
    assert ro(drv.step(health(1), seconds=119)).current_stage == 1
    assert ro(drv.step(health(1), seconds=1)).current_stage == 2


def test_an_operator_restart_mid_stage_resumes_from_the_stored_status_only() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    stored = json.loads(json.dumps(drv.status_json))  # what the API server holds
    restarted = Driver(spec_doc(), now=drv.now, status_json=stored)
    status = restarted.step(health(1), seconds=30)
    assert ro(status).current_stage == 1 and not restarted.sent  # nothing to re-apply: the document is current
    assert ro(restarted.step(health(1), seconds=31)).current_stage == 2
    assert restarted.sent[-1]["stage"] == 2


def test_a_failed_apply_is_retried_with_the_current_decision() -> None:
    drv = Driver(spec_doc())
    drv.started()
    drv.step(health(0), seconds=600)
    # The controller lost the stage change (e.g. it was down): the stored applied document is older.
    stored = drv.status_json
    stored["rollout"]["appliedDocument"] = ""
    status = drv.step(health(1), seconds=1)
    assert drv.sent[-1]["stage"] == 1 and ro(status).applied_document


def test_stage_counts_and_coverage_come_from_the_controller() -> None:
    drv = Driver(spec_doc())
    drv.started()
    stage: StageStatus = ro(drv.step(health(0, succeeded=3, failed=1), seconds=1)).stages[0]
    assert (stage.eligible, stage.succeeded, stage.failed, stage.success_rate) == (10, 3, 1, 0.75)
    assert stage.coverage_seconds == {"p50": 3.0} and stage.metrics == {"accuracy": 0.9}


def test_the_default_single_stage_completes_at_once_without_rollout_noise() -> None:
    drv = Driver({"bundle": {"digest": DIGEST}})
    status = drv.step()
    assert ro(status).phase == P.COMPLETED and drv.sent == [{}]  # nothing staged: no document
    assert cond.get(status.conditions, cond.PROGRESSING) is None
    assert not [e for e in drv.events if e.reason.startswith(("Rollout", "Stage"))]


def test_document_of_a_trivial_rollout_is_empty_unless_rolling_back() -> None:
    spec = MLTaskSpec.model_validate({"bundle": {"digest": DIGEST}})
    state = progression._fresh(spec, version=3, handled={}, now=T0)
    assert progression.document(spec, release="ml/t", state=state) == {}
    back = state.model_copy(update={"phase": P.ROLLED_BACK})
    assert progression.document(spec, release="ml/t", state=back)["action"] == "rollback"
