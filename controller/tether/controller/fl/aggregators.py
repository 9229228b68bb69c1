"""Strategies: a round's updates and the global model in, the next global model and server state out.

The FedAvg family folds updates one at a time (`MeanFold`): float64 running
sums of samples·delta, so memory is one model whatever the number of updates,
and the result depends only on the order the caller folds in (the worker
folds in device-id order, so a round is bit-for-bit reproducible). The mean
delta then goes through the server step of the strategy:

- FedAvg / FedProx: w <- w + mean.
- FedAvgM: v <- momentum·v + mean; w <- w + lr·v (Hsu et al. 2019).
- FedAdam / FedYogi / FedAdagrad (Reddi et al. 2021, Algorithm 2, no bias
  correction): m <- b1·m + (1 - b1)·mean, then
  v <- v + mean² (Adagrad), v <- v - (1 - b2)·mean²·sign(v - mean²) (Yogi),
  v <- b2·v + (1 - b2)·mean² (Adam); w <- w + lr·m / (sqrt(v) + tau), with
  v starting at tau² and m at 0.

The robust strategies (median, trimmed mean, Krum) need every update of the
round at once (`tether.controller.fl.robust`); `aggregate` dispatches.

A streaming round does not need the global model's values until its server
step: `Deferred` gives its layout (`updates.shapes_of`, no memory) while the
updates are folded and loads the values at `finish`, after the last update
is released, and the step is written into them in place. A round then holds
at most the float64 sums (2x a float32 update) and one more model-sized
array (the update being folded, then the global model): 3x one update.
Server state (momentum and second moments) is float64 and carried between
rounds in a frozen `ServerState`; the new global model keeps the dtype of the
old one. Pure: numpy only, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from tether.common import errors
from tether.controller.fl import privacy, robust, updates
from tether.spec import strategies

F64Model = dict[str, npt.NDArray[np.float64]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ServerState:
    """What a strategy carries from one round to the next (float64; None until the first step needs it)."""

    rounds: int = 0
    velocity: Mapping[str, npt.NDArray[np.float64]] | None = None  # FedAvgM's v, FedOpt's first moment m
    second_moment: Mapping[str, npt.NDArray[np.float64]] | None = None  # FedOpt's v


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    """A round's result: the new global model, the server state after it, and who counted."""

    model: dict[str, updates.Array]
    state: ServerState
    devices: tuple[str, ...]  # every device whose update was folded or considered, in fold order
    samples: int
    chosen: tuple[str, ...]  # the devices whose updates make the result (all but for Krum)
    delta: F64Model  # the aggregated update the server step applied
    clipped: int = 0  # updates scaled down to the clip norm (central DP)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Deferred:
    """The global model by its layout now and its values on demand: `load` returns arrays the caller owns (they
    are overwritten with the new model)."""

    like: updates.Model
    load: Callable[[], dict[str, updates.Array]]

    @classmethod
    def of(cls, model: updates.Model) -> Deferred:
        """A deferred model over arrays already in memory (copied at load, so `model` is left as it was)."""
        return cls(like=updates.shapes_of(model), load=lambda: {n: np.array(a) for n, a in model.items()})


GlobalModel = updates.Model | Deferred


def _layout(global_model: GlobalModel) -> updates.Model:
    return global_model.like if isinstance(global_model, Deferred) else global_model


class MeanFold:
    """Sample-weighted running mean of deltas: memory of one float64 model, summed in fold order."""

    def __init__(self, *, like: updates.Model) -> None:
        self._like = like
        self._order = updates.names(like)
        self._sums: F64Model = {n: np.zeros(like[n].shape, dtype=np.float64) for n in self._order}
        self._samples = 0
        self._devices: dict[str, None] = {}  # fold order (one structure: it also answers "already folded?")
        self._consumed = False

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self._devices)

    @property
    def samples(self) -> int:
        return self._samples

    def add(self, update: updates.Update) -> None:
        """Fold one update in, or refuse it whole (`updates.InvalidUpdate`) and change nothing."""
        updates.check(update, like=self._like)
        self._fold(update)

    def _fold(self, update: updates.Update) -> None:
        """Fold a checked update in (a clipped one is float64 whatever the model's dtype)."""
        if self._consumed:
            raise RuntimeError("this fold's sums were consumed by mean(consume=True)")
        if update.device in self._devices:
            raise updates.InvalidUpdate("was already folded into this round", device=update.device, field="device")
        weight = float(update.samples)
        buffer = np.empty(updates.CHUNK, dtype=np.float64)
        for n in self._order:
            # In chunks, through one small float64 buffer: memory stays one float64 model plus the update, and
            # every value takes the same float64 steps as `sums += weight * float64(delta)` would.
            sums = self._sums[n].reshape(-1)
            at = 0
            for chunk in updates.chunks(update.delta[n]):
                scaled = buffer[: chunk.size]
                scaled[...] = chunk
                scaled *= weight
                sums[at : at + chunk.size] += scaled
                at += chunk.size
        self._samples += update.samples
        self._devices[update.device] = None

    def total(self) -> F64Model:
        """The running sum of samples·delta (copies)."""
        return {n: s.copy() for n, s in self._sums.items()}

    def mean(self, *, consume: bool = False) -> F64Model:
        """The sample-weighted mean; with `consume` it is computed in place of the sums (no second model in
        memory) and the fold cannot be used again."""
        if not self._samples:
            raise updates.EmptyRound("no update was folded into the round")
        if self._consumed:
            raise RuntimeError("this fold's sums were consumed by mean(consume=True)")
        if not consume:
            return {n: s / float(self._samples) for n, s in self._sums.items()}
        self._consumed = True
        for s in self._sums.values():
            np.divide(s, float(self._samples), out=s)
        return self._sums


