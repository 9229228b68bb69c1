"""The federated digits data set: a stratified held-out test set and a Dirichlet label split over devices.

`examples/digits-fl`, `tether bench fl` and the demo all need the same
partition, so it is computed here, from the data and a seed, instead of being
stored: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn, so
nothing is downloaded), pixels scaled to [0, 1]; a stratified 20 % held out
for the cloud's evaluation; the rest split over 100 devices by a
Dirichlet(alpha = 0.5) label split (Hsu et al. 2019, "Measuring the Effects of
Non-Identical Data Distribution"): for each class, the class's samples are
dealt to the devices in proportions drawn from Dir(alpha · 1). A small alpha
gives each device a few dominant labels, as real devices have.

A device with too few samples cannot train a batch, so the draw is repeated
(from the same generator, so the result is still a function of the seed) until
every device holds at least `min_samples`, as Flower Datasets'
`DirichletPartitioner` does with `min_partition_size`.

`split` and `dirichlet_shards` are pure (numpy only); `load_digits` reads
scikit-learn's packaged copy.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

DEVICES = 100
ALPHA = 0.5
TEST_FRACTION = 0.2
SEED = 0
MIN_SAMPLES = 4
MAX_DRAWS = 1000
CLASSES = 10

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Shard:
    """One device's local data."""

    device: str
    X: F32
    y: I64


@dataclasses.dataclass(frozen=True, kw_only=True)
class Split:
    """The held-out test set (for the cloud) and one shard per device, in device order."""

    X_test: F32
    y_test: I64
    shards: tuple[Shard, ...]

    def counts(self) -> list[int]:
        return [len(s.y) for s in self.shards]


def device_name(index: int) -> str:
    return f"device-{index:03d}"


def load_digits() -> tuple[F32, I64]:
    """scikit-learn's digits as float32 pixels in [0, 1] and int64 labels (packaged with scikit-learn)."""
    from sklearn.datasets import load_digits as sk_load

    digits = sk_load()
    return (np.asarray(digits.data, dtype=np.float32) / np.float32(16.0)), np.asarray(digits.target, dtype=np.int64)


def stratified_holdout(y: I64, *, fraction: float, seed: int) -> tuple[I64, I64]:
    """(train indices, test indices): round(fraction · n_c) of every class c held out, drawn with `seed`."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    test: list[I64] = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = round(fraction * len(members))
        test.append(rng.permutation(members)[:k])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_idx = np.setdiff1d(np.arange(len(y), dtype=np.int64), test_idx)
    return train_idx, test_idx


def dirichlet_shards(y: I64, *, devices: int, alpha: float, seed: int, min_samples: int = MIN_SAMPLES) -> list[I64]:
    """Indices into `y` for each device: per class, proportions ~ Dir(alpha) over the devices.

    Redrawn (same generator) until every device holds at least `min_samples`; ValueError after MAX_DRAWS.
    Every index lands on exactly one device.
    """
    if devices < 1 or alpha <= 0.0 or min_samples < 0:
        raise ValueError(f"need devices >= 1, alpha > 0, min_samples >= 0; got {devices}, {alpha}, {min_samples}")
    if devices * min_samples > len(y):
        raise ValueError(f"{len(y)} samples cannot give {devices} devices {min_samples} each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(MAX_DRAWS):
        parts: list[list[I64]] = [[] for _ in range(devices)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(y == c))
            proportions = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
            for d, chunk in enumerate(np.split(members, cuts)):
                parts[d].append(chunk.astype(np.int64))
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_samples:
            return shards
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every device {min_samples} samples in {MAX_DRAWS} draws")


def split(
    X: F32,
    y: I64,
    *,
    devices: int = DEVICES,
    alpha: float = ALPHA,
    test_fraction: float = TEST_FRACTION,
    seed: int = SEED,
    min_samples: int = MIN_SAMPLES,
) -> Split:
    """The held-out set and the devices' shards (device-000 ... in order), a pure function of the arguments."""
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows, y has {y.shape[0]}")
    train_idx, test_idx = stratified_holdout(y, fraction=test_fraction, seed=seed)
    X_train, y_train = X[train_idx], y[train_idx]
    parts = dirichlet_shards(y_train, devices=devices, alpha=alpha, seed=seed, min_samples=min_samples)
    shards = tuple(
        Shard(device=device_name(i), X=np.ascontiguousarray(X_train[p]), y=y_train[p]) for i, p in enumerate(parts)
    )
    return Split(X_test=np.ascontiguousarray(X[test_idx]), y_test=y[test_idx], shards=shards)


def digits_split(**kwargs: int | float) -> Split:
    """`split` of scikit-learn's digits with the example's defaults (any of them overridable)."""
    X, y = load_digits()
    return split(X, y, **kwargs)  # type: ignore[arg-type]
