"""A device-wide cap on concurrent task runs, granted fairly: round-robin across tasks.

With a plain semaphore a task whose pattern fires a hundred times in a row
holds every slot while a cron task waits behind all of its runs. `FairSlots`
queues waiters per task and, whenever a slot frees, grants it to the next
task in turn (the one that waited longest since its last grant), so each
task with work gets a slot every `len(tasks)` grants at the latest. A
simulated fleet shares one `FairSlots` between its agents (`tether agent
simulate`): the task is then the agent's device and release.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class FairSlots:
    """`async with slots.hold(task):` at most `capacity` holders at once; waiters served round-robin by task."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.in_use = 0
        self._waiting: collections.OrderedDict[str, collections.deque[asyncio.Future[None]]] = collections.OrderedDict()

    def waiting(self) -> dict[str, int]:
        return {task: len(q) for task, q in self._waiting.items()}

    async def acquire(self, task: str) -> None:
        if self.in_use < self.capacity and not self._waiting:
            self.in_use += 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(task, collections.deque()).append(fut)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()  # granted as we were cancelled: hand it on
            else:
                queue = self._waiting.get(task)
                if queue is not None and fut in queue:
                    queue.remove(fut)
                    if not queue:
                        del self._waiting[task]
            raise

    def release(self) -> None:
        self.in_use -= 1
        while self._waiting and self.in_use < self.capacity:
            task, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            del self._waiting[task]
            if queue:
                self._waiting[task] = queue  # to the back of the line: the other tasks go first
            if not fut.done():
                self.in_use += 1
                fut.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, task: str) -> AsyncIterator[None]:
        await self.acquire(task)
        try:
            yield
        finally:
            self.release()
