"""The pull gate: at most `slots` pulls stream at once, granted strictly in arrival order."""

import asyncio

import pytest

from tether.controller import admission


async def test_slots_are_granted_in_arrival_order_and_bounded():
    gate = admission.FifoGate(2)
    order: list[int] = []
    running = 0
    peak = 0

    async def pull(i: int) -> None:
        nonlocal running, peak
        async with gate.slot():
            running += 1
            peak = max(peak, running)
            order.append(i)
            await asyncio.sleep(0.005)
            running -= 1

    await asyncio.gather(*(pull(i) for i in range(20)))
    assert order == list(range(20))
    assert peak == 2
    assert gate.active == 0 and gate.waiting == 0


async def test_after_a_quantum_a_stream_goes_to_the_back_of_the_queue():
    gate = admission.FifoGate(1, quantum_bytes=100)
    events: list[str] = []

    async def big() -> None:
        async with gate.slot() as quantum:
            for n in range(3):
                events.append(f"big {n}")
                await asyncio.sleep(0.01)  # the chunk goes out (the others queue meanwhile)
                await quantum.sent(100)  # a quantum each time: others waiting go first

    async def small(name: str) -> None:
        async with gate.slot() as quantum:
            events.append(name)
            await quantum.sent(10)

    first = asyncio.create_task(big())
    await asyncio.sleep(0)  # big holds the slot
    others = [asyncio.create_task(small(f"small {i}")) for i in range(2)]
    await asyncio.gather(first, *others)
    assert events[:3] == ["big 0", "small 0", "small 1"]
    assert events[3:] == ["big 1", "big 2"]  # nobody waiting: big keeps the slot


async def test_a_cancelled_waiter_gives_its_place_up_and_a_cancelled_holder_its_slot():
    gate = admission.FifoGate(1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    later = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.release()
    await asyncio.wait_for(later, 1)  # the slot skipped the cancelled waiter
    assert gate.active == 1
    gate.release()
    assert gate.active == 0


async def test_a_stream_closed_mid_way_releases_its_slot():
    gate = admission.FifoGate(1)

    async def stream():
        async with gate.slot() as quantum:
            for i in range(10):
                yield i
                await quantum.sent(1)

    s = stream()
    assert await s.__anext__() == 0
    assert gate.active == 1
    await s.aclose()  # the client went away: gRPC closes the handler's generator
    assert gate.active == 0


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="slots"):
        admission.FifoGate(0)
    with pytest.raises(ValueError, match="quantum"):
        admission.FifoGate(1, quantum_bytes=0)


async def test_a_stream_stuck_on_its_reader_loses_its_turn_and_queues_again():
    gate = admission.FifoGate(1, turn_s=0.05)
    reader_back = asyncio.Event()
    order: list[str] = []

    async def stalled() -> None:
        async with gate.slot() as quantum:
            await reader_back.wait()  # blocked in its `yield`: the client stopped reading
            await quantum.sent(10)  # its turn was taken back: it queues before the next chunk
            order.append("stalled resumed")

    async def patient() -> None:
        async with gate.slot():
            order.append("patient")

    first = asyncio.create_task(stalled())
    await asyncio.sleep(0)
    await asyncio.wait_for(patient(), 1)  # got the slot although the first stream never gave it back
    assert gate.expired_turns == 1 and order == ["patient"]
    reader_back.set()
    await asyncio.wait_for(first, 1)
    assert order == ["patient", "stalled resumed"]
    assert gate.active == 0 and gate.waiting == 0
