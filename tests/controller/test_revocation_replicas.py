"""A device revoked through one controller replica is cut off on every replica at once.

Two real controllers (in-process grpc.aio servers) share one PostgreSQL. Their
authentication caches are made an hour long, so every refusal asserted here
comes from the revocation being announced (or caught up on after a LISTEN
gap), never from a cache entry running out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import grpc
import psycopg
import pytest
from controller_helpers import enroll
from controller_support import ADMIN_TOKEN, start_controller

from tether.common import admin_client, auth, credentials, errors
from tether.controller import device_auth, devices, replicas, server
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

U = grpc.StatusCode.UNAUTHENTICATED
BOUND_S = 10.0  # generous: the announcement normally lands in milliseconds
LONG_CACHE_S = 3600.0


@dataclasses.dataclass
class Replica:
    running: server.RunningController
    channel: grpc.aio.Channel
    stub: pb_grpc.DeviceServiceStub
    admin: admin_client.AdminClient


@pytest.fixture()
async def replicas_ab(controller_config) -> AsyncIterator[tuple[Replica, Replica]]:
    cfg = dataclasses.replace(controller_config, auth_cache_s=LONG_CACHE_S)
    started: list[Replica] = []
    try:
        for _ in range(2):
            running = await start_controller(cfg)
            channel = grpc.aio.insecure_channel(running.address)
            client = admin_client.AdminClient(target=running.address, token=ADMIN_TOKEN)
            await client.__aenter__()
            started.append(Replica(running, channel, pb_grpc.DeviceServiceStub(channel), client))
        a, b = started
        assert a.running.replica_id != b.running.replica_id
        yield a, b
    finally:
        for r in started:
            await r.admin.__aexit__(None, None, None)
            await r.channel.close()
            await r.running.stop(grace=0.1)


async def subscribe(replica: Replica, metadata) -> grpc.aio.UnaryStreamCall:
    stream = replica.stub.Subscribe(pb.SubscribeRequest(), metadata=metadata)
    first = await asyncio.wait_for(stream.read(), BOUND_S)
    assert first.WhichOneof("event") == "sync"
    return stream


async def stream_end(stream: grpc.aio.UnaryStreamCall) -> grpc.aio.AioRpcError:
    """Wait (bounded) for the stream to end; the error it ended with. Events before the end are skipped."""

    async def drain() -> grpc.aio.AioRpcError:
        while True:
            try:
                event = await stream.read()
            except grpc.aio.AioRpcError as e:
                return e
            assert event is not grpc.aio.EOF, "the stream ended without a status error"

    return await asyncio.wait_for(drain(), BOUND_S)


async def call_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def warm_cache(replica: Replica, metadata, device_id: str) -> None:
    """One unary call, so the replica holds a (one-hour) positive cache entry for the device."""
    await replica.stub.GetDesired(pb.GetDesiredRequest(), metadata=metadata)
    assert replica.running.authenticator is not None and replica.running.authenticator.cached >= 1


async def test_a_revocation_on_replica_a_ends_the_stream_on_replica_b_and_its_cached_auth(replicas_ab, database_url):
    a, b = replicas_ab
    phone1 = await enroll(a.stub, "phone-1", {"os": "android"})
    phone2 = await enroll(a.stub, "phone-2", {"os": "android"})
    phone3 = await enroll(a.stub, "phone-3", {"os": "android"})
    on_b = await subscribe(b, phone1)
    other_on_b = await subscribe(b, phone3)
    on_a = await subscribe(a, phone2)
    await warm_cache(b, phone1, "phone-1")
    await warm_cache(a, phone2, "phone-2")

    # Given phone-1 streaming on B, when A revokes it, then B ends that stream UNAUTHENTICATED...
    result = await a.admin.revoke_device("phone-1")
    assert (result.revoked, result.disconnected) == (True, False)  # A itself held no stream of it
    err = await stream_end(on_b)
    assert err.code() == U and err.details() == "device phone-1 is revoked"
    # ...and refuses its next call at once, although its cache entry had an hour left.
    err = await call_error(b.stub.GetDesired(pb.GetDesiredRequest(), metadata=phone1))
    assert err.code() == U and "phone-1 is revoked" in err.details()
    assert not b.running.hub.is_connected("phone-1")
    assert b.running.hub.is_connected("phone-3")  # nobody else's stream is touched
    assert b.running.listener is not None and b.running.listener.revocations == 1

    # A revocation made outside any controller (psql: no origin) reaches every replica the same way.
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("UPDATE devices SET revoked = true, revoked_at = now() WHERE device_id = 'phone-2'")
    err = await stream_end(on_a)
    assert err.code() == U and "phone-2 is revoked" in err.details()
    err = await call_error(a.stub.GetDesired(pb.GetDesiredRequest(), metadata=phone2))
    assert err.code() == U and "phone-2 is revoked" in err.details()
    # The untouched device still works on B.
    assert (await b.stub.GetDesired(pb.GetDesiredRequest(), metadata=phone3)) is not None
    other_on_b.cancel()


async def test_a_revocation_missed_during_a_listen_gap_is_caught_up_on_reconnect(replicas_ab, database_url):
    a, b = replicas_ab
    phone1 = await enroll(a.stub, "phone-1", {"os": "android"})
    phone2 = await enroll(a.stub, "phone-2", {"os": "android"})
    on_b = await subscribe(b, phone1)
    live_on_b = await subscribe(b, phone2)
    await warm_cache(b, phone1, "phone-1")
    listener = b.running.listener
    assert listener is not None and listener.catch_ups == 1  # the first LISTEN

    # A revocation whose announcement B never hears (as if B's LISTEN connection was down when it was
    # sent): the announcing trigger is disabled inside the revoking transaction only.
    with psycopg.connect(database_url) as conn, conn.transaction():
        conn.execute("ALTER TABLE devices DISABLE TRIGGER devices_revoke_notify")
        conn.execute("UPDATE devices SET revoked = true, revoked_at = now() WHERE device_id = 'phone-1'")
        conn.execute("ALTER TABLE devices ENABLE TRIGGER devices_revoke_notify")
    assert b.running.hub.is_connected("phone-1")  # nothing told B

    # B's LISTEN session dies (failover, network blip); on reconnect it must assume it missed revocations.
    with psycopg.connect(database_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            (listener.application_name,),
        ).fetchall()
    assert killed == [(True,)]
    err = await stream_end(on_b)
    assert err.code() == U and "phone-1 is revoked" in err.details()
    assert listener.catch_ups == 2 and listener.revocations == 0  # caught up, not announced
    # The whole cache was dropped: the revoked credential is refused at once, the live one still works.
    err = await call_error(b.stub.GetDesired(pb.GetDesiredRequest(), metadata=phone1))
    assert err.code() == U and "phone-1 is revoked" in err.details()
    assert b.running.hub.is_connected("phone-2")
    assert (await b.stub.GetDesired(pb.GetDesiredRequest(), metadata=phone2)) is not None
    live_on_b.cancel()


async def test_the_announcement_is_sent_only_when_the_revocation_commits(replicas_ab, database_url):
    a, _ = replicas_ab
    await enroll(a.stub, "phone-1")
    await enroll(a.stub, "phone-2")
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listen:
        await listen.execute(f"LISTEN {replicas.DEVICES_CHANNEL}")
        with psycopg.connect(database_url) as conn:
            with pytest.raises(RuntimeError), conn.transaction():  # rolled back: never announced
                conn.execute("UPDATE devices SET revoked = true WHERE device_id = 'phone-1'")
                raise RuntimeError("abort the revocation")
            with conn.transaction():  # a no-op update of an already-live flag announces nothing either
                conn.execute("UPDATE devices SET revoked = false WHERE device_id = 'phone-1'")
        await a.admin.revoke_device("phone-2")
        again = await a.admin.revoke_device("phone-2")  # already revoked: no second announcement
        assert again.revoked is False
        await a.admin.revoke_device("phone-1")
        payloads = []
        async for note in listen.notifies(timeout=BOUND_S, stop_after=2):
            payloads.append(json.loads(note.payload))
    origin = a.running.replica_id
    assert payloads == [
        {"device": "phone-2", "event": "revoked", "origin": origin},
        {"device": "phone-1", "event": "revoked", "origin": origin},
    ]


async def test_a_renewal_on_replica_a_is_honoured_on_replica_b_at_once(replicas_ab):
    """The cache is keyed on the secret's hash: a new credential is never answered from an old entry."""
    a, b = replicas_ab
    old = await enroll(a.stub, "phone-1")
    await warm_cache(b, old, "phone-1")
    renewed = await a.stub.RenewCredential(pb.RenewCredentialRequest(), metadata=old)
    new = auth.bearer_metadata(renewed.credential)
    stream = await subscribe(b, new)
    assert b.running.hub.is_connected("phone-1")
    stream.cancel()


