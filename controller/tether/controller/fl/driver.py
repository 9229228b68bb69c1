"""The round driver's decision: given a federated release and its latest round, what to do next.

One step at a time, each the caller's to perform and then ask again
(decide-then-act; the controller's `round_driver` runs it per task):

- no round yet, or the latest ended and the run goes on: `OpenRound` n + 1,
  training from the global model the release serves now (the base bundle's
  model file, the latest round's, or a round rolled back to);
- a round waiting for devices: `Select` among the eligible ones (`rounds.select`;
  it stays waiting below its quorum);
- a collecting round: `Move` it when its deadline passed (`rounds.tick`);
- an aggregating round: `Aggregate` (the worker's task; idempotent, so sending
  it again after `resend_s` heals a lost message);
- a published round whose model the release does not serve yet: `Advance` the
  release to a bundle version carrying it;
- otherwise `Wait`, or `Done` when the run stops (`rounds.should_stop`, or
  the round numbers are used up).
Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tether.controller.fl import rounds
from tether.spec import federation


@dataclasses.dataclass(frozen=True, kw_only=True)
class OpenRound:
    round: rounds.Round


@dataclasses.dataclass(frozen=True, kw_only=True)
class Move:
    """Store the round in its new phase (`expected`: the phase it was read in)."""

    round: rounds.Round
    expected: rounds.Phase


@dataclasses.dataclass(frozen=True, kw_only=True)
class Aggregate:
    task: str
    number: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Advance:
    """Serve round `number`'s model: derive the bundle version carrying `model` and apply it."""

    task: str
    number: int
    model: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Wait:
    reason: str = ""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Done:
    reason: str


Step = OpenRound | Move | Aggregate | Advance | Wait | Done


@dataclasses.dataclass(frozen=True, kw_only=True)
class Situation:
    """What the driver read for one task."""

    task: str
    rules: federation.Federation
    serving_model: str  # the model file's blob in the manifest the release serves now
    serving_version: int
    latest: rounds.Round | None
    latest_result: rounds.RoundResult | None = None  # of `latest`, when published
    history: Sequence[float | None] = ()  # the stop metric per published round
    published: int = 0  # rounds published so far
    eligible: Sequence[str] = ()
    now: float = 0.0
    aggregate_sent_at: float | None = None  # when Aggregate was last sent for `latest`
    resend_s: float = 60.0


def decide(s: Situation) -> Step:
    r = s.latest
    if r is None:
        return OpenRound(round=_open(s, 1))
    if r.phase in (rounds.Phase.OPEN, rounds.Phase.EXTENDED) and not r.selected:
        chosen = rounds.select(r, eligible=s.eligible, rules=s.rules, now=s.now)
        if chosen.phase is not r.phase:
            return Move(round=chosen, expected=r.phase)
        moved = rounds.tick(r, rules=s.rules, now=s.now)
        if moved != r:
            return Move(round=moved, expected=r.phase)
        return Wait(reason=chosen.reason)
    if r.phase in rounds.ACCEPTING:
        moved = rounds.tick(r, rules=s.rules, now=s.now)
        if moved != r:
            return Move(round=moved, expected=r.phase)
        return Wait(reason=f"collecting: {len(r.received)} of {r.target} updates")
    if r.phase is rounds.Phase.AGGREGATING:
        if s.aggregate_sent_at is None or s.now - s.aggregate_sent_at >= s.resend_s:
            return Aggregate(task=s.task, number=r.number)
        return Wait(reason="aggregating")
    if r.phase is rounds.Phase.PUBLISHED and s.latest_result is not None and not s.latest_result.version:
        return Advance(task=s.task, number=r.number, model=s.latest_result.model)
    # published and served, or failed: the run goes on or stops
    stop = rounds.should_stop(rounds_published=s.published, history=s.history, rules=s.rules)
    if stop is not None:
        return Done(reason=stop.value)
    if r.number >= s.rules.rounds:
        return Done(reason=f"{r.number} rounds run, {s.published} published")
    return OpenRound(round=_open(s, r.number + 1))


def _open(s: Situation, number: int) -> rounds.Round:
    r = rounds.open_round(task=s.task, number=number, rules=s.rules, now=s.now)
    return dataclasses.replace(r, model=s.serving_model, version=s.serving_version)
