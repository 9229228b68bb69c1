"""A federated MLTask's round rules (`spec.federated`), one typed value for the operator and the controller.

What a user writes decides how the cloud runs rounds: how many rounds (or a
metric to stop on), who takes part and how they are drawn, the quorum and
deadline, what happens to stragglers and late updates, the strategy
(`tether.spec.strategies`), differential privacy and evaluation. The operator
validates an MLTask with `parse_federation` and the controller runs rounds
from its value, so a spec the operator accepts is one the controller runs.

    {"rounds": 30,                                   # at most this many rounds
     "stopOn": {"metric": "accuracy", "target": 0.9, "patience": 5, "minDelta": 0.001, "mode": "max"},
     "participants": {"count": 10},                  # or {"fraction": 0.1} of the eligible connected devices
     "overSelection": 0.3,                           # select 30 % more; the round closes at `participants`
     "quorum": {"fraction": 0.8},                    # of `participants`; or {"count": 8}
     "seed": 0,                                      # per-round sampling seed: a run is reproducible
     "roundDeadlineSeconds": 600,
     "onQuorumMissed": "extend", "maxExtensions": 1, # or "fail"
     "lateUpdates": "refuse",                        # or "keep": stored and counted, never folded
     "strategy": {"name": "fedAvg"},
     "privacy": {"mode": "central", "clipNorm": 1.0, "noiseMultiplier": 1.0, "targetDelta": 1e-5},
     "evaluation": {"metric": "accuracy", "every": 1,
                    "server": {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"},
                    "devices": {"fraction": 0.1}},
     "modelFile": "model.safetensors",               # the bundle's file holding the global weights
     "updateEncoding": "float32"}                    # or float16 | int8: how devices send updates

Stragglers: a round selects `participants` devices (plus `overSelection`,
Bonawitz et al. 2019), aggregates as soon as `participants` updates are in,
and at the deadline aggregates what came if the quorum is met; if not, it is
extended by another deadline (`maxExtensions` times) or fails. Errors are
`errors.InvalidSpec` naming the field. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, TypeVar

from tether.common import errors
from tether.spec import strategies
from tether.spec.strategies import number

_E = TypeVar("_E", bound=enum.Enum)

# ------------------------------------------------------------------ privacy


class PrivacyMode(enum.StrEnum):
    CENTRAL = "central"  # the server clips every update and adds Gaussian noise to their sum
    LOCAL = "local"  # the task clips and noises its own update on the device


DEFAULT_TARGET_DELTA = 1e-5


@dataclasses.dataclass(frozen=True, kw_only=True)
class Privacy:
    """Differential privacy by L2 clipping and Gaussian noise (noise std = noise_multiplier · clip_norm)."""

    mode: PrivacyMode
    clip_norm: float
    noise_multiplier: float
    target_delta: float = DEFAULT_TARGET_DELTA

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "clipNorm": self.clip_norm,
            "noiseMultiplier": self.noise_multiplier,
            "targetDelta": self.target_delta,
        }


PRIVACY_FIELDS = ("mode", "clipNorm", "noiseMultiplier", "targetDelta")


def parse_privacy(doc: Any, *, field: str = "privacy") -> Privacy | None:
    """`{"mode": "central", "clipNorm": 1.0, "noiseMultiplier": 1.0, "targetDelta": 1e-5}`; None when absent."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise errors.InvalidSpec("must be an object", field=field)
    unknown = sorted(set(doc) - set(PRIVACY_FIELDS))
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {unknown}; allowed are {list(PRIVACY_FIELDS)}", field=field)
    raw_mode = doc.get("mode", PrivacyMode.CENTRAL.value)
    try:
        mode = PrivacyMode(raw_mode)
    except ValueError:
        raise errors.InvalidSpec(
            f"{raw_mode!r} is not one of {[m.value for m in PrivacyMode]}", field=f"{field}.mode"
        ) from None
    for key in ("clipNorm", "noiseMultiplier"):
        if key not in doc:
            raise errors.InvalidSpec("is required", field=f"{field}.{key}")
    clip_norm = number(doc["clipNorm"], field=f"{field}.clipNorm", low=0.0, high=1e6, low_inclusive=False)
    noise = number(doc["noiseMultiplier"], field=f"{field}.noiseMultiplier", low=0.0, high=1e3)
    delta = number(
        doc.get("targetDelta", DEFAULT_TARGET_DELTA),
        field=f"{field}.targetDelta",
        low=0.0,
        high=0.1,
        low_inclusive=False,
    )
    return Privacy(mode=mode, clip_norm=clip_norm, noise_multiplier=noise, target_delta=delta)


