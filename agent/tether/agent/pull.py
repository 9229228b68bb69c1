"""Getting a version's content: its manifest (verified) and the blobs the device lacks (resumable).

- Manifest: the one a Notify carried (`NotifyExtras`), else `GetManifest`; its
  sha256 must equal the announced digest, its Ed25519 signature must verify
  when trusted keys are configured, and the engines it needs must be ones
  this device has. Anything else is `VerificationFailed`: the version is
  refused, never run.
- Blobs: one `PullBlobs` stream for up to `MAX_BLOBS_PER_PULL` of them, each
  from the offset its partial reached; a stream that breaks after making
  progress is asked again at once for the rest; a controller without
  PullBlobs (UNIMPLEMENTED) is served blob by blob with `PullBlob`. A blob
  larger than its manifest says, or hashing to something else, is refused
  and its partial dropped.
- Pull spread: a Notify may ask the device to start its pull at a random
  moment within a window (`Notify.pull_spread_ms`), so a fleet does not pull
  all at once.

Where the bytes go is a `BlobSink`: the agent's writes into its bundle store
(`FileSink`); the fleet simulator's only hashes and counts them. So the
simulator runs this very code, and the benchmark measures the agent's protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import grpc

from tether.agent import bundles, client, httpfetch
from tether.common import errors, manifest
from tether.common.manifest import FileEntry
from tether.proto.v1 import tether_pb2 as pb

log = logging.getLogger(__name__)

MAX_KEPT_URLS = 4096  # blob URLs remembered from manifest answers (each expires within minutes anyway)


# ---------------------------------------------------------------- where blobs go


class BlobWrite(Protocol):
    """One blob being received: appended in order, then committed (verified) or kept for a resume."""

    @property
    def digest(self) -> str: ...

    @property
    def size(self) -> int:
        """The size the manifest declares: nothing past it is accepted."""

    @property
    def offset(self) -> int:
        """Bytes held so far (where the next chunk must start)."""

    def append(self, data: bytes, *, offset: int) -> None:
        """Raises InvalidArgument for a chunk at another offset, DigestMismatch past the declared size."""

    async def commit(self) -> None:
        """The blob is complete: verify it and hold it (DigestMismatch, and nothing held, when it is not it)."""

    def close(self) -> None:
        """Stop for now, keeping what was received for a later resume."""

    def discard(self) -> None:
        """Drop what was received: it cannot be the blob the manifest names."""


class BlobSink(Protocol):
    """Where pulled blobs go."""

    def has(self, digest: str) -> bool: ...

    def partial_size(self, digest: str) -> int:
        """Bytes of an interrupted download of this blob held (0: none)."""

    def open(self, digest: str, *, size: int) -> BlobWrite:
        """Receive this blob, resuming what is held (a partial longer than `size` starts over)."""


class FileSink:
    """The agent's sink: blobs into its bundle store, partials on disk, verified on commit."""

    def __init__(self, store: bundles.BundleStore) -> None:
        self.store = store

    def has(self, digest: str) -> bool:
        return self.store.has_blob(digest)

    def partial_size(self, digest: str) -> int:
        return self.store.partial_size(digest)

    def open(self, digest: str, *, size: int) -> _FileWrite:
        return _FileWrite(self.store, self.store.open_blob(digest, expected_size=size), size)


class _FileWrite:
    def __init__(self, store: bundles.BundleStore, writer: bundles.BlobWriter, size: int) -> None:
        self._store = store
        self._writer = writer
        self.digest = writer.digest
        self.size = size

    @property
    def offset(self) -> int:
        return self._writer.offset

    def append(self, data: bytes, *, offset: int) -> None:
        self._writer.write(data, offset=offset)

    async def commit(self) -> None:
        await asyncio.to_thread(self._writer.commit)

    def close(self) -> None:
        self._writer.close()

    def discard(self) -> None:
        self._writer.close()
        self._store.partial_path(self.digest).unlink(missing_ok=True)


# ---------------------------------------------------------------- what Notifies carry