def is_streaming(strategy: strategies.Strategy) -> bool:
    """True for the strategies that fold updates one at a time (memory of one model)."""
    return isinstance(strategy, strategies.FedAvg | strategies.FedProx | strategies.FedAvgM | strategies.FedOpt)


def aggregate(
    strategy: strategies.Strategy,
    *,
    global_model: GlobalModel,
    contributions: Iterable[updates.Update],
    state: ServerState,
    mechanism: privacy.GaussianMechanism | None = None,
    noise: np.random.Generator | None = None,
) -> Outcome:
    """The next global model from the round's updates, taken in the order given.

    Streaming strategies consume `contributions` one at a time; robust ones
    collect them first. A bad update raises `updates.InvalidUpdate` before
    anything is returned: the caller refuses it and aggregates without it.
    With a central-DP `mechanism` every update is clipped and weighs 1, and
    the sum is noised from `noise` (FedAvg family only: a median's or Krum's
    sensitivity is not the clip norm). A `Deferred` global model is loaded
    only for the server step, and the new model is written into its arrays.
    """
    like = _layout(global_model)
    if is_streaming(strategy):
        fold = MeanFold(like=like)
        clipped = 0
        for u in contributions:
            if mechanism is not None:
                updates.check(u, like=like)
                c = privacy.clip(u, clip_norm=mechanism.clip_norm)
                clipped += c.clipped
                fold._fold(c.update)
            else:
                fold.add(u)
        if mechanism is None:
            return finish(strategy, global_model=global_model, fold=fold, state=state)
        if noise is None:
            raise ValueError("central DP needs a noise generator")
        if not fold.devices:
            raise updates.EmptyRound("no update was folded into the round")
        mean = mechanism.noised_mean(fold.total(), rng=noise)
        out = finish(strategy, global_model=global_model, fold=fold, state=state, mean=mean)
        return dataclasses.replace(out, clipped=clipped)
    if mechanism is not None:
        raise errors.FailedPrecondition(
            f"central differential privacy needs a FedAvg-family strategy, not {strategy.name}"
        )
    collected = robust.collect(contributions, like=like)
    if isinstance(strategy, strategies.Median):
        delta = robust.median(collected, like=like)
        chosen = tuple(u.device for u in collected)
    elif isinstance(strategy, strategies.TrimmedMean):
        delta = robust.trimmed_mean(collected, like=like, fraction=strategy.trim_fraction)
        chosen = tuple(u.device for u in collected)
    elif isinstance(strategy, strategies.Krum):
        if len(collected) < strategy.minimum_updates():
            raise updates.EmptyRound(
                f"{strategy.name.value} with byzantine={strategy.byzantine}, selected={strategy.selected} needs "
                f"at least {strategy.minimum_updates()} updates, got {len(collected)}"
            )
        picked = robust.krum_select(collected, byzantine=strategy.byzantine, selected=strategy.selected)
        best = [collected[i] for i in picked]
        delta = robust.weighted_mean(best, like=like)
        chosen = tuple(u.device for u in best)
    else:  # pragma: no cover - every Strategy is handled above
        raise TypeError(f"unknown strategy {strategy!r}")
    devices = tuple(u.device for u in collected)
    samples = sum(u.samples for u in collected)
    del collected
    model = _step(global_model, delta, scale=1.0)
    return Outcome(
        model=model,
        state=dataclasses.replace(state, rounds=state.rounds + 1),
        devices=devices,
        samples=samples,
        chosen=chosen,
        delta=delta,
    )


