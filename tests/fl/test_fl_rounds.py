"""The round state machine (every pair of phases), the events that move a round, and when a run stops."""

from __future__ import annotations

import itertools

import pytest

from tether.controller.fl import rounds
from tether.spec import federation

Phase = rounds.Phase
DEVICES = [f"dev-{i:02d}" for i in range(20)]


def rules(**doc) -> federation.Federation:
    base = {"rounds": 5, "participants": {"count": 4}, "quorum": {"count": 3}, "roundDeadlineSeconds": 100}
    parsed = federation.parse_federation({**base, **doc})
    assert parsed is not None
    return parsed


def collecting(r=None, **doc) -> tuple[rounds.Round, federation.Federation]:
    fed = rules(**doc)
    r = rounds.open_round(task="ml/digits", number=1, rules=fed, now=0.0)
    return rounds.select(r, eligible=DEVICES, rules=fed, now=10.0), fed


EXPECTED = {
    (Phase.OPEN, Phase.COLLECTING),
    (Phase.OPEN, Phase.EXTENDED),
    (Phase.OPEN, Phase.FAILED),
    (Phase.COLLECTING, Phase.AGGREGATING),
    (Phase.COLLECTING, Phase.EXTENDED),
    (Phase.COLLECTING, Phase.FAILED),
    (Phase.EXTENDED, Phase.COLLECTING),
    (Phase.EXTENDED, Phase.EXTENDED),
    (Phase.EXTENDED, Phase.AGGREGATING),
    (Phase.EXTENDED, Phase.FAILED),
    (Phase.AGGREGATING, Phase.PUBLISHED),
    (Phase.AGGREGATING, Phase.FAILED),
}


@pytest.mark.parametrize(("current", "new"), list(itertools.product(Phase, Phase)))
def test_every_pair_of_phases(current, new) -> None:
    r = rounds.Round(task="t", number=1, phase=current, deadline=0.0)
    assert rounds.is_valid_transition(current, new) == ((current, new) in EXPECTED)
    if (current, new) in EXPECTED:
        assert rounds.transition(r, new, reason="x").phase is new
    else:
        with pytest.raises(rounds.InvalidTransition, match=f"from {current} to {new}"):
            rounds.transition(r, new)


def _walk() -> set[tuple[Phase, Phase]]:
    """Drive rounds through every event and record the phase changes they make."""
    seen: set[tuple[Phase, Phase]] = set()

    def step(before: rounds.Round, after: rounds.Round) -> rounds.Round:
        if before.phase is not after.phase or after.extensions > before.extensions:
            seen.add((before.phase, after.phase))
        return after

    fed = rules(maxExtensions=2)
    # OPEN -> COLLECTING -> AGGREGATING (target reached) -> PUBLISHED
    r = rounds.open_round(task="t", number=1, rules=fed, now=0)
    r = step(r, rounds.select(r, eligible=DEVICES, rules=fed, now=1))
    for d in r.selected:
        r = step(r, rounds.admit(r, device=d, rules=fed, now=2).round)
    r = step(r, rounds.published(r))
    # OPEN -> EXTENDED (nobody eligible) -> EXTENDED -> COLLECTING -> EXTENDED -> ... -> AGGREGATING -> FAILED
    r = rounds.open_round(task="t", number=2, rules=fed, now=0)
    r = step(r, rounds.tick(r, rules=fed, now=100))
    r = step(r, rounds.tick(r, rules=fed, now=200))
    r = step(r, rounds.select(r, eligible=DEVICES, rules=fed, now=201))
    r = step(r, rounds.admit(r, device=r.selected[0], rules=fed, now=202).round)
    r2 = rounds.transition(r, Phase.EXTENDED, extensions=0)  # an extension that was reached by a select earlier
    for d in r2.selected[1:3]:
        r2 = step(r2, rounds.admit(r2, device=d, rules=fed, now=203).round)
    r2 = step(r2, rounds.tick(r2, rules=fed, now=10_000))  # EXTENDED -> AGGREGATING with the quorum
    step(r2, rounds.aggregation_failed(r2, reason="no model"))
    # COLLECTING -> EXTENDED; EXTENDED -> FAILED; COLLECTING -> FAILED; OPEN -> FAILED
    r = rounds.select(rounds.open_round(task="t", number=3, rules=fed, now=0), eligible=DEVICES, rules=fed, now=0)
    r = step(r, rounds.tick(r, rules=fed, now=100))
    r = step(r, rounds.tick(r, rules=fed, now=200))
    step(r, rounds.tick(r, rules=fed, now=300))
    strict = rules(onQuorumMissed="fail")
    r = rounds.select(rounds.open_round(task="t", number=4, rules=strict, now=0), eligible=DEVICES, rules=strict, now=0)
    step(r, rounds.tick(r, rules=strict, now=100))
    r = rounds.open_round(task="t", number=5, rules=strict, now=0)
    step(r, rounds.cancel(r, reason="task deleted"))
    return seen


