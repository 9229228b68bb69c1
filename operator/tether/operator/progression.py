"""The staged-rollout state machine: (spec, status, per-stage health, now) -> (new status, transitions).

A rollout belongs to one release version. Its state lives in the MLTask's
`status.rollout` (never in memory), so an operator restart mid-stage resumes
exactly where it was: the stage index, when the stage's bake began, which
promote/abort/resume requests were already acted on, and the rollout
document the controller last accepted.

Phases and the signals that move them are data: `TRANSITIONS` maps
(phase, signal) to the next phase; a pair that is absent means the signal is
ignored in that phase (a promote after completion, a resume of a rollout that
is not paused). Every pair is tested.

One `step` runs, in a fixed order:
1. a new version starts a new rollout at stage 0 (`NewVersion`); an edited
   stage list (its hash moved) keeps the stage index where it still exists and
   restarts the stage's bake (`StagesEdited`);
2. the controller's per-stage health is folded into the stage statuses and the
   current stage's gates are evaluated (`evaluate_gates`);
3. user requests, each once per annotation value: abort
   (`tether.dev/abort`), promote (`tether.dev/promote`: skip the rest of the
   bake and the gates), resume (`tether.dev/resume`);
4. `spec.paused` as a level: pause while it is set, resume when it is cleared;
5. at most one automatic move: a failing gate pauses or rolls back (at once,
   or only at the end of the bake after a manual resume), a stage whose bake
   ended with every gate passing hands over to the next one (or completes).

`rollout_document` turns the state into the rollout document the controller
applies, a `tether.spec.staging.Rollout` (`ReleaseSpec.rollout`, encoded at
the gRPC edge by tether.spec.wire). Pure: no I/O, no clock of its own.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from tether.operator import conditions as cond
from tether.operator.model import GROUP, SILENCE_METRICS, TASK_METRIC_PREFIX, Gate, GateFailureAction, MLTaskSpec, Stage
from tether.operator.task_status import GateState, GateStatus, RolloutPhase, RolloutStatus, StagePhase, StageStatus
from tether.spec import staging

PROMOTE_ANNOTATION = f"{GROUP}/promote"
ABORT_ANNOTATION = f"{GROUP}/abort"
RESUME_ANNOTATION = f"{GROUP}/resume"
REQUEST_ANNOTATIONS = {"abort": ABORT_ANNOTATION, "promote": PROMOTE_ANNOTATION, "resume": RESUME_ANNOTATION}


class Signal(enum.StrEnum):
    NEW_VERSION = "NewVersion"
    STAGES_EDITED = "StagesEdited"
    STAGE_PASSED = "StagePassed"
    LAST_STAGE_PASSED = "LastStagePassed"
    GATE_FAILED_PAUSE = "GateFailedPause"
    GATE_FAILED_ROLLBACK = "GateFailedRollback"
    PAUSE = "Pause"
    RESUME = "Resume"
    PROMOTE = "Promote"
    PROMOTE_LAST = "PromoteLast"
    ABORT = "Abort"


P = RolloutPhase
S = Signal
TRANSITIONS: Mapping[tuple[RolloutPhase, Signal], RolloutPhase] = {
    (P.PROGRESSING, S.NEW_VERSION): P.PROGRESSING,
    (P.PROGRESSING, S.STAGES_EDITED): P.PROGRESSING,
    (P.PROGRESSING, S.STAGE_PASSED): P.PROGRESSING,
    (P.PROGRESSING, S.LAST_STAGE_PASSED): P.COMPLETED,
    (P.PROGRESSING, S.GATE_FAILED_PAUSE): P.PAUSED,
    (P.PROGRESSING, S.GATE_FAILED_ROLLBACK): P.ROLLED_BACK,
    (P.PROGRESSING, S.PAUSE): P.PAUSED,
    (P.PROGRESSING, S.PROMOTE): P.PROGRESSING,
    (P.PROGRESSING, S.PROMOTE_LAST): P.COMPLETED,
    (P.PROGRESSING, S.ABORT): P.ROLLED_BACK,
    (P.PAUSED, S.NEW_VERSION): P.PROGRESSING,
    (P.PAUSED, S.STAGES_EDITED): P.PAUSED,
    (P.PAUSED, S.RESUME): P.PROGRESSING,
    (P.PAUSED, S.PROMOTE): P.PROGRESSING,
    (P.PAUSED, S.PROMOTE_LAST): P.COMPLETED,
    (P.PAUSED, S.ABORT): P.ROLLED_BACK,
    (P.COMPLETED, S.NEW_VERSION): P.PROGRESSING,
    (P.COMPLETED, S.ABORT): P.ROLLED_BACK,
    (P.ROLLED_BACK, S.NEW_VERSION): P.PROGRESSING,
}


def transition(phase: RolloutPhase, signal: Signal) -> RolloutPhase | None:
    """The phase after `signal`, or None when the signal is ignored in `phase`."""
    return TRANSITIONS.get((phase, signal))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Transition:
    """One move of the state machine, for events and tests."""

    signal: Signal
    before: RolloutPhase | None
    after: RolloutPhase
    stage: int
    message: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Inputs:
    """Everything a step depends on."""

    spec: MLTaskSpec
    release: str  # "<namespace>/<name>": the default cohort salt
    version: int | None  # the release version the controller holds (None before the first apply)
    health: Mapping[str, Any] | None  # the controller's ReleaseStatus.health_json, parsed
    annotations: Mapping[str, str]
    now: datetime.datetime


# ------------------------------------------------------------------ helpers


def stages_hash(spec: MLTaskSpec) -> str:
    text = json.dumps([s.to_json() for s in spec.rollout.stages], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stage_name(stage: Stage, index: int) -> str:
    return stage.name or f"stage-{index + 1}"


def describe_stage(stage: Stage) -> str:
    parts = []
    if stage.cohort is not None:
        parts.append("cohort")
    if stage.percent is not None:
        parts.append(f"{stage.percent}% of the targeted devices")
    if stage.count is not None:
        parts.append(f"{stage.count} targeted devices")
    return " + ".join(parts)


def is_trivial(spec: MLTaskSpec) -> bool:
    """A single stage of 100 % with no cohort, bake or gate: the release reaches everyone at once."""
    stages = spec.rollout.stages
    return (
        len(stages) == 1
        and stages[0].percent == 100
        and stages[0].cohort is None
        and not stages[0].gates
        and (stages[0].bake_seconds == 0)
    )


def _time(now: datetime.datetime) -> str:
    return cond.format_time(now)


def _parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


# ------------------------------------------------------------------ gates


def metric_value(metric: str, s: StageStatus) -> float | None:
    if metric == "devicesReporting":
        return float(s.succeeded + s.failed)
    if metric == "successRate":
        return s.success_rate
    if metric == "errorRate":
        return s.error_rate
    if metric == "p95LatencySeconds":
        return s.p95_latency_seconds
    if metric == "notReporting":
        return float(s.not_reporting)
    if metric == "notReportingRate":
        return None if s.notified == 0 else s.not_reporting / s.notified
    if metric.startswith(TASK_METRIC_PREFIX):
        return s.metrics.get(metric.removeprefix(TASK_METRIC_PREFIX))
    return None


def evaluate_gates(gates: Sequence[Gate], s: StageStatus, *, fresh: bool) -> list[GateStatus]:
    """Each gate Passed, Failed or Waiting.

    Without fresh health (the controller has not applied this stage yet) every
    gate waits. A `devicesReporting` minimum is a precondition: below it the
    other gates wait instead of failing on too small a sample. A gate whose
    metric has no value yet (nobody reported, the task reported no such
    metric) waits. Gates on silent devices (`notReporting`,
    `notReportingRate`) are judged without that sample: devices that stopped
    talking are exactly what keeps the sample small.
    """
    reporting = s.succeeded + s.failed
    needed = max((g.min or 0 for g in gates if g.metric == "devicesReporting"), default=0)
    enough = fresh and reporting >= needed
    out = []
    for g in gates:
        value = metric_value(g.metric, s) if fresh else None
        if value is None:
            state = GateState.WAITING
        elif g.metric == "devicesReporting":
            state = GateState.PASSED if value >= (g.min or 0) else GateState.WAITING
        elif not enough and g.metric not in SILENCE_METRICS:
            state = GateState.WAITING
        elif (g.min is not None and value < g.min) or (g.max is not None and value > g.max):
            state = GateState.FAILED
        else:
            state = GateState.PASSED
        out.append(GateStatus(metric=g.metric, min=g.min, max=g.max, value=value, state=state))
    return out


def failures(gates: Sequence[GateStatus]) -> str:
    out = []
    for g in gates:
        if g.state != GateState.FAILED:
            continue
        bound = f">= {g.min:g}" if g.min is not None and (g.value or 0) < g.min else f"<= {g.max:g}"
        out.append(f"{g.metric} is {g.value:.4g}, must be {bound}")
    return "; ".join(out)


# ------------------------------------------------------------------ the step


def step(state: RolloutStatus | None, inp: Inputs) -> tuple[RolloutStatus | None, tuple[Transition, ...]]:
    """The rollout state after looking at `inp`, and the transitions taken. Pure."""
    if inp.version is None:
        return state, ()
    transitions: list[Transition] = []
    spec = inp.spec
    h = stages_hash(spec)
    if state is None or state.version != inp.version:
        before = None if state is None else state.phase
        handled = dict(state.handled) if state is not None else {}
        for request, key in REQUEST_ANNOTATIONS.items():  # requests made before this version are not for it
            if inp.annotations.get(key):
                handled[request] = inp.annotations[key]
        state = _fresh(spec, version=inp.version, handled=handled, now=inp.now)
        transitions.append(Transition(signal=Signal.NEW_VERSION, before=before, after=state.phase, stage=0))
    elif state.stages_hash != h:
        to = transition(state.phase, Signal.STAGES_EDITED)
        before = state.phase
        state = _remap(state, spec, restart=to is not None, now=inp.now)
        if to is not None:
            transitions.append(
                Transition(signal=Signal.STAGES_EDITED, before=before, after=to, stage=state.current_stage)
            )
    state = _fold_health(state, inp)

    for request, key in REQUEST_ANNOTATIONS.items():
        value = inp.annotations.get(key)
        if not value or state.handled.get(request) == value:
            continue
        state = state.model_copy(update={"handled": {**state.handled, request: value}})
        last = state.current_stage >= len(spec.rollout.stages) - 1
        signal = {
            "abort": Signal.ABORT,
            "promote": Signal.PROMOTE_LAST if last else Signal.PROMOTE,
            "resume": Signal.RESUME,
        }[request]
        state = _apply(state, signal, inp, transitions)

    if spec.paused and state.phase == RolloutPhase.PROGRESSING:
        state = _apply(state, Signal.PAUSE, inp, transitions)
    elif not spec.paused and state.phase == RolloutPhase.PAUSED and state.reason == "PausedBySpec":
        state = _apply(state, Signal.RESUME, inp, transitions)

    if state.phase == RolloutPhase.PROGRESSING:
        current = state.stages[state.current_stage]
        stage = spec.rollout.stages[state.current_stage]
        started = _parse_time(state.stage_started_at) or inp.now
        baked = inp.now >= started + datetime.timedelta(seconds=stage.bake_seconds)
        failing = [g for g in current.gates if g.state == GateState.FAILED]
        last = state.current_stage >= len(spec.rollout.stages) - 1
        if failing and (state.fail_fast or baked):
            rollback = stage.on_gate_failure == GateFailureAction.ROLLBACK
            state = _apply(
                state, Signal.GATE_FAILED_ROLLBACK if rollback else Signal.GATE_FAILED_PAUSE, inp, transitions
            )
        elif baked and all(g.state == GateState.PASSED for g in current.gates):
            state = _apply(state, Signal.LAST_STAGE_PASSED if last else Signal.STAGE_PASSED, inp, transitions)
    return state, tuple(transitions)


def _fresh(spec: MLTaskSpec, *, version: int, handled: Mapping[str, str], now: datetime.datetime) -> RolloutStatus:
    stages = [
        StageStatus(name=stage_name(s, i), phase=StagePhase.PROGRESSING if i == 0 else StagePhase.PENDING)
        for i, s in enumerate(spec.rollout.stages)
    ]
    stages[0] = stages[0].model_copy(update={"started_at": _time(now)})
    return RolloutStatus(
        phase=RolloutPhase.PROGRESSING,
        version=version,
        current_stage=0,
        stages_hash=stages_hash(spec),
        stage_started_at=_time(now),
        reason="NewVersion",
        message=f"Rolling out version {version}.",
        handled=dict(handled),
        stages=stages,
    )


def _remap(state: RolloutStatus, spec: MLTaskSpec, *, restart: bool, now: datetime.datetime) -> RolloutStatus:
    """The state for an edited stage list: same index where it still exists, statuses kept by position."""
    n = len(spec.rollout.stages)
    index = min(state.current_stage, n - 1)
    stages = []
    for i, s in enumerate(spec.rollout.stages):
        old = state.stages[i] if i < len(state.stages) else StageStatus(name=stage_name(s, i))
        phase = old.phase
        if i == index and restart:
            phase = StagePhase.PROGRESSING
        elif i > index:
            phase = StagePhase.PENDING
        stages.append(old.model_copy(update={"name": stage_name(s, i), "phase": phase, "gates": []}))
    update: dict[str, Any] = {"stages_hash": stages_hash(spec), "current_stage": index, "stages": stages}
    if restart:
        update.update(stage_started_at=_time(now), reason="StagesEdited", message="The stage list was edited.")
        stages[index] = stages[index].model_copy(update={"started_at": _time(now), "completed_at": None})
    return state.model_copy(update=update)


def _fold_health(state: RolloutStatus, inp: Inputs) -> RolloutStatus:
    doc = inp.health or {}
    fresh_version = doc.get("version") == state.version
    controller_stage = doc.get("stage", -1) if fresh_version else -1
    by_index = {int(s.get("index", -1)): s for s in (doc.get("stages") or [])} if fresh_version else {}
    stages = list(state.stages)
    # After a rollback the devices leave the version: keep the counts it was judged on.
    last = -1 if state.phase == RolloutPhase.ROLLED_BACK else min(state.current_stage, len(stages) - 1)
    for j in range(last + 1):
        h = by_index.get(j)
        if h is not None and controller_stage >= j:
            stages[j] = stages[j].model_copy(
                update={
                    "eligible": int(h.get("eligible", 0)),
                    "notified": int(h.get("notified", 0)),
                    "installed": int(h.get("installed", 0)),
                    "succeeded": int(h.get("succeeded", 0)),
                    "failed": int(h.get("failed", 0)),
                    "waiting": int(h.get("waiting", 0)),
                    "not_reporting": int(h.get("notReporting", 0)),
                    "success_rate": h.get("successRate"),
                    "error_rate": h.get("errorRate"),
                    "p95_latency_seconds": h.get("p95LatencySeconds"),
                    "metrics": dict(sorted((h.get("metrics") or {}).items())),
                    "coverage_seconds": dict(h.get("coverageSeconds") or {}),
                }
            )
    i = state.current_stage
    if state.phase in (RolloutPhase.PROGRESSING, RolloutPhase.PAUSED) and i < len(stages):
        fresh = controller_stage == i and doc.get("action") == "progress"
        gates = evaluate_gates(inp.spec.rollout.stages[i].gates, stages[i], fresh=fresh)
        stages[i] = stages[i].model_copy(update={"gates": gates})
    update: dict[str, Any] = {"stages": stages}
    if fresh_version:
        update["stable_version"] = int(doc.get("stableVersion", 0))
    return state.model_copy(update=update)


def _apply(state: RolloutStatus, signal: Signal, inp: Inputs, transitions: list[Transition]) -> RolloutStatus:
    to = transition(state.phase, signal)
    if to is None:
        return state
    now = _time(inp.now)
    i = state.current_stage
    stages = list(state.stages)
    spec_stage = inp.spec.rollout.stages[i]
    name = stage_name(spec_stage, i)
    update: dict[str, Any] = {"phase": to}
    message = ""
    if signal in (Signal.STAGE_PASSED, Signal.PROMOTE, Signal.LAST_STAGE_PASSED, Signal.PROMOTE_LAST):
        promoted = signal in (Signal.PROMOTE, Signal.PROMOTE_LAST)
        stages[i] = stages[i].model_copy(
            update={"phase": StagePhase.PROMOTED if promoted else StagePhase.PASSED, "completed_at": now}
        )
        verb = "was promoted" if promoted else "passed"
        if signal in (Signal.STAGE_PASSED, Signal.PROMOTE):
            nxt = inp.spec.rollout.stages[i + 1]
            stages[i + 1] = stages[i + 1].model_copy(
                update={"phase": StagePhase.PROGRESSING, "started_at": now, "completed_at": None}
            )
            following = f"stage {i + 2} ({stage_name(nxt, i + 1)}, {describe_stage(nxt)})"
            message = f"Stage {i + 1} ({name}) {verb}; {following} begins."
            update.update(current_stage=i + 1, stage_started_at=now, fail_fast=True)
        else:
            message = f"Stage {i + 1} ({name}) {verb}: version {state.version} reaches every targeted device."
        update.update(reason="Promoted" if promoted else "StagePassed")
    elif signal in (Signal.GATE_FAILED_PAUSE, Signal.GATE_FAILED_ROLLBACK):
        what = failures(stages[i].gates)
        stages[i] = stages[i].model_copy(update={"phase": StagePhase.FAILED, "completed_at": now})
        if signal == Signal.GATE_FAILED_ROLLBACK:
            message = f"Stage {i + 1} ({name}) failed its gates ({what}): rolling back to {_target(state)}."
        else:
            message = f"Stage {i + 1} ({name}) failed its gates ({what}): paused."
        update.update(reason="GateFailed")
    elif signal == Signal.PAUSE:
        message = f"spec.paused: stage {i + 1} ({name}) holds."
        update.update(reason="PausedBySpec")
    elif signal == Signal.RESUME:
        gate_paused = state.reason == "GateFailed"
        stages[i] = stages[i].model_copy(update={"phase": StagePhase.PROGRESSING, "completed_at": None})
        message = f"Resumed at stage {i + 1} ({name}); its bake restarts."
        update.update(reason="Resumed", stage_started_at=now, fail_fast=not gate_paused)
    elif signal == Signal.ABORT:
        message = f"Aborted at stage {i + 1} ({name}): rolling back to {_target(state)}."
        update.update(reason="Aborted")
    update.update(stages=stages, message=message)
    transitions.append(Transition(signal=signal, before=state.phase, after=to, stage=i, message=message))
    return state.model_copy(update=update)


def _target(state: RolloutStatus) -> str:
    if state.stable_version:
        return f"version {state.stable_version}"
    return "nothing (a first release is uninstalled)"


# ------------------------------------------------------------------ what the controller applies


def rollout_document(spec: MLTaskSpec, *, release: str, state: RolloutStatus | None) -> staging.Rollout | None:
    """The rollout document for the controller; None when there is nothing to stage (one plain 100 % stage)."""
    action = staging.Action.PROGRESS
    if state is not None and state.phase == RolloutPhase.COMPLETED:
        action = staging.Action.COMPLETE
    elif state is not None and state.phase == RolloutPhase.ROLLED_BACK:
        action = staging.Action.ROLLBACK
    if is_trivial(spec) and action != staging.Action.ROLLBACK:
        return None
    stages = tuple(
        staging.StageRule(
            percent=s.percent,
            count=s.count,
            cohort=None if s.cohort is None else s.cohort.parsed(field=f"spec.rollout.stages[{i}].cohort"),
        )
        for i, s in enumerate(spec.rollout.stages)
    )
    return staging.Rollout(
        version=0 if state is None else state.version,
        salt=spec.rollout.salt or release,
        stage=0 if state is None else min(state.current_stage, len(stages) - 1),
        action=action,
        stages=stages,
        report_deadline_s=spec.rollout.report_deadline_seconds,
    )


def document(spec: MLTaskSpec, *, release: str, state: RolloutStatus | None) -> dict[str, Any]:
    """`rollout_document` in its document form; {} when there is nothing to stage."""
    doc = rollout_document(spec, release=release, state=state)
    return {} if doc is None else doc.to_json()


# ------------------------------------------------------------------ conditions and events


def condition_updates(state: RolloutStatus | None, spec: MLTaskSpec) -> list[tuple[cond.Reason, dict[str, object]]]:
    """The rollout's conditions (Progressing, Paused when gate-paused, Degraded, RolledBack) with message fields."""
    if state is None or (is_trivial(spec) and state.phase != RolloutPhase.ROLLED_BACK):
        return []  # nothing staged: the plain conditions (Applied, Complete) say it all
    i = min(state.current_stage, len(spec.rollout.stages) - 1)
    stage = spec.rollout.stages[i]
    name = stage_name(stage, i)
    where: dict[str, object] = {"stage": f"{i + 1}/{len(spec.rollout.stages)}", "name": name}
    gates = state.stages[i].gates if i < len(state.stages) else []
    what = failures(gates)
    out: list[tuple[cond.Reason, dict[str, object]]] = []
    if state.phase == RolloutPhase.PROGRESSING:
        out.append((cond.STAGE_PROGRESSING, {**where, "version": state.version, "detail": describe_stage(stage)}))
    elif state.phase == RolloutPhase.COMPLETED:
        out.append((cond.ROLLOUT_COMPLETE, {"version": state.version}))
    elif state.phase == RolloutPhase.PAUSED:
        out.append((cond.ROLLOUT_PAUSED, where))
        if state.reason == "GateFailed":
            out.append((cond.PAUSED_BY_GATE, {**where, "failures": what or "see status.rollout"}))
    else:
        why = (state.message or state.reason).rstrip(".")
        out.append((cond.ROLLOUT_ROLLED_BACK, {"version": state.version, "why": why}))
    out.append((cond.GATES_FAILING, {**where, "failures": what}) if what else (cond.HEALTHY, {}))
    if state.phase == RolloutPhase.ROLLED_BACK:
        reason = cond.ROLLED_BACK_BY_ABORT if state.reason == "Aborted" else cond.ROLLED_BACK_BY_GATE
        out.append((reason, {**where, "failures": what, "target": _target(state)}))
    else:
        out.append((cond.NOT_ROLLED_BACK, {}))
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutEvent:
    type: str  # Normal | Warning
    reason: str
    message: str


