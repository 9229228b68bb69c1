"""Reconcile an MLTask as decide-then-act: pure decisions, frozen values.

`decide(spec, meta, status, observed, now)` looks at the object and at what the
controller reports, and returns the status the object should have plus the
actions to perform on the controller. The Kopf adapter (`handlers.py`) performs
each action, folds its outcome back in with `Decision.with_outcome` (also pure),
and patches the status once, only if it changed. A reconcile that finds
nothing new returns an equal status, so nothing is written.

The steps run in a fixed order:
1. validate the spec; an invalid spec sets `Valid=False` and nothing else
   happens (nothing is sent to the controller);
2. fold in the controller's observation (counts, version, aggregate);
3. if the controller has not accepted this generation yet, ask for an
   `ApplyRelease` (its outcome sets `Applied` and `observedGeneration`);
4. derive the `Complete` condition and the phase from the result.

The phase is never stored as a decision of its own: `derive_phase` computes
it from the conditions, so status and phase cannot disagree.

Staged rollouts run through `tether.operator.progression`: after the
observation is folded in, its state machine moves the rollout (stage passed,
gate failed, pause, promote, abort, rollback), and the rollout document it
derives travels with every `ApplyRelease`. A document that differs from the
one the controller last accepted (`status.rollout.appliedDocument`) asks for
an apply, so a stage change reaches the controller even after a restart or a
failed call. When an apply reveals a new version, the rollout restarts at
stage 0 for it and a follow-up apply carries that decision.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any, Protocol

from tether.common import errors
from tether.operator import conditions as cond
from tether.operator import progression, task_status, validate
from tether.operator.model import MLTaskSpec
from tether.operator.task_status import AggregateSummary, ConditionStatus, MLTaskStatus, Phase, RolloutPhase
from tether.spec import names, resources, selectors, staging, wire

# ------------------------------------------------------------------ inputs


@dataclasses.dataclass(frozen=True, kw_only=True)
class Meta:
    """The parts of the object's metadata that a reconcile depends on."""

    name: str
    namespace: str
    generation: int
    annotations: Mapping[str, str] = dataclasses.field(default_factory=dict)  # promote / abort / resume requests

    @property
    def release(self) -> str:
        return f"{self.namespace}/{self.name}"


