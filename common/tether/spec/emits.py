"""The real-time tunnel's rules, shared by both ends: topics, bounds and the per-device rate.

A task's `ctx.emit(topic, payload)` travels device → controller → broker
(docs/internals.md, "Real-time tunnel"). The agent checks every emit against
these limits before it enters the outbox (so the task hears at once why an
emit was refused), and the controller checks them again on every batch (a
device running other code cannot bypass them): the same parser, the same
numbers, one place.

- `check_topic`: a topic is 1-128 characters of `[A-Za-z0-9._:/-]`, starting
  with a letter or digit (it becomes a Redis key and a CLI argument).
- `TunnelLimits`: per payload, per batch, outbox bytes and the per-device
  token buckets (records/s and bytes/s, each with a burst).
- `TokenBucket`: the classic bucket on an injected clock reading (no sleeping,
  no I/O), so the agent's and the controller's enforcement are tested directly.
- `LimitExceeded`: RESOURCE_EXHAUSTED naming the limit (`limit` is one of the
  `LIMIT_*` names), what was asked and what is allowed.

Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import re

from tether.common import errors

MAX_TOPIC_CHARS = 128
TOPIC_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")

# The names a refusal carries (in its message and `LimitExceeded.limit`).
LIMIT_PAYLOAD = "payload_bytes"
LIMIT_BATCH_RECORDS = "batch_records"
LIMIT_BATCH_BYTES = "batch_bytes"
LIMIT_RATE_RECORDS = "records_per_s"
LIMIT_RATE_BYTES = "bytes_per_s"
LIMIT_OUTBOX = "outbox_bytes"


class LimitExceeded(errors.TetherError):
    """An emit or a batch over a tunnel limit: RESOURCE_EXHAUSTED naming it."""

    code = "RESOURCE_EXHAUSTED"

    def __init__(self, limit: str, message: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(f"tunnel limit {limit} exceeded: {message}")
        self.limit = limit
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True, kw_only=True)
class TunnelLimits:
    """Bounds of one device's tunnel. The controller allows `controller_slack` times the bursts (retries)."""

    max_payload_bytes: int = 64 * 1024
    max_batch_records: int = 256
    max_batch_bytes: int = 1024 * 1024
    max_outbox_bytes: int = 64 * 1024 * 1024
    records_per_s: float = 50.0
    burst_records: float = 200.0
    bytes_per_s: float = 1024 * 1024
    burst_bytes: float = 4 * 1024 * 1024
    controller_slack: float = 2.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise errors.InvalidArgument(f"tunnel limit {field.name}: {value!r} must be a positive number")
        if self.max_payload_bytes > self.max_batch_bytes:
            raise errors.InvalidArgument("tunnel limit max_payload_bytes must not exceed max_batch_bytes")
        if self.burst_bytes < self.max_payload_bytes:
            raise errors.InvalidArgument("tunnel limit burst_bytes must admit one payload of max_payload_bytes")
        if self.burst_records < 1:
            raise errors.InvalidArgument("tunnel limit burst_records must be at least 1")

    def device_buckets(self, now: float) -> tuple[TokenBucket, TokenBucket]:
        """(records, bytes) buckets as the agent enforces them, full at `now`."""
        return (
            TokenBucket(rate=self.records_per_s, burst=self.burst_records, now=now),
            TokenBucket(rate=self.bytes_per_s, burst=self.burst_bytes, now=now),
        )

    def controller_buckets(self, now: float) -> tuple[TokenBucket, TokenBucket]:
        """(records, bytes) buckets as the controller enforces them: the same rates, `controller_slack` x bursts."""
        s = self.controller_slack
        return (
            TokenBucket(rate=self.records_per_s, burst=self.burst_records * s, now=now),
            TokenBucket(rate=self.bytes_per_s, burst=self.burst_bytes * s, now=now),
        )


def check_topic(topic: object) -> str:
    """The topic, or InvalidArgument naming `topic` and what is wrong."""
    if not isinstance(topic, str):
        raise errors.InvalidArgument(f"topic: must be a string, got {type(topic).__name__}")
    if not TOPIC_RE.fullmatch(topic):
        raise errors.InvalidArgument(
            f"topic: {errors.excerpt(topic)} must be 1-{MAX_TOPIC_CHARS} characters of [A-Za-z0-9._:/-], "
            "starting with a letter or digit"
        )
    return topic


def check_payload(size: int, limits: TunnelLimits) -> None:
    if size > limits.max_payload_bytes:
        raise LimitExceeded(LIMIT_PAYLOAD, f"payload of {size} bytes, at most {limits.max_payload_bytes} allowed")


def check_batch(records: int, size: int, limits: TunnelLimits) -> None:
    """A batch's shape (the controller's check): counts and bytes within the limits."""
    if records > limits.max_batch_records:
        raise LimitExceeded(
            LIMIT_BATCH_RECORDS, f"batch of {records} records, at most {limits.max_batch_records} allowed"
        )
    if size > limits.max_batch_bytes:
        raise LimitExceeded(LIMIT_BATCH_BYTES, f"batch of {size} bytes, at most {limits.max_batch_bytes} allowed")


class TokenBucket:
    """`rate` tokens per second up to `burst`; `take(n, now)` spends n or raises, spending nothing."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, *, rate: float, burst: float, now: float) -> None:
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, n: float, now: float) -> float:
        """Seconds until `n` tokens are there (0: now; inf: never, n is over the burst)."""
        self._refill(now)
        if n > self.burst:
            return float("inf")
        return max(0.0, (n - self.tokens) / self.rate)

    def take(self, n: float, now: float, *, limit: str) -> None:
        """Spend `n` tokens, or raise LimitExceeded(`limit`) with the wait, spending nothing."""
        wait = self.wait_s(n, now)
        if wait > 0:
            raise LimitExceeded(
                limit,
                f"{n:g} asked, {self.tokens:.0f} left of a burst of {self.burst:g} at {self.rate:g}/s; "
                f"retry in {wait:.3f}s",
                retry_after_s=wait,
            )
        self.tokens -= n


def take_both(records: TokenBucket, size: TokenBucket, *, count: int, nbytes: int, now: float) -> None:
    """Spend from the records and bytes buckets together: both or neither (LimitExceeded names which)."""
    if records.wait_s(count, now) > 0:
        records.take(count, now, limit=LIMIT_RATE_RECORDS)  # raises, with the wait in its message
    if size.wait_s(nbytes, now) > 0:
        size.take(nbytes, now, limit=LIMIT_RATE_BYTES)
    records.take(count, now, limit=LIMIT_RATE_RECORDS)
    size.take(nbytes, now, limit=LIMIT_RATE_BYTES)
