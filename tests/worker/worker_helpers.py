"""Helpers for the aggregation tests: seed rows with plain SQL, compute the expected body
independently with NumPy, and run a real Celery worker as a child process.

(A module of its own, not conftest: test modules import these by name.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from tether.controller import aggregation

# --------------------------------------------------------------------------- seeding rows


def seed_release(conn: Any, release: str = "default/digits", *, version: int = 1, spec: Mapping | None = None) -> str:
    from psycopg.types.json import Jsonb

    digest = "sha256:" + hashlib.sha256(release.encode()).hexdigest()
    conn.execute("INSERT INTO manifests (digest, body) VALUES (%s, %s) ON CONFLICT DO NOTHING", (digest, b"{}"))
    conn.execute(
        "INSERT INTO releases (release, version, generation, manifest_digest, aggregation)"
        " VALUES (%s, %s, 1, %s, %s)"
        " ON CONFLICT (release) DO UPDATE SET version = EXCLUDED.version, aggregation = EXCLUDED.aggregation",
        (release, version, digest, Jsonb(dict(spec or {}))),
    )
    return release


@dataclasses.dataclass(frozen=True)
class Upload:
    """What a device uploaded; also what the NumPy reference computes from."""

    device_id: str
    sample_count: int
    metrics: Mapping[str, float] = dataclasses.field(default_factory=dict)
    counts: Mapping[str, int] = dataclasses.field(default_factory=dict)
    tensors: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


def insert_result(conn: Any, release: str, version: int, upload: Upload, *, tensors_json: Any = None) -> int:
    from psycopg.types.json import Jsonb

    conn.execute(
        "INSERT INTO devices (device_id, credential_hash) VALUES (%s, %s) ON CONFLICT DO NOTHING",
        (upload.device_id, b"x"),
    )
    if tensors_json is None:
        tensors_json = [aggregation.encode_tensor(name, arr) for name, arr in upload.tensors.items()]
    row = conn.execute(
        "INSERT INTO results (release, version, device_id, idempotency_key, sample_count, metrics, counts, tensors)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            release,
            version,
            upload.device_id,
            uuid.uuid4().hex,
            upload.sample_count,
            Jsonb(dict(upload.metrics)),
            Jsonb(dict(upload.counts)),
            Jsonb(tensors_json),
        ),
    ).fetchone()
    return int(row[0])


def random_uploads(
    rng: np.random.Generator, n: int, *, shape: tuple[int, ...] = (3, 4), devices: int = 5
) -> list[Upload]:
    return [
        Upload(
            device_id=f"dev-{rng.integers(devices)}",
            sample_count=int(rng.integers(1, 500)),
            metrics={"loss": float(rng.uniform(0, 3)), "accuracy": float(rng.uniform(0, 1))},
            counts={"events": int(rng.integers(0, 100))},
            tensors={"w": rng.normal(size=shape), "b": rng.normal(size=(shape[-1],))},
        )
        for _ in range(n)
    ]


def numpy_reference(uploads: Sequence[Upload]) -> dict[str, Any]:
    """The default-spec aggregate, computed the obvious way with NumPy."""
    weights = np.array([u.sample_count for u in uploads], dtype=np.float64)
    tensors = {
        name: np.average(np.stack([u.tensors[name] for u in uploads]), axis=0, weights=weights)
        for name in uploads[0].tensors
    }
    metrics = {
        name: float(np.average([u.metrics[name] for u in uploads], weights=weights)) for name in uploads[0].metrics
    }
    counts = {name: int(sum(u.counts[name] for u in uploads)) for name in uploads[0].counts}
    return {
        "results": len(uploads),
        "devices": len({u.device_id for u in uploads}),
        "samples": int(weights.sum()),
        "metrics": metrics,
        "tensors": tensors,
        "counts": counts,
    }


def assert_body_matches(body: Mapping[str, Any], uploads: Sequence[Upload]) -> None:
    want = numpy_reference(uploads)
    for key in ("results", "devices", "samples", "counts"):
        assert body[key] == want[key], key
    assert body["metrics"].keys() == want["metrics"].keys()
    for name, value in want["metrics"].items():
        assert body["metrics"][name] == pytest.approx(value, rel=1e-12)
    assert body["tensors"].keys() == want["tensors"].keys()
    for name, value in want["tensors"].items():
        got = body["tensors"][name]
        assert got["shape"] == list(value.shape)
        np.testing.assert_allclose(np.array(got["values"]).reshape(value.shape), value, rtol=1e-12, atol=1e-12)


def read_aggregate(conn: Any, release: str, version: int) -> tuple[int, int, int, dict[str, Any]] | None:
    """(round, result_count, through_id, body), or None when there is no row yet."""
    row = conn.execute(
        "SELECT round, result_count, through_id, body FROM aggregates WHERE release = %s AND version = %s",
        (release, version),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3])


def wait_for(predicate: Any, *, timeout: float = 15, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- a real worker


@dataclasses.dataclass
class WorkerProcess:
    """A `celery worker` child process (its own process group), logging to a file."""

    argv: list[str]
    env: dict[str, str]
    log_path: pathlib.Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, *, timeout: float = 20) -> WorkerProcess:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + timeout
        while b"worker ready" not in self.log_path.read_bytes():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the whole process group: no warm shutdown, nothing acknowledged on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None) is not None:
            self._log.close()


@dataclasses.dataclass
class WorkerFactory:
    broker_url: str
    database_url: str
    queue: str
    tmp_path: pathlib.Path
    started: list[WorkerProcess] = dataclasses.field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            TETHER_BROKER_URL=self.broker_url,
            TETHER_DATABASE_URL=self.database_url,
            TETHER_BROKER_VISIBILITY_TIMEOUT="2",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def celery(self, **extra_env: str) -> WorkerProcess:
        """`python -m celery -A tether.controller.tasks worker --pool solo` on this test's queue."""
        argv = [
            sys.executable, "-m", "celery", "-A", "tether.controller.tasks", "worker",
            "--pool", "solo", "--concurrency", "1", "-Q", self.queue, "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h",
        ]  # fmt: skip
        return self._start(argv, self.env(**extra_env))

    def cli(self, *extra_args: str, **extra_env: str) -> WorkerProcess:
        """`tether worker` (migrates, then runs a solo worker unless `extra_args` say otherwise) on this queue."""
        argv = [
            sys.executable, "-m", "tether.cli.main", "worker",
            "--broker-url", self.broker_url, "--database-url", self.database_url,
            "--queues", self.queue, "--hostname", f"test-{uuid.uuid4().hex[:8]}@%h", *extra_args,
        ]  # fmt: skip
        return self._start(argv, self.env(**extra_env))

    def _start(self, argv: list[str], env: dict[str, str]) -> WorkerProcess:
        w = WorkerProcess(argv=argv, env=env, log_path=self.tmp_path / f"worker-{len(self.started)}.log")
        self.started.append(w)
        return w.start()
