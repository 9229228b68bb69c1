"""Where tunnel records go, and how consumers read them: two Protocols and a URL-based loader.

A broker MUST make `publish` atomic per call as far as de-duplication goes:
a record whose (device, seq) it has seen (its seq is at or below the highest
seq it accepted from that device) is counted as a duplicate and not
delivered again; `publish` returns only once every new record is durable in
the broker (the controller acks the device after that). Records of one
device arrive in seq order (the device sends one batch at a time), so a
per-device high-water mark is enough.

A consumer reads `Delivery`s at least once (a delivery not acked within the
claim time is handed to another consumer of the group) and acks them; each
carries `key` (`<device>:<seq>`) for consumers that must drop duplicates
themselves (a broker plugged in without de-duplication).

Which broker a URL names is `broker_urls.open_broker`'s business.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol


@dataclasses.dataclass(frozen=True)
class Record:
    """One record as the controller accepted it from an authenticated device."""

    device: str
    seq: int
    topic: str
    payload: bytes
    emitted_at_ms: int
    release: str
    received_at_ms: int

    @property
    def key(self) -> str:
        return f"{self.device}:{self.seq}"


@dataclasses.dataclass(frozen=True)
class Published:
    accepted: int
    duplicates: int


@dataclasses.dataclass(frozen=True)
class Delivery:
    """A record as a consumer reads it; `id` is the broker's own (what `ack` takes)."""

    id: str
    topic: str
    device: str
    seq: int
    release: str
    emitted_at_ms: int
    received_at_ms: int
    payload: bytes

    @property
    def key(self) -> str:
        return f"{self.device}:{self.seq}"


class Broker(Protocol):
    async def publish(self, device: str, records: Sequence[Record]) -> Published:
        """Durably add the records new for `device` (in order), dropping those already seen."""

    async def close(self) -> None: ...


class Consumer(Protocol):
    async def read(self, *, count: int = 100, block_ms: int = 1000) -> list[Delivery]:
        """Up to `count` deliveries: first any left pending by a dead consumer, then new ones."""

    async def ack(self, deliveries: Sequence[Delivery]) -> None: ...

    async def close(self) -> None: ...
