"""`spec.federated` of the MLTask as typed models: the CRD's schema for federated learning.

Structure, enums and bounds live here (they become the CRD's OpenAPI schema);
the rules across fields (a quorum no larger than the participants, central
privacy only with a FedAvg-family strategy, a stop metric that is evaluated,
the parameters a strategy takes) are the shared parser's,
`tether.spec.federation`, which `validate` runs on `document()`: the operator
and the controller accept exactly the same documents. The strategy is one
object with a `name` and that strategy's parameters, as users of Flower know
them. Pure: pydantic and the shared spec package.
"""

from __future__ import annotations

from typing import Any

import pydantic

from tether.operator.camel import CamelModel
from tether.spec import federation, strategies


class Share(CamelModel):
    """A number of devices, or a fraction of a population, resolved when a round opens. Give one of the two."""

    count: int | None = pydantic.Field(
        default=None, ge=1, le=federation.MAX_PARTICIPANTS, description="A number of devices."
    )
    fraction: float | None = pydantic.Field(
        default=None, gt=0, le=1, description="A fraction (0 to 1] of the population, rounded up, at least one."
    )


class StopOn(CamelModel):
    """Stop before `rounds` when the evaluated metric reaches a target or stops improving."""

    metric: str = pydantic.Field(min_length=1, max_length=128, description="The evaluated metric, e.g. `accuracy`.")
    mode: federation.Goal = pydantic.Field(
        default=federation.Goal.MAX, description="`max`: higher is better (accuracy); `min`: lower is (loss)."
    )
    target: float | None = pydantic.Field(default=None, description="Stop once the metric reaches this value.")
    patience: int | None = pydantic.Field(
        default=None, ge=1, le=1000, description="Stop after this many evaluated rounds without improvement."
    )
    min_delta: float = pydantic.Field(
        default=0.0, ge=0, description="The least change that counts as an improvement for `patience`."
    )


class Strategy(CamelModel):
    """How a round's updates become the next global model: a strategy `name` and its parameters."""

    name: strategies.StrategyName = pydantic.Field(
        default=strategies.StrategyName.FED_AVG,
        description="`fedAvg` (sample-weighted mean), `fedAvgM` (server momentum), `fedProx` (FedAvg; the task adds "
        "a proximal term), `fedAdam`, `fedYogi`, `fedAdagrad` (server optimizers, Reddi et al. 2021), `median`, "
        "`trimmedMean` (coordinate-wise, robust), `krum`, `multiKrum` (Byzantine-robust selection).",
    )
    proximal_mu: float | None = pydantic.Field(
        default=None, ge=0, le=1e4, description="fedProx: the proximal term's mu, handed to the task (required)."
    )
    server_learning_rate: float | None = pydantic.Field(
        default=None,
        gt=0,
        le=1e3,
        description="fedAvgM, fedAdam, fedYogi, fedAdagrad: the server learning rate (1.0 for fedAvgM, 0.1 else).",
    )
    momentum: float | None = pydantic.Field(default=None, ge=0, lt=1, description="fedAvgM: the server momentum (0.9).")
    beta1: float | None = pydantic.Field(default=None, ge=0, lt=1, description="fedAdam, fedYogi: beta1 (0.9).")
    beta2: float | None = pydantic.Field(default=None, ge=0, lt=1, description="fedAdam, fedYogi: beta2 (0.99).")
    tau: float | None = pydantic.Field(
        default=None, gt=0, le=1, description="fedAdam, fedYogi, fedAdagrad: the adaptivity floor tau (0.001)."
    )
    trim_fraction: float | None = pydantic.Field(
        default=None, ge=0, lt=0.5, description="trimmedMean: the fraction cut from each end per coordinate (0.1)."
    )
    byzantine: int | None = pydantic.Field(
        default=None, ge=0, le=10_000, description="krum, multiKrum: the number of Byzantine devices tolerated (0)."
    )
    selected: int | None = pydantic.Field(
        default=None, ge=1, le=100_000, description="multiKrum: how many best-scored updates are averaged (required)."
    )


class Privacy(CamelModel):
    """Differential privacy: L2 clipping and Gaussian noise, with the privacy spent shown in status."""

    mode: federation.PrivacyMode = pydantic.Field(
        default=federation.PrivacyMode.CENTRAL,
        description="`central`: the cloud clips every update and noises their sum (a FedAvg-family strategy only). "
        "`local`: the task clips and noises its own update on the device.",
    )
    clip_norm: float = pydantic.Field(gt=0, le=1e6, description="The L2 norm every update is clipped to.")
    noise_multiplier: float = pydantic.Field(
        ge=0, le=1e3, description="Noise standard deviation over the clip norm (0: no noise, no guarantee)."
    )
    target_delta: float = pydantic.Field(
        default=federation.DEFAULT_TARGET_DELTA, gt=0, le=0.1, description="The delta epsilon is reported at."
    )


