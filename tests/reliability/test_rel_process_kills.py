"""Process faults: SIGKILL of the controller, the Celery worker and agents at seeded moments (issue 14).

Every part is its own OS process (`tether controller`, `tether worker`,
`tether agent run`), killed with SIGKILL (no clean-up code runs) and
restarted at once, while a release runs on every device every second and
each run uploads a result that a real Celery worker folds into the
aggregate. The victims and moments come from a seeded generator: the same
seed kills the same parts in the same order after the same pauses.

What must hold after the last restart:
- nothing acknowledged is lost: every run an agent recorded as uploaded
  (its `state.json`, read just before each kill) is a stored result;
- no double counting: one stored result per run (idempotency key), and the
  aggregate folds every stored result exactly once (its result count and
  samples equal the rows');
- the rollout completes: every device installed the version and its runs go
  on being stored after the restarts (two more results each).

`TETHER_FAULT_KILLS` (default 3) sets how many kills a run makes and
`TETHER_FAULT_SEED` (default 14) the seed: `TETHER_FAULT_KILLS=30` for a
longer campaign.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import random

import psycopg
import pytest
from controller_support import ADMIN_TOKEN, BOOTSTRAP_TOKEN
from rel_helpers import free_port

from tether.common import admin_client, bundle_files
from tether.devtools import procs

AGENTS = 3
KILLS = int(os.environ.get("TETHER_FAULT_KILLS", "3") or 3)
SEED = int(os.environ.get("TETHER_FAULT_SEED", "14") or 14)
RELEASE = "ns/kills"
pytestmark = pytest.mark.timeout(max(300, 60 * KILLS))


async def _until(predicate, *, timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


class _Fleet:
    """The processes of the test, by name, each restartable on the same address and state."""

    def __init__(self, tmp_path: pathlib.Path, database_url: str, broker_url: str) -> None:
        self.tmp = tmp_path
        self.database_url = database_url
        self.broker_url = broker_url
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.procs: dict[str, procs.Component] = {}
        self.starts: dict[str, int] = {}

    def _argv(self, name: str) -> list[str]:
        if name == "controller":
            return procs.tether_argv(
                "controller",
                *("--listen", self.address, "--database-url", self.database_url, "--broker-url", self.broker_url),
                *("--blob-dir", str(self.tmp / "blobs"), "--admin-token", ADMIN_TOKEN),
                *("--bootstrap-token", BOOTSTRAP_TOKEN, "--grace", "0.2"),
            )
        if name == "worker":
            return procs.tether_argv("worker", "--broker-url", self.broker_url, "--database-url", self.database_url)
        return procs.tether_argv(
            "agent",
            "run",
            *("--controller", self.address, "--bootstrap-token", BOOTSTRAP_TOKEN),
            *("--state-dir", str(self.state_dir(name)), "--device-id", name, "--attr", "os=android"),
        )

    def state_dir(self, name: str) -> pathlib.Path:
        return self.tmp / name / "state"

    async def start(self, name: str) -> None:
        n = self.starts[name] = self.starts.get(name, 0) + 1
        # A killed worker's unacknowledged message goes back to the queue after 3 s (production: 600 s).
        env = {"TETHER_BROKER_VISIBILITY_TIMEOUT": "3"} if name == "worker" else None
        comp = procs.Component(name, self._argv(name), self.tmp / "logs" / f"{name}-{n}.log", env=env).start()
        self.procs[name] = comp
        if name == "controller":
            await comp.wait_for(r"controller listening on", timeout=60)
        elif name == "worker":
            await comp.wait_for(r"worker ready", timeout=60)

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def stop_all(self) -> None:
        for comp in self.procs.values():
            comp.stop(timeout=5)

    def uploaded(self) -> set[str]:
        """Idempotency keys of the runs every agent has recorded as uploaded (acknowledged)."""
        keys: set[str] = set()
        for i in range(AGENTS):
            try:
                doc = json.loads((self.state_dir(f"dev-{i}") / "state.json").read_text())
            except (OSError, ValueError):
                continue
            keys |= {r["key"] for r in (doc.get("runs") or {}).values() if r.get("status") == "uploaded"}
        return keys


async def test_seeded_sigkills_of_controller_worker_and_agents_lose_nothing_and_count_once(
    tmp_path, database_url, broker_url
):
    fleet = _Fleet(tmp_path, database_url, broker_url)
    rng = random.Random(SEED)
    agents = [f"dev-{i}" for i in range(AGENTS)]
    acknowledged: set[str] = set()
    killed: list[str] = []
    try:
        # Given a controller, a worker, three agents and a release that runs every second and uploads
        await fleet.start("controller")
        await fleet.start("worker")
        for name in agents:
            await fleet.start(name)
        root = tmp_path / "bundle"
        root.mkdir()
        (root / "task.py").write_text("def run(ctx):\n    return {'sample_count': 2, 'metrics': {'loss': 0.5}}\n")
        (root / "bundle.yaml").write_text("name: kills\nentrypoint: task.py\n")
        bundle = bundle_files.build_manifest(root)
        async with admin_client.AdminClient(fleet.address, token=ADMIN_TOKEN) as adm:
            await adm.upload_bundle(root, bundle)
            applied = await adm.apply_release(
                release=RELEASE,
                manifest_digest=bundle.digest,
                trigger={"type": "interval", "seconds": 1},
                aggregation={"metrics": "weightedMean", "counts": "sum"},
            )

        # When, at seeded moments, a seeded victim is SIGKILLed and restarted at once
        for _ in range(KILLS):
            victim = rng.choice(["controller", "worker", *agents])
            await asyncio.sleep(rng.uniform(0.5, 4.0))
            acknowledged |= fleet.uploaded()
            fleet.kill(victim)
            killed.append(victim)
            await fleet.start(victim)

        # Then the rollout completes: every device installed it and goes on uploading after the last restart
        def per_device() -> dict[str, int]:
            with psycopg.connect(database_url) as conn:
                rows = conn.execute(
                    "SELECT device_id, count(*) FROM results WHERE release = %s GROUP BY device_id", (RELEASE,)
                ).fetchall()
            return {d: int(n) for d, n in rows}

        after_kills = per_device()

        async def completed() -> bool:
            async with admin_client.AdminClient(fleet.address, token=ADMIN_TOKEN) as adm:
                status = await adm.get_release_status(RELEASE)
            now = per_device()
            return (
                status.version == applied.version
                and status.installed == AGENTS
                and all(now.get(d, 0) >= after_kills.get(d, 0) + 2 for d in agents)
            )

        try:
            await _until(completed, timeout=120, what="the rollout to go on after the restarts")
        except AssertionError:
            print("killed:", killed, {n: c.log_tail(15) for n, c in fleet.procs.items()})
            raise

        # ... and once the devices stop, the worker folds every result exactly once
        for name in agents:
            fleet.procs[name].stop(timeout=10)
        acknowledged |= fleet.uploaded()

        def stored() -> tuple[int, int, int, int, int]:
            with psycopg.connect(database_url) as conn:
                rows, keys, samples = conn.execute(
                    "SELECT count(*), count(DISTINCT idempotency_key), coalesce(sum(sample_count), 0)"
                    " FROM results WHERE release = %s AND version = %s",
                    (RELEASE, applied.version),
                ).fetchone()
                agg = conn.execute(
                    "SELECT result_count, (body->>'samples')::bigint FROM aggregates"
                    " WHERE release = %s AND version = %s",
                    (RELEASE, applied.version),
                ).fetchone()
            folded, folded_samples = agg if agg is not None else (0, 0)
            return int(rows), int(keys), int(samples), int(folded), int(folded_samples or 0)

        async def caught_up() -> bool:
            rows, _, _, folded, _ = stored()
            return rows > 0 and folded == rows

        await _until(caught_up, timeout=120, what="the aggregate to fold every stored result")
        rows, keys, samples, folded, folded_samples = stored()
        with psycopg.connect(database_url) as conn:
            stored_keys = {
                k for (k,) in conn.execute("SELECT idempotency_key FROM results WHERE release = %s", (RELEASE,))
            }
        missing = acknowledged - stored_keys
        assert not missing, f"acknowledged uploads lost after killing {killed}: {sorted(missing)[:5]}"
        assert rows == keys, "a run was stored twice"
        assert (folded, folded_samples) == (rows, samples), f"aggregate double counted or short after {killed}"
        assert samples == 2 * rows
        assert len(killed) == KILLS
        print(f"seed {SEED}: killed {killed}; {rows} results stored and folded once, {len(acknowledged)} acknowledged")
    finally:
        fleet.stop_all()
