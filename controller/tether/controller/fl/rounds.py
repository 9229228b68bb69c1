"""A federated round as state: phases, the transitions between them, and the events that move a round.

    OPEN ──select──▶ COLLECTING ──target reached / deadline with quorum──▶ AGGREGATING ──▶ PUBLISHED
      │                  │  ▲                                                  │
      │                  ▼  │ (updates keep coming)                            ▼
      └──deadline──▶ EXTENDED ─────────────(same as COLLECTING)─────────▶   FAILED
                 (quorum missed, extensions left)       quorum missed, none left / cancelled / aggregation failed

- OPEN: the round exists and waits for enough eligible devices to select a
  quorum. `select` draws the participants (`sampling`, seeded per round) and
  starts the deadline.
- COLLECTING / EXTENDED: updates from selected devices are accepted, once per
  device. The round aggregates as soon as `participants` updates are in (over-
  selected stragglers are not waited for), or at the deadline if the quorum
  is met; otherwise the deadline is extended (`onQuorumMissed: extend`, up to
  `maxExtensions` times) or the round fails.
- AGGREGATING: the worker folds the accepted updates; PUBLISHED when the new
  global model is written, FAILED when aggregation cannot produce one.

Every change goes through `transition`, which refuses a pair not in
`TRANSITIONS` (Flower's run states do the same). Updates are judged by
`admit`, which returns a verdict rather than raising, so the caller counts
refusals in status and tells the device why: not selected, sent twice, round
closed, or late (kept, never folded, under `lateUpdates: keep`). Time is an
argument (`now`, Unix seconds): the deadline logic is tested without clocks.
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable, Mapping, Sequence

from tether.common import errors
from tether.controller.fl import sampling
from tether.spec import federation


class Phase(enum.StrEnum):
    OPEN = "Open"
    COLLECTING = "Collecting"
    EXTENDED = "Extended"
    AGGREGATING = "Aggregating"
    PUBLISHED = "Published"
    FAILED = "Failed"


TRANSITIONS: frozenset[tuple[Phase, Phase]] = frozenset(
    {
        (Phase.OPEN, Phase.COLLECTING),
        (Phase.OPEN, Phase.EXTENDED),
        (Phase.OPEN, Phase.FAILED),
        (Phase.COLLECTING, Phase.AGGREGATING),
        (Phase.COLLECTING, Phase.EXTENDED),
        (Phase.COLLECTING, Phase.FAILED),
        (Phase.EXTENDED, Phase.COLLECTING),  # an extended round that was still waiting for devices selects them
        (Phase.EXTENDED, Phase.EXTENDED),  # another extension
        (Phase.EXTENDED, Phase.AGGREGATING),
        (Phase.EXTENDED, Phase.FAILED),
        (Phase.AGGREGATING, Phase.PUBLISHED),
        (Phase.AGGREGATING, Phase.FAILED),
    }
)
TERMINAL = frozenset({Phase.PUBLISHED, Phase.FAILED})
ACCEPTING = frozenset({Phase.COLLECTING, Phase.EXTENDED})


def is_valid_transition(current: Phase, new: Phase) -> bool:
    return (current, new) in TRANSITIONS


class InvalidTransition(errors.FailedPrecondition):
    """A phase change the state machine does not allow."""


class Refusal(enum.StrEnum):
    """Why an update was not taken into a round (counted in status, told to the device)."""

    NOT_SELECTED = "NotSelected"
    DUPLICATE = "Duplicate"
    NOT_OPEN_YET = "NotOpenYet"
    CLOSED = "RoundClosed"
    LATE_KEPT = "LateKept"  # a selected device's update after the round closed, stored under lateUpdates: keep


@dataclasses.dataclass(frozen=True, kw_only=True)
class Round:
    """One round of one task, as stored."""

    task: str
    number: int
    phase: Phase
    deadline: float
    target: int = 0  # updates that close the round early (the participants count)
    quorum: int = 1
    selected: tuple[str, ...] = ()
    received: tuple[str, ...] = ()  # devices whose update was accepted, in arrival order
    extensions: int = 0
    refused: int = 0
    late: int = 0
    reason: str = ""
    refusals: Mapping[str, int] = dataclasses.field(default_factory=dict)  # refused updates per reason
    model: str = ""  # the blob of the global model this round trains from
    version: int = 0  # the release version whose bundle carries that model
    eligible: int = 0  # devices the participants were drawn from (the sampling rate of the privacy accounting)

    @property
    def quorum_met(self) -> bool:
        return len(self.received) >= self.quorum


@dataclasses.dataclass(frozen=True, kw_only=True)
class UpdateRecord:
    """An update as stored with its round: the blob holding it, its weight and the device's metrics."""

    device: str
    digest: str
    samples: int
    encoding: str
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RoundResult:
    """What a published round produced (`RoundBook.publish_round`)."""

    model: str  # the new global model's blob
    samples: int
    metrics: Mapping[str, float]
    state: str = ""  # the server state's blob (FedAvgM / FedOpt), "" when the strategy keeps none
    epsilon: float | None = None  # the privacy spent after this round (central or local DP)
    manifest: str = ""  # the derived bundle manifest serving it ("" until the driver applied it)
    version: int = 0  # the release version of that manifest (0 until then)
    evaluation: Mapping[str, float] | None = None  # server-side metrics on the held-out set (None: not scored)
    evaluation_error: str = ""  # why server-side evaluation failed ("" when it did not)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Verdict:
    """What `admit` decided about one update, and the round after it."""

    round: Round
    accepted: bool
    refusal: Refusal | None = None
    message: str = ""


