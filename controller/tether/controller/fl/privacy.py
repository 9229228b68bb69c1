"""Differential privacy for a round: per-update L2 clipping, Gaussian noise, and the privacy spent.

Central DP follows DP-FedAvg (McMahan et al. 2018, "Learning Differentially
Private Recurrent Language Models"): each update is scaled to an L2 norm of at
most `clip_norm` over all its tensors, every update weighs the same (a sample
count would let one device's weight exceed the clip), and the sum of the
clipped updates gets Gaussian noise of standard deviation
`noise_multiplier · clip_norm` before it is divided by the number of updates
the round expects (the participants selected, fixed in advance, so the
denominator reveals nothing). One device changes the sum by at most
`clip_norm`, so a round is a Gaussian mechanism of that noise multiplier on a
sample of the eligible devices.

The privacy spent is computed by Google's `dp-accounting` (the RDP accountant
of TensorFlow Privacy): `rounds` compositions of a Poisson-sampled Gaussian
mechanism with sampling rate = participants / eligible devices, converted to
(epsilon, delta) at the task's target delta. Tether samples a fixed number of
participants, not Poisson: the Poisson analysis is the one TF Privacy, Opacus
and Flower's DP wrappers report for fixed-size samples too, stated as such.
Local DP (the task clips and noises on the device) is accounted without the
sampling amplification, for a device that took part in every round.

Noise comes from a generator the caller seeds from a secret kept with the
round (not the task's public sampling seed: noise an observer can predict
protects nothing), so a redelivered aggregation reproduces the same model.
Pure: numpy and dp-accounting, no I/O.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import dp_accounting
import numpy as np
import numpy.typing as npt

from tether.controller.fl import updates
from tether.spec import federation


@dataclasses.dataclass(frozen=True, kw_only=True)
class Clipped:
    """An update scaled to the clip norm (weight 1), with the norm it had."""

    update: updates.Update
    norm: float
    clipped: bool


def clip(update: updates.Update, *, clip_norm: float) -> Clipped:
    """The update scaled by min(1, clip_norm / ||delta||), its weight set to 1 (DP-FedAvg's uniform weighting)."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = updates.l2_norm(update.delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    delta = {n: np.asarray(a, dtype=np.float64) * scale for n, a in update.delta.items()}
    return Clipped(update=updates.Update(device=update.device, delta=delta, samples=1), norm=norm, clipped=scale < 1.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GaussianMechanism:
    """Central DP for one round: clip each update, noise the sum, divide by the expected number of updates."""

    clip_norm: float
    noise_multiplier: float
    expected_updates: int

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or self.noise_multiplier < 0 or self.expected_updates < 1:
            raise ValueError(f"invalid mechanism {self}")

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the *sum* of the clipped updates."""
        return self.noise_multiplier * self.clip_norm

    def noised_mean(
        self, total: Mapping[str, npt.NDArray[np.float64]], *, rng: np.random.Generator
    ) -> dict[str, npt.NDArray[np.float64]]:
        """(sum + N(0, noise_std²·I)) / expected_updates, tensors drawn in name order."""
        out: dict[str, npt.NDArray[np.float64]] = {}
        for n in sorted(total):
            noise = rng.normal(0.0, self.noise_std, size=total[n].shape) if self.noise_std > 0 else 0.0
            out[n] = (total[n] + noise) / float(self.expected_updates)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spent:
    """The privacy spent so far: (epsilon, delta)-DP after `rounds` rounds."""

    epsilon: float
    delta: float
    rounds: int
    sampling_rate: float
    noise_multiplier: float
    accountant: str = "rdp"

    def to_json(self) -> dict[str, float | int | str | None]:
        return {
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,  # None: no guarantee (no noise)
            "delta": self.delta,
            "rounds": self.rounds,
            "samplingRate": self.sampling_rate,
            "noiseMultiplier": self.noise_multiplier,
            "accountant": self.accountant,
        }


def spent(*, noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> Spent:
    """Epsilon at `delta` after `rounds` Poisson-sampled Gaussian mechanisms (RDP accountant, dp-accounting).

    No noise means no guarantee: epsilon is infinite after the first round.
    """
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}")
    if rounds < 0 or noise_multiplier < 0 or not 0 < delta < 1:
        raise ValueError(f"invalid accounting input: rounds={rounds}, noise={noise_multiplier}, delta={delta}")
    epsilon: float
    if rounds == 0:
        epsilon = 0.0
    elif noise_multiplier == 0:
        epsilon = math.inf
    else:
        gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
        epsilon = _rdp_epsilon(gaussian, rounds=rounds, delta=delta)
        if sampling_rate < 1:
            # Sampling never costs privacy; the sampled bound can be looser where the library's series for an
            # order does not converge (it drops that order), so the unsampled bound caps it.
            sampled = dp_accounting.PoissonSampledDpEvent(sampling_rate, gaussian)
            epsilon = min(epsilon, _rdp_epsilon(sampled, rounds=rounds, delta=delta))
    return Spent(
        epsilon=epsilon, delta=delta, rounds=rounds, sampling_rate=sampling_rate, noise_multiplier=noise_multiplier
    )


def _rdp_epsilon(event: dp_accounting.DpEvent, *, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))


def spent_for(privacy: federation.Privacy, *, rounds: int, participants: int, eligible: int) -> Spent:
    """The privacy a task's settings have spent after `rounds` rounds of `participants` among `eligible` devices."""
    local = privacy.mode is federation.PrivacyMode.LOCAL
    rate = 1.0 if local or eligible <= 0 else min(1.0, participants / eligible)
    return spent(
        noise_multiplier=privacy.noise_multiplier, sampling_rate=rate, rounds=rounds, delta=privacy.target_delta
    )
