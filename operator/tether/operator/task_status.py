"""The MLTask's status as typed models: what the operator writes, and only it.

The other half of the resource's schema (tether.operator.model holds the
spec, the printer columns and the CRD's names): the CRD YAML takes its status
schema from `MLTaskStatus` (`python -m tether.operator.crd`). Kept apart from
the spec because the two change for different reasons: the spec is the
user's contract, the status the operator's record of a rollout (the state
machine's state lives here, so a restart resumes it).

Pure: pydantic, no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import pydantic

from tether.operator import model


class Phase(enum.StrEnum):
    """Summary of a task's state."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    ROLLED_BACK = "RolledBack"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    INVALID = "Invalid"


class ConditionStatus(enum.StrEnum):
    """Whether a condition holds."""

    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(model.CamelModel):
    """One aspect of the task's state, in the Kubernetes condition convention."""

    type: str = pydantic.Field(description="The aspect, e.g. `Valid`, `Applied`, `Paused`, `Complete`.")
    status: ConditionStatus = pydantic.Field(description="Whether the aspect holds.")
    reason: str = pydantic.Field(description="A CamelCase machine-readable reason for the status.")
    message: str = pydantic.Field(default="", description="Human-readable details.")
    last_transition_time: str = pydantic.Field(
        description="When `status` last changed (RFC 3339); a new reason alone does not move it.",
        json_schema_extra={"format": "date-time"},
    )


class AggregateSummary(model.CamelModel):
    """A summary of the latest aggregation round (the full aggregate stays on the controller)."""

    round: int = pydantic.Field(default=0, ge=0, description="The aggregation round this summary is of.")
    results: int = pydantic.Field(default=0, ge=0, description="Results folded into the aggregate.")
    samples: int = pydantic.Field(default=0, ge=0, description="Samples behind those results.")
    metrics: dict[str, float] = pydantic.Field(
        default_factory=dict, description="Aggregated metrics by name (sample-weighted mean unless set otherwise)."
    )


class FederatedStatus(model.CamelModel):
    """A federated task's current round (the full per-round history: `tether fl history`)."""

    round: int = pydantic.Field(default=0, ge=0, description="The current (latest) round.")
    phase: str = pydantic.Field(default="", description="Its phase: Open, Collecting, Extended, Aggregating, ...")
    selected: int = pydantic.Field(default=0, ge=0, description="Devices selected for it.")
    received: int = pydantic.Field(default=0, ge=0, description="Updates it accepted.")
    refused: int = pydantic.Field(default=0, ge=0, description="Updates it refused (every reason).")
    published: int = pydantic.Field(default=0, ge=0, description="Rounds published so far.")
    epsilon: float | None = pydantic.Field(default=None, description="Privacy spent so far (epsilon at delta).")
    metrics: dict[str, float] = pydantic.Field(
        default_factory=dict, description="Device metrics of the latest published round (sample-weighted)."
    )
    metric: str = pydantic.Field(default="", description="The evaluated metric stopOn and `tether status` follow.")
    value: float | None = pydantic.Field(
        default=None,
        description="Its value after the latest published round that has one (server-side on the held-out set "
        "when evaluation.server is set, else the devices' sample-weighted metric).",
    )
    evaluation_error: str = pydantic.Field(
        default="", max_length=1024, description="Why server-side evaluation last failed, if it did."
    )


def federated_summary(doc: Mapping[str, Any] | None) -> FederatedStatus | None:
    """The status of `ReleaseStatus.federated_json` (docs/internals.md); None if absent or unreadable."""
    if not doc:
        return None
    try:
        history = list(doc.get("history") or [])
        done = [h for h in history if h.get("phase") == "Published"]
        eps = doc.get("epsilon")
        return FederatedStatus(
            round=int(doc.get("round", 0)),
            phase=str(doc.get("phase", "")),
            selected=int(doc.get("selected", 0)),
            received=int(doc.get("received", 0)),
            refused=sum(int(v) for v in (doc.get("refused") or {}).values()),
            published=len(done),
            epsilon=None if eps is None else float(eps),
            metrics={str(k): float(v) for k, v in (done[-1].get("metrics") or {}).items()} if done else {},
            metric=str(doc.get("metric") or ""),
            value=next((float(h["value"]) for h in reversed(done) if h.get("value") is not None), None),
            evaluation_error=str(doc.get("evaluationError") or "")[:1024],
        )
    except (ValueError, TypeError, AttributeError, pydantic.ValidationError):
        return None


class RolloutPhase(enum.StrEnum):
    """Where the rollout of the current version stands (a state machine: tether.operator.progression)."""

    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    COMPLETED = "Completed"
    ROLLED_BACK = "RolledBack"


