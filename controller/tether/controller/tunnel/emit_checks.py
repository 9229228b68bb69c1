"""A device's tunnel batch, checked before anything is published (pure).

Bounds first (`tether.spec.emits`: records per batch, bytes per batch, each
payload), then each record: a valid topic, a seq above zero and above the one
before it (a device sends its outbox in order), a release name of sane
length. A refusal names the record (`records[3].topic`) and changes nothing:
the whole batch is refused, nothing of it is published.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tether.common import errors
from tether.spec import emits

MAX_RELEASE_CHARS = 253
MAX_SEQ = 2**53 - 1  # exact in the broker's Lua numbers


class RecordLike(Protocol):
    @property
    def seq(self) -> int: ...
    @property
    def topic(self) -> str: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def release(self) -> str: ...


def check_batch(records: Sequence[RecordLike], limits: emits.TunnelLimits) -> int:
    """The batch's payload bytes; LimitExceeded or InvalidArgument naming the record and field."""
    if not records:
        raise errors.InvalidArgument("records: a batch holds at least one record")
    size = sum(len(r.payload) for r in records)
    emits.check_batch(len(records), size, limits)
    previous = 0
    for i, r in enumerate(records):
        try:
            emits.check_topic(r.topic)
        except errors.InvalidArgument as e:
            raise errors.InvalidArgument(f"records[{i}].{e}") from None
        if len(r.payload) > limits.max_payload_bytes:
            raise emits.LimitExceeded(
                emits.LIMIT_PAYLOAD,
                f"records[{i}]: payload of {len(r.payload)} bytes, at most {limits.max_payload_bytes} allowed",
            )
        if not 0 < r.seq <= MAX_SEQ:
            raise errors.InvalidArgument(f"records[{i}].seq: {r.seq} must be in [1, {MAX_SEQ}]")
        if r.seq <= previous:
            raise errors.InvalidArgument(f"records[{i}].seq: {r.seq} must be above the one before ({previous})")
        if len(r.release) > MAX_RELEASE_CHARS:
            raise errors.InvalidArgument(f"records[{i}].release: longer than {MAX_RELEASE_CHARS} characters")
        previous = r.seq
    return size
