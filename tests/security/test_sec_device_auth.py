"""Device authentication against the real controller (gRPC on loopback, real PostgreSQL).

Forged, expired, altered, superseded, revoked and other devices' credentials
are refused with UNAUTHENTICATED / PERMISSION_DENIED and a message that says
why, and none of them changes stored state. A replayed upload is stored once.
"""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, snapshot
from sec_helpers import drain, enroll, first_event, md, query, rpc_error, upload_request, write_bundle

from tether.common import auth, credentials, errors
from tether.common.admin_client import AdminClient
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

ANDROID = {"matchLabels": {"os": "android"}}
IOS = {"matchLabels": {"os": "ios"}}
U = grpc.StatusCode.UNAUTHENTICATED


async def publish(admin_client, tmp_path, *, release, target, name="sec-task"):
    directory, bundle = write_bundle(tmp_path / release.replace("/", "-"), name=name)
    await admin_client.upload_bundle(directory, bundle)
    await admin_client.apply_release(release=release, manifest_digest=bundle.digest, target=target)
    return bundle


def every_device_call(stub: pb_grpc.DeviceServiceStub, metadata, *, release="ns/android", digest="sha256:" + "0" * 64):
    """One awaitable per authenticated device RPC (streams drained)."""
    kw = {"metadata": metadata} if metadata is not None else {}
    return {
        "Subscribe": first_event(stub.Subscribe(pb.SubscribeRequest(), **kw)),
        "GetManifest": stub.GetManifest(pb.GetManifestRequest(release=release, manifest_digest=digest), **kw),
        "PullBlob": drain(stub.PullBlob(pb.PullBlobRequest(release=release, digest=digest), **kw)),
        "PullBlobs": drain(
            stub.PullBlobs(pb.PullBlobsRequest(release=release, blobs=[pb.BlobRange(digest=digest)]), **kw)
        ),
        "ReportStatus": stub.ReportStatus(
            pb.ReportStatusRequest(release=release, version=1, state=pb.DELIVERY_STATE_REFUSED), **kw
        ),
        "UploadResult": stub.UploadResult(upload_request(release=release), **kw),
        "RenewCredential": stub.RenewCredential(pb.RenewCredentialRequest(), **kw),
    }


async def test_enrolment_issues_a_signed_expiring_credential(controller, devices_stub):
    response = await enroll(devices_stub, "phone-1", {"os": "android"})
    token = credentials.parse(response.credential)
    assert token.device_id == "phone-1"
    assert response.expires_at == token.expires_at == credentials.expires_at(response.credential)
    ttl = controller.config.credential_ttl_s
    now = controller.authenticator.signer.clock()
    assert now + ttl - 5 <= response.expires_at <= now + ttl + 1
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md(response.credential))
    assert (await first_event(stream)).HasField("sync")
    stream.cancel()


async def test_forged_altered_and_legacy_credentials_are_refused_and_change_nothing(
    controller, admin_client, devices_stub, tmp_path, database_url
):
    good = (await enroll(devices_stub, "phone-1", {"os": "android"})).credential
    await enroll(devices_stub, "phone-2", {"os": "android"})
    await publish(admin_client, tmp_path, release="ns/android", target=ANDROID)
    parsed = credentials.parse(good)
    stranger = credentials.Signer([credentials.new_key()], ttl_s=3600)
    forgeries = {
        # A token minted with a key that is not the controller's.
        "foreign key": (str(stranger.issue(parsed.credential)), "signature is invalid"),
        # The holder edits the device id (to act as phone-2) or pushes its expiry out.
        "device id edited": (good.replace("v1.phone-1.", "v1.phone-2.", 1), "signature is invalid"),
        "expiry edited": (
            f"v1.phone-1.{parsed.expires_at + 10**6}.{parsed.secret}.{parsed.signature}",
            "signature is invalid",
        ),
        "signature edited": (good[:-2] + ("AA" if not good.endswith("AA") else "BB"), "signature is invalid"),
        "legacy unsigned form": (f"phone-1.{parsed.secret}", "malformed"),
        "garbage": ("x" * 40, "malformed"),
    }
    before = snapshot(database_url)
    for name, (token, message) in forgeries.items():
        for rpc, call in every_device_call(devices_stub, md(token)).items():
            err = await rpc_error(call)
            assert err.code() == U, (name, rpc)
            assert message in err.details(), (name, rpc, err.details())
    for rpc, call in every_device_call(devices_stub, None).items():
        err = await rpc_error(call)
        assert (err.code(), err.details()) == (U, "missing authorization metadata"), rpc
    assert snapshot(database_url) == before