# ------------------------------------------------------------------ the round rules

MAX_ROUNDS = 100_000
MAX_PARTICIPANTS = 1_000_000
MAX_DEADLINE_S = 7 * 86400
MAX_EXTENSIONS = 100
MAX_SEED = 2**63 - 1
DEFAULT_ROUNDS_WITH_STOP = 1000


class QuorumMissed(enum.StrEnum):
    EXTEND = "extend"  # another deadline, up to maxExtensions times, then fail
    FAIL = "fail"


class LateUpdates(enum.StrEnum):
    REFUSE = "refuse"  # refused with the reason, counted in status
    KEEP = "keep"  # stored with its round and counted, never folded into a published model


class UpdateEncoding(enum.StrEnum):
    """How a device encodes its update's tensors on the wire (errors stated in docs/internals.md)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT8 = "int8"  # per-tensor symmetric scale


DEFAULT_MODEL_FILE = "model.safetensors"


class Goal(enum.StrEnum):
    MAX = "max"
    MIN = "min"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Share:
    """A number of devices, or a fraction of some population, resolved when a round opens."""

    count: int | None = None
    fraction: float | None = None

    def of(self, population: int) -> int:
        """How many of `population`: the count (at most the population), or ceil(fraction·population), >= 1."""
        if population <= 0:
            return 0
        if self.count is not None:
            return min(self.count, population)
        assert self.fraction is not None
        return max(1, min(population, math.ceil(self.fraction * population - 1e-9)))

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count} if self.count is not None else {"fraction": self.fraction}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StopOn:
    """Stop when the evaluation metric reaches `target`, or has not improved by `min_delta` for `patience` rounds."""

    metric: str
    goal: Goal = Goal.MAX
    target: float | None = None
    patience: int | None = None
    min_delta: float = 0.0


SERVER_METRICS = ("accuracy", "loss")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Evaluation:
    """How rounds are scored: on the cloud's held-out set, and/or on sampled devices (sample-weighted)."""

    metric: str = "accuracy"
    every: int = 1
    server_file: str | None = None  # the held-out set (.npz with X and y), a file of the bundle
    server_model: str | None = None  # the ONNX graph scoring it, its initializers named as the model's tensors
    devices: Share | None = None

    def evaluates_round(self, number: int) -> bool:
        """Whether the cloud scores round `number`'s model (every `every`-th round, from round `every`)."""
        return self.server_file is not None and number % self.every == 0

    @property
    def server_metrics(self) -> tuple[str, ...]:
        """The metrics server-side evaluation reports (`loss` only when the graph outputs probabilities)."""
        return SERVER_METRICS if self.server_file is not None else ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Federation:
    """A federated task's round rules (`spec.federated`)."""

    rounds: int
    participants: Share
    quorum: Share
    strategy: strategies.Strategy
    stop_on: StopOn | None = None
    over_selection: float = 0.0
    seed: int = 0
    round_deadline_s: int = 600
    on_quorum_missed: QuorumMissed = QuorumMissed.EXTEND
    max_extensions: int = 1
    late_updates: LateUpdates = LateUpdates.REFUSE
    privacy: Privacy | None = None
    evaluation: Evaluation | None = None
    model_file: str = DEFAULT_MODEL_FILE
    update_encoding: UpdateEncoding = UpdateEncoding.FLOAT32

    def selected(self, eligible: int) -> int:
        """Devices a round selects among `eligible`: the participants and the over-selection, at most all."""
        target = self.participants.of(eligible)
        return min(eligible, math.ceil(target * (1.0 + self.over_selection) - 1e-9))

    def quorum_of(self, eligible: int) -> int:
        """Updates a round needs by its deadline when `eligible` devices could take part.

        A count is absolute (fewer eligible devices cannot reach it: the round waits); a fraction is of the
        participants the round draws."""
        if self.quorum.count is not None:
            return self.quorum.count
        return max(1, self.quorum.of(self.participants.of(eligible)))

    def task_parameters(self) -> dict[str, float]:
        """What the task on the device is handed: FedProx's mu, local DP's clip norm and noise multiplier."""
        out: dict[str, float] = {}
        if isinstance(self.strategy, strategies.FedProx):
            out["proximalMu"] = self.strategy.proximal_mu
        if self.privacy is not None and self.privacy.mode is PrivacyMode.LOCAL:
            out["clipNorm"] = self.privacy.clip_norm
            out["noiseMultiplier"] = self.privacy.noise_multiplier
        return out


