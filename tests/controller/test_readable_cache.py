"""`ReleaseCache.release_for_device` keeps its "yes" briefly, and forgets it on any release change."""

import hashlib
import json

import pytest

from tether.common import errors, manifest
from tether.controller import db, devices, release_cache, releases
from tether.controller.storage import postgres


async def _apply(pg_storage, cache, *, target):
    content = b"print(1)\n"
    d = "sha256:" + hashlib.sha256(content).hexdigest()
    await pg_storage.bundles.put_blob(digest=d, size=len(content))
    m = manifest.Manifest(name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", d, len(content)),))
    digest = await pg_storage.bundles.put_manifest(body=m.canonical_bytes())
    spec = releases.parse_spec(
        release="ns/t",
        generation=1,
        manifest_digest=digest,
        target_json=json.dumps(target),
        trigger_json="",
        aggregation_json="{}",
        paused=False,
        resources_json="",
    )
    return await cache.apply_release(spec)  # as AdminService.ApplyRelease does


def _device(**attributes):
    return devices.Device(device_id="d1", attributes=attributes, backends=("mnn/cpu",))


async def test_a_retarget_on_this_replica_is_seen_at_once(pg_storage, pg_release_cache):
    android = _device(os="android")
    await _apply(pg_storage, pg_release_cache, target={"matchLabels": {"os": "android"}})
    assert (await pg_release_cache.release_for_device(android, "ns/t")).name == "ns/t"
    await _apply(pg_storage, pg_release_cache, target={"matchLabels": {"os": "ios"}})
    with pytest.raises(errors.PermissionDenied):
        await pg_release_cache.release_for_device(android, "ns/t")


async def test_other_facts_miss_the_cache_and_a_no_is_never_kept(pg_storage, pg_release_cache):
    await _apply(pg_storage, pg_release_cache, target={"matchLabels": {"os": "android"}})
    assert await pg_release_cache.release_for_device(_device(os="android"), "ns/t")
    with pytest.raises(errors.PermissionDenied):  # same device id, facts changed: asked again
        await pg_release_cache.release_for_device(_device(os="ios"), "ns/t")
    with pytest.raises(errors.PermissionDenied):
        await pg_release_cache.release_for_device(_device(os="ios"), "ns/t")
    assert await pg_release_cache.release_for_device(_device(os="android"), "ns/t")


async def test_a_change_on_another_replica_is_seen_once_announced(pg_storage, pg_release_cache, database_url):
    pool = await db.open_pool(database_url, max_size=2)
    other = release_cache.ReleaseCache(postgres.postgres_storage(pool).releases)  # a second replica, same database
    try:
        android = _device(os="android")
        await _apply(pg_storage, pg_release_cache, target={"matchLabels": {"os": "android"}})
        assert await other.release_for_device(android, "ns/t")
        await _apply(pg_storage, pg_release_cache, target={"matchLabels": {"os": "ios"}})
        assert await other.release_for_device(android, "ns/t")  # not announced yet: the kept answer (< 2 s)
        other.releases_changed()  # what its ReleaseListener does on the NOTIFY
        with pytest.raises(errors.PermissionDenied):
            await other.release_for_device(android, "ns/t")
    finally:
        await pool.close()
