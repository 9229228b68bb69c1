"""`tether controller` as its own process: readiness line, serving, graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN

from tether.common import admin_client


def _env(database_url: str, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(
        {
            "TETHER_DATABASE_URL": database_url,
            # Nothing listens there: the controller only publishes after an upload, which this test never makes.
            "TETHER_BROKER_URL": "redis://127.0.0.1:9/0",
            "TETHER_ADMIN_TOKEN": ADMIN_TOKEN,
            "TETHER_BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN,
            "TETHER_BLOB_DIR": str(tmp_path / "blobs"),
        }
    )
    return env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_controller_command_prints_ready_line_serves_and_stops_on_signal(database_url, tmp_path, sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tether.cli.main", "controller", "--listen", "127.0.0.1:0", "--grace", "1"],
        env=_env(database_url, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("controller listening on 127.0.0.1:"), (line, proc.stderr.read() if proc.poll() else "")
        address = line.removeprefix("controller listening on ")
        assert not address.endswith(":0")
        async with admin_client.AdminClient(target=address, token=ADMIN_TOKEN) as client:
            assert await client.list_releases() == []
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        assert (tmp_path / "blobs" / "sha256").is_dir()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_settings_fail_with_a_clear_message(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    r = subprocess.run(
        [sys.executable, "-m", "tether.cli.main", "controller", "--listen", "127.0.0.1:0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0
    assert "TETHER_DATABASE_URL" in r.stderr
