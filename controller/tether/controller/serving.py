"""What each device should have, and what it may read: pure decisions over what storage returns.

Storage hands back releases together with what it knows of one device's
delivery (`ReleaseView`); these functions decide, and raise nothing. A "no"
is a value (`Access.verdict`), so the decision can be tested without a
database and without a gRPC server; the device service maps it to
NotFound / PermissionDenied (`tether.controller.release_cache`).

- `desired`: the full desired state of a device (what Subscribe opens with).
- `access_by_release`: for a live release that is neither paused nor staged,
  whether a device may read it is its target applied to the device's facts,
  decided without any delivery row (so it can be answered from memory).
- `access`: otherwise (a paused release serves only devices that already
  have it; a staged one serves by cohort and stage), decided over the
  device's delivery; a device served a staged rollout's stable version reads
  that version's manifest.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

from tether.controller import releases, rollouts
from tether.spec import selectors


@dataclasses.dataclass(frozen=True)
class DesiredTask:
    """One release as a device should have it: version, manifest, and the policy it runs under."""

    release: str
    version: int
    manifest_digest: str
    trigger: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    resources: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rollback: bool = False  # an older version on purpose (staged rollouts: the stable one)

    @classmethod
    def served(cls, s: rollouts.Served) -> DesiredTask:
        return cls(
            release=s.release,
            version=s.version,
            manifest_digest=s.manifest_digest,
            trigger=s.trigger,
            resources=s.resources,
            rollback=s.rollback,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReleaseView:
    """A live release and this device's delivery of it, as storage returns them."""

    release: releases.Release
    has_delivery: bool = False  # a delivery row exists (any version)
    delivered_version: int | None = None  # its version, None without one

    @property
    def delivered(self) -> bool:
        """Whether the device already has the release (staged: at its current version), for pause semantics."""
        if self.release.rollout is None:
            return self.has_delivery
        return self.delivered_version == self.release.version


class Verdict(enum.Enum):
    READABLE = "readable"
    UNKNOWN = "unknown"  # no such live release (NotFound)
    NOT_SERVED = "not-served"  # the release does not target this device, or not now (PermissionDenied)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Access:
    """A device's access to a release: the verdict, and the release as it may read it (its served manifest)."""

    verdict: Verdict
    release: releases.Release | None = None

    @property
    def readable(self) -> bool:
        return self.verdict is Verdict.READABLE


UNKNOWN = Access(verdict=Verdict.UNKNOWN)
NOT_SERVED = Access(verdict=Verdict.NOT_SERVED)


def decided_by_release(rel: releases.Release) -> bool:
    """Whether access to `rel` depends on the release and the device's facts alone (no delivery row)."""
    return rel.rollout is None and not rel.paused


def access_by_release(rel: releases.Release | None, facts: selectors.Facts) -> Access:
    """Access to a release that `decided_by_release`: its target applied to the device's facts."""
    if rel is None or rel.deleted:
        return UNKNOWN
    return Access(verdict=Verdict.READABLE, release=rel) if rel.targets(facts) else NOT_SERVED


def access(view: ReleaseView | None, facts: selectors.Facts) -> Access:
    """Access over the device's delivery: what the device is served decides (`rollouts.served`)."""
    if view is None or view.release.deleted:
        return UNKNOWN
    rel = view.release
    served = rollouts.served(rel, facts, delivered=view.delivered)
    if served is None:
        return NOT_SERVED
    if served.manifest_digest != rel.manifest_digest:
        # A staged rollout serves this device the stable version: it reads that version's content.
        rel = dataclasses.replace(rel, spec=dataclasses.replace(rel.spec, manifest_digest=served.manifest_digest))
    return Access(verdict=Verdict.READABLE, release=rel)


def desired(views: Sequence[ReleaseView], facts: selectors.Facts) -> list[DesiredTask]:
    """Every live release offered to the device, in the order of `views` (its full desired state)."""
    out = []
    for view in views:
        if view.release.deleted:
            continue
        served = rollouts.served(view.release, facts, delivered=view.delivered)
        if served is not None:
            out.append(DesiredTask.served(served))
    return out


def blobs_outside(allowed: Sequence[str] | frozenset[str] | set[str], wanted: Sequence[str]) -> list[str]:
    """Those of `wanted` that are not among a release's blobs (a device may read only its release's blobs)."""
    allowed_set = allowed if isinstance(allowed, set | frozenset) else set(allowed)
    return [d for d in wanted if d not in allowed_set]
