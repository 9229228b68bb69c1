"""The agent against the REAL controller (gRPC on loopback, embedded Postgres): enrol, push, pull, run MNN, upload."""

from __future__ import annotations

import asyncio
import json
import pathlib
import random

import pytest
from agent_fakes import write_bundle
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN

from tether.agent import client, daemon
from tether.common import admin_client, bundle_files

pytest.importorskip("tether.controller.server")

FAST = client.Backoff(initial_s=0.05, max_s=0.5)


def agent_for(address: str, root: pathlib.Path, data_dir: pathlib.Path, device_id: str, app: str) -> daemon.Agent:
    return daemon.Agent(
        controller=address,
        state_dir=root / device_id,
        data_dir=data_dir,
        bootstrap_token=BOOTSTRAP_TOKEN,
        device_id=device_id,
        attributes={"app": app, "os": "android", "tier": "mid"},
        backends=["mnn/cpu", "onnxruntime/cpu"],
        backoff=FAST,
        rng=random.Random(0),
    )


async def until(predicate, timeout: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def test_agent_enrolls_receives_push_pulls_runs_and_uploads(
    controller, enqueuer, tmp_path, digits_dir, data_dir
) -> None:
    shop = agent_for(controller.address, tmp_path, data_dir, "phone-shop", "shop")
    maps = agent_for(controller.address, tmp_path, data_dir, "phone-maps", "maps")
    runs = [asyncio.create_task(a.run()) for a in (shop, maps)]
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            await until(lambda: _true(shop.connected.is_set() and maps.connected.is_set()), timeout=30)
            bundle = bundle_files.build_manifest(digits_dir)
            upload = await adm.upload_bundle(digits_dir, bundle)
            assert upload.digest == bundle.digest
            applied = await adm.apply_release(
                release="default/digits-eval",
                manifest_digest=bundle.digest,
                target={"matchLabels": {"app": "shop"}},
                trigger={"type": "onInstall"},
                aggregation={"tensors": "weightedMean", "metrics": "weightedMean", "counts": "sum"},
            )

            async def succeeded() -> bool:
                status = await adm.get_release_status("default/digits-eval")
                return status.succeeded >= 1 and status.results >= 1

            await until(succeeded)
            status = await adm.get_release_status("default/digits-eval")
            assert status.version == applied.version
            assert (status.targeted, status.installed + status.succeeded >= 1, status.failed) == (1, True, 0)
    finally:
        for a in (shop, maps):
            a.stop()
        await asyncio.gather(*runs)

    # Only the targeted device installed and ran it, on MNN, and recorded the upload.
    assert shop.store.current("default/digits-eval") == applied.version
    assert maps.store.current("default/digits-eval") is None
    (record,) = shop.state.runs.values()
    assert record.status == "uploaded" and record.message == "mnn/cpu"
    assert enqueuer.calls and enqueuer.calls[-1][0] == "default/digits-eval"
    state = json.loads((tmp_path / "phone-shop" / "state.json").read_text())
    assert state["credential"].startswith("v1.phone-shop.")  # a signed credential


async def test_agent_honours_the_release_trigger_and_timeout(controller, tmp_path) -> None:
    sleeper = write_bundle(
        tmp_path / "slow", "import time\n\ndef run(ctx):\n    time.sleep(20)\n    return {'sample_count': 1}\n"
    )
    ticker = write_bundle(tmp_path / "tick", "def run(ctx):\n    return {'sample_count': 1}\n")
    # The device allows a minute per run (its cap); the slow release asks for one second.
    device = agent_for(controller.address, tmp_path, tmp_path / "data", "phone-1", "shop")
    assert device.limits.timeout_s == 60
    run = asyncio.create_task(device.run())
    try:
        async with admin_client.AdminClient(target=controller.address, token=ADMIN_TOKEN) as adm:
            for name, directory, policy in [
                ("default/slow", sleeper, {"resources": {"timeoutSeconds": 1}}),
                ("default/tick", ticker, {"trigger": {"type": "interval", "seconds": 1}}),
            ]:
                bundle = bundle_files.build_manifest(directory)
                await adm.upload_bundle(directory, bundle)
                await adm.apply_release(release=name, manifest_digest=bundle.digest, **policy)

            async def done() -> bool:
                slow = await adm.get_release_status("default/slow")
                tick = await adm.get_release_status("default/tick")
                return slow.failed == 1 and tick.results >= 2

            await until(done, timeout=30)
            slow = await adm.get_release_status("default/slow")
            assert (slow.succeeded, slow.results) == (0, 0)
    finally:
        device.stop()
        await run

    (slow_run,) = device.state.runs_of("default/slow")
    assert slow_run.status == "failed" and slow_run.message.startswith("task timed out after 1s")
    assert slow_run.finished_at - slow_run.started_at < 10
    ticks = device.state.runs_of("default/tick", 1)
    assert len(ticks) >= 2 and {r.trigger for r in ticks} == {"interval"}


def _true(value: bool):
    async def f() -> bool:
        return value

    return f()