async def test_a_superseded_credential_and_old_facts_are_dropped_on_replica_b_at_once(replicas_ab):
    """Re-enrolment on A (a new secret, new attributes) is announced: B forgets its hour-long entry."""
    a, b = replicas_ab
    old = await enroll(a.stub, "phone-1", {"os": "android"})
    await warm_cache(b, old, "phone-1")
    stream = await subscribe(b, old)
    await enroll(a.stub, "phone-1", {"os": "ios"})  # the same device enrols again: old secret superseded

    async def refused() -> grpc.aio.AioRpcError | None:
        try:
            await b.stub.GetDesired(pb.GetDesiredRequest(), metadata=old)
        except grpc.aio.AioRpcError as e:
            return e
        return None

    for _ in range(int(BOUND_S / 0.05)):  # the announcement lands within milliseconds; bounded wait
        err = await refused()
        if err is not None:
            break
        await asyncio.sleep(0.05)
    assert err is not None and err.code() == U and "no longer valid" in err.details()
    # The stream B holds for the device now carries its new facts (what fan-outs target by).
    for _ in range(int(BOUND_S / 0.05)):
        conn = b.running.hub._connections.get("phone-1")
        if conn is not None and conn.facts.get("os") == frozenset({"ios"}):
            break
        await asyncio.sleep(0.05)
    assert b.running.hub._connections["phone-1"].facts.get("os") == frozenset({"ios"})
    stream.cancel()


