"""From a round's outcome to what is stored and served: metrics, server state, noise seeds, the next manifest.

- `device_metrics`: the round's device metrics, sample-weighted means over
  the accepted updates (a metric only some devices report is averaged over
  those).
- `state_tensors` / `state_from_tensors`: a strategy's server state (FedAvgM's
  velocity, FedOpt's moments) as named tensors, kept as a blob between rounds.
- `noise_seed`: central DP's noise for (task, round) comes from a secret only
  the cloud holds, so a redelivered aggregation reproduces the same model
  while nobody outside can predict the noise.
- `derive_manifest`: the next bundle version is the base manifest with the
  global model file's digest and size replaced: every other file is shared,
  so a device pulls one blob per round.
Pure: hashlib and numpy, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from tether.common import errors, manifest
from tether.controller.fl import aggregators, rounds

_VELOCITY = "velocity/"
_SECOND = "second_moment/"


def device_metrics(records: Iterable[rounds.UpdateRecord]) -> dict[str, float]:
    """Sample-weighted mean of each metric over the updates that report it, names sorted."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for r in records:
        for name, value in r.metrics.items():
            sums[name] = sums.get(name, 0.0) + r.samples * float(value)
            weights[name] = weights.get(name, 0) + r.samples
    return {n: sums[n] / weights[n] for n in sorted(sums) if weights[n] > 0}


def state_tensors(state: aggregators.ServerState) -> dict[str, npt.NDArray[np.float64]]:
    """The server state's moments as named float64 tensors ({} when the strategy keeps none)."""
    out: dict[str, npt.NDArray[np.float64]] = {}
    for prefix, part in ((_VELOCITY, state.velocity), (_SECOND, state.second_moment)):
        for name, value in (part or {}).items():
            out[prefix + name] = np.asarray(value, dtype=np.float64)
    return out


def state_from_tensors(tensors: Mapping[str, npt.NDArray[Any]], *, rounds_done: int) -> aggregators.ServerState:
    velocity = {
        n[len(_VELOCITY) :]: np.asarray(v, dtype=np.float64) for n, v in tensors.items() if n.startswith(_VELOCITY)
    }
    second = {n[len(_SECOND) :]: np.asarray(v, dtype=np.float64) for n, v in tensors.items() if n.startswith(_SECOND)}
    return aggregators.ServerState(rounds=rounds_done, velocity=velocity or None, second_moment=second or None)


def noise_seed(secret: bytes, *, task: str, number: int) -> int:
    """A 128-bit seed for round `number`'s DP noise, derived from the cloud's secret."""
    h = hashlib.sha256(secret + b"\0" + task.encode() + b"\0" + str(number).encode()).digest()
    return int.from_bytes(h[:16], "big")


def derive_manifest(base: bytes, *, model_file: str, digest: str, size: int) -> bytes:
    """The canonical manifest bytes of `base` with `model_file` now holding the blob `digest` of `size` bytes."""
    m = manifest.Manifest.from_bytes(base)
    try:
        m.file(model_file)
    except KeyError:
        raise errors.FailedPrecondition(
            f"federated.modelFile: {model_file!r} is not a file of bundle {m.name} ({m.digest})"
        ) from None
    files = tuple(
        manifest.FileEntry(path=f.path, sha256=digest, size=size) if f.path == model_file else f for f in m.files
    )
    return dataclasses.replace(m, files=files).canonical_bytes()


def model_entry(body: bytes, *, model_file: str) -> manifest.FileEntry:
    """The global model file's entry in a manifest (its blob is the round's starting model)."""
    m = manifest.Manifest.from_bytes(body)
    try:
        return m.file(model_file)
    except KeyError:
        raise errors.FailedPrecondition(
            f"federated.modelFile: {model_file!r} is not a file of bundle {m.name} ({m.digest})"
        ) from None
