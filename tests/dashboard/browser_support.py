"""Headless Chromium for the dashboard's end-to-end tests (Playwright driving Debian's chromium) and a served app.

Never runs `playwright install`: the browser is the system's (`/usr/bin/chromium`, or $TETHER_CHROMIUM);
without it the tests skip and say why. Every page a test opens records its console errors and uncaught
exceptions; `check_clean` fails a test on any of them or on an error shown on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS_SHOTS = REPO / "docs" / "dashboard"
CHROMIUM = os.environ.get("TETHER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


def require_browser() -> Any:
    if not pathlib.Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (install Debian's `chromium` or set TETHER_CHROMIUM)")
    return pytest.importorskip("playwright.async_api", reason="the dev extra's playwright is not installed")


@contextlib.asynccontextmanager
async def served(app: Any) -> AsyncIterator[str]:
    """`app` under uvicorn on a free loopback port; its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def browser_page(pw_api: Any) -> AsyncIterator[tuple[Any, list[str]]]:
    """A page of a fresh headless Chromium at a laptop's size, with the list its console errors go to."""
    problems: list[str] = []
    async with pw_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1366, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on(
                "response",
                lambda r: problems.append(f"HTTP {r.status} for {r.url}") if r.status >= 400 else None,
            )
            yield page, problems
        finally:
            await browser.close()


async def check_clean(page: Any, problems: list[str]) -> None:
    """Fail on any console error, uncaught exception or error shown on the page."""
    shown = await page.locator("[data-error], .problem").all_inner_texts()
    assert shown == [], f"{page.url} shows an error: {shown}"
    assert problems == [], f"{page.url}: {problems}"


async def shoot(page: Any, name: str, tmp: pathlib.Path) -> None:
    """A full-page screenshot into the run's tmp directory, and into docs/dashboard/ (the docs' figures) when
    TETHER_DASHBOARD_DOCS_SHOTS=1: a plain test run never rewrites tracked files."""
    tmp.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(tmp / f"{name}.png"), full_page=True)
    if os.environ.get("TETHER_DASHBOARD_DOCS_SHOTS", "0") == "1":
        DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(DOCS_SHOTS / f"{name}.png"), full_page=True)


async def login(page: Any, base: str, token: str) -> None:
    await page.goto(f"{base}/login")
    await page.get_by_label("Dashboard token").fill(token)
    await page.get_by_role("button", name="Log in").click()
    await page.wait_for_url(f"{base}/")