class ObservedRelease(Protocol):
    """What the controller reports about a release (`tether.common.admin_client.ReleaseStatus` has these fields)."""

    @property
    def release(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def manifest_digest(self) -> str: ...
    @property
    def targeted(self) -> int: ...
    @property
    def notified(self) -> int: ...
    @property
    def installed(self) -> int: ...
    @property
    def succeeded(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def results(self) -> int: ...
    @property
    def aggregate(self) -> Mapping[str, Any] | None: ...
    @property
    def aggregate_round(self) -> int: ...
    @property
    def not_reporting(self) -> int: ...
    @property
    def report_deadline_s(self) -> int: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observation:
    """A plain `ObservedRelease`, for tests and for callers without the proto message."""

    release: str
    version: int = 0
    manifest_digest: str = ""
    targeted: int = 0
    notified: int = 0
    installed: int = 0
    succeeded: int = 0
    failed: int = 0
    refused: int = 0
    results: int = 0
    aggregate: Mapping[str, Any] | None = None
    aggregate_round: int = 0
    health: Mapping[str, Any] | None = None  # per-stage health of a staged rollout (ReleaseStatus.health_json)
    federated: Mapping[str, Any] | None = None  # a federated release's rounds (ReleaseStatus.federated_json)
    not_reporting: int = 0  # told, silent past report_deadline_s (staged or not)
    report_deadline_s: int = staging.DEFAULT_REPORT_DEADLINE_S


# ------------------------------------------------------------------ actions and outcomes


@dataclasses.dataclass(frozen=True, kw_only=True)
class ApplyRelease:
    """Create or update the release on the controller (`AdminService.ApplyRelease`), as typed values.

    Target, resources and rollout are the shared spec types; trigger and
    aggregation the documents agents and workers read. They are encoded once,
    at the gRPC edge (tether.spec.wire); the `*_json` properties show the text
    the deprecated wire fields carry, which is also what the status records as
    the applied rollout document.
    """

    release: str
    generation: int
    manifest_digest: str
    target: selectors.Target
    trigger: Mapping[str, Any]  # the agents' trigger document (tether.spec.triggers)
    aggregation: Mapping[str, Any]
    paused: bool
    resources: resources.Resources
    rollout: staging.Rollout | None = None  # tether.operator.progression.rollout_document; None = nothing to stage
    # spec.federated as the shared parser's document (tether.spec.federation); {} = not federated
    federated: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: MLTaskSpec, meta: Meta, *, rollout: staging.Rollout | None = None) -> ApplyRelease:
        return cls(
            release=meta.release,
            generation=meta.generation,
            manifest_digest=spec.bundle.digest,
            target=spec.target.parsed(),
            trigger=spec.trigger.agent_document(),
            aggregation=spec.aggregation.to_json(),
            paused=spec.paused,
            resources=spec.resources.parsed(),
            rollout=rollout,
            federated={} if spec.federated is None else spec.federated.document(),
        )

    @property
    def target_json(self) -> str:
        return wire.target_json(self.target)

    @property
    def trigger_json(self) -> str:
        """In the agents' format, e.g. `{"seconds":60,"type":"interval"}`: only the fields the MLTask sets."""
        return wire.canonical(self.trigger)

    @property
    def aggregation_json(self) -> str:
        return wire.canonical(self.aggregation)

    @property
    def resources_json(self) -> str:
        """The CRD's camelCase keys (`timeoutSeconds`, `memoryMB`, `cpuSeconds` when set)."""
        return wire.resources_json(self.resources)

    @property
    def rollout_json(self) -> str:
        return wire.rollout_json(self.rollout)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeleteRelease:
    """Delete the release on the controller (`AdminService.DeleteRelease`)."""

    release: str


Action = ApplyRelease | DeleteRelease


@dataclasses.dataclass(frozen=True, kw_only=True)
class Applied:
    """The controller accepted an `ApplyRelease`."""

    version: int
    changed: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deleted:
    """The controller performed a `DeleteRelease` (`existed` is false if there was nothing to delete)."""

    existed: bool


@dataclasses.dataclass(frozen=True, kw_only=True)
class Failed:
    """An action failed; `code` is a `grpc.StatusCode` name, as `TetherError.code` carries it."""

    code: str
    message: str

    @classmethod
    def from_error(cls, error: errors.TetherError) -> Failed:
        return cls(code=error.code, message=errors.bounded(str(error)))

    @property
    def transient(self) -> bool:
        return self.code in TRANSIENT_CODES


Outcome = Applied | Deleted | Failed

# Codes after which the same request may succeed later without any change on our side.
TRANSIENT_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN", "INTERNAL", "ABORTED"})


# ------------------------------------------------------------------ decision


@dataclasses.dataclass(frozen=True)
class Decision:
    """The status an object should have, and what is still to be done to get there."""

    status: MLTaskStatus
    actions: tuple[Action, ...] = ()
    # What a follow-up apply needs (a new version restarts the rollout): the valid spec and the object.
    spec: MLTaskSpec | None = dataclasses.field(default=None, compare=False)
    meta: Meta | None = dataclasses.field(default=None, compare=False)

    def with_outcome(self, action: Action, outcome: Outcome, *, now: datetime.datetime) -> Decision:
        """This decision with `action` done: its outcome folded into the status, the action dropped.

        An accepted apply records the rollout document the controller now holds;
        when it revealed a new version the rollout restarts at stage 0 for it,
        and an apply of that decision is appended.
        """
        remaining = tuple(a for a in self.actions if a != action)
        status = self.status
        if isinstance(action, ApplyRelease):
            status = _fold_apply(status, action, outcome, now=now)
            if isinstance(outcome, Applied) and self.spec is not None and self.meta is not None:
                status = advance(status, self.spec, self.meta, health=None, now=now)
                if status.rollout is not None:
                    status = status.model_copy(
                        update={"rollout": status.rollout.model_copy(update={"applied_document": action.rollout_json})}
                    )
                    desired = progression.rollout_document(self.spec, release=self.meta.release, state=status.rollout)
                    if desired != action.rollout and not any(isinstance(a, ApplyRelease) for a in remaining):
                        remaining = (*remaining, ApplyRelease.from_spec(self.spec, self.meta, rollout=desired))
        return Decision(status=derive(status, now=now), actions=remaining, spec=self.spec, meta=self.meta)


def decide(
    *,
    spec: Mapping[str, Any] | None,
    meta: Meta,
    status: MLTaskStatus,
    observed: ObservedRelease | None,
    now: datetime.datetime,
) -> Decision:
    """The status `status` should become and the actions to perform on the controller. Pure."""
    try:
        names.release_name(meta.namespace, meta.name)  # every identifier derived from it fits its limits
        typed = validate.validate(spec)
    except errors.InvalidSpec as e:
        new = status.model_copy(
            update={
                "observed_generation": meta.generation,
                "conditions": cond.set_condition(
                    status.conditions, cond.INVALID_SPEC, now=now, refresh_message=True, error=str(e)
                ),
            }
        )
        return Decision(status=derive(new, now=now))

    conditions = cond.set_condition(status.conditions, cond.SPEC_VALID, now=now)
    conditions = cond.set_condition(conditions, cond.PAUSED_BY_SPEC if typed.paused else cond.NOT_PAUSED, now=now)
    new = status.model_copy(update={"conditions": conditions})
    health = None
    if observed is not None and observed.release == meta.release:
        new = observe(new, observed)
        health = getattr(observed, "health", None)
    new = advance(new, typed, meta, health=health, now=now)
    if observed is not None and observed.release == meta.release:
        new = silence(new, typed, deadline_s=observed.report_deadline_s, now=now)

    desired = progression.rollout_document(typed, release=meta.release, state=new.rollout)
    applied = new.rollout.applied_document if new.rollout is not None else None
    actions: tuple[Action, ...] = ()
    if (
        status.observed_generation != meta.generation
        or not cond.is_true(status.conditions, cond.APPLIED)
        or (new.rollout is not None and wire.rollout_json(desired) != applied)
    ):
        actions = (ApplyRelease.from_spec(typed, meta, rollout=desired),)
    return Decision(status=derive(new, now=now), actions=actions, spec=typed, meta=meta)


def advance(
    status: MLTaskStatus,
    spec: MLTaskSpec,
    meta: Meta,
    *,
    health: Mapping[str, Any] | None,
    now: datetime.datetime,
) -> MLTaskStatus:
    """`status` with the rollout state machine stepped (tether.operator.progression) and its conditions set."""
    inputs = progression.Inputs(
        spec=spec,
        release=meta.release,
        version=status.version,
        health=health,
        annotations=meta.annotations,
        now=now,
    )
    state, _ = progression.step(status.rollout, inputs)
    total = len(spec.rollout.stages)
    index = total - 1 if state is None else min(state.current_stage, total - 1)
    conditions = status.conditions
    for reason, fields in progression.condition_updates(state, spec):
        conditions = cond.set_condition(conditions, reason, now=now, refresh_message=True, **fields)
    return status.model_copy(update={"rollout": state, "stage": f"{index + 1}/{total}", "conditions": conditions})


def report_deadline(spec: Mapping[str, Any] | None) -> int | None:
    """`spec.rollout.reportDeadlineSeconds` of a raw spec, for the status request; None when unset or invalid."""
    try:
        return validate.validate(spec).rollout.report_deadline_seconds
    except errors.InvalidSpec:
        return None


def silence(status: MLTaskStatus, spec: MLTaskSpec, *, deadline_s: int, now: datetime.datetime) -> MLTaskStatus:
    """Degraded for an unstaged release with devices silent past the report deadline (staged: its gates say it).

    Set once a device is silent, cleared (False) when none is any more; a task
    whose devices never went silent carries no such condition.
    """
    if status.rollout is not None and not progression.is_trivial(spec):
        return status
    if status.rollout is not None and status.rollout.phase == RolloutPhase.ROLLED_BACK:
        return status
    current = cond.get(status.conditions, cond.DEGRADED)
    if status.not_reporting > 0:
        fields = {"count": status.not_reporting, "version": status.version, "deadline": deadline_s}
        conditions = cond.set_condition(status.conditions, cond.NOT_REPORTING, now=now, refresh_message=True, **fields)
    elif current is not None and current.reason == cond.NOT_REPORTING.reason:
        conditions = cond.set_condition(status.conditions, cond.ALL_REPORTING, now=now)
    else:
        return status
    return status.model_copy(update={"conditions": conditions})


def decide_delete(*, meta: Meta, status: MLTaskStatus) -> tuple[Action, ...]:
    """What deleting the object takes: nothing if it never reached the controller."""
    never_sent = status.release is None and status.phase == Phase.INVALID
    return () if never_sent else (DeleteRelease(release=meta.release),)


def observe(status: MLTaskStatus, observed: ObservedRelease) -> MLTaskStatus:
    """`status` with the controller's counts, version and aggregate summary."""
    update: dict[str, Any] = {
        "release": observed.release,
        "version": observed.version,
        "manifest_digest": observed.manifest_digest or status.manifest_digest,
        "targeted": observed.targeted,
        "notified": observed.notified,
        "installed": observed.installed,
        "succeeded": observed.succeeded,
        "failed": observed.failed,
        "refused": observed.refused,
        "results": observed.results,
        "not_reporting": observed.not_reporting,
    }
    summary = aggregate_summary(observed.aggregate, observed.aggregate_round)
    if summary is not None:
        update["aggregate"] = summary
    rounds = task_status.federated_summary(getattr(observed, "federated", None))
    if rounds is not None:
        update["federated"] = rounds
    return status.model_copy(update=update)


def aggregate_summary(doc: Mapping[str, Any] | None, round_: int) -> AggregateSummary | None:
    """The status summary of an aggregate body (docs/internals.md, Aggregation); None if absent or unreadable."""
    if not doc:
        return None
    try:
        metrics = {str(k): float(v) for k, v in (doc.get("metrics") or {}).items()}
        return AggregateSummary(
            round=max(0, int(round_)),
            results=max(0, int(doc.get("results", 0))),
            samples=max(0, int(doc.get("samples", 0))),
            metrics=dict(sorted(metrics.items())),
        )
    except (ValueError, TypeError, AttributeError):
        return None


def _fold_apply(
    status: MLTaskStatus, action: ApplyRelease, outcome: Outcome, *, now: datetime.datetime
) -> MLTaskStatus:
    if isinstance(outcome, Applied):
        update: dict[str, Any] = {
            "observed_generation": action.generation,
            "release": action.release,
            "version": outcome.version,
            "manifest_digest": action.manifest_digest,
            "conditions": cond.set_condition(status.conditions, cond.RELEASE_APPLIED, now=now, release=action.release),
        }
        if status.version is not None and status.version != outcome.version:
            # Delivery counts belong to a version; the next observation brings the new version's.
            update.update(dict.fromkeys(_VERSION_COUNTS, 0))
        return status.model_copy(update=update)
    if isinstance(outcome, Failed):
        reason = apply_failure_reason(outcome)
        return status.model_copy(
            update={
                "observed_generation": action.generation,
                "conditions": cond.set_condition(
                    status.conditions,
                    reason,
                    now=now,
                    refresh_message=True,
                    error=outcome.message,
                    digest=action.manifest_digest,
                ),
            }
        )
    return status


_VERSION_COUNTS = ("notified", "installed", "succeeded", "failed", "refused", "results")


def apply_failure_reason(outcome: Failed) -> cond.Reason:
    if outcome.transient:
        return cond.CONTROLLER_UNAVAILABLE
    if outcome.code == "FAILED_PRECONDITION":
        return cond.MANIFEST_NOT_FOUND
    return cond.CONTROLLER_REJECTED


# ------------------------------------------------------------------ derived state


def derive(status: MLTaskStatus, *, now: datetime.datetime) -> MLTaskStatus:
    """`status` with the `Complete` condition and the phase recomputed from everything else."""
    conditions = status.conditions
    if cond.is_true(conditions, cond.VALID) and cond.is_true(conditions, cond.APPLIED):
        conditions = cond.set_condition(conditions, completion(status), now=now)
    new = status.model_copy(update={"conditions": conditions})
    return new.model_copy(update={"phase": derive_phase(new)})


def completion(status: MLTaskStatus) -> cond.Reason:
    if status.targeted == 0:
        return cond.AWAITING_DEVICES
    if status.succeeded + status.failed + status.refused < status.targeted:
        return cond.IN_PROGRESS
    if status.failed + status.refused > 0:
        return cond.SOME_FAILED
    return cond.ALL_SUCCEEDED


def derive_phase(status: MLTaskStatus) -> Phase:
    """The phase as a function of the conditions (a pure mapping, tested pair by pair)."""
    valid = cond.get(status.conditions, cond.VALID)
    if valid is not None and valid.status == ConditionStatus.FALSE:
        return Phase.INVALID
    applied = cond.get(status.conditions, cond.APPLIED)
    if applied is None or applied.status == ConditionStatus.UNKNOWN:
        return Phase.PENDING
    if applied.status == ConditionStatus.FALSE:
        return Phase.FAILED if applied.reason in cond.PERMANENT_FAILURES else Phase.PENDING
    if status.rollout is not None:  # a staged rollout under way decides the phase; a completed one leaves it to devices
        by_rollout = {
            RolloutPhase.ROLLED_BACK: Phase.ROLLED_BACK,
            RolloutPhase.PAUSED: Phase.PAUSED,
            RolloutPhase.PROGRESSING: Phase.PROGRESSING,
        }
        if status.rollout.phase in by_rollout:
            return by_rollout[status.rollout.phase]
    complete = cond.get(status.conditions, cond.COMPLETE)
    if complete is None or complete.reason == cond.AWAITING_DEVICES.reason:
        return Phase.PENDING
    if complete.reason == cond.ALL_SUCCEEDED.reason:
        return Phase.SUCCEEDED
    if complete.reason == cond.SOME_FAILED.reason:
        return Phase.FAILED
    return Phase.PROGRESSING


# ------------------------------------------------------------------ status I/O forms


def parse_status(raw: Mapping[str, Any] | None) -> MLTaskStatus:
    """The typed status of an object; an unreadable status reads as empty (it is rewritten)."""
    try:
        return MLTaskStatus.model_validate(dict(raw or {}))
    except ValueError:
        return MLTaskStatus()


def status_patch(old: MLTaskStatus, new: MLTaskStatus) -> dict[str, Any]:
    """A JSON merge patch taking `old` to `new` (top-level status keys); empty when they are equal."""
    before, after = old.to_json(), new.to_json()
    patch: dict[str, Any] = {k: v for k, v in after.items() if before.get(k) != v}
    patch.update({k: None for k in before if k not in after})
    return patch


# ------------------------------------------------------------------ events


@dataclasses.dataclass(frozen=True, kw_only=True)
class Event:
    """A Kubernetes Event to post about the object."""

    type: str  # "Normal" | "Warning"
    reason: str
    message: str


def transition_events(old: MLTaskStatus, new: MLTaskStatus) -> list[Event]:
    """Events for what changed between two statuses: condition transitions, new versions, phases."""
    events: list[Event] = []
    for type_ in cond.TYPES:
        before, after = cond.get(old.conditions, type_), cond.get(new.conditions, type_)
        if after is None:
            continue
        moved = before is None or (before.status, before.reason, before.message) != (
            after.status,
            after.reason,
            after.message,
        )
        if not moved or type_ == cond.COMPLETE:  # completion shows as a phase change
            continue
        if after.reason in cond.SILENCE_REASONS:  # an unstaged release's silent devices
            warning = after.status == ConditionStatus.TRUE
            events.append(Event(type="Warning" if warning else "Normal", reason=after.reason, message=after.message))
            continue
        if type_ in cond.ROLLOUT_TYPES or (type_ == cond.PAUSED and cond.PAUSED_BY_GATE.reason in (after.reason,)):
            continue  # reported below as rollout events
        if (
            before is not None
            and after.reason == cond.NOT_PAUSED.reason
            and before.reason == cond.PAUSED_BY_GATE.reason
        ):
            continue
        if type_ == cond.APPLIED and after.status == ConditionStatus.TRUE:
            continue  # reported below, with the version
        if before is None and after.reason in (cond.NOT_PAUSED.reason, cond.SPEC_VALID.reason):
            continue  # "valid" and "not paused" are not news on creation
        warning = after.status == ConditionStatus.FALSE and type_ in (cond.VALID, cond.APPLIED)
        events.append(Event(type="Warning" if warning else "Normal", reason=after.reason, message=after.message))
    if cond.is_true(new.conditions, cond.APPLIED) and (
        not cond.is_true(old.conditions, cond.APPLIED) or old.version != new.version
    ):
        events.append(
            Event(
                type="Normal",
                reason=cond.RELEASE_APPLIED.reason,
                message=f"Release {new.release} is at version {new.version}.",
            )
        )
    for e in progression.events(old.rollout, new.rollout):
        events.append(Event(type=e.type, reason=e.reason, message=e.message))
    if new.phase is not None and new.phase != old.phase:
        events.append(
            Event(
                type="Warning" if new.phase in (Phase.FAILED, Phase.INVALID, Phase.ROLLED_BACK) else "Normal",
                reason=f"Phase{new.phase}",
                message=f"Phase changed from {old.phase or 'none'} to {new.phase}.",
            )
        )
    return events


def failed_from_any(error: BaseException) -> Failed:
    """An outcome for an error an action raised: typed errors keep their code, I/O errors are transient."""
    if isinstance(error, errors.TetherError):
        return Failed.from_error(error)
    return Failed(code="UNAVAILABLE", message=f"{type(error).__name__}: {error}")
