"""Fan-out: what connected devices hear when something changes, here or on another replica.

One place for every push a change causes, whichever path announced it
(AdminService on this replica, `replicas.ReleaseListener` for the others):

- a release changed: Notify / Revoke to the connected devices concerned
  (`hub.Hub.release_changed`, a pure decision per device), small manifests
  inlined in the Notify, and the devices told recorded as notified;
- a device was revoked: its cached authentication dropped, its stream ended
  with UNAUTHENTICATED, as every later call of it is;
- a device's credential or facts changed: the cached entry dropped, the
  stream's facts refreshed;
- revocations may have gone unheard (the LISTEN connection was down): start
  over from the registry.

`ManifestCache` keeps parsed manifests by digest (content-addressed, hence
immutable: caching is always correct) for GetManifest and for the Notify.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Collection

import grpc

from tether.common import errors, manifest
from tether.controller import blobstores, device_auth, hub, instruments, releases, rollouts
from tether.controller.storage import contracts
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

# A signed manifest up to this size rides in the Notify itself (`Notify.manifest`): one call less per device.
MAX_INLINE_MANIFEST_BYTES = 8 * 1024
# The longest URL-encoded device id (tether.common.auth.DEVICE_ID_RE: 128 characters, ':' encodes to 3).
_LONGEST_DEVICE_ID = "x" + ":" * 127


class ManifestCache:
    """Parsed manifests by digest. Content-addressed, hence immutable: caching is always correct."""

    def __init__(
        self, *, bundles: contracts.BundleCatalog, blob_store: blobstores.BlobBackend, size: int = 256
    ) -> None:
        self._bundles = bundles
        self._blobs = blob_store
        self._size = size
        self._items: collections.OrderedDict[str, tuple[contracts.StoredManifest, manifest.Manifest]] = (
            collections.OrderedDict()
        )

    async def get(self, digest: str) -> tuple[contracts.StoredManifest, manifest.Manifest]:
        hit = self._items.get(digest)
        if hit is not None:
            self._items.move_to_end(digest)
            return hit
        stored = await self._bundles.get_manifest(digest)
        if stored is None:
            raise errors.NotFound(f"manifest {digest} is not stored")
        item = (stored, manifest.Manifest.from_bytes(stored.body))
        self._items[digest] = item
        while len(self._items) > self._size:
            self._items.popitem(last=False)
        return item

    async def response(self, digest: str, *, device_id: str) -> pb.GetManifestResponse:
        """GetManifest's answer for a stored manifest: body, signature, and this device's blob URLs.

        A blob store that can serve blobs itself (object store, CDN origin) hands out short-lived
        URLs for this device; the agent verifies each blob's digest either way and falls back to
        PullBlobs (docs/internals.md). Callers have decided the device may read this manifest.
        """
        stored, parsed = await self.get(digest)
        response = pb.GetManifestResponse(manifest=stored.body, signature=stored.signature, key_id=stored.key_id)
        response.blob_urls.update(await self.blob_urls(parsed, device_id=device_id))
        return response

    async def blob_urls(self, parsed: manifest.Manifest, *, device_id: str) -> dict[str, str]:
        """The URLs of a manifest's blobs for one device (none from a store that serves no URLs)."""
        digests = parsed.blob_digests()
        await self._blobs.prepare_urls(digests)
        now = time.time()
        return {d: url for d in digests if (url := self._blobs.url_for(d, device_id=device_id, now=now)) is not None}

    async def inline(self, release: releases.Release | None) -> hub.InlineManifest | None:
        """The manifest answer to carry in this release's Notify, when it is small enough (`Notify.manifest`).

        Best effort: the push must go out whatever happens here (the devices then call GetManifest).
        Staged and paused releases never use it (per-cohort events; nothing pushed). The blob URLs
        are each device's own: the hub adds them per device (`InlineManifest.urls_for`).
        """
        if release is None or release.deleted or release.paused or rollouts.staged(release):
            return None
        try:
            stored, parsed = await self.get(release.manifest_digest)
            response = pb.GetManifestResponse(manifest=stored.body, signature=stored.signature, key_id=stored.key_id)
            digests = parsed.blob_digests()
            await self._blobs.prepare_urls(digests)
        except errors.NotFound:
            return None  # the devices will ask GetManifest, which says so
        except Exception:
            log.warning("manifest of %s not inlined in its Notify", release.name, exc_info=True)
            return None
        now = time.time()

        def urls_for(device_id: str) -> dict[str, str]:
            return {d: u for d in digests if (u := self._blobs.url_for(d, device_id=device_id, now=now)) is not None}

        # Sized with the URLs of a device id as long as any (ids are bounded): every device's Notify fits.
        sample = pb.GetManifestResponse()
        sample.CopyFrom(response)
        sample.blob_urls.update(urls_for(_LONGEST_DEVICE_ID))
        if sample.ByteSize() > MAX_INLINE_MANIFEST_BYTES:
            return None
        return hub.InlineManifest(response=response, urls_for=urls_for if sample.blob_urls else None)


