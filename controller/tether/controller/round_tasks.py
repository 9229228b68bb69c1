"""Celery task `tether.fl.aggregate_round`: a federated round's accepted updates become the next global model.

Thin over the pure code of `tether.controller.fl`:

1. lock the round's row (`FOR UPDATE`); a round already Published is left
   alone (a redelivered message, or a second worker, changes nothing: the
   result is keyed on (task, round)); a round not Aggregating is not ready;
2. read the global model the round trained from, and the server state the
   previous published round left (a blob);
3. stream the accepted updates from the blob store one at a time, in
   device-id order (`RoundBook.accepted_updates`' order), decoding each as it
   is folded: the FedAvg family holds one float64 model whatever the number of
   updates; robust strategies (median, trimmed mean, Krum) take the round whole;
4. central DP: clip, noise seeded from the cloud's secret and (task, round),
   the privacy spent by the accountant (`fl.privacy.spent_for`);
5. server-side evaluation (`round_evaluation`, when `evaluation.server` is set and the round is one to score):
   the new model through the task's ONNX graph on its held-out set, both files of the release's base bundle;
   a failure is recorded with the round (`evaluation_error`), never holds it;
6. write the new model (and server state) as content-addressed blobs *before*
   the transaction that records the round Published with its metrics and ε
   commits: a worker killed anywhere leaves the round Aggregating, and the
   redelivered message does it again, bit for bit the same.

The controller's round driver then derives the next bundle version from the
new model and opens the next round. Blobs: the filesystem store under
`TETHER_BLOB_DIR` (the controller's `fs`/`http` stores; S3 is not read here yet).
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import psycopg
from psycopg.types.json import Jsonb

from tether.common import errors, manifest, tensorfiles
from tether.controller import blobs, tasks
from tether.controller.fl import aggregators, privacy, publishing, rounds, scoring, updates
from tether.spec import federation

log = logging.getLogger(__name__)

AGGREGATE_ROUND_TASK = "tether.fl.aggregate_round"
NOISE_SECRET = "fl-noise"


def blob_store() -> blobs.FilesystemBlobStore:
    root = os.environ.get("TETHER_BLOB_DIR") or "./tether-blobs"
    return blobs.FilesystemBlobStore(pathlib.Path(root))


def _read(store: blobs.FilesystemBlobStore, digest: str) -> bytes:
    if not store.has(digest):
        raise errors.NotFound(f"blob {digest} is not in the blob store")
    return store.path_for(digest).read_bytes()


def _read_writable(store: blobs.FilesystemBlobStore, digest: str) -> bytearray:
    """A blob's bytes in a buffer of our own (the global model is stepped in place in it)."""
    if not store.has(digest):
        raise errors.NotFound(f"blob {digest} is not in the blob store")
    path = store.path_for(digest)
    buffer = bytearray(path.stat().st_size)
    with path.open("rb") as f:
        f.readinto(buffer)
    return buffer


