"""`TunnelService.Emit`: a device's batch to the broker, acked only after the broker has it.

Thin: the edge has authenticated the device (the records are its own:
nothing in the request names a device), `emit_checks` checks the batch,
the device's token buckets (`tether.spec.emits`, the agent's rates with
`controller_slack` times the bursts; per controller process, so N replicas
allow up to N times as much to a device that spreads its calls) charge it,
and the broker publishes it, dropping what it has seen by (device, seq).
A refusal is a typed error (RESOURCE_EXHAUSTED naming the limit,
INVALID_ARGUMENT naming the field, FAILED_PRECONDITION without a broker);
the edge maps it. Nothing is published from a refused batch.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

import grpc

from tether.common import errors
from tether.controller import edge, instruments
from tether.controller.tunnel import brokers, emit_checks
from tether.proto.v1 import tunnel_pb2, tunnel_pb2_grpc
from tether.spec import emits

MAX_TRACKED_DEVICES = 200_000


class TunnelService(tunnel_pb2_grpc.TunnelServiceServicer):
    def __init__(
        self,
        *,
        broker: brokers.Broker | None,
        limits: emits.TunnelLimits = emits.TunnelLimits(),
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], float] = time.time,
        metrics: instruments.ControllerMetrics | None = None,
    ) -> None:
        self.broker = broker
        self._metrics = metrics
        self.limits = limits
        self._monotonic = monotonic
        self._clock = clock
        # device -> (records bucket, bytes bucket), least recently used first (bounded).
        self._buckets: collections.OrderedDict[str, tuple[emits.TokenBucket, emits.TokenBucket]] = (
            collections.OrderedDict()
        )
        self.accepted = 0
        self.duplicates = 0
        self.refused = 0

    def _charge(self, device: str, count: int, nbytes: int) -> None:
        now = self._monotonic()
        pair = self._buckets.get(device)
        if pair is None:
            pair = self.limits.controller_buckets(now)
            self._buckets[device] = pair
            if len(self._buckets) > MAX_TRACKED_DEVICES:
                self._buckets.popitem(last=False)  # a device idle that long has a full bucket anyway
        else:
            self._buckets.move_to_end(device)
        emits.take_both(pair[0], pair[1], count=count, nbytes=nbytes, now=now)

    def _count(self, outcome: str, n: int) -> None:
        if self._metrics is not None and n:
            self._metrics.tunnel[outcome].inc(n)

    async def Emit(self, request: tunnel_pb2.EmitBatch, context: grpc.aio.ServicerContext) -> tunnel_pb2.EmitAck:
        device = edge.current_device().device_id
        try:
            size = emit_checks.check_batch(request.records, self.limits)
            if self.broker is None:
                raise errors.FailedPrecondition("this controller has no tunnel broker (TETHER_TUNNEL_URL)")
            self._charge(device, len(request.records), size)
        except errors.TetherError:
            self.refused += 1
            self._count("refused", len(request.records))
            raise
        now_ms = int(self._clock() * 1000)
        published = await self.broker.publish(
            device,
            [
                brokers.Record(
                    device=device,
                    seq=r.seq,
                    topic=r.topic,
                    payload=r.payload,
                    emitted_at_ms=r.emitted_at_ms,
                    release=r.release,
                    received_at_ms=now_ms,
                )
                for r in request.records
            ],
        )
        self.accepted += published.accepted
        self.duplicates += published.duplicates
        self._count("accepted", published.accepted)
        self._count("duplicate", published.duplicates)
        return tunnel_pb2.EmitAck(
            acked_through=request.records[-1].seq, accepted=published.accepted, duplicates=published.duplicates
        )