async def test_a_validly_signed_credential_with_another_devices_secret_is_refused(controller, devices_stub):
    """Even with the controller's signing key, a credential needs the device's own secret (stored hashed)."""
    a = credentials.parse((await enroll(devices_stub, "phone-a")).credential)
    await enroll(devices_stub, "phone-b")
    signer = controller.authenticator.signer
    as_b = signer.issue(auth.Credential(device_id="phone-b", secret=a.secret))
    err = await rpc_error(first_event(devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md(str(as_b)))))
    assert err.code() == U and "no longer valid" in err.details()
    made_up = signer.issue(auth.Credential(device_id="phone-a", secret=auth.new_secret()))
    err = await rpc_error(first_event(devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md(str(made_up)))))
    assert err.code() == U


async def test_expired_credentials_are_refused_and_renewal_needs_a_live_one(controller, devices_stub, database_url):
    token = credentials.parse((await enroll(devices_stub, "phone-1")).credential)
    expired = controller.authenticator.signer.issue(token.credential, ttl_s=-1)  # same secret, in the past
    before = snapshot(database_url)
    for rpc, call in every_device_call(devices_stub, md(str(expired))).items():
        err = await rpc_error(call)
        assert err.code() == U and "expired" in err.details() and "renew it or enrol again" in err.details(), rpc
    assert snapshot(database_url) == before
    # The way back is enrolment with the bootstrap token (same device id, new credential).
    again = await enroll(devices_stub, "phone-1")
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md(again.credential))
    assert (await first_event(stream)).HasField("sync")
    stream.cancel()


async def test_renewal_rotates_the_credential_and_the_old_one_stops_working(controller, devices_stub, database_url):
    old = (await enroll(devices_stub, "phone-1")).credential
    renewed = await devices_stub.RenewCredential(pb.RenewCredentialRequest(), metadata=md(old))
    new = renewed.credential
    assert new != old and credentials.parse(new).device_id == "phone-1"
    assert renewed.expires_at == credentials.expires_at(new) >= credentials.expires_at(old)
    err = await rpc_error(devices_stub.RenewCredential(pb.RenewCredentialRequest(), metadata=md(old)))
    assert err.code() == U and "superseded" in err.details()
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md(new))
    assert (await first_event(stream)).HasField("sync")
    stream.cancel()
    [(issued,)] = query(database_url, "SELECT credential_issued_at IS NOT NULL FROM devices")
    assert issued


async def test_another_devices_releases_and_results_are_out_of_reach(
    controller, admin_client, devices_stub, tmp_path, database_url, enqueuer
):
    android = (await enroll(devices_stub, "and-1", {"os": "android"})).credential
    ios = (await enroll(devices_stub, "ios-1", {"os": "ios"})).credential
    bundle = await publish(admin_client, tmp_path, release="ns/ios-only", target=IOS)
    before = snapshot(database_url)
    # The Android device cannot read the iOS release, nor any of its blobs, nor write results or status for it.
    for call in (
        devices_stub.GetManifest(
            pb.GetManifestRequest(release="ns/ios-only", manifest_digest=bundle.digest), metadata=md(android)
        ),
        drain(
            devices_stub.PullBlob(
                pb.PullBlobRequest(release="ns/ios-only", digest=bundle.files[0].sha256), metadata=md(android)
            )
        ),
        drain(
            devices_stub.PullBlobs(
                pb.PullBlobsRequest(
                    release="ns/ios-only", blobs=[pb.BlobRange(digest=d) for d in bundle.blob_digests()]
                ),
                metadata=md(android),
            )
        ),
        devices_stub.UploadResult(upload_request(release="ns/ios-only"), metadata=md(android)),
        devices_stub.ReportStatus(
            pb.ReportStatusRequest(release="ns/ios-only", version=1, state=pb.DELIVERY_STATE_SUCCEEDED),
            metadata=md(android),
        ),
    ):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "does not target device and-1" in err.details()
    assert snapshot(database_url) == before and enqueuer.calls == []
    # A result is always stored as the authenticated device's: nothing in the request names a device.
    await devices_stub.UploadResult(upload_request(release="ns/ios-only", key="k1"), metadata=md(ios))
    assert query(database_url, "SELECT device_id FROM results") == [("ios-1",)]
    # The same idempotency key from another device is that device's own (refused here: not targeted).
    err = await rpc_error(
        devices_stub.UploadResult(upload_request(release="ns/ios-only", key="k1"), metadata=md(android))
    )
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # Device credentials are not admin credentials.
    async with AdminClient(target=controller.address, token=ios) as as_device:
        with pytest.raises(errors.Unauthenticated, match="invalid admin token"):
            await as_device.list_releases()
        with pytest.raises(errors.Unauthenticated):
            await as_device.revoke_device("and-1")


