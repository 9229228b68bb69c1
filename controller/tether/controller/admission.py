"""Admission control for blob pulls: a push makes a whole fleet pull in the same second.

Left alone, the event loop interleaves every pull stream it has accepted: with
2,000 devices pulling at once each makes a little progress per turn and they
all finish together, at the end (processor sharing: the median device waits
about as long as the last). `FifoGate` lets `slots` pulls stream at a time and
queues the rest in arrival order, so devices finish one after another and the
median install takes half as long, for the same total work; the queue also
bounds the memory of chunks in flight.

A slot is held per `quantum_bytes` sent, not per stream: after a quantum the
stream goes to the back of the queue, so a large bundle cannot hold a slot for
long while small pulls wait; a bundle smaller than a quantum streams in one go.
A turn also ends after `turn_s` seconds whatever was sent: a stream waiting on
its reader (HTTP/2 flow control: a slow link, a stalled or hostile client) is
blocked inside its `yield` and cannot give the slot back itself, so the gate
takes it back and lends it to the next in line; the stream queues again before
its next chunk.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator

DEFAULT_SLOTS = 64
DEFAULT_QUANTUM_BYTES = 1024 * 1024
DEFAULT_TURN_S = 10.0


class FifoGate:
    """A counting semaphore that grants slots strictly in arrival order."""

    def __init__(
        self, slots: int = DEFAULT_SLOTS, *, quantum_bytes: int = DEFAULT_QUANTUM_BYTES, turn_s: float = DEFAULT_TURN_S
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if quantum_bytes < 1:
            raise ValueError(f"quantum_bytes must be >= 1, got {quantum_bytes}")
        if turn_s <= 0:
            raise ValueError(f"turn_s must be positive, got {turn_s}")
        self.slots = slots
        self.quantum_bytes = quantum_bytes
        self.turn_s = turn_s
        self.expired_turns = 0  # slots taken back from streams that did not send for turn_s
        self._free = slots
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def active(self) -> int:
        return self.slots - self._free

    @property
    def queued(self) -> int:
        """Waiters in line, O(1) and safe to read from another thread (may count one that just gave up)."""
        return len(self._waiters)

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # granted just as the caller went away: hand the slot on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(future)
            raise

    def release(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)  # the slot passes straight to the next in line
                return
        self._free += 1

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Quantum]:
        """Hold a slot for the body; `Quantum.sent(n)` after each chunk sent (it may queue again)."""
        await self.acquire()
        quantum = Quantum(self)
        try:
            yield quantum
        finally:
            quantum.end()


class Quantum:
    """One stream's turns at the gate: bytes sent in this turn, and the timer that ends it."""

    def __init__(self, gate: FifoGate) -> None:
        self._gate = gate
        self._used = 0
        self.held = False
        self._timer: asyncio.TimerHandle | None = None
        self._begin()

    def _begin(self) -> None:
        self.held = True
        self._used = 0
        self._timer = asyncio.get_running_loop().call_later(self._gate.turn_s, self._expire)

    def _give_back(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.held:
            self.held = False
            self._gate.release()

    def _expire(self) -> None:
        self._timer = None
        if self.held:  # nothing sent for turn_s: the stream is stuck on its reader; lend the slot on
            self._gate.expired_turns += 1
            self._give_back()

    def end(self) -> None:
        self._give_back()

    async def sent(self, n: int) -> None:
        """A chunk went out: go on, or (a quantum used while others wait, or the turn taken back) queue again."""
        if self.held:
            self._used += n
            if self._used < self._gate.quantum_bytes or not self._gate._waiters:
                return
            self._give_back()
        await self._gate.acquire()
        self._begin()
