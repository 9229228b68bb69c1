"""The task's transaction against a real Postgres: incremental rounds, idempotency,
late commits, racing workers, and how errors are classified."""

from __future__ import annotations

import json
import threading

import numpy as np
import psycopg
import pytest
from worker_helpers import Upload, assert_body_matches, insert_result, random_uploads, read_aggregate, seed_release

from tether.common import errors
from tether.controller import tasks
from tether.controller.tasks import fold_pending

REL, V = "default/digits", 1


def test_rounds_fold_only_new_results_and_equal_a_full_rebuild_bit_for_bit(conn):
    seed_release(conn, REL)
    uploads = random_uploads(np.random.default_rng(1), 12)
    rounds = []
    for chunk in (uploads[:5], uploads[5:6], uploads[6:]):
        for u in chunk:
            insert_result(conn, REL, V, u)
        outcome = fold_pending(conn, release=REL, version=V)
        assert (outcome.status, outcome.folded) == ("folded", len(chunk))
        rounds.append(outcome.round)
    assert rounds == [1, 2, 3]
    rnd, count, through, body = read_aggregate(conn, REL, V)
    assert (rnd, count) == (3, 12) and through == conn.execute("SELECT max(id) FROM results").fetchone()[0]
    assert_body_matches(body, uploads)

    conn.execute("UPDATE aggregates SET state = NULL")  # forget the incremental state: rebuild from every row
    assert fold_pending(conn, release=REL, version=V).folded == 12
    rebuilt = read_aggregate(conn, REL, V)
    assert rebuilt[0] == 4 and json.dumps(rebuilt[3], sort_keys=True) == json.dumps(body, sort_keys=True)


def test_a_round_with_nothing_new_changes_nothing(conn):
    seed_release(conn, REL)
    for u in random_uploads(np.random.default_rng(2), 3):
        insert_result(conn, REL, V, u)
    fold_pending(conn, release=REL, version=V)
    before = conn.execute("SELECT round, body, state, updated_at FROM aggregates").fetchone()
    for _ in range(3):
        assert fold_pending(conn, release=REL, version=V).status == "unchanged"
    assert conn.execute("SELECT round, body, state, updated_at FROM aggregates").fetchone() == before


def test_a_result_committed_after_a_higher_id_is_not_lost(conn, migrated_url):
    """Ids are drawn at insert, commits land in any order: a plain id watermark would skip the late one."""
    seed_release(conn, REL)
    early, late = random_uploads(np.random.default_rng(3), 2)
    with psycopg.connect(migrated_url) as slow:  # not autocommit: its transaction stays open
        low_id = insert_result(slow, REL, V, early)
        high_id = insert_result(conn, REL, V, late)
        assert low_id < high_id
        first = fold_pending(conn, release=REL, version=V)
        assert (first.folded, first.through_id) == (1, high_id)
        slow.commit()
    second = fold_pending(conn, release=REL, version=V)
    assert (second.folded, second.through_id, second.result_count) == (1, high_id, 2)
    assert_body_matches(read_aggregate(conn, REL, V)[3], [early, late])
    # once no older transaction is open, the ids kept above the horizon are pruned on the next round
    insert_result(conn, REL, V, early)
    fold_pending(conn, release=REL, version=V)
    state = conn.execute("SELECT state FROM aggregates").fetchone()[0]
    assert len(state["folded_above"]) <= 1
    assert fold_pending(conn, release=REL, version=V).status == "unchanged"


