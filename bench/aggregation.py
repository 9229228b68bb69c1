"""Benchmark: Celery aggregation against plain NumPy on the same arrays, in the same run.

A real `tether worker` process (Celery, solo or prefork pool), a real Redis
broker and a real PostgreSQL server (embedded ones unless TETHER_DATABASE_URL /
TETHER_BROKER_URL name services). R device results, each holding one float64
tensor of K values, a metric and a count, are stored as the controller stores
them; then:

- batch: one `tether.aggregate` message over all R stored results (a full
  rebuild), timed from send until the aggregate row covers all R;
- incremental: the R results arrive in `--rounds` chunks under a new version,
  each chunk followed by one message per result (as the controller enqueues
  them); timed per round from the first send until the round covers the chunk;
- baselines: `numpy.average(stack, axis=0, weights=...)` over the very same
  arrays (already in memory), and the same preceded by base64-decoding them
  from the stored JSON form (the work the worker cannot avoid).

The figures are ratios (Celery time / NumPy time) and throughputs, written as
JSON to --out. The aggregate is checked against the NumPy answer.

    python bench/aggregation.py --results 200 --size 10000 --out bench-aggregation.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tether.controller import aggregation, db
from tether.devtools import embedded

console = Console(stderr=True)


# --------------------------------------------------------------------------- services


@contextlib.contextmanager
def worker_process(*, broker_url: str, database_url: str, queue: str, concurrency: int) -> Iterator[None]:
    argv = [
        sys.executable, "-m", "tether.cli.main", "worker",
        "--broker-url", broker_url, "--database-url", database_url,
        "--queues", queue, "--concurrency", str(concurrency), "--loglevel", "WARNING",
        "--hostname", f"bench-{uuid.uuid4().hex[:6]}@%h",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    ready = threading.Event()
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            lines.append(line)
            if line == "worker ready":
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        deadline = time.monotonic() + 60
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start:\n" + "\n".join(lines[-30:]))
        yield
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 15)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()


# --------------------------------------------------------------------------- data


def seed_release(conn: Any, release: str, version: int) -> None:
    digest = "sha256:" + uuid.uuid4().hex
    conn.execute("INSERT INTO manifests (digest, body) VALUES (%s, %s)", (digest, b"{}"))
    conn.execute(
        "INSERT INTO releases (release, version, generation, manifest_digest) VALUES (%s, %s, 1, %s)"
        " ON CONFLICT (release) DO UPDATE SET version = EXCLUDED.version",
        (release, version, digest),
    )


def insert_results(conn: Any, release: str, version: int, rows: list[dict[str, Any]], progress: Progress) -> None:
    from psycopg.types.json import Jsonb

    task = progress.add_task(f"store v{version} results", total=len(rows))
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO devices (device_id, credential_hash) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            [(d, b"bench") for d in sorted({r["device_id"] for r in rows})],
        )
        for start in range(0, len(rows), 25):
            chunk = rows[start : start + 25]
            cur.executemany(
                "INSERT INTO results (release, version, device_id, idempotency_key, sample_count, metrics, counts,"
                " tensors) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                [
                    (
                        release,
                        version,
                        r["device_id"],
                        uuid.uuid4().hex,
                        r["sample_count"],
                        Jsonb(r["metrics"]),
                        Jsonb(r["counts"]),
                        Jsonb(r["tensors"]),
                    )
                    for r in chunk
                ],
            )
            progress.advance(task, len(chunk))


def wait_covered(conn: Any, release: str, version: int, count: int, *, timeout: float = 120) -> tuple[int, float]:
    """Poll until the aggregate covers `count` results; return (round, monotonic time seen)."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT round, result_count FROM aggregates WHERE release = %s AND version = %s", (release, version)
        ).fetchone()
        now = time.monotonic()
        if row is not None and row[1] >= count:
            return int(row[0]), now
        if now > deadline:
            raise TimeoutError(f"aggregate of {release} v{version} did not reach {count} results: {row}")
        time.sleep(0.002)


