"""Where the controller keeps blobs and where devices fetch them: the async seam the services use.

Three kinds, one Protocol (`BlobBackend`), chosen by `tether controller --blob-store`:

- `LocalBackend` over a synchronous `blobs.BlobStore` (the filesystem store, the
  default, one replica or a shared volume): file I/O in threads. With an
  `OriginSigner` it is the *origin mode*: a static web server or CDN serves the
  same directory under a base URL, and devices get signed per-device URLs.
- `S3Backend`: an S3-compatible object store through aiobotocore (bucket,
  prefix, region/endpoint, credentials from the usual botocore sources),
  keyed `<prefix>sha256/ab/cd/<hex>`; devices get presigned GETs, or signed
  origin URLs when a CDN sits in front of the bucket (`signer`). Replicas on
  different nodes share it.

Every kind stores a blob all-or-nothing and only under the digest of its
bytes (a mismatch or an oversized upload stores nothing). URLs are issued by
`url_for`, which is synchronous and cheap because a fan-out asks it once per
notified device; a kind that needs I/O to sign does it ahead in
`prepare_urls` (S3 presigns once per digest and reuses a URL while at least
half its lifetime is left). A URL is only ever issued for a blob of a manifest
the controller serves that device (GetManifest and Notify decide that first).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any, Protocol, cast

from tether.common import config, errors
from tether.controller import blob_urls, blobs

log = logging.getLogger(__name__)

_BRIDGE_TIMEOUT_S = 300.0  # an upload whose client is silent this long is abandoned
S3_PART_BYTES = 8 * 1024 * 1024  # multipart part size (S3's minimum is 5 MiB, but the last)


class BlobBackend(Protocol):
    """What the services need of blob storage. MUST: `put_stream` is all-or-nothing and checks the digest."""

    max_blob_bytes: int

    @property
    def shared(self) -> bool:
        """Controller replicas on different nodes see the same blobs (an object store)."""
        ...

    async def has(self, digest: str) -> bool: ...

    async def size(self, digest: str) -> int | None:
        """Size of a stored blob, None when absent."""
        ...

    async def put_stream(self, digest: str, chunks: AsyncIterator[bytes]) -> int:
        """Store the blob; return its size. DigestMismatch / TooLarge store nothing."""
        ...

    async def read(self, digest: str, *, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer only at the end). NotFound when absent."""
        ...

    async def prepare_urls(self, digests: Iterable[str]) -> None:
        """Make `url_for` able to answer for these digests (signing that needs I/O happens here)."""
        ...

    def url_for(self, digest: str, *, device_id: str, now: float) -> str | None:
        """A URL this device may fetch the blob from until it expires, or None: stream it through PullBlobs."""
        ...

    async def close(self) -> None: ...