def test_racing_workers_never_double_count(conn, migrated_url):
    seed_release(conn, REL)
    uploads = random_uploads(np.random.default_rng(4), 40)
    failures: list[BaseException] = []

    def uploader() -> None:
        with psycopg.connect(migrated_url, autocommit=True) as c:
            for u in uploads:
                insert_result(c, REL, V, u)

    def folder() -> None:
        try:
            with psycopg.connect(migrated_url, autocommit=True) as c:
                for _ in range(15):
                    fold_pending(c, release=REL, version=V)
        except BaseException as e:  # pragma: no cover - reported below
            failures.append(e)

    threads = [threading.Thread(target=uploader)] + [threading.Thread(target=folder) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
    fold_pending(conn, release=REL, version=V)  # the message sent after the last upload
    _rnd, count, _, body = read_aggregate(conn, REL, V)
    assert count == 40 and body["results"] == 40
    assert_body_matches(body, uploads)


def test_results_of_other_versions_and_releases_stay_out(conn):
    seed_release(conn, REL, version=2)
    seed_release(conn, "default/other")
    mine = random_uploads(np.random.default_rng(5), 3)
    for u in mine:
        insert_result(conn, REL, 2, u)
    for u in random_uploads(np.random.default_rng(6), 3):
        insert_result(conn, REL, 1, u)
        insert_result(conn, "default/other", 2, u)
    fold_pending(conn, release=REL, version=2)
    assert_body_matches(read_aggregate(conn, REL, 2)[3], mine)
    assert read_aggregate(conn, REL, 1) is None


def test_bad_uploads_are_excluded_and_reported_not_fatal(conn):
    seed_release(conn, REL)
    good = random_uploads(np.random.default_rng(7), 3)
    insert_result(conn, REL, V, good[0])
    bad_id = insert_result(conn, REL, V, Upload(device_id="dev-x", sample_count=9, tensors={"w": np.zeros(7)}))
    insert_result(conn, REL, V, good[1], tensors_json=None)
    corrupt_id = insert_result(
        conn,
        REL,
        V,
        Upload(device_id="dev-y", sample_count=1),
        tensors_json=[{"name": "w", "shape": [1], "data": "??"}],
    )
    insert_result(conn, REL, V, good[2])
    outcome = fold_pending(conn, release=REL, version=V)
    assert (outcome.folded, outcome.rejected) == (3, 2)
    body = read_aggregate(conn, REL, V)[3]
    assert_body_matches(body, good)
    assert body["rejected"] == 2
    assert [(r["result_id"], r["reason"], r["field"]) for r in body["rejections"]] == [
        (bad_id, "ShapeMismatch", "tensors.w"),
        (corrupt_id, "InvalidTensor", "tensors.w"),
    ]


def test_spec_from_the_release_is_applied(conn):
    seed_release(conn, REL, spec={"tensors": "sum", "metrics": "mean"})
    uploads = random_uploads(np.random.default_rng(8), 4)
    for u in uploads:
        insert_result(conn, REL, V, u)
    fold_pending(conn, release=REL, version=V)
    body = read_aggregate(conn, REL, V)[3]
    np.testing.assert_allclose(np.array(body["tensors"]["b"]["values"]), sum(u.tensors["b"] for u in uploads))
    assert body["metrics"]["loss"] == pytest.approx(np.mean([u.metrics["loss"] for u in uploads]))


def test_unknown_release_is_a_no_op(conn):
    assert fold_pending(conn, release="default/gone", version=1).status == "no-release"
    assert conn.execute("SELECT count(*) FROM aggregates").fetchone()[0] == 0


def test_corrupt_state_is_rebuilt(conn):
    seed_release(conn, REL)
    uploads = random_uploads(np.random.default_rng(9), 3)
    for u in uploads:
        insert_result(conn, REL, V, u)
    fold_pending(conn, release=REL, version=V)
    conn.execute("""UPDATE aggregates SET state = '{"acc": {"format": 1}}'""")
    assert fold_pending(conn, release=REL, version=V).folded == 3
    assert_body_matches(read_aggregate(conn, REL, V)[3], uploads)


def test_state_from_another_cluster_is_rebuilt_not_trusted(conn):
    """A horizon above every transaction id of this cluster (a restored dump) would hide new results."""
    seed_release(conn, REL)
    uploads = random_uploads(np.random.default_rng(12), 3)
    for u in uploads[:2]:
        insert_result(conn, REL, V, u)
    fold_pending(conn, release=REL, version=V)
    conn.execute("UPDATE aggregates SET state = jsonb_set(state, '{horizon}', '\"9000000000\"')")
    insert_result(conn, REL, V, uploads[2])
    assert fold_pending(conn, release=REL, version=V).result_count == 3
    assert_body_matches(read_aggregate(conn, REL, V)[3], uploads)


# --------------------------------------------------------------------------- the task's error handling


@pytest.fixture()
def task_env(migrated_url, monkeypatch):
    monkeypatch.setenv("TETHER_DATABASE_URL", migrated_url)
    try:
        yield migrated_url
    finally:
        tasks.close_pool()


def test_task_runs_in_process_and_permanent_errors_are_dropped(conn, task_env, caplog):
    seed_release(conn, REL)
    uploads = random_uploads(np.random.default_rng(10), 2)
    for u in uploads:
        insert_result(conn, REL, V, u)
    out = tasks.aggregate.apply(kwargs={"release": REL, "version": V}).get()
    assert out["status"] == "folded" and out["result_count"] == 2

    seed_release(conn, "default/bad-spec", spec={"tensors": "median"})
    assert tasks.aggregate.apply(kwargs={"release": "default/bad-spec", "version": 1}).get() is None
    assert tasks.aggregate.apply(kwargs={"release": "", "version": 1}).get() is None
    assert "failed permanently" in caplog.text and "InvalidSpec" in caplog.text


def test_transient_errors_are_retried(conn, task_env, monkeypatch):
    seed_release(conn, REL)
    insert_result(conn, REL, V, random_uploads(np.random.default_rng(11), 1)[0])
    calls = []
    real = tasks.fold_pending

    def flaky(c, **kw):
        calls.append(kw)
        if len(calls) < 3:
            raise psycopg.errors.LockNotAvailable("canceling statement due to lock timeout")
        return real(c, **kw)

    monkeypatch.setattr(tasks, "fold_pending", flaky)
    tasks.aggregate.apply(kwargs={"release": REL, "version": V})
    assert len(calls) == 3
    assert read_aggregate(conn, REL, V)[1] == 1


def test_the_task_is_configured_for_at_least_once_delivery():
    t = tasks.app.tasks[tasks.AGGREGATE_TASK]
    assert t.acks_late and t.reject_on_worker_lost
    conf = tasks.app.conf
    assert conf.worker_prefetch_multiplier == 1 and conf.accept_content == ["json"]
    assert conf.result_backend is None and conf.task_ignore_result
    assert isinstance(errors.InvalidSpec("x"), errors.TetherError)