def best_of(n: int, fn: Any) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg
    from celery import Celery

    from tether.controller import tasks

    r_count, k = args.results, args.size
    rng = np.random.default_rng(args.seed)
    arrays = [rng.normal(size=k) for _ in range(r_count)]
    weights = rng.integers(1, 1000, size=r_count)
    rows = [
        {
            "device_id": f"bench-device-{i % max(1, r_count // 2)}",
            "sample_count": int(weights[i]),
            "metrics": {"loss": float(rng.uniform(0, 2))},
            "counts": {"events": int(rng.integers(0, 100))},
            "tensors": [aggregation.encode_tensor("w", arrays[i])],
        }
        for i in range(r_count)
    ]
    release, queue = f"bench/{uuid.uuid4().hex[:8]}", f"tether-bench-{uuid.uuid4().hex[:8]}"
    chunks = np.array_split(np.arange(r_count), args.rounds)

    with (
        embedded.postgres_url() as database_url,
        embedded.broker_url() as broker_url,
        Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
    ):
        setup = progress.add_task("start postgres, redis, worker", total=3)
        progress.advance(setup)
        db.migrate(database_url)
        sender: Celery = tasks.make_app(broker_url)
        with (
            psycopg.connect(database_url, autocommit=True) as conn,
            worker_process(broker_url=broker_url, database_url=database_url, queue=queue, concurrency=args.concurrency),
        ):
            progress.advance(setup, 2)

            def send(version: int) -> None:
                sender.send_task(tasks.AGGREGATE_TASK, kwargs={"release": release, "version": version}, queue=queue)

            # -- batch: every result stored, one message
            seed_release(conn, release, 1)
            t0 = time.perf_counter()
            insert_results(conn, release, 1, rows, progress)
            ingest_s = time.perf_counter() - t0
            batch_task = progress.add_task("batch round (1 message)", total=1)
            t0 = time.monotonic()
            send(1)
            _, t1 = wait_covered(conn, release, 1, r_count)
            batch_s = t1 - t0
            progress.advance(batch_task)
            body, state_bytes, body_bytes = conn.execute(
                "SELECT body, pg_column_size(state), pg_column_size(body) FROM aggregates"
                " WHERE release = %s AND version = 1",
                (release,),
            ).fetchone()

            # -- incremental: chunks arrive, one message per result
            seed_release(conn, release, 2)
            inc_task = progress.add_task(f"incremental ({args.rounds} rounds)", total=r_count)
            round_s: list[float] = []
            covered = 0
            for chunk in chunks:
                insert_results(conn, release, 2, [rows[i] for i in chunk], Progress(disable=True))
                covered += len(chunk)
                t0 = time.monotonic()
                for _ in chunk:
                    send(2)
                _, t1 = wait_covered(conn, release, 2, covered)
                round_s.append(t1 - t0)
                progress.advance(inc_task, len(chunk))
            inc_body = conn.execute(
                "SELECT body FROM aggregates WHERE release = %s AND version = 2", (release,)
            ).fetchone()[0]
            # let the coalesced no-op messages drain before the worker is stopped
            drain_t0 = time.monotonic()
            while time.monotonic() - drain_t0 < 10:
                with sender.connection_for_read() as c:
                    if c.default_channel.client.llen(queue) == 0:
                        break
                time.sleep(0.01)
        sender.close()

        # -- baselines over the same arrays
        base_task = progress.add_task("numpy baselines", total=2)
        stack_w = weights.astype(np.float64)
        numpy_s = best_of(5, lambda: np.average(np.stack(arrays), axis=0, weights=stack_w))
        progress.advance(base_task)

        def decode_and_average() -> np.ndarray:
            decoded = [aggregation.decode_tensor(r["tensors"][0])[1] for r in rows]
            return np.average(np.stack(decoded), axis=0, weights=stack_w)

        numpy_decode_s = best_of(3, decode_and_average)
        progress.advance(base_task)

    want = np.average(np.stack(arrays), axis=0, weights=stack_w)
    err_batch = float(np.max(np.abs(np.array(body["tensors"]["w"]["values"]) - want)))
    err_inc = float(np.max(np.abs(np.array(inc_body["tensors"]["w"]["values"]) - want)))
    tensor_mb = r_count * k * 8 / 1e6
    return {
        "benchmark": "aggregation",
        "params": {
            "results": r_count,
            "tensor_size": k,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "seed": args.seed,
        },
        "celery": {
            "batch_s": batch_s,
            "batch_results_per_s": r_count / batch_s,
            "batch_tensor_mb_per_s": tensor_mb / batch_s,
            "incremental_total_s": sum(round_s),
            "incremental_results_per_s": r_count / sum(round_s),
            "incremental_round_s": {
                "p50": statistics.median(round_s),
                "max": max(round_s),
                "all": round_s,
            },
            "messages_sent": 1 + r_count,
        },
        "numpy": {"average_s": numpy_s, "decode_and_average_s": numpy_decode_s},
        "ratio": {
            "celery_batch_vs_numpy": batch_s / numpy_s,
            "celery_batch_vs_numpy_with_decode": batch_s / numpy_decode_s,
            "celery_incremental_vs_numpy": sum(round_s) / numpy_s,
        },
        "scale": {
            "tensor_mb": tensor_mb,
            "ingest_s": ingest_s,
            "ingest_results_per_s": r_count / ingest_s,
            "state_bytes": state_bytes,
            "body_bytes": body_bytes,
        },
        "correctness": {
            "max_abs_err_batch": err_batch,
            "max_abs_err_incremental": err_inc,
            "results_batch": body["results"],
            "results_incremental": inc_body["results"],
            "ok": err_batch < 1e-9 and err_inc < 1e-9 and body["results"] == inc_body["results"] == r_count,
        },
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "external_database": bool(os.environ.get("TETHER_DATABASE_URL")),
            "external_broker": bool(os.environ.get("TETHER_BROKER_URL")),
        },
    }


