"""A real Celery worker process, a real broker, a real Postgres: messages in, aggregates out."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from worker_helpers import assert_body_matches, insert_result, random_uploads, read_aggregate, seed_release, wait_for

from tether.controller import tasks

REL, V = "default/digits", 3


def send(sender, queue: str, release: str = REL, version: int = V) -> None:
    sender.send_task(tasks.AGGREGATE_TASK, kwargs={"release": release, "version": version}, queue=queue)


def drain(sender, conn, queue: str, probe: str) -> None:
    """Wait until the worker has handled everything sent before: a solo worker runs its queue in order,
    so once a probe message (for a release of its own) has left a trace, every earlier one has run."""
    seed_release(conn, probe)
    send(sender, queue, probe, 1)
    wait_for(lambda: read_aggregate(conn, probe, 1), what=f"probe {probe}")


def test_tether_worker_migrates_then_aggregates_what_it_is_sent(workers, sender, database_url):
    workers.cli()  # a fresh, empty database: the command applies the migrations before it consumes
    with psycopg.connect(database_url, autocommit=True) as conn:
        seed_release(conn, REL, version=V)
        uploads = random_uploads(np.random.default_rng(20), 8, shape=(16, 4))
        for u in uploads:
            insert_result(conn, REL, V, u)
        send(sender, workers.queue)
        rnd, count, _, body = wait_for(
            lambda: (a := read_aggregate(conn, REL, V)) and a[0] >= 1 and a, what="the first round"
        )
    assert (rnd, count) == (1, 8)
    assert_body_matches(body, uploads)


def test_redelivered_and_repeated_messages_never_double_count(workers, sender, conn):
    workers.celery()
    seed_release(conn, REL, version=V)
    rng = np.random.default_rng(21)
    uploads = random_uploads(rng, 5)
    for u in uploads:
        insert_result(conn, REL, V, u)
    for _ in range(3):
        send(sender, workers.queue)
    drain(sender, conn, workers.queue, "probe/one")
    rnd, count, _, body = read_aggregate(conn, REL, V)
    assert (rnd, count) == (1, 5)
    assert_body_matches(body, uploads)

    more = random_uploads(rng, 2)
    for u in more:
        insert_result(conn, REL, V, u)
    for _ in range(3):
        send(sender, workers.queue)
    drain(sender, conn, workers.queue, "probe/two")
    rnd, count, _, body = read_aggregate(conn, REL, V)
    assert (rnd, count) == (2, 7)
    assert_body_matches(body, uploads + more)


def test_a_worker_killed_mid_task_loses_nothing(workers, sender, conn, migrated_url):
    """SIGKILL a worker while it holds an unacknowledged message; the next worker gets it again."""
    seed_release(conn, REL, version=V)
    uploads = random_uploads(np.random.default_rng(22), 6)
    for u in uploads:
        insert_result(conn, REL, V, u)
    conn.execute(
        "INSERT INTO aggregates (release, version, result_count, through_id, body) VALUES (%s, %s, 0, 0, '{}')",
        (REL, V),
    )
    doomed = workers.celery()
    with psycopg.connect(migrated_url) as blocker:
        # Hold the aggregate's row lock: the worker takes the message, then waits on the lock mid-task.
        blocker.execute("SELECT 1 FROM aggregates WHERE release = %s AND version = %s FOR UPDATE", (REL, V))
        send(sender, workers.queue)
        wait_for(
            lambda: conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name = 'tether-worker' AND wait_event_type = 'Lock'"
            ).fetchone()[0],
            what="the worker to block on the row lock",
        )
        doomed.kill()
        blocker.rollback()
    assert read_aggregate(conn, REL, V)[0] == 0  # nothing was written by the killed worker

    workers.celery()  # the message was never acknowledged: after the visibility timeout it is delivered again
    rnd, count, _, body = wait_for(
        lambda: (a := read_aggregate(conn, REL, V)) and a[0] >= 1 and a, timeout=20, what="the redelivered round"
    )
    assert (rnd, count) == (1, 6)
    assert_body_matches(body, uploads)


def test_messages_sent_while_no_worker_runs_are_handled_when_one_starts(workers, sender, conn):
    seed_release(conn, REL, version=V)
    uploads = random_uploads(np.random.default_rng(23), 4)
    for u in uploads:
        insert_result(conn, REL, V, u)
        send(sender, workers.queue)  # one message per upload, as the controller sends them
    workers.celery()
    drain(sender, conn, workers.queue, "probe/late")
    rnd, count, _, body = read_aggregate(conn, REL, V)
    assert (rnd, count) == (1, 4)  # four messages, one round: the first folded everything
    assert_body_matches(body, uploads)


@pytest.mark.parametrize("pool", [[], ["--concurrency", "2"]], ids=["solo", "prefork"])
def test_worker_metrics_move_as_it_aggregates(workers, sender, database_url, pool):
    """Solo: the process's own registry. Prefork: the children's values, summed by the parent that serves them."""
    import socket

    from metrics_support import scrape_sync, value

    with socket.socket() as s:  # a free port for the worker process to bind
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers.cli(*pool, TETHER_METRICS_PORT=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    assert value(scrape_sync(url), "tether_worker_aggregations_total", outcome="folded") == 0
    with psycopg.connect(database_url, autocommit=True) as conn:
        seed_release(conn, REL, version=V)
        for u in random_uploads(np.random.default_rng(23), 4, shape=(2, 2)):
            insert_result(conn, REL, V, u)
        send(sender, workers.queue)
        wait_for(lambda: (a := read_aggregate(conn, REL, V)) and a[0] >= 1, what="the first round")
    samples = wait_for(
        lambda: (m := scrape_sync(url)) and value(m, "tether_worker_aggregations_total", outcome="folded") >= 1 and m,
        what="the round in the metrics",
    )
    assert value(samples, "tether_worker_results_folded_total") == 4
    assert value(samples, "tether_worker_aggregation_duration_seconds_count") == 1
    assert value(samples, "tether_worker_ingestion_lag_seconds_count") == 1
    assert value(samples, "tether_worker_ingestion_lag_seconds_sum") > 0
    if not pool:  # a prefork pool's sum has no process metrics (each child is a process of its own)
        assert value(samples, "process_cpu_seconds_total") > 0
