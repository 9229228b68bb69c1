"""The agent's side of device credentials, against the real controller: renewal, expiry, revocation."""

from __future__ import annotations

import asyncio
import json
import random
import time

import grpc
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from sec_helpers import md, query, rpc_error, until, write_bundle

from tether.agent import client, daemon
from tether.common import admin_client, credentials
from tether.proto.v1 import tether_pb2 as pb
from tether.proto.v1 import tether_pb2_grpc as pb_grpc

FAST = client.Backoff(initial_s=0.05, max_s=0.3)


def make_agent(address, root, name="phone-1", **kw) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=root / name / "state",
        data_dir=root / name / "data",
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=name,
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
        **kw,
    )


async def connected(agent) -> bool:
    return agent.connected.is_set()


async def publish_and_wait(controller, tmp_path, database_url, release="default/after"):
    directory, bundle = write_bundle(tmp_path / release.replace("/", "-"))
    async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
        await adm.upload_bundle(directory, bundle)
        await adm.apply_release(release=release, manifest_digest=bundle.digest, target={})

    async def succeeded() -> bool:
        return query(database_url, "SELECT state FROM deliveries WHERE release = %s", release) == [("succeeded",)]

    await until(succeeded, timeout=60)


async def test_the_agent_renews_before_expiry_and_keeps_working(controller_config, start, tmp_path, database_url):
    controller = await start(controller_config, credential_ttl_s=60)
    # The agent's clock runs 58 s ahead until it renewed once: its 60 s credential looks 2 s from
    # expiry, so it renews within ~1.5 s; then the clock is right again and the next renewal is 40 s away.
    skew = {"s": 58.0}
    agent = make_agent(controller.address, tmp_path, clock=lambda: time.time() + skew["s"])
    run = asyncio.create_task(agent.run())
    try:
        await until(lambda: connected(agent))
        first = agent.state.credential

        async def renewed() -> bool:
            return agent.state.credential != first

        await until(renewed, timeout=10)
        skew["s"] = 0.0
        state_file = agent.state_dir / "state.json"

        async def saved() -> bool:
            return json.loads(state_file.read_text())["credential"] == agent.state.credential

        await until(saved, timeout=5)
        assert credentials.parse(agent.state.credential).device_id == "phone-1"
        async with grpc.aio.insecure_channel(controller.address) as ch:
            stub = pb_grpc.DeviceServiceStub(ch)
            err = await rpc_error(stub.RenewCredential(pb.RenewCredentialRequest(), metadata=md(first)))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        await publish_and_wait(controller, tmp_path, database_url)  # pulls and uploads with the renewed credential
    finally:
        agent.stop()
        await run


async def test_an_agent_whose_credential_expired_offline_enrols_again(controller_config, start, tmp_path, database_url):
    controller = await start(controller_config)
    agent = make_agent(controller.address, tmp_path)
    run = asyncio.create_task(agent.run())
    await until(lambda: connected(agent))
    agent.stop()
    await run
    # While it was off, its credential expired (same secret, expiry in the past, validly signed).
    token = credentials.parse(agent.state.credential)
    expired = str(controller.authenticator.signer.issue(token.credential, ttl_s=-60))
    state_file = agent.state_dir / "state.json"
    doc = json.loads(state_file.read_text())
    doc["credential"] = expired
    state_file.write_text(json.dumps(doc))

    again = make_agent(controller.address, tmp_path)
    assert again.state.credential == expired
    run = asyncio.create_task(again.run())
    try:
        await until(lambda: connected(again))
        assert again.state.credential != expired
        controller.authenticator.signer.verify(again.state.credential)
        await publish_and_wait(controller, tmp_path, database_url)
    finally:
        again.stop()
        await run


async def test_a_revoked_agent_is_cut_off_and_cannot_come_back(controller_config, start, tmp_path, database_url):
    controller = await start(controller_config)
    revoked = make_agent(controller.address, tmp_path, "phone-1")
    witness = make_agent(controller.address, tmp_path, "phone-2")
    runs = [asyncio.create_task(a.run()) for a in (revoked, witness)]
    try:
        await until(lambda: connected(revoked))
        await until(lambda: connected(witness))
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            result = await adm.revoke_device("phone-1")
        assert (result.revoked, result.disconnected) == (True, True)

        async def cut_off() -> bool:
            return not revoked.connected.is_set()

        await until(cut_off, timeout=10)
        await publish_and_wait(controller, tmp_path, database_url)  # the witness still gets and runs releases
        await asyncio.sleep(0.5)
        assert not revoked.connected.is_set()
        assert query(database_url, "SELECT device_id FROM deliveries") == [("phone-2",)]
        assert revoked.state.runs == {}
    finally:
        for a in (revoked, witness):
            a.stop()
        await asyncio.gather(*runs)


@pytest.mark.parametrize("reason", ["renewal"])
def test_renewal_module_is_wired_into_the_daemon(reason):
    import inspect

    from tether.agent import session

    # Renewal lives in the session room now: the daemon holds the stream through it, and holding renews.
    assert "self.session.hold(" in inspect.getsource(daemon.Agent.run), reason
    assert "self.keep_fresh()" in inspect.getsource(session.Session.hold), reason
