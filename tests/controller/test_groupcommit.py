"""Group commit: concurrent reports written as one transaction, each refused or acknowledged on its own."""

import asyncio
import json

import psycopg
import pytest

from tether.common import errors, manifest
from tether.controller import devices, groupcommit, releases

# ---------------------------------------------------------------- the batching itself (no database)


async def test_concurrent_items_share_batches_and_get_their_own_outcomes():
    seen: list[list[int]] = []

    async def apply(items):
        seen.append(list(items))
        await asyncio.sleep(0.01)  # a commit takes time: later arrivals queue for the next batch
        return [ValueError(f"odd {i}") if i % 2 else None for i in items]

    gc = groupcommit.GroupCommit(apply)
    outcomes = await asyncio.gather(*(gc.submit(i) for i in range(100)), return_exceptions=True)
    assert [str(o) if o else None for o in outcomes] == [f"odd {i}" if i % 2 else None for i in range(100)]
    assert sorted(i for batch in seen for i in batch) == list(range(100))  # each item written exactly once
    assert len(seen) < 10 and gc.batches == len(seen) and gc.items == 100


async def test_a_lone_item_is_written_at_once_and_max_batch_bounds_a_batch():
    sizes: list[int] = []

    async def apply(items):
        sizes.append(len(items))
        return [None] * len(items)

    gc = groupcommit.GroupCommit(apply, max_batch=7)
    await gc.submit("one")
    assert sizes == [1]
    await asyncio.gather(*(gc.submit(i) for i in range(30)))
    assert max(sizes) <= 7 and sum(sizes) == 31


async def test_a_failed_batch_fails_every_caller_and_the_next_batch_still_runs():
    calls = 0

    async def apply(items):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("database went away")
        return [None] * len(items)

    gc = groupcommit.GroupCommit(apply)
    first = await asyncio.gather(gc.submit(1), gc.submit(2), return_exceptions=True)
    assert all(isinstance(o, ConnectionError) for o in first)
    await gc.submit(3)  # a new batch, a new chance


async def test_a_cancelled_caller_does_not_cancel_the_batch_others_wait_on():
    release = asyncio.Event()
    written: list[str] = []

    async def apply(items):
        await release.wait()
        written.extend(items)
        return [None] * len(items)

    gc = groupcommit.GroupCommit(apply)
    a = asyncio.create_task(gc.submit("a"))
    b = asyncio.create_task(gc.submit("b"))
    await asyncio.sleep(0)
    a.cancel()
    release.set()
    await b
    assert "b" in written
    with pytest.raises(asyncio.CancelledError):
        await a


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        groupcommit.GroupCommit(lambda items: None, max_batch=0)


# ---------------------------------------------------------------- reports on a real PostgreSQL


async def _release(pg_storage, *, release="ns/t", target=None, content=b"print(1)\n"):
    import hashlib

    d = "sha256:" + hashlib.sha256(content).hexdigest()
    await pg_storage.bundles.put_blob(digest=d, size=len(content))
    m = manifest.Manifest(name="t", entrypoint="task.py", files=(manifest.FileEntry("task.py", d, len(content)),))
    digest = await pg_storage.bundles.put_manifest(body=m.canonical_bytes())
    await pg_storage.releases.apply_release(
        releases.parse_spec(
            release=release,
            generation=1,
            manifest_digest=digest,
            target_json=json.dumps(target or {}),
            trigger_json="",
            aggregation_json="{}",
            paused=False,
            resources_json="",
        )
    )


async def _fleet(pg_storage, n, **attributes):
    for i in range(n):
        await pg_storage.devices.enroll_device(
            device_id=f"d{i:03d}", info=devices.validate_info(attributes=attributes, backends=["mnn/cpu"])
        )
    return sorted(await pg_storage.devices.active_devices(), key=lambda d: d.device_id)


async def test_a_burst_of_reports_is_written_in_few_transactions_and_all_are_stored(
    pg_storage, pg_reporter, database_url
):
    await _release(pg_storage)
    fleet = await _fleet(pg_storage, 200)
    await asyncio.gather(
        *(pg_reporter.report_delivery(device=d, release="ns/t", version=1, state="installed") for d in fleet)
    )
    assert pg_reporter.batches.batches < 100  # 200 reports, far fewer commits
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT state, count(*) FROM deliveries GROUP BY state").fetchall()
    assert rows == [("installed", 200)]


