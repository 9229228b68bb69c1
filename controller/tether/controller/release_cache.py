"""Releases as this process reads them: storage behind, a brief memory in front.

Every device of a rollout asks "may I read this release?" within the same
seconds (GetManifest, PullBlobs), so answers are kept for `READABLE_CACHE_S`:

- the live release itself, by name: for a release that is neither paused nor
  staged, the answer is its target applied to the device's facts
  (`serving.access_by_release`), decided here without the database;
- otherwise (a paused release serves only devices that already have it, a
  staged one serves by cohort and stage), the answer per (device, release,
  device facts) over the device's delivery (`serving.access`), a "yes" only.

Any release change this process makes (`apply_release`, `delete_release`
go through here) or hears of (LISTEN/NOTIFY: `replicas.ReleaseListener`
calls `releases_changed`) drops everything kept at once; the time-to-live
bounds staleness should an announcement be missed. A read in flight while a
change was announced is not kept.

The decisions are pure and raise nothing; `release_for_device` is where a
"no" becomes NotFound or PermissionDenied, for the device service.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tether.common import errors
from tether.controller import devices, releases, serving
from tether.controller.storage import contracts
from tether.spec import selectors

READABLE_CACHE_S = 2.0
READABLE_CACHE_SIZE = 200_000


class ReleaseCache:
    def __init__(self, ledger: contracts.ReleaseLedger, *, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._ledger = ledger
        self._monotonic = monotonic
        # (device id, release) -> (monotonic time, device facts, release as readable)
        self._readable: dict[tuple[str, str], tuple[float, selectors.Facts, releases.Release]] = {}
        self._live: dict[str, tuple[float, releases.Release]] = {}  # live releases by name
        self._epoch = 0

    # ------------------------------------------------------------ writes, which forget

    async def apply_release(self, spec: releases.ReleaseSpec) -> contracts.ApplyOutcome:
        outcome = await self._ledger.apply_release(spec)
        if outcome.release is not outcome.previous:  # not a no-op (which writes nothing)
            self.releases_changed()
        return outcome

    async def delete_release(self, release: str) -> releases.Release | None:
        previous = await self._ledger.delete_release(release)
        if previous is not None:
            self.releases_changed()
        return previous

    def releases_changed(self) -> None:
        """A release changed (here, or on another replica): forget cached answers."""
        self._readable.clear()
        self._live.clear()
        self._epoch += 1

    # ------------------------------------------------------------ reads

    async def get_release(self, release: str) -> releases.Release | None:
        return await self._ledger.get_release(release)

    async def list_releases(self) -> list[releases.Release]:
        return await self._ledger.list_releases()

    async def access(self, device: devices.Device, release: str) -> serving.Access:
        """Whether this device may read `release` (manifest, blobs), and the release as it may read it."""
        if not releases.RELEASE_RE.match(release):  # no such release can exist; keep garbage off the database
            return serving.UNKNOWN
        now = self._monotonic()
        live = self._live.get(release)
        if live is None or now - live[0] >= READABLE_CACHE_S:
            epoch = self._epoch
            rel = await self._ledger.get_release(release)
            if rel is None:
                return serving.UNKNOWN
            if epoch == self._epoch:  # no change was announced while this read ran
                self._live[release] = (now, rel)
        else:
            rel = live[1]
        if serving.decided_by_release(rel):
            return serving.access_by_release(rel, device.facts)
        key = (device.device_id, release)
        hit = self._readable.get(key)
        if hit is not None and now - hit[0] < READABLE_CACHE_S and hit[1] == device.facts:
            return serving.Access(verdict=serving.Verdict.READABLE, release=hit[2])
        epoch = self._epoch
        views = await self._ledger.release_views(device.device_id, release=release)
        decided = serving.access(views[0] if views else None, device.facts)
        if decided.release is not None and epoch == self._epoch:
            if len(self._readable) >= READABLE_CACHE_SIZE:
                self._readable.clear()
            self._readable[key] = (now, device.facts, decided.release)
        return decided

    async def release_for_device(self, device: devices.Device, release: str) -> releases.Release:
        """The release this device may read; NotFound / PermissionDenied otherwise."""
        decided = await self.access(device, release)
        if decided.release is None:
            if decided.verdict is serving.Verdict.UNKNOWN:
                raise errors.NotFound(f"release {release!r} does not exist")
            raise errors.PermissionDenied(f"release {release!r} does not target device {device.device_id}")
        return decided.release
