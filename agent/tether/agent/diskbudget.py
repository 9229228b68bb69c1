"""Disk-budget planning: what to free, in which order, so a new version fits. Pure: no I/O.

The bundle store (`tether.agent.bundles`) measures itself into a
`StoreSnapshot`; `plan_room` decides from that snapshot alone what a pull of a
new version still needs and, when it does not fit the budget, what to remove
first, so the eviction order is tested as data without files.

What counts: `blobs/` (verified and partial) and `installs/`, by apparent file
size, each file once however many hard links it has (an install's files are
links to its blobs, so a version costs its blobs plus its manifest copy). The
order it frees space in: unreferenced blobs, partials and leftovers; installed
versions that are neither running nor a rollback target; rollback targets,
oldest first. The running version of every release is never removed. If the
version still does not fit, nothing is removed and `DiskBudgetExceeded` says
why.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from tether.agent.sizes import format_size
from tether.common import errors, manifest


@dataclasses.dataclass(frozen=True)
class InstallSize:
    """One installed version: the blobs it references and the bytes of its own files (manifest, copies)."""

    digests: frozenset[str]
    own_bytes: int = 0
    mtime: float = 0.0


@dataclasses.dataclass(frozen=True)
class StoreSnapshot:
    """The store's contents and sizes; pure data, so the budget maths is testable without files."""

    blobs: Mapping[str, int]  # digest -> bytes of a verified blob
    partials: Mapping[str, int]  # digest -> bytes of an interrupted download
    installs: Mapping[tuple[str, int], InstallSize]
    current: Mapping[str, int]  # release -> running version
    leftovers: int = 0  # staging and half-removed directories

    @property
    def total(self) -> int:
        return (
            sum(self.blobs.values())
            + sum(self.partials.values())
            + sum(i.own_bytes for i in self.installs.values())
            + self.leftovers
        )

    def rollback_target(self, release: str) -> int | None:
        """The version kept for a rollback of `release`: the newest one older than the running one."""
        cur = self.current.get(release)
        if cur is None:
            return None
        return max((v for r, v in self.installs if r == release and v < cur), default=None)

    def version_bytes(self, key: tuple[str, int]) -> int:
        """Bytes of one installed version: its blobs (shared ones too) and its own files."""
        inst = self.installs[key]
        return sum(self.blobs.get(d, 0) for d in inst.digests) + inst.own_bytes

    def to_json(self, budget: int | None = None) -> dict[str, Any]:
        """What `tether agent disk --json` prints and the agent logs."""
        return {
            "budget": budget,
            "used": self.total,
            "blobs": sum(self.blobs.values()),
            "partial": sum(self.partials.values()),
            "installs": sum(i.own_bytes for i in self.installs.values()) + self.leftovers,
            "versions": [
                {
                    "release": r,
                    "version": v,
                    "role": "running"
                    if self.current.get(r) == v
                    else "rollback"
                    if self.rollback_target(r) == v
                    else "old",
                    "bytes": self.version_bytes((r, v)),
                }
                for r, v in sorted(self.installs)
            ],
        }

    def describe(self, budget: int | None = None) -> str:
        """One line: `12.3 MiB of 1 GiB (1%): blobs 12.2 MiB, partial downloads 0 B, ...`."""
        used = self.total
        of = "" if budget is None else f" of {format_size(budget)} ({100 * used / budget:.0f}%)"
        doc = self.to_json(budget)
        return (
            f"{format_size(used)}{of}: blobs {format_size(doc['blobs'])}, partial downloads "
            f"{format_size(doc['partial'])}, install files {format_size(doc['installs'])}; "
            f"{len(self.installs)} installed versions of {len({r for r, _ in self.installs})} releases"
        )


@dataclasses.dataclass(frozen=True)
class RoomPlan:
    """How a version fits the budget: what to free first, or why it cannot fit."""

    fits: bool
    need: int  # bytes the version still needs (missing blobs less their partial bytes, plus its install files)
    used: int  # bytes in the store now
    reserved: int  # bytes other downloads in progress still need
    after: int  # bytes in the store once the plan ran (before the pull)
    budget: int | None
    gc: bool = False  # drop unreferenced blobs, stray partials and leftovers
    evict: tuple[tuple[str, int], ...] = ()  # installed versions to remove, in this order
    message: str = ""  # why it does not fit


class DiskBudgetExceeded(errors.TooLarge):
    """A version does not fit the agent's disk budget even after freeing all it may free."""

    def __init__(self, message: str, *, plan: RoomPlan, manifest: manifest.Manifest | None = None) -> None:
        super().__init__(message)
        self.plan = plan
        self.manifest = manifest  # the version refused, so a retry can plan again without fetching it


