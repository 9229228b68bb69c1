"""Trigger → result latency of a pattern-triggered digits inference: warm, cold, fresh, and the model alone.

Part of `tether bench runtime` (its `latency` section and top-level keys).
The trigger is real: events go into the agent's stream processor (SQLite
event store, trie matcher), the match queues a run in the dispatcher, and
the run goes the way the agent sends it:

- warm: to the task's resident worker (`tether.agent.warmpool`);
- cold: to a worker forked from the already started zygote for that run
  (a pool with no room for warm workers), its model loaded and entrypoint
  imported after the trigger;
- fresh: a new interpreter (`runtime.run_task`, the path before warm workers);
- model: the engine call alone, in this process, on the same input.

The clock starts before the event that completes the pattern is ingested and
stops when the run's validated outcome is back. `warm_overhead_p50_ms` is
warm minus model (goal ≤ 2 ms); `cold_p50_ms` has a goal of 50 ms. Then
throughput with 8 tasks triggered at once (each its own release), warm
against cold, and the memory of one warm worker (RSS, and PSS: what forking
from the zygote shares is split between the processes that share it).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import shutil
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tether.agent import engine, runtime, schedule, warmpool
from tether.agent.stream import eventstore, processor
from tether.common import bundle_files
from tether.spec import triggers

GOALS = {"warm_overhead_p50_ms": 2.0, "cold_p50_ms": 50.0}
HEADLINE = (
    "warm_p50_ms",
    "warm_p99_ms",
    "cold_p50_ms",
    "cold_p99_ms",
    "fresh_p50_ms",
    "model_p50_ms",
    "warm_overhead_p50_ms",
    "warm_cpu_per_run_ms",
    "concurrent8_warm_runs_per_s",
    "concurrent8_cold_runs_per_s",
    "warm_worker_rss_bytes",
    "warm_worker_pss_bytes",
)

TASK = '''"""Score the digit an app event names (an event-pattern-triggered inference)."""
import numpy as np

_X = []


def run(ctx):
    if not _X:  # the device's digits, read once per worker
        with np.load(f"{ctx.data_dir}/digits.npz", allow_pickle=False) as npz:
            _X.append(np.asarray(npz["X"], dtype=np.float32))
    X = _X[0]
    i = int(ctx.inputs["match"]["events"][-1]["attrs"]["digit"]) % len(X)
    probs = ctx.model.run({"input": X[i : i + 1]})["probs"]
    return {"sample_count": 1, "metrics": {"class": float(probs.argmax())}}
'''

PATTERN = {
    "type": "pattern",
    "pattern": {"steps": [{"type": "page_view", "page": "draw"}, {"type": "submit", "page": "draw"}], "within": 30},
    "cooldownSeconds": 0,
}


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _summary(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(ms), "p99_ms": _pct(ms, 0.99), "runs": len(ms)}


def pss_bytes(pid: int) -> int:
    try:
        for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _Trigger:
    """The agent's trigger path for one release: event store → trie → dispatcher."""

    def __init__(self, work: pathlib.Path, releases: list[str]) -> None:
        self.store = eventstore.EventStore(work / "events.db")
        self.stream = processor.StreamProcessor(self.store)
        self.dispatch = schedule.Dispatcher(self.stream, clock=time.time, kick=lambda release: None)
        trigger = triggers.Trigger.from_json(json.dumps(PATTERN))
        for r in releases:
            self.dispatch.arm(r, 1, trigger)
        self._n = 0

    def fire(self, release: str) -> schedule.PendingRun:
        """Ingest the pattern's two events (the second completes it); the run it queued."""
        self._n += 1
        now = time.time()
        self.stream.ingest([{"type": "page_view", "page": "draw", "ts": now}])
        self.stream.ingest([{"type": "submit", "page": "draw", "ts": now, "attrs": {"digit": self._n}}])
        pending = self.dispatch.next(release, 1)
        if pending is None:
            raise RuntimeError("the pattern did not fire")
        return pending


