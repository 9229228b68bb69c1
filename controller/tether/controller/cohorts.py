"""Stable, nested rollout cohorts: which targeted devices a stage reaches.

Each device gets a *bucket* in [0, 1): the first 64 bits of
sha256(salt, device id) divided by 2**64. The salt is per task, so two tasks
pick independent cohorts, while one task always picks the same devices (the
bucket never changes, whichever controller replica computes it).

A stage that reaches `percent` (or `count`) of the targeted devices becomes a
*threshold* on the bucket, fixed when the stage begins: the bucket of the
(k+1)-th device in bucket order, k = ceil(percent/100 * N) (or `count`) over
the N devices targeted at that moment. Members are the devices whose bucket is
below it — exactly k of the devices present then (rank, not an expected value,
so stage sizes are accurate at any fleet size), and devices that enrol later
fall in with the same probability. A stage may also name an explicit cohort
(beta testers by label, or device ids) whose devices it always includes.

A device is in stage i when it is in any stage j <= i (bucket below
threshold j, or in cohort j), so a device in an earlier stage stays in every
later one whatever the thresholds: nesting holds by construction.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

_SCALE = float(2**64)


def bucket(salt: str, device_id: str) -> float:
    """The device's stable position in [0, 1) for this salt."""
    digest = hashlib.sha256(f"{salt}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / _SCALE


def target_size(n: int, *, percent: int | None = None, count: int | None = None) -> int:
    """How many of `n` targeted devices a stage of `percent` (or `count`) reaches."""
    if count is not None:
        return min(count, n)
    if percent is not None:
        return min(n, math.ceil(percent * n / 100))
    return 0  # a cohort-only stage


def threshold(buckets: Iterable[float], *, percent: int | None = None, count: int | None = None) -> float:
    """The bucket bound of a stage over the devices targeted now (members: bucket < bound).

    Exactly `target_size` of the given devices fall below it (buckets are 64-bit
    hashes; ties have probability ~2**-64). A stage reaching everyone (100
    percent, or a count at least the population) is 1.0, so later devices all
    join; with no device targeted yet a percent stage falls back to its fraction.
    """
    if percent is None and count is None:
        return 0.0
    ordered = sorted(buckets)
    n = len(ordered)
    if percent == 100 or (count is not None and count >= n):
        return 1.0
    if n == 0:
        return (percent or 0) / 100
    k = target_size(n, percent=percent, count=count)
    return 1.0 if k >= n else ordered[k]  # rounding up may reach everyone (50 % of one device)


def in_stage(*, device_bucket: float, thresholds: Sequence[float], cohorts: Sequence[bool], stage: int) -> bool:
    """Whether a device is in stage `stage`: below some threshold, or in some cohort, of stages 0..stage."""
    return any(
        device_bucket < thresholds[j] or (j < len(cohorts) and cohorts[j])
        for j in range(min(stage + 1, len(thresholds)))
    )


def first_stage(*, device_bucket: float, thresholds: Sequence[float], cohorts: Sequence[bool]) -> int | None:
    """The earliest stage that reaches the device, None when none does."""
    for j, bound in enumerate(thresholds):
        if device_bucket < bound or (j < len(cohorts) and cohorts[j]):
            return j
    return None