async def test_a_replayed_upload_is_stored_once(
    controller, admin_client, devices_stub, tmp_path, database_url, enqueuer
):
    token = (await enroll(devices_stub, "phone-1", {"os": "android"})).credential
    await publish(admin_client, tmp_path, release="ns/android", target=ANDROID)
    request = upload_request(release="ns/android", key="run-42")
    first = await devices_stub.UploadResult(request, metadata=md(token))
    # Replays: sequential, concurrent, and with a changed body under the same key.
    replays = [await devices_stub.UploadResult(request, metadata=md(token)) for _ in range(3)]
    replays += await asyncio.gather(*(devices_stub.UploadResult(request, metadata=md(token)) for _ in range(8)))
    changed = upload_request(release="ns/android", key="run-42", samples=999)
    replays.append(await devices_stub.UploadResult(changed, metadata=md(token)))
    assert first.duplicate is False and all(r.duplicate for r in replays)
    assert query(database_url, "SELECT device_id, idempotency_key, sample_count FROM results") == [
        ("phone-1", "run-42", 4)
    ]
    # Still once after the credential was renewed (a replay may come from a restarted agent).
    renewed = await devices_stub.RenewCredential(pb.RenewCredentialRequest(), metadata=md(token))
    assert (await devices_stub.UploadResult(request, metadata=md(renewed.credential))).duplicate
    assert query(database_url, "SELECT count(*) FROM results") == [(1,)]


async def test_revocation_ends_the_stream_and_every_later_call(
    controller, admin_client, devices_stub, tmp_path, database_url
):
    token = (await enroll(devices_stub, "phone-1", {"os": "android"})).credential
    await enroll(devices_stub, "phone-2", {"os": "android"})
    bundle = await publish(admin_client, tmp_path, release="ns/android", target=ANDROID)
    stream = devices_stub.Subscribe(pb.SubscribeRequest(), metadata=md(token))
    assert (await first_event(stream)).HasField("sync")
    assert (await admin_client.get_release_status("ns/android")).targeted == 2

    result = await admin_client.revoke_device("phone-1")
    assert (result.revoked, result.disconnected) == (True, True)
    err = await rpc_error(first_event(stream))
    assert err.code() == U and "revoked" in err.details()
    for rpc, call in every_device_call(devices_stub, md(token), digest=bundle.digest).items():
        err = await rpc_error(call)
        assert err.code() == U and "phone-1 is revoked" in err.details(), rpc
    # It cannot come back with the bootstrap token either, and stops counting as targeted.
    err = await rpc_error(enroll(devices_stub, "phone-1", {"os": "android"}))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in err.details()
    assert (await admin_client.get_release_status("ns/android")).targeted == 1
    assert query(database_url, "SELECT device_id FROM devices WHERE revoked AND revoked_at IS NOT NULL") == [
        ("phone-1",)
    ]
    again = await admin_client.revoke_device("phone-1")
    assert (again.revoked, again.disconnected) == (False, False)
    with pytest.raises(errors.NotFound, match="not enrolled"):
        await admin_client.revoke_device("ghost")
    with pytest.raises(errors.InvalidArgument):
        await admin_client.revoke_device("bad id!")


