"""The rollout document: the operator's staging decision as the controller applies it.

The operator owns the decision (stage index, promote, pause, rollback: a
state machine, tether.operator.progression) and the controller applies it to
every device (tether.controller.rollouts). What travels between them is this
document, one value type on both sides:

    {"version": 3,            # the release version the decision is about
     "salt": "ml/digits",     # cohort hashing salt
     "stage": 1,              # current stage index
     "action": "progress",    # progress | complete | rollback
     "stages": [{"cohort": {selector}}, {"percent": 10}, {"percent": 100}],
     "reportDeadlineSeconds": 600}   # optional: see below

Only what the controller needs to serve devices and to count them is in it:
who each stage reaches (percent, count, cohort) and how long a notified
device may stay silent before the controller counts it as not reporting
(`reportDeadlineSeconds`, default `DEFAULT_REPORT_DEADLINE_S`: the
`notReporting` count of each stage's health, which gates can bound). The
deadline is not part of the stage hash, so setting it restarts no cohort.

Bake times and health gates stay with the
operator, which evaluates them; putting them here would change the stage
hash the controller fixes its cohort thresholds under, and restart every
running rollout's cohorts on upgrade.

`parse_rollout` is the one parser of the document's dict form (the controller's
stored form and the deprecated `ReleaseSpec.rollout_json`); the typed
`ReleaseSpec.rollout` message decodes through it too (tether.spec.wire).
Errors are `errors.InvalidSpec` naming the field. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from tether.common import errors
from tether.spec import names, selectors

MAX_STAGES = 20
MAX_SALT_LEN = max(256, names.MAX_RELEASE_LEN)  # the operator salts with the release name
MAX_COUNT = 100_000_000
MAX_VERSION = 2**62
DOCUMENT_FIELDS = ("version", "salt", "stage", "action", "stages", "reportDeadlineSeconds")
# A notified device silent this long (no report since it was told) counts as not reporting.
DEFAULT_REPORT_DEADLINE_S = 600
MIN_REPORT_DEADLINE_S = 1
MAX_REPORT_DEADLINE_S = 7 * 24 * 3600


class Action(enum.StrEnum):
    PROGRESS = "progress"
    COMPLETE = "complete"
    ROLLBACK = "rollback"


@dataclasses.dataclass(frozen=True)
class StageRule:
    """Who one stage reaches: a percent or a count of the targeted devices, and/or a cohort."""

    percent: int | None = None
    count: int | None = None
    cohort: selectors.Target | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.percent is not None:
            doc["percent"] = self.percent
        if self.count is not None:
            doc["count"] = self.count
        if self.cohort is not None:
            doc["cohort"] = dict(self.cohort.document)
        return doc


@dataclasses.dataclass(frozen=True, kw_only=True)
class Rollout:
    """A rollout document (None stands for the empty one: no staging, everyone at once)."""

    version: int
    salt: str
    stage: int
    action: Action
    stages: tuple[StageRule, ...]
    report_deadline_s: int | None = None  # None: DEFAULT_REPORT_DEADLINE_S

    @property
    def report_deadline(self) -> int:
        """Seconds a notified device may stay silent before it counts as not reporting."""
        return DEFAULT_REPORT_DEADLINE_S if self.report_deadline_s is None else self.report_deadline_s

    @property
    def stages_hash(self) -> str:
        return stages_hash(self.stages)

    def for_version(self, version: int) -> Rollout:
        """The decision that holds for `version`: this one, or stage 0 progressing for another version."""
        if self.version == version:
            return self
        return dataclasses.replace(self, version=version, stage=0, action=Action.PROGRESS)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": self.version,
            "salt": self.salt,
            "stage": self.stage,
            "action": self.action.value,
            "stages": [s.to_json() for s in self.stages],
        }
        if self.report_deadline_s is not None:  # left out when unset: older documents stay byte-equal
            doc["reportDeadlineSeconds"] = self.report_deadline_s
        return doc


def stages_hash(stages: Sequence[StageRule]) -> str:
    text = json.dumps([s.to_json() for s in stages], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def parse_rollout(doc: Any, *, field: str = "rollout") -> Rollout | None:
    """Validate a rollout document (`errors.InvalidSpec` names the field); None for an empty one."""
    if doc is None or doc == {}:
        return None
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be a JSON object", field=field)
    unknown = set(doc) - set(DOCUMENT_FIELDS)
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {sorted(unknown)}", field=field)
    version = _int(doc.get("version", 0), field=f"{field}.version", low=0, high=MAX_VERSION)
    salt = doc.get("salt")
    if not isinstance(salt, str) or not salt or len(salt) > MAX_SALT_LEN:
        raise errors.InvalidSpec(
            f"must be a non-empty string of at most {MAX_SALT_LEN} characters", field=f"{field}.salt"
        )
    try:
        action = Action(doc.get("action", "progress"))
    except ValueError:
        raise errors.InvalidSpec(
            f"{errors.excerpt(doc.get('action'))} is not one of {[a.value for a in Action]}", field=f"{field}.action"
        ) from None
    raw_stages = doc.get("stages")
    if not isinstance(raw_stages, list) or not 1 <= len(raw_stages) <= MAX_STAGES:
        raise errors.InvalidSpec(f"must be a list of 1 to {MAX_STAGES} stages", field=f"{field}.stages")
    stages = tuple(_parse_stage(s, field=f"{field}.stages[{i}]") for i, s in enumerate(raw_stages))
    stage = _int(doc.get("stage", 0), field=f"{field}.stage", low=0, high=len(stages) - 1)
    deadline = doc.get("reportDeadlineSeconds")
    if deadline is not None:
        deadline = _int(
            deadline,
            field=f"{field}.reportDeadlineSeconds",
            low=MIN_REPORT_DEADLINE_S,
            high=MAX_REPORT_DEADLINE_S,
        )
    return Rollout(version=version, salt=salt, stage=stage, action=action, stages=stages, report_deadline_s=deadline)


def _parse_stage(doc: Any, *, field: str) -> StageRule:
    if not isinstance(doc, dict):
        raise errors.InvalidSpec("must be an object with percent, count and/or cohort", field=field)
    unknown = set(doc) - {"percent", "count", "cohort"}
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {sorted(unknown)}", field=field)
    percent = None if doc.get("percent") is None else _int(doc["percent"], field=f"{field}.percent", low=1, high=100)
    count = None if doc.get("count") is None else _int(doc["count"], field=f"{field}.count", low=1, high=MAX_COUNT)
    if percent is not None and count is not None:
        raise errors.InvalidSpec("a stage has a percent or a count, not both", field=field)
    cohort = None if doc.get("cohort") is None else parse_cohort(doc["cohort"], field=f"{field}.cohort")
    if percent is None and count is None and cohort is None:
        raise errors.InvalidSpec("needs a percent, a count or a cohort", field=field)
    return StageRule(percent=percent, count=count, cohort=cohort)


def parse_cohort(doc: Any, *, field: str, keyed: selectors.KeyPath = selectors.subscript) -> selectors.Target:
    """A stage's cohort: a selector that does not select every device."""
    cohort = selectors.parse_selector(doc, field=field, keyed=keyed)
    if cohort.matches_everything:
        raise errors.InvalidSpec("an empty cohort would select every device", field=field)
    return cohort


def _int(value: Any, *, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.InvalidSpec(f"must be an integer in [{low}, {high}], got {errors.excerpt(value)}", field=field)
    return value
