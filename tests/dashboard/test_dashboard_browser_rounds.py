"""Federated rounds in headless Chromium, over recorded round status documents (fl-loop's contract).

The federated loop is built on another branch; its status contract (`ReleaseStatus.federated_json`,
docs/internals.md "Federated rounds") is what these documents follow. Given a federated task after
two rounds, when a third round is published, then its point appears on the open page's plot and its
row in the rounds table, without a reload; privacy spent and refusals are shown.
"""

from __future__ import annotations

import copy
import pathlib

import pytest
from browser_support import browser_page, check_clean, login, require_browser, served, shoot
from dashboard_support import TOKEN, Recorded, mltask, release
from test_dashboard_core import FEDERATED

from tether.dashboard import app as app_mod

pytestmark = pytest.mark.timeout(120)


async def test_a_published_round_appears_on_the_plot(tmp_path: pathlib.Path) -> None:
    pw_api = require_browser()
    rec = Recorded()
    task = mltask("mnist-fl")
    task["status"]["federated"] = {"round": 3, "phase": "Collecting"}
    rec.objects["ml/mnist-fl"] = task
    doc = copy.deepcopy(FEDERATED)
    doc["history"] = doc["history"][:2]
    rec.releases["ml/mnist-fl"] = release("ml/mnist-fl", federated=doc, aggregate={"round": 2, "accuracy": 0.81})
    app = app_mod.create_app(rec, token=TOKEN, interval_s=0.2)
    async with served(app) as base, browser_page(pw_api) as (page, problems):
        await login(page, base, TOKEN)
        await page.goto(f"{base}/tasks/ml/mnist-fl")
        assert await page.locator("#federated-plot").get_attribute("data-points") == "2"
        assert "1.25" in await page.locator("#federated [data-field=epsilon]").inner_text()
        assert "Duplicate 1" in await page.locator("#federated").inner_text()

        published = copy.deepcopy(doc)
        published["round"], published["epsilon"] = 4, 1.6
        published["history"].append(
            {"round": 3, "phase": "Published", "participants": 12, "updates": 11, "samples": 700,
             "metrics": {"accuracy": 0.86, "loss": 0.41}, "epsilon": 1.25}
        )  # fmt: skip
        rec.releases["ml/mnist-fl"] = release("ml/mnist-fl", federated=published)
        await page.wait_for_function(
            "() => document.getElementById('federated-plot').dataset.points === '3'", timeout=30_000
        )
        assert await page.locator('#federated tr[data-round="3"]').count() == 1
        assert await page.locator("#federated-plot canvas").count() == 1
        await check_clean(page, problems)
        await shoot(page, "federated", tmp_path / "screenshots")


async def test_keyboard_alone_reaches_a_task_and_errors_on_a_page_fail_the_check(tmp_path: pathlib.Path) -> None:
    pw_api = require_browser()
    rec = Recorded()
    rec.objects["ml/mnist-fl"] = mltask("mnist-fl")
    rec.releases["ml/mnist-fl"] = release("ml/mnist-fl")
    app = app_mod.create_app(rec, token=TOKEN, interval_s=0.5)
    async with served(app) as base, browser_page(pw_api) as (page, problems):
        await login(page, base, TOKEN)
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Skip to content"
        for _ in range(12):
            await page.keyboard.press("Tab")
            if await page.evaluate("document.activeElement.textContent") == "ml/mnist-fl":
                break
        else:
            raise AssertionError("the task's link is not reachable with Tab")
        await page.keyboard.press("Enter")
        await page.wait_for_url(f"{base}/tasks/ml/mnist-fl")
        assert "Not a federated task." in await page.locator("#federated").inner_text()
        await check_clean(page, problems)

        # The check the other tests rely on does fail on a page showing an error.
        await page.goto(f"{base}/tasks/ml/Bad_Name")
        with pytest.raises(AssertionError, match="shows an error"):
            await check_clean(page, problems)
        assert any("HTTP 400" in p for p in problems)
