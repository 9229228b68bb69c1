"""`tether bundle build` and `tether status` against a real controller process."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from tether.cli.demo import example_dir
from tether.common import manifest
from tether.common.admin_client import AdminClient
from tether.devtools import procs

ADMIN = "admin-token-for-cli-tests"


@pytest.fixture()
def controller_address(database_url, broker_url, tmp_path):
    comp = procs.Component(
        "controller",
        procs.tether_argv(
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            database_url,
            "--blob-dir",
            str(tmp_path / "blobs"),
            "--admin-token",
            ADMIN,
            "--bootstrap-token",
            "bootstrap-for-cli-tests",
            "--broker-url",
            broker_url,
        ),
        tmp_path / "controller.log",
    ).start()
    try:
        m = asyncio.run(comp.wait_for(r"controller listening on (\S+:\d+)", timeout=60))
        yield m.group(1)
    finally:
        comp.stop()


def _tether(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, **(env_extra or {})},
    )


def test_build_writes_a_content_addressed_bundle_and_uploads_only_missing_blobs(controller_address, tmp_path):
    task = tmp_path / "task"
    shutil.copytree(example_dir() / "task", task)
    out = tmp_path / "out"
    first = _tether(
        "bundle", "build", str(task), "--out", str(out), "--controller", controller_address, "--admin-token", ADMIN
    )
    assert first.returncode == 0, first.stderr
    digest = first.stdout.strip().splitlines()[-1]
    manifest.check_digest(digest)
    # The local bundle is content-addressed: every blob file is named by its sha256.
    for blob in (out / "blobs" / "sha256").iterdir():
        assert manifest.file_digest(blob)[0] == "sha256:" + blob.name
    body = (out / "manifests" / (digest.split(":")[1] + ".json")).read_bytes()
    assert manifest.sha256_digest(body) == digest
    assert "uploaded 4 missing blobs" in first.stdout

    # Same content again: nothing to upload. One changed file: exactly one blob moves.
    again = _tether(
        "bundle", "build", str(task), "--out", str(out), "--controller", controller_address, "--admin-token", ADMIN
    )
    assert "uploaded 0 missing blobs (0 bytes)" in again.stdout
    (task / "task.py").write_text((task / "task.py").read_text() + "\n# v2\n")
    changed = _tether(
        "bundle", "build", str(task), "--out", str(out), "--controller", controller_address, "--admin-token", ADMIN
    )
    size = (task / "task.py").stat().st_size
    assert f"uploaded 1 missing blobs ({size} bytes)" in changed.stdout
    assert changed.stdout.strip().splitlines()[-1] != digest

    async def manifest_known() -> list[str]:
        async with AdminClient(controller_address, token=ADMIN) as admin:
            return await admin.missing_blobs([f.sha256 for f in manifest.Manifest.from_bytes(body).files])

    assert asyncio.run(manifest_known()) == []


def test_build_rejects_a_bad_bundle_directory_with_a_clear_error(tmp_path):
    task = tmp_path / "task"
    task.mkdir()
    (task / "bundle.yaml").write_text("name: Bad Name\nentrypoint: task.py\n")
    (task / "task.py").write_text("def run(ctx):\n    return {}\n")
    proc = _tether("bundle", "build", str(task), "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "name" in proc.stderr


def test_status_shows_a_release_and_fails_clearly_for_an_unknown_one(controller_address, tmp_path):
    proc = _tether("status", "default/nope", "--controller", controller_address, "--admin-token", ADMIN)
    assert proc.returncode != 0
    assert "default/nope" in proc.stderr or "NOT_FOUND" in proc.stderr

    task = example_dir() / "task"
    built = _tether(
        "bundle",
        "build",
        str(task),
        "--out",
        str(tmp_path / "out"),
        "--controller",
        controller_address,
        "--admin-token",
        ADMIN,
    )
    digest = built.stdout.strip().splitlines()[-1]

    async def apply() -> None:
        async with AdminClient(controller_address, token=ADMIN) as admin:
            await admin.apply_release(
                release="default/digits",
                manifest_digest=digest,
                generation=1,
                target={"matchLabels": {"app": "shop"}},
                trigger={"type": "onInstall"},
                aggregation={},
                paused=False,
            )

    asyncio.run(apply())
    shown = _tether(
        "status", "digits", "-n", "default", "--controller", controller_address, "--admin-token", ADMIN, "--json"
    )
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["release"] == "default/digits" and doc["manifest_digest"] == digest and doc["targeted"] == 0
    table = _tether("status", "default/digits", "--controller", controller_address, "--admin-token", ADMIN)
    assert table.returncode == 0 and "default/digits" in table.stdout