def transition(r: Round, new: Phase, *, reason: str = "", **changes: object) -> Round:
    """The round in phase `new`, or `InvalidTransition`."""
    if not is_valid_transition(r.phase, new):
        raise InvalidTransition(f"round {r.number} of {r.task} cannot go from {r.phase} to {new}")
    return dataclasses.replace(r, phase=new, reason=reason or r.reason, **changes)  # type: ignore[arg-type]


def check_update(stored: Round, new: Round, *, expected: Phase) -> None:
    """Storage's refusals when a round is written back (`RoundBook.update_round`), for both storages."""
    where = f"round {new.number} of {new.task}"
    if stored.phase is not expected:
        raise errors.FailedPrecondition(f"{where} is {stored.phase}, not {expected}: it moved meanwhile")
    if new.phase is not expected and not is_valid_transition(expected, new.phase):
        raise InvalidTransition(f"{where} cannot go from {expected} to {new.phase}")
    if stored.selected and new.selected != stored.selected:
        raise errors.FailedPrecondition(f"{where} has selected its participants already")


def open_round(*, task: str, number: int, rules: federation.Federation, now: float) -> Round:
    """A new round, waiting for eligible devices until the deadline."""
    if number < 1:
        raise ValueError(f"rounds are numbered from 1, got {number}")
    return Round(task=task, number=number, phase=Phase.OPEN, deadline=now + rules.round_deadline_s)


def select(r: Round, *, eligible: Iterable[str], rules: federation.Federation, now: float) -> Round:
    """Draw the participants among `eligible` and start collecting; the round stays waiting below its quorum."""
    if r.phase not in (Phase.OPEN, Phase.EXTENDED) or r.selected:
        raise InvalidTransition(f"round {r.number} of {r.task} has already selected its participants")
    pool = sorted(set(eligible))
    quorum = rules.quorum_of(len(pool))
    if len(pool) < quorum or not pool:
        return dataclasses.replace(r, reason=f"waiting for devices: {len(pool)} eligible, the quorum needs {quorum}")
    chosen = sampling.sample(
        eligible=pool, k=rules.selected(len(pool)), seed=rules.seed, task=r.task, round_number=r.number
    )
    return transition(
        r,
        Phase.COLLECTING,
        reason=f"{len(chosen)} devices selected",
        selected=chosen,
        target=rules.participants.of(len(pool)),
        quorum=quorum,
        deadline=now + rules.round_deadline_s,
        eligible=len(pool),
    )


def admit(r: Round, *, device: str, rules: federation.Federation, now: float) -> Verdict:
    """Judge one device's update for this round; an accepted one is recorded (and may close the round)."""
    if r.phase is Phase.OPEN or (r.phase is Phase.EXTENDED and not r.selected):
        return _refuse(r, Refusal.NOT_OPEN_YET, f"round {r.number} has not selected its participants yet")
    if device not in r.selected:
        return _refuse(r, Refusal.NOT_SELECTED, f"device {device} was not selected for round {r.number}")
    if device in r.received:
        return _refuse(r, Refusal.DUPLICATE, f"device {device} already sent its update for round {r.number}")
    if r.phase not in ACCEPTING or now >= r.deadline:
        if rules.late_updates is federation.LateUpdates.KEEP:
            kept = dataclasses.replace(r, late=r.late + 1, refusals=_count(r.refusals, Refusal.LATE_KEPT))
            return Verdict(
                round=kept,
                accepted=False,
                refusal=Refusal.LATE_KEPT,
                message=f"round {r.number} closed: kept, not folded",
            )
        return _refuse(r, Refusal.CLOSED, f"round {r.number} is closed ({r.phase})")
    received = (*r.received, device)
    after = dataclasses.replace(r, received=received)
    if len(received) >= r.target:
        after = transition(after, Phase.AGGREGATING, reason=f"{len(received)} of {r.target} updates in")
    return Verdict(round=after, accepted=True)