def _still_needed(sizes: Mapping[str, int], snap: StoreSnapshot, *, skip: Collection[str] = ()) -> int:
    """Declared bytes not on disk yet: blobs not in the cache, less what their partials hold."""
    total = 0
    for digest, size in sizes.items():
        if digest in snap.blobs or digest in skip:
            continue
        partial = snap.partials.get(digest, 0)
        total += size - partial if partial <= size else size  # a partial longer than the blob starts over
    return total


def plan_room(
    snap: StoreSnapshot,
    *,
    release: str,
    version: int,
    sizes: Mapping[str, int],
    overhead: int = 0,
    keep: Collection[str] = (),
    reserved: Mapping[str, int] | None = None,
    budget: int | None,
) -> RoomPlan:
    """Plan room for `release` v`version` whose blobs are `sizes` (digest -> declared bytes). No I/O.

    Fits when used + reserved + need <= budget. Otherwise frees, in order, until it fits:
    1. blobs no install references, partials and leftovers of nothing wanted, partials longer
       than their blob (`gc`);
    2. installed versions that are neither running nor a rollback target (for `release`: those
       its install would prune anyway), oldest first;
    3. rollback targets (for `release`: the one its install would keep), oldest first.
    The running version of each release is never removed. Blobs of `sizes`, `keep` and
    `reserved` stay. When even all that is not enough, nothing is removed (`fits` False).
    """
    reserved = dict(reserved or {})
    need = _still_needed(sizes, snap) + (overhead if sizes else 0)
    pending = _still_needed(reserved, snap, skip=sizes)
    used = snap.total
    if need == 0 or budget is None or used + pending + need <= budget:
        return RoomPlan(fits=True, need=need, used=used, reserved=pending, after=used, budget=budget)

    wanted = set(sizes) | set(keep) | set(reserved)
    # Partials worth keeping: wanted, and not longer than the blob (such a one restarts from 0 anyway).
    resumable = {d for d in snap.partials if d in wanted and not snap.partials[d] > sizes.get(d, snap.partials[d])}
    installs = dict(snap.installs)

    def size_now() -> int:
        refs = wanted.union(*(i.digests for i in installs.values()))
        return (
            sum(n for d, n in snap.blobs.items() if d in refs)
            + sum(n for d, n in snap.partials.items() if d in resumable)
            + sum(i.own_bytes for i in installs.values())
        )

    def ordered(keys: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return sorted(keys, key=lambda k: (snap.installs[k].mtime, k))

    older = [v for r, v in snap.installs if r == release and v < version]
    kept_after = max(older, default=None)  # what the install of `version` keeps for rollback
    stale: list[tuple[str, int]] = []
    rollback: list[tuple[str, int]] = []
    for key in snap.installs:
        r, v = key
        if snap.current.get(r) == v:
            continue  # running: never removed here
        is_rollback = (v == kept_after) if r == release else (v == snap.rollback_target(r))
        (rollback if is_rollback else stale).append(key)

    evict: list[tuple[str, int]] = []
    after = size_now()
    candidates: list[tuple[str, int] | None] = [None, *ordered(stale), *ordered(rollback)]
    for candidate in candidates:
        if candidate is not None:
            removed = installs.pop(candidate)
            if size_now() == after:  # frees nothing (its blobs are shared with what stays): keep it
                installs[candidate] = removed
                continue
            evict.append(candidate)
            after = size_now()
        if after + pending + need <= budget:
            return RoomPlan(
                fits=True,
                need=need,
                used=used,
                reserved=pending,
                after=after,
                budget=budget,
                gc=True,
                evict=tuple(evict),
            )
    message = f"disk budget {format_size(budget)} exceeded: {release} v{version} needs {format_size(need)} more"
    if need > budget:
        message += ", more than the whole budget"
    else:
        running = ", ".join(f"{r} v{v}" for r, v in sorted(installs)) or "none"
        message += f", {format_size(after)} in use (running versions: {running}"
        own = sum(min(snap.partials.get(d, 0), n) for d, n in sizes.items() if d not in snap.blobs)
        if own:
            message += f"; {format_size(own)} already downloaded for it"
        message += ")"
        if pending:
            message += f" and {format_size(pending)} reserved for other downloads in progress"
    message += "; raise --disk-budget or remove releases from this device"
    return RoomPlan(fits=False, need=need, used=used, reserved=pending, after=after, budget=budget, message=message)
