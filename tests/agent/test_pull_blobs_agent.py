"""The agent (and the fleet simulator) pull a version's missing blobs with one PullBlobs call.

Against the scriptable fake (broken streams, partial files left by a killed agent, an older
controller without PullBlobs) and once against the real controller.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random

import grpc
import pytest
from agent_fakes import BOOTSTRAP, wait_until, write_bundle
from controller_support import ADMIN_TOKEN, controller_config, running_controller

from tether.agent import client, daemon
from tether.common import manifest
from tether.devtools import simagent

FAST = client.Backoff(initial_s=0.02, max_s=0.2)
TASK = "def run(ctx):\n    return {'sample_count': 1}\n"


def make_agent(address: str, state_dir: pathlib.Path, name: str = "dev-1") -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=state_dir,
        data_dir=state_dir.parent / "data",
        bootstrap_token=BOOTSTRAP,
        device_id=name,
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
    )


async def install(agent: daemon.Agent, fake, release: str, *, timeout: float = 30) -> None:
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "SUCCEEDED" in fake.states(release) or task.done(), timeout=timeout)
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)


def blobs_of(fake, extra: dict[str, bytes]) -> dict[str, str]:
    """path -> digest of the extra files."""
    return {path: next(d for d, data in fake.blobs.items() if data == content) for path, content in extra.items()}


EXTRA = {
    "a.bin": os.urandom(40_000),  # 10 chunks of the fake's 4096 bytes
    "b.bin": os.urandom(30_000),
    "c.bin": os.urandom(5_000),
    "empty.bin": b"",
}


async def test_all_missing_blobs_come_in_one_pull_blobs_call(fake, tmp_path) -> None:
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    await install(agent, fake, rel.name)
    assert fake.pull_calls == ["PullBlobs"]
    assert sorted(fake.pulls) == sorted((d, 0) for d in fake.blobs)  # every blob once, from 0
    assert fake.states(rel.name, progress=False)[:1] == ["INSTALLED"]
    for path, content in EXTRA.items():
        assert (agent.store.current_dir(rel.name) / path).read_bytes() == content

    # A new version that changes one file pulls only that blob, still in one call.
    changed = {**EXTRA, "c.bin": os.urandom(5_000)}
    rel2 = fake.publish("ns/t", write_bundle(tmp_path / "b2", TASK, extra=changed))
    fake.pulls.clear()
    fake.pull_calls.clear()
    fake.statuses.clear()
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    await install(agent, fake, rel2.name)
    assert fake.pull_calls == ["PullBlobs"]
    assert fake.pulls == [(blobs_of(fake, changed)["c.bin"], 0)]


async def test_a_broken_stream_resumes_every_blob_from_the_offset_it_reached(fake, tmp_path) -> None:
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    digests = blobs_of(fake, EXTRA)
    fake.drop_after[digests["b.bin"]] = 3 * fake.chunk_size  # breaks after a.bin and part of b.bin
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    await install(agent, fake, rel.name)

    assert fake.pull_calls == ["PullBlobs", "PullBlobs"]
    # The second call asks only for what was still missing: b.bin from where it broke, then the rest.
    offsets = [o for d, o in fake.pulls if d == digests["b.bin"]]
    assert offsets == [0, 3 * fake.chunk_size]
    assert [o for d, o in fake.pulls if d == digests["a.bin"]] == [0]
    # The stream was resumed at once (progress was made): one DOWNLOADING, one manifest fetch.
    assert fake.states(rel.name).count("DOWNLOADING") <= 1  # one install (reported only past 1 s)
    for path, content in EXTRA.items():
        assert (agent.store.current_dir(rel.name) / path).read_bytes() == content
    assert list(agent.store.partials.iterdir()) == []


async def test_partials_left_by_a_killed_agent_are_resumed_in_one_call(fake, tmp_path) -> None:
    """What a SIGKILLed agent leaves: partial files (one longer than its blob is garbage and starts over)."""
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    digests = blobs_of(fake, EXTRA)
    state_dir = tmp_path / "dev" / "state"
    agent = make_agent(fake.address, state_dir)
    agent.store.partial_path(digests["a.bin"]).write_bytes(EXTRA["a.bin"][:12_345])
    agent.store.partial_path(digests["b.bin"]).write_bytes(EXTRA["b.bin"])  # complete, never committed
    agent.store.partial_path(digests["c.bin"]).write_bytes(b"x" * 6_000)  # longer than the blob: garbage
    await install(agent, fake, rel.name)

    assert fake.pull_calls == ["PullBlobs"]
    requested = dict(fake.pulls)
    assert requested[digests["a.bin"]] == 12_345
    assert requested[digests["b.bin"]] == len(EXTRA["b.bin"])  # answered with one empty chunk
    assert requested[digests["c.bin"]] == 0
    for path, content in EXTRA.items():
        assert (agent.store.current_dir(rel.name) / path).read_bytes() == content


async def test_a_corrupt_partial_is_refused_not_installed(fake, tmp_path) -> None:
    """A partial whose bytes were altered on disk fails its digest at the end: refused, partial dropped."""
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    digest = blobs_of(fake, EXTRA)["a.bin"]
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    agent.store.partial_path(digest).write_bytes(b"\0" * 8_000)
    task = asyncio.create_task(agent.run())
    await wait_until(lambda: "REFUSED" in fake.states(rel.name))
    agent.stop()
    await asyncio.wait_for(task, timeout=15)
    assert agent.store.current(rel.name) is None and not agent.store.partial_path(digest).exists()
    assert "sha256" in agent.state.refused[rel.name]["reason"]


async def test_an_older_controller_without_pull_blobs_is_pulled_blob_by_blob(fake, tmp_path) -> None:
    fake.pull_blobs_unimplemented = True
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    digests = blobs_of(fake, EXTRA)
    fake.drop_after[digests["a.bin"]] = 2 * fake.chunk_size  # the fallback still resumes
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
        assert fake.pull_calls.count("PullBlobs") == 0  # refused before it counted a call
        assert fake.pull_calls.count("PullBlob") == len(fake.blobs) + 1
        assert [o for d, o in fake.pulls if d == digests["a.bin"]] == [0, 2 * fake.chunk_size]
        # The agent remembers: the next version does not ask for PullBlobs again on this connection.
        fake.pull_calls.clear()
        rel2 = fake.publish("ns/t", write_bundle(tmp_path / "b2", TASK, extra={**EXTRA, "d.bin": b"d" * 100}))
        await wait_until(lambda: agent.state.installed.get(rel2.name) and agent.state.installed[rel2.name].version == 2)
        assert fake.pull_calls == ["PullBlob"]
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
    for path, content in EXTRA.items():
        assert (agent.store.current_dir(rel.name) / path).read_bytes() == content


async def test_more_blobs_than_one_call_may_name_take_several_calls(fake, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(manifest, "MAX_BLOBS_PER_PULL", 2)
    rel = fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    await install(agent, fake, rel.name)
    n = len(fake.blobs)  # task.py, bundle.yaml and the four extra files
    assert fake.pull_calls == ["PullBlobs"] * ((n + 1) // 2)
    assert sorted(fake.pulls) == sorted((d, 0) for d in fake.blobs)


async def test_releases_sharing_a_blob_fetch_it_once(fake, tmp_path) -> None:
    shared = os.urandom(200_000)
    one = fake.publish("ns/one", write_bundle(tmp_path / "one", TASK, extra={"shared.bin": shared, "x": b"1"}))
    two = fake.publish("ns/two", write_bundle(tmp_path / "two", TASK, extra={"shared.bin": shared, "y": b"2"}))
    digest = manifest.sha256_digest(shared)
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "SUCCEEDED" in fake.states(one.name) and "SUCCEEDED" in fake.states(two.name))
    finally:
        agent.stop()
        await asyncio.wait_for(task, timeout=15)
    assert [o for d, o in fake.pulls if d == digest] == [0]
    for rel in (one, two):
        assert (agent.store.current_dir(rel.name) / "shared.bin").read_bytes() == shared


# ---------------------------------------------------------------- the fleet simulator


async def _sim_install(fake, *, full_pull: bool = False) -> simagent.SimAgent:
    channel = grpc.aio.insecure_channel(fake.address)
    agent = simagent.SimAgent(
        channel=channel,
        device_id="sim-1",
        attributes={"os": "android"},
        bootstrap_token=BOOTSTRAP,
        full_pull=full_pull,
        backoff=client.Backoff(initial_s=0.02, max_s=0.2),
    )
    task = asyncio.create_task(agent.run())
    try:
        await wait_until(lambda: "INSTALLED" in fake.states("ns/t"))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close()
    return agent


async def test_the_simulated_agent_pulls_with_one_call_and_resumes(fake, tmp_path) -> None:
    fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    digests = blobs_of(fake, EXTRA)
    fake.drop_after[digests["b.bin"]] = 2 * fake.chunk_size
    agent = await _sim_install(fake)
    assert fake.pull_calls == ["PullBlobs", "PullBlobs"]
    assert [o for d, o in fake.pulls if d == digests["b.bin"]] == [0, 2 * fake.chunk_size]
    assert agent.sink.cache == set(fake.blobs) and agent.error_codes == {"PullBlobs:UNAVAILABLE": 1}
    assert fake.states("ns/t").count("DOWNLOADING") <= 1


async def test_the_simulated_agent_falls_back_to_pull_blob(fake, tmp_path) -> None:
    fake.pull_blobs_unimplemented = True
    fake.publish("ns/t", write_bundle(tmp_path / "b", TASK, extra=EXTRA))
    agent = await _sim_install(fake)
    assert fake.pull_calls == ["PullBlob"] * len(fake.blobs)
    assert agent.sink.cache == set(fake.blobs) and not agent.puller.pull_blobs_ok


# ---------------------------------------------------------------- the real controller


async def test_against_the_real_controller_one_pull_blobs_call_per_install(database_url, tmp_path) -> None:
    pytest.importorskip("tether.controller.server")
    from tether.common import admin_client, bundle_files

    cfg = controller_config(database_url, tmp_path / "blobs", bootstrap_token=BOOTSTRAP, grace_s=0.2, pool_max_size=4)
    async with running_controller(cfg, grace=0.1) as running:
        extra = {"model.bin": os.urandom(700_000), "labels.txt": b"a\nb\n", "empty.bin": b""}
        directory = write_bundle(tmp_path / "bundle", TASK, extra=extra)
        bundle = bundle_files.build_manifest(directory)
        async with admin_client.AdminClient(running.address, token=ADMIN_TOKEN) as adm:
            await adm.upload_bundle(directory, bundle)
            await adm.apply_release(release="ns/real", manifest_digest=bundle.digest)
        state_dir = tmp_path / "dev" / "state"
        agent = make_agent(running.address, state_dir)
        # Half of the model is already here (an earlier attempt was killed): only the rest moves.
        model = bundle.file("model.bin")
        agent.store.partial_path(model.sha256).write_bytes(extra["model.bin"][:300_000])
        task = asyncio.create_task(agent.run())
        try:
            await wait_until(lambda: "ns/real" in agent.state.installed, timeout=60)
        finally:
            agent.stop()
            await asyncio.wait_for(task, timeout=15)
        methods = running.counters.methods
        pulled = methods["/tether.v1.DeviceService/PullBlobs"]
        assert pulled.calls == 1 and "/tether.v1.DeviceService/PullBlob" not in methods
        content = sum(f.size for f in bundle.files) - 300_000
        assert content < pulled.response_bytes < content + 2_000
        for path, data in extra.items():
            assert (agent.store.current_dir("ns/real") / path).read_bytes() == data