def test_every_allowed_transition_is_made_by_some_event() -> None:
    assert _walk() == EXPECTED


def test_selection_draws_the_participants_with_over_selection_and_starts_the_deadline() -> None:
    r, _ = collecting(overSelection=0.5)
    assert r.phase is Phase.COLLECTING
    assert len(r.selected) == 6 and r.target == 4 and r.quorum == 3
    assert set(r.selected) <= set(DEVICES)
    assert r.deadline == 110.0
    again, _ = collecting(overSelection=0.5)
    assert again.selected == r.selected  # seeded: the same draw


def test_a_round_waits_below_its_quorum_and_then_selects() -> None:
    fed = rules()
    r = rounds.open_round(task="t", number=1, rules=fed, now=0.0)
    waiting = rounds.select(r, eligible=DEVICES[:2], rules=fed, now=1.0)
    assert waiting.phase is Phase.OPEN and "2 eligible, the quorum needs 3" in waiting.reason
    assert rounds.select(waiting, eligible=DEVICES[:3], rules=fed, now=2.0).phase is Phase.COLLECTING


def test_updates_are_taken_once_from_selected_devices_and_the_target_closes_the_round() -> None:
    r, fed = collecting(overSelection=0.5)
    outsider = next(d for d in DEVICES if d not in r.selected)
    v = rounds.admit(r, device=outsider, rules=fed, now=20)
    assert not v.accepted and v.refusal is rounds.Refusal.NOT_SELECTED and outsider in v.message
    assert v.round.refused == 1 and v.round.received == ()
    r = v.round
    first = r.selected[0]
    r = rounds.admit(r, device=first, rules=fed, now=20).round
    dup = rounds.admit(r, device=first, rules=fed, now=21)
    assert dup.refusal is rounds.Refusal.DUPLICATE and dup.round.received == (first,) and dup.round.refused == 2
    r = dup.round
    for d in r.selected[1:4]:
        v = rounds.admit(r, device=d, rules=fed, now=22)
        assert v.accepted
        r = v.round
    assert r.phase is Phase.AGGREGATING and len(r.received) == 4  # two over-selected stragglers not waited for
    straggler = r.selected[5]
    late = rounds.admit(r, device=straggler, rules=fed, now=23)
    assert late.refusal is rounds.Refusal.CLOSED and late.round.received == r.received


def test_late_updates_are_kept_not_folded_when_the_task_says_so() -> None:
    r, fed = collecting(lateUpdates="keep")
    r = rounds.tick(r, rules=fed, now=1000)  # nobody sent anything: extended
    r = rounds.tick(r, rules=fed, now=1000)  # and failed
    assert r.phase is Phase.FAILED
    v = rounds.admit(r, device=r.selected[0], rules=fed, now=1001)
    assert v.refusal is rounds.Refusal.LATE_KEPT and not v.accepted
    assert v.round.late == 1 and v.round.received == ()


def test_an_update_after_the_deadline_is_refused_even_before_the_tick() -> None:
    r, fed = collecting()
    v = rounds.admit(r, device=r.selected[0], rules=fed, now=r.deadline)
    assert v.refusal is rounds.Refusal.CLOSED


def test_before_selection_no_update_is_taken() -> None:
    fed = rules()
    r = rounds.open_round(task="t", number=1, rules=fed, now=0)
    assert rounds.admit(r, device="dev-00", rules=fed, now=1).refusal is rounds.Refusal.NOT_OPEN_YET


