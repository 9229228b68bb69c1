"""The round driver's per-task advisory lock: a pass skips a task another holds; a rollback waits its turn."""

from __future__ import annotations

import asyncio

from tether.controller import db, round_driver


async def test_a_pass_skips_a_held_task_and_a_waiter_gets_it_when_the_holder_is_done(database_url) -> None:
    pool = await db.open_pool(database_url, max_size=4)
    try:
        lock = round_driver.AdvisoryLock(pool)
        release = asyncio.Event()
        held = asyncio.Event()

        async def holder() -> None:
            async with lock.hold("ns/t") as mine:
                assert mine
                held.set()
                await release.wait()

        first = asyncio.create_task(holder())
        await held.wait()
        async with lock.hold("ns/t") as mine:  # a driver pass: does not wait
            assert not mine
        async with lock.hold("ns/other") as mine:  # another task is free
            assert mine
        async with lock.hold("ns/t", wait_s=0.2) as mine:  # the holder outlives the wait
            assert not mine

        async def waiter() -> bool:
            async with lock.hold("ns/t", wait_s=30) as mine:
                return mine

        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.3)
        assert not waiting.done()
        release.set()
        assert await asyncio.wait_for(waiting, 30)  # a rollback waits for the pass in progress
        await first
    finally:
        await pool.close()
