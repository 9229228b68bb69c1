"""Group commit: many concurrent small writes become one transaction, each caller still told its own outcome.

When a push reaches a whole fleet, every device reports DOWNLOADING and then
INSTALLED within the same second. Written one transaction each, that is a
COMMIT (and an fsync) per report and a pooled connection per report, and the
database, not the work, sets the pace. `GroupCommit` queues the items that
arrive while a batch is being written and writes them as the next batch:

- a lone item is written at once (no timer: an idle controller adds no latency);
- under load, batches grow by themselves to whatever arrived during the last
  write (up to `max_batch`), so throughput follows the database's commit rate
  times the batch size instead of the commit rate alone;
- `submit` returns only after the batch that holds the item committed, so an
  acknowledged write is durable exactly as a one-item transaction would be;
- each item has its own outcome (the batch function returns one per item): a
  refused item fails its own caller only.

The batch runs in a task of its own, so a caller that goes away (a cancelled
RPC) does not cancel the batch the other callers are waiting on. Its item may
then still be written, as with a cancelled call whose COMMIT was in flight.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

BatchFn = Callable[[Sequence[T]], Awaitable[Sequence[BaseException | None]]]


class GroupCommit(Generic[T]):
    """Batch concurrent `submit` calls through `apply`, which returns one outcome (None or an exception) per item."""

    def __init__(self, apply: BatchFn[T], *, max_batch: int = 512) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._apply = apply
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self.batches = 0  # written so far (for stats and tests)
        self.items = 0

    async def submit(self, item: T) -> None:
        """Write `item` in the next batch; returns once it committed, raises its own refusal otherwise."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((item, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name="group-commit")
        await future

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self._max_batch]
            del self._pending[: self._max_batch]
            batch = [(item, f) for item, f in batch if not f.cancelled()]  # their callers are gone
            if not batch:
                continue
            try:
                outcomes = await self._apply([item for item, _ in batch])
                if len(outcomes) != len(batch):
                    raise RuntimeError(f"batch function returned {len(outcomes)} outcomes for {len(batch)} items")
            except Exception as e:  # the whole batch failed (database down, pool exhausted): every caller hears it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            except BaseException:  # cancelled (shutdown): fail the callers rather than leave them waiting
                for _, future in batch + self._pending:
                    if not future.done():
                        future.cancel()
                self._pending.clear()
                raise
            self.batches += 1
            self.items += len(batch)
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():
                    continue
                if outcome is None:
                    future.set_result(None)
                else:
                    future.set_exception(outcome)
