"""One contract, two storages: every MUST of `tether.controller.storage.contracts`, against memory and Postgres.

A test here runs once per implementation (the `storage` fixture is parametrized), so the memory storage the
logic tests use cannot drift from the Postgres one production runs on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from tether.common import auth, errors, manifest
from tether.controller import deliveries, devices, releases, uploads
from tether.controller.storage import contracts


def info(**attributes: str) -> devices.DeviceInfo:
    return devices.validate_info(attributes=attributes, backends=["mnn/cpu"])


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bundle(content: bytes = b"print(1)\n") -> bytes:
    return manifest.Manifest(
        name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", digest_of(content), len(content)),)
    ).canonical_bytes()


async def stored_manifest(storage: contracts.Storage, content: bytes = b"print(1)\n") -> str:
    await storage.bundles.put_blob(digest=digest_of(content), size=len(content))
    return await storage.bundles.put_manifest(body=bundle(content))


def spec(digest: str, *, release: str = "ns/t", target=None, paused=False, generation=1, rollout=None, federated=None):
    return releases.parse_spec(
        release=release,
        generation=generation,
        manifest_digest=digest,
        target_json=json.dumps(target or {}),
        trigger_json="",
        aggregation_json="{}",
        paused=paused,
        rollout_json=json.dumps(rollout) if rollout else "",
        federated_json=json.dumps(federated) if federated else "",
    )


def report(device: devices.Device, *, version: int = 1, state: str = "installed", release: str = "ns/t"):
    return deliveries.DeliveryReport(
        device=device, release=release, version=version, state=state, message="", device_state={}
    )


def result(*, version: int = 1, key: str = "k1", release: str = "ns/t") -> uploads.ResultRecord:
    return uploads.validate_result(
        release=release,
        version=version,
        idempotency_key=key,
        sample_count=3,
        metrics={"acc": 0.5},
        counts={},
        tensors=[],
        duration_s=0.1,
    )


async def fleet(storage: contracts.Storage, **by_id: str) -> dict[str, devices.Device]:
    for device_id, os_ in by_id.items():
        await storage.devices.enroll_device(device_id=device_id, info=info(os=os_))
    return {d.device_id: d for d in await storage.devices.active_devices()}


# ---------------------------------------------------------------- devices and credentials


async def test_enrolment_authentication_rotation_and_revocation(storage: contracts.Storage) -> None:
    first = await storage.devices.enroll_device(device_id="d1", info=info(os="android"))
    second = await storage.devices.enroll_device(device_id="d1", info=info(os="ios"))
    with pytest.raises(errors.Unauthenticated, match="unknown device or wrong credential"):
        await storage.devices.authenticate_device(first)
    assert (await storage.devices.authenticate_device(second)).attributes == {"os": "ios"}
    with pytest.raises(errors.Unauthenticated, match="unknown device or wrong credential"):
        await storage.devices.authenticate_device(auth.Credential(device_id="ghost", secret=second.secret))
    rotated = await storage.devices.rotate_credential("d1")
    with pytest.raises(errors.Unauthenticated):
        await storage.devices.authenticate_device(second)
    assert (await storage.devices.authenticate_device(rotated)).device_id == "d1"
    assert await storage.devices.not_live(["d1", "ghost"]) == {"ghost"}
    assert await storage.devices.revoke_device("d1") is True
    assert await storage.devices.revoke_device("d1") is False
    with pytest.raises(errors.NotFound):
        await storage.devices.revoke_device("ghost")
    with pytest.raises(errors.Unauthenticated, match="d1 is revoked"):
        await storage.devices.authenticate_device(rotated)
    with pytest.raises(errors.PermissionDenied):
        await storage.devices.enroll_device(device_id="d1", info=info())
    with pytest.raises(errors.Unauthenticated):
        await storage.devices.rotate_credential("d1")
    assert await storage.devices.not_live(["d1"]) == {"d1"}
    assert await storage.devices.active_devices() == []
    revoked = await storage.devices.device("d1")
    assert revoked is not None and revoked.revoked
    assert await storage.devices.device("ghost") is None


async def test_backend_choices_and_the_shared_secret(storage: contracts.Storage) -> None:
    await fleet(storage, b="android", a="ios")
    choice = devices.BackendChoice(model_key="sha256:" + "a" * 64, candidate="mnn/cpu/t4/fp32", latency_ms=3.0)
    await storage.devices.set_backend_choices(device_id="a", choices=[choice], fingerprint="f", backends=["mnn/cpu"])
    await storage.devices.touch_device("a")
    [a, b] = await storage.devices.active_devices()  # ordered by id
    assert (a.device_id, b.device_id) == ("a", "b")
    assert a.backend_choices == (choice,) and b.backend_choices == ()
    calls = []

    def generate() -> bytes:
        calls.append(1)
        return bytes([len(calls)]) * 32

    first = await storage.devices.controller_secret("k", generate=generate)
    assert await storage.devices.controller_secret("k", generate=generate) == first


# ---------------------------------------------------------------- bundles


async def test_manifests_need_their_blobs_and_keep_their_address(storage: contracts.Storage) -> None:
    content = b"print(1)\n"
    with pytest.raises(errors.FailedPrecondition):
        await storage.bundles.put_manifest(body=bundle(content))
    await storage.bundles.put_blob(digest=digest_of(content), size=len(content) + 1)
    with pytest.raises(errors.InvalidManifest, match="claims"):
        await storage.bundles.put_manifest(body=bundle(content))
    assert await storage.bundles.blob_sizes([digest_of(content), digest_of(b"x")]) == {
        digest_of(content): len(content) + 1
    }
    other = b"two\n"
    await storage.bundles.put_blob(digest=digest_of(other), size=len(other))
    await storage.bundles.put_blob(digest=digest_of(other), size=999)  # the first record stays
    assert await storage.bundles.blob_sizes([digest_of(other)]) == {digest_of(other): len(other)}
    digest = await storage.bundles.put_manifest(body=bundle(other), signature=b"sig", key_id="k1")
    assert digest == manifest.sha256_digest(bundle(other))
    await storage.bundles.put_manifest(body=bundle(other))  # unsigned again: keeps the signature
    kept = await storage.bundles.get_manifest(digest)
    assert kept is not None and (kept.signature, kept.key_id, kept.body) == (b"sig", "k1", bundle(other))
    await storage.bundles.put_manifest(body=bundle(other), signature=b"new", key_id="k2")  # re-signed
    resigned = await storage.bundles.get_manifest(digest)
    assert resigned is not None and (resigned.signature, resigned.key_id) == (b"new", "k2")
    assert await storage.bundles.get_manifest(digest_of(b"nothing")) is None


# ---------------------------------------------------------------- releases and deliveries


async def test_apply_bumps_only_on_content_and_revives_deleted(storage: contracts.Storage) -> None:
    with pytest.raises(errors.FailedPrecondition, match="upload the bundle first"):
        await storage.releases.apply_release(spec("sha256:" + "0" * 64))
    assert await storage.releases.list_releases() == []
    d1 = await stored_manifest(storage, b"one\n")
    d2 = await stored_manifest(storage, b"two\n")
    first = await storage.releases.apply_release(spec(d1))
    assert (first.release.version, first.changed, first.previous) == (1, True, None)
    same = await storage.releases.apply_release(spec(d1))
    assert (same.release.version, same.changed) == (1, False)
    paused = await storage.releases.apply_release(spec(d1, paused=True, generation=2))
    assert (paused.release.version, paused.changed, paused.release.paused) == (1, False, True)
    bumped = await storage.releases.apply_release(spec(d2))
    assert (bumped.release.version, bumped.changed) == (2, True)
    assert bumped.previous is not None and bumped.previous.manifest_digest == d1
    deleted = await storage.releases.delete_release("ns/t")
    assert deleted is not None and deleted.version == 2
    assert await storage.releases.delete_release("ns/t") is None
    assert await storage.releases.get_release("ns/t") is None
    revived = await storage.releases.apply_release(spec(d2))
    assert (revived.release.version, revived.changed) == (3, True)
    assert [r.name for r in await storage.releases.list_releases()] == ["ns/t"]


async def test_spec_federated_is_stored_with_the_release(storage: contracts.Storage) -> None:
    d = await stored_manifest(storage)
    fed = {"rounds": 2, "participants": {"count": 1}, "updateEncoding": "float16"}
    first = await storage.releases.apply_release(spec(d, federated=fed))
    assert first.release.spec.federated == fed
    stored = await storage.releases.get_release("ns/t")
    assert stored is not None and stored.spec.federated == fed and stored.spec.rules() is not None
    same = await storage.releases.apply_release(spec(d, federated=fed))
    assert not same.changed and same.release.version == first.release.version
    other = await storage.releases.apply_release(spec(d, federated={**fed, "rounds": 3}))
    assert other.changed and other.release.version == first.release.version + 1


async def test_a_federated_release_keeps_its_round_manifest_when_the_operator_reapplies_the_base(
    storage: contracts.Storage,
) -> None:
    base = await stored_manifest(storage, b"base\n")
    round_1 = await stored_manifest(storage, b"round one\n")
    fed = {"rounds": 2, "participants": {"count": 1}}
    first = await storage.releases.apply_release(spec(base, federated=fed))
    assert first.release.spec.base_manifest == base and first.release.manifest_digest == base
    driver = dataclasses.replace(first.release.spec, manifest_digest=round_1)  # the controller's own apply
    advanced = await storage.releases.apply_release(driver)
    assert advanced.changed and advanced.release.version == 2 and advanced.release.manifest_digest == round_1
    again = await storage.releases.apply_release(spec(base, federated=fed, generation=2))  # the operator, unchanged
    assert not again.changed and again.release.version == 2 and again.release.manifest_digest == round_1
    stored = await storage.releases.get_release("ns/t")
    assert stored is not None and stored.manifest_digest == round_1 and stored.spec.base_manifest == base
    new_base = await stored_manifest(storage, b"new base\n")
    fresh = await storage.releases.apply_release(spec(new_base, federated=fed))
    assert fresh.changed and fresh.release.manifest_digest == new_base and fresh.release.spec.base_manifest == new_base
    plain = await storage.releases.apply_release(spec(base))  # no longer federated: the base is all there is
    assert plain.release.manifest_digest == base and plain.release.spec.base_manifest == ""


async def test_desired_state_follows_targets_pause_and_notifications(storage: contracts.Storage) -> None:
    d = await stored_manifest(storage)
    by_id = await fleet(storage, a="android", i="ios")
    await storage.releases.apply_release(spec(d, release="ns/all"))
    await storage.releases.apply_release(spec(d, release="ns/android", target={"matchLabels": {"os": "android"}}))
    await storage.releases.apply_release(spec(d, release="ns/paused", paused=True))
    assert [t.release for t in await storage.releases.desired_tasks(by_id["a"])] == ["ns/all", "ns/android"]
    assert [t.release for t in await storage.releases.desired_tasks(by_id["i"])] == ["ns/all"]
    await storage.releases.mark_notified(release="ns/paused", version=1, device_ids=["i"])
    assert [t.release for t in await storage.releases.desired_tasks(by_id["i"])] == ["ns/all", "ns/paused"]
    [view] = await storage.releases.release_views("i", release="ns/paused")
    assert view.has_delivery and view.delivered_version == 1 and view.delivered
    assert await storage.releases.release_views("i", release="ns/none") == []
    assert [v.release.name for v in await storage.releases.release_views("a")] == ["ns/all", "ns/android", "ns/paused"]


async def test_deliveries_never_move_backwards_and_reports_are_refused_alone(storage: contracts.Storage) -> None:
    d1 = await stored_manifest(storage, b"one\n")
    d2 = await stored_manifest(storage, b"two\n")
    by_id = await fleet(storage, a="android", i="ios")
    await storage.releases.apply_release(spec(d1, target={"matchLabels": {"os": "android"}}))
    outcomes = await storage.releases.write_reports(
        [
            report(by_id["a"], state="downloading"),
            report(by_id["a"], state="succeeded"),  # same device, same batch: applied in order
            report(by_id["i"]),  # not targeted
            report(by_id["a"], release="ns/none"),
            report(by_id["a"], version=5),
        ]
    )
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], errors.PermissionDenied)
    assert isinstance(outcomes[3], errors.NotFound)
    assert isinstance(outcomes[4], errors.FailedPrecondition)
    await storage.releases.mark_notified(release="ns/t", version=1, device_ids=["a"])  # same version: kept
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert (counts.targeted, counts.notified, counts.installed, counts.succeeded) == (1, 1, 1, 1)
    await storage.releases.apply_release(spec(d2, target={"matchLabels": {"os": "android"}}))
    assert await storage.releases.write_reports([report(by_id["a"], version=2, state="failed")]) == [None]
    assert await storage.releases.write_reports([report(by_id["a"], version=1, state="succeeded")]) == [None]  # stale
    [counts] = await storage.releases.release_counts()
    assert (counts.version, counts.notified, counts.failed, counts.succeeded) == (2, 1, 1, 0)
    await storage.releases.mark_synced(
        device_id="a", tasks=[*await storage.releases.desired_tasks(by_id["a"])]
    )  # version 2 already: nothing moves
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert counts.failed == 1
    with pytest.raises(errors.NotFound):
        await storage.releases.release_counts(["ns/none"])


async def test_a_staged_release_fixes_its_first_stage_over_the_targeted_fleet(storage: contracts.Storage) -> None:
    d = await stored_manifest(storage)
    await fleet(storage, **{f"d{i:02d}": "android" for i in range(20)})
    rollout = {"version": 1, "salt": "ns/t", "stage": 0, "action": "progress", "stages": [{"percent": 10}]}
    applied = await storage.releases.apply_release(spec(d, rollout=rollout))
    state = applied.release.rollout_state
    assert state.version == 1 and set(state.stages) == {0}
    stored = await storage.releases.get_release("ns/t")
    assert stored is not None and stored.rollout_state == state
    served = [t for dev in await storage.devices.active_devices() for t in await storage.releases.desired_tasks(dev)]
    assert len(served) == 2  # 10 % of 20, by rank
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert json.loads(counts.health_json)["stages"][0]["eligible"] == 2


# ---------------------------------------------------------------- results


async def test_results_are_stored_once_checked_and_mark_success(storage: contracts.Storage) -> None:
    d = await stored_manifest(storage)
    by_id = await fleet(storage, a="android", i="ios")
    await storage.releases.apply_release(spec(d, target={"matchLabels": {"os": "android"}}))
    first = await storage.results.insert_result(device=by_id["a"], record=result())
    assert (first.duplicate, first.release, first.version) == (False, "ns/t", 1)
    assert (await storage.results.insert_result(device=by_id["a"], record=result())).duplicate
    with pytest.raises(errors.NotFound):
        await storage.results.insert_result(device=by_id["a"], record=result(release="ns/none", key="k2"))
    with pytest.raises(errors.PermissionDenied):
        await storage.results.insert_result(device=by_id["i"], record=result(key="k2"))
    with pytest.raises(errors.FailedPrecondition):
        await storage.results.insert_result(device=by_id["a"], record=result(version=3, key="k2"))
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert (counts.results, counts.succeeded, counts.installed) == (1, 1, 1)
    await storage.releases.delete_release("ns/t")
    assert (await storage.results.insert_result(device=by_id["a"], record=result())).duplicate  # replay first


async def test_a_device_holding_its_served_version_confirms_only_unconfirmed_deliveries(
    storage: contracts.Storage,
) -> None:
    d1 = await stored_manifest(storage, b"one\n")
    by_id = await fleet(storage, a="android", b="android", c="android")
    await storage.releases.apply_release(spec(d1))
    await storage.releases.mark_notified(release="ns/t", version=1, device_ids=["a", "b", "c"])
    assert await storage.releases.write_reports([report(by_id["b"], state="downloading")]) == [None]
    assert await storage.releases.write_reports([report(by_id["c"], state="failed")]) == [None]
    for device_id in ("a", "b", "c"):  # twice: idempotent
        for _ in range(2):
            await storage.releases.confirm_installed(device_id=device_id, installs=[("ns/t", 1), ("ns/none", 1)])
    assert await storage.releases.confirm_installed(device_id="a", installs=[("ns/t", 2)]) == 0
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert (counts.installed, counts.failed) == (2, 1)  # a and b confirmed; c's failure stands


async def test_the_inventory_pages_by_device_id_with_last_seen_and_deliveries(storage: contracts.Storage) -> None:
    digest = await stored_manifest(storage, b"inventory\n")
    by_id = await fleet(storage, c="android", a="android", b="ios", d="ios")
    await storage.releases.apply_release(spec(digest, target={"matchLabels": {"os": "android"}}))
    assert await storage.releases.write_reports([report(by_id["a"], state="succeeded")]) == [None]
    await storage.devices.revoke_device("d")

    first = await storage.devices.list_devices(limit=2)
    assert [e.device.device_id for e in first] == ["a", "b"]
    assert first[0].device.attributes == {"os": "android"}
    assert first[0].releases == (devices.DeviceRelease(release="ns/t", version=1, state="succeeded"),)
    assert first[1].releases == () and first[0].last_seen is not None and first[0].last_seen > 0
    rest = await storage.devices.list_devices(after="b", limit=2)
    assert [e.device.device_id for e in rest] == ["c"]  # d is revoked
    everything = await storage.devices.list_devices(after="b", limit=10, include_revoked=True)
    assert [(e.device.device_id, e.device.revoked) for e in everything] == [("c", False), ("d", True)]
    assert await storage.devices.list_devices(after="d", limit=10, include_revoked=True) == []
    assert await storage.devices.list_devices(limit=0) == []
