"""Staged rollouts on the controller: which version each device is served, and per-stage health.

The operator decides (stage index, promote, pause, rollback) and sends its
decision as a release's *rollout document* (`ReleaseSpec.rollout`, a typed
value of `tether.spec.staging` parsed by the one parser both sides share); the
controller applies it to every device, when the device connects and whenever
the document changes:

    {"version": 3,            # the release version the decision is about
     "salt": "ml/digits",     # cohort hashing salt (tether.controller.cohorts)
     "stage": 1,              # current stage index
     "action": "progress",    # progress | complete | rollback
     "stages": [{"cohort": {selector}}, {"percent": 10}, {"percent": 100}]}

A document naming another version than the release's current one (the
operator has not seen a version bump yet) counts as stage 0, `progress`: a new
version never skips its first stage. An empty document means "no staging":
every targeted device gets the current version at once (the behaviour of a
single 100 % stage).

During a rollout the controller serves two versions: devices in the current
stage get the current version, the other targeted devices keep the *stable*
version (the last one whose rollout completed), and devices of a first
release outside the stage get nothing. `rollback` serves every device the
stable version again, or uninstalls a first release. Serving an older
version than the current one is flagged (`DesiredTask.rollback`) so agents
switch back instead of ignoring it as a late announcement.

Stage thresholds are fixed when a stage begins (`advance_state`, over the
devices targeted then) and stored with the release, so every replica and
every restart serves the same cohorts.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tether.controller import cohorts, targeting
from tether.spec import staging
from tether.spec.staging import Action, Rollout

if TYPE_CHECKING:
    from tether.controller import releases

COVERAGE_QUANTILES = (0.5, 0.9, 0.99)
CONDITION_KEYS = ("charging", "unmeteredNetwork", "idle")


def parse_rollout(doc: Any, *, field: str = "rollout") -> Rollout | None:
    """A rollout document in its dict form (stored, or from JSON): the shared parser, `tether.spec.staging`."""
    return staging.parse_rollout(doc, field=field)


# ---------------------------------------------------------------- stored state


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageState:
    threshold: float
    started_at: str  # RFC 3339, from the database clock


@dataclasses.dataclass(frozen=True, kw_only=True)
class RolloutState:
    """Thresholds of the stages begun so far, for one (version, stage list)."""

    version: int = 0
    stages_hash: str = ""
    stages: Mapping[int, StageState] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "stagesHash": self.stages_hash,
            "stages": {str(j): {"threshold": s.threshold, "startedAt": s.started_at} for j, s in self.stages.items()},
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> RolloutState:
        doc = doc or {}
        return cls(
            version=int(doc.get("version", 0)),
            stages_hash=str(doc.get("stagesHash", "")),
            stages={
                int(j): StageState(threshold=float(s["threshold"]), started_at=str(s["startedAt"]))
                for j, s in (doc.get("stages") or {}).items()
            },
        )


def needs_population(state: RolloutState, rollout: Rollout | None, version: int) -> bool:
    """Whether `advance_state` will fix a new threshold (the caller then reads the targeted devices)."""
    if rollout is None:
        return False
    ro = rollout.for_version(version)
    if state.version != version or state.stages_hash != ro.stages_hash:
        return True
    return any(j not in state.stages for j in range(ro.stage + 1))


def advance_state(
    state: RolloutState,
    rollout: Rollout | None,
    *,
    version: int,
    population: Iterable[str],
    now: str,
) -> RolloutState:
    """The state with thresholds fixed for every stage up to the current one (new ones over `population`).

    `population`: ids of the devices the release targets now. A new version or
    an edited stage list starts over.
    """
    if rollout is None:
        return RolloutState()
    ro = rollout.for_version(version)
    if state.version != version or state.stages_hash != ro.stages_hash:
        state = RolloutState(version=version, stages_hash=ro.stages_hash)
    missing = [j for j in range(ro.stage + 1) if j not in state.stages]
    if not missing:
        return state
    buckets = [cohorts.bucket(ro.salt, d) for d in population]
    stages = dict(state.stages)
    for j in missing:
        rule = ro.stages[j]
        stages[j] = StageState(
            threshold=cohorts.threshold(buckets, percent=rule.percent, count=rule.count), started_at=now
        )
    return dataclasses.replace(state, stages=stages)


# ---------------------------------------------------------------- the stable version


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stable:
    """The version devices outside the current stage keep (the last one whose rollout completed)."""

    version: int
    manifest_digest: str
    target: targeting.Target
    trigger: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "manifestDigest": self.manifest_digest,
            "target": dict(self.target.document),
            "trigger": dict(self.trigger),
            "resources": dict(self.resources),
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any] | None) -> Stable | None:
        if not doc:
            return None
        return cls(
            version=int(doc["version"]),
            manifest_digest=str(doc["manifestDigest"]),
            target=targeting.parse_stored(doc.get("target") or {}),
            trigger=doc.get("trigger") or {},
            resources=doc.get("resources") or {},
        )

    @classmethod
    def of(cls, rel: releases.Release) -> Stable:
        return cls(
            version=rel.version,
            manifest_digest=rel.manifest_digest,
            target=rel.target,
            trigger=rel.spec.trigger,
            resources=rel.spec.resources,
        )


def next_stable(previous: releases.Release | None) -> Stable | None:
    """The stable version after `previous` is superseded by a new version.

    `previous` becomes stable when its rollout completed (or it had none); a
    rollout still under way or rolled back leaves the stable version as it was.
    """
    if previous is None or previous.deleted:
        return None
    ro = effective(previous)
    if ro is None or ro.action is Action.COMPLETE:
        return Stable.of(previous)
    return previous.stable


# ---------------------------------------------------------------- what a device is served


@dataclasses.dataclass(frozen=True, kw_only=True)
class Served:
    """One version of a release as a device should have it."""

    release: str
    version: int
    manifest_digest: str
    trigger: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rollback: bool = False  # older than the release's current version, on purpose

    @property
    def key(self) -> tuple[int, str]:
        return (self.version, self.manifest_digest)


def effective(rel: releases.Release) -> Rollout | None:
    ro: Rollout | None = rel.rollout
    return None if ro is None else ro.for_version(rel.version)


def staged(rel: releases.Release | None) -> bool:
    return rel is not None and rel.rollout is not None


def current(rel: releases.Release) -> Served:
    return Served(
        release=rel.name,
        version=rel.version,
        manifest_digest=rel.manifest_digest,
        trigger=rel.spec.trigger,
        resources=rel.spec.resources,
    )


def stable_for(rel: releases.Release, facts: targeting.Facts) -> Served | None:
    stable: Stable | None = rel.stable
    if stable is None or not stable.target.matches(facts):
        return None
    return Served(
        release=rel.name,
        version=stable.version,
        manifest_digest=stable.manifest_digest,
        trigger=stable.trigger,
        resources=stable.resources,
        rollback=True,
    )


def stage_thresholds(rel: releases.Release) -> list[float]:
    """Thresholds of stages 0..current (a stage not begun yet falls back to its fraction)."""
    ro = effective(rel)
    if ro is None:
        return []
    state: RolloutState = rel.rollout_state or RolloutState()
    valid = state.version == rel.version and state.stages_hash == ro.stages_hash
    out = []
    for j, rule in enumerate(ro.stages):
        if valid and j in state.stages:
            out.append(state.stages[j].threshold)
        elif rule.percent is not None:
            out.append(rule.percent / 100)
        else:
            out.append(0.0)
    return out


def stage_of(rel: releases.Release, facts: targeting.Facts) -> int | None:
    """The earliest stage that reaches a targeted device (None when none, or it is not targeted)."""
    ro = effective(rel)
    if ro is None or not rel.target.matches(facts):
        return None
    (device_id,) = facts.get(targeting.DEVICE_ID_KEY, frozenset(("",)))
    return cohorts.first_stage(
        device_bucket=cohorts.bucket(ro.salt, device_id),
        thresholds=stage_thresholds(rel),
        cohorts=[r.cohort is not None and r.cohort.matches(facts) for r in ro.stages],
    )


def served(rel: releases.Release, facts: targeting.Facts, *, delivered: bool) -> Served | None:
    """The version of `rel` a device with `facts` should have; None: none (uninstall).

    `delivered`: the device was already told about the current version (a
    paused release stays with such devices and reaches no new ones).
    """
    if rel.deleted:
        return None
    ro = effective(rel)
    if ro is None:
        return current(rel) if rel.offered_to(facts, delivered=delivered) else None
    if ro.action is Action.ROLLBACK:
        return stable_for(rel, facts)
    if rel.target.matches(facts):
        first = stage_of(rel, facts)
        reached = ro.action is Action.COMPLETE or (first is not None and first <= ro.stage)
        if reached and (not rel.paused or delivered):
            return current(rel)
    return stable_for(rel, facts)


@dataclasses.dataclass(frozen=True)
class Change:
    """What a connected device must hear: `notify` a version, `revoke` the release, or nothing."""

    notify: Served | None = None
    revoke: bool = False


def change(*, before: releases.Release | None, after: releases.Release | None, facts: targeting.Facts) -> Change:
    """What a connected device hears when a staged release goes from `before` to `after`.

    Compared as if the device had what it was served before (a push is news only
    when what it should have moved). Pausing pushes nothing new except a
    rollback; unpausing pushes the current version again (agents ignore a
    version they already have).
    """
    was = served(before, facts, delivered=True) if before is not None else None
    now = served(after, facts, delivered=True) if after is not None else None
    if now is None:
        return Change(revoke=was is not None)
    assert after is not None
    if after.paused and not now.rollback:
        return Change()
    unpaused = before is not None and before.paused and not after.paused
    if was is None or was.key != now.key or unpaused:
        return Change(notify=now)
    return Change()


def serving_changed(before: releases.Release | None, after: releases.Release) -> bool:
    """Whether an apply that kept the version still changes what some device is served."""
    if before is None:
        return True
    return (
        (before.rollout.to_json() if before.rollout else None) != (after.rollout.to_json() if after.rollout else None)
        or before.paused != after.paused
        or before.rollout_state != after.rollout_state
    )


# ---------------------------------------------------------------- health


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeviceRecord:
    """What the store knows of one targeted device, for health."""

    device_id: str
    stage: int | None  # earliest stage reaching it
    version: int | None = None  # delivery row's version
    state: str | None = None  # delivery row's state
    installed_at: float | None = None  # epoch seconds the current version was first installed
    waiting: bool = False  # installed but its participation conditions are not met


@dataclasses.dataclass(frozen=True, kw_only=True)
class ResultRecord:
    device_id: str
    duration_s: float
    metrics: Mapping[str, float]


def health(
    rel: releases.Release,
    *,
    devices: Sequence[DeviceRecord],
    results: Sequence[ResultRecord],
    stage_started: Mapping[int, float],
) -> dict[str, Any]:
    """Per-stage health of the current version, cumulative over nested stages (`ReleaseStatus.health_json`).

    For each stage j up to the current one, over the devices stage j reaches
    (eligible): how many were notified / installed / succeeded / failed at the
    current version, how many report (a terminal state), success and error
    rates among those reporting, p95 of `results.duration_s`, the mean of each
    task metric over their results, and coverage: seconds from the stage's start
    until 50/90/99 % of its eligible devices had installed.
    """
    ro = effective(rel)
    if ro is None:
        return {}
    out_stages = []
    on_stable = sum(1 for d in devices if d.version is not None and d.version != rel.version)
    for j in range(len(ro.stages)):
        members = [d for d in devices if d.stage is not None and d.stage <= j]
        ids = {d.device_id for d in members}
        at_version = [d for d in members if d.version == rel.version]
        states = [d.state for d in at_version]
        succeeded = states.count("succeeded")
        failed = states.count("failed") + states.count("refused")
        reporting = succeeded + failed
        mine = [r for r in results if r.device_id in ids]
        durations = sorted(r.duration_s for r in mine)
        names = sorted({k for r in mine for k in r.metrics})
        metrics = {
            k: sum(r.metrics[k] for r in mine if k in r.metrics) / sum(1 for r in mine if k in r.metrics) for k in names
        }
        installed_times = sorted(d.installed_at for d in at_version if d.installed_at is not None)
        start = stage_started.get(j)
        coverage: dict[str, float] = {}
        if start is not None and members:
            for q in COVERAGE_QUANTILES:
                k = math.ceil(q * len(members))
                if len(installed_times) >= k:
                    coverage[f"p{round(q * 100)}"] = round(max(0.0, installed_times[k - 1] - start), 3)
        out_stages.append(
            {
                "index": j,
                "eligible": len(members),
                "notified": sum(1 for s in states if s != "uninstalled"),
                "installed": sum(1 for s in states if s in ("installed", "running", "succeeded")),
                "succeeded": succeeded,
                "failed": failed,
                "reporting": reporting,
                "waiting": sum(1 for d in at_version if d.waiting and d.state in ("installed",)),
                "results": len(mine),
                "successRate": None if reporting == 0 else succeeded / reporting,
                "errorRate": None if reporting == 0 else failed / reporting,
                "p95LatencySeconds": None if not durations else _quantile(durations, 0.95),
                "metrics": metrics,
                "coverageSeconds": coverage,
            }
        )
    return {
        "version": rel.version,
        "stage": ro.stage,
        "action": ro.action.value,
        "stableVersion": rel.stable.version if rel.stable is not None else 0,
        "onStable": on_stable,
        "stages": out_stages,
    }


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank quantile of sorted values."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def conditions_met(conditions: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    """Participation conditions (`trigger.conditions`) against a device's reported state.

    A condition the device does not report does not hold it back (devices
    that cannot tell whether they are charging still participate).
    """
    for key in CONDITION_KEYS:
        if conditions.get(key) and key in state and str(state[key]).lower() not in ("true", "1", "yes"):
            return False
    return True