class LocalBackend:
    """A synchronous `blobs.BlobStore` (the filesystem one) in threads; the origin mode with a signer."""

    def __init__(self, store: blobs.BlobStore, *, signer: blob_urls.OriginSigner | None = None) -> None:
        self.store = store
        self.signer = signer
        self.max_blob_bytes = store.max_blob_bytes

    @property
    def shared(self) -> bool:
        return False

    async def has(self, digest: str) -> bool:
        return await asyncio.to_thread(self.store.has, digest)

    async def size(self, digest: str) -> int | None:
        return await asyncio.to_thread(self.store.size, digest)

    async def put_stream(self, digest: str, chunks: AsyncIterator[bytes]) -> int:
        loop = asyncio.get_running_loop()
        return await asyncio.to_thread(self.store.put_stream, digest, _blocking_iter(chunks, loop))

    async def read(self, digest: str, *, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(_read, self.store, digest, offset, length)

    async def prepare_urls(self, digests: Iterable[str]) -> None:
        return None

    def url_for(self, digest: str, *, device_id: str, now: float) -> str | None:
        if self.signer is not None:
            return self.signer.url(digest, device_id=device_id, now=now)
        return self.store.url_for(digest)

    async def close(self) -> None:
        return None


class S3Backend:
    """Blobs as objects `<prefix>sha256/ab/cd/<hex>` in one bucket, through aiobotocore.

    Uploads stream into a multipart upload of the final key while being hashed and
    are completed only when the digest matches (else aborted): an object under a
    digest's key is always that digest's bytes, and a half upload is never visible.
    Use `await S3Backend.open(...)`; `close()` releases the client.
    """

    def __init__(
        self,
        *,
        client: Any,
        exit_stack: contextlib.AsyncExitStack,
        bucket: str,
        prefix: str,
        url_ttl_s: int,
        signer: blob_urls.OriginSigner | None,
        max_blob_bytes: int,
        clock: Any = time.time,
    ) -> None:
        self._client = client
        self._stack = exit_stack
        self.bucket = bucket
        self.prefix = prefix
        self.url_ttl_s = url_ttl_s
        self.signer = signer
        self.max_blob_bytes = max_blob_bytes
        self._clock = clock
        self._presigned: dict[str, tuple[str, float]] = {}  # digest -> (URL, expires at)

    @classmethod
    async def open(
        cls,
        *,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        url_ttl_s: int = 900,
        signer: blob_urls.OriginSigner | None = None,
        max_blob_bytes: int = blobs.DEFAULT_MAX_BLOB_BYTES,
    ) -> S3Backend:
        """`url` is `s3://bucket[/prefix]`; credentials come from botocore's usual chain (env, files, roles)."""
        from aiobotocore.config import AioConfig
        from aiobotocore.session import get_session

        bucket, prefix = parse_s3_url(url)
        # Custom endpoints (MinIO, Ceph, moto, a loopback port) want path-style addressing.
        config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            retries={"max_attempts": 3, "mode": "standard"},
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
        )
        backend = cls(
            client=client,
            exit_stack=stack,
            bucket=bucket,
            prefix=prefix,
            url_ttl_s=url_ttl_s,
            signer=signer,
            max_blob_bytes=max_blob_bytes,
        )
        try:
            await client.head_bucket(Bucket=bucket)
        except Exception as e:
            await stack.aclose()
            raise errors.FailedPrecondition(f"cannot use bucket {bucket!r}: {e}") from None
        return backend

    @property
    def shared(self) -> bool:
        return True

    def key(self, digest: str) -> str:
        return self.prefix + blob_urls.blob_path(digest)

    async def has(self, digest: str) -> bool:
        return await self.size(digest) is not None

    async def size(self, digest: str) -> int | None:
        try:
            head = await self._client.head_object(Bucket=self.bucket, Key=self.key(digest))
        except Exception as e:
            if _status(e) == 404:
                return None
            raise
        return int(head["ContentLength"])

    async def read(self, digest: str, *, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0:
            raise errors.InvalidArgument(f"bad range {offset}+{length} of blob {digest}")
        try:
            got = await self._client.get_object(
                Bucket=self.bucket, Key=self.key(digest), Range=f"bytes={offset}-{offset + length - 1}"
            )
        except Exception as e:
            if _status(e) == 404:
                raise errors.NotFound(f"blob {digest} is not stored") from None
            if _status(e) == 416:
                return b""
            raise
        async with got["Body"] as body:
            data: bytes = await body.read()
        return data

    async def put_stream(self, digest: str, chunks: AsyncIterator[bytes]) -> int:
        key = self.key(digest)
        h = hashlib.sha256()
        size = 0
        buffer = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > self.max_blob_bytes:
                    raise errors.TooLarge(f"blob {digest} exceeds the limit of {self.max_blob_bytes} bytes")
                h.update(chunk)
                buffer += chunk
                if len(buffer) >= S3_PART_BYTES:
                    if upload_id is None:
                        created = await self._client.create_multipart_upload(Bucket=self.bucket, Key=key)
                        upload_id = created["UploadId"]
                    parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    buffer.clear()
            actual = "sha256:" + h.hexdigest()
            if actual != digest:
                raise errors.DigestMismatch(f"digest: the content hashes to {actual}, not {digest}")
            if upload_id is None:  # small: one PUT, after the digest was checked
                await self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(buffer))
                return size
            if buffer:
                parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer)))
            await self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            upload_id = None
        finally:
            if upload_id is not None:
                with contextlib.suppress(Exception):
                    await self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        return size

    async def _part(self, key: str, upload_id: str, number: int, data: bytes) -> dict[str, Any]:
        got = await self._client.upload_part(
            Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
        )
        return {"PartNumber": number, "ETag": got["ETag"]}

    async def prepare_urls(self, digests: Iterable[str]) -> None:
        if self.signer is not None:
            return
        now = self._clock()
        for digest in digests:
            hit = self._presigned.get(digest)
            if hit is not None and hit[1] - now > self.url_ttl_s / 2:
                continue
            url = await self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": self.key(digest)}, ExpiresIn=self.url_ttl_s
            )
            self._presigned[digest] = (url, now + self.url_ttl_s)
        if len(self._presigned) > 65_536:  # forget the expired ones
            self._presigned = {d: hit for d, hit in self._presigned.items() if hit[1] > now}

    def url_for(self, digest: str, *, device_id: str, now: float) -> str | None:
        if self.signer is not None:  # a CDN in front of the bucket checks the origin token
            return self.signer.url(digest, device_id=device_id, now=now)
        hit = self._presigned.get(digest)
        if hit is None or hit[1] - now < self.url_ttl_s / 4:
            return None  # not prepared (or nearly expired): the device streams it through PullBlobs
        return hit[0]

    async def close(self) -> None:
        await self._stack.aclose()


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix ending in "/" or empty)."""
    if not url.startswith("s3://"):
        raise errors.InvalidArgument(f"blob store {url!r}: an object store is given as s3://bucket[/prefix]")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket or not all(c.isalnum() or c in "-." for c in bucket) or not 3 <= len(bucket) <= 63:
        raise errors.InvalidArgument(f"blob store {url!r}: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _status(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    if not isinstance(response, dict):
        return None
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    if code in ("NoSuchKey", "NotFound", "404"):
        return 404
    return int(status) if status else None


def _read(store: blobs.BlobStore, digest: str, offset: int, length: int) -> bytes:
    reader = store.read_range(digest, offset=offset, chunk_size=length)
    try:
        return next(reader, b"")
    finally:
        close = getattr(reader, "close", None)
        if close is not None:
            close()


def _blocking_iter(chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> Iterator[bytes]:
    """Drive an async iterator from a worker thread (the filesystem store's writes are blocking)."""
    while True:
        future = asyncio.run_coroutine_threadsafe(_next_or_end(chunks), loop)
        item = future.result(timeout=_BRIDGE_TIMEOUT_S)
        if item is None:
            return
        yield item


async def _next_or_end(chunks: AsyncIterator[bytes]) -> bytes | None:
    return await anext(chunks, None)


async def open_backend(cfg: config.ControllerConfig) -> BlobBackend:
    """The blob backend `cfg` names (`--blob-store`, `--blob-base-url`, ...)."""
    signer = None
    if cfg.blob_base_url:
        assert cfg.blob_url_secret is not None  # the config checks it
        signer = blob_urls.OriginSigner(
            base_url=cfg.blob_base_url, secret=cfg.blob_url_secret, ttl_s=cfg.blob_url_ttl_s
        )
    if cfg.blob_store.startswith("s3://"):
        return await S3Backend.open(
            url=cfg.blob_store,
            endpoint_url=cfg.s3_endpoint_url,
            region=cfg.s3_region,
            url_ttl_s=cfg.blob_url_ttl_s,
            signer=signer,
            max_blob_bytes=cfg.max_blob_bytes,
        )
    return LocalBackend(blobs.FilesystemBlobStore(cfg.blob_dir, max_blob_bytes=cfg.max_blob_bytes), signer=signer)


def as_backend(store: blobs.BlobStore | BlobBackend) -> BlobBackend:
    """A backend as it is; a synchronous store (the filesystem one, a test's wrapper) in threads."""
    if hasattr(store, "prepare_urls"):
        return cast(BlobBackend, store)
    return LocalBackend(store)