class FanOut:
    """The pushes of this replica's connected devices (`hub`), for changes made anywhere."""

    def __init__(
        self,
        *,
        hub_: hub.Hub,
        storage: contracts.Storage,
        manifests: ManifestCache,
        authenticator: device_auth.DeviceAuthenticator | None = None,
        metrics: instruments.ControllerMetrics | None = None,
    ) -> None:
        self._metrics = metrics if metrics is not None else instruments.ControllerMetrics()
        self._hub = hub_
        self._storage = storage
        self.manifests = manifests
        self._auth = authenticator

    async def release_changed(
        self, before: releases.Release | None, after: releases.Release | None, *, only: Collection[str] | None = None
    ) -> None:
        """Push a release change to connected devices (`only` these, when given) and record who was notified."""
        ledger = self._storage.releases
        fan = self._hub.release_changed(
            before=before, after=after, manifest=await self.manifests.inline(after), only=only
        )
        self._metrics.notified.inc(len(fan.notified) + sum(len(ids) for ids in fan.downgraded.values()))
        self._metrics.revoked.inc(len(fan.revoked))
        self._metrics.dropped.inc(len(fan.dropped))
        if after is not None and fan.notified:
            await ledger.mark_notified(release=after.name, version=after.version, device_ids=fan.notified)
        if after is not None:
            for version, device_ids in fan.downgraded.items():  # a staged rollout sent them back to its stable one
                await ledger.mark_notified(release=after.name, version=version, device_ids=device_ids, downgrade=True)
        subject = after if after is not None else before
        if subject is not None and (fan.notified or fan.revoked or fan.dropped):
            log.info(
                "release %s: notified %d, revoked %d, dropped %d slow device(s)",
                subject.name,
                len(fan.notified),
                len(fan.revoked),
                len(fan.dropped),
            )

    def device_revoked(self, device_id: str, *, reason: str = "") -> bool:
        """A device was revoked (here, or on another replica): drop its cached authentication, end its stream.

        True when this process held a stream of the device. The stream ends with UNAUTHENTICATED.
        """
        if self._auth is not None:
            self._auth.forget(device_id)
        return self._hub.close_device(
            device_id, code=grpc.StatusCode.UNAUTHENTICATED, reason=reason or f"device {device_id} is revoked"
        )

    async def device_changed(self, device_id: str, *, here: bool) -> None:
        """A device's credential or facts changed, anywhere: forget its cached entry, refresh its stream's facts."""
        if self._auth is not None:
            self._auth.forget(device_id)  # its cached entry holds the old facts (and secret)
        if not here and self._hub.is_connected(device_id):  # this replica changed its own stream's facts already
            device = await self._storage.devices.device(device_id)
            if device is not None:
                self._hub.update_facts(device_id=device_id, facts=device.facts)

    async def end_revoked_streams(self) -> tuple[str, ...]:
        """Revocations may have been missed (the LISTEN connection was down): start over from the registry.

        Every cached authentication is dropped, and the streams of connected devices that are now revoked (or
        gone) end: one query for all of them. Returns those device ids.
        """
        if self._auth is not None:
            self._auth.clear()
        gone = sorted(await self._storage.devices.not_live(self._hub.device_ids()))
        for device_id in gone:
            self.device_revoked(device_id, reason=f"device {device_id} is revoked or no longer enrolled")
        if gone:
            log.warning("ended the streams of %d device(s) revoked while revocations went unheard", len(gone))
        return tuple(gone)