def _put(store: blobs.FilesystemBlobStore, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.put_stream(digest, [data])
    return digest


def aggregate_round(conn: psycopg.Connection[Any], store: blobs.FilesystemBlobStore, *, task: str, number: int) -> str:
    """Publish round `number` of `task` from its accepted updates; returns what happened (idempotent)."""
    with conn.transaction():
        conn.execute("SELECT set_config('lock_timeout', %s, true)", (tasks.LOCK_TIMEOUT,))
        row = conn.execute(
            "SELECT phase, model, eligible FROM fl_rounds WHERE task = %s AND number = %s FOR UPDATE",
            (task, number),
        ).fetchone()
        if row is None:
            return "no-round"
        phase, model_digest, eligible = rounds.Phase(row[0]), row[1], int(row[2])
        counted = conn.execute(
            "SELECT count(*) FROM fl_participants WHERE task = %s AND number = %s", (task, number)
        ).fetchone()
        selected = int(counted[0]) if counted else 0
        if phase is rounds.Phase.PUBLISHED:
            return "already-published"
        if phase is not rounds.Phase.AGGREGATING:
            return f"not-ready ({phase})"
        rel = conn.execute("SELECT federated FROM releases WHERE release = %s", (task,)).fetchone()
        rules = federation.parse_federation(rel[0] if rel is not None and rel[0] else None)
        if rules is None:
            _fail(conn, task=task, number=number, reason="the release is gone or no longer federated")
            return "failed"
        records = [
            rounds.UpdateRecord(device=r[0], digest=r[1], samples=int(r[2]), encoding=r[3], metrics=dict(r[4] or {}))
            for r in conn.execute(
                "SELECT device_id, update_digest, update_samples, update_encoding, update_metrics"
                " FROM fl_participants WHERE task = %s AND number = %s AND received_position IS NOT NULL"
                ' AND update_digest IS NOT NULL ORDER BY device_id COLLATE "C"',
                (task, number),
            )
        ]
        prev = conn.execute(
            "SELECT state_digest, number FROM fl_rounds WHERE task = %s AND number < %s AND phase = 'Published'"
            " ORDER BY number DESC LIMIT 1",
            (task, number),
        ).fetchone()
        published_before = conn.execute(
            "SELECT count(*) FROM fl_rounds WHERE task = %s AND number < %s AND phase = 'Published'", (task, number)
        ).fetchone()
        # Its layout now, its values at the server step (after the last update is released), stepped in place:
        # a round holds the float64 sums and one model-sized array at a time (3x a float32 update).
        global_model = aggregators.Deferred(
            like=updates.shapes_of(tensorfiles.views(_read(store, model_digest))),
            load=lambda: tensorfiles.views(_read_writable(store, model_digest)),
        )
        state = aggregators.ServerState(rounds=int(published_before[0]) if published_before else 0)
        if prev is not None and prev[0]:
            state = publishing.state_from_tensors(tensorfiles.load(_read(store, prev[0])), rounds_done=state.rounds)

        def contributions() -> Iterator[updates.Update]:
            for rec in records:  # one decoded update in memory at a time
                delta = tensorfiles.decode_update(
                    _read(store, rec.digest), encoding=rec.encoding, like=global_model.like
                )
                yield updates.Update(device=rec.device, delta=delta, samples=rec.samples)

        mechanism = None
        noise = None
        central = rules.privacy is not None and rules.privacy.mode is federation.PrivacyMode.CENTRAL
        if central and rules.privacy is not None:
            mechanism = privacy.GaussianMechanism(
                clip_norm=rules.privacy.clip_norm,
                noise_multiplier=rules.privacy.noise_multiplier,
                expected_updates=max(1, selected),
            )
            noise = np.random.default_rng(publishing.noise_seed(_secret(conn), task=task, number=number))
        try:
            outcome = aggregators.aggregate(
                rules.strategy,
                global_model=global_model,
                contributions=contributions(),
                state=state,
                mechanism=mechanism,
                noise=noise,
            )
        except (updates.EmptyRound, updates.InvalidUpdate, tensorfiles.InvalidTensors) as e:
            _fail(conn, task=task, number=number, reason=str(e))
            return "failed"
        new_model, new_state, folded, samples = outcome.model, outcome.state, outcome.devices, outcome.samples
        del outcome  # its mean delta (the fold's sums) goes before the new model is serialized
        evaluation: dict[str, float] | None = None
        evaluation_error = None
        if rules.evaluation is not None and rules.evaluation.evaluates_round(number):
            try:
                evaluation = _evaluate(conn, store, rules.evaluation, task=task, weights=new_model)
            except (scoring.EvaluationError, errors.NotFound) as e:
                evaluation_error = errors.excerpt(str(e), limit=1000).strip("'\"")
                log.warning("round %d of %s: server-side evaluation failed: %s", number, task, e)
        model_blob = _put(store, tensorfiles.dump(new_model, metadata={"task": task, "round": str(number)}))
        del new_model
        state_tensors = publishing.state_tensors(new_state)
        state_blob = _put(store, tensorfiles.dump(state_tensors)) if state_tensors else None
        epsilon = None
        if rules.privacy is not None:
            spent = privacy.spent_for(
                rules.privacy, rounds=state.rounds + 1, participants=max(1, selected), eligible=max(1, eligible)
            )
            epsilon = spent.epsilon if np.isfinite(spent.epsilon) else None
        metrics = publishing.device_metrics(records)
        conn.execute(
            "UPDATE fl_rounds SET phase = 'Published', reason = %s, result_model = %s, state_digest = %s,"
            " samples = %s, metrics = %s, epsilon = %s, server_metrics = %s, evaluation_error = %s,"
            " updated_at = now() WHERE task = %s AND number = %s",
            (
                f"new global model from {len(folded)} updates",
                model_blob,
                state_blob,
                samples,
                Jsonb(metrics),
                epsilon,
                None if evaluation is None else Jsonb(evaluation),
                evaluation_error,
                task,
                number,
            ),
        )
    log.info("round %d of %s published: model %s from %d updates", number, task, model_blob, len(records))
    return "published"


def _evaluate(
    conn: psycopg.Connection[Any],
    store: blobs.FilesystemBlobStore,
    rules: federation.Evaluation,
    *,
    task: str,
    weights: updates.Model,
) -> dict[str, float]:
    """Score `weights` with the graph and held-out set of the release's base bundle (`round_evaluation`)."""
    from tether.controller import round_evaluation  # onnx and onnxruntime: only where rounds are scored

    assert rules.server_file is not None and rules.server_model is not None
    row = conn.execute(
        "SELECT m.body FROM releases r JOIN manifests m"
        " ON m.digest = CASE WHEN r.base_manifest <> '' THEN r.base_manifest ELSE r.manifest_digest END"
        " WHERE r.release = %s",
        (task,),
    ).fetchone()
    if row is None:
        raise scoring.EvaluationError(f"{round_evaluation.FIELD}: the release's bundle manifest is not stored")
    bundle = manifest.Manifest.from_bytes(bytes(row[0]))
    files: dict[str, bytes] = {}
    for key, path in (("file", rules.server_file), ("model", rules.server_model)):
        try:
            entry = bundle.file(path)
        except KeyError:
            raise scoring.EvaluationError(
                f"{round_evaluation.FIELD}.{key}: {path!r} is not a file of bundle {bundle.name} ({bundle.digest})"
            ) from None
        files[key] = _read(store, entry.sha256)
    return round_evaluation.evaluate(
        graph=files["model"],
        heldout=files["file"],
        weights=weights,
        model_path=rules.server_model,
        heldout_path=rules.server_file,
    )


def _secret(conn: psycopg.Connection[Any]) -> bytes:
    conn.execute(
        "INSERT INTO controller_secrets (name, value) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
        (NOISE_SECRET, os.urandom(32)),
    )
    row = conn.execute("SELECT value FROM controller_secrets WHERE name = %s", (NOISE_SECRET,)).fetchone()
    assert row is not None
    return bytes(row[0])


def _fail(conn: psycopg.Connection[Any], *, task: str, number: int, reason: str) -> None:
    log.error("round %d of %s failed to aggregate: %s", number, task, reason)
    conn.execute(
        "UPDATE fl_rounds SET phase = 'Failed', reason = %s, updated_at = now() WHERE task = %s AND number = %s",
        (f"aggregation failed: {errors.excerpt(reason, limit=500)}", task, number),
    )


@tasks.task(name=AGGREGATE_ROUND_TASK)
def aggregate_round_task(self: Any, *, task: str, round: int) -> str:
    """Aggregate and publish one round. Idempotent on (task, round)."""
    if not isinstance(task, str) or not task or len(task) > 512:
        raise errors.InvalidArgument(f"task must be a non-empty string, not {task!r}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 1:
        raise errors.InvalidArgument(f"round must be a positive integer, not {round!r}")
    with tasks.get_pool().connection() as conn:
        return aggregate_round(conn, blob_store(), task=task, number=round)
