"""Putting a version on the device and taking it off: disk budget, pull, backend selection, atomic install, GC.

An install fetches the verified manifest (`tether.agent.pull`), makes room
for it within the disk budget (freeing space as `tether.agent.diskbudget`
plans, or refusing the version before anything is downloaded), pulls the
blobs the device lacks, chooses a backend for each model (a model that runs
nowhere refuses the version), and installs it atomically into the bundle
store, keeping the previous version for rollback. Then unreferenced blobs
are collected.

Several releases install at once: the store changes under one lock, blobs an
install under way needs are kept by garbage collection, and the bytes such
installs still have to download count against the budget, so concurrent
pulls cannot add up past it. A version refused for the budget is remembered
(`blocked`) and tried again when space may have been freed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tether.agent import backends, bundles, convergence, diskbudget, failures, pull, reporting, sizes, statefile
from tether.common import errors, manifest, tracing
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

S = pb.DeliveryState


@dataclasses.dataclass(frozen=True, kw_only=True)
class BudgetRefusal:
    """A version refused for the disk budget, and when the store was last measured for it."""

    version: int
    digest: str
    bundle: manifest.Manifest | None  # its manifest, so a retry plans again without fetching it
    refusal: diskbudget.DiskBudgetExceeded
    gcs: int  # Installer.gcs when measured
    checked_at: float  # monotonic


class Installer:
    """Installs and uninstalls versions in one device's bundle store."""

    def __init__(
        self,
        *,
        store: bundles.BundleStore,
        ledger: statefile.Ledger,
        puller: pull.Puller,
        reporter: reporting.Reporter,
        selector: backends.Selector | None,
        disk_budget: int | None,
        trusted_keys: Mapping[str, bytes] | None,
        device_backends: Callable[[], Sequence[str] | None],
        work_dir: pathlib.Path,
        desired: Mapping[str, pb.DesiredTask],
        kick: Callable[[str], None],
        installed_hook: Callable[[], None],
    ) -> None:
        self.store = store
        self.disk_budget = disk_budget  # bytes; None: unlimited
        self.blocked: dict[str, BudgetRefusal] = {}  # release -> its version refused for the disk budget
        # release -> its version whose install failed for good on this device (in memory: a restart tries again)
        self.failed: dict[str, convergence.Failed] = {}
        self.gcs = 0  # garbage collections so far: the store changes only through installs and uninstalls
        self._ledger = ledger
        self._puller = puller
        self._reporter = reporter
        self._selector = selector
        self._trusted_keys = trusted_keys
        self._device_backends = device_backends
        self._work_dir = work_dir
        self._desired = desired
        self._kick = kick
        self._installed_hook = installed_hook  # backend choices may have changed
        self._inflight: dict[str, set[str]] = {}  # release -> digests of an install in progress
        self._reserved: dict[str, dict[str, int]] = {}  # release -> digest -> declared size, of a pull under way
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------ install
    async def install(self, task: pb.DesiredTask) -> None:
        bundle = self.kept(task)
        progress = None
        if bundle is not None:
            self._puller.notified.manifest(task.manifest_digest)  # a Notify's manifest is used once either way
        else:
            progress = self._reporter.downloading(task)
            try:
                bundle = await self._puller.manifest(
                    task, trusted_keys=self._trusted_keys, backends=self._device_backends()
                )
            except BaseException:
                await progress.settle()
                raise
        self._inflight[task.release] = set(bundle.blob_digests())
        try:
            await self._make_room(task, bundle)  # the disk budget: free space, or refuse before any download
            with tracing.span("pull", release=task.release, version=task.version):
                await self._puller.pull_missing(task.release, self.store.missing_blobs(bundle))
            note = await self._select_backends(bundle)  # a model that runs nowhere refuses the version here
            async with self._lock:
                try:
                    await asyncio.to_thread(self.store.install, task.release, task.version, bundle)
                except errors.DigestMismatch as e:
                    raise errors.VerificationFailed(str(e)) from None
                state = self._ledger.state
                state.installed[task.release] = statefile.InstalledTask(
                    release=task.release,
                    version=task.version,
                    manifest_digest=task.manifest_digest,
                    trigger_json=task.trigger_json,
                    resources_json=task.resources_json,
                )
                state.refused.pop(task.release, None)
                await self._ledger.save()
        finally:
            self._inflight.pop(task.release, None)
            if progress is not None:
                await progress.settle()
        log.info("installed %s v%d (%s)", task.release, task.version, task.manifest_digest[:19])
        await self._reporter.status(task, S.DELIVERY_STATE_INSTALLED, note)
        self._installed_hook()
        try:  # the version is live: a collection that fails is tried again with the next change
            await self.gc()
        except OSError as e:
            log.warning("garbage collection after installing %s v%d: %s", task.release, task.version, e)

    async def give_up(self, task: pb.DesiredTask, verdict: failures.Verdict) -> None:
        """Report a permanent failure of this version once; the planner then idles the release on it.

        REFUSED is kept in `state.json` (the version is unusable: not tried again after a restart
        either); FAILED only in memory (the device's trouble: a restart tries again).
        """
        release = task.release
        if verdict.outcome is failures.Outcome.REFUSED:
            log.error("refused %s v%d: %s", release, task.version, verdict.reason)
            self._ledger.state.refused[release] = {
                "version": task.version,
                "digest": task.manifest_digest,
                "reason": verdict.reason,
            }
            await self._ledger.save()
            await self._reporter.status(task, S.DELIVERY_STATE_REFUSED, verdict.reason)
        else:
            log.error("%s v%d failed for good on this device: %s", release, task.version, verdict.reason)
            self.failed[release] = convergence.Failed(
                version=task.version, manifest_digest=task.manifest_digest, verdict=verdict
            )
            await self._reporter.status(task, S.DELIVERY_STATE_FAILED, verdict.reason)

    def kept(self, task: pb.DesiredTask) -> manifest.Manifest | None:
        """The manifest of a kept install of exactly this version (a rollback switches back without downloading).

        It was verified (digest, signature) when first installed; its digest must still be the announced one.
        """
        if task.version not in self.store.versions(task.release):
            return None
        try:
            kept = self.store.installed_manifest(task.release, task.version)
        except (OSError, errors.TetherError):
            return None
        return kept if kept.digest == task.manifest_digest else None

    async def _select_backends(self, bundle: manifest.Manifest) -> str:
        """Choose how each model runs here (cached per model and device), before the version goes live.

        A model no candidate can load or run raises ModelUnusable (a
        VerificationFailed: the version is refused with the engines' errors and
        nothing is installed). Selection that cannot finish (its process crashed
        or overran) is not the bundle's fault: the models then run as declared.
        Returns what the INSTALLED report should say: a converted model the device's
        cross-check refused (`backends.cross_check`), else "".
        """
        if self._selector is None or not bundle.engines:
            return ""
        specs = backends.specs_for(bundle, path_of=lambda f: self.store.blob_path(f.sha256))
        try:
            chosen = await self._selector.select(specs, work_dir=self._work_dir)
        except backends.ModelUnusable:
            raise
        except errors.TetherError as e:
            log.warning("backend selection for %s did not finish (%s); running models as declared", bundle.name, e)
            return ""
        notes = []
        for name, sel in sorted(chosen.items()):
            log.info("%s: %s runs on %s (%.3f ms)", bundle.name, name, sel.chosen.key, sel.latency_ms)
            refused = next((p.reason for p in sel.pruned if p.reason.startswith(backends.DISAGREES)), None)
            if refused is not None:
                notes.append(f"{name}: MNN not selected, {refused}; runs on {sel.chosen.key}")
        return "; ".join(notes)[:1000]

    # ------------------------------------------------------------ disk budget
    async def _make_room(self, task: pb.DesiredTask, bundle: manifest.Manifest) -> None:
        """Fit the pull of `bundle` in the disk budget (freeing space), or raise DiskBudgetExceeded.

        Downloads under way for other releases keep their blobs and partials and count with the
        bytes they still need (their declared sizes), so concurrent pulls cannot add up past the budget.
        """
        if self.disk_budget is None:
            return
        async with self._lock:
            room = await asyncio.to_thread(
                self.store.make_room, task.release, task.version, bundle, **self._budget_args(task.release)
            )
            self._reserved[task.release] = {f.sha256: f.size for f in bundle.files}
        if room.gc:
            log.info(
                "disk budget %s: freed %s for %s v%d (%s)",
                sizes.format_size(self.disk_budget),
                sizes.format_size(room.used - room.after),
                task.release,
                task.version,
                ", ".join(f"removed {r} v{v}" for r, v in room.evict) or "unreferenced blobs only",
            )

    def _budget_args(self, release: str) -> dict[str, Any]:
        """The budget, and what installs of other releases under way keep and still need (under the store lock)."""
        for r in [r for r in self._reserved if r not in self._inflight or r == release]:
            del self._reserved[r]  # finished (or this release's previous attempt)
        return {
            "budget": self.disk_budget,
            "keep": set().union(*(d for r, d in self._inflight.items() if r != release)),
            "reserved": {d: n for sizes in self._reserved.values() for d, n in sizes.items()},
        }

    def blocked_view(self, task: pb.DesiredTask) -> convergence.Blocked | None:
        """What `convergence.plan` needs to know of a version refused for the budget."""
        blocked = self.blocked.get(task.release)
        if self.disk_budget is None or blocked is None:
            return None
        return convergence.Blocked(
            version=blocked.version,
            manifest_digest=blocked.digest,
            measurable=blocked.bundle is not None,
            store_changed=blocked.gcs != self.gcs,
            checked_at=blocked.checked_at,
        )

    async def recheck_budget(self, task: pb.DesiredTask) -> None:
        """Measure the store again for a version refused for the budget: DiskBudgetExceeded while it does not fit.

        Nothing is fetched or reported (an install reports DOWNLOADING, which would hide the refusal).
        """
        blocked = self.blocked[task.release]
        assert blocked.bundle is not None
        async with self._lock:
            room = await asyncio.to_thread(
                self.store.plan_room, task.release, task.version, blocked.bundle, **self._budget_args(task.release)
            )
        if not room.fits:
            raise diskbudget.DiskBudgetExceeded(room.message, plan=room, manifest=blocked.bundle)

    def block(self, task: pb.DesiredTask, refusal: diskbudget.DiskBudgetExceeded) -> bool:
        """Remember a version refused for the budget (measured now); True when it was not refused so before."""
        before = self.blocked.get(task.release)
        self.blocked[task.release] = BudgetRefusal(
            version=task.version,
            digest=task.manifest_digest,
            bundle=refusal.manifest,
            refusal=refusal,
            gcs=self.gcs,
            checked_at=time.monotonic(),
        )
        return before is None or (before.version, before.digest) != (task.version, task.manifest_digest)

    # ------------------------------------------------------------ removal
    async def gc(self) -> None:
        keep = set().union(*self._inflight.values()) if self._inflight else set()
        async with self._lock:
            removed = await asyncio.to_thread(self.store.gc, keep=keep)
        self.gcs += 1
        if removed:
            log.debug("gc removed %d blobs", len(removed))
        if log.isEnabledFor(logging.DEBUG):
            usage = await asyncio.to_thread(self.store.snapshot)
            log.debug("bundle store: %s", usage.describe(self.disk_budget))
        for release in list(self.blocked):  # space may have been freed: try those versions again
            if release in self._desired:
                self._kick(release)
            else:
                del self.blocked[release]

    async def uninstall(self, release: str) -> statefile.InstalledTask | None:
        """Remove every version of `release`; its unfinished runs fail. Returns what was installed."""
        state = self._ledger.state
        installed = state.installed.get(release)
        async with self._lock:
            await asyncio.to_thread(self.store.uninstall, release)
            state.installed.pop(release, None)
            state.refused.pop(release, None)
            for key in state.abandon_runs(release):
                self.store.result_path(key).unlink(missing_ok=True)
            await self._ledger.save()
        return installed
