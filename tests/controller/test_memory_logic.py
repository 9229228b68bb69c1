"""Controller logic that has no SQL, on the memory storage: no Postgres started for any test here.

The "may read" decisions and their cache, group-committed reports, the per-report batch rules, and the
device and admin services behind the edge interceptor (authentication, status codes, `tether-error`
trailers) all run over `storage.memory`, which the contract suite holds to the Postgres behaviour.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
from collections.abc import AsyncIterator

import grpc
import pytest
from controller_helpers import enroll, make_bundle
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN

from tether.common import auth, credentials, errors, manifest
from tether.common.admin_client import AdminClient
from tether.controller import (
    admin_service,
    blobs,
    blobstores,
    deliveries,
    delivery_reports,
    device_auth,
    device_service,
    devices,
    edge,
    fanout,
    hub,
    release_cache,
    releases,
    serving,
    stats,
)
from tether.controller.storage import contracts, memory, memory_tables
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc
from tether.spec import selectors


def _device(device_id: str = "d1", **attributes: str) -> devices.Device:
    return devices.Device(device_id=device_id, attributes=attributes, backends=("mnn/cpu",))


async def _apply(storage: contracts.Storage, cache: release_cache.ReleaseCache, *, target, paused=False):
    content = b"print(1)\n"
    d = "sha256:" + hashlib.sha256(content).hexdigest()
    await storage.bundles.put_blob(digest=d, size=len(content))
    m = manifest.Manifest(name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", d, len(content)),))
    digest = await storage.bundles.put_manifest(body=m.canonical_bytes())
    spec = releases.parse_spec(
        release="ns/t",
        generation=1,
        manifest_digest=digest,
        target_json=json.dumps(target),
        trigger_json="",
        aggregation_json="{}",
        paused=paused,
    )
    return await cache.apply_release(spec)


# ---------------------------------------------------------------- who may read what


async def test_the_release_cache_decides_from_memory_and_forgets_on_change() -> None:
    storage = memory.memory_storage()
    cache = release_cache.ReleaseCache(storage.releases)
    android = _device(os="android")
    await _apply(storage, cache, target={"matchLabels": {"os": "android"}})
    assert (await cache.release_for_device(android, "ns/t")).name == "ns/t"
    with pytest.raises(errors.PermissionDenied):
        await cache.release_for_device(_device(os="ios"), "ns/t")
    with pytest.raises(errors.NotFound):
        await cache.release_for_device(android, "ns/none")
    with pytest.raises(errors.NotFound):
        await cache.release_for_device(android, "NOT A NAME")
    await _apply(storage, cache, target={"matchLabels": {"os": "ios"}})  # a retarget here is seen at once
    with pytest.raises(errors.PermissionDenied):
        await cache.release_for_device(android, "ns/t")


async def test_another_replica_keeps_its_answer_until_told() -> None:
    tables = memory_tables.Tables()
    here = memory.memory_storage(tables)
    cache = release_cache.ReleaseCache(here.releases)
    other = release_cache.ReleaseCache(memory.memory_storage(tables).releases)
    android = _device(os="android")
    await _apply(here, cache, target={"matchLabels": {"os": "android"}})
    assert await other.release_for_device(android, "ns/t")
    await _apply(here, cache, target={"matchLabels": {"os": "ios"}})
    assert await other.release_for_device(android, "ns/t")  # kept (< 2 s)
    other.releases_changed()
    with pytest.raises(errors.PermissionDenied):
        await other.release_for_device(android, "ns/t")


async def test_a_paused_release_is_read_only_by_devices_that_have_it() -> None:
    storage = memory.memory_storage()
    cache = release_cache.ReleaseCache(storage.releases)
    for device_id in ("old", "new"):
        await storage.devices.enroll_device(device_id=device_id, info=devices.validate_info(attributes={}, backends=[]))
    await _apply(storage, cache, target={})
    await storage.releases.mark_notified(release="ns/t", version=1, device_ids=["old"])
    await _apply(storage, cache, target={}, paused=True)
    assert await cache.release_for_device(_device("old"), "ns/t")
    decided = await cache.access(_device("new"), "ns/t")
    assert decided.verdict is serving.Verdict.NOT_SERVED and decided.release is None


def test_access_decisions_are_values() -> None:
    rel = releases.Release(
        spec=releases.parse_spec(
            release="ns/t",
            generation=1,
            manifest_digest="sha256:" + "1" * 64,
            target_json='{"matchLabels": {"os": "android"}}',
            trigger_json="",
            aggregation_json="",
            paused=False,
        ),
        version=1,
        target=selectors.parse_target({"matchLabels": {"os": "android"}}),
    )
    assert serving.decided_by_release(rel)
    assert serving.access_by_release(rel, _device(os="android").facts).readable
    assert serving.access_by_release(rel, _device(os="ios").facts) == serving.NOT_SERVED
    assert serving.access_by_release(None, _device().facts) == serving.UNKNOWN
    assert serving.access(None, _device().facts) == serving.UNKNOWN
    assert serving.access(serving.ReleaseView(release=rel), _device(os="android").facts).release == rel
    assert serving.blobs_outside({"a", "b"}, ["a", "c", "d"]) == ["c", "d"]


# ---------------------------------------------------------------- reports, group-committed


async def test_a_burst_of_reports_is_batched_and_a_refused_one_fails_alone() -> None:
    storage = memory.memory_storage()
    cache = release_cache.ReleaseCache(storage.releases)
    for i in range(100):
        await storage.devices.enroll_device(
            device_id=f"d{i:03d}", info=devices.validate_info(attributes={"os": "android"}, backends=[])
        )
    await _apply(storage, cache, target={"matchLabels": {"os": "android"}})
    fleet = await storage.devices.active_devices()
    reporter = delivery_reports.DeliveryReporter(storage.releases)
    outcomes = await asyncio.gather(
        *(reporter.report_delivery(device=d, release="ns/t", version=1, state="installed") for d in fleet),
        reporter.report_delivery(device=_device("x", os="ios"), release="ns/t", version=1, state="installed"),
        return_exceptions=True,
    )
    assert outcomes[:100] == [None] * 100 and isinstance(outcomes[100], errors.PermissionDenied)
    assert reporter.batches.batches < 50
    [counts] = await storage.releases.release_counts(["ns/t"])
    assert counts.installed == 100
    with pytest.raises(errors.InvalidArgument):
        await reporter.report_delivery(device=fleet[0], release="ns/t", version=1, state="bogus")


def test_reports_of_one_device_go_to_successive_rounds_in_order() -> None:
    rel = releases.Release(
        spec=releases.parse_spec(
            release="ns/t",
            generation=1,
            manifest_digest="sha256:" + "1" * 64,
            target_json="",
            trigger_json="",
            aggregation_json="",
            paused=False,
        ),
        version=2,
    )
    a, b = _device("a"), _device("b")
    reports = [
        deliveries.DeliveryReport(device=d, release="ns/t", version=v, state=s, message="", device_state={})
        for d, v, s in [(a, 1, "downloading"), (b, 2, "installed"), (a, 1, "installed"), (a, 3, "installed")]
    ]
    plan = deliveries.plan_batch(reports, rels={"ns/t": rel}, delivered=set())
    assert [o is None for o in plan.outcomes] == [True, True, True, False]
    assert [[(r.device_id, r.state) for r in batch] for batch in plan.rounds] == [
        [("a", "downloading"), ("b", "installed")],
        [("a", "installed")],
    ]
    assert deliveries.notified_moves(stored_version=2, version=1, downgrade=True)
    assert not deliveries.notified_moves(stored_version=2, version=2, downgrade=False)
    assert deliveries.report_moves(stored_version=2, version=2, downgrade=False)
    assert not deliveries.result_moves(stored_version=2, stored_state="failed", version=2)


# ---------------------------------------------------------------- the services behind the edge, no database


@pytest.fixture()
async def memory_controller(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    """Device and admin services over a memory storage behind the edge interceptor, on a loopback port."""
    storage = memory.memory_storage()
    releases_ = release_cache.ReleaseCache(storage.releases)
    hub_ = hub.Hub()
    blob_store = blobstores.LocalBackend(blobs.FilesystemBlobStore(tmp_path / "blobs"))
    manifests = fanout.ManifestCache(bundles=storage.bundles, blob_store=blob_store)
    authenticator = device_auth.DeviceAuthenticator(
        registry=storage.devices, signer=credentials.Signer([credentials.new_key()])
    )
    fan_out = fanout.FanOut(hub_=hub_, storage=storage, manifests=manifests, authenticator=authenticator)

    class Enqueued:
        async def enqueue(self, *, release: str, version: int) -> None:
            return None

    server = grpc.aio.server(interceptors=[edge.Edge(authenticator=authenticator, admin_token=ADMIN_TOKEN)])
    counters = stats.RpcCounters()
    counters.add_servicer(
        pb_grpc.add_DeviceServiceServicer_to_server,
        device_service.DeviceService(
            storage=storage,
            releases=releases_,
            reporter=delivery_reports.DeliveryReporter(storage.releases),
            blob_store=blob_store,
            hub_=hub_,
            enqueuer=Enqueued(),
            manifests=manifests,
            authenticator=authenticator,
            bootstrap_token=BOOTSTRAP_TOKEN,
        ),
        server,
    )
    counters.add_servicer(
        pb_grpc.add_AdminServiceServicer_to_server,
        admin_service.AdminService(
            storage=storage, releases_=releases_, blob_store=blob_store, hub_=hub_, fan_out=fan_out
        ),
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_services_run_over_memory_behind_the_edge(memory_controller: str, tmp_path: pathlib.Path) -> None:
    async with (
        AdminClient(target=memory_controller, token=ADMIN_TOKEN) as admin,
        grpc.aio.insecure_channel(memory_controller) as channel,
    ):
        stub = pb_grpc.DeviceServiceStub(channel)
        directory, bundle = make_bundle(tmp_path / "bundle", files={"task.py": b"print(1)\n"})
        upload = await admin.upload_bundle(directory, bundle)
        await admin.apply_release(
            release="ns/t", manifest_digest=upload.digest, generation=1, target={"matchLabels": {"os": "android"}}
        )
        android = await enroll(stub, "phone", {"os": "android"})
        ios = await enroll(stub, "other", {"os": "ios"})
        sync = await stub.GetDesired(pb.GetDesiredRequest(), metadata=android)
        assert [t.release for t in sync.desired] == ["ns/t"]
        got = await stub.GetManifest(
            pb.GetManifestRequest(release="ns/t", manifest_digest=upload.digest), metadata=android
        )
        assert got.manifest

        with pytest.raises(grpc.aio.AioRpcError) as refused:  # mapped once, at the edge, with the trailer
            await stub.GetManifest(pb.GetManifestRequest(release="ns/t", manifest_digest=upload.digest), metadata=ios)
        assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
        trailer = dict(refused.value.trailing_metadata() or ())
        assert trailer.get(auth.ERROR_TYPE_METADATA) == "PermissionDenied"

        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await stub.GetDesired(pb.GetDesiredRequest())
        assert anonymous.value.code() is grpc.StatusCode.UNAUTHENTICATED

        async with AdminClient(target=memory_controller, token="wrong") as intruder:
            with pytest.raises(errors.Unauthenticated, match="invalid admin token"):
                await intruder.list_releases()
        [status] = await admin.list_releases()
        assert (status.release, status.targeted, status.notified) == ("ns/t", 1, 1)


def test_no_device_outside_an_authenticated_call() -> None:
    with pytest.raises(errors.Unauthenticated):
        edge.current_device()
