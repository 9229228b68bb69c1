"""Federated rounds of examples/digits-fl driven by Tether's strategies: the Tether side of `tether bench fl`.

A run is data in, curve out: the split (`tether.devtools.fldata`), the
round-0 weights, the participants of every round (`schedule`, Tether's own
seeded sampler `tether.controller.fl.sampling`, fixed for both systems), the
hyper-parameters and a strategy. Each round every participant runs the
example's training function (`fltrain.train`, the very function the task runs
on a device and Flower's clients run) from the global weights, its delta goes
into `tether.controller.fl.aggregators.aggregate` in device-id order, and the
new global model is scored on the held-out set.

*How* a round reaches the strategy is a `RoundPath`. `InProcessPath` calls
the training function and the pure strategies in this process ("in-process
strategies": no agent, gRPC, Postgres or Celery); the end-to-end path (real
agents running the task, updates as blobs, the Celery worker folding them)
implements the same Protocol and plugs into `run_rounds` unchanged.

Poisoning (the robustness figure): a fixed 10 % of the devices, drawn with
the seed, send -100 x their honest delta whenever they are selected.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from tether.controller.fl import aggregators, sampling, updates
from tether.devtools import fldata
from tether.spec import strategies

TASK_NAME = "default/digits-fl"  # the release of examples/digits-fl/mltask.yaml, as the round driver names it
POISON_SCALE = -100.0
Weights = dict[str, npt.NDArray[np.float32]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
    """The hyper-parameters both systems run with (issue 11's benchmark)."""

    rounds: int = 30
    per_round: int = 10
    lr: float = 0.1
    batch: int = 32
    epochs: int = 1
    seed: int = 0

    def batch_seed(self, round_index: int) -> int:
        """The batch-order seed of round `round_index` (0-based here; the task sees round numbers from 1, as the
        controller numbers them, and computes the same value: `fltrain.batch_seed(seed, round_index + 1)`)."""
        return self.seed * 1_000_003 + round_index + 1


@dataclasses.dataclass(frozen=True, kw_only=True)
class Curve:
    """One run: held-out accuracy and loss before round 1 and after every round, each round's seconds, and
    per round the updates refused (non-finite, or a device that could not train from a broken model)."""

    accuracy: list[float]
    loss: list[float]
    round_s: list[float]
    refused: list[int] = dataclasses.field(default_factory=list)

    def rounds_to(self, target: float) -> int | None:
        """The first round whose global model reaches `target` accuracy (None if none does)."""
        for r, a in enumerate(self.accuracy):
            if a >= target:
                return r
        return None


def example_dir() -> pathlib.Path:
    """examples/digits-fl: the checkout's copy when run from one, else the installed `tether.examples`."""
    here = pathlib.Path(__file__).resolve()
    for candidate in (here.parents[3] / "examples" / "digits-fl", _installed()):
        if candidate is not None and (candidate / "task" / "fltrain.py").is_file():
            return candidate
    raise FileNotFoundError("examples/digits-fl is neither in this checkout nor installed as tether.examples")


def _installed() -> pathlib.Path | None:
    try:
        import importlib.resources

        return pathlib.Path(str(importlib.resources.files("tether.examples") / "digits-fl"))
    except (ModuleNotFoundError, TypeError):
        return None


def load_fltrain(example: pathlib.Path) -> ModuleType:
    """The example's `fltrain` module, loaded from its file (it lives in the task bundle, not in a package)."""
    path = example / "task" / "fltrain.py"
    spec = importlib.util.spec_from_file_location("digits_fl_fltrain", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def schedule(devices: Sequence[str], *, rounds: int, per_round: int, seed: int) -> list[tuple[str, ...]]:
    """Each round's participants, drawn by the controller's seeded sampler as its round driver draws them (the
    task's release name, rounds numbered from 1), in device-id (fold) order."""
    return [
        tuple(sorted(sampling.sample(eligible=devices, k=per_round, seed=seed, task=TASK_NAME, round_number=r)))
        for r in range(1, rounds + 1)
    ]


def poisoned_devices(devices: Sequence[str], *, fraction: float, seed: int) -> frozenset[str]:
    """A fixed `fraction` of the devices (seeded), the attackers of the robustness runs."""
    rng = np.random.default_rng(seed + 7919)
    k = round(fraction * len(devices))
    return frozenset(str(d) for d in rng.choice(np.array(sorted(devices)), size=k, replace=False))


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundResult:
    """A round's outcome (None when no update could be folded: the global model stays) and its refusals."""

    outcome: aggregators.Outcome | None
    refused: int


class RoundPath(Protocol):
    """How one round's participants train and their updates reach the strategy.

    As the controller does, an update that cannot be folded (`updates.InvalidUpdate`) is refused and the round
    aggregates the others; with none left the round publishes nothing."""

    @property
    def name(self) -> str:
        """What the JSON calls this path (`tether_path`)."""

    def round(
        self,
        *,
        strategy: strategies.Strategy,
        global_model: Weights,
        state: aggregators.ServerState,
        participants: Sequence[str],
        round_index: int,
        poisoned: frozenset[str],
    ) -> RoundResult: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class InProcessPath:
    """The training function and Tether's pure strategies in this process."""

    fltrain: ModuleType
    split: fldata.Split
    setup: Setup
    name: str = "in-process strategies"

    def round(
        self,
        *,
        strategy: strategies.Strategy,
        global_model: Weights,
        state: aggregators.ServerState,
        participants: Sequence[str],
        round_index: int,
        poisoned: frozenset[str],
    ) -> RoundResult:
        shards = {s.device: s for s in self.split.shards}
        mu = strategy.proximal_mu if isinstance(strategy, strategies.FedProx) else 0.0
        contributions = []
        refused = 0
        for device in participants:
            shard = shards[device]
            try:
                new, _ = self.fltrain.train(
                    global_model,
                    shard.X,
                    shard.y,
                    lr=self.setup.lr,
                    batch=self.setup.batch,
                    epochs=self.setup.epochs,
                    seed=self.setup.batch_seed(round_index),
                    proximal_mu=mu,
                )
            except ValueError:  # the task refuses a non-finite global model: the device's run fails
                refused += 1
                continue
            with np.errstate(all="ignore"):
                delta = {n: new[n] - global_model[n] for n in global_model}
                if device in poisoned:
                    delta = {n: (d * np.float32(POISON_SCALE)).astype(np.float32) for n, d in delta.items()}
            update = updates.Update(device=device, delta=delta, samples=len(shard.y))
            try:
                updates.check(update, like=global_model)
            except updates.InvalidUpdate:
                refused += 1
                continue
            contributions.append(update)
        if not contributions:
            return RoundResult(outcome=None, refused=refused)
        with np.errstate(over="ignore"):  # a poisoned FedAvg model may overflow float32: that is the damage shown
            outcome = aggregators.aggregate(
                strategy, global_model=global_model, contributions=contributions, state=state
            )
        return RoundResult(outcome=outcome, refused=refused)


def run_rounds(
    path: RoundPath,
    *,
    strategy: strategies.Strategy,
    initial: Weights,
    plan: Sequence[Sequence[str]],
    evaluate: Callable[[Weights], dict[str, float]],
    poisoned: frozenset[str] = frozenset(),
    stop_at: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> Curve:
    """Run the rounds of `plan` (or until accuracy reaches `stop_at`) and score every global model."""
    model = {n: np.array(w, dtype=np.float32) for n, w in initial.items()}
    state = aggregators.ServerState()
    with np.errstate(all="ignore"):  # a broken (non-finite) model scores as what it predicts, without warnings
        first = evaluate(model)
    accuracy, loss, round_s, refused = [first["accuracy"]], [first["loss"]], [], []
    for r, participants in enumerate(plan):
        started = time.perf_counter()
        result = path.round(
            strategy=strategy,
            global_model=model,
            state=state,
            participants=participants,
            round_index=r,
            poisoned=poisoned,
        )
        if result.outcome is not None:
            model = {n: np.asarray(w, dtype=np.float32) for n, w in result.outcome.model.items()}
            state = result.outcome.state
        refused.append(result.refused)
        with np.errstate(all="ignore"):
            scores = evaluate(model)
        round_s.append(time.perf_counter() - started)
        accuracy.append(scores["accuracy"])
        loss.append(scores["loss"])
        if progress is not None:
            progress(r + 1, scores["accuracy"])
        if stop_at is not None and scores["accuracy"] >= stop_at:
            break
    return Curve(accuracy=accuracy, loss=loss, round_s=round_s, refused=refused)


def write_inputs(
    path: pathlib.Path,
    *,
    split: fldata.Split,
    initial: Weights,
    plan: Sequence[Sequence[str]],
    setup: Setup,
    fltrain_path: pathlib.Path,
) -> None:
    """Everything the Flower half needs, in one npz: shards (concatenated, with offsets), test set, weights,
    the schedule as device indices, and the hyper-parameters."""
    index = {s.device: i for i, s in enumerate(split.shards)}
    offsets = np.cumsum([0] + [len(s.y) for s in split.shards]).astype(np.int64)
    hyper = {
        "lr": setup.lr,
        "batch": setup.batch,
        "epochs": setup.epochs,
        "seed": setup.seed,
        "names": list(initial),
        "fltrain": str(fltrain_path),
    }
    arrays: dict[str, Any] = {
        "X": np.concatenate([s.X for s in split.shards]),
        "y": np.concatenate([s.y for s in split.shards]),
        "offsets": offsets,
        "X_test": split.X_test,
        "y_test": split.y_test,
        "schedule": np.array([[index[d] for d in devices] for devices in plan], dtype=np.int64),
        "hyper_json": np.array(json.dumps(hyper)),
    }
    for n, w in initial.items():
        arrays[f"w:{n}"] = w
    np.savez(path, **arrays)
