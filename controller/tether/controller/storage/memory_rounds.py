"""Federated rounds in memory (`contracts.RoundBook`): the rules of `fl.rounds`, rows in `Tables.rounds`.

Each method checks and writes without awaiting in between, so on one event
loop it is as atomic as the Postgres transaction of `pg_rounds`.
"""

from __future__ import annotations

import dataclasses

from tether.common import errors
from tether.controller.fl import rounds
from tether.controller.storage.memory_tables import Tables
from tether.spec import federation


class MemoryRounds:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    async def create_round(self, r: rounds.Round) -> None:
        if (r.task, r.number) in self._t.rounds:
            raise errors.FailedPrecondition(f"round {r.number} of {r.task} exists")
        live = [x for (task, _), x in self._t.rounds.items() if task == r.task and x.phase not in rounds.TERMINAL]
        if live:
            raise errors.FailedPrecondition(f"round {live[0].number} of {r.task} is still {live[0].phase}")
        self._t.rounds[(r.task, r.number)] = dataclasses.replace(r, received=())

    async def round(self, *, task: str, number: int) -> rounds.Round | None:
        return self._t.rounds.get((task, number))

    async def latest_round(self, *, task: str) -> rounds.Round | None:
        numbers = [n for (t, n) in self._t.rounds if t == task]
        return self._t.rounds[(task, max(numbers))] if numbers else None

    async def update_round(self, r: rounds.Round, *, expected: rounds.Phase) -> rounds.Round:
        stored = self._t.rounds.get((r.task, r.number))
        if stored is None:
            raise errors.NotFound(f"round {r.number} of {r.task} does not exist")
        rounds.check_update(stored, r, expected=expected)
        new = dataclasses.replace(
            stored,
            phase=r.phase,
            deadline=r.deadline,
            target=r.target,
            quorum=r.quorum,
            extensions=r.extensions,
            reason=r.reason,
            eligible=r.eligible,
            selected=stored.selected or r.selected,
        )
        self._t.rounds[(r.task, r.number)] = new
        return new

    async def admit_update(
        self,
        *,
        task: str,
        number: int,
        device: str,
        rules: federation.Federation,
        now: float,
        update: rounds.UpdateRecord | None = None,
    ) -> rounds.Verdict:
        stored = self._t.rounds.get((task, number))
        if stored is None:
            raise errors.NotFound(f"round {number} of {task} does not exist")
        verdict = rounds.admit(stored, device=device, rules=rules, now=now)
        self._t.rounds[(task, number)] = verdict.round
        kept = verdict.accepted or verdict.refusal is rounds.Refusal.LATE_KEPT
        if update is not None and kept and (task, number, device) not in self._t.round_updates:
            self._t.round_updates[(task, number, device)] = (update, verdict.accepted)
        return verdict

    async def count_refusal(self, *, task: str, number: int, reason: str) -> rounds.Round:
        stored = self._t.rounds.get((task, number))
        if stored is None:
            raise errors.NotFound(f"round {number} of {task} does not exist")
        after = rounds.refused_content(stored, reason=reason)
        self._t.rounds[(task, number)] = after
        return after

    async def accepted_updates(self, *, task: str, number: int) -> list[rounds.UpdateRecord]:
        found = [u for (t, n, _), (u, ok) in self._t.round_updates.items() if t == task and n == number and ok]
        return sorted(found, key=lambda u: u.device)

    async def publish_round(self, *, task: str, number: int, result: rounds.RoundResult) -> bool:
        stored = self._t.rounds.get((task, number))
        if stored is None:
            raise errors.NotFound(f"round {number} of {task} does not exist")
        if stored.phase is rounds.Phase.PUBLISHED:
            return False
        self._t.rounds[(task, number)] = rounds.published(stored)
        self._t.round_results[(task, number)] = result
        return True

    async def mark_served(self, *, task: str, number: int, manifest: str, version: int) -> None:
        result = self._t.round_results.get((task, number))
        if result is None:
            raise errors.FailedPrecondition(f"round {number} of {task} has published no model")
        self._t.round_results[(task, number)] = dataclasses.replace(result, manifest=manifest, version=version)

    async def round_result(self, *, task: str, number: int) -> rounds.RoundResult | None:
        return self._t.round_results.get((task, number))

    async def rounds_of(self, *, task: str) -> list[rounds.Round]:
        return [r for (t, _), r in sorted(self._t.rounds.items()) if t == task]