def test_the_deadline_aggregates_with_the_quorum_extends_without_it_then_fails() -> None:
    r, fed = collecting(maxExtensions=1)
    for d in r.selected[:2]:
        r = rounds.admit(r, device=d, rules=fed, now=20).round
    assert rounds.tick(r, rules=fed, now=109.9) is r  # not yet
    r = rounds.tick(r, rules=fed, now=110)
    assert r.phase is Phase.EXTENDED and r.extensions == 1 and r.deadline == 210
    assert "2 of 3 updates" in r.reason
    r = rounds.admit(r, device=r.selected[2], rules=fed, now=150).round
    assert r.phase is Phase.EXTENDED  # quorum met, target not: wait for the deadline
    r = rounds.tick(r, rules=fed, now=210)
    assert r.phase is Phase.AGGREGATING and "quorum 3 met" in r.reason
    assert rounds.published(r).phase is Phase.PUBLISHED

    r, fed = collecting(maxExtensions=1)
    r = rounds.tick(rounds.tick(r, rules=fed, now=110), rules=fed, now=210)
    assert r.phase is Phase.FAILED and "quorum missed by the deadline: 0 of 3" in r.reason


def test_terminal_rounds_stay_put() -> None:
    r, fed = collecting(onQuorumMissed="fail")
    r = rounds.tick(r, rules=fed, now=110)
    assert r.phase is Phase.FAILED
    assert rounds.tick(r, rules=fed, now=10_000) is r
    assert rounds.cancel(r, reason="again") is r
    with pytest.raises(rounds.InvalidTransition):
        rounds.published(r)


@pytest.mark.parametrize(
    ("stop_on", "history", "published", "expected"),
    [
        (None, [0.1, 0.2], 2, None),
        (None, [0.1] * 5, 5, rounds.StopReason.ROUNDS),
        ({"metric": "accuracy", "target": 0.9}, [0.5, 0.89], 2, None),
        ({"metric": "accuracy", "target": 0.9}, [0.5, 0.9], 2, rounds.StopReason.TARGET),
        ({"metric": "accuracy", "target": 0.9}, [0.95, None], 2, rounds.StopReason.TARGET),
        ({"metric": "accuracy", "patience": 2}, [0.5, 0.6, 0.6, 0.59], 4, rounds.StopReason.PLATEAU),
        ({"metric": "accuracy", "patience": 2}, [0.5, 0.6, 0.6, 0.61], 4, None),
        ({"metric": "accuracy", "patience": 2, "minDelta": 0.05}, [0.5, 0.6, 0.6, 0.61], 4, rounds.StopReason.PLATEAU),
        ({"metric": "accuracy", "mode": "min", "target": 0.2}, [0.5, 0.19], 2, rounds.StopReason.TARGET),
        ({"metric": "accuracy", "mode": "min", "patience": 1}, [0.5, 0.4, 0.45], 3, rounds.StopReason.PLATEAU),
        ({"metric": "accuracy", "target": 0.9}, [None, float("nan")], 2, None),
    ],
)
def test_when_a_run_stops(stop_on, history, published, expected) -> None:
    doc = {"rounds": 5, "participants": {"count": 2}}
    if stop_on is not None:
        doc |= {"stopOn": stop_on, "evaluation": {"metric": "accuracy", "devices": {"count": 2}}}
    fed = federation.parse_federation(doc)
    assert fed is not None
    assert rounds.should_stop(rounds_published=published, history=history, rules=fed) == expected


def test_stop_on_follows_the_server_score_when_the_cloud_scores_rounds_else_the_device_metric() -> None:
    base = {"rounds": 10, "participants": {"count": 2}, "stopOn": {"metric": "accuracy", "target": 0.9}}
    scored = federation.parse_federation(
        base | {"evaluation": {"server": {"file": "cloud/h.npz", "model": "cloud/m.onnx"}}}
    )
    on_devices = federation.parse_federation(base | {"evaluation": {"devices": {"count": 2}}})
    assert scored is not None and on_devices is not None
    result = rounds.RoundResult(model="sha256:m", samples=3, metrics={"accuracy": 0.95}, evaluation={"accuracy": 0.5})
    assert rounds.followed_metric(result, rules=scored) == 0.5
    assert rounds.followed_metric(result, rules=on_devices) == 0.95
    failed = rounds.RoundResult(model="sha256:m", samples=3, metrics={"accuracy": 0.95}, evaluation_error="no file")
    assert rounds.followed_metric(failed, rules=scored) is None  # no score: the device metric does not stand in
    assert rounds.followed_metric(None, rules=scored) is None
    history = [rounds.followed_metric(r, rules=scored) for r in (result, failed)]
    assert rounds.should_stop(rounds_published=2, history=history, rules=scored) is None
