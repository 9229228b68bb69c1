"""Celery aggregation worker: the app, the project-wide task decorator, `tether.aggregate`.

The task is a thin adapter: lock the aggregate row, fold the results that
arrived since the last round into the stored accumulator with the pure
functions of `tether.controller.aggregation`, write body and state back, all
in one transaction. Why this is safe to run any number of times, on any
number of workers:

- Messages are acknowledged late (after the task returns) and rejected back to
  the queue if the worker dies, so a delivered-but-unfinished message is
  delivered again. Redelivery is harmless: the fold's watermark is stored in
  the same row, under `SELECT ... FOR UPDATE`, and committed together with the
  sums, so a result is folded at most once, whoever runs the message and
  however often.
- The watermark is not `results.id` alone. Ids are drawn at insert but
  transactions commit in any order, so "everything up to the highest id seen"
  would skip a lower id that commits late. The state keeps a *horizon* of
  transaction ids (every result inserted by a transaction below it is folded;
  `pg_snapshot_xmin()` says no transaction below it is still running) plus
  the few result ids already folded above it. See
  `migrations/20261121_0002_aggregate_state.sql`.
- Each message folds *everything* pending for its (release, version), not
  just one result, so messages coalesce: the controller enqueues one per
  upload and most of them find nothing left to do.

Transient database errors (connection loss, lock or statement timeout,
serialization failure, deadlock, pool timeout) are retried with exponential
backoff; anything else is a permanent error: logged, and the message is
acknowledged (the next upload's message folds whatever this one missed).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from celery import Celery, Task, signals
from psycopg.types.json import Jsonb

from tether.common import errors, tracing
from tether.controller import aggregation, instruments

log = logging.getLogger(__name__)

AGGREGATE_TASK = "tether.aggregate"
READY_LINE = "worker ready"

# Seconds; environment overrides exist for tests and for tuning a deployment.
VISIBILITY_TIMEOUT = float(os.environ.get("TETHER_BROKER_VISIBILITY_TIMEOUT", "600"))
SOFT_TIME_LIMIT = 300
TIME_LIMIT = 330
LOCK_TIMEOUT = "15s"  # waiting for another worker's round on the same aggregate
STATEMENT_TIMEOUT = "240s"

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    psycopg.OperationalError,  # connection lost, admin shutdown, lock/statement timeout, 40001, 40P01, PoolTimeout
    psycopg.InterfaceError,  # connection closed under us
)


def _restore_interval(visibility_timeout: float) -> int:
    # How often a worker looks for messages whose consumer vanished without acking them.
    return max(1, min(10, int(visibility_timeout // 4)))


def make_app(broker_url: str | None = None) -> Celery:
    broker = broker_url or os.environ.get("TETHER_BROKER_URL") or "redis://127.0.0.1:6379/0"
    # The worker imports the federated rounds' task module at start (named, not imported here: it imports this one).
    celery_app = Celery("tether", set_as_current=False, include=["tether.controller.round_tasks"])
    celery_app.conf.update(
        broker_url=broker,
        result_backend=None,  # results live in Postgres
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # A message whose consumer died unacknowledged goes back to the queue after this long.
            # Longer than TIME_LIMIT, so a healthy long round is not handed to a second worker.
            "visibility_timeout": VISIBILITY_TIMEOUT,
            "unacked_restore_interval": _restore_interval(VISIBILITY_TIMEOUT),
            "unacked_restore_throttle": 1,
        },
        worker_send_task_events=False,
        enable_utc=True,
    )
    return celery_app


app = make_app()
# tether_worker_* in the process's default registry (`tether worker --metrics-port` serves it; with a prefork
# pool, each child writes its values to PROMETHEUS_MULTIPROC_DIR and the parent serves their sum).
metrics = instruments.WorkerMetrics()

F = TypeVar("F", bound=Callable[..., Any])


class TetherTask(Task):
    """Base of every Tether task: a permanent error is logged and the message acknowledged."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except TRANSIENT_ERRORS:
            raise  # retries exhausted: Celery records the failure
        except (errors.TetherError, psycopg.Error) as e:
            log.error("task %s%s failed permanently, dropping it: %s: %s", self.name, kwargs, type(e).__name__, e)
            return None


def task(*, name: str, **options: Any) -> Callable[[F], F]:
    """The project-wide task decorator (use it, never `app.task` directly).

    Late acks, reject-on-worker-lost, JSON arguments, time limits and
    exponential-backoff retries on transient database errors.
    """
    settings: dict[str, Any] = {
        "base": TetherTask,
        "bind": True,
        "name": name,
        "acks_late": True,
        "reject_on_worker_lost": True,
        "serializer": "json",
        "ignore_result": True,
        "autoretry_for": TRANSIENT_ERRORS,
        "retry_backoff": 1,
        "retry_backoff_max": 60,
        "retry_jitter": True,
        "max_retries": 50,
        "soft_time_limit": SOFT_TIME_LIMIT,
        "time_limit": TIME_LIMIT,
    }
    settings.update(options)
    return app.task(**settings)


# --------------------------------------------------------------------------- database


