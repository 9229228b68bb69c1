"""Crashes mid-rollout: the controller SIGKILLed and restarted, an agent SIGKILLed mid-pull.

Given / When / Then, with every crashing part a real OS process killed with
SIGKILL (no clean-up code runs), and PostgreSQL as the system of record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import pathlib
import random
import signal
import sys

import psycopg
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN, controller_config, start_controller
from rel_helpers import Proxy, free_port

from tether.agent import client, daemon
from tether.common import admin_client, bundle_files
from tether.devtools import procs

FAST = client.Backoff(initial_s=0.05, max_s=0.5)


def _bundle(root: pathlib.Path, source: str, extra: dict[str, bytes] | None = None) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "task.py").write_text(source)
    (root / "bundle.yaml").write_text("name: crash-test\nentrypoint: task.py\n")
    for rel, data in (extra or {}).items():
        (root / rel).write_bytes(data)
    return root


async def _until(predicate, *, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _controller_process(
    tmp_path: pathlib.Path, database_url: str, broker_url: str, port: int, *, log: str
) -> procs.Component:
    argv = procs.tether_argv(
        "controller",
        "--listen",
        f"127.0.0.1:{port}",
        "--database-url",
        database_url,
        "--broker-url",
        broker_url,
        "--blob-dir",
        str(tmp_path / "blobs"),
        "--admin-token",
        ADMIN_TOKEN,
        "--bootstrap-token",
        BOOTSTRAP_TOKEN,
        "--grace",
        "0.2",
    )
    return procs.Component("controller", argv, tmp_path / log).start()


async def test_controller_sigkilled_mid_rollout_loses_nothing_and_the_rollout_completes(
    tmp_path, database_url, broker_url, caplog
):
    caplog.set_level(logging.DEBUG, logger="tether.agent.daemon")
    port = free_port()
    address = f"127.0.0.1:{port}"
    ctl = _controller_process(tmp_path, database_url, broker_url, port, log="controller-1.log")
    agents: list[daemon.Agent] = []
    runs: list[asyncio.Task[None]] = []
    try:
        await ctl.wait_for(r"controller listening on", timeout=60)
        # Given four agents, and a release whose task takes a moment on each device
        for i in range(4):
            agents.append(
                daemon.Agent(
                    controller=address,
                    state_dir=tmp_path / f"dev-{i}" / "state",
                    data_dir=tmp_path / f"dev-{i}" / "data",
                    bootstrap_token=BOOTSTRAP_TOKEN,
                    device_id=f"dev-{i}",
                    attributes={"os": "android"},
                    backends=["mnn/cpu"],
                    backoff=FAST,
                    rng=random.Random(i),
                )
            )
        runs = [asyncio.create_task(a.run()) for a in agents]
        source = "import time\n\ndef run(ctx):\n    time.sleep(0.5)\n    return {'sample_count': 1}\n"
        directory = _bundle(tmp_path / "bundle", source)
        async with admin_client.AdminClient(address, token=ADMIN_TOKEN) as adm:
            await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=60, what="agents connect")
            bundle = bundle_files.build_manifest(directory)
            await adm.upload_bundle(directory, bundle)
            applied = await adm.apply_release(release="ns/crash", manifest_digest=bundle.digest)

        def acknowledged() -> set[str]:
            return {key for a in agents for key, run in a.state.runs.items() if run.status == "uploaded"}

        # When the controller is SIGKILLed once a first upload was acknowledged (the rollout is under way)
        await _until(lambda: _true(bool(acknowledged())), timeout=60, what="a first acknowledged upload")
        ctl.kill()
        acked = acknowledged()

        # ... and restarted on the same address
        ctl = _controller_process(tmp_path, database_url, broker_url, port, log="controller-2.log")
        await ctl.wait_for(r"controller listening on", timeout=60)

        # Then the agents reconnect, the rollout completes, and nothing acknowledged is lost
        async with admin_client.AdminClient(address, token=ADMIN_TOKEN) as adm:

            async def complete() -> bool:
                status = await adm.get_release_status("ns/crash")
                return status.results >= 4 and status.succeeded >= 4

            try:
                await _until(complete, timeout=120, what="the rollout to complete after the restart")
            except AssertionError:
                states = {a.device_id: [(r.status, r.message[:80]) for r in a.state.runs.values()] for a in agents}
                print("release status:", await adm.get_release_status("ns/crash"), "agent runs:", states)
                print(ctl.log_tail(40))
                raise
            status = await adm.get_release_status("ns/crash")
            assert (status.version, status.manifest_digest) == (applied.version, bundle.digest)
        await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=30, what="reconnects")
        with psycopg.connect(database_url) as conn:
            stored = {k for (k,) in conn.execute("SELECT idempotency_key FROM results WHERE release = 'ns/crash'")}
            per_device = conn.execute(
                "SELECT device_id, count(*) FROM results WHERE release = 'ns/crash' GROUP BY device_id"
            ).fetchall()
        assert acked <= stored
        assert sorted(n for _, n in per_device) == [1, 1, 1, 1]  # once each: retries were deduplicated
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*runs, return_exceptions=True)
        ctl.stop(timeout=5)


async def _true(value: bool) -> bool:
    return value


async def test_agent_sigkilled_mid_pull_resumes_from_its_partial_and_installs_a_verified_bundle(tmp_path, database_url):
    running = await start_controller(controller_config(database_url, tmp_path / "blobs", grace_s=0.2, pool_max_size=4))
    # A slow link: about 1 MiB/s from the controller to the device, so the pull takes seconds.
    proxy = Proxy(("127.0.0.1", running.port), down_bytes_per_s=1024 * 1024)
    via_proxy = await proxy.start()
    size = 4 * 1024 * 1024
    model = os.urandom(size)
    weights = os.urandom(1024 * 1024)  # a second blob, after the model in the manifest: one PullBlobs call for both
    state_dir = tmp_path / "device" / "state"
    agent: procs.Component | None = None

    def agent_process(target: str, log: str) -> procs.Component:
        argv = [
            sys.executable,
            "-m",
            "tether.cli.main",
            "agent",
            "run",
            "--controller",
            target,
            "--bootstrap-token",
            BOOTSTRAP_TOKEN,
            "--state-dir",
            str(state_dir),
            "--device-id",
            "phone-1",
            "--attr",
            "os=android",
        ]
        return procs.Component("agent", argv, tmp_path / log).start()

    def pull_stats(method: str):
        return running.counters.methods.get(f"/tether.v1.DeviceService/{method}") if running.counters else None

    def pulled_bytes() -> int:  # by either pull call: a fallback to PullBlob would count too
        return sum(s.response_bytes for m in ("PullBlob", "PullBlobs") if (s := pull_stats(m)) is not None)

    def pull_calls() -> int:
        stats = pull_stats("PullBlobs")
        return stats.calls if stats else 0

    try:
        directory = _bundle(
            tmp_path / "bundle",
            "def run(ctx):\n    return {'sample_count': 1}\n",
            {"model.bin": model, "weights.bin": weights},
        )
        bundle = bundle_files.build_manifest(directory)
        (model_entry,) = [f for f in bundle.files if f.path == "model.bin"]
        (weights_entry,) = [f for f in bundle.files if f.path == "weights.bin"]
        small = sum(f.size for f in bundle.files if f.path not in ("model.bin", "weights.bin"))
        partial = state_dir / "blobs" / "partial" / f"{model_entry.sha256.removeprefix('sha256:')}.part"
        async with admin_client.AdminClient(running.address, token=ADMIN_TOKEN) as adm:
            await adm.upload_bundle(directory, bundle)
            applied = await adm.apply_release(release="ns/big", manifest_digest=bundle.digest)

        # Given an agent pulling a 4 MiB blob over a slow link
        agent = agent_process(via_proxy, "agent-1.log")

        async def midway() -> bool:
            return partial.exists() and 512 * 1024 <= partial.stat().st_size < size - 512 * 1024

        await _until(midway, timeout=60, what="the pull to be under way")
        # When it is SIGKILLed mid-pull
        os.killpg(agent.pid, signal.SIGKILL)
        agent.proc.wait()
        await asyncio.sleep(0.5)
        kept = partial.stat().st_size
        assert 0 < kept < size
        sent_before = pulled_bytes()
        calls_before = pull_calls()
        assert calls_before >= 1  # the agent pulled with PullBlobs

        # Then, restarted, it resumes from what it kept and installs the verified bundle
        agent = agent_process(running.address, "agent-2.log")

        async def installed() -> bool:
            try:
                state = json.loads((state_dir / "state.json").read_text())
            except (OSError, ValueError):
                return False
            return state.get("installed", {}).get("ns/big", {}).get("version") == applied.version

        await _until(installed, timeout=60, what="the install after the restart")
        resent = pulled_bytes() - sent_before
        missing = size - kept + len(weights) + small
        assert resent <= missing + 64 * 1024, f"re-sent {resent} bytes; {missing} were missing"
        # Everything still missing came in one PullBlobs call, the model resumed from its partial.
        assert pull_calls() - calls_before == 1
        assert pull_stats("PullBlob") is None
        blob = state_dir / "blobs" / "sha256" / model_entry.sha256.removeprefix("sha256:")
        assert blob.read_bytes() == model and not partial.exists()
        weights_blob = state_dir / "blobs" / "sha256" / weights_entry.sha256.removeprefix("sha256:")
        assert weights_blob.read_bytes() == weights
        installed_dirs = list((state_dir / "installs").iterdir())
        assert len(installed_dirs) == 1
        assert (installed_dirs[0] / str(applied.version) / "model.bin").read_bytes() == model
        assert (installed_dirs[0] / str(applied.version) / "weights.bin").read_bytes() == weights
    finally:
        if agent is not None:
            agent.stop(timeout=5)
        await proxy.stop()
        await running.stop(grace=0.1)


@pytest.fixture(autouse=True)
def _no_leaked_env(monkeypatch):
    monkeypatch.delenv("TETHER_CONTROLLER", raising=False)
