"""Two calls per install: the manifest rides in the Notify, and DOWNLOADING is only reported for slow installs.

A device told about a new version gets GetManifest's answer in the Notify
itself (when small) and checks it exactly as it would the call's; it reports
DOWNLOADING only when its install is still running after
`reporting.DOWNLOADING_REPORT_AFTER_S`, and never after the report that ends the
install. Against the fake controller and once against the real one.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random

import pytest
from agent_fakes import BOOTSTRAP, wait_until, write_bundle
from controller_support import ADMIN_TOKEN, controller_config, running_controller

from tether.agent import client, daemon, reporting

FAST = client.Backoff(initial_s=0.02, max_s=0.2)
TASK = "def run(ctx):\n    return {'sample_count': 1}\n"


def make_agent(address: str, state_dir: pathlib.Path) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=state_dir,
        data_dir=state_dir.parent / "data",
        bootstrap_token=BOOTSTRAP,
        device_id="dev-1",
        attributes={"os": "android"},
        backends=["mnn/cpu"],
        backoff=FAST,
        rng=random.Random(0),
    )


async def connected(agent: daemon.Agent) -> asyncio.Task:
    task = asyncio.create_task(agent.run())
    await wait_until(lambda: agent.connected.is_set() or task.done(), timeout=10)
    return task


async def stop(agent: daemon.Agent, task: asyncio.Task) -> None:
    agent.stop()
    await asyncio.wait_for(task, timeout=15)


# ---------------------------------------------------------------- LateReport


async def test_a_quick_piece_of_work_sends_no_progress_report():
    sent: list[str] = []

    async def send():
        sent.append("DOWNLOADING")

    progress = reporting.LateReport(send, after_s=3600)
    await progress.settle()
    assert sent == [] and not progress.sent


async def test_a_slow_piece_of_work_reports_and_settle_waits_for_the_report_in_flight():
    order: list[str] = []
    arrived = asyncio.Event()

    async def send():
        order.append("progress sent")
        await asyncio.sleep(0.05)  # the report is on the wire when the work finishes
        order.append("progress arrived")
        arrived.set()

    progress = reporting.LateReport(send, after_s=0)
    await wait_until(lambda: progress.sent)
    await progress.settle()
    order.append("final report")
    assert order == ["progress sent", "progress arrived", "final report"]


async def test_a_failing_progress_report_is_swallowed():
    async def send():
        raise ConnectionError("controller away")

    progress = reporting.LateReport(send, after_s=0)
    await wait_until(lambda: progress.sent)
    await progress.settle()  # does not raise: a lost progress report changes nothing


# ---------------------------------------------------------------- the agent, against the fake controller


async def test_the_manifest_carried_by_the_notify_saves_the_get_manifest_call(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "DOWNLOADING_REPORT_AFTER_S", 3600.0)
    fake.inline_manifests = True
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    task = await connected(agent)
    try:
        rel = fake.publish("ns/t", write_bundle(tmp_path / "b1", TASK, extra={"w.bin": os.urandom(50_000)}))
        await wait_until(lambda: "INSTALLED" in fake.states(rel.name))
    finally:
        await stop(agent, task)
    assert fake.manifest_calls == 0
    assert fake.pull_calls == ["PullBlobs"]
    assert fake.states(rel.name)[0] == "INSTALLED"  # quick: straight from notified to installed


async def test_a_tampered_inline_manifest_is_refused_like_a_tampered_answer(fake, tmp_path):
    fake.inline_manifests = True
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    task = await connected(agent)
    try:
        directory = write_bundle(tmp_path / "b1", TASK)
        from tether.common import bundle_files

        fake.tamper_manifests.add(bundle_files.build_manifest(directory).digest)
        rel = fake.publish("ns/t", directory)
        await wait_until(lambda: "REFUSED" in fake.states(rel.name))
    finally:
        await stop(agent, task)
    assert "ns/t" not in agent.state.installed
    assert fake.pull_calls == []  # refused before any download


async def test_a_slow_install_reports_downloading_first_and_installed_last(fake, tmp_path, monkeypatch):
    monkeypatch.setattr(reporting, "DOWNLOADING_REPORT_AFTER_S", 0.0)
    agent = make_agent(fake.address, tmp_path / "dev" / "state")
    task = await connected(agent)
    try:
        rel = fake.publish("ns/t", write_bundle(tmp_path / "b1", TASK))
        await wait_until(lambda: "SUCCEEDED" in fake.states(rel.name))
    finally:
        await stop(agent, task)
    assert fake.states(rel.name) == ["DOWNLOADING", "INSTALLED", "RUNNING", "SUCCEEDED"]
    assert fake.manifest_calls == 1  # no manifest in this Notify: asked for


# ---------------------------------------------------------------- the real controller


def device_calls(running, before: dict[str, int] | None = None) -> dict[str, int]:
    """DeviceService calls per method since `before` (Subscribe and ReportBackends aside: not the install's)."""
    now = {
        m.rsplit("/", 1)[-1]: c.calls - (before or {}).get(m.rsplit("/", 1)[-1], 0)
        for m, c in running.counters.methods.items()
        if "/tether.v1.DeviceService/" in m
    }
    return {m: n for m, n in now.items() if n and (before is None or m not in ("ReportBackends", "Subscribe"))}


async def test_against_the_real_controller_an_install_takes_two_calls(database_url, tmp_path, monkeypatch):
    pytest.importorskip("tether.controller.server")
    from tether.common import admin_client, bundle_files

    monkeypatch.setattr(reporting, "DOWNLOADING_REPORT_AFTER_S", 3600.0)
    cfg = controller_config(database_url, tmp_path / "blobs", bootstrap_token=BOOTSTRAP, grace_s=0.2, pool_max_size=4)
    async with running_controller(cfg, grace=0.1) as running:
        small = write_bundle(tmp_path / "small", TASK, extra={"model.bin": os.urandom(100_000)})
        # 200 files: a manifest of ~25 KB, over the 8 KiB a Notify carries.
        large = write_bundle(tmp_path / "large", TASK, extra={f"shard-{i:03d}.bin": os.urandom(64) for i in range(200)})
        bundles = {p.name: bundle_files.build_manifest(p) for p in (small, large)}
        assert len(bundles["large"].canonical_bytes()) > 8 * 1024
        agent = make_agent(running.address, tmp_path / "dev" / "state")
        task = await connected(agent)
        try:
            async with admin_client.AdminClient(running.address, token=ADMIN_TOKEN) as adm:
                for name, directory in (("small", small), ("large", large)):
                    await adm.upload_bundle(directory, bundles[name])
                    before = device_calls(running)
                    await adm.apply_release(  # runs only when asked: the calls counted are the install's
                        release=f"ns/{name}", manifest_digest=bundles[name].digest, trigger={"type": "onDemand"}
                    )
                    await wait_until(  # INSTALLED reported
                        lambda b=before: device_calls(running, b).get("ReportStatus", 0) >= 1, timeout=60
                    )
                    assert f"ns/{name}" in agent.state.installed
                    counted = device_calls(running, before)
                    if name == "small":
                        assert counted == {"PullBlobs": 1, "ReportStatus": 1}, counted
                    else:  # too large to ride along: asked for
                        assert counted == {"GetManifest": 1, "PullBlobs": 1, "ReportStatus": 1}, counted
        finally:
            await stop(agent, task)
