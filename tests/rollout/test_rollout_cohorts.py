"""Stable cohorts (tether.controller.cohorts): deterministic buckets, nesting, accurate stage sizes."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from tether.controller import cohorts

IDS = [f"dev-{i:05d}" for i in range(10_000)]


def test_buckets_are_deterministic_per_salt_and_independent_across_salts() -> None:
    assert cohorts.bucket("ml/a", "dev-1") == cohorts.bucket("ml/a", "dev-1")
    assert 0 <= cohorts.bucket("ml/a", "dev-1") < 1
    a = {i for i in IDS[:2000] if cohorts.bucket("ml/a", i) < 0.1}
    b = {i for i in IDS[:2000] if cohorts.bucket("ml/b", i) < 0.1}
    assert a != b and 100 < len(a & b) * 100 < 2000 * 10  # overlap about 1 % of 2000, not 10 %


def test_target_size_rounds_up_and_caps_at_the_population() -> None:
    assert cohorts.target_size(1000, percent=10) == 100
    assert cohorts.target_size(999, percent=10) == 100
    assert cohorts.target_size(5, count=50) == 5
    assert cohorts.target_size(5) == 0


def test_threshold_edges() -> None:
    assert cohorts.threshold([0.2, 0.5], percent=100) == 1.0
    assert cohorts.threshold([0.2, 0.5], count=2) == 1.0
    assert cohorts.threshold([], percent=25) == 0.25  # nobody targeted yet: the fraction
    assert cohorts.threshold([0.3]) == 0.0  # a cohort-only stage


@settings(max_examples=40, deadline=None)
@given(
    salt=st.text(min_size=1, max_size=20),
    percents=st.lists(st.integers(min_value=1, max_value=99), min_size=1, max_size=5, unique=True).map(sorted),
)
def test_stage_sizes_are_exact_at_10000_devices_and_stages_nest(salt: str, percents: list[int]) -> None:
    buckets = {i: cohorts.bucket(salt, i) for i in IDS}
    thresholds = [cohorts.threshold(buckets.values(), percent=p) for p in [*percents, 100]]
    members = []
    for stage in range(len(thresholds)):
        chosen = {
            i
            for i, b in buckets.items()
            if cohorts.in_stage(device_bucket=b, thresholds=thresholds, cohorts=[], stage=stage)
        }
        members.append(chosen)
    for p, chosen in zip(percents, members, strict=False):
        assert len(chosen) == math.ceil(p * len(IDS) / 100)  # exact: well within +-1 percentage point
    assert len(members[-1]) == len(IDS)
    for earlier, later in itertools.pairwise(members):
        assert earlier <= later  # a device in an earlier stage stays in every later one


@settings(max_examples=60, deadline=None)
@given(
    salt=st.text(min_size=1, max_size=10),
    thresholds=st.lists(st.floats(min_value=0, max_value=1), min_size=1, max_size=6),
    in_cohort=st.lists(st.booleans(), max_size=6),
    device=st.text(min_size=1, max_size=12),
)
def test_membership_nests_whatever_the_thresholds_and_cohorts(
    salt: str, thresholds: list[float], in_cohort: list[bool], device: str
) -> None:
    b = cohorts.bucket(salt, device)
    inside = [
        cohorts.in_stage(device_bucket=b, thresholds=thresholds, cohorts=in_cohort, stage=s)
        for s in range(len(thresholds))
    ]
    first = cohorts.first_stage(device_bucket=b, thresholds=thresholds, cohorts=in_cohort)
    assert inside == [first is not None and s >= first for s in range(len(thresholds))]


def test_a_count_stage_reaches_exactly_that_many() -> None:
    buckets = [cohorts.bucket("s", i) for i in IDS[:500]]
    t = cohorts.threshold(buckets, count=37)
    assert sum(1 for b in buckets if b < t) == 37
