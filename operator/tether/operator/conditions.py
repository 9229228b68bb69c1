"""Condition types, reasons and message templates of an MLTask, in one place.

Kubernetes condition semantics (as Argo Rollouts keeps them):
- one condition per type;
- setting a condition with the same status and reason changes nothing (not
  even the message), so a reconcile that finds nothing new writes nothing;
- `lastTransitionTime` moves only when the status does; a new reason with
  the same status updates reason and message but keeps the time.

Pure: no I/O, no clock of its own (callers pass `now`).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Sequence

from tether.common import errors
from tether.operator.task_status import Condition, ConditionStatus

# Kubernetes caps a condition's message at 32 KiB; ours stay far below, whatever input they quote.
MAX_MESSAGE_BYTES = 4096

# ------------------------------------------------------------------ types

VALID = "Valid"  # the spec passed the schema and the semantic checks
APPLIED = "Applied"  # the controller holds a release for the current generation
PROGRESSING = "Progressing"  # the staged rollout is moving (False: complete, paused or rolled back)
PAUSED = "Paused"  # spec.paused or a failed gate: the rollout does not advance
DEGRADED = "Degraded"  # a health gate of the current stage fails
ROLLED_BACK = "RolledBack"  # every device was sent back to the previous version
COMPLETE = "Complete"  # every targeted device reached a terminal state

TYPES = (VALID, APPLIED, PROGRESSING, PAUSED, DEGRADED, ROLLED_BACK, COMPLETE)
ROLLOUT_TYPES = (PROGRESSING, DEGRADED, ROLLED_BACK)  # their transitions are reported as rollout events


@dataclasses.dataclass(frozen=True)
class Reason:
    """A reason with its condition type, status and message template (`str.format` fields)."""

    type: str
    status: ConditionStatus
    reason: str
    template: str

    def message(self, **fields: object) -> str:
        """The template filled in, bounded (`MAX_MESSAGE_BYTES`): a field may carry any input."""
        return errors.bounded(self.template.format(**fields), limit=MAX_MESSAGE_BYTES)


SPEC_VALID = Reason(VALID, ConditionStatus.TRUE, "SpecValid", "The spec is valid.")
INVALID_SPEC = Reason(VALID, ConditionStatus.FALSE, "InvalidSpec", "{error}")

RELEASE_APPLIED = Reason(
    APPLIED, ConditionStatus.TRUE, "ReleaseApplied", "The controller holds release {release} for this generation."
)
CONTROLLER_UNAVAILABLE = Reason(
    APPLIED, ConditionStatus.FALSE, "ControllerUnavailable", "The controller could not be reached; retrying: {error}"
)
MANIFEST_NOT_FOUND = Reason(
    APPLIED,
    ConditionStatus.FALSE,
    "ManifestNotFound",
    "The controller does not hold manifest {digest}; upload the bundle (`tether bundle build`): {error}",
)
CONTROLLER_REJECTED = Reason(APPLIED, ConditionStatus.FALSE, "ControllerRejected", "The controller refused: {error}")

PAUSED_BY_SPEC = Reason(PAUSED, ConditionStatus.TRUE, "PausedBySpec", "spec.paused is true: no device is notified.")
NOT_PAUSED = Reason(PAUSED, ConditionStatus.FALSE, "NotPaused", "The rollout is not paused.")
PAUSED_BY_GATE = Reason(
    PAUSED,
    ConditionStatus.TRUE,
    "PausedByGate",
    "Stage {stage} ({name}) failed its gates: {failures}. `tether rollout resume|promote|abort` decides.",
)

STAGE_PROGRESSING = Reason(
    PROGRESSING, ConditionStatus.TRUE, "StageProgressing", "Version {version}, stage {stage} ({name}): {detail}."
)
ROLLOUT_COMPLETE = Reason(
    PROGRESSING,
    ConditionStatus.FALSE,
    "RolloutComplete",
    "Every stage passed: version {version} reaches every targeted device.",
)
ROLLOUT_PAUSED = Reason(PROGRESSING, ConditionStatus.FALSE, "RolloutPaused", "Paused at stage {stage} ({name}).")
ROLLOUT_ROLLED_BACK = Reason(
    PROGRESSING, ConditionStatus.FALSE, "RolloutRolledBack", "Version {version} was rolled back: {why}."
)

HEALTHY = Reason(DEGRADED, ConditionStatus.FALSE, "GatesHealthy", "No gate of the current stage fails.")
GATES_FAILING = Reason(DEGRADED, ConditionStatus.TRUE, "GateFailed", "Stage {stage} ({name}): {failures}.")
# An unstaged release (no gates): Degraded says when told devices went silent past the report deadline.
NOT_REPORTING = Reason(
    DEGRADED,
    ConditionStatus.TRUE,
    "DevicesNotReporting",
    "{count} device(s) told about version {version} have not reported for {deadline} s "
    "(spec.rollout.reportDeadlineSeconds).",
)
ALL_REPORTING = Reason(
    DEGRADED, ConditionStatus.FALSE, "DevicesReporting", "No device told about the version is silent past the deadline."
)
SILENCE_REASONS = frozenset({NOT_REPORTING.reason, ALL_REPORTING.reason})

NOT_ROLLED_BACK = Reason(ROLLED_BACK, ConditionStatus.FALSE, "NotRolledBack", "The current version is not rolled back.")
ROLLED_BACK_BY_GATE = Reason(
    ROLLED_BACK,
    ConditionStatus.TRUE,
    "GateRollback",
    "Stage {stage} ({name}) failed its gates ({failures}): every device returns to {target}.",
)
ROLLED_BACK_BY_ABORT = Reason(
    ROLLED_BACK, ConditionStatus.TRUE, "Aborted", "The rollout was aborted: every device returns to {target}."
)

AWAITING_DEVICES = Reason(
    COMPLETE, ConditionStatus.FALSE, "AwaitingDevices", "No enrolled device matches the target yet."
)
IN_PROGRESS = Reason(COMPLETE, ConditionStatus.FALSE, "InProgress", "Targeted devices are still working.")
ALL_SUCCEEDED = Reason(COMPLETE, ConditionStatus.TRUE, "AllSucceeded", "Every targeted device succeeded.")
SOME_FAILED = Reason(
    COMPLETE, ConditionStatus.TRUE, "DevicesFailed", "Every targeted device finished; some failed or refused the task."
)

# Reasons after which retrying the same spec cannot help: the phase is Failed until the spec
# (or the controller's content) changes. The operator still retries, cheaply, on its poll.
PERMANENT_FAILURES = frozenset({MANIFEST_NOT_FOUND.reason, CONTROLLER_REJECTED.reason})


def format_time(now: datetime.datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes timestamps."""
    return now.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    c = get(conditions, type_)
    return c is not None and c.status == ConditionStatus.TRUE


def set_condition(
    conditions: Sequence[Condition],
    reason: Reason,
    *,
    now: datetime.datetime,
    refresh_message: bool = False,
    **fields: object,
) -> list[Condition]:
    """Conditions with `reason` set; the same list (equal values) when nothing changes.

    With `refresh_message`, a condition whose status and reason stay gets the new message
    (still keeping its `lastTransitionTime`): for reasons whose message carries the
    specifics a user acts on, such as which field of the spec is invalid.
    """
    current = get(conditions, reason.type)
    message = reason.message(**fields)
    if current is not None and current.status == reason.status and current.reason == reason.reason:
        if refresh_message and current.message != message:
            return [c.model_copy(update={"message": message}) if c is current else c for c in conditions]
        return list(conditions)
    new = Condition(
        type=reason.type,
        status=reason.status,
        reason=reason.reason,
        message=message,
        last_transition_time=(
            current.last_transition_time
            if current is not None and current.status == reason.status
            else format_time(now)
        ),
    )
    if current is None:
        return sorted([*conditions, new], key=_order)
    return [new if c.type == reason.type else c for c in conditions]


def _order(c: Condition) -> tuple[int, str]:
    return (TYPES.index(c.type) if c.type in TYPES else len(TYPES), c.type)