class NotifyExtras:
    """What a Notify carries beside its task, kept until the install it announces starts.

    The manifest (`Notify.manifest`: GetManifest's answer, checked like it at install) by digest, a
    bounded few; and the moment the release's pull may start (`Notify.pull_spread_ms`,
    `pull_moment`).
    """

    MAX_MANIFESTS = 64

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._manifests: dict[str, pb.GetManifestResponse] = {}
        self._pull_at: dict[str, float] = {}

    def heard(self, notify: pb.Notify, *, now: float) -> None:
        if notify.HasField("manifest"):
            if len(self._manifests) >= self.MAX_MANIFESTS:
                self._manifests.clear()
            self._manifests[notify.task.manifest_digest] = notify.manifest
        release = notify.task.release
        moment = pull_moment(self._pull_at.get(release), spread_ms=notify.pull_spread_ms, now=now, rng=self._rng)
        if moment is None:
            self._pull_at.pop(release, None)
        else:
            self._pull_at[release] = moment

    def manifest(self, digest: str) -> pb.GetManifestResponse | None:
        """The manifest a Notify carried for this digest (taken: an install uses it once)."""
        return self._manifests.pop(digest, None)

    def pull_at(self, release: str) -> float | None:
        """When this release's pull may start (monotonic), if a Notify set a moment; not taken."""
        return self._pull_at.get(release)

    def pull_delay(self, release: str, *, now: float) -> float:
        """Seconds until this release's pull may start (0 or less: now); asked once per Notify."""
        return self._pull_at.pop(release, now) - now

    def forget(self, release: str) -> None:
        """The release was revoked: no pull is owed."""
        self._pull_at.pop(release, None)

    @property
    def pending_pulls(self) -> dict[str, float]:
        return dict(self._pull_at)


def pull_moment(pending: float | None, *, spread_ms: int, now: float, rng: random.Random) -> float | None:
    """When to start the pull a Notify announces (`Notify.pull_spread_ms`), on the monotonic clock; None: at once.

    A uniformly random moment in the window. A moment already drawn for this
    release that comes sooner is kept: a run of changes does not push a
    device's pull back again and again. A Notify without a window drops it.
    """
    if spread_ms <= 0:
        return None
    moment = now + rng.uniform(0, spread_ms / 1000)
    if pending is not None and now < pending < moment:
        return pending
    return moment


# ---------------------------------------------------------------- manifests


def verify_manifest(
    task: pb.DesiredTask,
    response: pb.GetManifestResponse,
    *,
    trusted_keys: Mapping[str, bytes] | None = None,
    backends: Sequence[str] | None = None,
) -> manifest.Manifest:
    """The manifest of `task`, or VerificationFailed: digest, signature (with trusted keys), engines."""
    data = response.manifest
    if manifest.sha256_digest(data) != task.manifest_digest:
        raise errors.VerificationFailed(
            f"manifest hashes to {manifest.sha256_digest(data)}, announced {task.manifest_digest}"
        )
    if trusted_keys is not None:
        verify_signature(data, response.signature, response.key_id, trusted_keys)
    try:
        bundle = manifest.Manifest.from_bytes(data)
    except errors.InvalidManifest as e:
        raise errors.VerificationFailed(f"invalid manifest: {e}") from None
    if backends:
        engines = {b.split("/", 1)[0] for b in backends}
        for need in bundle.engines:
            if need.engine not in engines:
                raise errors.VerificationFailed(f"bundle needs engine {need.engine!r}; this device has {backends}")
    return bundle


def verify_signature(data: bytes, signature: bytes, key_id: str, trusted: Mapping[str, bytes]) -> None:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signature:
        raise errors.VerificationFailed("manifest is unsigned and this agent only runs signed bundles")
    raw = trusted.get(key_id)
    if raw is None:
        raise errors.VerificationFailed(f"manifest is signed by untrusted key {key_id!r}")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise errors.VerificationFailed(f"manifest signature by {key_id!r} does not verify") from None


# ---------------------------------------------------------------- blobs