_pool: psycopg_pool.ConnectionPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def database_url() -> str:
    url = os.environ.get("TETHER_DATABASE_URL") or app.conf.get("tether_database_url")
    if not url:
        raise errors.FailedPrecondition("TETHER_DATABASE_URL is not set")
    return str(url)


def get_pool() -> psycopg_pool.ConnectionPool:
    """This process's pool, created on first use (after a prefork child has forked)."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = psycopg_pool.ConnectionPool(
                database_url(),
                min_size=1,
                max_size=2,
                timeout=10,
                open=True,
                name="tether-worker",
                check=psycopg_pool.ConnectionPool.check_connection,
                kwargs={"application_name": "tether-worker"},
                configure=tracing.instrument_connection if tracing.instrumented("psycopg") else None,
            )
            _pool_pid = os.getpid()
        return _pool


def close_pool() -> None:
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
        if pool is not None and _pool_pid == os.getpid():
            pool.close()


@signals.worker_process_shutdown.connect
@signals.worker_shutdown.connect
def _close_pool_on_shutdown(**_: Any) -> None:
    close_pool()


@signals.worker_init.connect
def _configure_tracing(**_: Any) -> None:
    # Before any child is forked: the SDK's batch processor restarts its thread in each child.
    if not tracing.active():
        tracing.configure("tether-worker", instrument_=("celery", "psycopg"))


@signals.worker_ready.connect
def _announce_ready(**_: Any) -> None:
    # Celery redirects sys.stdout to its logger; tooling waits for this line on the real stdout.
    out = sys.__stdout__
    if out is not None:
        out.write(READY_LINE + "\n")
        out.flush()


# --------------------------------------------------------------------------- the fold


@dataclasses.dataclass(frozen=True, kw_only=True)
class FoldOutcome:
    release: str
    version: int
    status: str  # "folded" | "unchanged" | "no-release"
    round: int = 0
    folded: int = 0  # results accepted this round
    rejected: int = 0  # results rejected this round
    result_count: int = 0
    through_id: int = 0
    oldest_age_s: float | None = None  # age of the oldest result this round folded, when it was read


@dataclasses.dataclass(kw_only=True)
class FoldState:
    """What `aggregates.state` holds: the accumulator and the fold's watermark."""

    acc: aggregation.Accumulator
    horizon: int = 0  # every result with insert_xid < horizon is folded
    folded_above: set[int] = dataclasses.field(default_factory=set)  # folded result ids with insert_xid >= horizon

    @classmethod
    def from_json(cls, state: Any) -> FoldState:
        if state is None:  # no incremental state yet: rebuild from every result
            return cls(acc=aggregation.Accumulator())
        try:
            return cls(
                acc=aggregation.Accumulator.from_state(state["acc"]),
                horizon=int(state["horizon"]),
                folded_above={int(i) for i in state["folded_above"]},
            )
        except (KeyError, TypeError, ValueError) as e:
            raise aggregation.InvalidState(f"corrupt aggregate state: {e}") from e

    def to_json(self) -> dict[str, Any]:
        return {"acc": self.acc.to_state(), "horizon": str(self.horizon), "folded_above": sorted(self.folded_above)}


_RESULT_COLUMNS = (
    "id, device_id, sample_count, metrics, counts, tensors, insert_xid::text,"
    " extract(epoch FROM clock_timestamp() - received_at)::float8"
)