def finish(
    strategy: strategies.Strategy,
    *,
    global_model: GlobalModel,
    fold: MeanFold,
    state: ServerState,
    mean: F64Model | None = None,
) -> Outcome:
    """The server step of a streaming strategy over a fold's mean (or the `mean` given, e.g. noised).

    Without a `mean` the fold's sums become the mean in place: the fold is spent, and the round's memory stays
    one float64 model plus the global model: a `Deferred` one is loaded now and overwritten with the new model,
    otherwise the new model is a fresh array."""
    if mean is None:
        mean = fold.mean(consume=True)
    if isinstance(strategy, strategies.FedAvg | strategies.FedProx):
        model = _step(global_model, mean, scale=1.0)
        new_state = dataclasses.replace(state, rounds=state.rounds + 1)
    elif isinstance(strategy, strategies.FedAvgM):
        velocity = {
            n: (strategy.momentum * state.velocity[n] + m if state.velocity is not None else m.copy())
            for n, m in mean.items()
        }
        model = _step(global_model, velocity, scale=strategy.server_learning_rate)
        new_state = ServerState(rounds=state.rounds + 1, velocity=velocity, second_moment=state.second_moment)
    elif isinstance(strategy, strategies.FedOpt):
        model, new_state = _fedopt(strategy, global_model=global_model, mean=mean, state=state)
    else:
        raise TypeError(f"{strategy.name.value} does not stream; use aggregate()")
    return Outcome(
        model=model, state=new_state, devices=fold.devices, samples=fold.samples, chosen=fold.devices, delta=mean
    )


def _fedopt(
    strategy: strategies.FedOpt, *, global_model: GlobalModel, mean: F64Model, state: ServerState
) -> tuple[dict[str, updates.Array], ServerState]:
    b1, b2, tau = strategy.beta1, strategy.beta2, strategy.tau
    m_prev = state.velocity
    v_prev = state.second_moment
    m_new: F64Model = {}
    v_new: F64Model = {}
    step: F64Model = {}
    for n, d in mean.items():
        m0 = m_prev[n] if m_prev is not None else np.zeros_like(d)
        v0 = v_prev[n] if v_prev is not None else np.full_like(d, tau * tau)
        m = b1 * m0 + (1.0 - b1) * d
        d2 = d * d
        if strategy.optimizer is strategies.ServerOptimizer.ADAGRAD:
            v = v0 + d2
        elif strategy.optimizer is strategies.ServerOptimizer.YOGI:
            v = v0 - (1.0 - b2) * d2 * np.sign(v0 - d2)
        else:
            v = b2 * v0 + (1.0 - b2) * d2
        m_new[n], v_new[n] = m, v
        step[n] = m / (np.sqrt(v) + tau)
    model = _step(global_model, step, scale=strategy.server_learning_rate)
    return model, ServerState(rounds=state.rounds + 1, velocity=m_new, second_moment=v_new)


def _step(
    global_model: GlobalModel, step: Mapping[str, npt.NDArray[np.float64]], *, scale: float
) -> dict[str, updates.Array]:
    """The server step on the global model: a `Deferred` one is loaded now and stepped in place."""
    if isinstance(global_model, Deferred):
        loaded = global_model.load()
        if set(loaded) != set(global_model.like):
            raise errors.FailedPrecondition("the global model's tensors changed while the round was folded")
        for n, w in loaded.items():
            like = global_model.like[n]
            if w.shape != like.shape or w.dtype != like.dtype or not (w.flags.writeable and w.flags.c_contiguous):
                raise errors.FailedPrecondition(f"the global model's tensor {n!r} changed while the round was folded")
        return _apply(loaded, step, scale=scale, in_place=True)
    return _apply(global_model, step, scale=scale)


def _apply(
    global_model: updates.Model, step: Mapping[str, npt.NDArray[np.float64]], *, scale: float, in_place: bool = False
) -> dict[str, updates.Array]:
    """w + scale·step in float64, stored in w's dtype (into w itself `in_place`); chunk by chunk, so no float64
    copy of the model is made."""
    out: dict[str, updates.Array] = {}
    buffer = np.empty(updates.CHUNK, dtype=np.float64)
    for n in updates.names(global_model):
        w = global_model[n]
        new: npt.NDArray[Any] = w if in_place else np.empty(w.shape, dtype=w.dtype)
        target = new.reshape(-1)
        at = 0
        for w_chunk, s_chunk in zip(updates.chunks(w), updates.chunks(step[n]), strict=True):
            acc = buffer[: w_chunk.size]
            np.multiply(s_chunk, scale, out=acc)  # float64 step, float scale: the same value as `scale * step`
            np.add(w_chunk, acc, out=acc, dtype=np.float64)  # w cast to float64 exactly, as `astype` would
            target[at : at + w_chunk.size] = acc
            at += w_chunk.size
        out[n] = new
    return out