FIELDS = (
    "rounds",
    "stopOn",
    "participants",
    "overSelection",
    "quorum",
    "seed",
    "roundDeadlineSeconds",
    "onQuorumMissed",
    "maxExtensions",
    "lateUpdates",
    "strategy",
    "privacy",
    "evaluation",
    "modelFile",
    "updateEncoding",
)


def parse_federation(doc: Any, *, field: str = "federated") -> Federation | None:
    """Validate `spec.federated` (`errors.InvalidSpec` names the field); None when the task is not federated."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise errors.InvalidSpec("must be an object", field=field)
    _known(doc, FIELDS, field=field)
    stop_on = _stop_on(doc.get("stopOn"), field=f"{field}.stopOn")
    if "rounds" in doc:
        rounds = _int(doc["rounds"], field=f"{field}.rounds", low=1, high=MAX_ROUNDS)
    elif stop_on is not None:
        rounds = DEFAULT_ROUNDS_WITH_STOP
    else:
        raise errors.InvalidSpec("is required unless stopOn says when to stop", field=f"{field}.rounds")
    if "participants" not in doc:
        raise errors.InvalidSpec(
            "is required: a count or a fraction of eligible devices", field=f"{field}.participants"
        )
    participants = _share(doc["participants"], field=f"{field}.participants")
    quorum = _share(doc.get("quorum", {"fraction": 1.0}), field=f"{field}.quorum")
    if participants.count is not None and quorum.count is not None and quorum.count > participants.count:
        raise errors.InvalidSpec(
            f"needs {quorum.count} updates but a round has only {participants.count} participants",
            field=f"{field}.quorum.count",
        )
    strategy = strategies.parse_strategy(doc.get("strategy"), field=f"{field}.strategy")
    if isinstance(strategy, strategies.Krum):
        need = strategy.minimum_updates()
        if quorum.count is not None and quorum.count < need:
            raise errors.InvalidSpec(
                f"{strategy.name.value} with byzantine={strategy.byzantine} needs at least {need} updates a round, "
                f"the quorum is {quorum.count}",
                field=f"{field}.quorum.count",
            )
    privacy = parse_privacy(doc.get("privacy"), field=f"{field}.privacy")
    robust = isinstance(strategy, strategies.Median | strategies.TrimmedMean | strategies.Krum)
    if privacy is not None and privacy.mode is PrivacyMode.CENTRAL and robust:
        raise errors.InvalidSpec(
            f"central privacy bounds one device's effect on a mean; {strategy.name.value} is not a mean: use a "
            "FedAvg-family strategy, or mode local",
            field=f"{field}.privacy.mode",
        )
    evaluation = _evaluation(doc.get("evaluation"), field=f"{field}.evaluation")
    if stop_on is not None:
        if evaluation is None:
            raise errors.InvalidSpec("needs an evaluation to read the metric from", field=f"{field}.stopOn")
        if stop_on.metric != evaluation.metric:
            raise errors.InvalidSpec(
                f"{stop_on.metric!r} is not the evaluated metric {evaluation.metric!r}", field=f"{field}.stopOn.metric"
            )
    return Federation(
        rounds=rounds,
        participants=participants,
        quorum=quorum,
        strategy=strategy,
        stop_on=stop_on,
        over_selection=number(doc.get("overSelection", 0.0), field=f"{field}.overSelection", low=0.0, high=1.0),
        seed=_int(doc.get("seed", 0), field=f"{field}.seed", low=0, high=MAX_SEED),
        round_deadline_s=_int(
            doc.get("roundDeadlineSeconds", 600), field=f"{field}.roundDeadlineSeconds", low=1, high=MAX_DEADLINE_S
        ),
        on_quorum_missed=_enum(QuorumMissed, doc.get("onQuorumMissed", "extend"), field=f"{field}.onQuorumMissed"),
        max_extensions=_int(doc.get("maxExtensions", 1), field=f"{field}.maxExtensions", low=0, high=MAX_EXTENSIONS),
        late_updates=_enum(LateUpdates, doc.get("lateUpdates", "refuse"), field=f"{field}.lateUpdates"),
        privacy=privacy,
        evaluation=evaluation,
        model_file=_path(doc.get("modelFile", DEFAULT_MODEL_FILE), field=f"{field}.modelFile"),
        update_encoding=_enum(UpdateEncoding, doc.get("updateEncoding", "float32"), field=f"{field}.updateEncoding"),
    )


def _share(doc: Any, *, field: str) -> Share:
    if not isinstance(doc, Mapping):
        raise errors.InvalidSpec("must be an object with a count or a fraction", field=field)
    _known(doc, ("count", "fraction"), field=field)
    if ("count" in doc) == ("fraction" in doc):
        raise errors.InvalidSpec("needs exactly one of count and fraction", field=field)
    if "count" in doc:
        return Share(count=_int(doc["count"], field=f"{field}.count", low=1, high=MAX_PARTICIPANTS))
    return Share(fraction=number(doc["fraction"], field=f"{field}.fraction", low=0.0, high=1.0, low_inclusive=False))


def _stop_on(doc: Any, *, field: str) -> StopOn | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise errors.InvalidSpec("must be an object", field=field)
    _known(doc, ("metric", "mode", "target", "patience", "minDelta"), field=field)
    metric = _name(doc.get("metric"), field=f"{field}.metric")
    target = None if doc.get("target") is None else number(doc["target"], field=f"{field}.target", low=-1e12, high=1e12)
    patience = (
        None if doc.get("patience") is None else _int(doc["patience"], field=f"{field}.patience", low=1, high=1000)
    )
    if target is None and patience is None:
        raise errors.InvalidSpec("needs a target, a patience or both", field=field)
    return StopOn(
        metric=metric,
        goal=_enum(Goal, doc.get("mode", "max"), field=f"{field}.mode"),
        target=target,
        patience=patience,
        min_delta=number(doc.get("minDelta", 0.0), field=f"{field}.minDelta", low=0.0, high=1e12),
    )


def _evaluation(doc: Any, *, field: str) -> Evaluation | None:
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise errors.InvalidSpec("must be an object", field=field)
    _known(doc, ("metric", "every", "server", "devices"), field=field)
    server_file = server_model = None
    server = doc.get("server")
    if server is not None:
        if not isinstance(server, Mapping):
            raise errors.InvalidSpec("must be an object naming the held-out set's file", field=f"{field}.server")
        _known(server, ("file", "model"), field=f"{field}.server")
        server_file = _path(server.get("file"), field=f"{field}.server.file")
        if server.get("model") is None:
            raise errors.InvalidSpec(
                "needs the ONNX graph that scores the held-out set (a file of the bundle)",
                field=f"{field}.server.model",
            )
        server_model = _path(server.get("model"), field=f"{field}.server.model")
    devices = None if doc.get("devices") is None else _share(doc["devices"], field=f"{field}.devices")
    if server_file is None and devices is None:
        raise errors.InvalidSpec("needs a server held-out set, devices to evaluate on, or both", field=field)
    metric = _name(doc.get("metric", "accuracy"), field=f"{field}.metric")
    if server_file is not None and metric not in SERVER_METRICS:
        raise errors.InvalidSpec(
            f"server-side evaluation reports {list(SERVER_METRICS)}, not {metric!r}", field=f"{field}.metric"
        )
    return Evaluation(
        metric=metric,
        every=_int(doc.get("every", 1), field=f"{field}.every", low=1, high=MAX_ROUNDS),
        server_file=server_file,
        server_model=server_model,
        devices=devices,
    )


def _known(doc: Mapping[str, Any], allowed: tuple[str, ...], *, field: str) -> None:
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise errors.InvalidSpec(f"unknown fields {unknown}; allowed are {list(allowed)}", field=field)


def _int(value: Any, *, field: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise errors.InvalidSpec(f"must be an integer in [{low}, {high}], got {value!r}", field=field)
    return value


def _enum(kind: type[_E], value: Any, *, field: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise errors.InvalidSpec(f"{value!r} is not one of {[m.value for m in kind]}", field=field) from None


def _name(value: Any, *, field: str) -> str:
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= 128
        or not value.replace("_", "a").replace(".", "a").isalnum()
    ):
        raise errors.InvalidSpec(f"must be a metric name (letters, digits, _ and .), got {value!r}", field=field)
    return value


def _path(value: Any, *, field: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 512:
        raise errors.InvalidSpec(f"must be a relative path of the bundle, got {value!r}", field=field)
    parts = value.split("/")
    if value.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise errors.InvalidSpec(f"must be a relative path inside the bundle, got {value!r}", field=field)
    return value
