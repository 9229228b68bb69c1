"""Draining the outbox to the controller: batched, compressed, acked, in order.

One batch in flight per device, so records reach the broker in seq order:
the oldest records (at most the batch limits) go in one `TunnelService.Emit`
call, gzip-compressed; the controller answers only after the broker accepted
them, with `acked_through`, and those rows leave the outbox. Whatever
accumulates during a call is the next batch: no linger timer, so a lone
record goes at once and a burst goes in few calls.

Failures: a retryable error (the controller is away, UNAVAILABLE,
RESOURCE_EXHAUSTED for the rate, FAILED_PRECONDITION: no broker yet)
backs off and sends the same records again: the controller drops the
duplicates by key. A batch refused for its size is split; a single record
the controller refuses for good (its payload or topic over the controller's
own limits) is dropped and counted (`dropped`), so it cannot block the rest.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import grpc

from tether.agent import client
from tether.agent.tunnel.outbox import Outbox, Record
from tether.proto.v1 import tunnel_pb2
from tether.spec import emits

log = logging.getLogger(__name__)

SendBatch = Callable[[tunnel_pb2.EmitBatch], Awaitable[tunnel_pb2.EmitAck]]

_SHRINK = frozenset({emits.LIMIT_BATCH_RECORDS, emits.LIMIT_BATCH_BYTES})
_PERMANENT_FOR_ONE = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})


def limit_named(details: str | None) -> str | None:
    """The limit a RESOURCE_EXHAUSTED refusal names ("tunnel limit NAME exceeded: ..."), if any."""
    text = details or ""
    marker = "tunnel limit "
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split(" ", 1)[0]


def to_batch(records: list[Record]) -> tunnel_pb2.EmitBatch:
    return tunnel_pb2.EmitBatch(
        records=[
            tunnel_pb2.EmitRecord(
                seq=r.seq, topic=r.topic, payload=r.payload, emitted_at_ms=r.emitted_at_ms, release=r.release
            )
            for r in records
        ]
    )


class Uplink:
    """`await uplink.run()` until cancelled; `wake()` after an append."""

    def __init__(
        self,
        *,
        outbox: Outbox,
        send: SendBatch,
        limits: emits.TunnelLimits,
        backoff: client.Backoff = client.Backoff(initial_s=0.2, max_s=30.0),
        rng: random.Random | None = None,
        connected: asyncio.Event | None = None,
    ) -> None:
        self.outbox = outbox
        self._send = send
        self._limits = limits
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._connected = connected
        self._wake = asyncio.Event()
        self._max_records = limits.max_batch_records
        self._max_bytes = limits.max_batch_bytes
        self.sent = 0  # records acked as new
        self.duplicates = 0  # records the cloud already had (acked again after a retry)
        self.dropped = 0  # records refused for good
        self.failures = 0
        self.last_error = ""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        attempt = 0
        while True:
            self._wake.clear()
            batch = self.outbox.oldest(max_records=self._max_records, max_bytes=self._max_bytes)
            if not batch:
                await self._wake.wait()
                continue
            if self._connected is not None and not self._connected.is_set():
                await self._connected.wait()
            try:
                ack = await self._send(to_batch(batch))
            except grpc.aio.AioRpcError as e:
                self.failures += 1
                self.last_error = client.describe(e)
                if self._refused(e, batch):
                    attempt = 0
                    continue
                delay = self._backoff.delay(attempt, self._rng)
                attempt += 1
                log.info("tunnel: %d records wait (%s); retrying in %.1fs", len(self.outbox), self.last_error, delay)
                await asyncio.sleep(delay)
                continue
            except Exception as e:  # a bug or a broken channel must not end the uplink: the records wait
                self.failures += 1
                self.last_error = client.describe(e)
                log.exception("tunnel: sending a batch failed")
                await asyncio.sleep(self._backoff.delay(attempt, self._rng))
                attempt += 1
                continue
            attempt = 0
            self._max_records, self._max_bytes = self._limits.max_batch_records, self._limits.max_batch_bytes
            self.sent += ack.accepted
            self.duplicates += ack.duplicates
            self.outbox.ack(min(ack.acked_through, batch[-1].seq))

    def _refused(self, e: grpc.aio.AioRpcError, batch: list[Record]) -> bool:
        """Handle a refusal of this batch's shape or of one record; False when it is worth a retry as is."""
        code = e.code()
        limit = limit_named(e.details()) if code == grpc.StatusCode.RESOURCE_EXHAUSTED else None
        if limit in _SHRINK and len(batch) > 1:
            self._max_records = max(1, len(batch) // 2)
            return True
        if limit == emits.LIMIT_PAYLOAD or code in _PERMANENT_FOR_ONE:
            if len(batch) > 1:
                self._max_records = 1  # find the record at fault
                return True
            self.outbox.drop(batch[0].seq)
            self.dropped += 1
            log.warning(
                "tunnel: record %d (%s) refused by the controller, dropped: %s",
                batch[0].seq,
                batch[0].topic,
                client.describe(e),
            )
            return True
        return False
