"""Federated rounds on Postgres (`contracts.RoundBook`), migration `20261201_0010_fl_rounds`.

Every change locks the round's row (`FOR UPDATE`) and runs the pure rules of
`tether.controller.fl.rounds` on what it read, then writes in the same
transaction: two replicas judging updates of one round see each other's, so
a device's update is taken once and an accepted update is committed before
the device hears so (a controller killed afterwards loses nothing). At most
one live round per task is the partial unique index's job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import errors as pg_errors

from tether.common import errors
from tether.controller.fl import rounds
from tether.spec import federation

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

_COLUMNS = "task, number, phase, deadline, target, quorum, extensions, refused, late, reason"


class PostgresRounds:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def create_round(self, r: rounds.Round) -> None:
        try:
            async with self._pool.connection() as conn, conn.transaction():
                live = await (
                    await conn.execute(
                        "SELECT number, phase FROM fl_rounds WHERE task = %s AND phase NOT IN ('Published', 'Failed')",
                        (r.task,),
                    )
                ).fetchone()
                if live is not None:
                    raise errors.FailedPrecondition(f"round {live[0]} of {r.task} is still {live[1]}")
                await conn.execute(
                    f"INSERT INTO fl_rounds ({_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        r.task,
                        r.number,
                        r.phase.value,
                        r.deadline,
                        r.target,
                        r.quorum,
                        r.extensions,
                        r.refused,
                        r.late,
                        r.reason,
                    ),
                )
                await _insert_participants(conn, r)
        except pg_errors.UniqueViolation:
            raise errors.FailedPrecondition(f"round {r.number} of {r.task} exists, or another round is live") from None

    async def round(self, *, task: str, number: int) -> rounds.Round | None:
        async with self._pool.connection() as conn:
            return await _load(conn, task=task, number=number, lock=False)

    async def latest_round(self, *, task: str) -> rounds.Round | None:
        async with self._pool.connection() as conn:
            row = await (await conn.execute("SELECT max(number) FROM fl_rounds WHERE task = %s", (task,))).fetchone()
            if row is None or row[0] is None:
                return None
            return await _load(conn, task=task, number=int(row[0]), lock=False)

    async def update_round(self, r: rounds.Round, *, expected: rounds.Phase) -> rounds.Round:
        async with self._pool.connection() as conn, conn.transaction():
            stored = await _load(conn, task=r.task, number=r.number, lock=True)
            if stored is None:
                raise errors.NotFound(f"round {r.number} of {r.task} does not exist")
            rounds.check_update(stored, r, expected=expected)
            await conn.execute(
                "UPDATE fl_rounds SET phase = %s, deadline = %s, target = %s, quorum = %s, extensions = %s,"
                " reason = %s, updated_at = now() WHERE task = %s AND number = %s",
                (r.phase.value, r.deadline, r.target, r.quorum, r.extensions, r.reason, r.task, r.number),
            )
            if not stored.selected and r.selected:
                await _insert_participants(conn, r)
            new = await _load(conn, task=r.task, number=r.number, lock=False)
            assert new is not None
            return new

    async def admit_update(
        self, *, task: str, number: int, device: str, rules: federation.Federation, now: float
    ) -> rounds.Verdict:
        async with self._pool.connection() as conn, conn.transaction():
            stored = await _load(conn, task=task, number=number, lock=True)
            if stored is None:
                raise errors.NotFound(f"round {number} of {task} does not exist")
            verdict = rounds.admit(stored, device=device, rules=rules, now=now)
            after = verdict.round
            if verdict.accepted:
                await conn.execute(
                    "UPDATE fl_participants SET received_position = %s, received_at = now()"
                    " WHERE task = %s AND number = %s AND device_id = %s AND received_position IS NULL",
                    (len(after.received), task, number, device),
                )
            await conn.execute(
                "UPDATE fl_rounds SET phase = %s, reason = %s, refused = %s, late = %s, updated_at = now()"
                " WHERE task = %s AND number = %s",
                (after.phase.value, after.reason, after.refused, after.late, task, number),
            )
            return verdict


async def _insert_participants(conn: psycopg.AsyncConnection[Any], r: rounds.Round) -> None:
    if not r.selected:
        return
    async with conn.cursor() as cur:
        await cur.executemany(
            "INSERT INTO fl_participants (task, number, device_id, position) VALUES (%s, %s, %s, %s)",
            [(r.task, r.number, d, i) for i, d in enumerate(r.selected)],
        )


async def _load(conn: psycopg.AsyncConnection[Any], *, task: str, number: int, lock: bool) -> rounds.Round | None:
    row = await (
        await conn.execute(
            f"SELECT {_COLUMNS} FROM fl_rounds WHERE task = %s AND number = %s" + (" FOR UPDATE" if lock else ""),
            (task, number),
        )
    ).fetchone()
    if row is None:
        return None
    people = await (
        await conn.execute(
            "SELECT device_id, received_position FROM fl_participants WHERE task = %s AND number = %s"
            " ORDER BY position",
            (task, number),
        )
    ).fetchall()
    received = sorted((p for p in people if p[1] is not None), key=lambda p: int(p[1]))
    return rounds.Round(
        task=row[0],
        number=int(row[1]),
        phase=rounds.Phase(row[2]),
        deadline=float(row[3]),
        target=int(row[4]),
        quorum=int(row[5]),
        extensions=int(row[6]),
        refused=int(row[7]),
        late=int(row[8]),
        reason=row[9],
        selected=tuple(p[0] for p in people),
        received=tuple(p[0] for p in received),
    )