def run_latency(
    *,
    digits_dir: pathlib.Path,
    data_file: pathlib.Path,
    work: pathlib.Path,
    runs: int = 300,
    cold_runs: int = 30,
    fresh_runs: int = 10,
    concurrent_runs: int = 40,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """The latency section (JSON-able), measured in `work`."""
    load_before = os.getloadavg()[0]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    with np.load(data_file, allow_pickle=False) as npz:
        np.savez(data / "digits.npz", X=npz["X"][:150], y=npz["y"][:150])
    bundles = []
    for t in range(8):
        b = work / f"task{t}" / "1"
        shutil.copytree(digits_dir, b)
        (b / "task.py").write_text(TASK)
        bundles.append(b)
    manifest = bundle_files.build_manifest(bundles[0])
    releases = [f"bench/digits-{t}" for t in range(8)]
    trig = _Trigger(work, releases)
    limits = runtime.TaskLimits(timeout_s=120, memory_mb=2048)

    async def once(pool: warmpool.WorkerPool | None, t: int = 0) -> float:
        started = time.perf_counter()
        pending = trig.fire(releases[t])
        common: dict[str, Any] = {
            "bundle_dir": bundles[t],
            "bundle": manifest,
            "data_dir": data,
            "limits": limits,
            "inputs": pending.inputs,
        }
        if pool is None:
            await runtime.run_task(work_dir=work, **common)
        else:
            await pool.run(release=releases[t], version=1, **common)
        return (time.perf_counter() - started) * 1000

    async def measure() -> dict[str, Any]:
        warm = warmpool.WorkerPool(work_dir=work, settings=warmpool.PoolSettings(max_workers=8, memory_budget=None))
        cold = warmpool.WorkerPool(work_dir=work, settings=warmpool.PoolSettings(max_workers=0))
        try:
            progress("latency: warm")
            await once(warm)  # starts the zygote and the worker: neither is what a warm run pays
            (worker,) = warm.workers()
            agent_cpu, worker_cpu = time.process_time(), warmpool.cpu_seconds(worker.pid) or 0.0
            warm_ms = [await once(warm) for _ in range(runs)]
            # CPU both sides spent per warm run (trigger, dispatch, the task, the answer): what is left of the
            # latency is waiting for a core, which a loaded machine makes long.
            cpu_ms = (
                (time.process_time() - agent_cpu + (warmpool.cpu_seconds(worker.pid) or 0.0) - worker_cpu) / runs * 1000
            )
            progress("latency: cold (forked from the zygote)")
            await once(cold)  # the zygote starts once per agent
            cold_ms = [await once(cold) for _ in range(cold_runs)]
            progress("latency: fresh interpreter")
            fresh_ms = [await once(None) for _ in range(fresh_runs)]

            async def eight(pool: warmpool.WorkerPool, each: int) -> float:
                async def task(t: int) -> None:
                    for _ in range(each):
                        await once(pool, t)

                await asyncio.gather(*(once(pool, t) for t in range(8)))  # every task's first run: not counted
                started = time.perf_counter()
                await asyncio.gather(*(task(t) for t in range(8)))
                return 8 * each / (time.perf_counter() - started)

            progress("throughput: 8 tasks at once, warm")
            warm8 = await eight(warm, concurrent_runs)
            workers = warm.workers()
            rss = [w.rss for w in workers]
            pss = [pss_bytes(w.pid) for w in workers]
            zygote_rss = warmpool.rss_bytes(warm.zygote.pid or 0)
            progress("throughput: 8 tasks at once, cold")
            cold8 = await eight(cold, max(2, concurrent_runs // 10))
        finally:
            await warm.close()
            await cold.close()
        return {
            "warm": _summary(warm_ms),
            "warm_cpu_per_run_ms": cpu_ms,
            "cold": _summary(cold_ms),
            "fresh": _summary(fresh_ms),
            "concurrent8_warm_runs_per_s": warm8,
            "concurrent8_cold_runs_per_s": cold8,
            "warm_worker_rss_bytes": int(statistics.median(rss)) if rss else 0,
            "warm_worker_pss_bytes": int(statistics.median(pss)) if pss else 0,
            "warm_workers": len(workers),
            "zygote_rss_bytes": zygote_rss,
        }

    doc = asyncio.run(measure())
    progress("latency: the model alone")
    model = engine.get_engine("mnn").load(str(bundles[0] / "model.mnn"), backend="cpu", threads=1)
    with np.load(data / "digits.npz", allow_pickle=False) as npz:
        X = np.asarray(npz["X"], dtype=np.float32)
    model_ms = []
    for i in range(max(runs, 1000)):
        started = time.perf_counter()
        model.run({"input": X[i % len(X) : i % len(X) + 1]})
        model_ms.append((time.perf_counter() - started) * 1000)
    trig.store.close()
    model_summary = _summary(model_ms)
    return {
        **doc,
        "model": model_summary,
        "warm_p50_ms": doc["warm"]["p50_ms"],
        "warm_p99_ms": doc["warm"]["p99_ms"],
        "cold_p50_ms": doc["cold"]["p50_ms"],
        "cold_p99_ms": doc["cold"]["p99_ms"],
        "fresh_p50_ms": doc["fresh"]["p50_ms"],
        "model_p50_ms": model_summary["p50_ms"],
        "warm_overhead_p50_ms": doc["warm"]["p50_ms"] - model_summary["p50_ms"],
        "fresh_over_warm_p50": doc["fresh"]["p50_ms"] / doc["warm"]["p50_ms"],
        "cold_over_warm_p50": doc["cold"]["p50_ms"] / doc["warm"]["p50_ms"],
        "concurrent8_warm_over_cold": doc["concurrent8_warm_runs_per_s"] / doc["concurrent8_cold_runs_per_s"],
        "goals": GOALS,
        "cores": os.cpu_count(),
        # Other work on the machine skews every figure: the 1-minute load average before and after.
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
    }


def table(lat: dict[str, Any]) -> Any:
    from rich.table import Table

    t = Table(title="trigger -> result (pattern-triggered digits inference)")
    for col in ("path", "p50 ms", "p99 ms", "runs", "/ warm p50"):
        t.add_column(col, justify="left" if col == "path" else "right")
    for name in ("warm", "cold", "fresh", "model"):
        row = lat[name]
        ratio = row["p50_ms"] / lat["warm"]["p50_ms"]
        t.add_row(name, f"{row['p50_ms']:.3f}", f"{row['p99_ms']:.3f}", str(row["runs"]), f"{ratio:.2f}")
    t.caption = (
        f"warm overhead p50 {lat['warm_overhead_p50_ms']:.2f} ms (goal <= 2; CPU per warm run "
        f"{lat['warm_cpu_per_run_ms']:.2f} ms); cold p50 {lat['cold_p50_ms']:.1f} ms "
        f"(goal <= 50); 8 tasks at once: {lat['concurrent8_warm_runs_per_s']:.0f} runs/s warm, "
        f"{lat['concurrent8_cold_runs_per_s']:.0f} cold; warm worker RSS "
        f"{lat['warm_worker_rss_bytes'] / 2**20:.1f} MiB, PSS {lat['warm_worker_pss_bytes'] / 2**20:.1f} MiB"
    )
    return t
