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
from psycopg.types.json import Jsonb

from tether.common import errors
from tether.controller.fl import rounds
from tether.spec import federation

if TYPE_CHECKING:
    from psycopg_pool import AsyncConnectionPool

_COLUMNS = (
    "task, number, phase, deadline, target, quorum, extensions, refused, late, reason,"
    " refusals, model, version, eligible"
)
_PLACEHOLDERS = ", ".join(["%s"] * len(_COLUMNS.split(",")))


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
                    f"INSERT INTO fl_rounds ({_COLUMNS}) VALUES ({_PLACEHOLDERS})",
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
                        Jsonb(dict(r.refusals)),
                        r.model,
                        r.version,
                        r.eligible,
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
                " reason = %s, eligible = %s, updated_at = now() WHERE task = %s AND number = %s",
                (r.phase.value, r.deadline, r.target, r.quorum, r.extensions, r.reason, r.eligible, r.task, r.number),
            )
            if not stored.selected and r.selected:
                await _insert_participants(conn, r)
            new = await _load(conn, task=r.task, number=r.number, lock=False)
            assert new is not None
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
        async with self._pool.connection() as conn, conn.transaction():
            stored = await _load(conn, task=task, number=number, lock=True)
            if stored is None:
                raise errors.NotFound(f"round {number} of {task} does not exist")
            verdict = rounds.admit(stored, device=device, rules=rules, now=now)
            after = verdict.round
            kept = verdict.accepted or verdict.refusal is rounds.Refusal.LATE_KEPT
            if kept:
                await conn.execute(
                    "UPDATE fl_participants SET received_position = %s, received_at = now(),"
                    " update_digest = %s, update_samples = %s, update_metrics = %s, update_encoding = %s"
                    " WHERE task = %s AND number = %s AND device_id = %s AND received_position IS NULL"
                    " AND update_digest IS NULL",
                    (
                        len(after.received) if verdict.accepted else None,
                        None if update is None else update.digest,
                        None if update is None else update.samples,
                        None if update is None else Jsonb(dict(update.metrics)),
                        None if update is None else update.encoding,
                        task,
                        number,
                        device,
                    ),
                )
            await _write_counts(conn, after)
            return verdict

    async def count_refusal(self, *, task: str, number: int, reason: str) -> rounds.Round:
        async with self._pool.connection() as conn, conn.transaction():
            stored = await _load(conn, task=task, number=number, lock=True)
            if stored is None:
                raise errors.NotFound(f"round {number} of {task} does not exist")
            after = rounds.refused_content(stored, reason=reason)
            await _write_counts(conn, after)
            return after

    async def accepted_updates(self, *, task: str, number: int) -> list[rounds.UpdateRecord]:
        async with self._pool.connection() as conn:
            rows = await (
                await conn.execute(
                    "SELECT device_id, update_digest, update_samples, update_encoding, update_metrics"
                    " FROM fl_participants WHERE task = %s AND number = %s AND received_position IS NOT NULL"
                    ' AND update_digest IS NOT NULL ORDER BY device_id COLLATE "C"',
                    (task, number),
                )
            ).fetchall()
        return [
            rounds.UpdateRecord(device=r[0], digest=r[1], samples=int(r[2]), encoding=r[3], metrics=dict(r[4] or {}))
            for r in rows
        ]

    async def publish_round(self, *, task: str, number: int, result: rounds.RoundResult) -> bool:
        async with self._pool.connection() as conn, conn.transaction():
            stored = await _load(conn, task=task, number=number, lock=True)
            if stored is None:
                raise errors.NotFound(f"round {number} of {task} does not exist")
            if stored.phase is rounds.Phase.PUBLISHED:
                return False
            after = rounds.published(stored)
            await conn.execute(
                "UPDATE fl_rounds SET phase = %s, reason = %s, result_model = %s, result_manifest = %s,"
                " result_version = %s, state_digest = %s, samples = %s, metrics = %s, epsilon = %s,"
                " server_metrics = %s, evaluation_error = %s, updated_at = now() WHERE task = %s AND number = %s",
                (
                    after.phase.value,
                    after.reason,
                    result.model,
                    result.manifest,
                    result.version,
                    result.state or None,
                    result.samples,
                    Jsonb(dict(result.metrics)),
                    result.epsilon,
                    None if result.evaluation is None else Jsonb(dict(result.evaluation)),
                    result.evaluation_error or None,
                    task,
                    number,
                ),
            )
            return True

    async def mark_served(self, *, task: str, number: int, manifest: str, version: int) -> None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE fl_rounds SET result_manifest = %s, result_version = %s, updated_at = now()"
                " WHERE task = %s AND number = %s AND result_model IS NOT NULL",
                (manifest, version, task, number),
            )
            if cur.rowcount != 1:
                raise errors.FailedPrecondition(f"round {number} of {task} has published no model")

    async def round_result(self, *, task: str, number: int) -> rounds.RoundResult | None:
        async with self._pool.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT result_model, result_manifest, result_version, samples, metrics, state_digest, epsilon,"
                    " server_metrics, evaluation_error FROM fl_rounds"
                    " WHERE task = %s AND number = %s AND result_model IS NOT NULL",
                    (task, number),
                )
            ).fetchone()
        if row is None:
            return None
        return rounds.RoundResult(
            model=row[0],
            manifest=row[1] or "",
            version=int(row[2] or 0),
            samples=int(row[3] or 0),
            metrics=dict(row[4] or {}),
            state=row[5] or "",
            epsilon=None if row[6] is None else float(row[6]),
            evaluation=None if row[7] is None else {str(k): float(v) for k, v in dict(row[7]).items()},
            evaluation_error=row[8] or "",
        )

    async def rounds_of(self, *, task: str) -> list[rounds.Round]:
        async with self._pool.connection() as conn:
            numbers = await (
                await conn.execute("SELECT number FROM fl_rounds WHERE task = %s ORDER BY number", (task,))
            ).fetchall()
            out = []
            for (n,) in numbers:
                r = await _load(conn, task=task, number=int(n), lock=False)
                if r is not None:
                    out.append(r)
            return out


async def _write_counts(conn: psycopg.AsyncConnection[Any], after: rounds.Round) -> None:
    await conn.execute(
        "UPDATE fl_rounds SET phase = %s, reason = %s, refused = %s, late = %s, refusals = %s, updated_at = now()"
        " WHERE task = %s AND number = %s",
        (
            after.phase.value,
            after.reason,
            after.refused,
            after.late,
            Jsonb(dict(after.refusals)),
            after.task,
            after.number,
        ),
    )


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
        refusals={str(k): int(v) for k, v in (row[10] or {}).items()},
        model=row[11],
        version=int(row[12]),
        eligible=int(row[13]),
        selected=tuple(p[0] for p in people),
        received=tuple(p[0] for p in received),
    )
