"""The federated digits split (tether.devtools.fldata): stratified hold-out, Dirichlet label split, reproducible."""

from __future__ import annotations

import numpy as np
import pytest

from tether.devtools import fldata


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    return fldata.load_digits()


def test_the_holdout_is_stratified_and_disjoint(digits) -> None:
    _, y = digits
    train, test = fldata.stratified_holdout(y, fraction=0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == len(y)
    for c in range(10):
        share = np.sum(y[test] == c) / np.sum(y == c)
        assert abs(share - 0.2) < 0.01, (c, share)


def test_the_split_partitions_every_training_sample_once(digits) -> None:
    X, y = digits
    split = fldata.split(X, y)
    assert len(split.shards) == 100 and [s.device for s in split.shards[:2]] == ["device-000", "device-001"]
    assert len(split.y_test) == 359 and sum(split.counts()) == len(y) - 359
    assert min(split.counts()) >= fldata.MIN_SAMPLES
    rows = np.concatenate([s.X for s in split.shards] + [split.X_test])
    # every image exactly once over the shards and the held-out set (digits has a few duplicate images: compare counts)
    assert sorted(map(bytes, rows)) == sorted(map(bytes, X))


def test_the_label_split_is_skewed_as_dirichlet_half_makes_it(digits) -> None:
    X, y = digits
    split = fldata.split(X, y)
    labels_held = [len(np.unique(s.y)) for s in split.shards]
    dominant = [np.bincount(s.y, minlength=10).max() / len(s.y) for s in split.shards]
    # iid shards of ~14 samples would hold ~7.5 labels with a top label near 20 %
    assert np.mean(labels_held) < 6.0 and np.mean(dominant) > 0.35
    iid = fldata.split(X, y, alpha=1000.0)
    assert np.mean([len(np.unique(s.y)) for s in iid.shards]) > np.mean(labels_held) + 1.5


def test_the_split_is_a_function_of_the_seed(digits) -> None:
    X, y = digits
    a, b, c = fldata.split(X, y), fldata.split(X, y), fldata.split(X, y, seed=1)
    assert all(np.array_equal(p.y, q.y) and np.array_equal(p.X, q.X) for p, q in zip(a.shards, b.shards, strict=True))
    assert a.counts() != c.counts()


def test_impossible_minimums_and_bad_arguments_are_refused() -> None:
    y = np.repeat(np.arange(10), 3)
    with pytest.raises(ValueError, match="cannot give"):
        fldata.dirichlet_shards(y, devices=20, alpha=0.5, seed=0, min_samples=2)
    with pytest.raises(ValueError, match="alpha"):
        fldata.dirichlet_shards(y, devices=2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        fldata.stratified_holdout(y, fraction=1.0, seed=0)
    with pytest.raises(ValueError, match="rows"):
        fldata.split(np.zeros((3, 64), np.float32), y)
