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
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from tether.controller import cohorts, targeting
from tether.spec import selectors, staging
from tether.spec.staging import Action, Rollout

CONDITION_KEYS = ("charging", "unmeteredNetwork", "idle")


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


# ---------------------------------------------------------------- what the decisions read of a release


class Policy(Protocol):
    """The policy documents a served version carries to devices."""

    @property
    def trigger(self) -> Mapping[str, Any]: ...

    @property
    def resources(self) -> Mapping[str, Any]: ...


class Subject(Protocol):
    """A release as these decisions read it; `tether.controller.releases.Release` is one.

    A Protocol, so that this module imports nothing of `releases` (which imports
    this module's values one way: no import loop).
    """

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def manifest_digest(self) -> str: ...

    @property
    def paused(self) -> bool: ...

    @property
    def deleted(self) -> bool: ...

    @property
    def spec(self) -> Policy: ...

    @property
    def target(self) -> selectors.Target: ...

    @property
    def rollout(self) -> Rollout | None: ...

    @property
    def rollout_state(self) -> RolloutState: ...

    @property
    def stable(self) -> Stable | None: ...

    def offered_to(self, facts: selectors.Facts, *, delivered: bool) -> bool: ...


# ---------------------------------------------------------------- the stable version


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stable:
    """The version devices outside the current stage keep (the last one whose rollout completed)."""

    version: int
    manifest_digest: str
    target: selectors.Target
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
    def of(cls, rel: Subject) -> Stable:
        return cls(
            version=rel.version,
            manifest_digest=rel.manifest_digest,
            target=rel.target,
            trigger=rel.spec.trigger,
            resources=rel.spec.resources,
        )


def next_stable(previous: Subject | None) -> Stable | None:
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


def effective(rel: Subject) -> Rollout | None:
    ro: Rollout | None = rel.rollout
    return None if ro is None else ro.for_version(rel.version)


def staged(rel: Subject | None) -> bool:
    return rel is not None and rel.rollout is not None


def current(rel: Subject) -> Served:
    return Served(
        release=rel.name,
        version=rel.version,
        manifest_digest=rel.manifest_digest,
        trigger=rel.spec.trigger,
        resources=rel.spec.resources,
    )


def stable_for(rel: Subject, facts: selectors.Facts) -> Served | None:
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


def stage_thresholds(rel: Subject) -> list[float]:
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


def stage_of(rel: Subject, facts: selectors.Facts) -> int | None:
    """The earliest stage that reaches a targeted device (None when none, or it is not targeted)."""
    ro = effective(rel)
    if ro is None or not rel.target.matches(facts):
        return None
    (device_id,) = facts.get(selectors.DEVICE_ID_KEY, frozenset(("",)))
    return cohorts.first_stage(
        device_bucket=cohorts.bucket(ro.salt, device_id),
        thresholds=stage_thresholds(rel),
        cohorts=[r.cohort is not None and r.cohort.matches(facts) for r in ro.stages],
    )


def served(rel: Subject, facts: selectors.Facts, *, delivered: bool) -> Served | None:
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


def change(*, before: Subject | None, after: Subject | None, facts: selectors.Facts) -> Change:
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


def serving_changed(before: Subject | None, after: Subject) -> bool:
    """Whether an apply that kept the version still changes what some device is served."""
    if before is None:
        return True
    return (
        (before.rollout.to_json() if before.rollout else None) != (after.rollout.to_json() if after.rollout else None)
        or before.paused != after.paused
        or before.rollout_state != after.rollout_state
    )


# ---------------------------------------------------------------- what an apply stores


@dataclasses.dataclass(frozen=True, kw_only=True)
class Columns:
    """The rollout columns an apply stores with a release: the decision, the thresholds fixed, the stable version."""

    rollout: Rollout | None
    state: RolloutState
    stable: Stable | None

    def needs_population(self, version: int) -> bool:
        """Whether a stage begins now: its threshold is fixed over the devices targeted now (storage reads them)."""
        return self.rollout is not None and needs_population(self.state, self.rollout, version)

    def advanced(self, *, version: int, population: Iterable[str], now: str) -> Columns:
        return dataclasses.replace(
            self, state=advance_state(self.state, self.rollout, version=version, population=population, now=now)
        )


def columns_on_apply(*, document: Mapping[str, Any], version: int, previous: Subject | None) -> Columns:
    """The rollout columns of a release applied at `version` over `previous` (as stored before; maybe deleted).

    A version bump computes the stable version (`next_stable`); otherwise the
    stable version and the thresholds fixed so far carry over.
    """
    rollout = staging.parse_rollout(document or {})
    live = previous if previous is not None and not previous.deleted else None
    stable = next_stable(live) if live is None or live.version != version else live.stable
    state = live.rollout_state if live is not None and rollout is not None else RolloutState()
    return Columns(rollout=rollout, state=state, stable=stable)
