"""One device's model update for a round, and the checks every update passes before any strategy sees it.

A model is a mapping of tensor name to array (the task's named tensors). An
update is what a device sends: its *delta* (local weights minus the round's
global weights) and the number of samples it trained on. Strategies work on
deltas: a weighted mean of weights and of deltas differ only by the global
model, distances between updates are the same either way, and the server
optimizers need the pseudo-gradient anyway.

An update is refused whole, with a reason naming the tensor, when its tensor
names, dtypes or shapes differ from the global model's, when a value is NaN,
infinite or so large that a weighted sum could overflow, or when its sample
count is not a positive integer: nothing of it is folded. (Quantized updates
are decoded to the model's dtype before they get here.) Pure: numpy only, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from tether.common import errors

Array: TypeAlias = npt.NDArray[np.floating[Any]]
Model: TypeAlias = Mapping[str, Array]
F8 = np.dtype(np.float64)
# |value|·samples beyond this could overflow a float64 running sum to infinity within a round of many updates.
MAX_WEIGHTED_VALUE = 1e300


class InvalidUpdate(errors.InvalidArgument):
    """An update that cannot be folded; `field` names the offending part (`delta['dense/w']`, `samples`)."""

    reason = "InvalidUpdate"

    def __init__(self, message: str, *, device: str, field: str) -> None:
        super().__init__(f"update from {device}: {field}: {message}")
        self.device = device
        self.field = field


class EmptyRound(errors.FailedPrecondition):
    """No update (or too few for the strategy) to aggregate: the round cannot publish a model."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Update:
    """A device's contribution to one round: its delta and how many samples it trained on."""

    device: str
    delta: Model
    samples: int


def check(update: Update, *, like: Model) -> None:
    """Refuse an update whose names, shapes or values cannot be folded against the global model `like`."""
    device = update.device
    samples = update.samples
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise InvalidUpdate(f"must be a positive integer, got {samples!r}", device=device, field="samples")
    missing = sorted(set(like) - set(update.delta))
    if missing:
        raise InvalidUpdate(f"is missing tensors {missing}", device=device, field="delta")
    extra = sorted(set(update.delta) - set(like))
    if extra:
        raise InvalidUpdate(f"has tensors the model does not have: {extra}", device=device, field="delta")
    for name, expected in like.items():
        got = update.delta[name]
        where = f"delta[{name!r}]"
        if not isinstance(got, np.ndarray) or got.dtype.kind != "f":
            kind = getattr(got, "dtype", type(got).__name__)
            raise InvalidUpdate(f"must be a floating-point array, got {kind}", device=device, field=where)
        if got.dtype != expected.dtype:
            raise InvalidUpdate(f"has dtype {got.dtype}, the model's is {expected.dtype}", device=device, field=where)
        if got.shape != expected.shape:
            raise InvalidUpdate(
                f"has shape {list(got.shape)}, the model's is {list(expected.shape)}", device=device, field=where
            )
        # Chunk by chunk, and with no temporaries: a chunk's max and min are NaN when it holds a NaN, infinite
        # when it holds an infinity, and bound its largest magnitude (np.abs or np.isfinite would copy it).
        largest = 0.0
        for chunk in chunks(got):
            if not chunk.size:
                continue
            top, bottom = float(chunk.max()), float(chunk.min())
            if not (math.isfinite(top) and math.isfinite(bottom)):
                raise InvalidUpdate("holds NaN or infinite values", device=device, field=where)
            largest = max(largest, abs(top), abs(bottom))
        if got.size and largest * samples > MAX_WEIGHTED_VALUE:
            raise InvalidUpdate(
                f"holds values too large to fold (|value|·samples above {MAX_WEIGHTED_VALUE:g})",
                device=device,
                field=where,
            )


CHUNK = 1 << 13  # values per chunk when a tensor is walked in pieces (64 KiB of float64: small beside a model)


def chunks(array: npt.NDArray[Any], *, size: int = CHUNK) -> Iterator[npt.NDArray[Any]]:
    """Consecutive flat views of at most `size` values (a copy only if `array` is not contiguous)."""
    flat = np.ravel(array)
    for at in range(0, flat.size, size):
        yield flat[at : at + size]


def shapes_of(model: Model) -> dict[str, Array]:
    """Stand-ins with `model`'s names, shapes and dtypes that hold no memory (one broadcast scalar each).

    What `check` and a fold need of the global model while updates stream in: its layout, not its values."""
    return {n: np.broadcast_to(np.zeros((), dtype=a.dtype), a.shape) for n, a in model.items()}


def names(model: Model) -> tuple[str, ...]:
    """The fixed order tensors are laid out in (flattening, summation): sorted by name."""
    return tuple(sorted(model))


def flatten(model: Model, *, order: Sequence[str]) -> npt.NDArray[np.float64]:
    """One float64 vector of every tensor in `order` (for distances and norms)."""
    if not order:
        return np.zeros(0, dtype=F8)
    return np.concatenate([np.asarray(model[n], dtype=F8).ravel() for n in order])


def unflatten(vector: npt.NDArray[np.float64], *, like: Model) -> dict[str, npt.NDArray[np.float64]]:
    """The inverse of `flatten` in `names(like)` order."""
    out: dict[str, npt.NDArray[np.float64]] = {}
    at = 0
    for n in names(like):
        size = math.prod(like[n].shape)
        out[n] = vector[at : at + size].reshape(like[n].shape)
        at += size
    return out


def l2_norm(model: Model) -> float:
    """The global L2 norm over every tensor, summed in the fixed order."""
    total = 0.0
    for n in names(model):
        a = np.asarray(model[n], dtype=F8)
        total += float(np.dot(a.ravel(), a.ravel()))
    return math.sqrt(total)