async def test_replicas_share_the_signing_key_and_learn_of_a_revocation_within_the_cache_bound(
    controller, controller_config, start, devices_stub
):
    other = await start(controller_config, auth_cache_s=0.3)
    token = (await enroll(devices_stub, "phone-1")).credential
    async with grpc.aio.insecure_channel(other.address) as ch:
        stub = pb_grpc.DeviceServiceStub(ch)
        stream = stub.Subscribe(pb.SubscribeRequest(), metadata=md(token))  # issued by the first replica
        assert (await first_event(stream)).HasField("sync")
        stream.cancel()
        async with AdminClient(target=controller.address, token=ADMIN_TOKEN) as first_admin:
            await first_admin.revoke_device("phone-1")  # through the first replica
        await asyncio.sleep(0.4)  # the other replica's cache bound
        err = await rpc_error(
            stub.ReportStatus(pb.ReportStatusRequest(release="ns/x", version=1, state=1), metadata=md(token))
        )
        assert err.code() == U and "revoked" in err.details()


async def test_a_configured_key_file_signs_and_a_changed_key_invalidates_old_credentials(
    controller_config, start, tmp_path
):
    keys = tmp_path / "credential.keys"
    keys.write_text(credentials.new_key().hex() + "\n")
    first = await start(controller_config, credential_key_file=keys)
    async with grpc.aio.insecure_channel(first.address) as ch:
        token = (await enroll(pb_grpc.DeviceServiceStub(ch), "phone-1")).credential
    credentials.Signer(credentials.load_key_file(keys)).verify(token)
    await first.stop(grace=0.1)

    rotated = tmp_path / "rotated.keys"
    rotated.write_text(credentials.new_key().hex() + "\n")
    second = await start(controller_config, credential_key_file=rotated)
    async with grpc.aio.insecure_channel(second.address) as ch:
        err = await rpc_error(
            first_event(pb_grpc.DeviceServiceStub(ch).Subscribe(pb.SubscribeRequest(), metadata=md(token)))
        )
    assert err.code() == U and "signature is invalid" in err.details()


def test_config_bounds(controller_config, tmp_path):
    from tether.common.config import ConfigError

    with pytest.raises(ConfigError, match="credential TTL"):
        dataclasses.replace(controller_config, credential_ttl_s=5)
    with pytest.raises(ConfigError, match="mTLS"):
        dataclasses.replace(controller_config, tls_client_ca_file=tmp_path / "ca.crt")
    assert BOOTSTRAP_TOKEN not in repr(controller_config)


async def test_every_device_rpc_but_enroll_demands_a_valid_credential(controller, devices_stub):
    """Walks the wire contract itself, so an RPC added later without authentication fails here."""
    from google.protobuf import message_factory

    good = (await enroll(devices_stub, "phone-1")).credential
    expired = str(controller.authenticator.signer.issue(credentials.parse(good).credential, ttl_s=-1))
    service = pb.DESCRIPTOR.services_by_name["DeviceService"]
    methods = [m for m in service.methods if m.name != "Enroll"]
    assert {"Subscribe", "GetManifest", "PullBlob", "PullBlobs", "ReportStatus", "UploadResult", "RenewCredential"} <= {
        m.name for m in methods
    }
    async with grpc.aio.insecure_channel(controller.address) as ch:
        for method in methods:
            request = message_factory.GetMessageClass(method.input_type)()
            path = f"/{service.full_name}/{method.name}"
            response_type = message_factory.GetMessageClass(method.output_type)
            if method.server_streaming:
                call = ch.unary_stream(
                    path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response_type.FromString,
                )
            else:
                call = ch.unary_unary(
                    path,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response_type.FromString,
                )
            for token, reason in ((None, "missing"), ("garbage", "malformed"), (expired, "expired")):
                kw = {} if token is None else {"metadata": md(token)}
                attempt = drain(call(request, **kw)) if method.server_streaming else call(request, **kw)
                err = await rpc_error(attempt)
                assert err.code() == U and reason in err.details(), (method.name, token, err.details())