async def test_a_refused_report_fails_alone_and_leaves_no_trace(pg_storage, pg_reporter, database_url):
    await _release(pg_storage, target={"matchLabels": {"os": "android"}})
    android = await _fleet(pg_storage, 3, os="android")
    ios = devices.Device(device_id="i0", attributes={"os": "ios"}, backends=("mnn/cpu",))
    calls = [pg_reporter.report_delivery(device=d, release="ns/t", version=1, state="installed") for d in android]
    calls.append(pg_reporter.report_delivery(device=ios, release="ns/t", version=1, state="installed"))
    calls.append(pg_reporter.report_delivery(device=android[0], release="ns/nope", version=1, state="installed"))
    calls.append(pg_reporter.report_delivery(device=android[1], release="ns/t", version=9, state="installed"))
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert outcomes[:3] == [None, None, None]
    assert isinstance(outcomes[3], errors.PermissionDenied)
    assert isinstance(outcomes[4], errors.NotFound)
    assert isinstance(outcomes[5], errors.FailedPrecondition)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT device_id, version, state FROM deliveries ORDER BY device_id").fetchall()
    assert rows == [(d.device_id, 1, "installed") for d in android]


async def test_reports_of_one_device_in_one_batch_apply_in_order(pg_storage, pg_reporter, database_url):
    await _release(pg_storage)
    [device] = await _fleet(pg_storage, 1)
    await asyncio.gather(
        pg_reporter.report_delivery(device=device, release="ns/t", version=1, state="downloading"),
        pg_reporter.report_delivery(device=device, release="ns/t", version=1, state="installed"),
        pg_reporter.report_delivery(device=device, release="ns/t", version=1, state="succeeded", message="done"),
    )
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT state, message, installed_at IS NOT NULL FROM deliveries").fetchone()
    assert row == ("succeeded", "done", True)


async def test_a_report_the_database_refuses_is_isolated_from_its_batch(pg_storage, pg_reporter, database_url):
    await _release(pg_storage)
    fleet = await _fleet(pg_storage, 5)
    # PostgreSQL text cannot hold NUL: the batch fails, each report is retried alone, only this one is refused.
    calls = [
        pg_reporter.report_delivery(
            device=d, release="ns/t", version=1, state="failed", message="\x00" if i == 2 else ""
        )
        for i, d in enumerate(fleet)
    ]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(outcomes[2], errors.InvalidArgument)
    assert [o for i, o in enumerate(outcomes) if i != 2] == [None] * 4
    with psycopg.connect(database_url) as conn:
        ids = [r[0] for r in conn.execute("SELECT device_id FROM deliveries ORDER BY device_id").fetchall()]
    assert ids == [d.device_id for i, d in enumerate(fleet) if i != 2]
    with pytest.raises(errors.InvalidArgument, match="could not be stored"):  # alone, too
        await pg_reporter.report_delivery(device=fleet[2], release="ns/t", version=1, state="failed", message="\x00")


async def test_a_batch_that_deadlocks_is_tried_again(pg_storage, pg_reporter, database_url, monkeypatch):
    """A deadlock against another writer of deliveries rolled the batch back: it runs again, nothing is lost."""
    from tether.controller.storage import pg_releases

    await _release(pg_storage)
    fleet = await _fleet(pg_storage, 4)
    real = pg_releases._write_deliveries
    calls = 0

    async def deadlocks_once(conn, reports):
        nonlocal calls
        calls += 1
        if calls == 1 and len(reports) > 1:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return await real(conn, reports)

    monkeypatch.setattr(pg_releases, "_write_deliveries", deadlocks_once)
    outcomes = await asyncio.gather(
        *(pg_reporter.report_delivery(device=d, release="ns/t", version=1, state="installed") for d in fleet)
    )
    assert outcomes == [None] * 4
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM deliveries WHERE state = 'installed'").fetchone() == (4,)


async def test_reports_and_a_fleet_wide_notify_do_not_deadlock(pg_storage, pg_reporter):
    """`mark_notified` and report batches lock delivery rows in the same (key) order."""
    await _release(pg_storage)
    fleet = await _fleet(pg_storage, 300)
    ids = [d.device_id for d in fleet]
    rounds = []
    for _ in range(5):
        rounds.append(pg_storage.releases.mark_notified(release="ns/t", version=1, device_ids=list(reversed(ids))))
        rounds.extend(
            pg_reporter.report_delivery(device=d, release="ns/t", version=1, state="installed") for d in fleet[::3]
        )
    outcomes = await asyncio.gather(*rounds, return_exceptions=True)
    assert [o for o in outcomes if o is not None] == []
