"""The store on a real PostgreSQL: every write transactional, every refusal leaves no trace."""

import asyncio
import hashlib
import json

import psycopg
import pytest
from controller_support import snapshot

from tether.common import auth, errors, manifest
from tether.controller import devices, releases, serving, uploads


def info(**attributes):
    return devices.validate_info(attributes=attributes, backends=["mnn/cpu"])


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put_manifest(pg_storage, *, name="t", content=b"print(1)\n"):
    d = digest_of(content)
    await pg_storage.bundles.put_blob(digest=d, size=len(content))
    m = manifest.Manifest(name=name, entrypoint="task.py", files=(manifest.FileEntry("task.py", d, len(content)),))
    return await pg_storage.bundles.put_manifest(body=m.canonical_bytes())


def spec(
    digest, *, release="ns/t", target=None, generation=1, paused=False, aggregation=None, trigger=None, resources=None
):
    return releases.parse_spec(
        release=release,
        generation=generation,
        manifest_digest=digest,
        target_json=json.dumps(target or {}),
        trigger_json=json.dumps(trigger) if trigger is not None else "",
        aggregation_json=json.dumps(aggregation or {}),
        paused=paused,
        resources_json=json.dumps(resources) if resources is not None else "",
    )


def result(*, release="ns/t", version=1, key="k1", samples=5):
    return uploads.validate_result(
        release=release,
        version=version,
        idempotency_key=key,
        sample_count=samples,
        metrics={"acc": 0.5},
        counts={},
        tensors=[],
        duration_s=0.1,
    )


# ---------------------------------------------------------------- devices


async def test_enroll_stores_only_the_hash_and_authenticates(pg_storage, database_url):
    cred = await pg_storage.devices.enroll_device(device_id="d1", info=info(os="android"))
    device = await pg_storage.devices.authenticate_device(auth.parse_credential(str(cred)))
    assert device.device_id == "d1"
    assert device.attributes == {"os": "android"}
    assert device.backends == ("mnn/cpu",)
    with psycopg.connect(database_url) as conn:
        (stored,) = conn.execute("SELECT credential_hash FROM devices").fetchone()
    assert bytes(stored) == hashlib.sha256(cred.secret.encode()).digest()
    assert cred.secret.encode() not in bytes(stored)


async def test_reenrolment_rotates_the_credential_and_updates_attributes(pg_storage):
    old = await pg_storage.devices.enroll_device(device_id="d1", info=info(os="android"))
    new = await pg_storage.devices.enroll_device(device_id="d1", info=info(os="ios"))
    with pytest.raises(errors.Unauthenticated):
        await pg_storage.devices.authenticate_device(old)
    device = await pg_storage.devices.authenticate_device(new)
    assert device.attributes == {"os": "ios"}


async def test_wrong_secret_unknown_device_and_revoked(pg_storage):
    cred = await pg_storage.devices.enroll_device(device_id="d1", info=info())
    with pytest.raises(errors.Unauthenticated):
        await pg_storage.devices.authenticate_device(auth.Credential(device_id="d1", secret=auth.new_secret()))
    with pytest.raises(errors.Unauthenticated):
        await pg_storage.devices.authenticate_device(auth.Credential(device_id="ghost", secret=cred.secret))
    assert await pg_storage.devices.revoke_device("d1")
    with pytest.raises(errors.Unauthenticated, match="revoked"):
        await pg_storage.devices.authenticate_device(cred)
    with pytest.raises(errors.PermissionDenied, match="revoked"):
        await pg_storage.devices.enroll_device(device_id="d1", info=info())


# ---------------------------------------------------------------- manifests