def fold_pending(conn: psycopg.Connection[Any], *, release: str, version: int) -> FoldOutcome:
    """Fold every not-yet-folded result of (release, version) into its aggregate, in one transaction."""
    with conn.transaction():
        conn.execute(
            "SELECT set_config('lock_timeout', %s, true), set_config('statement_timeout', %s, true)",
            (LOCK_TIMEOUT, STATEMENT_TIMEOUT),
        )
        rel = conn.execute("SELECT aggregation FROM releases WHERE release = %s", (release,)).fetchone()
        if rel is None:
            log.warning("aggregate %s v%s: no such release, nothing to do", release, version)
            return FoldOutcome(release=release, version=version, status="no-release")
        spec = aggregation.AggregationSpec.from_json(rel[0])
        conn.execute(
            "INSERT INTO aggregates (release, version, round, result_count, through_id, body, state)"
            " VALUES (%s, %s, 0, 0, 0, %s, NULL) ON CONFLICT (release, version) DO NOTHING",
            (release, version, Jsonb(aggregation.Accumulator().finish(spec))),
        )
        row = conn.execute(
            "SELECT round, through_id, state FROM aggregates WHERE release = %s AND version = %s FOR UPDATE",
            (release, version),
        ).fetchone()
        if row is None:  # the release was deleted since (its aggregates cascade away)
            return FoldOutcome(release=release, version=version, status="no-release")
        round_, through_id, stored = row
        try:
            state = FoldState.from_json(stored)
        except aggregation.InvalidState as e:
            log.error("aggregate %s v%s: %s; rebuilding from every result", release, version, e)
            stored, state = None, FoldState(acc=aggregation.Accumulator())
        rebuild = stored is None

        # Taken after the lock and before reading results: every transaction below it has ended,
        # so every result it committed is visible to the read below.
        xmin, own_xid = conn.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, pg_current_xact_id()::text"
        ).fetchone()  # type: ignore[misc]
        if state.horizon > int(own_xid):
            # Impossible in the cluster that wrote it (the horizon is a past snapshot's xmin): the
            # database was restored into another cluster, whose transaction ids mean nothing to it.
            log.warning("aggregate %s v%s: state from another cluster; rebuilding from every result", release, version)
            rebuild, state = True, FoldState(acc=aggregation.Accumulator())
        new_horizon = max(state.horizon, int(xmin))
        folded = rejected = 0
        oldest_age_s: float | None = None
        newly_above: set[int] = set()
        with conn.cursor(name="tether_aggregate_pending") as cur:
            cur.itersize = 64
            cur.execute(
                f"SELECT {_RESULT_COLUMNS} FROM results"
                " WHERE release = %s AND version = %s AND insert_xid >= %s::xid8 AND NOT (id = ANY(%s::bigint[]))"
                " ORDER BY id",
                (release, version, str(state.horizon), sorted(state.folded_above)),
            )
            for rid, device_id, sample_count, metrics, counts, tensors, xid, age_s in cur:
                oldest_age_s = age_s if oldest_age_s is None else max(oldest_age_s, age_s)
                raw = aggregation.RawResult(
                    result_id=rid,
                    device_id=device_id,
                    sample_count=sample_count,
                    metrics=metrics,
                    counts=counts,
                    tensors=tensors,
                )
                rejection = state.acc.add(raw)
                if rejection is None:
                    folded += 1
                else:
                    rejected += 1
                    log.warning("aggregate %s v%s: rejected result %s: %s", release, version, rid, rejection.message)
                through_id = max(through_id, rid)
                if int(xid) >= new_horizon:
                    newly_above.add(rid)

        still_above = state.folded_above
        if new_horizon > state.horizon and still_above:
            still_above = {
                r[0]
                for r in conn.execute(
                    "SELECT id FROM results WHERE id = ANY(%s::bigint[]) AND insert_xid >= %s::xid8",
                    (sorted(still_above), str(new_horizon)),
                )
            }
        changed = folded + rejected > 0
        if not changed and not rebuild:
            return FoldOutcome(
                release=release,
                version=version,
                status="unchanged",
                round=round_,
                result_count=state.acc.results,
                through_id=through_id,
            )
        state.horizon = new_horizon
        state.folded_above = still_above | newly_above
        new_round = round_ + 1 if changed else round_
        conn.execute(
            "UPDATE aggregates SET round = %s, result_count = %s, through_id = %s, body = %s, state = %s,"
            " updated_at = now() WHERE release = %s AND version = %s",
            (
                new_round,
                state.acc.results,
                through_id,
                Jsonb(state.acc.finish(spec)),
                Jsonb(state.to_json()),
                release,
                version,
            ),
        )
    return FoldOutcome(
        release=release,
        version=version,
        status="folded" if changed else "unchanged",
        round=new_round,
        folded=folded,
        rejected=rejected,
        result_count=state.acc.results,
        through_id=through_id,
        oldest_age_s=oldest_age_s,
    )


@task(name=AGGREGATE_TASK)
def aggregate(self: Task, *, release: str, version: int) -> dict[str, Any]:
    """Fold the pending results of (release, version) into its aggregate. Idempotent."""
    if not isinstance(release, str) or not release or len(release) > 512:
        raise errors.InvalidArgument(f"release must be a non-empty string, not {release!r}")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise errors.InvalidArgument(f"version must be a non-negative integer, not {version!r}")
    started = time.perf_counter()
    parent = None
    if tracing.active():  # the upload's trace context, from the message's headers
        headers = {k: v for k in ("traceparent", "tracestate") if (v := self.request.get(k))}
        parent = tracing.extract(headers, via="celery")
    try:
        with (
            tracing.span("aggregate", parent=parent, release=release, version=version),
            get_pool().connection() as conn,
        ):
            outcome = fold_pending(conn, release=release, version=version)
    except TRANSIENT_ERRORS:
        metrics.aggregations.labels("retried" if self.request.retries < (self.max_retries or 0) else "failed").inc()
        raise
    except Exception:
        metrics.aggregations.labels("failed").inc()
        raise
    took = time.perf_counter() - started
    metrics.aggregations.labels(outcome.status).inc()
    metrics.duration.observe(took)
    if outcome.folded or outcome.rejected:
        metrics.results_folded.inc(outcome.folded)
        metrics.results_rejected.inc(outcome.rejected)
        if outcome.oldest_age_s is not None:  # committed now: its age then, plus the rest of the round
            metrics.ingestion_lag.observe(outcome.oldest_age_s + took)
    log.info(
        "aggregate %s v%s: %s round=%s folded=%s rejected=%s total=%s",
        release,
        version,
        outcome.status,
        outcome.round,
        outcome.folded,
        outcome.rejected,
        outcome.result_count,
    )
    return dataclasses.asdict(outcome)
