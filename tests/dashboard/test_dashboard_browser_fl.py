"""A federated release on a real controller: a published round's point appears on the open page's plot.

The controller's admin API builds `ReleaseStatus.federated_json` itself (`tether.controller.fl.status`
over its round storage); the rounds are written straight into that storage (the round driver is
stopped, no devices train), as the rollout scenarios write device reports. The MLTask lives in the
Kubernetes API emulator. Skipped, saying why, without Chromium.
"""

from __future__ import annotations

import pathlib

import pytest
from browser_support import browser_page, check_clean, login, require_browser, served
from controller_support import ADMIN_TOKEN
from dashboard_support import TOKEN
from rollout.rollout_helpers import start, upload

from tether.common.admin_client import AdminClient
from tether.controller.fl import rounds
from tether.dashboard import settings as settings_mod
from tether.dashboard import webserver
from tether.devtools import emulator

pytestmark = pytest.mark.timeout(180)
RELEASE = "ml/fl-task"


async def publish(storage, number: int, accuracy: float) -> None:
    """Round `number` as the driver hands it to the worker (aggregating), then published with its result."""
    r = rounds.Round(
        task=RELEASE,
        number=number,
        phase=rounds.Phase.AGGREGATING,
        deadline=0.0,
        selected=("a", "b"),
        received=("a", "b"),
    )
    await storage.rounds.create_round(r)
    result = rounds.RoundResult(model=f"sha256:{number:064x}", samples=128, metrics={"accuracy": accuracy})
    assert await storage.rounds.publish_round(task=RELEASE, number=number, result=result)


async def test_a_round_published_by_the_controller_appears_on_the_plot(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    pw_api = require_browser()
    running = await start(database_url, tmp_path)
    try:
        if running.round_driver_task is not None:
            running.round_driver_task.cancel()  # no driver: the test writes the rounds
        async with (
            emulator.emulated_cluster(namespaces=["ml"], workdir=tmp_path / "k8s") as cluster,
            AdminClient(target=running.address, token=ADMIN_TOKEN) as client,
        ):
            digest = await upload(client, tmp_path / "b", {"task.py": b"def run(ctx):\n    return {}\n"})
            await client.apply_release(
                release=RELEASE, manifest_digest=digest, federated={"rounds": 5, "participants": {"count": 2}}
            )
            meta = {"name": "fl-task", "namespace": "ml"}
            await cluster.create({"apiVersion": "tether.dev/v1alpha1", "kind": "MLTask", "metadata": meta, "spec": {}})
            await cluster.patch("ml", "fl-task", {"status": {"release": RELEASE}}, subresource="status")
            await publish(running.storage, 1, 0.61)
            await publish(running.storage, 2, 0.74)
            assert (await client.get_release_status(RELEASE)).federated is not None

            settings = settings_mod.Settings(
                controller=running.address,
                admin_token=ADMIN_TOKEN,
                token=TOKEN,
                kubeconfig=str(cluster.kubeconfig_path),
                namespaces=("ml",),
                interval_s=0.3,
            )
            async with served(webserver.build(settings)) as base, browser_page(pw_api) as (page, problems):
                await login(page, base, TOKEN)
                await page.goto(f"{base}/tasks/ml/fl-task")
                assert await page.locator("#federated-plot").get_attribute("data-points") == "2"
                await publish(running.storage, 3, 0.83)
                await page.wait_for_function(
                    "() => document.getElementById('federated-plot').dataset.points === '3'", timeout=30_000
                )
                assert await page.locator('#federated tr[data-round="3"]').count() == 1
                assert "0.83" in await page.locator('#federated tr[data-round="3"]').inner_text()
                await check_clean(page, problems)
    finally:
        await running.stop()