class ServerEvaluation(CamelModel):
    """Score each round's global model in the cloud on a held-out set the bundle ships."""

    file: str = pydantic.Field(
        min_length=1,
        max_length=512,
        description="The held-out set's file in the bundle: an .npz with `X` (inputs) and `y` (integer labels).",
    )
    model: str = pydantic.Field(
        min_length=1,
        max_length=512,
        description="The ONNX graph in the bundle that scores it: one input, class scores out; its initializers "
        "named as the model file's tensors (each round's weights are put in their place).",
    )


class Evaluation(CamelModel):
    """How rounds are scored: in the cloud on a held-out set and/or on sampled devices (sample-weighted)."""

    metric: str = pydantic.Field(
        default="accuracy", min_length=1, max_length=128, description="The metric the history and stopOn follow."
    )
    every: int = pydantic.Field(default=1, ge=1, le=federation.MAX_ROUNDS, description="Evaluate every N rounds.")
    server: ServerEvaluation | None = pydantic.Field(default=None, description="Server-side evaluation.")
    devices: Share | None = pydantic.Field(
        default=None, description="Federated evaluation on this many (or this fraction of) eligible devices."
    )


class Federated(CamelModel):
    """Federated learning in rounds: who takes part, when a round closes, and how updates are combined."""

    rounds: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=federation.MAX_ROUNDS,
        description=f"How many rounds to run (at most, with stopOn); required without stopOn, "
        f"{federation.DEFAULT_ROUNDS_WITH_STOP} with it when unset.",
    )
    stop_on: StopOn | None = pydantic.Field(default=None, description="Stop early on an evaluation metric.")
    participants: Share = pydantic.Field(
        description="Devices per round: a count, or a fraction of the eligible connected devices (those the target "
        "and rollout reach whose participation conditions hold), drawn by a seeded per-round hash.",
    )
    over_selection: float = pydantic.Field(
        default=0.0,
        ge=0,
        le=1,
        description="Select this fraction more devices than `participants`; the round closes when `participants` "
        "updates are in, so stragglers do not hold it up.",
    )
    quorum: Share = pydantic.Field(
        default_factory=lambda: Share(fraction=1.0),
        description="Updates a round needs by its deadline: a count, or a fraction of `participants`.",
    )
    seed: int = pydantic.Field(
        default=0, ge=0, le=federation.MAX_SEED, description="Seed of the per-round sampling: a run is reproducible."
    )
    round_deadline_seconds: int = pydantic.Field(
        default=600, ge=1, le=federation.MAX_DEADLINE_S, description="Seconds a round waits for updates."
    )
    on_quorum_missed: federation.QuorumMissed = pydantic.Field(
        default=federation.QuorumMissed.EXTEND,
        description="`extend` the deadline (up to maxExtensions times, then fail) or `fail` the round at once.",
    )
    max_extensions: int = pydantic.Field(
        default=1, ge=0, le=federation.MAX_EXTENSIONS, description="How many times a round's deadline is extended."
    )
    late_updates: federation.LateUpdates = pydantic.Field(
        default=federation.LateUpdates.REFUSE,
        description="Updates for a round that has closed: `refuse` them (counted in status) or `keep` them "
        "(stored and counted, never folded into a published model).",
    )
    strategy: Strategy = pydantic.Field(default_factory=Strategy, description="The aggregation strategy.")
    privacy: Privacy | None = pydantic.Field(default=None, description="Differential privacy; none when unset.")
    evaluation: Evaluation | None = pydantic.Field(default=None, description="How rounds are evaluated.")
    model_file: str = pydantic.Field(
        default=federation.DEFAULT_MODEL_FILE,
        min_length=1,
        max_length=512,
        description="The bundle's file holding the global weights (a safetensors file); each round replaces it.",
    )
    update_encoding: federation.UpdateEncoding = pydantic.Field(
        default=federation.UpdateEncoding.FLOAT32,
        description="How devices send updates: `float32`, `float16` (relative error at most 2^-11) or `int8` "
        "(per-tensor scale, error at most max|x|/254).",
    )

    def document(self) -> dict[str, Any]:
        """The shared parser's document (`tether.spec.federation`): camelCase, unset fields left out."""
        return self.to_json()

    def parsed(self, *, field: str = "spec.federated") -> federation.Federation:
        """The typed round rules; `errors.InvalidSpec` names the field."""
        parsed = federation.parse_federation(self.document(), field=field)
        assert parsed is not None
        return parsed
