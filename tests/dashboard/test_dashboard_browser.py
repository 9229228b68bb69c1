"""End to end in headless Chromium: the dashboard over a real controller and the Kubernetes API emulator.

Given a fleet of 200 devices and an MLTask rolled out canary (10 %) → half (50 %) → full, when the devices
install and the operator's decide loop promotes the stages, then the task page's counts and coverage plot
follow without a reload; when the viewer pauses the rollout from the page (confirmation, CSRF token), then
the MLTask's spec says paused and the page shows the rollout paused. Every page is screenshotted (the run's
tmp directory and docs/dashboard/) and fails the test on any console error or error shown.

Real parts: the controller (gRPC admin API on Postgres), the Kubernetes API emulator (kmock) reached by the
dashboard through kubernetes_asyncio, the operator's `reconcile.decide`, uvicorn, Chromium. Simulated: the
devices' reports (through the controller's store) and the operator's clock (bakes pass without sleeping).
"""

from __future__ import annotations

import datetime
import pathlib
from typing import Any

import pytest
from browser_support import browser_page, check_clean, login, require_browser, served, shoot
from controller_support import ADMIN_TOKEN
from dashboard_support import TOKEN
from rollout.rollout_helpers import OperatorLoop, Simulation, enroll_all, mixed_fleet, start, upload

from tether.common.admin_client import AdminClient
from tether.dashboard import settings as settings_mod
from tether.dashboard import webserver
from tether.devtools import emulator

pytestmark = pytest.mark.timeout(240)
WAIT_MS = 30_000  # how long a page may take to show what the controller already has (polls every 0.3 s)


def spec(digest: str) -> dict[str, Any]:
    gates = [{"metric": "devicesReporting", "min": 5}, {"metric": "successRate", "min": 0.9}]
    return {
        "bundle": {"digest": digest},
        "target": {"matchExpressions": [{"key": "os", "operator": "In", "values": ["android", "ios"]}]},
        "rollout": {
            "stages": [
                {"name": "canary", "percent": 10, "bakeSeconds": 60, "gates": gates},
                {"name": "half", "percent": 50, "bakeSeconds": 60, "gates": gates},
                {"name": "full", "percent": 100, "bakeSeconds": 60, "gates": gates},
            ]
        },
    }


class Operator:
    """The operator's decide loop against the controller, its status and events written to the API server."""

    def __init__(self, op: OperatorLoop, cluster: emulator.EmulatedCluster) -> None:
        self.op, self.cluster, self.posted = op, cluster, 0

    async def step(self, seconds: float) -> None:
        obj = await self.cluster.get("ml", "scenario")
        assert obj is not None
        self.op.spec = obj["spec"]
        self.op.annotations = dict((obj.get("metadata") or {}).get("annotations") or {})
        await self.op.advance(seconds)
        await self.cluster.patch("ml", "scenario", {"status": self.op.status_json}, subresource="status")
        for event in self.op.events[self.posted :]:
            self.posted += 1
            await self.cluster.create(
                {
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"name": f"scenario.{self.posted}", "namespace": "ml"},
                    "involvedObject": {"kind": "MLTask", "name": "scenario", "namespace": "ml"},
                    "type": event.type,
                    "reason": event.reason,
                    "message": event.message,
                    "count": 1,
                    "lastTimestamp": self.op.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                },
                plural="events",
            )


async def text_is(page: Any, selector: str, want: str) -> None:
    await page.wait_for_function(
        "([s, w]) => { const e = document.querySelector(s); return e && e.textContent.trim() === w; }",
        arg=[selector, want],
        timeout=WAIT_MS,
    )