def events(old: RolloutStatus | None, new: RolloutStatus | None) -> list[RolloutEvent]:
    """A Kubernetes Event for each rollout transition between two statuses."""
    if new is None:
        return []
    new_version = old is None or old.version != new.version
    if new_version and len(new.stages) == 1 and new.phase == RolloutPhase.COMPLETED and new.reason == "StagePassed":
        return []  # one stage that passes at once (the default rollout): the phase change says it all
    out: list[RolloutEvent] = []
    if new_version:
        out.append(RolloutEvent(type="Normal", reason="RolloutStarted", message=f"Rolling out version {new.version}."))
        old = None
    elif old is not None and old.stages_hash != new.stages_hash:
        out.append(RolloutEvent(type="Normal", reason="StagesEdited", message="spec.rollout.stages was edited."))
    changed = old is None or (old.phase, old.current_stage, old.reason) != (new.phase, new.current_stage, new.reason)
    if changed and new.message and not (old is None and new.reason == "NewVersion"):
        warning = new.reason in ("GateFailed", "Aborted")
        reason = {
            "StagePassed": "StagePassed",
            "Promoted": "StagePromoted",
            "GateFailed": "RolledBack" if new.phase == RolloutPhase.ROLLED_BACK else "GateFailed",
            "PausedBySpec": "RolloutPaused",
            "Resumed": "RolloutResumed",
            "Aborted": "RolledBack",
            "StagesEdited": "StageRestarted",
        }.get(new.reason, new.reason)
        out.append(RolloutEvent(type="Warning" if warning else "Normal", reason=reason, message=new.message))
    if new.phase == RolloutPhase.COMPLETED and (old is None or old.phase != RolloutPhase.COMPLETED):
        out.append(
            RolloutEvent(
                type="Normal",
                reason="RolloutComplete",
                message=f"Version {new.version} reaches every targeted device.",
            )
        )
    return out