class Puller:
    """Manifests and blobs for one device, from its controller into its sink."""

    def __init__(
        self,
        *,
        device: client.DeviceClient,
        sink: BlobSink,
        rng: random.Random,
        observer: client.CallObserver,
        timeout_s: float | None = None,
        http: httpfetch.HttpFetcher | None = None,
        on_url_failure: Callable[[str, str], None] | None = None,
    ) -> None:
        self.client = device
        self._on_url_failure = on_url_failure  # (release, reason): told of each URL that did not deliver
        self.http = http  # blobs by URL (object store, CDN) when the controller hands out URLs; None: gRPC only
        self._urls: dict[str, str] = {}  # blob digest -> the URL the last manifest answer gave for it
        self.sink = sink
        self.notified = NotifyExtras(rng)  # manifests and pull moments Notifies carried
        self.pull_blobs_ok = True  # False after the controller answered PullBlobs with UNIMPLEMENTED
        self._observer = observer
        self._timeout_s = timeout_s  # of one pull call (None: as long as it takes)
        # Blobs being fetched right now, each by one install (blobs are shared between releases): set when done.
        self._claims: dict[str, asyncio.Event] = {}

    def connected(self) -> None:
        """A new stream is open: maybe a newer controller now, so PullBlobs is worth trying again."""
        self.pull_blobs_ok = True

    async def manifest(
        self,
        task: pb.DesiredTask,
        *,
        trusted_keys: Mapping[str, bytes] | None = None,
        backends: Sequence[str] | None = None,
    ) -> manifest.Manifest:
        """The verified manifest of `task`: the one its Notify carried, else fetched."""
        response = self.notified.manifest(task.manifest_digest)
        if response is None:
            response = await self.client.get_manifest(release=task.release, manifest_digest=task.manifest_digest)
        bundle = verify_manifest(task, response, trusted_keys=trusted_keys, backends=backends)
        if self.http is not None and response.blob_urls:
            if len(self._urls) > MAX_KEPT_URLS:
                self._urls.clear()
            wanted = set(bundle.blob_digests())
            self._urls.update((d, url) for d, url in response.blob_urls.items() if d in wanted)
        return bundle

    async def pull_missing(self, release: str, entries: Sequence[FileEntry]) -> None:
        """Fetch these blobs: one PullBlobs stream for all of them (blob by blob from an older controller).

        Blobs are shared between releases: one another install is fetching right now is left to it and
        waited for, and fetched here after all if that install did not get it.
        """
        pending = list(entries)
        while pending:
            mine = [e for e in pending if e.sha256 not in self._claims]
            if not mine:  # every one is being fetched by other installs: wait for one, then look again
                await self._claims[pending[0].sha256].wait()
            else:
                for e in mine:
                    self._claims[e.sha256] = asyncio.Event()
                try:
                    await self.fetch(release, [e for e in mine if not self.sink.has(e.sha256)])
                finally:
                    for e in mine:
                        self._claims.pop(e.sha256).set()
            pending = [e for e in pending if not self.sink.has(e.sha256)]

    async def fetch(self, release: str, entries: Sequence[FileEntry]) -> None:
        """Receive every one of these blobs into the sink, verified, or raise.

        Blobs with a URL come over HTTP first (`httpfetch`, at most `max_parallel` at once); any that
        did not arrive that way, and those without a URL, come with PullBlobs.
        """
        entries = await self._fetch_by_url(release, entries)
        for start in range(0, len(entries), manifest.MAX_BLOBS_PER_PULL):
            group = list(entries[start : start + manifest.MAX_BLOBS_PER_PULL])
            remaining = list(group)  # what is still to come: blobs leave it once verified
            if self.pull_blobs_ok:
                try:
                    await self._pull_group(release, group, remaining)
                    continue
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise
                    self.pull_blobs_ok = False
                    log.info("the controller has no PullBlobs (an older version): pulling blob by blob")
            for entry in remaining:
                await self._pull_one(release, entry)

    async def _fetch_by_url(self, release: str, entries: Sequence[FileEntry]) -> list[FileEntry]:
        """Fetch the blobs that have URLs over HTTP; return those still to pull (failed or without a URL)."""
        if self.http is None or not self._urls:
            return list(entries)
        distinct = {e.sha256: e for e in entries if e.sha256 in self._urls}
        if not distinct:
            return list(entries)
        done = await asyncio.gather(*(self._by_url(release, e) for e in distinct.values()))
        got = {d for d, ok in zip(distinct, done, strict=True) if ok}
        return [e for e in entries if e.sha256 not in got]

    async def _by_url(self, release: str, entry: FileEntry) -> bool:
        assert self.http is not None
        url = self._urls[entry.sha256]
        try:
            await self.http.fetch(url, self.sink.open(entry.sha256, size=entry.size))
        except httpfetch.HttpFailure as e:
            self._urls.pop(entry.sha256, None)  # not again: the next manifest answer brings a fresh URL
            log.warning("%s: %s; pulling it from the controller", release, e)
            if self._on_url_failure is not None:
                self._on_url_failure(release, e.reason)
            return False
        return True

    def _held(self, group: Sequence[FileEntry], remaining: Sequence[FileEntry]) -> int:
        """Bytes of the group received, whole or partial: grows with every chunk."""
        todo = {e.sha256 for e in remaining}
        return sum(self.sink.partial_size(e.sha256) if e.sha256 in todo else e.size for e in group)

    async def _pull_group(self, release: str, group: Sequence[FileEntry], remaining: list[FileEntry]) -> None:
        """One PullBlobs stream for the group, resumed at once after a break that made progress.

        The next call asks for what is still missing, each blob from the offset it reached; a break
        without progress goes to the caller (its backoff).
        """
        while remaining:
            held = self._held(group, remaining)
            try:
                await self._pull_stream(release, remaining)
            except grpc.aio.AioRpcError as e:
                if not client.is_retryable(e) or self._held(group, remaining) <= held:
                    raise
                self._observer.failed("PullBlobs", e, release=release)

    async def _pull_stream(self, release: str, remaining: list[FileEntry]) -> None:
        """One PullBlobs call: each blob from its partial's size; removed from `remaining` once verified."""
        order = [(e.sha256, _resume_offset(self.sink.partial_size(e.sha256), e.size)) for e in remaining]
        sizes = {e.sha256: e.size for e in remaining}
        index = 0  # the blob expected next
        writer: BlobWrite | None = None
        try:
            async for chunk in self.client.pull_blobs(release=release, blobs=order, timeout_s=self._timeout_s):
                if writer is None:
                    if index >= len(order) or chunk.digest != order[index][0]:
                        expected = order[index][0] if index < len(order) else "nothing more"
                        raise errors.FailedPrecondition(f"PullBlobs sent {chunk.digest!r}, expected {expected}")
                    writer = self.sink.open(chunk.digest, size=sizes[chunk.digest])
                    index += 1
                elif chunk.digest != writer.digest:
                    raise errors.FailedPrecondition(
                        f"PullBlobs moved on to {chunk.digest!r} with blob {writer.digest} at {writer.offset}"
                        f" of {writer.size} bytes"
                    )
                _write_chunk(writer, chunk)
                if writer.offset == writer.size:
                    done, writer = writer, None
                    await _commit(done)
                    del remaining[0]  # blobs complete in the order asked for
        except errors.DigestMismatch as e:
            if writer is not None:
                writer.discard()
            raise errors.VerificationFailed(str(e)) from None
        except BaseException:
            if writer is not None:
                writer.close()  # keep the partial: the next attempt resumes from its size
            raise
        if writer is not None or index < len(order):
            if writer is not None:
                writer.close()
            raise errors.FailedPrecondition(f"PullBlobs ended after {index} of {len(order)} blobs, the last unfinished")

    async def _pull_one(self, release: str, entry: FileEntry) -> None:
        """One blob with PullBlob (a controller without PullBlobs); the caller has claimed it."""
        writer = self.sink.open(entry.sha256, size=entry.size)
        try:
            async for chunk in self.client.pull_blob(
                release=release, digest=entry.sha256, offset=writer.offset, timeout_s=self._timeout_s
            ):
                _write_chunk(writer, chunk)
        except errors.DigestMismatch as e:
            writer.discard()
            raise errors.VerificationFailed(str(e)) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.OUT_OF_RANGE:
                writer.discard()  # the partial cannot be resumed from
            else:
                writer.close()  # keep the partial: the next attempt resumes from its size
            raise
        except BaseException:
            writer.close()
            raise
        await _commit(writer)


def _write_chunk(writer: BlobWrite, chunk: pb.BlobChunk) -> None:
    """One received chunk into its blob; a blob whose size differs from the manifest's is refused."""
    if chunk.total_size and chunk.total_size != writer.size:
        raise errors.DigestMismatch(
            f"blob {writer.digest} is {chunk.total_size} bytes; the manifest says {writer.size}"
        )
    writer.append(chunk.data, offset=chunk.offset)


async def _commit(writer: BlobWrite) -> None:
    try:
        await writer.commit()
    except errors.DigestMismatch as e:
        raise errors.VerificationFailed(str(e)) from None


def _resume_offset(partial_size: int, size: int) -> int:
    """Where a blob's download resumes: its partial's size (a partial longer than the blob starts over)."""
    return partial_size if partial_size <= size else 0
