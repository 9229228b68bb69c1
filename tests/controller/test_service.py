"""The controller end to end over real gRPC sockets on loopback, with a real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json

import grpc
import numpy as np
import psycopg
import pytest
from controller_helpers import enroll, make_bundle, table_counts
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, running_controller, snapshot, start_controller

from tether.common import auth, errors, manifest
from tether.common.admin_client import AdminClient
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

ANDROID = {"matchLabels": {"os": "android"}}


async def next_event(stream, timeout: float = 5.0) -> pb.ServerEvent:
    return await asyncio.wait_for(stream.read(), timeout)


async def publish(admin_client, tmp_path, *, release="ns/task", target=None, files=None, name="demo-task"):
    directory, bundle = make_bundle(tmp_path / f"bundle-{len(list(tmp_path.iterdir()))}", name=name, files=files)
    upload = await admin_client.upload_bundle(directory, bundle)
    applied = await admin_client.apply_release(
        release=release, manifest_digest=upload.digest, generation=1, target=target or {}
    )
    return directory, bundle, applied


def upload_request(*, release="ns/task", version=1, key="run-1", **overrides):
    values = {
        "release": release,
        "version": version,
        "idempotency_key": key,
        "sample_count": 8,
        "metrics": {"accuracy": 0.75},
        "counts": {"clicks": 2},
        "tensors": [pb.Tensor(name="w", shape=[2], data=np.array([0.5, 1.5], dtype="<f8").tobytes())],
        "duration_s": 0.2,
    }
    values.update(overrides)
    return pb.UploadResultRequest(**values)


async def rpc_error(awaitable) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value


# ---------------------------------------------------------------- push then pull


async def test_enroll_subscribe_sync_then_notify_on_apply(admin_client, devices_stub, tmp_path, database_url):
    md = await enroll(devices_stub, "phone-1", {"os": "android"})
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    first = await next_event(stream)
    assert first.WhichOneof("event") == "sync"
    assert list(first.sync.desired) == []

    _, bundle, applied = await publish(admin_client, tmp_path, target=ANDROID)
    assert (applied.version, applied.changed) == (1, True)
    event = await next_event(stream)
    assert event.notify.task == pb.DesiredTask(release="ns/task", version=1, manifest_digest=bundle.digest)
    stream.cancel()

    # A device connecting later catches up through its opening Sync.
    md2 = await enroll(devices_stub, "phone-2", {"os": "android"})
    late = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md2)
    sync = (await next_event(late)).sync
    assert [(t.release, t.version, t.manifest_digest) for t in sync.desired] == [("ns/task", 1, bundle.digest)]
    late.cancel()

    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, version, state FROM deliveries ORDER BY device_id").fetchall()
    assert rows == [("phone-1", 1, "notified"), ("phone-2", 1, "notified")]


async def test_sync_and_notify_carry_the_trigger_and_resources(admin_client, devices_stub, tmp_path):
    md = await enroll(devices_stub, "phone-1", {"os": "android"})
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    assert list((await next_event(stream)).sync.desired) == []

    directory, bundle = make_bundle(tmp_path / "b")
    await admin_client.upload_bundle(directory, bundle)
    interval = {"type": "interval", "seconds": 30}
    limits = {"timeoutSeconds": 20, "memoryMB": 128}

    async def apply(**policy):
        return await admin_client.apply_release(
            release="ns/task", manifest_digest=bundle.digest, target=ANDROID, trigger=interval, **policy
        )

    assert (await apply(resources=limits)).version == 1
    task = (await next_event(stream)).notify.task
    assert (task.release, task.version, task.manifest_digest) == ("ns/task", 1, bundle.digest)
    assert json.loads(task.trigger_json) == interval
    assert json.loads(task.resources_json) == limits

    # A change of the limits alone is a new version, pushed with the new limits.
    tighter = {**limits, "cpuSeconds": 5}
    applied = await apply(resources=tighter)
    assert (applied.version, applied.changed) == (2, True)
    task = (await next_event(stream)).notify.task
    assert task.version == 2 and json.loads(task.resources_json) == tighter
    assert json.loads(task.trigger_json) == interval
    # The same limits again: nothing new.
    assert (await apply(resources=tighter)).changed is False
    with pytest.raises(asyncio.TimeoutError):
        await next_event(stream, timeout=0.3)
    stream.cancel()

    # A device that (re)connects gets the same documents in its opening Sync.
    again = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    (synced,) = (await next_event(again)).sync.desired
    assert synced == task
    again.cancel()

    # No policy: empty documents (the agent's defaults), on the wire as in Sync.
    await admin_client.apply_release(release="ns/task", manifest_digest=bundle.digest, target=ANDROID)
    late = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    (plain,) = (await next_event(late)).sync.desired
    assert (plain.version, plain.trigger_json, plain.resources_json) == (3, "", "")
    late.cancel()


async def test_enroll_without_an_id_gets_one_and_reenrolment_rotates_the_credential(devices_stub):
    response = await devices_stub.Enroll(pb.EnrollRequest(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo()))
    assert response.device_id.startswith("dev-")
    assert response.credential.startswith(f"v1.{response.device_id}.")  # a signed credential
    old = auth.bearer_metadata(response.credential)
    new = await enroll(devices_stub, response.device_id)
    err = await rpc_error(next_event(devices_stub.Subscribe(pb.SubscribeRequest(), metadata=old)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=new)
    assert (await next_event(stream)).HasField("sync")
    stream.cancel()


async def test_untargeted_devices_hear_nothing_and_unchanged_apply_notifies_nobody(
    admin_client, devices_stub, tmp_path
):
    md_ios = await enroll(devices_stub, "ios-1", {"os": "ios"})
    md_and = await enroll(devices_stub, "and-1", {"os": "android"})
    ios = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md_ios)
    android = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md_and)
    await next_event(ios)
    await next_event(android)
    _, bundle, _ = await publish(admin_client, tmp_path, target=ANDROID)
    assert (await next_event(android)).notify.task.version == 1
    again = await admin_client.apply_release(
        release="ns/task", manifest_digest=bundle.digest, generation=2, target=ANDROID
    )
    assert (again.version, again.changed) == (1, False)
    with pytest.raises(asyncio.TimeoutError):
        await next_event(ios, timeout=0.3)
    with pytest.raises(asyncio.TimeoutError):
        await next_event(android, timeout=0.3)
    ios.cancel()
    android.cancel()


async def test_retarget_and_delete_push_revoke(admin_client, devices_stub, tmp_path):
    md = await enroll(devices_stub, "and-1", {"os": "android"})
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    await next_event(stream)
    _, bundle, _ = await publish(admin_client, tmp_path, target=ANDROID)
    assert (await next_event(stream)).notify.task.version == 1
    await admin_client.apply_release(
        release="ns/task", manifest_digest=bundle.digest, target={"matchLabels": {"os": "ios"}}
    )
    assert (await next_event(stream)).revoke.release == "ns/task"
    await admin_client.apply_release(release="ns/task", manifest_digest=bundle.digest, target=ANDROID)
    assert (await next_event(stream)).notify.task.version == 3
    assert await admin_client.delete_release("ns/task")
    assert (await next_event(stream)).revoke.release == "ns/task"
    assert not await admin_client.delete_release("ns/task")
    stream.cancel()


async def test_heartbeats_on_idle_streams(controller_config, enqueuer, tmp_path):
    cfg = dataclasses.replace(controller_config, heartbeat_s=0.1)
    async with (
        running_controller(cfg, enqueuer=enqueuer, grace=0.2) as running,
        grpc.aio.insecure_channel(running.address) as ch,
    ):
        stub = pb_grpc.DeviceServiceStub(ch)
        stream = stub.Subscribe(pb.SubscribeRequest(), metadata=await enroll(stub, "idle"))
        assert (await next_event(stream)).HasField("sync")
        beat = await next_event(stream, timeout=2)
        assert beat.heartbeat.server_time_ms > 0
        stream.cancel()


async def test_a_second_connection_supersedes_the_first(devices_stub):
    md = await enroll(devices_stub, "twice")
    old = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    await next_event(old)
    new = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    await next_event(new)
    err = await rpc_error(next_event(old))
    assert err.code() == grpc.StatusCode.ABORTED
    new.cancel()


async def test_get_manifest_and_pull_blobs_full_and_resumed(admin_client, devices_stub, tmp_path):
    md = await enroll(devices_stub, "puller", {"os": "android"})
    directory, bundle, _ = await publish(admin_client, tmp_path, target=ANDROID)

    got = await devices_stub.GetManifest(
        pb.GetManifestRequest(release="ns/task", manifest_digest=bundle.digest), metadata=md
    )
    assert manifest.sha256_digest(got.manifest) == bundle.digest
    assert manifest.Manifest.from_bytes(got.manifest) == bundle

    model = bundle.file("model.bin")
    data = (directory / "model.bin").read_bytes()
    chunks = [
        c async for c in devices_stub.PullBlob(pb.PullBlobRequest(release="ns/task", digest=model.sha256), metadata=md)
    ]
    assert b"".join(c.data for c in chunks) == data
    assert all(len(c.data) <= 256 * 1024 for c in chunks)
    assert [c.offset for c in chunks] == [i * 256 * 1024 for i in range(len(chunks))]
    assert {c.total_size for c in chunks} == {len(data)}

    for offset in (1, 256 * 1024, len(data) - 10):
        resumed = [
            c
            async for c in devices_stub.PullBlob(
                pb.PullBlobRequest(release="ns/task", digest=model.sha256, offset=offset), metadata=md
            )
        ]
        assert data[:offset] + b"".join(c.data for c in resumed) == data
        assert resumed[0].offset == offset
    at_end = [
        c
        async for c in devices_stub.PullBlob(
            pb.PullBlobRequest(release="ns/task", digest=model.sha256, offset=len(data)), metadata=md
        )
    ]
    assert [(c.offset, c.data, c.total_size) for c in at_end] == [(len(data), b"", len(data))]


async def test_devices_read_only_what_targets_them(admin_client, devices_stub, tmp_path):
    md_ios = await enroll(devices_stub, "ios-1", {"os": "ios"})
    md_and = await enroll(devices_stub, "and-1", {"os": "android"})
    _, bundle, _ = await publish(admin_client, tmp_path, target=ANDROID)
    blob = bundle.files[0].sha256

    err = await rpc_error(
        devices_stub.GetManifest(
            pb.GetManifestRequest(release="ns/task", manifest_digest=bundle.digest), metadata=md_ios
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(
        _drain(devices_stub.PullBlob(pb.PullBlobRequest(release="ns/task", digest=blob), metadata=md_ios))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(
        devices_stub.GetManifest(
            pb.GetManifestRequest(release="ns/nope", manifest_digest=bundle.digest), metadata=md_and
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = await rpc_error(
        devices_stub.GetManifest(
            pb.GetManifestRequest(release="ns/task", manifest_digest="sha256:" + "0" * 64), metadata=md_and
        )
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # A stored blob of another release is not readable through this one.
    _, other, _ = await publish(
        admin_client, tmp_path, release="ns/other", target={"matchLabels": {"os": "ios"}}, files={"task.py": b"other\n"}
    )
    err = await rpc_error(
        _drain(
            devices_stub.PullBlob(pb.PullBlobRequest(release="ns/task", digest=other.files[0].sha256), metadata=md_and)
        )
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    err = await rpc_error(
        _drain(devices_stub.PullBlob(pb.PullBlobRequest(release="ns/task", digest=blob, offset=10**9), metadata=md_and))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _drain(stream):
    return [m async for m in stream]


# ---------------------------------------------------------------- results and status


async def test_upload_result_is_idempotent_and_enqueued_after_commit(
    admin_client, devices_stub, tmp_path, enqueuer, database_url
):
    md = await enroll(devices_stub, "worker-1", {"os": "android"})
    await publish(admin_client, tmp_path, target=ANDROID)
    first = await devices_stub.UploadResult(upload_request(), metadata=md)
    replay = await devices_stub.UploadResult(upload_request(sample_count=999), metadata=md)
    assert (first.duplicate, replay.duplicate) == (False, True)
    assert enqueuer.calls == [("ns/task", 1), ("ns/task", 1)]
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, sample_count, metrics, counts, tensors FROM results").fetchall()
    [(device_id, samples, metrics, counts, tensors)] = rows
    assert (device_id, samples, metrics, counts) == ("worker-1", 8, {"accuracy": 0.75}, {"clicks": 2})
    assert tensors[0]["name"] == "w" and tensors[0]["shape"] == [2]
    status = await admin_client.get_release_status("ns/task")
    assert status.results == 1


async def test_enqueue_failure_is_retryable_and_loses_nothing(admin_client, devices_stub, tmp_path, enqueuer):
    md = await enroll(devices_stub, "worker-1", {"os": "android"})
    await publish(admin_client, tmp_path, target=ANDROID)
    enqueuer.fail = True
    err = await rpc_error(devices_stub.UploadResult(upload_request(), metadata=md))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    enqueuer.fail = False
    retry = await devices_stub.UploadResult(upload_request(), metadata=md)
    assert retry.duplicate
    assert enqueuer.calls == [("ns/task", 1)]


async def test_report_status_and_release_status(admin_client, devices_stub, tmp_path):
    md_a = await enroll(devices_stub, "a", {"os": "android"})
    md_b = await enroll(devices_stub, "b", {"os": "android"})
    await enroll(devices_stub, "c", {"os": "ios"})
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md_a)
    await next_event(stream)
    _, bundle, _ = await publish(admin_client, tmp_path, target=ANDROID)
    await next_event(stream)
    await devices_stub.ReportStatus(
        pb.ReportStatusRequest(release="ns/task", version=1, state=pb.DELIVERY_STATE_SUCCEEDED), metadata=md_a
    )
    await devices_stub.ReportStatus(
        pb.ReportStatusRequest(release="ns/task", version=1, state=pb.DELIVERY_STATE_REFUSED, message="bad sig"),
        metadata=md_b,
    )
    status = await admin_client.get_release_status("ns/task")
    assert (status.version, status.manifest_digest) == (1, bundle.digest)
    assert (status.targeted, status.notified, status.installed, status.succeeded, status.refused) == (2, 2, 1, 1, 1)
    assert status.connected_devices == 1
    assert status.aggregate is None
    assert status.aggregate_json == ""
    [listed] = await admin_client.list_releases()
    assert listed == status
    err = await rpc_error(
        devices_stub.ReportStatus(pb.ReportStatusRequest(release="ns/task", version=1), metadata=md_a)
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.NotFound):
        await admin_client.get_release_status("ns/missing")
    stream.cancel()


async def test_url_failures_ride_a_report_and_bad_ones_refuse_it_whole(
    controller, admin_client, devices_stub, tmp_path, database_url
):
    md = await enroll(devices_stub, "a", {"os": "android"})
    await publish(admin_client, tmp_path, target=ANDROID)

    def told(reason: str) -> float:
        assert controller.metrics is not None
        return (
            controller.metrics.registry.get_sample_value(
                "tether_controller_blob_url_failures_total", {"reason": reason}
            )
            or 0.0
        )

    ok = pb.ReportStatusRequest(
        release="ns/task", version=1, state=pb.DELIVERY_STATE_INSTALLED, url_failures={"expired": 2, "stalled": 0}
    )
    await devices_stub.ReportStatus(ok, metadata=md)
    assert (told("expired"), told("stalled")) == (2.0, 0.0)
    before = snapshot(database_url)
    for bad, words in [
        ({"expired": 1, "gremlins": 1}, "url_failures['gremlins']: not a reason"),
        ({"not_found": -1}, "url_failures[not_found]: -1 is outside"),
        ({"x" * 100_000: 1}, "url_failures["),
    ]:
        request = pb.ReportStatusRequest(
            release="ns/task", version=1, state=pb.DELIVERY_STATE_SUCCEEDED, url_failures=bad
        )
        err = await rpc_error(devices_stub.ReportStatus(request, metadata=md))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details()
        assert len(err.details()) < 2000  # the bad key is not echoed whole
    assert snapshot(database_url) == before  # nothing written: still installed, not succeeded
    assert told("expired") == 2.0


# ---------------------------------------------------------------- bad input changes nothing


async def test_bad_device_input_is_refused_and_changes_nothing(
    admin_client, devices_stub, tmp_path, database_url, enqueuer
):
    md = await enroll(devices_stub, "dev-1", {"os": "android"})
    md_ios = await enroll(devices_stub, "ios-1", {"os": "ios"})
    await publish(admin_client, tmp_path, target=ANDROID)
    before = snapshot(database_url)
    forged = auth.bearer_metadata(f"dev-1.{auth.new_secret()}")
    ghost = auth.bearer_metadata(f"ghost.{auth.new_secret()}")
    cases = [
        (devices_stub.UploadResult(upload_request(release="ns/unknown"), metadata=md), grpc.StatusCode.NOT_FOUND),
        (devices_stub.UploadResult(upload_request(version=7), metadata=md), grpc.StatusCode.FAILED_PRECONDITION),
        (devices_stub.UploadResult(upload_request(), metadata=md_ios), grpc.StatusCode.PERMISSION_DENIED),
        (devices_stub.UploadResult(upload_request(), metadata=forged), grpc.StatusCode.UNAUTHENTICATED),
        (devices_stub.UploadResult(upload_request(), metadata=ghost), grpc.StatusCode.UNAUTHENTICATED),
        (
            devices_stub.UploadResult(upload_request(), metadata=auth.bearer_metadata("garbage")),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (devices_stub.UploadResult(upload_request()), grpc.StatusCode.UNAUTHENTICATED),
        (
            devices_stub.UploadResult(upload_request(metrics={"loss": float("nan")}), metadata=md),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (devices_stub.UploadResult(upload_request(key=""), metadata=md), grpc.StatusCode.INVALID_ARGUMENT),
        (
            devices_stub.UploadResult(
                upload_request(tensors=[pb.Tensor(name="w", shape=[3], data=b"\0" * 8)]), metadata=md
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            devices_stub.UploadResult(upload_request(metrics={f"m{i}": 1.0 for i in range(300)}), metadata=md),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (
            devices_stub.UploadResult(
                upload_request(tensors=[pb.Tensor(name="big", shape=[2_700_000], data=b"\0" * 21_600_000)]), metadata=md
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,  # over the server's message size limit
        ),
        (
            devices_stub.ReportStatus(pb.ReportStatusRequest(release="ns/task", version=1, state=3), metadata=forged),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            devices_stub.ReportStatus(pb.ReportStatusRequest(release="ns/task", version=1, state=3), metadata=md_ios),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        (
            devices_stub.Enroll(pb.EnrollRequest(bootstrap_token="wrong-token", device=pb.DeviceInfo(device_id="new"))),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
        (
            devices_stub.Enroll(
                pb.EnrollRequest(bootstrap_token=BOOTSTRAP_TOKEN, device=pb.DeviceInfo(device_id="bad id"))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            devices_stub.Enroll(
                pb.EnrollRequest(
                    bootstrap_token=BOOTSTRAP_TOKEN,
                    device=pb.DeviceInfo(device_id="sneaky", attributes={"tether.io/device-id": "dev-1"}),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            devices_stub.GetManifest(pb.GetManifestRequest(release="ns/task"), metadata=ghost),
            grpc.StatusCode.UNAUTHENTICATED,
        ),
    ]
    for call, code in cases:
        err = await rpc_error(call)
        assert err.code() == code, (code, err.details())
        assert err.details()
    err = await rpc_error(_drain(devices_stub.Subscribe(pb.SubscribeRequest(), metadata=forged)))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert snapshot(database_url) == before
    assert enqueuer.calls == []


async def test_bad_admin_input_is_refused_and_changes_nothing(controller, admin_client, tmp_path, database_url):
    directory, bundle = make_bundle(tmp_path / "b")
    before = snapshot(database_url)
    blobs_root = controller.config.blob_dir

    # Wrong admin token.
    async with AdminClient(target=controller.address, token="not-the-admin-token") as intruder:
        with pytest.raises(errors.Unauthenticated):
            await intruder.list_releases()
        with pytest.raises(errors.Unauthenticated):
            await intruder.put_blob(directory / "task.py")

    # A blob whose bytes do not hash to the announced digest.
    with pytest.raises(errors.DigestMismatch):
        await admin_client.put_blob(directory / "model.bin", digest=bundle.file("task.py").sha256)
    # A blob over the size limit.
    huge = tmp_path / "huge.bin"
    huge.write_bytes(b"\0" * (controller.config.max_blob_bytes + 1))
    with pytest.raises(errors.TooLarge):
        await admin_client.put_blob(huge)
    with pytest.raises(errors.InvalidArgument):
        await admin_client.missing_blobs(["md5:123"])

    # Manifests: malformed, not canonical, blobs missing.
    with pytest.raises(errors.InvalidManifest):
        await admin_client.put_manifest(b"{not json")
    with pytest.raises(errors.InvalidManifest, match="canonical"):
        await admin_client.put_manifest(json.dumps(bundle.to_json(), indent=2).encode())
    with pytest.raises(errors.FailedPrecondition, match="not uploaded"):
        await admin_client.put_manifest(bundle.canonical_bytes())

    # Releases: unknown manifest, bad names, bad policy documents.
    with pytest.raises(errors.FailedPrecondition):
        await admin_client.apply_release(release="ns/task", manifest_digest=bundle.digest)
    with pytest.raises(errors.InvalidSpec, match="release"):
        await admin_client.apply_release(release="Bad Name", manifest_digest=bundle.digest)
    with pytest.raises(errors.InvalidSpec, match=r"target\.matchExpressions\[0\]\.operator"):
        await admin_client.apply_release(
            release="ns/task",
            manifest_digest=bundle.digest,
            target={"matchExpressions": [{"key": "os", "operator": "Near", "values": ["x"]}]},
        )
    with pytest.raises(errors.InvalidSpec, match=r"aggregation\.tensors"):
        await admin_client.apply_release(release="ns/task", manifest_digest=bundle.digest, aggregation={"tensors": "x"})

    assert snapshot(database_url) == before
    assert [p for p in blobs_root.rglob("*") if p.is_file()] == []


async def test_bad_resources_are_refused_and_change_nothing(admin_client, devices_stub, tmp_path, database_url):
    md = await enroll(devices_stub, "phone-1")
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md)
    await next_event(stream)
    _, bundle, _ = await publish(admin_client, tmp_path)
    assert (await next_event(stream)).notify.task.version == 1
    before = snapshot(database_url)
    for resources, field in [
        ({"timeoutSeconds": 0}, "resources.timeoutSeconds"),
        ({"timeoutSeconds": 86401}, "resources.timeoutSeconds"),
        ({"memoryMB": 8}, "resources.memoryMB"),
        ({"memoryMB": 1 << 20}, "resources.memoryMB"),
        ({"cpuSeconds": "10"}, "resources.cpuSeconds"),
        ({"gpuCount": 1}, "resources.gpuCount"),
    ]:
        with pytest.raises(errors.InvalidSpec, match=rf"^{field}: ") as info:
            await admin_client.apply_release(release="ns/task", manifest_digest=bundle.digest, resources=resources)
        assert info.value.code == "INVALID_ARGUMENT"
    assert snapshot(database_url) == before
    with pytest.raises(asyncio.TimeoutError):
        await next_event(stream, timeout=0.3)
    stream.cancel()


async def test_put_blob_with_a_digest_change_mid_stream_is_refused(controller, tmp_path):
    data = b"x" * 100
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    async def messages():
        yield pb.PutBlobChunk(digest=digest, data=data[:50])
        yield pb.PutBlobChunk(digest="sha256:" + "1" * 64, data=data[50:])

    async with grpc.aio.insecure_channel(controller.address) as ch:
        stub = pb_grpc.AdminServiceStub(ch)
        err = await rpc_error(stub.PutBlob(messages(), metadata=auth.bearer_metadata(ADMIN_TOKEN)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await rpc_error(stub.PutBlob(_empty(), metadata=auth.bearer_metadata(ADMIN_TOKEN)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert table_counts(controller.config.database_url)["blobs"] == 0


async def _empty():
    return
    yield  # pragma: no cover


# ---------------------------------------------------------------- bundles


async def test_upload_bundle_sends_only_missing_blobs(admin_client, tmp_path):
    shared = b"shared model bytes" * 1000
    d1, b1 = make_bundle(tmp_path / "v1", files={"task.py": b"v1\n", "model.bin": shared, "copy.bin": shared})
    first = await admin_client.upload_bundle(d1, b1)
    assert first.digest == b1.digest
    assert (first.uploaded_count, first.uploaded_bytes) == (2, len(shared) + 3)
    again = await admin_client.upload_bundle(d1, b1)
    assert (again.uploaded_count, again.uploaded_bytes) == (0, 0)
    d2, b2 = make_bundle(tmp_path / "v2", files={"task.py": b"v2\n", "model.bin": shared})
    second = await admin_client.upload_bundle(d2, b2)
    digest, count, size = second
    assert (digest, count, size) == (b2.digest, 1, 3)
    assert second.uploaded_blobs == 1
    assert await admin_client.missing_blobs(b1.blob_digests() + b2.blob_digests()) == []


# ---------------------------------------------------------------- restart


async def test_state_survives_a_controller_restart(controller_config, tmp_path, database_url):
    running = await start_controller(controller_config)
    async with AdminClient(target=running.address, token=ADMIN_TOKEN) as client:
        directory, bundle, _ = await publish(client, tmp_path, target=ANDROID)
    async with grpc.aio.insecure_channel(running.address) as ch:
        stub = pb_grpc.DeviceServiceStub(ch)
        md = await enroll(stub, "survivor", {"os": "android"})
        stream = stub.Subscribe(pb.SubscribeRequest(), metadata=md)
        await next_event(stream)
        assert not (await stub.UploadResult(upload_request(key="before-restart"), metadata=md)).duplicate
        await running.stop(grace=0.5)
        # The open stream ends with UNAVAILABLE: the agent reconnects and resyncs.
        err = await rpc_error(next_event(stream))
        assert err.code() == grpc.StatusCode.UNAVAILABLE

    async with running_controller(controller_config) as restarted:
        async with grpc.aio.insecure_channel(restarted.address) as ch:
            stub = pb_grpc.DeviceServiceStub(ch)
            stream = stub.Subscribe(pb.SubscribeRequest(), metadata=md)  # the old credential still works
            sync = (await next_event(stream)).sync
            assert [(t.release, t.version, t.manifest_digest) for t in sync.desired] == [("ns/task", 1, bundle.digest)]
            replay = await stub.UploadResult(upload_request(key="before-restart"), metadata=md)
            assert replay.duplicate
            model = bundle.file("model.bin")
            pulled = await _drain(
                stub.PullBlob(pb.PullBlobRequest(release="ns/task", digest=model.sha256), metadata=md)
            )
            assert b"".join(c.data for c in pulled) == (directory / "model.bin").read_bytes()
            stream.cancel()
        async with AdminClient(target=restarted.address, token=ADMIN_TOKEN) as client:
            status = await client.get_release_status("ns/task")
            assert (status.version, status.results) == (1, 1)
    assert table_counts(database_url)["results"] == 1


async def test_binding_a_busy_port_fails_clearly(controller, controller_config):
    busy = dataclasses.replace(controller_config, listen=f"127.0.0.1:{controller.port}")
    with pytest.raises(errors.FailedPrecondition, match="cannot listen"):
        await start_controller(busy)