async def test_manifest_needs_its_blobs_with_matching_sizes(pg_storage, database_url):
    content = b"print(1)\n"
    d = digest_of(content)
    m = manifest.Manifest(name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", d, len(content)),))
    with pytest.raises(errors.FailedPrecondition, match="not uploaded"):
        await pg_storage.bundles.put_manifest(body=m.canonical_bytes())
    await pg_storage.bundles.put_blob(digest=d, size=len(content) + 1)
    with pytest.raises(errors.InvalidManifest, match="claims"):
        await pg_storage.bundles.put_manifest(body=m.canonical_bytes())
    assert snapshot(database_url)["manifests"] == []


async def test_manifest_digest_is_computed_from_the_bytes(pg_storage):
    digest = await put_manifest(pg_storage)
    stored = await pg_storage.bundles.get_manifest(digest)
    assert manifest.sha256_digest(stored.body) == digest
    with pytest.raises(errors.InvalidManifest):
        await pg_storage.bundles.put_manifest(body=b'{"not": "a manifest"}')


# ---------------------------------------------------------------- releases


async def test_apply_bumps_version_only_on_content_change(pg_storage):
    d1 = await put_manifest(pg_storage, content=b"one\n")
    d2 = await put_manifest(pg_storage, content=b"two\n")
    first = await pg_storage.releases.apply_release(spec(d1))
    assert (first.release.version, first.changed, first.previous) == (1, True, None)
    same = await pg_storage.releases.apply_release(spec(d1))
    assert (same.release.version, same.changed) == (1, False)
    regen = await pg_storage.releases.apply_release(spec(d1, generation=5))
    assert (regen.release.version, regen.changed) == (1, False)
    assert (await pg_storage.releases.get_release("ns/t")).spec.generation == 5
    paused = await pg_storage.releases.apply_release(spec(d1, generation=5, paused=True))
    assert (paused.release.version, paused.changed, paused.release.paused) == (1, False, True)
    for i, s in enumerate(
        [
            spec(d2, generation=5),
            spec(d2, generation=5, target={"matchLabels": {"os": "ios"}}),
            spec(d2, generation=5, target={"matchLabels": {"os": "ios"}}, aggregation={"tensors": "sum"}),
        ],
        start=2,
    ):
        outcome = await pg_storage.releases.apply_release(s)
        assert (outcome.release.version, outcome.changed) == (i, True)


async def test_resources_round_trip_and_a_change_bumps_the_version(pg_storage, database_url):
    d = await put_manifest(pg_storage)
    limits = {"timeoutSeconds": 30, "memoryMB": 128, "cpuSeconds": 10}
    interval = {"type": "interval", "seconds": 60}
    first = await pg_storage.releases.apply_release(spec(d, trigger=interval, resources=limits))
    assert (first.release.version, first.release.spec.resources) == (1, limits)
    stored = await pg_storage.releases.get_release("ns/t")
    assert (stored.spec.resources, stored.spec.trigger) == (limits, interval)
    assert [r.spec.resources for r in await pg_storage.releases.list_releases()] == [limits]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT resources FROM releases").fetchone()[0] == limits  # jsonb, not text

    # The same limits in another key order, or a new generation: no new version.
    same = await pg_storage.releases.apply_release(
        spec(d, generation=2, trigger=interval, resources=dict(reversed(limits.items())))
    )
    assert (same.release.version, same.changed) == (1, False)
    # Any change of the limits is news for devices, like a trigger change.
    steps = [
        {"timeoutSeconds": 30, "memoryMB": 128, "cpuSeconds": 20},
        {"timeoutSeconds": 30, "memoryMB": 128},
        {},
    ]
    for version, resources in enumerate(steps, start=2):
        outcome = await pg_storage.releases.apply_release(spec(d, generation=2, trigger=interval, resources=resources))
        assert (outcome.release.version, outcome.changed, outcome.release.spec.resources) == (version, True, resources)
        assert outcome.previous.spec.resources == (limits if version == 2 else steps[version - 3])
        assert (await pg_storage.releases.get_release("ns/t")).spec.resources == resources
    trigger_only = await pg_storage.releases.apply_release(
        spec(d, generation=2, trigger={"type": "onInstall"}, resources={})
    )
    assert (trigger_only.release.version, trigger_only.changed) == (5, True)


async def test_desired_tasks_carry_trigger_and_resources(pg_storage):
    d = await put_manifest(pg_storage)
    await pg_storage.devices.enroll_device(device_id="a", info=info(os="android"))
    [device] = await pg_storage.devices.active_devices()
    await pg_storage.releases.apply_release(
        spec(
            d,
            release="ns/tick",
            trigger={"type": "interval", "seconds": 30},
            resources={"timeoutSeconds": 5, "memoryMB": 64},
        )
    )
    await pg_storage.releases.apply_release(spec(d, release="ns/plain"))
    assert await pg_storage.releases.desired_tasks(device) == [
        serving.DesiredTask(release="ns/plain", version=1, manifest_digest=d),
        serving.DesiredTask(
            release="ns/tick",
            version=1,
            manifest_digest=d,
            trigger={"type": "interval", "seconds": 30},
            resources={"timeoutSeconds": 5, "memoryMB": 64},
        ),
    ]


async def test_apply_with_unknown_manifest_stores_nothing(pg_storage, database_url):
    before = snapshot(database_url)
    with pytest.raises(errors.FailedPrecondition, match="upload the bundle"):
        await pg_storage.releases.apply_release(spec("sha256:" + "0" * 64))
    assert snapshot(database_url) == before


async def test_concurrent_first_applies_create_one_release(pg_storage):
    d = await put_manifest(pg_storage)
    outcomes = await asyncio.gather(*(pg_storage.releases.apply_release(spec(d)) for _ in range(4)))
    assert sorted(o.changed for o in outcomes) == [False, False, False, True]
    assert {o.release.version for o in outcomes} == {1}


async def test_delete_and_revive(pg_storage):
    d = await put_manifest(pg_storage)
    await pg_storage.releases.apply_release(spec(d))
    deleted = await pg_storage.releases.delete_release("ns/t")
    assert deleted is not None and deleted.version == 1
    assert await pg_storage.releases.delete_release("ns/t") is None
    assert await pg_storage.releases.get_release("ns/t") is None
    assert await pg_storage.releases.list_releases() == []
    revived = await pg_storage.releases.apply_release(spec(d))
    assert (revived.release.version, revived.changed) == (2, True)


async def test_desired_tasks_follow_targets_and_pause(pg_storage, pg_release_cache):
    d = await put_manifest(pg_storage)
    await pg_storage.devices.enroll_device(device_id="a", info=info(os="android"))
    await pg_storage.devices.enroll_device(device_id="i", info=info(os="ios"))
    await pg_storage.releases.apply_release(spec(d, release="ns/all"))
    await pg_storage.releases.apply_release(spec(d, release="ns/android", target={"matchLabels": {"os": "android"}}))
    await pg_storage.releases.apply_release(spec(d, release="ns/paused", paused=True))
    by_id = {dev.device_id: dev for dev in await pg_storage.devices.active_devices()}
    assert [t.release for t in await pg_storage.releases.desired_tasks(by_id["a"])] == ["ns/all", "ns/android"]
    assert [t.release for t in await pg_storage.releases.desired_tasks(by_id["i"])] == ["ns/all"]
    # A device that already had the paused release keeps it.
    await pg_storage.releases.mark_notified(release="ns/paused", version=1, device_ids=["i"])
    assert [t.release for t in await pg_storage.releases.desired_tasks(by_id["i"])] == ["ns/all", "ns/paused"]
    with pytest.raises(errors.PermissionDenied):
        await pg_release_cache.release_for_device(by_id["i"], "ns/android")
    with pytest.raises(errors.NotFound):
        await pg_release_cache.release_for_device(by_id["i"], "ns/nope")


async def test_deliveries_never_move_backwards(pg_storage, pg_reporter):
    d1 = await put_manifest(pg_storage, content=b"one\n")
    d2 = await put_manifest(pg_storage, content=b"two\n")
    await pg_storage.devices.enroll_device(device_id="a", info=info())
    [device] = await pg_storage.devices.active_devices()
    await pg_storage.releases.apply_release(spec(d1))
    await pg_storage.releases.mark_notified(release="ns/t", version=1, device_ids=["a"])
    await pg_reporter.report_delivery(device=device, release="ns/t", version=1, state="succeeded")
    await pg_storage.releases.mark_notified(
        release="ns/t", version=1, device_ids=["a"]
    )  # same version: keeps "succeeded"
    [counts] = await pg_storage.releases.release_counts(["ns/t"])
    assert (counts.notified, counts.installed, counts.succeeded) == (1, 1, 1)
    await pg_storage.releases.apply_release(spec(d2))
    await pg_reporter.report_delivery(device=device, release="ns/t", version=2, state="installed")
    await pg_reporter.report_delivery(device=device, release="ns/t", version=1, state="failed")  # stale: ignored
    [counts] = await pg_storage.releases.release_counts(["ns/t"])
    assert (counts.version, counts.installed, counts.failed, counts.succeeded) == (2, 1, 0, 0)
    with pytest.raises(errors.FailedPrecondition):
        await pg_reporter.report_delivery(device=device, release="ns/t", version=3, state="installed")
    with pytest.raises(errors.InvalidArgument):
        await pg_reporter.report_delivery(device=device, release="ns/t", version=2, state="bogus")


# ---------------------------------------------------------------- results


async def test_results_are_idempotent_and_checked(pg_storage, database_url):
    d1 = await put_manifest(pg_storage, content=b"one\n")
    await pg_storage.devices.enroll_device(device_id="a", info=info(os="android"))
    await pg_storage.devices.enroll_device(device_id="i", info=info(os="ios"))
    by_id = {dev.device_id: dev for dev in await pg_storage.devices.active_devices()}
    await pg_storage.releases.apply_release(spec(d1, target={"matchLabels": {"os": "android"}}))

    first = await pg_storage.results.insert_result(device=by_id["a"], record=result())
    again = await pg_storage.results.insert_result(device=by_id["a"], record=result(samples=99))
    assert (first.duplicate, again.duplicate) == (False, True)
    assert (again.release, again.version) == ("ns/t", 1)

    before = snapshot(database_url)
    with pytest.raises(errors.NotFound):
        await pg_storage.results.insert_result(device=by_id["a"], record=result(release="ns/other", key="k2"))
    with pytest.raises(errors.PermissionDenied):
        await pg_storage.results.insert_result(device=by_id["i"], record=result(key="k2"))
    with pytest.raises(errors.FailedPrecondition):
        await pg_storage.results.insert_result(device=by_id["a"], record=result(version=2, key="k2"))
    assert snapshot(database_url) == before

    # After a new version, results for the previous one are still welcome; older ones are not.
    d2 = await put_manifest(pg_storage, content=b"two\n")
    d3 = await put_manifest(pg_storage, content=b"three\n")
    await pg_storage.releases.apply_release(spec(d2, target={"matchLabels": {"os": "android"}}))
    assert not (await pg_storage.results.insert_result(device=by_id["a"], record=result(version=1, key="k3"))).duplicate
    await pg_storage.releases.apply_release(spec(d3, target={"matchLabels": {"os": "android"}}))
    with pytest.raises(errors.FailedPrecondition):
        await pg_storage.results.insert_result(device=by_id["a"], record=result(version=1, key="k4"))
    # A replay is still recognised after the release moved on.
    assert (await pg_storage.results.insert_result(device=by_id["a"], record=result(version=1))).duplicate
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT idempotency_key, sample_count FROM results ORDER BY id").fetchall()
    assert rows == [("k1", 5), ("k3", 5)]


async def test_release_counts(pg_storage, pg_reporter, database_url):
    d = await put_manifest(pg_storage)
    for i, os_ in enumerate(["android", "android", "ios"]):
        await pg_storage.devices.enroll_device(device_id=f"d{i}", info=info(os=os_))
    await pg_storage.releases.apply_release(spec(d, target={"matchLabels": {"os": "android"}}))
    by_id = {dev.device_id: dev for dev in await pg_storage.devices.active_devices()}
    await pg_storage.releases.mark_notified(release="ns/t", version=1, device_ids=["d0", "d1"])
    await pg_reporter.report_delivery(device=by_id["d0"], release="ns/t", version=1, state="running")
    await pg_reporter.report_delivery(device=by_id["d1"], release="ns/t", version=1, state="refused")
    await pg_storage.results.insert_result(device=by_id["d0"], record=result())
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO aggregates (release, version, round, result_count, through_id, body)"
            " VALUES ('ns/t', 1, 3, 1, 1, '{\"results\": 1}')"
        )
    [c] = await pg_storage.releases.release_counts(["ns/t"])
    assert (c.targeted, c.notified, c.installed, c.refused, c.results) == (2, 2, 1, 1, 1)
    assert json.loads(c.aggregate_json) == {"results": 1}
    assert c.aggregate_round == 3
    assert [x.release for x in await pg_storage.releases.release_counts()] == ["ns/t"]
    with pytest.raises(errors.NotFound):
        await pg_storage.releases.release_counts(["ns/missing"])
