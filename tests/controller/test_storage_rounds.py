"""The `RoundBook` contract (federated rounds), against memory and Postgres alike."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from tether.common import errors
from tether.controller.fl import rounds
from tether.controller.storage import contracts
from tether.spec import federation

Phase = rounds.Phase
DEVICES = [f"dev-{i:02d}" for i in range(12)]


def rules(**doc) -> federation.Federation:
    base = {"rounds": 3, "participants": {"count": 4}, "quorum": {"count": 2}, "roundDeadlineSeconds": 60}
    parsed = federation.parse_federation({**base, **doc})
    assert parsed is not None
    return parsed


async def selected_round(storage: contracts.Storage, *, task="ns/fl", number=1, fed=None) -> rounds.Round:
    fed = fed or rules()
    r = rounds.open_round(task=task, number=number, rules=fed, now=0.0)
    await storage.rounds.create_round(r)
    chosen = rounds.select(r, eligible=DEVICES, rules=fed, now=1.0)
    return await storage.rounds.update_round(chosen, expected=Phase.OPEN)


async def test_a_round_is_stored_with_its_participants_in_draw_order(storage) -> None:
    assert await storage.rounds.latest_round(task="ns/fl") is None
    r = await selected_round(storage)
    assert r.phase is Phase.COLLECTING and len(r.selected) == 4 and r.received == ()
    again = await storage.rounds.round(task="ns/fl", number=1)
    assert again == r
    assert await storage.rounds.latest_round(task="ns/fl") == r
    assert await storage.rounds.round(task="ns/fl", number=2) is None


async def test_one_live_round_per_task_and_no_number_twice(storage) -> None:
    r = await selected_round(storage)
    with pytest.raises(errors.FailedPrecondition):
        await storage.rounds.create_round(rounds.open_round(task="ns/fl", number=2, rules=rules(), now=0))
    await storage.rounds.create_round(rounds.open_round(task="ns/other", number=1, rules=rules(), now=0))
    failed = await storage.rounds.update_round(rounds.cancel(r, reason="stop"), expected=Phase.COLLECTING)
    assert failed.phase is Phase.FAILED and failed.reason == "stop"
    with pytest.raises(errors.FailedPrecondition):
        await storage.rounds.create_round(rounds.open_round(task="ns/fl", number=1, rules=rules(), now=0))
    await storage.rounds.create_round(rounds.open_round(task="ns/fl", number=2, rules=rules(), now=0))
    latest = await storage.rounds.latest_round(task="ns/fl")
    assert latest is not None and latest.number == 2 and latest.phase is Phase.OPEN


async def test_update_round_refuses_a_moved_round_a_bad_transition_and_new_participants(storage) -> None:
    r = await selected_round(storage)
    with pytest.raises(errors.FailedPrecondition, match="moved meanwhile"):
        await storage.rounds.update_round(rounds.tick(r, rules=rules(), now=1000), expected=Phase.OPEN)
    with pytest.raises(rounds.InvalidTransition):
        await storage.rounds.update_round(
            rounds.Round(task="ns/fl", number=1, phase=Phase.PUBLISHED, deadline=0, selected=r.selected),
            expected=Phase.COLLECTING,
        )
    with pytest.raises(errors.FailedPrecondition, match="selected its participants"):
        await storage.rounds.update_round(
            dataclasses.replace(r, selected=tuple(reversed(r.selected))), expected=Phase.COLLECTING
        )
    with pytest.raises(errors.NotFound):
        await storage.rounds.update_round(dataclasses.replace(r, number=9), expected=Phase.COLLECTING)
    assert await storage.rounds.round(task="ns/fl", number=1) == r  # nothing changed


async def test_updates_are_judged_and_recorded_once_in_arrival_order(storage) -> None:
    fed = rules()
    r = await selected_round(storage, fed=fed)
    outsider = next(d for d in DEVICES if d not in r.selected)
    v = await storage.rounds.admit_update(task="ns/fl", number=1, device=outsider, rules=fed, now=2)
    assert v.refusal is rounds.Refusal.NOT_SELECTED
    second, first = r.selected[1], r.selected[0]
    assert (await storage.rounds.admit_update(task="ns/fl", number=1, device=second, rules=fed, now=3)).accepted
    dup = await storage.rounds.admit_update(task="ns/fl", number=1, device=second, rules=fed, now=4)
    assert dup.refusal is rounds.Refusal.DUPLICATE
    assert (await storage.rounds.admit_update(task="ns/fl", number=1, device=first, rules=fed, now=5)).accepted
    stored = await storage.rounds.round(task="ns/fl", number=1)
    assert stored is not None
    assert stored.received == (second, first) and stored.refused == 2 and stored.phase is Phase.COLLECTING
    # a copy read before another refusal, written back, does not undo that count (nor the updates)
    await storage.rounds.admit_update(task="ns/fl", number=1, device=outsider, rules=fed, now=6)
    ticked = await storage.rounds.update_round(rounds.tick(stored, rules=fed, now=1000), expected=Phase.COLLECTING)
    assert ticked.phase is Phase.AGGREGATING and ticked.received == (second, first) and ticked.refused == 3
    with pytest.raises(errors.NotFound):
        await storage.rounds.admit_update(task="ns/fl", number=7, device=first, rules=fed, now=5)


async def test_the_target_closes_the_round_and_late_updates_are_kept_or_refused(storage) -> None:
    fed = rules(lateUpdates="keep")
    r = await selected_round(storage, fed=fed)
    for d in r.selected:
        v = await storage.rounds.admit_update(task="ns/fl", number=1, device=d, rules=fed, now=2)
        assert v.accepted
    stored = await storage.rounds.round(task="ns/fl", number=1)
    assert stored is not None and stored.phase is Phase.AGGREGATING and stored.received == r.selected
    published = await storage.rounds.update_round(rounds.published(stored), expected=Phase.AGGREGATING)
    assert published.phase is Phase.PUBLISHED
    r2 = await selected_round(storage, number=2, fed=rules(participants={"count": 4}, overSelection=0.5))
    for d in r2.selected[:4]:
        await storage.rounds.admit_update(task="ns/fl", number=2, device=d, rules=fed, now=3)
    late = await storage.rounds.admit_update(task="ns/fl", number=2, device=r2.selected[5], rules=fed, now=4)
    assert late.refusal is rounds.Refusal.LATE_KEPT
    after = await storage.rounds.round(task="ns/fl", number=2)
    assert after is not None and after.late == 1 and len(after.received) == 4


async def test_concurrent_updates_of_one_device_are_taken_once(storage) -> None:
    fed = rules(participants={"count": 10}, quorum={"count": 2})
    r = await selected_round(storage, fed=fed)
    device = r.selected[0]
    verdicts = await asyncio.gather(
        *(storage.rounds.admit_update(task="ns/fl", number=1, device=device, rules=fed, now=2) for _ in range(8)),
        *(storage.rounds.admit_update(task="ns/fl", number=1, device=d, rules=fed, now=2) for d in r.selected[1:6]),
    )
    assert sum(v.accepted for v in verdicts[:8]) == 1
    assert all(v.accepted for v in verdicts[8:])
    stored = await storage.rounds.round(task="ns/fl", number=1)
    assert stored is not None
    assert sorted(stored.received) == sorted(r.selected[:6]) and stored.refused == 7


def record(device: str, *, samples: int = 5) -> rounds.UpdateRecord:
    return rounds.UpdateRecord(
        device=device,
        digest="sha256:" + device.encode().hex().ljust(64, "0")[:64],
        samples=samples,
        encoding="float32",
        metrics={"loss": 0.5},
    )


async def test_accepted_updates_are_kept_with_their_blob_in_device_order_and_refusals_counted_by_reason(
    storage,
) -> None:
    fed = rules(lateUpdates="keep")
    r = await selected_round(storage, fed=fed)
    first, second = sorted(r.selected)[1], sorted(r.selected)[0]
    for d in (first, second):
        v = await storage.rounds.admit_update(task="ns/fl", number=1, device=d, rules=fed, now=2, update=record(d))
        assert v.accepted
    dup = await storage.rounds.admit_update(
        task="ns/fl", number=1, device=first, rules=fed, now=2, update=record(first)
    )
    assert dup.refusal is rounds.Refusal.DUPLICATE
    await storage.rounds.count_refusal(task="ns/fl", number=1, reason="BadDigest")
    after = await storage.rounds.count_refusal(task="ns/fl", number=1, reason="BadDigest")
    assert after.refusals == {"Duplicate": 1, "BadDigest": 2} and after.refused == 3
    got = await storage.rounds.accepted_updates(task="ns/fl", number=1)
    assert got == [record(second), record(first)]  # device-id order, whatever the arrival
    again = await storage.rounds.round(task="ns/fl", number=1)
    assert again is not None and again.refusals == after.refusals and again.received == (first, second)
    with pytest.raises(errors.NotFound):
        await storage.rounds.count_refusal(task="ns/fl", number=7, reason="BadDigest")


async def test_publish_round_records_the_result_once(storage) -> None:
    fed = rules()
    r = await selected_round(storage, fed=fed)
    result = rounds.RoundResult(
        model="sha256:" + "1" * 64,
        manifest="sha256:" + "2" * 64,
        version=3,
        samples=10,
        metrics={"loss": 0.1},
        epsilon=1.5,
    )
    with pytest.raises(errors.FailedPrecondition):
        await storage.rounds.publish_round(task="ns/fl", number=1, result=result)  # still collecting
    assert await storage.rounds.round_result(task="ns/fl", number=1) is None
    for d in r.selected[:4]:
        await storage.rounds.admit_update(task="ns/fl", number=1, device=d, rules=fed, now=2, update=record(d))
    assert (await storage.rounds.round(task="ns/fl", number=1)).phase is Phase.AGGREGATING
    assert await storage.rounds.publish_round(task="ns/fl", number=1, result=result) is True
    assert await storage.rounds.publish_round(task="ns/fl", number=1, result=result) is False
    assert await storage.rounds.round_result(task="ns/fl", number=1) == result
    history = await storage.rounds.rounds_of(task="ns/fl")
    assert [(x.number, x.phase) for x in history] == [(1, Phase.PUBLISHED)]
    with pytest.raises(errors.NotFound):
        await storage.rounds.publish_round(task="ns/fl", number=5, result=result)