def print_table(result: dict[str, Any]) -> None:
    p, c, n, r, s = result["params"], result["celery"], result["numpy"], result["ratio"], result["scale"]
    table = Table(title=f"Aggregation: R={p['results']} results x K={p['tensor_size']} float64")
    table.add_column("measure")
    table.add_column("value", justify="right")
    inc, err = c["incremental_round_s"], result["correctness"]
    rows = [
        ("celery batch round (1 message)", f"{c['batch_s'] * 1e3:.1f} ms"),
        ("  throughput", f"{c['batch_results_per_s']:.0f} results/s, {c['batch_tensor_mb_per_s']:.1f} MB/s"),
        (f"celery incremental ({p['rounds']} rounds, {p['results']} msgs)", f"{c['incremental_total_s'] * 1e3:.1f} ms"),
        ("  round latency p50 / max", f"{inc['p50'] * 1e3:.1f} / {inc['max'] * 1e3:.1f} ms"),
        ("numpy average (arrays in memory)", f"{n['average_s'] * 1e3:.2f} ms"),
        ("numpy decode + average", f"{n['decode_and_average_s'] * 1e3:.2f} ms"),
        ("ratio celery batch / numpy", f"{r['celery_batch_vs_numpy']:.1f}x"),
        ("ratio celery batch / numpy+decode", f"{r['celery_batch_vs_numpy_with_decode']:.1f}x"),
        ("ratio celery incremental / numpy", f"{r['celery_incremental_vs_numpy']:.1f}x"),
        ("stored state / body", f"{s['state_bytes'] / 1e3:.0f} kB / {s['body_bytes'] / 1e3:.0f} kB"),
        ("ingest (SQL inserts)", f"{s['ingest_results_per_s']:.0f} results/s"),
        ("max |error| vs numpy", f"{max(err['max_abs_err_batch'], err['max_abs_err_incremental']):.1e}"),
    ]  # fmt: skip
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", "-R", type=int, default=200, help="device results (R)")
    parser.add_argument("--size", "-K", type=int, default=10_000, help="float64 values per tensor (K)")
    parser.add_argument("--rounds", type=int, default=5, help="incremental rounds")
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (1: solo pool)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-aggregation.json", help="where to write the JSON figures")
    args = parser.parse_args(argv)
    if args.results < 1 or args.size < 1 or not 1 <= args.rounds <= args.results:
        parser.error("need results >= 1, size >= 1 and 1 <= rounds <= results")
    result = run(args)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    console.print(f"wrote {args.out}")
    return 0 if result["correctness"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