# ---------------------------------------------------------------- the authenticator's in-flight race


class GatedStore:
    """`authenticate_device` that waits on a gate, and answers as the registry is when it resumes."""

    def __init__(self) -> None:
        self.calls = 0
        self.revoked = False
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()

    async def authenticate_device(self, credential: auth.Credential) -> devices.Device:
        self.calls += 1
        revoked_when_read = self.revoked  # the row as read before the gate: possibly stale afterwards
        self.entered.set()
        await self.gate.wait()
        if revoked_when_read:
            raise errors.Unauthenticated(f"device {credential.device_id} is revoked")
        return devices.Device(device_id=credential.device_id, attributes={})


@pytest.mark.parametrize("how", ["forget", "clear"])
async def test_a_lookup_in_flight_when_the_device_is_forgotten_asks_again(how):
    store_ = GatedStore()
    signer = credentials.Signer([credentials.new_key()])
    authenticator = device_auth.DeviceAuthenticator(registry=store_, signer=signer, cache_s=LONG_CACHE_S)  # type: ignore[arg-type]
    token = str(signer.issue(auth.Credential(device_id="phone-1", secret=auth.new_secret())))
    attempt = asyncio.create_task(authenticator.authenticate(token))
    await store_.entered.wait()  # read the row as live...
    store_.revoked = True  # ...then the revocation commits and is announced
    if how == "forget":
        authenticator.forget("phone-1")
    else:
        authenticator.clear()
    store_.gate.set()
    with pytest.raises(errors.Unauthenticated, match="phone-1 is revoked"):
        await attempt
    assert store_.calls == 2 and authenticator.cached == 0