def _refuse(r: Round, refusal: Refusal, message: str) -> Verdict:
    after = dataclasses.replace(r, refused=r.refused + 1, refusals=_count(r.refusals, refusal))
    return Verdict(round=after, accepted=False, refusal=refusal, message=message)


def _count(counts: Mapping[str, int], reason: str) -> dict[str, int]:
    return {**counts, reason: counts.get(reason, 0) + 1}


def refused_content(r: Round, *, reason: str) -> Round:
    """The round after an update was refused for its content (bad digest, size, shape, values): counted only."""
    return dataclasses.replace(r, refused=r.refused + 1, refusals=_count(r.refusals, reason))


def tick(r: Round, *, rules: federation.Federation, now: float) -> Round:
    """The round after its deadline, if it has passed: aggregate with the quorum, else extend or fail."""
    if r.phase not in (Phase.OPEN, *ACCEPTING) or now < r.deadline:
        return r
    got = f"{len(r.received)} of {r.quorum} updates" if r.selected else "no participants selected"
    if r.selected and r.quorum_met:
        return transition(r, Phase.AGGREGATING, reason=f"deadline: {len(r.received)} updates, quorum {r.quorum} met")
    if rules.on_quorum_missed is federation.QuorumMissed.EXTEND and r.extensions < rules.max_extensions:
        return transition(
            r,
            Phase.EXTENDED,
            reason=f"quorum missed ({got}): deadline extended ({r.extensions + 1} of {rules.max_extensions})",
            extensions=r.extensions + 1,
            deadline=r.deadline + rules.round_deadline_s,
        )
    return transition(r, Phase.FAILED, reason=f"quorum missed by the deadline: {got}")


def published(r: Round) -> Round:
    return transition(r, Phase.PUBLISHED, reason=f"new global model from {len(r.received)} updates")


def aggregation_failed(r: Round, *, reason: str) -> Round:
    return transition(r, Phase.FAILED, reason=f"aggregation failed: {reason}")


def cancel(r: Round, *, reason: str) -> Round:
    """A round that stops for good (the task was deleted or stopped): FAILED from any phase but a terminal one."""
    if r.phase in TERMINAL:
        return r
    return transition(r, Phase.FAILED, reason=reason)


# ------------------------------------------------------------------ when the run stops


class StopReason(enum.StrEnum):
    ROUNDS = "RoundsDone"
    TARGET = "TargetReached"
    PLATEAU = "NoImprovement"


def followed_metric(result: RoundResult | None, *, rules: federation.Federation) -> float | None:
    """The value stopOn and the history follow for a published round: the server-side metric when the cloud
    scores rounds (`evaluation.server`), else the sample-weighted device metric of that name; None if absent."""
    evaluation = rules.evaluation
    if result is None or evaluation is None:
        return None
    source = result.evaluation if evaluation.server_file is not None else result.metrics
    value = None if source is None else source.get(evaluation.metric)
    return None if value is None else float(value)


def should_stop(
    *, rounds_published: int, history: Sequence[float | None], rules: federation.Federation
) -> StopReason | None:
    """After a published round: stop when the rounds are done, the target is reached, or the metric plateaued.

    `history` holds the evaluated metric per published round, None where a round was not evaluated.
    """
    if rounds_published >= rules.rounds:
        return StopReason.ROUNDS
    stop = rules.stop_on
    if stop is None:
        return None
    values = [v for v in history if v is not None and math.isfinite(v)]
    if not values:
        return None
    sign = 1.0 if stop.goal is federation.Goal.MAX else -1.0
    if stop.target is not None and sign * values[-1] >= sign * stop.target:
        return StopReason.TARGET
    if stop.patience is not None and len(values) > stop.patience:
        best_before = max(sign * v for v in values[: -stop.patience])
        recent_best = max(sign * v for v in values[-stop.patience :])
        if recent_best <= best_before + stop.min_delta:  # improving means beating the best by more than minDelta
            return StopReason.PLATEAU
    return None
