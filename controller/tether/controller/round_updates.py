"""Taking a device's model update into a federated round: the I/O around `fl.intake`'s decisions.

`UpdateIntake.push` is what `DeviceService.PushUpdate` calls. The order keeps
two promises:

- nothing is read from a device the round will not take: the round's rules
  judge the device on the stored round first (a refusal is recorded through
  `RoundBook.admit_update`, which counts it);
- an accepted update is never lost: its bytes are written to the blob store
  (content-addressed, fsynced) *before* `admit_update` records it in the
  round's transaction, and the device hears "accepted" only after that
  commit. A controller killed in between leaves an orphan blob, no record:
  the device was not told, and sends again.

When the accepting update completes the round (`Aggregating`), `on_ready`
is called (the controller sends `tether.fl.aggregate_round`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from tether.common import errors, tensorfiles
from tether.controller import blobstores, devices
from tether.controller.fl import intake, rounds, updates
from tether.controller.storage import contracts

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024


async def read_blob(store: blobstores.BlobBackend, digest: str) -> bytes:
    """A whole blob (a model or an update: bounded by the update limit / the bundle's own size)."""
    size = await store.size(digest)
    if size is None:
        raise errors.NotFound(f"blob {digest} is not in the blob store")
    parts: list[bytes] = []
    at = 0
    while at < size:
        chunk = await store.read(digest, offset=at, length=min(READ_CHUNK, size - at))
        if not chunk:
            raise errors.NotFound(f"blob {digest} ended at {at} of {size} bytes")
        parts.append(chunk)
        at += len(chunk)
    return b"".join(parts)


class ModelCache:
    """The few global models updates are checked against, by blob digest (a round's model is read once)."""

    def __init__(self, store: blobstores.BlobBackend, *, keep: int = 2) -> None:
        self._store = store
        self._keep = keep
        self._models: collections.OrderedDict[str, updates.Model] = collections.OrderedDict()
        self._lock = asyncio.Lock()

    async def get(self, digest: str) -> updates.Model:
        async with self._lock:
            if digest in self._models:
                self._models.move_to_end(digest)
                return self._models[digest]
            data = await read_blob(self._store, digest)
            model = await asyncio.to_thread(tensorfiles.load, data)
            self._models[digest] = model
            while len(self._models) > self._keep:
                self._models.popitem(last=False)
            return model


class UpdateIntake:
    def __init__(
        self,
        *,
        storage: contracts.Storage,
        blob_store: blobstores.BlobBackend,
        max_update_bytes: int = intake.DEFAULT_MAX_UPDATE_BYTES,
        clock: Callable[[], float] = time.time,
        on_ready: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._storage = storage
        self._blobs = blob_store
        self.max_update_bytes = max_update_bytes
        self._clock = clock
        self._on_ready = on_ready
        self.models = ModelCache(blob_store)

    async def push(
        self, *, device: devices.Device, header: intake.Header, chunks: AsyncIterator[bytes]
    ) -> tuple[rounds.Verdict, str]:
        """Judge, store and admit one update; the verdict (accepted or LateKept) and its blob, or a refusal."""
        release = await self._storage.releases.get_release(header.release)
        rules = None if release is None else release.spec.rules()
        if release is None or rules is None:
            raise errors.NotFound(f"release {header.release} does not exist or is not federated")
        task, number, who = header.release, header.round, device.device_id
        r = await self._storage.rounds.round(task=task, number=number)
        if r is None:
            raise errors.NotFound(f"round {number} of {task} does not exist")
        peek = rounds.admit(r, device=who, rules=rules, now=self._clock())
        if not peek.accepted and peek.refusal is not rounds.Refusal.LATE_KEPT:
            verdict = await self._storage.rounds.admit_update(
                task=task, number=number, device=who, rules=rules, now=self._clock()
            )
            raise _not_admitted(verdict)
        try:
            intake.check_version(header, round_version=r.version)
            data = await _collect(chunks, limit=header.size)
            intake.check_bytes(header, data)
            like = await self.models.get(r.model)
            await asyncio.to_thread(intake.decode, header, data, device=who, like=like)
        except intake.Refused as e:
            await self._storage.rounds.count_refusal(task=task, number=number, reason=e.reason)
            log.info("update from %s for round %d of %s refused: %s", who, number, task, e)
            raise

        async def one() -> AsyncIterator[bytes]:
            yield data

        await self._blobs.put_stream(header.digest, one())
        record = rounds.UpdateRecord(
            device=who, digest=header.digest, samples=header.samples, encoding=header.encoding, metrics=header.metrics
        )
        verdict = await self._storage.rounds.admit_update(
            task=task, number=number, device=who, rules=rules, now=self._clock(), update=record
        )
        if not verdict.accepted and verdict.refusal is not rounds.Refusal.LATE_KEPT:
            raise _not_admitted(verdict)
        if verdict.accepted and verdict.round.phase is rounds.Phase.AGGREGATING and self._on_ready is not None:
            await self._on_ready(task, number)
        return verdict, header.digest


def _not_admitted(verdict: rounds.Verdict) -> intake.NotAdmitted:
    reason = verdict.refusal.value if verdict.refusal is not None else "Refused"
    return intake.NotAdmitted(reason, verdict.message)


async def _collect(chunks: AsyncIterator[bytes], *, limit: int) -> bytes:
    parts: list[bytes] = []
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise intake.TooLarge(f"more bytes than the header's size {limit}")
        parts.append(chunk)
    return b"".join(parts)
