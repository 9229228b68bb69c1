"""Byzantine-robust aggregation: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

These need every update of a round at once (a median cannot be folded), so a
round using them holds n updates in memory; the FedAvg family streams
(`tether.controller.fl.aggregators`). Each update is checked first (names,
shapes, finite values; `updates.check`), and a device counts once.

- median: `np.median` over the updates, per coordinate (unweighted).
- trimmed mean: per coordinate, drop the k = floor(fraction·n) smallest and
  largest values and average the rest (scipy.stats.trim_mean's definition).
- Krum (Blanchard et al. 2017): score(i) = sum of the squared distances from
  update i to its n - f - 2 nearest other updates; the lowest score wins
  (ties: the earlier update in fold order). Multi-Krum takes the `selected`
  lowest and returns their sample-weighted mean.
Pure: numpy only, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import numpy.typing as npt

from tether.controller.fl import updates


def collect(contributions: Iterable[updates.Update], *, like: updates.Model) -> list[updates.Update]:
    """Every update checked, in the order given; a device sending twice is refused."""
    out: list[updates.Update] = []
    seen: set[str] = set()
    for u in contributions:
        updates.check(u, like=like)
        if u.device in seen:
            raise updates.InvalidUpdate("was already taken into this round", device=u.device, field="device")
        seen.add(u.device)
        out.append(u)
    return out


def _stack(collected: Sequence[updates.Update], name: str) -> npt.NDArray[np.float64]:
    return np.stack([np.asarray(u.delta[name], dtype=np.float64) for u in collected])


def median(collected: Sequence[updates.Update], *, like: updates.Model) -> dict[str, npt.NDArray[np.float64]]:
    _nonempty(collected)
    return {n: np.median(_stack(collected, n), axis=0) for n in updates.names(like)}


def trimmed_mean(
    collected: Sequence[updates.Update], *, like: updates.Model, fraction: float
) -> dict[str, npt.NDArray[np.float64]]:
    _nonempty(collected)
    n = len(collected)
    k = math.floor(fraction * n)
    if 2 * k >= n:
        k = (n - 1) // 2  # keep at least one value per coordinate
    out: dict[str, npt.NDArray[np.float64]] = {}
    for name in updates.names(like):
        ordered = np.sort(_stack(collected, name), axis=0)
        out[name] = ordered[k : n - k].mean(axis=0)
    return out


def krum_scores(collected: Sequence[updates.Update], *, byzantine: int) -> npt.NDArray[np.float64]:
    """Each update's Krum score: the sum of squared distances to its n - f - 2 nearest others."""
    n = len(collected)
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"Krum needs n - f - 2 >= 1, got n={n}, f={byzantine}")
    order = updates.names(collected[0].delta)
    flat = np.stack([updates.flatten(u.delta, order=order) for u in collected])
    sq = np.einsum("ij,ij->i", flat, flat)
    dist = sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T
    np.maximum(dist, 0.0, out=dist)
    np.fill_diagonal(dist, np.inf)
    nearest = np.sort(dist, axis=1)[:, :neighbours]
    scores: npt.NDArray[np.float64] = nearest.sum(axis=1)
    return scores


def krum_select(collected: Sequence[updates.Update], *, byzantine: int, selected: int) -> tuple[int, ...]:
    """Indices of the `selected` best-scored updates, best first (a stable sort: ties keep fold order)."""
    scores = krum_scores(collected, byzantine=byzantine)
    return tuple(int(i) for i in np.argsort(scores, kind="stable")[:selected])


def weighted_mean(collected: Sequence[updates.Update], *, like: updates.Model) -> dict[str, npt.NDArray[np.float64]]:
    _nonempty(collected)
    total = float(sum(u.samples for u in collected))
    out: dict[str, npt.NDArray[np.float64]] = {}
    for name in updates.names(like):
        acc = np.zeros(like[name].shape, dtype=np.float64)
        for u in collected:
            acc += float(u.samples) * np.asarray(u.delta[name], dtype=np.float64)
        out[name] = acc / total
    return out


def _nonempty(collected: Sequence[updates.Update]) -> None:
    if not collected:
        raise updates.EmptyRound("no update to aggregate")
