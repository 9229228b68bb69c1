"""Aggregation strategies of a federated MLTask (`spec.federated.strategy`): their names and parameters.

Strategies are plain parameter values here (the rest of `spec.federated` is
`tether.spec.federation`); their maths is the controller's
(`tether.controller.fl.aggregators` and `tether.controller.fl.robust`), which
dispatches on the value's type. Names and defaults follow the papers and the
frameworks users know (Flower's `FedAvgM`, `FedAdam`, ...):

- `fedAvg` (McMahan et al. 2017): sample-weighted mean of the updates.
- `fedAvgM` (Hsu et al. 2019): FedAvg's mean as a pseudo-gradient with server
  momentum `momentum` and learning rate `serverLearningRate`.
- `fedProx` (Li et al. 2020): FedAvg on the server; `proximalMu` is handed to
  the task, which adds (mu/2)·||w - w_global||² to its local loss.
- `fedAdam`, `fedYogi`, `fedAdagrad` (Reddi et al. 2021, "Adaptive Federated
  Optimization"): server optimizers over the mean update, with `serverLearningRate`
  (eta), `beta1`, `beta2` and `tau` (the adaptivity floor).
- `median` (Yin et al. 2018): coordinate-wise median.
- `trimmedMean` (Yin et al. 2018): coordinate-wise mean after dropping the
  `trimFraction` largest and smallest values of each coordinate.
- `krum` / `multiKrum` (Blanchard et al. 2017): the update(s) closest to their
  n - f - 2 nearest neighbours, f = `byzantine`; Multi-Krum averages the
  `selected` best.

Errors are `errors.InvalidSpec` naming the field. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, TypeAlias

from tether.common import errors


class StrategyName(enum.StrEnum):
    FED_AVG = "fedAvg"
    FED_AVG_M = "fedAvgM"
    FED_PROX = "fedProx"
    FED_ADAM = "fedAdam"
    FED_YOGI = "fedYogi"
    FED_ADAGRAD = "fedAdagrad"
    MEDIAN = "median"
    TRIMMED_MEAN = "trimmedMean"
    KRUM = "krum"
    MULTI_KRUM = "multiKrum"


class ServerOptimizer(enum.StrEnum):
    ADAM = "adam"
    YOGI = "yogi"
    ADAGRAD = "adagrad"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvg:
    """Sample-weighted mean of the updates, applied as is."""

    @property
    def name(self) -> StrategyName:
        return StrategyName.FED_AVG


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedProx:
    """FedAvg on the server; the task adds the proximal term (mu/2)·||w - w_global||² to its loss."""

    proximal_mu: float

    @property
    def name(self) -> StrategyName:
        return StrategyName.FED_PROX


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedAvgM:
    """v <- momentum·v + mean_update; w <- w + server_learning_rate·v."""

    server_learning_rate: float = 1.0
    momentum: float = 0.9

    @property
    def name(self) -> StrategyName:
        return StrategyName.FED_AVG_M


@dataclasses.dataclass(frozen=True, kw_only=True)
class FedOpt:
    """An adaptive server optimizer over the mean update (Reddi et al. 2021, Algorithm 2)."""

    optimizer: ServerOptimizer
    server_learning_rate: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    @property
    def name(self) -> StrategyName:
        return {
            ServerOptimizer.ADAM: StrategyName.FED_ADAM,
            ServerOptimizer.YOGI: StrategyName.FED_YOGI,
            ServerOptimizer.ADAGRAD: StrategyName.FED_ADAGRAD,
        }[self.optimizer]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Median:
    """Coordinate-wise median of the updates (unweighted: a weight would let one device buy the median)."""

    @property
    def name(self) -> StrategyName:
        return StrategyName.MEDIAN


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrimmedMean:
    """Coordinate-wise mean without the floor(trim_fraction·n) largest and smallest values."""

    trim_fraction: float = 0.1

    @property
    def name(self) -> StrategyName:
        return StrategyName.TRIMMED_MEAN


@dataclasses.dataclass(frozen=True, kw_only=True)
class Krum:
    """Krum (selected = 1) or Multi-Krum: the sample-weighted mean of the `selected` best-scored updates."""

    byzantine: int = 0
    selected: int = 1

    @property
    def name(self) -> StrategyName:
        return StrategyName.KRUM if self.selected == 1 else StrategyName.MULTI_KRUM

    def minimum_updates(self) -> int:
        """Krum's score needs n - f - 2 >= 1 neighbours, and Multi-Krum `selected` updates to choose from."""
        return max(2 * self.byzantine + 3, self.selected)


Strategy: TypeAlias = FedAvg | FedProx | FedAvgM | FedOpt | Median | TrimmedMean | Krum

