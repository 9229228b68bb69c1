"""Blob backends against real servers: an S3 API (moto's server) and an nginx origin checking signed URLs."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import pytest

from tether.common import config, errors
from tether.controller import blob_urls, blobs, blobstores


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def chunks_of(data: bytes, size: int = 1 << 20):
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def open_s3(endpoint: str, **kw) -> blobstores.S3Backend:
    return await blobstores.S3Backend.open(
        url="s3://tether-blobs/fleet/", endpoint_url=endpoint, region="us-east-1", **kw
    )


async def test_s3_stores_by_digest_reads_ranges_and_presigns_urls_that_honour_range(s3_endpoint):
    store = await open_s3(s3_endpoint, url_ttl_s=300)
    try:
        small = os.urandom(70_000)
        large = os.urandom(blobstores.S3_PART_BYTES + 1_500_000)  # a multipart upload of two parts
        for data in (small, large):
            d = digest_of(data)
            assert not await store.has(d)
            assert await store.put_stream(d, chunks_of(data)) == len(data)
            assert await store.has(d) and await store.size(d) == len(data)
            assert await store.read(d, offset=1000, length=5000) == data[1000:6000]
            assert await store.read(d, offset=len(data) - 10, length=5000) == data[-10:]
        d = digest_of(small)
        assert store.key(d) == f"fleet/sha256/{d[7:9]}/{d[9:11]}/{d[7:]}"
        assert store.url_for(d, device_id="phone-1", now=time.time()) is None  # not prepared: stream it
        await store.prepare_urls([d])
        url = store.url_for(d, device_id="phone-1", now=time.time())
        assert url is not None and "X-Amz-Signature" in url
        async with httpx.AsyncClient() as http:
            whole = await http.get(url)
            assert whole.status_code == 200 and whole.content == small
            part = await http.get(url, headers={"Range": "bytes=100-"})
            assert part.status_code == 206 and part.content == small[100:]
        with pytest.raises(errors.NotFound):
            await store.read(digest_of(b"absent"), offset=0, length=10)
    finally:
        await store.close()


async def test_s3_refuses_wrong_or_oversized_content_and_stores_nothing(s3_endpoint):
    store = await open_s3(s3_endpoint, max_blob_bytes=blobstores.S3_PART_BYTES * 2)
    try:
        data = os.urandom(blobstores.S3_PART_BYTES + 10)  # past one part: the multipart upload is aborted
        claimed = digest_of(b"something else")
        with pytest.raises(errors.DigestMismatch):
            await store.put_stream(claimed, chunks_of(data))
        assert not await store.has(claimed)
        with pytest.raises(errors.DigestMismatch):
            await store.put_stream(claimed, chunks_of(b"small and wrong"))
        assert not await store.has(claimed)
        too_big = os.urandom(blobstores.S3_PART_BYTES * 2 + 1)
        with pytest.raises(errors.TooLarge):
            await store.put_stream(digest_of(too_big), chunks_of(too_big))
        assert not await store.has(digest_of(too_big))
        uploads = await store._client.list_multipart_uploads(Bucket="tether-blobs")
        assert not uploads.get("Uploads")  # nothing half-uploaded left behind
    finally:
        await store.close()


async def test_s3_backend_refuses_a_missing_bucket_by_name(s3_endpoint):
    with pytest.raises(errors.FailedPrecondition, match="no-such-bucket"):
        await blobstores.S3Backend.open(url="s3://no-such-bucket", endpoint_url=s3_endpoint, region="us-east-1")
    with pytest.raises(errors.InvalidArgument, match="bucket"):
        blobstores.parse_s3_url("s3://")


async def test_the_origin_serves_signed_urls_and_refuses_forged_altered_and_expired_ones(nginx_origin, url_secret):
    backend = blobstores.LocalBackend(
        blobs.FilesystemBlobStore(nginx_origin.root),
        signer=blob_urls.OriginSigner(base_url=nginx_origin.base_url, secret=url_secret, ttl_s=120),
    )
    data = os.urandom(300_000)
    d = digest_of(data)
    await backend.put_stream(d, chunks_of(data, 65_536))
    now = time.time()
    url = backend.url_for(d, device_id="phone:1", now=now)
    other = backend.url_for(d, device_id="phone-2", now=now)
    assert url is not None and other is not None and url != other  # each device its own URL
    assert blob_urls.check(url, secret=url_secret, now=now)
    expired = backend.url_for(d, device_id="phone:1", now=now - 3600)
    assert expired is not None and not blob_urls.check(expired, secret=url_secret, now=now)
    forged = blob_urls.OriginSigner(base_url=nginx_origin.base_url, secret="another-secret-of-16+", ttl_s=120)
    async with httpx.AsyncClient() as http:
        got = await http.get(url)
        assert got.status_code == 200 and got.content == data
        part = await http.get(url, headers={"Range": "bytes=250000-"})
        assert part.status_code == 206 and part.content == data[250_000:]
        assert (await http.get(url.replace("phone%3A1", "phone-2"))).status_code == 403  # another device's
        assert (await http.get(url.split("?")[0])).status_code == 403  # unsigned
        assert (await http.get(forged.url(d, device_id="phone:1", now=now))).status_code == 403
        later = url.replace(f"expires={blob_urls.expiry(now=now, ttl_s=120)}", f"expires={int(now) + 99_999}")
        assert (await http.get(later)).status_code == 403  # expiry pushed back
        assert (await http.get(expired)).status_code == 410
        absent = backend.url_for(digest_of(b"absent"), device_id="phone:1", now=now)
        assert absent is not None and (await http.get(absent)).status_code == 404


def test_the_config_names_what_is_wrong_with_a_blob_store_setting(tmp_path):
    base = {"database_url": "postgresql://x", "admin_token": "a" * 8, "bootstrap_token": "b" * 8}
    with pytest.raises(config.ConfigError, match="fs, http or s3"):
        config.ControllerConfig(**base, blob_store="ftp://x")
    with pytest.raises(config.ConfigError, match="TETHER_BLOB_BASE_URL"):
        config.ControllerConfig(**base, blob_store="http")
    with pytest.raises(config.ConfigError, match="TETHER_BLOB_URL_SECRET"):
        config.ControllerConfig(**base, blob_store="http", blob_base_url="https://cdn.example/blobs/")
    cfg = config.ControllerConfig.from_env(
        {
            **base,
            "TETHER_BLOB_STORE": "s3://b/p",
            "TETHER_BLOB_URL_TTL": "120",
            "TETHER_DATABASE_URL": "postgresql://x",
            "TETHER_ADMIN_TOKEN": "a" * 8,
            "TETHER_BOOTSTRAP_TOKEN": "b" * 8,
        }
    )
    assert cfg.blob_store == "s3://b/p" and cfg.blob_url_ttl_s == 120
    with pytest.raises(errors.InvalidArgument, match="base URL"):
        blob_urls.OriginSigner(base_url="ftp://cdn/", secret="s" * 16)
    with pytest.raises(errors.InvalidArgument, match="secret"):
        blob_urls.OriginSigner(base_url="https://cdn/", secret="short")