async def test_a_staged_rollout_on_the_page_follows_the_controller_and_a_pause_reaches_the_mltask(
    database_url: str, tmp_path: pathlib.Path
) -> None:
    pw_api = require_browser()
    shots = tmp_path / "screenshots"
    fleet = mixed_fleet(200)
    targeted = [d for d in fleet if d.attributes["os"] in ("android", "ios")]
    running = await start(database_url, tmp_path)
    try:
        async with (
            emulator.emulated_cluster(namespaces=["ml"], workdir=tmp_path / "k8s") as cluster,
            AdminClient(target=running.address, token=ADMIN_TOKEN) as client,
        ):
            digest = await upload(client, tmp_path / "v1", {"task.py": b"def run(ctx):\n    return {}\n"})
            await enroll_all(running.storage.devices, fleet)
            await cluster.create(
                {
                    "apiVersion": "tether.dev/v1alpha1",
                    "kind": "MLTask",
                    "metadata": {"name": "scenario", "namespace": "ml"},
                    "spec": spec(digest),
                }
            )
            operator = Operator(
                OperatorLoop(client, spec(digest), name="scenario", now=datetime.datetime.now(datetime.UTC)),
                cluster,
            )
            sim = Simulation(running, fleet, "ml/scenario")
            settings = settings_mod.Settings(
                controller=running.address,
                admin_token=ADMIN_TOKEN,
                token=TOKEN,
                kubeconfig=str(cluster.kubeconfig_path),
                namespaces=("ml",),
                allow_controls=True,
                interval_s=0.3,
            )
            await operator.step(0)  # the release is applied: stage canary
            async with served(webserver.build(settings)) as base, browser_page(pw_api) as (page, problems):
                await login(page, base, TOKEN)
                await page.goto(f"{base}/tasks/ml/scenario")
                await text_is(page, "#summary [data-count=installed]", "0")

                # The canary installs: the counts on the open page follow, the plot gains points.
                await sim.converge()
                await operator.step(1)
                canary = operator.op.status.rollout.stages[0].eligible  # type: ignore[union-attr]
                assert 0 < canary < len(targeted)
                await text_is(page, "#summary [data-count=installed]", str(canary))
                await text_is(page, '#stages tr[data-stage="0"] [data-count=succeeded]', str(canary))
                await page.wait_for_function(
                    "() => Number(document.getElementById('coverage-plot').dataset.points || 0) >= 1",
                    timeout=WAIT_MS,
                )
                first_points = int(await page.locator("#coverage-plot").get_attribute("data-points") or 0)

                # The bake ends, the gates pass: stage half; its devices install.
                await operator.step(61)
                await sim.converge()
                await operator.step(1)
                half = operator.op.status.rollout.stages[1].eligible  # type: ignore[union-attr]
                assert half > canary
                await text_is(page, "#summary [data-field=stage]", "2/3")
                await text_is(page, "#summary [data-count=installed]", str(half))
                await page.wait_for_function(
                    f"() => Number(document.getElementById('coverage-plot').dataset.points || 0) > {first_points}",
                    timeout=WAIT_MS,
                )
                assert await page.locator("#coverage-plot canvas").count() == 1
                assert await page.locator("#events").inner_text() != "No events."
                await check_clean(page, problems)
                await shoot(page, "task", shots)

                # The other pages, each checked clean and shot.
                await page.goto(f"{base}/")
                row = page.locator('tr[data-task="ml/scenario"]')
                assert await row.locator("[data-count=installed]").inner_text() == str(half)
                await check_clean(page, problems)
                await shoot(page, "tasks", shots)
                await page.goto(f"{base}/fleet")
                await page.get_by_label("Filter", exact=False).fill("{matchLabels: {os: ios, tier: high}}")
                await page.get_by_role("button", name="Filter").click()
                want = sum(1 for d in fleet if d.attributes["os"] == "ios" and d.attributes["tier"] == "high")
                await text_is(page, "[data-field=device-count]", f"{want} device{'' if want == 1 else 's'}")
                await check_clean(page, problems)
                await shoot(page, "fleet", shots)
                await page.goto(f"{base}/tasks/ml/scenario/aggregate")
                await check_clean(page, problems)
                await shoot(page, "aggregate", shots)

                # Pause from the page: a confirmation, then the POST with its CSRF token.
                await page.goto(f"{base}/tasks/ml/scenario")
                await page.get_by_role("link", name="Pause…").click()
                await page.wait_for_url(f"{base}/tasks/ml/scenario/control/pause")
                await check_clean(page, problems)
                await shoot(page, "confirm", shots)
                await page.get_by_role("button", name="Yes, pause").click()
                await page.wait_for_url(f"{base}/tasks/ml/scenario?done=pause")
                obj = await cluster.get("ml", "scenario")
                assert obj is not None and obj["spec"]["paused"] is True
                await operator.step(1)  # the operator acts on it
                await page.wait_for_function(
                    "() => document.querySelector('#summary [data-field=phase]')"
                    ".textContent.includes('rollout Paused')",
                    timeout=WAIT_MS,
                )
                await check_clean(page, problems)
    finally:
        await running.stop()
