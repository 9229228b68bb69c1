"""Network faults between the cloud's own parts (issue 14): controller ↔ PostgreSQL, worker ↔ broker.

The fault proxy sits between the controller and its database (every
database connection, the pool's and the replicas' LISTEN, reset while
devices install, run, report and upload; then the link slowed), and between
a real Celery worker process and Redis (its connections reset while it folds
results). Devices talk to the controller directly. What must hold: the
controller keeps serving (requests that met a dead connection fail
retryably and are retried); counts, results and the aggregate end exact:
nothing acknowledged lost, nothing stored or folded twice.
"""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import psycopg
import pytest
from controller_support import ADMIN_TOKEN, controller_config, start_controller
from psycopg import conninfo
from test_rel_network import _agent, _bundle, _true, _until

from tether.common import admin_client
from tether.controller import enqueue
from tether.devtools import faultproxy, procs

pytestmark = pytest.mark.timeout(240)


async def test_database_connections_reset_under_load_lose_nothing(database_url, tmp_path):
    params = conninfo.conninfo_to_dict(database_url)
    proxy = faultproxy.FaultProxy((str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432)))
    address = await proxy.start()
    via_proxy = conninfo.make_conninfo(**{**params, "host": "127.0.0.1", "port": address.rsplit(":", 1)[1]})
    running = await start_controller(controller_config(via_proxy, tmp_path / "blobs", grace_s=0.2, pool_max_size=4))
    agents = [_agent(tmp_path, running.address, i) for i in range(4)]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=60, what="agents connect")
        source = "import time\n\ndef run(ctx):\n    time.sleep(0.2)\n    return {'sample_count': 3}\n"
        bundle = _bundle(tmp_path / "bundle", source)
        async with admin_client.AdminClient(running.address, token=ADMIN_TOKEN, timeout_s=30) as adm:
            await adm.upload_bundle(tmp_path / "bundle", bundle)
            await adm.apply_release(release="ns/db", manifest_digest=bundle.digest)

            # When every database connection is reset each time the counts move, then the link slows down
            seen, resets = None, 0
            for _ in range(3000):
                try:
                    s = await adm.get_release_status("ns/db")
                except Exception:  # the status read itself may meet a dead connection: that is the point
                    await asyncio.sleep(0.05)
                    continue
                if s.succeeded == 4 and s.results == 4:
                    break
                if (s.installed, s.succeeded, s.results) != seen and resets < 6:
                    seen = (s.installed, s.succeeded, s.results)
                    resets += proxy.reset_all()
                    if resets >= 3:
                        proxy.set(faultproxy.Faults(delay_s=0.005, down_bytes_per_s=256 * 1024))
                await asyncio.sleep(0.05)

            # Then the counts end exact, and each device's result is stored once
            s = await adm.get_release_status("ns/db")
        assert (s.installed, s.succeeded, s.results, s.failed) == (4, 4, 4, 0)
        assert resets >= 2, "the faults were injected"
        with psycopg.connect(database_url) as conn:
            rows = conn.execute(
                "SELECT device_id, count(*), sum(sample_count) FROM results WHERE release = 'ns/db' GROUP BY device_id"
            ).fetchall()
        assert sorted((d, int(n), int(x)) for d, n, x in rows) == [(f"dev-{i}", 1, 3) for i in range(4)]
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        await running.stop(grace=0.1)
        await proxy.stop()


async def test_broker_connections_reset_while_the_worker_folds_lose_no_result(database_url, broker_url, tmp_path):
    redis = conninfo_redis(broker_url)
    proxy = faultproxy.FaultProxy(redis)
    address = await proxy.start()
    via_proxy = f"redis://{address}{urlsplit(broker_url).path}"
    cfg = controller_config(database_url, tmp_path / "blobs", grace_s=0.2)
    running = await start_controller(cfg, enqueuer=enqueue.CeleryEnqueuer(broker_url))
    # A killed or cut-off consumer's unacknowledged message comes back after 3 s (production: 600 s).
    worker = procs.Component(
        "worker",
        procs.tether_argv("worker", "--broker-url", via_proxy, "--database-url", database_url),
        tmp_path / "worker.log",
        env={"TETHER_BROKER_VISIBILITY_TIMEOUT": "3"},
    ).start()
    agents = [_agent(tmp_path, running.address, i) for i in range(3)]
    tasks: list[asyncio.Task[None]] = []
    try:
        await worker.wait_for(r"worker ready", timeout=60)
        tasks = [asyncio.create_task(a.run()) for a in agents]
        await _until(lambda: _true(all(a.connected.is_set() for a in agents)), timeout=60, what="agents connect")
        bundle = _bundle(tmp_path / "bundle", "def run(ctx):\n    return {'sample_count': 2}\n")
        async with admin_client.AdminClient(running.address, token=ADMIN_TOKEN) as adm:
            await adm.upload_bundle(tmp_path / "bundle", bundle)
            applied = await adm.apply_release(
                release="ns/agg", manifest_digest=bundle.digest, trigger={"type": "interval", "seconds": 1}
            )

        def folded() -> tuple[int, int, int]:
            with psycopg.connect(database_url) as conn:
                (rows,) = conn.execute(
                    "SELECT count(*) FROM results WHERE release = 'ns/agg' AND version = %s", (applied.version,)
                ).fetchone()
                agg = conn.execute(
                    "SELECT result_count, (body->>'samples')::bigint FROM aggregates"
                    " WHERE release = 'ns/agg' AND version = %s",
                    (applied.version,),
                ).fetchone()
            return int(rows), int(agg[0]) if agg else 0, int(agg[1] or 0) if agg else 0

        # When the worker's broker connections are reset each time the aggregate moves (6 times)
        resets, last = 0, -1
        for _ in range(3000):
            rows, count, _ = folded()
            if resets >= 6 and rows >= 12:
                break
            if count != last and count > 0:
                last = count
                resets += 1
                proxy.reset_all()
            await asyncio.sleep(0.1)
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks, return_exceptions=True)

        # Then the worker reconnects and folds every stored result exactly once
        async def caught_up() -> bool:
            rows, count, _ = folded()
            return rows > 0 and count == rows

        try:
            await _until(caught_up, timeout=120, what="the aggregate to fold every result")
        except AssertionError:
            print(folded(), worker.log_tail(30))
            raise
        rows, count, samples = folded()
        assert (count, samples) == (rows, 2 * rows)
        assert resets >= 6 and proxy.stats.accepted > 1, "the worker reconnected through the faults"
    finally:
        for a in agents:
            a.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        worker.stop(timeout=10)
        await running.stop(grace=0.1)
        await proxy.stop()


def conninfo_redis(url: str) -> tuple[str, int]:
    """(host, port) of a redis:// URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 6379