# Parameters each strategy takes (camelCase, as in the MLTask), with (low, high, low inclusive, high inclusive).
_FLOAT_BOUNDS: Mapping[str, tuple[float, float, bool, bool]] = {
    "proximalMu": (0.0, 1e4, True, True),
    "serverLearningRate": (0.0, 1e3, False, True),
    "momentum": (0.0, 1.0, True, False),
    "beta1": (0.0, 1.0, True, False),
    "beta2": (0.0, 1.0, True, False),
    "tau": (0.0, 1.0, False, True),
    "trimFraction": (0.0, 0.5, True, False),
}
_INT_BOUNDS: Mapping[str, tuple[int, int]] = {"byzantine": (0, 10_000), "selected": (1, 100_000)}
PARAMETERS: Mapping[StrategyName, tuple[str, ...]] = {
    StrategyName.FED_AVG: (),
    StrategyName.FED_PROX: ("proximalMu",),
    StrategyName.FED_AVG_M: ("serverLearningRate", "momentum"),
    StrategyName.FED_ADAM: ("serverLearningRate", "beta1", "beta2", "tau"),
    StrategyName.FED_YOGI: ("serverLearningRate", "beta1", "beta2", "tau"),
    StrategyName.FED_ADAGRAD: ("serverLearningRate", "tau"),
    StrategyName.MEDIAN: (),
    StrategyName.TRIMMED_MEAN: ("trimFraction",),
    StrategyName.KRUM: ("byzantine",),
    StrategyName.MULTI_KRUM: ("byzantine", "selected"),
}
_SNAKE = {
    "proximalMu": "proximal_mu",
    "serverLearningRate": "server_learning_rate",
    "momentum": "momentum",
    "beta1": "beta1",
    "beta2": "beta2",
    "tau": "tau",
    "trimFraction": "trim_fraction",
    "byzantine": "byzantine",
    "selected": "selected",
}


def parse_strategy(doc: Any, *, field: str = "strategy") -> Strategy:
    """`{"name": "fedAdam", "serverLearningRate": 0.01, ...}`: only the named strategy's parameters, in bounds."""
    if doc is None:
        return FedAvg()
    if not isinstance(doc, Mapping):
        raise errors.InvalidSpec("must be an object with a name and the strategy's parameters", field=field)
    raw_name = doc.get("name", StrategyName.FED_AVG.value)
    try:
        name = StrategyName(raw_name)
    except ValueError:
        raise errors.InvalidSpec(
            f"{raw_name!r} is not one of {[s.value for s in StrategyName]}", field=f"{field}.name"
        ) from None
    allowed = PARAMETERS[name]
    params: dict[str, Any] = {}
    for key, value in doc.items():
        if key == "name":
            continue
        if key not in allowed:
            takes = f"takes {', '.join(allowed)}" if allowed else "takes no parameters"
            raise errors.InvalidSpec(f"is not a parameter of {name.value}, which {takes}", field=f"{field}.{key}")
        params[_SNAKE[key]] = _parameter(key, value, field=f"{field}.{key}")
    if name is StrategyName.FED_PROX and "proximal_mu" not in params:
        raise errors.InvalidSpec("is required for fedProx", field=f"{field}.proximalMu")
    strategy: Strategy
    if name is StrategyName.FED_AVG:
        strategy = FedAvg()
    elif name is StrategyName.FED_PROX:
        strategy = FedProx(**params)
    elif name is StrategyName.FED_AVG_M:
        strategy = FedAvgM(**params)
    elif name in (StrategyName.FED_ADAM, StrategyName.FED_YOGI, StrategyName.FED_ADAGRAD):
        strategy = FedOpt(optimizer=_OPTIMIZERS[name], **params)
    elif name is StrategyName.MEDIAN:
        strategy = Median()
    elif name is StrategyName.TRIMMED_MEAN:
        strategy = TrimmedMean(**params)
    else:
        if name is StrategyName.MULTI_KRUM and "selected" not in params:
            raise errors.InvalidSpec("is required for multiKrum", field=f"{field}.selected")
        strategy = Krum(**params)
    return strategy


_OPTIMIZERS = {
    StrategyName.FED_ADAM: ServerOptimizer.ADAM,
    StrategyName.FED_YOGI: ServerOptimizer.YOGI,
    StrategyName.FED_ADAGRAD: ServerOptimizer.ADAGRAD,
}


def strategy_document(strategy: Strategy) -> dict[str, Any]:
    """The inverse of `parse_strategy`: the name and every parameter (defaults included)."""
    doc: dict[str, Any] = {"name": strategy.name.value}
    for key in PARAMETERS[strategy.name]:
        doc[key] = getattr(strategy, _SNAKE[key])
    return doc


def _parameter(key: str, value: Any, *, field: str) -> float | int:
    if key in _INT_BOUNDS:
        low, high = _INT_BOUNDS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise errors.InvalidSpec(f"must be an integer in [{low}, {high}], got {value!r}", field=field)
        return value
    flow, fhigh, low_in, high_in = _FLOAT_BOUNDS[key]
    return number(value, field=field, low=flow, high=fhigh, low_inclusive=low_in, high_inclusive=high_in)


def number(
    value: Any, *, field: str, low: float, high: float, low_inclusive: bool = True, high_inclusive: bool = True
) -> float:
    """A finite number within bounds (ints allowed; booleans are not numbers here)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and (value <= high if high_inclusive else value < high)
    if not ok:
        lb = "[" if low_inclusive else "("
        hb = "]" if high_inclusive else ")"
        raise errors.InvalidSpec(f"must be a number in {lb}{low:g}, {high:g}{hb}, got {value!r}", field=field)
    return float(value)
