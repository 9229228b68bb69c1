"""The tunnel's shared rules (tether.spec.emits) and the controller's batch check, pure: no servers."""

from __future__ import annotations

import dataclasses

import pytest

from tether.common import errors
from tether.controller.tunnel import emit_checks
from tether.spec import emits


@pytest.mark.parametrize("topic", ["clicks", "a", "feature/v2", "shop:cart.add-1", "x" * 128])
def test_good_topics_pass(topic: str) -> None:
    assert emits.check_topic(topic) == topic


@pytest.mark.parametrize("topic", ["", "-lead", "has space", "x" * 129, "tab\t", "ü", 7, None])
def test_bad_topics_are_refused_naming_the_field(topic: object) -> None:
    with pytest.raises(errors.InvalidArgument, match=r"^topic: "):
        emits.check_topic(topic)


def test_a_bucket_spends_up_to_its_burst_then_refills_at_its_rate() -> None:
    bucket = emits.TokenBucket(rate=10, burst=5, now=0.0)
    for _ in range(5):
        bucket.take(1, 0.0, limit="records_per_s")
    with pytest.raises(emits.LimitExceeded) as info:
        bucket.take(1, 0.0, limit="records_per_s")
    assert info.value.limit == "records_per_s" and info.value.retry_after_s == pytest.approx(0.1)
    assert "tunnel limit records_per_s exceeded" in str(info.value)
    bucket.take(1, 0.1, limit="records_per_s")  # one token back after 0.1 s
    bucket.take(5, 10.0, limit="records_per_s")  # refilled, never past the burst
    with pytest.raises(emits.LimitExceeded):
        bucket.take(1, 10.0, limit="records_per_s")
    assert bucket.wait_s(6, 10.0) == float("inf")  # over the burst: never


def test_take_both_spends_from_both_buckets_or_from_neither() -> None:
    records = emits.TokenBucket(rate=1, burst=10, now=0.0)
    size = emits.TokenBucket(rate=100, burst=100, now=0.0)
    emits.take_both(records, size, count=1, nbytes=80, now=0.0)
    with pytest.raises(emits.LimitExceeded) as info:
        emits.take_both(records, size, count=1, nbytes=80, now=0.0)
    assert info.value.limit == emits.LIMIT_RATE_BYTES
    assert records.tokens == 9  # the records bucket was not charged for the refused emit
    records.tokens = 0
    with pytest.raises(emits.LimitExceeded) as info:
        emits.take_both(records, size, count=1, nbytes=1, now=0.0)
    assert info.value.limit == emits.LIMIT_RATE_RECORDS and size.tokens == 20


def test_the_controller_allows_the_same_rates_with_slack_in_the_bursts() -> None:
    limits = emits.TunnelLimits(burst_records=10, controller_slack=3)
    device, controller = limits.device_buckets(0.0), limits.controller_buckets(0.0)
    assert (device[0].burst, controller[0].burst) == (10, 30)
    assert device[0].rate == controller[0].rate and device[1].rate == controller[1].rate


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_payload_bytes": 0}, "max_payload_bytes"),
        ({"records_per_s": -1}, "records_per_s"),
        ({"max_payload_bytes": 2 * 1024 * 1024}, "max_payload_bytes"),
    ],
)
def test_nonsense_limits_are_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=field):
        emits.TunnelLimits(**change)


@dataclasses.dataclass
class R:
    seq: int
    topic: str = "t"
    payload: bytes = b"x"
    release: str = "ns/task"


LIMITS = emits.TunnelLimits(max_payload_bytes=100, max_batch_records=4, max_batch_bytes=300, burst_bytes=1000)


def test_a_good_batch_passes_with_its_size() -> None:
    assert emit_checks.check_batch([R(1), R(2, payload=b"y" * 100), R(9)], LIMITS) == 102


@pytest.mark.parametrize(
    ("batch", "error", "text"),
    [
        ([], errors.InvalidArgument, "at least one record"),
        ([R(i) for i in range(1, 6)], emits.LimitExceeded, "batch_records"),
        ([R(i, payload=b"x" * 100) for i in range(1, 5)], emits.LimitExceeded, "batch_bytes"),
        ([R(1), R(2, payload=b"x" * 101)], emits.LimitExceeded, r"payload_bytes exceeded: records\[1\]"),
        ([R(1), R(2, topic="bad topic")], errors.InvalidArgument, r"records\[1\]\.topic"),
        ([R(0)], errors.InvalidArgument, r"records\[0\]\.seq"),
        ([R(2), R(2)], errors.InvalidArgument, r"records\[1\]\.seq: 2 must be above the one before"),
        ([R(3), R(1)], errors.InvalidArgument, r"records\[1\]\.seq"),
        ([R(2**53)], errors.InvalidArgument, r"records\[0\]\.seq"),
        ([R(1, release="r" * 254)], errors.InvalidArgument, r"records\[0\]\.release"),
    ],
)
def test_bad_batches_are_refused_whole_naming_the_record(batch: list, error: type, text: str) -> None:
    with pytest.raises(error, match=text):
        emit_checks.check_batch(batch, LIMITS)