class StagePhase(enum.StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PASSED = "Passed"
    PROMOTED = "Promoted"
    FAILED = "Failed"


class GateState(enum.StrEnum):
    PASSED = "Passed"
    FAILED = "Failed"
    WAITING = "Waiting"


class GateStatus(model.CamelModel):
    """One gate of a stage, as last evaluated."""

    model_config = pydantic.ConfigDict(extra="ignore")

    metric: str = pydantic.Field(description="The gated metric.")
    min: float | None = pydantic.Field(default=None, description="Lower bound.")
    max: float | None = pydantic.Field(default=None, description="Upper bound.")
    value: float | None = pydantic.Field(default=None, description="The metric's value; absent without data.")
    state: GateState = pydantic.Field(description="`Passed`, `Failed`, or `Waiting` (not enough data yet).")


class StageStatus(model.CamelModel):
    """One stage: its state and the counts of the devices it reaches (cumulative over earlier stages)."""

    model_config = pydantic.ConfigDict(extra="ignore")

    name: str = pydantic.Field(description="The stage's name (or `stage-<n>`).")
    phase: StagePhase = pydantic.Field(default=StagePhase.PENDING, description="Where the stage stands.")
    started_at: str | None = pydantic.Field(default=None, description="When the stage began (RFC 3339).")
    completed_at: str | None = pydantic.Field(default=None, description="When it passed, was promoted or failed.")
    eligible: int = pydantic.Field(default=0, ge=0, description="Targeted devices the stage reaches.")
    notified: int = pydantic.Field(default=0, ge=0, description="Of those, told about the new version.")
    installed: int = pydantic.Field(default=0, ge=0, description="Of those, installed the new version.")
    succeeded: int = pydantic.Field(default=0, ge=0, description="Of those, succeeded.")
    failed: int = pydantic.Field(default=0, ge=0, description="Of those, failed or refused.")
    waiting: int = pydantic.Field(
        default=0, ge=0, description="Installed but waiting for their participation conditions."
    )
    not_reporting: int = pydantic.Field(
        default=0,
        ge=0,
        description="Told about the version and silent (no report) for longer than the report deadline.",
    )
    success_rate: float | None = pydantic.Field(default=None, description="Succeeded / reporting.")
    error_rate: float | None = pydantic.Field(default=None, description="Failed / reporting.")
    p95_latency_seconds: float | None = pydantic.Field(default=None, description="p95 of run durations.")
    metrics: dict[str, float] = pydantic.Field(default_factory=dict, description="Means of task metrics.")
    coverage_seconds: dict[str, float] = pydantic.Field(
        default_factory=dict,
        description="Seconds from the stage's start until p50/p90/p99 of its eligible devices had installed.",
    )
    gates: list[GateStatus] = pydantic.Field(default_factory=list, description="The stage's gates.")


class RolloutStatus(model.CamelModel):
    """The rollout of one version: the state machine's state, kept in the CR so a restart resumes it."""

    model_config = pydantic.ConfigDict(extra="ignore")

    phase: RolloutPhase = pydantic.Field(description="Progressing, Paused, Completed or RolledBack.")
    version: int = pydantic.Field(ge=0, description="The release version being rolled out.")
    current_stage: int = pydantic.Field(default=0, ge=0, description="Index of the current stage.")
    stages_hash: str = pydantic.Field(default="", description="Hash of spec.rollout.stages: edits are detected.")
    stage_started_at: str | None = pydantic.Field(default=None, description="When the current stage's bake began.")
    reason: str = pydantic.Field(default="", description="Why the rollout is where it is (CamelCase).")
    message: str = pydantic.Field(default="", description="Human-readable details.")
    stable_version: int = pydantic.Field(
        default=0, ge=0, description="The version devices outside the stage keep (0: none, a first release)."
    )
    fail_fast: bool = pydantic.Field(
        default=True, description="Whether a failing gate stops the stage before its bake ends (off after a resume)."
    )
    handled: dict[str, str] = pydantic.Field(
        default_factory=dict, description="The promote/abort/resume annotation values already acted on."
    )
    applied_document: str | None = pydantic.Field(
        default=None, description="The rollout document the controller last accepted."
    )
    stages: list[StageStatus] = pydantic.Field(default_factory=list, description="Every stage of the rollout.")


class MLTaskStatus(model.CamelModel):
    """The observed state of the task, written by the operator only."""

    model_config = pydantic.ConfigDict(extra="ignore")  # tolerate fields a newer operator wrote

    phase: Phase | None = pydantic.Field(
        default=None, description="Summary of the task's state, derived from its conditions and device counts."
    )
    observed_generation: int | None = pydantic.Field(
        default=None, description="The `metadata.generation` of the spec this status reflects."
    )
    release: str | None = pydantic.Field(
        default=None, description="The controller's release for this task, `<namespace>/<name>`."
    )
    version: int | None = pydantic.Field(
        default=None, description="The controller's release version; it moves when the task's content changes."
    )
    manifest_digest: str | None = pydantic.Field(
        default=None, description="Digest of the manifest the current version delivers."
    )
    stage: str | None = pydantic.Field(
        default=None, description="Current rollout stage as `<current>/<total>`, e.g. `1/3`."
    )
    targeted: int = pydantic.Field(default=0, ge=0, description="Enrolled devices that the target matches.")
    notified: int = pydantic.Field(default=0, ge=0, description="Devices told about the current version.")
    installed: int = pydantic.Field(default=0, ge=0, description="Devices that installed the current version.")
    succeeded: int = pydantic.Field(default=0, ge=0, description="Devices whose run of the current version succeeded.")
    failed: int = pydantic.Field(default=0, ge=0, description="Devices whose run of the current version failed.")
    refused: int = pydantic.Field(
        default=0, ge=0, description="Devices that refused the current version (verification failed; nothing ran)."
    )
    results: int = pydantic.Field(default=0, ge=0, description="Results uploaded for the current version.")
    not_reporting: int = pydantic.Field(
        default=0,
        ge=0,
        description="Devices told about the current version and silent (no report) for longer than "
        "`spec.rollout.reportDeadlineSeconds`, staged or not (the Degraded condition says so when unstaged).",
    )
    aggregate: AggregateSummary | None = pydantic.Field(
        default=None, description="Summary of the latest aggregate, once one exists."
    )
    rollout: RolloutStatus | None = pydantic.Field(
        default=None, description="The staged rollout of the current version: stages, gates and counts."
    )
    federated: FederatedStatus | None = pydantic.Field(
        default=None, description="A federated task's current round, once one exists."
    )
    conditions: list[Condition] = pydantic.Field(
        default_factory=list,
        description="Conditions of the task, one per type.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)
